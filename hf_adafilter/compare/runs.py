"""Running a comparison: each run in its own process, finished runs cached for `--resume`, and the suite that
chooses each method's learning rate on validation before its final runs touch the test split."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Protocol

from .estimate import eval_sizes, minutes, prior_estimate_s, remaining_estimate_s
from .plan import Budget, RunSpec, Task, choose_learning_rate, fingerprint, plan_runs, run_argv


class SuiteOptions(Protocol):
    """What a suite reads of its command line (`hf-adafilter-compare`'s or the transfer benchmark's)."""

    methods: Sequence[str]
    model_name_or_path: str
    threads: int | None  # torch/OpenMP threads per run; None: all cores
    resume: bool  # reuse finished runs with identical command lines
    keep_run_dirs: bool
    selection_only: bool  # stop before any run reads the test split


def execute(spec: RunSpec, task: Task, budget: Budget, args: SuiteOptions, work_dir: Path) -> dict:
    """One run of the training script in its own process (isolation, clean RNG, its own peak memory, its own
    time), in the current directory (so relative data paths mean what they meant to the user)."""
    key = fingerprint(spec, task, budget, args.model_name_or_path)
    run_dir = work_dir / f"{spec.task}-{spec.method}-{spec.phase}-{spec.seed}-{key}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    argv = run_argv(spec, task, budget, args.model_name_or_path, run_dir / "output")
    result_path, log_path = run_dir / "result.json", run_dir / "log.txt"
    command = [sys.executable, "-m", "hf_adafilter.compare.worker", str(result_path), str(args.threads or 0), *argv]
    env = dict(os.environ, HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    with log_path.open("w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if completed.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"run failed ({spec.label}), exit {completed.returncode}; log {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result.update(asdict(spec), key=key, wall_s=wall, command="examples/run.py " + shlex.join(argv))
    if spec.phase == "final" and "test_accuracy" not in result["metrics"]:
        raise RuntimeError(f"{spec.task} has no test split: give one (--test_dir or a dataset with 'test').")
    if not args.keep_run_dirs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def run_suite(args: SuiteOptions, budget: Budget, tasks: Sequence[Task], work_dir: Path) -> list[dict]:
    """Every planned run, in order, each method's LR chosen on validation before its final runs (see `select`);
    the results of the runs, cached ones included."""
    task_by_name = {task.name: task for task in tasks}
    plan = plan_runs(tasks, args.methods, budget)
    cache = load_cache(work_dir / "runs.jsonl") if args.resume else {}
    print(f"plan: {len(plan)} runs ({sum(r.phase == 'select' for r in plan)} LR-selection, "
          f"{sum(r.phase == 'final' for r in plan)} final), prior estimate {minutes(prior_estimate_s(plan, budget, eval_sizes(tasks)))} "
          "on 2 quiet CPU cores", flush=True)  # fmt: skip
    done: list[dict] = []
    chosen: dict[tuple[str, str], float] = {}
    start = time.perf_counter()
    pending = list(plan)

    def run(spec: RunSpec) -> dict:
        task = task_by_name[spec.task]
        cached = cache.get(fingerprint(spec, task, budget, args.model_name_or_path))
        result = cached or execute(spec, task, budget, args, work_dir)
        if not cached:
            append_cache(work_dir / "runs.jsonl", result)
        done.append(result)
        eta = remaining_estimate_s(
            pending, [r for r in done if not r.get("resumed")], budget, eval_sizes(tasks)
        )
        accuracy = result["metrics"].get("test_accuracy", result["metrics"]["eval_accuracy"])
        which = "test" if spec.phase == "final" else "val"
        print(f"[{len(done)}/{len(done) + len(pending)}] {spec.label}: {which} acc {accuracy:.4f}, "
              f"{result['wall_s']:.0f} s{' (resumed)' if cached else ''}; elapsed "
              f"{minutes(time.perf_counter() - start)}, remaining ~{minutes(eta)}", flush=True)  # fmt: skip
        if cached:
            result["resumed"] = True
        return result

    def select(task: str, method: str) -> float:
        """The best LR on validation; at an edge of what was tried, the grid grows by one step that way (up to
        `budget.grid_extensions` times), so the choice is bracketed. A method that takes another's LR gets
        validation runs at it in resplit presets (where the recipe variants are compared)."""
        source = budget.lr_from.get(method)
        if source is not None:
            if (task, source) not in chosen:
                chosen[(task, source)] = select(task, source)
            if budget.resplit:
                for seed in budget.selection_seeds:
                    run(RunSpec(task, method, chosen[(task, source)], seed, "select"))
            return chosen[(task, source)]
        grid = budget.lr_grids[method]
        ran = {
            (r["learning_rate"], r["seed"])
            for r in done
            if (r["task"], r["method"], r["phase"]) == (task, method, "select")
        }
        if len(grid) > 1:  # a method planned only as another's LR source still gets its grid
            for lr in grid:
                for seed in budget.selection_seeds:
                    if (lr, seed) not in ran:
                        run(RunSpec(task, method, lr, seed, "select"))
        while True:  # ends: each pass runs one more LR, and the cap on extensions returns
            selection = [
                r for r in done if r["phase"] == "select" and (r["task"], r["method"]) == (task, method)
            ]
            best = choose_learning_rate(selection, grid)
            tried = sorted({r["learning_rate"] for r in selection})
            if (
                len(tried) < 2
                or tried[0] < best < tried[-1]
                or len(tried) - len(grid) >= budget.grid_extensions
            ):
                return best
            # One more step of the grid's own spacing at that end.
            lr = best * grid[-1] / grid[-2] if best == tried[-1] else best * grid[0] / grid[1]
            for seed in budget.selection_seeds:
                run(RunSpec(task, method, float(f"{lr:.3g}"), seed, "select"))

    while pending:
        spec = pending.pop(0)
        if spec.phase == "final":
            key = (spec.task, spec.method)
            if key not in chosen:
                chosen[key] = select(*key)
            if args.selection_only:
                continue
            spec = replace(spec, learning_rate=chosen[key])
        run(spec)
    return done


def load_cache(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {entry["key"]: entry for entry in map(json.loads, path.read_text().splitlines()) if entry}


def append_cache(path: Path, result: dict) -> None:
    """One `write` of the whole line on an O_APPEND file: two suites sharing a cache never interleave lines."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, (json.dumps(result) + "\n").encode())
    finally:
        os.close(descriptor)
