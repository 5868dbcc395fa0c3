"""The comparison's report: the verdict first, then the tables a user decides on (test accuracy, paired
differences, AdaFilter against each method), then the details (`report_sections`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from .methods import METHOD_TITLES
from .plan import Budget, Task, metrics_by_lr
from .report_sections import (
    cost_section,
    fit_section,
    gate_section,
    percent,
    seeds_text,
    selection_section,
    setup_section,
    timing_section,
)
from .summary import mean_or_none

PAPER_MEAN_ERROR_REDUCTION = 2.54


def verdict(differences: dict, tasks: Sequence[str], quick: bool = False, why_not: str = "") -> str:
    """The answer in one sentence: does AdaFilter beat fine-tuning here (only where the paired interval excludes
    0)? `why_not` follows a "no" (e.g. where the investigation of it is written up)."""
    ada = differences.get("adafilter")
    if ada is None:
        return "AdaFilter and fine-tuning were not both run: no verdict."
    if quick:
        return (
            f"Quick smoke run: AdaFilter − fine-tuning = {ada['mean']:+.2f} error points, which means nothing at "
            "this scale (a few steps on tiny subsets); run without --quick for the comparison."
        )
    wins = sum(v < 0 for v in ada["per_task"].values())
    mean = ada["mean"]
    # A lower mean beats fine-tuning only where the paired interval excludes 0.
    beats = mean < 0 and ada.get("ci95") is not None and ada["paired_mean"] + ada["ci95"] < 0
    outcome = (
        "**AdaFilter beats standard fine-tuning here**"
        if beats
        else "**AdaFilter does NOT beat standard fine-tuning here**"
    )
    why = "" if beats or not why_not else f" {why_not}"
    return (
        f"{outcome}: its mean test error is {mean:+.2f} points relative to fine-tuning (negative = fewer errors; "
        f"the paper reports {-PAPER_MEAN_ERROR_REDUCTION:+.2f} on its 7 datasets), lower on {wins} of "
        f"{len(ada['per_task'])} tasks.{why}"
    )


def paired_verdict(cells: dict, task: str) -> str:
    """The powered answer on one task: AdaFilter's paired difference to fine-tuning, its interval, what the design
    could detect, and whether the learned gates beat all-F."""
    ada = cells.get(task, {}).get("adafilter")
    if ada is None or ada.get("paired_ci95") is None:
        return f"{task}: AdaFilter and fine-tuning were not both run on two or more splits."
    low, high = ada["paired_ci95"]
    outcome = (
        "fewer" if high < 0 else "more" if low > 0 else "neither fewer nor more (the interval includes 0)"
    )
    test = ada.get("mcnemar")
    mcnemar_text = (f"; pooled McNemar over {test['images']} test images: fine-tuning alone right on "
                    f"{test['reference_only']}, AdaFilter alone on {test['method_only']}, p = {test['p']:.3g}"
                    if test else "")  # fmt: skip
    forced = ada.get("forced_finetuned_test_accuracy_mean")
    gates = (f" Learned gates {percent(ada['test_accuracy_mean'])}% vs all-F {percent(forced)}%."
             if forced is not None else "")  # fmt: skip
    return (f"**{task}, {ada['splits']} paired splits: AdaFilter makes {outcome} errors than fine-tuning**: "
            f"{ada['paired_mean']:+.2f} points (95% CI [{low:+.2f}, {high:+.2f}]; the design detects "
            f"{ada['detectable_effect']:.2f} points at 80% power{mcnemar_text}).{gates}")  # fmt: skip


def write_markdown(
    path: Path, report: dict, tasks: Sequence[Task], methods: Sequence[str], budget: Budget, meta: dict
) -> None:
    cells, differences = report["cells"], report["differences"]
    names = [t.name for t in tasks]
    quick = meta.get("preset") == "quick"
    lines = [f"# {meta.get('title', 'Transfer benchmark')}{' (QUICK SMOKE RUN: not a result)' if quick else ''}", ""]
    if quick:
        lines += ["> Produced by `--quick`: tiny subsets, a few steps, one seed. It checks that the pipeline runs; "
                  "its numbers say nothing about AdaFilter.", ""]  # fmt: skip
    lines += [verdict(differences, names, quick, meta.get("why_not", "")), ""]
    if budget.resplit:
        lines += [paired_verdict(cells, name) for name in names] + [""]
    lines += ["## Test accuracy (%), mean ± std over seeds", ""]
    lines += [
        "| method | "
        + " | ".join(names)
        + " | mean | Δ error vs fine-tuning (points) | paired per-seed Δ, 95% CI |"
    ]
    lines += ["|---" * (len(names) + 4) + "|"]
    for method in methods:
        row = [METHOD_TITLES[method]]
        means = []
        for task in names:
            cell = cells.get(task, {}).get(method)
            row.append(percent(cell["test_accuracy_mean"], cell["test_accuracy_std"]) if cell else "–")
            if cell:
                means.append(cell["test_accuracy_mean"])
        row.append(percent(statistics.fmean(means)) if len(means) == len(names) else "–")
        diff = differences.get(method)
        row.append("0 (reference)" if method == "finetune" else f"{diff['mean']:+.2f}" if diff else "–")
        row.append(interval_text(diff) if diff else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Δ error = test error of the method − test error of standard fine-tuning, in percentage points, "
              "averaged over tasks (negative: the method makes fewer errors). Per task:", ""]  # fmt: skip
    lines += ["| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for method, diff in differences.items():
        lines.append("| " + METHOD_TITLES[method] + " | "
                     + " | ".join(f"{diff['per_task'][t]:+.2f}" if t in diff["per_task"] else "–" for t in names) + " |")  # fmt: skip
    lines += paired_section(cells, names, methods)
    lines += versus_section(report.get("adafilter_vs", {}), names)
    lines += fit_section(cells, names, methods)
    lines += gate_section(cells, names, methods)
    lines += timing_section(cells, names, methods)
    lines += cost_section(report.get("costs", {}), methods, meta)
    lines += selection_section(cells, names, methods, budget)
    lines += setup_section(tasks, budget, meta)
    path.write_text("\n".join(lines) + "\n")


def paired_section(cells: dict, names: Sequence[str], methods: Sequence[str]) -> list[str]:
    """Per task: each method's test error minus fine-tuning's over the paired seeds (splits)."""
    rows = [(task, method, cells[task][method]) for task in names for method in methods
            if cells.get(task, {}).get(method, {}).get("paired_ci95") is not None]  # fmt: skip
    if not rows:
        return []
    lines = ["", "## Paired per task: test error minus fine-tuning's (points)", "",
             "Over the seeds both ran (in resplit presets each seed is its own split, so a seed is an independent "
             "replicate); 95% t interval; the smallest effect a paired t test detects at 80% power; the exact "
             "McNemar test pooled over every test image of every split.", "",
             "| task | method | splits | mean | 95% CI | detectable (80% power) | FT only right / method only right | McNemar p |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for task, method, cell in rows:
        low, high = cell["paired_ci95"]
        test = cell.get("mcnemar")
        counts = f"{test['reference_only']} / {test['method_only']}" if test else "–"
        p_value = f"{test['p']:.3g}" if test else "–"
        lines.append(f"| {task} | {METHOD_TITLES[method]} | {cell['splits']} | {cell['paired_mean']:+.2f} | "
                     f"[{low:+.2f}, {high:+.2f}] | {cell['detectable_effect']:.2f} | {counts} | {p_value} |")  # fmt: skip
    return lines


def interval_text(diff: dict) -> str:
    """`-1.23 ± 0.45 (seeds: -1.0, -1.5, -1.2)`: the mean paired difference and its 95% t interval."""
    if diff.get("ci95") is None:
        return "–"
    seeds = ", ".join(f"{v:+.1f}" for v in diff["per_seed"].values())
    return f"{diff['paired_mean']:+.2f} ± {diff['ci95']:.2f} (seeds: {seeds})"


def versus_section(versus: dict[str, dict], names: Sequence[str]) -> list[str]:
    """AdaFilter's error minus each other method's: the comparison a user choosing between them needs."""
    if not versus:
        return []
    lines = ["", "## AdaFilter against each method", "",
             "Test error of AdaFilter minus that of the method, in points (negative: AdaFilter makes fewer errors).", "",
             "| AdaFilter vs | mean over tasks | paired per-seed, 95% CI | " + " | ".join(names) + " |",
             "|---" * (len(names) + 3) + "|"]  # fmt: skip
    for method, diff in versus.items():
        per_task = " | ".join(f"{diff['per_task'][t]:+.2f}" if t in diff["per_task"] else "–" for t in names)
        lines.append(
            f"| {METHOD_TITLES[method]} | {diff['mean']:+.2f} | {interval_text(diff)} | {per_task} |"
        )
    return lines


def validation_table(
    results: Sequence[dict], names: Sequence[str], methods: Sequence[str], budget: Budget
) -> list[str]:
    """The validation runs only (no test split read): per task, method and LR, pooled over the selection seeds,
    accuracy and, for AdaFilter variants, the same models with every gate forced to F and to S, the share of
    example-dependent filters and the fine-tuned fraction. What the recipe is chosen on."""
    lines = [f"# Validation runs ({seeds_text(budget.selection_seeds)}, mean)", "",
             "| task | method | LR | validation acc | all F | all S | example-dependent | fine-tuned fraction | "
             "train acc |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for task in names:
        for method in methods:
            selection = [
                r for r in results if (r["task"], r["method"], r["phase"]) == (task, method, "select")
            ]
            for lr, runs in sorted(metrics_by_lr(selection).items()):

                def mean_of(key: str, scale: float = 100.0, runs=runs) -> str:
                    value = mean_or_none([m.get(key) for m in runs])
                    return (
                        "–" if value is None else f"{scale * value:.1f}" if scale == 100 else f"{value:.3f}"
                    )

                lines.append(f"| {task} | {METHOD_TITLES[method]} | {lr:g} | {mean_of('eval_accuracy')} | "
                             f"{mean_of('eval_forced_finetuned_accuracy')} | {mean_of('eval_forced_pretrained_accuracy')} | "
                             f"{mean_of('eval_gates/example_dependent', 1)} | {mean_of('eval_gates/finetuned_fraction', 1)} | "
                             f"{mean_of('train_eval_accuracy')} |")  # fmt: skip
    return lines
