"""How long a comparison will take: a prior from measured step costs before anything ran, then the medians of the
runs already timed."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence

from .methods import ADAFILTER_METHODS
from .plan import Budget, RunSpec, Task

# A budget that keeps the backbone's image size is estimated at the common 224 px.
ASSUMED_IMAGE_SIZE = 224

# Relative cost of a training step (fine-tuning = 1), for the estimate printed before the first run is timed.
# Measured at 96 px, batch 32, 2 threads, in the quietest minutes of a shared machine (best of 6 steps): fine-tuning
# 0.40 s, AdaFilter variants 0.80-0.86 s, linear probe 0.10 s; evaluation ~4 ms per image (AdaFilter ~6.5 ms).
# The baselines: median training time of their paper-regime final runs over fine-tuning's (58, 49, 36 s vs 59 s).
PRIOR_STEP_COST = {
    "linear_probe": 0.25,
    "finetune": 1.0,
    "finetune_sgd": 1.0,
    "finetune_128px": 1.8,
    "l2sp": 1.0,
    "lora": 0.85,
    "bitfit": 0.6,
} | dict.fromkeys(ADAFILTER_METHODS, 2.1)
PRIOR_EVAL_COST = {
    "linear_probe": 0.8,
    "finetune": 1.0,
    "finetune_sgd": 1.0,
    "finetune_128px": 1.8,
    "l2sp": 1.0,
    "lora": 1.2,
    "bitfit": 1.0,
} | dict.fromkeys(ADAFILTER_METHODS, 1.65)
PRIOR_FINETUNE_STEP_S = 0.45  # incl. loading and augmenting the batch
PRIOR_EVAL_S_PER_IMAGE = 0.004  # fine-tuning's, at 96 px
PRIOR_RUN_OVERHEAD_S = 7.0  # interpreter, imports, model build, saving


def prior_estimate_s(
    runs: Sequence[RunSpec], budget: Budget, eval_images: dict[str, dict[str, int]]
) -> float:
    """Before anything is timed: step and per-image evaluation times measured at 96 px on 2 cores, scaled by
    batch and pixels, times relative method costs. `eval_images`: {task: {split: images}} (missing: 1000).
    Evaluation covers validation and training images, test in final runs, and three passes each for AdaFilter
    (learned gates, all F, all S)."""
    pixels = ((budget.image_size or ASSUMED_IMAGE_SIZE) / 96) ** 2
    total = 0.0
    for run in runs:
        sizes = eval_images.get(run.task, {})
        passes = 3 if run.method in ADAFILTER_METHODS else 1
        images = passes * (
            sizes.get("validation", 1000) + (sizes.get("test", 1000) if run.phase == "final" else 0)
        )
        images += sizes.get("train", 1000)
        train = (
            budget.steps(sizes.get("train", 1000))
            * PRIOR_FINETUNE_STEP_S
            * (budget.train_batch_size / 32)
            * PRIOR_STEP_COST[run.method]
        )
        evaluation = images * PRIOR_EVAL_S_PER_IMAGE * PRIOR_EVAL_COST[run.method]
        total += PRIOR_RUN_OVERHEAD_S + (train + evaluation) * pixels
    return total


def eval_sizes(tasks: Sequence[Task]) -> dict[str, dict[str, int]]:
    return {task.name: task.record.get("sizes_per_split", {}) for task in tasks}


def remaining_estimate_s(
    pending: Sequence[RunSpec], done: Sequence[dict], budget: Budget, eval_images: dict[str, dict[str, int]]
) -> float:
    """Median measured time of each method; methods not yet timed scale the measured ones by the prior costs."""
    walls = defaultdict(list)
    for result in done:
        walls[result["method"]].append(result["wall_s"])
    medians = {method: statistics.median(values) for method, values in walls.items()}
    if not medians:
        return prior_estimate_s(pending, budget, eval_images)
    unit = statistics.median(medians[m] / PRIOR_STEP_COST[m] for m in medians)
    return sum(medians.get(r.method, unit * PRIOR_STEP_COST[r.method]) for r in pending)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"
