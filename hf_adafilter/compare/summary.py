"""From finished runs to the numbers a user decides on: per task and method the test accuracy over seeds, each
method's error minus fine-tuning's with paired 95% t intervals, the smallest effect the design detects, exact
McNemar tests over every test image, and the gates' diagnostics."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence

from .methods import ADAFILTER_METHODS, LEAN_GATE_METHODS
from .plan import pooled_validation

COLLAPSE_MARGIN = 0.02  # a layer whose fine-tuned fraction is within this of 0 or 1 has collapsed


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean, or None if any value is missing (a run from before the metric existed)."""
    return statistics.fmean(values) if values and all(v is not None for v in values) else None


def t_quantile(probability: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(probability, df))


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and half-width of its 95% t interval (None for a single value)."""
    values = list(values)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def detectable_effect(values: Sequence[float], power: float = 0.8) -> float | None:
    """The smallest true mean difference a two-sided paired t test at 5% detects with `power`, given the spread of
    these paired differences: (t_0.975 + t_power) * sd / sqrt(n)."""
    values = list(values)
    if len(values) < 2:
        return None
    df = len(values) - 1
    return (t_quantile(0.975, df) + t_quantile(power, df)) * statistics.stdev(values) / math.sqrt(len(values))


def mcnemar(reference: Sequence[str], method: Sequence[str]) -> dict:
    """Exact McNemar test over every test image of every split, pooled: `reference_only` images only the
    reference got right, `method_only` only the method; p the two-sided binomial p of that split of discordant
    images."""
    from scipy import stats

    reference_only = method_only = 0
    for ref, other in zip(reference, method, strict=True):
        if len(ref) != len(other):
            raise ValueError("paired runs disagree on the number of test images")
        reference_only += sum(a == "1" and b == "0" for a, b in zip(ref, other, strict=True))
        method_only += sum(a == "0" and b == "1" for a, b in zip(ref, other, strict=True))
    discordant = reference_only + method_only
    p = stats.binomtest(min(reference_only, method_only), discordant, 0.5).pvalue if discordant else 1.0
    return {"reference_only": reference_only, "method_only": method_only, "p": float(p),
            "images": sum(len(ref) for ref in reference)}  # fmt: skip


def add_paired_statistics(cells: dict, tasks: Sequence[str], reference: str = "finetune") -> None:
    """Per task and method, against `reference` on the same seeds (= splits in resplit presets): `splits`,
    `paired_mean` and `paired_ci95` ([low, high]) of the method's test error minus the reference's (points),
    `detectable_effect` (points, 80% power) and, where every run kept its per-image results, `mcnemar`."""
    for task in tasks:
        ref = cells.get(task, {}).get(reference)
        if ref is None:
            continue
        for method, cell in cells[task].items():
            if method == reference:
                continue
            seeds = sorted(set(ref["test_accuracy_per_seed"]) & set(cell["test_accuracy_per_seed"]))
            diffs = [
                100 * (ref["test_accuracy_per_seed"][s] - cell["test_accuracy_per_seed"][s]) for s in seeds
            ]
            if not diffs:
                continue
            mean, half = mean_interval(diffs)
            cell.update(splits=len(diffs), paired_mean=mean, detectable_effect=detectable_effect(diffs),
                        paired_ci95=None if half is None else [mean - half, mean + half])  # fmt: skip
            correct = [
                (ref["test_correct_per_seed"].get(s), cell["test_correct_per_seed"].get(s)) for s in seeds
            ]
            if all(a is not None and b is not None for a, b in correct):
                cell["mcnemar"] = mcnemar([a for a, _ in correct], [b for _, b in correct])


def collapsed_layers(fractions: dict[str, float] | None) -> tuple[int, int, int]:
    """(layers gated all-0, all-1, total): a gate network that collapsed uses one bank everywhere."""
    if not fractions:
        return 0, 0, 0
    values = list(fractions.values())
    return (
        sum(v <= COLLAPSE_MARGIN for v in values),
        sum(v >= 1 - COLLAPSE_MARGIN for v in values),
        len(values),
    )


def summarize(results: Sequence[dict], tasks: Sequence[str], methods: Sequence[str]) -> dict:
    """Per task and method: chosen LR, mean/std test accuracy over seeds, gate use, timing."""
    cells: dict[str, dict[str, dict]] = defaultdict(dict)
    for task in tasks:
        for method in methods:
            finals = [r for r in results if (r["task"], r["method"], r["phase"]) == (task, method, "final")]
            selection = [
                r for r in results if (r["task"], r["method"], r["phase"]) == (task, method, "select")
            ]
            if not finals:
                continue
            accuracy = mean_std([r["metrics"]["test_accuracy"] for r in finals])
            cell = {
                "learning_rate": finals[0]["learning_rate"],
                "selection": {
                    f"{lr:g}": acc for lr, (acc, _) in sorted(pooled_validation(selection).items())
                },
                "test_accuracy_mean": accuracy[0],
                "test_accuracy_std": accuracy[1],
                "test_accuracy_per_seed": {r["seed"]: r["metrics"]["test_accuracy"] for r in finals},
                "test_correct_per_seed": {r["seed"]: r.get("test_correct") for r in finals},
                "validation_accuracy_mean": mean_std([r["metrics"]["eval_accuracy"] for r in finals])[0],
                "train_accuracy_mean": mean_or_none(
                    [r["metrics"].get("train_eval_accuracy") for r in finals]
                ),
                "wall_s_median": statistics.median(r["wall_s"] for r in finals),
                "train_s_median": statistics.median(
                    r["metrics"].get("train_runtime", math.nan) for r in finals
                ),
                "peak_rss_mb_max": max(r["peak_rss_mb"] for r in finals),
            }
            if method in ADAFILTER_METHODS:
                for split, prefix in (("validation", "eval"), ("test", "test")):
                    values = [r["metrics"].get(f"{prefix}_gates/finetuned_fraction") for r in finals]
                    if all(v is not None for v in values):
                        cell[f"finetuned_fraction_{split}"] = statistics.fmean(values)
                for split, prefix in (("validation", "eval"), ("test", "test")):
                    for gates in ("forced_finetuned", "forced_pretrained", "static"):
                        cell[f"{gates}_{split}_accuracy_mean"] = mean_or_none(
                            [r["metrics"].get(f"{prefix}_{gates}_accuracy") for r in finals]
                        )
                    cell[f"example_dependent_{split}"] = mean_or_none(
                        [r["metrics"].get(f"{prefix}_gates/example_dependent") for r in finals]
                    )
                cell["static_agreement"] = mean_or_none([r["metrics"].get("static_agreement") for r in finals])
                last_logs = [r.get("last_train_gate_log") or {} for r in finals]
                for key in ("train_eval_agreement", "example_dependent", "mean_abs_log_odds"):
                    cell[f"train_{key}"] = mean_or_none([log.get(f"gates/{key}") for log in last_logs])
                collapse = [collapsed_layers(r.get("eval_gate_fractions_per_layer")) for r in finals]
                cell["collapsed_layers_all0"] = statistics.fmean(c[0] for c in collapse)
                cell["collapsed_layers_all1"] = statistics.fmean(c[1] for c in collapse)
                cell["gated_layers"] = collapse[0][2]
            cells[task][method] = cell
    add_paired_statistics(cells, tasks)
    return {
        "cells": cells,
        "differences": error_differences(cells, tasks, methods),
        # AdaFilter against every other method and every lean gate network: AdaFilter's error minus the method's.
        "adafilter_vs": {
            method: reversed_difference(entry)
            for method, entry in error_differences(cells, tasks, methods, reference="adafilter").items()
            if method not in ADAFILTER_METHODS or method in LEAN_GATE_METHODS
        },
    }


def error_differences(
    cells: dict, tasks: Sequence[str], methods: Sequence[str], reference: str = "finetune"
) -> dict[str, dict]:
    """Test error of each method minus that of `reference` (default: fine-tuning), in points (negative: fewer errors): per task (mean
    over seeds), their mean, and the paired per-seed differences (same seed, averaged over tasks) with a 95% t
    interval of their mean."""
    differences = {}
    for method in methods:
        if method == reference:
            continue
        both = [t for t in tasks if reference in cells.get(t, {}) and method in cells.get(t, {})]
        if not both:
            continue
        per_task = {
            task: 100
            * (cells[task][reference]["test_accuracy_mean"] - cells[task][method]["test_accuracy_mean"])
            for task in both
        }
        seeds = set.intersection(
            *(set(cells[t][m]["test_accuracy_per_seed"]) for t in both for m in (reference, method))
        )
        per_seed = {
            seed: statistics.fmean(
                100 * (cells[t][reference]["test_accuracy_per_seed"][seed] - cells[t][method]["test_accuracy_per_seed"][seed])
                for t in both
            )
            for seed in sorted(seeds)
        }  # fmt: skip
        entry = {"per_task": per_task, "mean": statistics.fmean(per_task.values()), "per_seed": per_seed}
        if per_seed:
            entry["paired_mean"], entry["ci95"] = mean_interval(per_seed.values())
        differences[method] = entry
    return differences


def reversed_difference(entry: dict) -> dict:
    """An `error_differences` entry with the other sign (B - A instead of A - B); the interval's half-width stays."""

    def flip(value: float) -> float:
        return 0.0 - value  # not -value: a tie stays 0.0, not -0.0

    return {
        "per_task": {task: flip(value) for task, value in entry["per_task"].items()},
        "mean": flip(entry["mean"]),
        "per_seed": {seed: flip(value) for seed, value in entry["per_seed"].items()},
        **(
            {"paired_mean": flip(entry["paired_mean"]), "ci95": entry["ci95"]}
            if "paired_mean" in entry
            else {}
        ),
    }
