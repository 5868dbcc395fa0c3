"""What a comparison runs: the budget every method shares, the tasks, and each run's training-script command line.

Selection runs train on train and score on validation; final runs also evaluate the test split, once, at the LR
the selection chose. A run's identity for `--resume` is its command line and its task's data (`fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .methods import ADAFILTER_METHODS, method_flags

# The training script's flags that load a task of the user's own (the rest of a run's command line is the plan's).
DATA_FLAGS = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "test_dir", "image_column_name",
              "label_column_name", "max_train_samples", "max_eval_samples", "max_predict_samples")  # fmt: skip


def data_args(options: object) -> tuple[str, ...]:
    """The `DATA_FLAGS` an argparse namespace `options` was given, as training-script flags."""
    values = {flag: getattr(options, flag) for flag in DATA_FLAGS}
    return tuple(item for flag, value in values.items() if value is not None for item in (f"--{flag}", str(value)))


@dataclass(frozen=True)
class Budget:
    """What every method gets: identical for all methods of one invocation."""

    image_size: int | None  # None: the backbone's own
    train_batch_size: int
    eval_batch_size: int
    seeds: tuple[int, ...]  # final runs (train, validation, test once each)
    selection_seeds: tuple[int, ...]  # LR selection runs (validation only), pooled
    lr_grids: dict[str, tuple[float, ...]]
    max_steps: int | None = None  # a fixed number of steps for every task...
    epochs: int | None = None  # ...or of passes over each task's training split (trained to convergence)
    warmup: float = 0.1  # share of steps
    weight_decay: float = 0.01
    min_crop_scale: float = 0.08  # random resized crop; torchvision's and HF's default
    # Tasks whose classes a mirror image changes (digits): no horizontal flip.
    unflipped_tasks: tuple[str, ...] = ()
    # Methods that take another method's chosen LR instead of a grid of their own (the paper's ablations).
    lr_from: dict[str, str] = field(default_factory=dict)
    # When the best LR is at an edge of the grid, try the next one out (x or / the grid's step), up to this often.
    grid_extensions: int = 0
    # Overrides of the training script's defaults; None: the defaults every user gets.
    batchnorm_momentum: float | None = None
    gate_learning_rate: float | None = None
    dataloader_workers: int = 0
    # Each seed its own split of the task (`Task.split_data_args`), so that seeds are independent replicates. Every
    # method then also gets validation runs where it takes another's LR (the recipe variants are compared there).
    resplit: bool = False

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("a Budget sets exactly one of max_steps and epochs")

    def steps(self, train_images: int) -> int:
        """Optimizer steps of a run on `train_images` images."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(train_images / self.train_batch_size)


@dataclass(frozen=True)
class Task:
    """A target task: a name and the training-script flags that load it (`record`: its sizes and classes)."""

    name: str
    data_args: tuple[str, ...]
    record: dict = field(default_factory=dict, compare=False, hash=False)
    # Resplit budgets: the data flags of each seed's own split (selection and final seeds).
    split_data_args: dict[int, tuple[str, ...]] = field(default_factory=dict, compare=False, hash=False)

    def data_args_for(self, seed: int) -> tuple[str, ...]:
        return self.split_data_args.get(seed, self.data_args)


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    learning_rate: float
    seed: int
    phase: str  # "select": train + validation; "final": train + validation + test

    @property
    def label(self) -> str:
        return f"{self.phase} {self.task} {self.method} lr={self.learning_rate:g} seed={self.seed}"


def train_images(task: Task) -> int | None:
    return task.record.get("sizes_per_split", {}).get("train")


