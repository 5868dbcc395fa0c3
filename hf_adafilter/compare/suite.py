"""A whole comparison: the suite of runs, then its report, chart and JSON; what both `hf-adafilter-compare` and
the transfer benchmark call."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .chart import write_chart
from .costs import method_costs
from .estimate import eval_sizes, minutes, prior_estimate_s
from .methods import CORE_METHODS
from .plan import Budget, RunSpec, Task, train_images
from .report import validation_table, verdict, write_markdown
from .report_sections import image_size_text
from .runs import SuiteOptions, run_suite
from .summary import summarize


def machine_description(threads: int | None) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    cores = os.cpu_count()
    return (
        f"{platform.processor() or platform.machine()}, {cores} cores, {device}, torch {torch.__version__}, "
        f"threads per run: {threads or torch.get_num_threads()}, Python {platform.python_version()}"
    )


def method_set_times(results: Sequence[dict]) -> dict[str, float]:
    """Added-up run time of the default method set and of what --extended adds."""
    core = sum(r["wall_s"] for r in results if r["method"] in CORE_METHODS)
    extra = sum(r["wall_s"] for r in results if r["method"] not in CORE_METHODS)
    times = {"default methods": core}
    if extra:
        times["--extended adds"] = extra
    return times


def regime(tasks: Sequence[Task], budget: Budget) -> dict:
    """How much data and training each task got: tools read this to tell the paper's regime from the short one."""
    per_class = {t.name: t.record.get("counts_per_class", {}).get("train") for t in tasks}
    return {
        "images_per_class": {name: max(counts) if counts else None for name, counts in per_class.items()},
        "train_images": {t.name: train_images(t) for t in tasks},
        "epochs": budget.epochs,
        "steps": {t.name: budget.steps(train_images(t) or 0) if budget.max_steps or train_images(t) else None
                  for t in tasks},
    }  # fmt: skip


def print_plan(plan: Sequence[RunSpec], budget: Budget, tasks: Sequence[Task], note: str = "") -> None:
    """What `--dry_run` shows: every run, and the prior time estimate."""
    for spec in plan:
        print(spec.label.replace("lr=nan", "lr=<chosen>"))
    estimate = prior_estimate_s(plan, budget, eval_sizes(tasks))
    print(f"{len(plan)} runs, prior estimate {minutes(estimate)} on 2 quiet CPU cores{note}")


def run_comparison(
    args: SuiteOptions, budget: Budget, tasks: Sequence[Task], work_dir: Path, prefix: Path, meta: dict
) -> dict:
    """Runs the suite (finished runs cached in `work_dir`) and writes `<prefix>.md/.json/.png`, or only the
    validation table `<prefix>_validation.md` with `args.selection_only`. `meta`: the command, the preset and the
    report's `why_not`, completed here with the date, machine and times. Returns the JSON's payload."""
    work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_suite(args, budget, tasks, work_dir)
    total = time.perf_counter() - start
    names = [t.name for t in tasks]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if args.selection_only:
        path = prefix.parent / f"{prefix.name}_validation.md"
        path.write_text("\n".join(validation_table(results, names, args.methods, budget)) + "\n")
        print(path.read_text() + f"\nwrote {path} in {minutes(total)}")
        return {"runs": results}
    report = summarize(results, names, args.methods)
    num_labels = len(tasks[0].record.get("classes", ())) or 10
    report["costs"] = method_costs(args.methods, args.model_name_or_path, num_labels, work_dir)
    import torch

    meta = {
        **meta,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(args.threads),
        "gpu": torch.cuda.is_available(),
        "model": args.model_name_or_path,
        "total_wall_s": total,
        "runs": len(results),
        "test_evaluations": sum(r["phase"] == "final" for r in results),
        "runs_resumed": sum(bool(r.get("resumed")) for r in results),
        "run_time_s_by_method_set": method_set_times(results),
        "cost_num_labels": num_labels,
    }
    quick = meta.get("preset") == "quick"
    write_markdown(prefix.with_suffix(".md"), report, tasks, args.methods, budget, meta)
    title = f"AdaFilter vs baselines, {args.model_name_or_path}, {image_size_text(budget)}" + (
        " (QUICK)" if quick else ""
    )
    write_chart(prefix.with_suffix(".png"), report, names, args.methods, title)
    payload = {
        "meta": meta,
        "budget": asdict(budget),
        "tasks": [asdict(t) for t in tasks],
        "regime": regime(tasks, budget),
        **report,
        "runs": results,
    }
    prefix.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(
        f"\n{verdict(report['differences'], names, quick)}\nwrote {prefix}.md/.json/.png in {minutes(total)}"
    )
    return payload