def run_argv(spec: RunSpec, task: Task, budget: Budget, model: str, output_dir: Path) -> list[str]:
    """The training script's command line of one run: only the method flags, LR and seed differ between runs."""
    phases = ["--do_train", "--do_eval"] + (["--do_predict"] if spec.phase == "final" else [])
    images = train_images(task)
    if budget.max_steps is None and images is None:
        length = ["--num_train_epochs", str(budget.epochs)]
        steps = 100
    else:
        steps = budget.steps(images or 0)
        length = ["--max_steps", str(steps)]
    flips = task.name not in budget.unflipped_tasks
    flags = method_flags(spec.method, spec.learning_rate)
    # A method that sets the resolution itself gets none from the budget (its flag comes later and would win).
    given = budget.image_size is not None and "--image_size" not in flags
    size = ["--image_size", str(budget.image_size)] if given else []
    return [
        "--model_name_or_path", model,
        *task.data_args_for(spec.seed),
        *flags,
        "--output_dir", str(output_dir),
        "--overwrite_output_dir",
        *phases,
        "--evaluate_train_split", "true",
        *size,
        "--min_crop_scale", f"{budget.min_crop_scale:g}",
        "--horizontal_flip", str(flips).lower(),
        *length,
        "--per_device_train_batch_size", str(budget.train_batch_size),
        "--per_device_eval_batch_size", str(budget.eval_batch_size),
        "--learning_rate", f"{spec.learning_rate:g}",
        "--warmup_steps", f"{budget.warmup:g}",
        "--weight_decay", f"{budget.weight_decay:g}",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_steps", str(max(1, steps // 10)),
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--dataloader_num_workers", str(budget.dataloader_workers),
        "--seed", str(spec.seed),
        *method_settings(spec, budget),
    ]  # fmt: skip


def method_settings(spec: RunSpec, budget: Budget) -> list[str]:
    """Gate diagnostics for the AdaFilter variants (and, scored once per final model, what serving without gates
    costs), and the budget's overrides of the training script's defaults."""
    flags = []
    gated = spec.method in ADAFILTER_METHODS
    if gated:
        flags += ["--evaluate_forced_gates", "true"]
        if budget.gate_learning_rate is not None:
            flags += ["--gate_learning_rate", f"{budget.gate_learning_rate:g}"]
    if budget.batchnorm_momentum is not None:
        flags += ["--batchnorm_momentum", f"{budget.batchnorm_momentum:g}"]
    if gated and spec.phase == "final":
        flags += ["--evaluate_static_export", "true"]
    return flags


def plan_runs(tasks: Sequence[Task], methods: Sequence[str], budget: Budget) -> list[RunSpec]:
    """Selection runs (one seed, every LR of the grid; skipped for a 1-LR grid or a method that takes another's
    LR) and then, per task and method, the final seeds at the chosen LR (filled in once selection is done:
    `learning_rate` is NaN here). Methods whose LR comes from another run after it."""
    ordered = sorted(methods, key=lambda m: budget.lr_from.get(m) in methods)
    runs = []
    for task in tasks:
        for method in ordered:
            grid = budget.lr_grids.get(method, ())
            if method not in budget.lr_from and len(grid) > 1:
                runs += [
                    RunSpec(task.name, method, lr, seed, "select")
                    for lr in grid
                    for seed in budget.selection_seeds
                ]
            runs += [RunSpec(task.name, method, math.nan, seed, "final") for seed in budget.seeds]
    return runs


def fingerprint(spec: RunSpec, task: Task, budget: Budget, model: str) -> str:
    """Identifies a run for --resume by what it runs: its command line (output folder aside) and its
    task's data. What the suite plans around it (other methods' grids, other seeds) does not change it."""
    argv = run_argv(spec, task, budget, model, Path("<output_dir>"))
    payload = [argv, task.record.get("sources"), task.record.get("sizes")]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:16]


def metrics_by_lr(selection: Sequence[dict]) -> dict[float, list[dict]]:
    """The metrics of the selection runs, by learning rate (one entry per selection seed that ran it)."""
    by_lr: dict[float, list[dict]] = defaultdict(list)
    for result in selection:
        by_lr[result["learning_rate"]].append(result["metrics"])
    return by_lr


def pooled_validation(selection: Sequence[dict]) -> dict[float, tuple[float, float]]:
    """{LR: (validation accuracy, loss)}, each the mean over the selection seeds that ran it."""
    return {
        lr: (
            statistics.fmean(m["eval_accuracy"] for m in runs),
            statistics.fmean(m["eval_loss"] for m in runs),
        )
        for lr, runs in metrics_by_lr(selection).items()
    }


def choose_learning_rate(selection: Sequence[dict], grid: Sequence[float]) -> float:
    """Best validation accuracy, pooled over the selection seeds; ties go to the lower validation loss, then to
    the first LR of the grid."""
    if not selection:
        return grid[0]
    pooled = pooled_validation(selection)
    return max(pooled, key=lambda lr: (pooled[lr][0], -pooled[lr][1]))
