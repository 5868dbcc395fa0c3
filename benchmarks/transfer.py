#!/usr/bin/env python
"""Does AdaFilter beat standard fine-tuning? An offline transfer benchmark of the paper's headline claim.

The paper (Guo et al., AAAI 2020) reports that AdaFilter lowers the mean classification error of standard
fine-tuning by 2.54 points over 7 target datasets (ImageNet ResNet-50). This script tests the same claim on what
installs from the package registries: target tasks built by `benchmarks/prepare_data.py` (Fashion-MNIST, MNIST,
Tux Paint photo stamps) and the packaged ImageNet EfficientNet-Lite0. Every method (linear probe, standard
fine-tuning, AdaFilter, and the paper's two ablations: independent gates, no gated norm) runs through
`examples/run.py`, one subprocess per run, with the same data, augmentation, steps, batch and image size. The
learning rate of each method is chosen on the validation split from a fixed grid of the same size for every
method; the test split is evaluated once per final run and never by a selection run.

    python benchmarks/transfer.py                  # the CPU suite -> benchmarks/results/transfer.{md,json,png}
    python benchmarks/transfer.py --quick          # smoke run (a few minutes) -> benchmarks/results/transfer_quick.*
    python benchmarks/transfer.py --dry_run        # the plan and its time estimate, nothing run
    python benchmarks/transfer.py --full --image_size 224                  # GPU scale
    python benchmarks/transfer.py --full --image_size 224 --model_name_or_path microsoft/resnet-50 \\
        --dataset_name <hub id with a test split> --task_name <name>      # the paper's setting, with the Hub

Data is prepared on first use into `benchmarks/data/` (see `prepare_data.py`); `--resume` reuses runs already
finished by an interrupted invocation with identical settings.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS / "results"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import prepare_data  # noqa: E402

# Stands for the run's learning rate in a method's flags.
LEARNING_RATE = "{learning_rate}"
# Each method is a set of examples/run.py flags; every other flag is shared.
METHODS: dict[str, tuple[str, ...]] = {
    "linear_probe": ("--method", "linear_probe"),
    "finetune": ("--method", "finetune"),
    "adafilter": ("--method", "adafilter"),
    "adafilter_independent": ("--method", "adafilter", "--gate_network", "independent"),
    "adafilter_no_gated_norm": ("--method", "adafilter", "--gated_norm", "false"),
    # Lean gate networks (speed issue): kept only if paired runs at AdaFilter's LR and seeds show no accuracy loss.
    "adafilter_gates16": ("--method", "adafilter", "--gate_input_size", "16", "--gate_hidden_size", "16"),
    # Recipe variants after SpotTune (the authors' code), compared with AdaFilter's defaults on validation splits.
    # The default gated convs of EfficientNet plus its stem (whose F copy then trains, as fine-tuning trains it).
    "adafilter_gated_stem": (
        "--method", "adafilter", "--target_modules",
        r"embeddings\.convolution|encoder\..*depthwise_conv\.depthwise_conv|encoder\..*\.(project|expand)_conv|encoder\.top_conv",
    ),
    "adafilter_constant_noise": (
        "--method",
        "adafilter",
        "--gumbel_temperature_end",
        "5",
        "--gate_noise_end",
        "1",
    ),
    "adafilter_finetune_first": (
        "--method",
        "adafilter",
        "--gate_warmup_ratio",
        "0.5",
        "--gate_init_log_odds",
        "4",
        "--gate_regularization",
        "l1",
        "--gate_regularization_weight",
        "0.1",
    ),
    # SpotTune's optimiser for both methods: SGD with momentum, the gate network at the main LR (not 10x above).
    "finetune_sgd": ("--method", "finetune", "--optim", "sgd", "--optim_args", "momentum=0.9"),
    "adafilter_sgd": (
        "--method",
        "adafilter",
        "--optim",
        "sgd",
        "--optim_args",
        "momentum=0.9",
        "--gate_learning_rate",
        LEARNING_RATE,
    ),
    # Input resolution (replaces the budget's --image_size).
    "finetune_128px": ("--method", "finetune", "--image_size", "128"),
    "adafilter_128px": ("--method", "adafilter", "--image_size", "128"),
    "l2sp": ("--method", "l2sp"),
    "lora": ("--method", "lora"),
    "bitfit": ("--method", "bitfit"),
}
METHOD_TITLES = {
    "linear_probe": "linear probe",
    "finetune": "standard fine-tuning",
    "adafilter": "AdaFilter (LSTM gates, gated BN)",
    "adafilter_independent": "AdaFilter, independent gates (ablation)",
    "adafilter_no_gated_norm": "AdaFilter, no gated BN (ablation)",
    "adafilter_gates16": "AdaFilter, gate network 16 wide (lean)",
    "adafilter_gated_stem": "AdaFilter, stem gated (trained in F)",
    "adafilter_constant_noise": "AdaFilter, constant temperature 5 and noise (SpotTune)",
    "adafilter_finetune_first": "AdaFilter, fine-tune first, then gate (L1 towards S)",
    "finetune_sgd": "standard fine-tuning, SGD momentum 0.9",
    "adafilter_sgd": "AdaFilter, SGD momentum 0.9, gate LR = LR",
    "finetune_128px": "standard fine-tuning, 128 px",
    "adafilter_128px": "AdaFilter, 128 px",
    "l2sp": "L2-SP fine-tuning",
    "lora": "LoRA (PEFT)",
    "bitfit": "BitFit (biases, norms, head)",
}
# The paper's comparison (default), and with --extended the methods a user would otherwise pick.
CORE_METHODS = ("linear_probe", "finetune", "adafilter", "adafilter_independent", "adafilter_no_gated_norm")
EXTENDED_METHODS = (*CORE_METHODS, "l2sp", "lora", "bitfit")
ADAFILTER_METHODS = tuple(m for m in METHODS if m.startswith("adafilter"))
# Gate-network variants measured against AdaFilter's defaults at its chosen LR and seeds (paired).
LEAN_GATE_METHODS = ("adafilter_gates16",)
RECIPE_VARIANTS = ("adafilter_gated_stem", "adafilter_constant_noise", "adafilter_finetune_first")

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
PAPER_MEAN_ERROR_REDUCTION = 2.54
COLLAPSE_MARGIN = 0.02  # a layer whose fine-tuned fraction is within this of 0 or 1 has collapsed
WORKER_FLAG = "--_worker"
CPU_ONLY_NOTE = " (a CPU figure: --full is meant for a GPU, where it is far shorter)"
UNSET = object()  # an argparse default that is never type-converted: "not given" vs an explicit "none"


@dataclass(frozen=True)
class Budget:
    """What every method gets: identical for all methods of one invocation."""

    scale: str  # prepare_data scale of the packaged tasks
    image_size: int
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
    # Turn off horizontal flips for the tasks whose classes a mirror image changes (prepare_data.MIRROR_SENSITIVE).
    task_aware_flips: bool = False
    # Methods that take another method's chosen LR instead of a grid of their own (the paper's ablations).
    lr_from: dict[str, str] = field(default_factory=dict)
    # When the best LR is at an edge of the grid, try the next one out (x or / the grid's step), up to this often.
    grid_extensions: int = 0
    # Overrides of examples/run.py's defaults; None: the defaults every user gets.
    batchnorm_momentum: float | None = None
    gate_learning_rate: float | None = None
    dataloader_workers: int = 0
    # Each seed its own stratified split of the task (split seed = run seed): `scale` for the final seeds, every
    # non-training image in test; `selection_scale` for the selection seeds, every such image in validation. Every
    # method then also gets validation runs where it takes another's LR (the recipe variants are compared there).
    resplit: bool = False
    selection_scale: str | None = None
    tasks: tuple[str, ...] | None = None  # the preset's packaged tasks (None: all)

    def __post_init__(self) -> None:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("a Budget sets exactly one of max_steps and epochs")

    def steps(self, train_images: int) -> int:
        """Optimizer steps of a run on `train_images` images."""
        if self.max_steps is not None:
            return self.max_steps
        return self.epochs * math.ceil(train_images / self.train_batch_size)


_SGD_GRID = (1e-2, 3e-2, 1e-1)
# Methods with an optimiser of their own (SGD) take a grid of their own; the other variants take the LR of the
# method they vary.
_OWN_OPTIMIZER = ("finetune_sgd", "adafilter_sgd")
_ABLATIONS_SHARE_ADAFILTER_LR = {
    m: "adafilter" for m in ADAFILTER_METHODS if m not in ("adafilter", *_OWN_OPTIMIZER)
} | {"finetune_128px": "finetune"}
_SHORT_GRID = (3e-4, 1e-3)
# Few trainable parameters on frozen features (a head, LoRA, biases) want a larger step.
_FEW_PARAMETERS = ("linear_probe", "lora", "bitfit")
_SHORT_PROBE_GRID = (3e-3, 1e-2)


def _natural_grid(method: str) -> tuple[float, ...]:
    if method in _OWN_OPTIMIZER:
        return _SGD_GRID
    return (3e-3, 1e-2, 3e-2) if method in _FEW_PARAMETERS else (3e-4, 1e-3, 3e-3)


# The natural-image protocol: Tux Paint photos, 20 training images per class, 25 independent stratified splits,
# each a paired replicate (same images, order and augmentation draws for every method); choices are made on 2 other
# splits' validation images, pooled.
NATURAL = Budget(
    scale="natural",
    selection_scale="natural_select",
    resplit=True,
    tasks=("tuxpaint",),
    image_size=96,
    epochs=30,
    train_batch_size=32,
    eval_batch_size=100,
    seeds=tuple(range(1, 26)),
    selection_seeds=(101, 102),
    lr_grids={m: _natural_grid(m) for m in METHODS},
    min_crop_scale=0.25,
    lr_from=_ABLATIONS_SHARE_ADAFILTER_LR,
    grid_extensions=1,
)
PRESETS: dict[str, Budget] = {
    # The paper's regime: 30 labelled images per class, trained to convergence (fine-tuning fits its training set).
    "paper": Budget(
        scale="paper",
        image_size=64,
        epochs=30,
        train_batch_size=32,
        eval_batch_size=100,
        seeds=(1, 2, 3),
        selection_seeds=(0,),
        lr_grids={
            "linear_probe": (3e-3, 1e-2, 3e-2),
            "finetune": (3e-4, 1e-3, 3e-3),
            "adafilter": (3e-4, 1e-3, 3e-3),
            "l2sp": (3e-4, 1e-3, 3e-3),
            "lora": (1e-3, 3e-3, 1e-2),
            "bitfit": (1e-3, 3e-3, 1e-2),
        }
        | dict.fromkeys(_OWN_OPTIMIZER, _SGD_GRID),  # fmt: skip
        min_crop_scale=0.25,
        task_aware_flips=True,
        lr_from=_ABLATIONS_SHARE_ADAFILTER_LR,
        grid_extensions=1,
    ),
    # The first benchmark's budget: 72 steps on 100 images per class, every method underfits.
    "short": Budget(
        scale="default",
        image_size=96,
        max_steps=72,
        train_batch_size=32,
        eval_batch_size=100,
        seeds=(1, 2, 3),
        selection_seeds=(0,),
        lr_grids={m: _SHORT_PROBE_GRID if m in _FEW_PARAMETERS else _SHORT_GRID for m in METHODS},
        lr_from={m: "adafilter" for m in LEAN_GATE_METHODS},
    ),
    "natural": NATURAL,
    # The larger-data regime: the same protocol with 60% of every Tux Paint class in train (about 200 images), 3
    # paired splits, at the LRs the natural protocol chose on its validation splits (fine-tuning 3e-4, AdaFilter
    # 1e-3): no selection of its own.
    "natural_large": replace(
        NATURAL,
        scale="natural_large",
        selection_scale=None,
        seeds=(201, 202, 203),
        selection_seeds=(),
        lr_grids={"finetune": (3e-4,), "adafilter": (1e-3,)},
        lr_from={},
        grid_extensions=0,
    ),
    "quick": Budget(
        scale="quick",
        image_size=64,
        max_steps=3,
        train_batch_size=8,
        eval_batch_size=32,
        seeds=(1,),
        selection_seeds=(0,),
        lr_grids={m: (1e-2,) if m in _FEW_PARAMETERS else (1e-3,) for m in METHODS},
        warmup=0.0,
    ),
    "full": Budget(
        scale="full",
        image_size=224,
        max_steps=2000,
        train_batch_size=64,
        eval_batch_size=128,
        seeds=(1, 2, 3),
        selection_seeds=(0,),
        lr_grids={m: (1e-3, 3e-3, 1e-2) if m in _FEW_PARAMETERS else (1e-4, 3e-4, 1e-3) for m in METHODS},
        dataloader_workers=4,
    ),
}
DEFAULT_PRESET = "paper"


@dataclass(frozen=True)
class Task:
    """A target task: a name and the examples/run.py flags that load it."""

    name: str
    data_args: tuple[str, ...]
    record: dict = field(default_factory=dict, compare=False, hash=False)
    # Resplit presets: the data flags of each seed's own split (selection and final seeds).
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


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="paper (default): 30 images per class, 30 epochs, 64 px; natural: Tux Paint photos, 20 per class, 25 "
        "paired splits, 96 px (the headline); natural_large: 60%% of Tux Paint trains; short: the first benchmark's "
        "72 steps on 100 images per class at 96 px; quick: a smoke run; full: GPU scale",
    )
    mode.add_argument("--quick", action="store_true", help="same as --preset quick")
    mode.add_argument("--full", action="store_true", help="same as --preset full")
    parser.add_argument(
        "--tasks",
        nargs="*",
        choices=prepare_data.TASKS,
        default=None,
        help="packaged tasks (default: all, or none when a custom dataset is given)",
    )
    methods = parser.add_mutually_exclusive_group()
    methods.add_argument(
        "--methods", nargs="+", choices=list(METHODS), help=f"default: {' '.join(CORE_METHODS)}"
    )
    methods.add_argument(
        "--extended",
        action="store_true",
        help="also the methods a user would pick instead: L2-SP, LoRA (needs peft), BitFit",
    )
    parser.add_argument("--model_name_or_path", default="efficientnet-lite0")
    parser.add_argument("--image_size", type=int, help="crop size (multiples of 32 for the packaged Lite0)")
    parser.add_argument("--max_steps", type=int, help="training steps of every run (instead of epochs)")
    parser.add_argument(
        "--epochs", type=int, help="passes over each task's training split (instead of steps)"
    )
    parser.add_argument("--train_batch_size", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the final runs")
    parser.add_argument(
        "--batchnorm_momentum",
        type=optional_float,
        default=UNSET,
        help="BatchNorm momentum of every method (default 0.1; 'none': the backbone's)",
    )
    parser.add_argument(
        "--gate_learning_rate",
        type=optional_float,
        default=UNSET,
        help="gate-network LR of the AdaFilter variants (default 1e-2; 'none': the main LR)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/OpenMP threads per run (default: all cores; set it on a shared machine)",
    )
    parser.add_argument("--data_dir", type=Path, default=prepare_data.DEFAULT_DATA_DIR)
    parser.add_argument(
        "--output_prefix",
        type=Path,
        default=None,
        help="writes <prefix>.md/.json/.png (default: benchmarks/results/transfer[_quick|_full])",
    )
    parser.add_argument("--resume", action="store_true", help="reuse finished runs with identical settings")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and the estimate, run nothing")
    parser.add_argument(
        "--selection_only",
        action="store_true",
        help="run only the validation runs (LR selection, recipe variants), print them, and stop before any test",
    )
    parser.add_argument("--keep_run_dirs", action="store_true", help="keep each run's output_dir and log")
    custom = parser.add_argument_group(
        "a task of your own (examples/run.py data flags; it needs a test split)"
    )
    custom.add_argument("--task_name", default=None)
    for flag in CUSTOM_FLAGS:
        custom.add_argument(f"--{flag}", default=None)
    args = parser.parse_args(argv)
    args.preset = args.preset or ("quick" if args.quick else "full" if args.full else DEFAULT_PRESET)
    args.methods = args.methods or list(EXTENDED_METHODS if args.extended else CORE_METHODS)
    return args  # fmt: skip


def optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def budget_from_args(args: argparse.Namespace) -> Budget:
    budget = PRESETS[args.preset]
    overrides = {
        "image_size": args.image_size,
        "train_batch_size": args.train_batch_size,
        "seeds": tuple(args.seeds) if args.seeds else None,
    }
    budget = replace(budget, **{key: value for key, value in overrides.items() if value is not None})
    if args.max_steps is not None or args.epochs is not None:
        budget = replace(budget, max_steps=args.max_steps, epochs=args.epochs)
    for name in ("batchnorm_momentum", "gate_learning_rate"):
        if getattr(args, name) is not UNSET:
            budget = replace(budget, **{name: getattr(args, name)})
    return budget


CUSTOM_FLAGS = ("dataset_name", "dataset_config_name", "train_dir", "validation_dir", "test_dir", "image_column_name",
                "label_column_name", "max_train_samples", "max_eval_samples", "max_predict_samples")  # fmt: skip


def custom_task(args: argparse.Namespace) -> Task | None:
    if not (args.dataset_name or args.train_dir):
        return None
    name = args.task_name or Path(args.dataset_name or args.train_dir).name.replace("/", "_")
    data_args = []
    for flag in CUSTOM_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            data_args += [f"--{flag}", str(value)]
    return Task(name=name, data_args=tuple(data_args), record={"source": " ".join(data_args)})


def resolve_tasks(args: argparse.Namespace, budget: Budget) -> list[Task]:
    """Prepared packaged tasks (built on first use) plus the custom one; a missing package stops with its
    install command."""
    custom = custom_task(args)
    if custom and budget.resplit:
        raise SystemExit(
            "error: a resplit preset splits packaged tasks itself; give your task another preset"
        )
    packaged = list(budget.tasks or prepare_data.TASKS)
    names = args.tasks if args.tasks is not None else ([] if custom else packaged)
    tasks = []
    for name in names:
        splits = {}
        if budget.resplit:
            for seeds, scale in (
                (budget.seeds, budget.scale),
                (budget.selection_seeds, budget.selection_scale),
            ):
                for seed in seeds:
                    split = prepare_data.prepare_task(name, args.data_dir, scale, seed=seed)
                    splits[seed] = ("--dataset_name", str(split))
            folder = Path(splits[budget.seeds[0]][1])
        else:
            folder = prepare_data.prepare_task(name, args.data_dir, budget.scale)
        record = json.loads((folder / "prepare.json").read_text())
        tasks.append(Task(name, ("--dataset_name", str(folder)), record, split_data_args=splits))
    if custom:
        tasks.append(custom)
    if not tasks:
        raise SystemExit("error: no task: pass --tasks and/or --dataset_name / --train_dir")
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


def train_images(task: Task) -> int | None:
    return task.record.get("sizes_per_split", {}).get("train")


def run_argv(spec: RunSpec, task: Task, budget: Budget, model: str, output_dir: Path) -> list[str]:
    """The examples/run.py command line of one run: only the method flags, LR and seed differ between runs."""
    phases = ["--do_train", "--do_eval"] + (["--do_predict"] if spec.phase == "final" else [])
    images = train_images(task)
    if budget.max_steps is None and images is None:
        length = ["--num_train_epochs", str(budget.epochs)]
        steps = 100
    else:
        steps = budget.steps(images or 0)
        length = ["--max_steps", str(steps)]
    flips = not (budget.task_aware_flips and task.name in prepare_data.MIRROR_SENSITIVE_TASKS)
    flags = method_flags(spec.method, spec.learning_rate)
    # A method that sets the resolution itself gets none from the budget (its flag comes later and would win).
    size = [] if "--image_size" in flags else ["--image_size", str(budget.image_size)]
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
        *method_settings(spec.method, budget),
    ]  # fmt: skip


def method_flags(method: str, learning_rate: float) -> list[str]:
    """The method's examples/run.py flags, `LEARNING_RATE` replaced by the run's."""
    return [f"{learning_rate:g}" if flag == LEARNING_RATE else flag for flag in METHODS[method]]


def method_settings(method: str, budget: Budget) -> list[str]:
    """Gate diagnostics for the AdaFilter variants, and the budget's overrides of examples/run.py's defaults."""
    flags = []
    if method in ADAFILTER_METHODS:
        flags += ["--evaluate_forced_gates", "true"]
        if budget.gate_learning_rate is not None:
            flags += ["--gate_learning_rate", f"{budget.gate_learning_rate:g}"]
    if budget.batchnorm_momentum is not None:
        flags += ["--batchnorm_momentum", f"{budget.batchnorm_momentum:g}"]
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
    """Identifies a run for --resume by what it runs: its examples/run.py command line (output folder aside) and its
    task's data. What the suite plans around it (other methods' grids, other seeds) does not change it."""
    argv = run_argv(spec, task, budget, model, Path("<output_dir>"))
    payload = [argv, task.record.get("sources"), task.record.get("sizes")]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:16]


def execute(spec: RunSpec, task: Task, budget: Budget, args: argparse.Namespace, work_dir: Path) -> dict:
    """One run of examples/run.py in its own process (isolation, clean RNG, its own peak memory, its own time)."""
    key = fingerprint(spec, task, budget, args.model_name_or_path)
    run_dir = work_dir / f"{spec.task}-{spec.method}-{spec.phase}-{spec.seed}-{key}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    argv = run_argv(spec, task, budget, args.model_name_or_path, run_dir / "output")
    result_path, log_path = run_dir / "result.json", run_dir / "log.txt"
    command = [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, str(result_path), str(args.threads or 0),
               *argv]  # fmt: skip
    env = dict(os.environ, HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    with log_path.open("w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
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


def worker(result_path: str, threads: int, argv: list[str]) -> None:
    """Inside the run's process: examples/run.py's main(argv) (`hf_adafilter.training.cli.main`), timed, with its peak memory."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from hf_adafilter.hub.model_card import GATE_FRACTIONS_FILE, PREDICTIONS_FILE
    from hf_adafilter.training import cli

    start_cpu, start = time.process_time(), time.perf_counter()
    metrics = cli.main(argv)
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    gate_file = output_dir / GATE_FRACTIONS_FILE
    state_file = output_dir / "trainer_state.json"
    history = json.loads(state_file.read_text())["log_history"] if state_file.is_file() else []
    gate_logs = [entry for entry in history if "gates/train_eval_agreement" in entry]
    result = {
        "metrics": metrics,
        "main_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - start_cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "eval_gate_fractions_per_layer": json.loads(gate_file.read_text()) if gate_file.is_file() else None,
        # Per test image, in the split's order, "1" where the prediction was right: pairs two methods image by image.
        "test_correct": test_correctness(output_dir / PREDICTIONS_FILE),
        # The gate diagnostics of the last logged training steps: are the training decisions the evaluation ones?
        "last_train_gate_log": gate_logs[-1] if gate_logs else None,
    }
    Path(result_path).write_text(json.dumps(result, indent=1) + "\n")


def test_correctness(path: Path) -> str | None:
    """`predict_results.txt` as a string of 0/1 per test image (None without a test split)."""
    if not path.is_file():
        return None
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line]
    return "".join("1" if label == prediction else "0" for _, label, prediction in rows)


def method_costs(methods: Sequence[str], model: str, num_labels: int, work_dir: Path) -> dict[str, dict]:
    """What each method trains and what it saves: its model built and saved as examples/run.py builds and saves it
    (before training: sizes do not depend on it), with a `num_labels`-class head. AdaFilter also compact."""
    from hf_adafilter.hub.model_card import weight_bytes
    from hf_adafilter.training.cli import parse_args
    from hf_adafilter.training.methods import build_classifier, count_parameters

    id2label = {index: str(index) for index in range(num_labels)}
    costs = {}
    for method in methods:
        model_args, _, adafilter_args, baseline_args, _ = parse_args(
            [*method_flags(method, 1e-3), "--model_name_or_path", model, "--output_dir", str(work_dir)]
        )
        classifier = build_classifier(method=model_args.method, name_or_path=model, id2label=id2label,
                                      adafilter_args=adafilter_args, baseline_args=baseline_args)  # fmt: skip
        trainable, total = count_parameters(classifier)
        folder = work_dir / f"cost-{method}"
        shutil.rmtree(folder, ignore_errors=True)
        classifier.save_pretrained(folder)
        costs[method] = {"trainable_parameters": trainable, "total_parameters": total,
                         "saved_bytes": weight_bytes(folder)}  # fmt: skip
        if method in ADAFILTER_METHODS:
            classifier.save_pretrained(folder / "compact", compact=True)
            costs[method]["compact_bytes"] = weight_bytes(folder / "compact")
        shutil.rmtree(folder)
    return costs


# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------


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


def prior_estimate_s(
    runs: Sequence[RunSpec], budget: Budget, eval_images: dict[str, dict[str, int]]
) -> float:
    """Before anything is timed: step and per-image evaluation times measured at 96 px on 2 cores, scaled by
    batch and pixels, times relative method costs. `eval_images`: {task: {split: images}} (missing: 1000).
    Evaluation covers validation and training images, test in final runs, and three passes each for AdaFilter
    (learned gates, all F, all S)."""
    pixels = (budget.image_size / 96) ** 2
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


def run_suite(args: argparse.Namespace, budget: Budget, tasks: Sequence[Task], work_dir: Path) -> list[dict]:
    task_by_name = {task.name: task for task in tasks}
    plan = plan_runs(tasks, args.methods, budget)
    cache = load_cache(work_dir / "runs.jsonl") if args.resume else {}
    print(f"plan: {len(plan)} runs ({sum(r.phase == 'select' for r in plan)} LR-selection, "
          f"{sum(r.phase == 'final' for r in plan)} final), prior estimate {minutes(prior_estimate_s(plan, budget, eval_sizes(tasks)))} "
          f"on 2 quiet CPU cores{CPU_ONLY_NOTE if args.preset == 'full' else ''}", flush=True)  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------------------------------------------


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
                    for gates in ("forced_finetuned", "forced_pretrained"):
                        cell[f"{gates}_{split}_accuracy_mean"] = mean_or_none(
                            [r["metrics"].get(f"{prefix}_{gates}_accuracy") for r in finals]
                        )
                    cell[f"example_dependent_{split}"] = mean_or_none(
                        [r["metrics"].get(f"{prefix}_gates/example_dependent") for r in finals]
                    )
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


def percent(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def verdict(differences: dict, tasks: Sequence[str], quick: bool = False) -> str:
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
    why = "" if beats else " What was checked and why: `transfer_investigation.md` beside this file."
    return (
        f"{outcome}: its mean test error is {mean:+.2f} points relative to fine-tuning (negative = fewer errors; "
        f"the paper reports {-PAPER_MEAN_ERROR_REDUCTION:+.2f} on its 7 datasets), lower on {wins} of "
        f"{len(ada['per_task'])} tasks.{why}"
    )


def machine_description(threads: int | None) -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    cores = os.cpu_count()
    return (
        f"{platform.processor() or platform.machine()}, {cores} cores, {device}, torch {torch.__version__}, "
        f"threads per run: {threads or torch.get_num_threads()}, Python {platform.python_version()}"
    )


def write_markdown(
    path: Path, report: dict, tasks: Sequence[Task], methods: Sequence[str], budget: Budget, meta: dict
) -> None:
    cells, differences = report["cells"], report["differences"]
    names = [t.name for t in tasks]
    quick = meta["preset"] == "quick"
    lines = [f"# Transfer benchmark{' (QUICK SMOKE RUN: not a result)' if quick else ''}", ""]
    if quick:
        lines += ["> Produced by `--quick`: tiny subsets, a few steps, one seed. It checks that the pipeline runs; "
                  "its numbers say nothing about AdaFilter.", ""]  # fmt: skip
    lines += [verdict(differences, names, quick), ""]
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


def fit_section(cells: dict, names: Sequence[str], methods: Sequence[str]) -> list[str]:
    """Training accuracy next to test accuracy: which methods fit their training set (the regime where
    fine-tuning can overfit) and which underfit."""
    lines = ["", "## Fit: training accuracy (%), mean over seeds", "",
             "Accuracy on the training images with the evaluation transform, after training.", "",
             "| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    for method in methods:
        row = []
        for task in names:
            cell = cells.get(task, {}).get(method)
            value = cell.get("train_accuracy_mean") if cell else None
            row.append(percent(value) if value is not None else "–")
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(row) + " |")
    return lines


def gate_section(cells: dict, names: Sequence[str], methods: Sequence[str]) -> list[str]:
    ada = [m for m in methods if m in ADAFILTER_METHODS]
    if not ada:
        return []

    def shown(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
        return "–" if value is None else f"{scale * value:.{digits}f}"

    lines = ["", "## Do the learned gates help? (AdaFilter variants)", "",
             "Test accuracy (%) of the same trained models with their learned gates, with every gate forced to the "
             "fine-tuned bank (F), and with every gate forced to the pre-trained bank (S); learned gates earn their "
             "cost only if they beat both. Mean over seeds.", "",
             "| method | task | learned | all F | all S | learned beats both |", "|---|---|---|---|---|---|"]  # fmt: skip
    for method in ada:
        for task in names:
            cell = cells.get(task, {}).get(method)
            if not cell:
                continue
            forced = [cell.get(f"forced_{bank}_test_accuracy_mean") for bank in ("finetuned", "pretrained")]
            beats = "–" if None in forced else "yes" if cell["test_accuracy_mean"] > max(forced) else "**no**"
            lines.append(f"| {METHOD_TITLES[method]} | {task} | {percent(cell['test_accuracy_mean'])} | "
                         f"{shown(forced[0], 100, 1)} | {shown(forced[1], 100, 1)} | {beats} |")  # fmt: skip
    lines += ["", "Gate diagnostics. Fine-tuned fraction: share of filters using F (weighted by filter count) on "
              "validation / test. Example-dependent: share of filters whose decision differs between the images of a "
              "batch (test). Last training steps: share of sampled training decisions equal to the evaluation "
              "decision, and mean |log-odds|. Collapsed layers: gated layers whose validation fraction is ≤ 2% "
              "(all S) or ≥ 98% (all F).", "",
              "| method | task | fine-tuned fraction (val / test) | example-dependent | train = eval decisions | "
              "mean abs log-odds | collapsed all-S | collapsed all-F |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method in ada:
        for task in names:
            cell = cells.get(task, {}).get(method)
            if not cell:
                continue
            total = cell.get("gated_layers", 0)
            lines.append(f"| {METHOD_TITLES[method]} | {task} | {shown(cell.get('finetuned_fraction_validation'), digits=3)} / "
                         f"{shown(cell.get('finetuned_fraction_test'), digits=3)} | {shown(cell.get('example_dependent_test'), digits=3)} | "
                         f"{shown(cell.get('train_train_eval_agreement'), digits=3)} | {shown(cell.get('train_mean_abs_log_odds'))} | "
                         f"{cell['collapsed_layers_all0']:.1f} / {total} | {cell['collapsed_layers_all1']:.1f} / {total} |")  # fmt: skip
    return lines


def timing_section(cells: dict, names: Sequence[str], methods: Sequence[str]) -> list[str]:
    lines = ["", "## Time per final run (median over tasks and seeds)", "",
             "| method | wall time per run (s) | of which training (s) | peak RSS (MB) |", "|---|---|---|---|"]  # fmt: skip
    for method in methods:
        run_cells = [cells[t][method] for t in names if method in cells.get(t, {})]
        if not run_cells:
            continue
        wall = statistics.median(c["wall_s_median"] for c in run_cells)
        train = statistics.median(c["train_s_median"] for c in run_cells)
        rss = max(c["peak_rss_mb_max"] for c in run_cells)
        lines.append(f"| {METHOD_TITLES[method]} | {wall:.0f} | {train:.0f} | {rss:.0f} |")
    return lines


def cost_section(costs: dict[str, dict], methods: Sequence[str], meta: dict) -> list[str]:
    """Trainable parameters and saved size per method: what choosing a method costs beyond accuracy."""
    if not costs:
        return []
    lines = ["", "## What each method trains and saves", "",
             f"`{meta['model']}` with a {meta.get('cost_num_labels', '?')}-class head, saved as `examples/run.py` "
             "saves it (fp32 safetensors). LoRA saves a PEFT adapter (LoRA matrices, head, BatchNorms) that loads "
             "onto the base backbone; an AdaFilter model also saves compact (`save_pretrained(compact=True)`: the "
             "fine-tuned bank, norms, gates and head, on the base backbone).", "",
             "| method | trainable parameters | of all | saved (MB) | compact (MB) |", "|---|---|---|---|---|"]  # fmt: skip
    for method in methods:
        cost = costs.get(method)
        if cost is None:
            continue
        compact = cost.get("compact_bytes")
        lines.append(f"| {METHOD_TITLES[method]} | {cost['trainable_parameters']:,} | "
                     f"{cost['trainable_parameters'] / cost['total_parameters']:.1%} | {cost['saved_bytes'] / 1e6:.1f} | "
                     f"{'–' if compact is None else f'{compact / 1e6:.1f}'} |")  # fmt: skip
    return lines


def selection_section(cells: dict, names: Sequence[str], methods: Sequence[str], budget: Budget) -> list[str]:
    lines = ["", "## Learning rates chosen on the validation split", "",
             "Validation accuracy (%) of each LR of the grid on the selection "
             f"({seeds_text(budget.selection_seeds)}, mean); the chosen LR in bold. The final seeds never take part in "
             "the choice.", "",
             "| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]  # fmt: skip
    for method in methods:
        row = []
        for task in names:
            cell = cells.get(task, {}).get(method)
            if not cell:
                row.append("–")
                continue
            chosen = f"{cell['learning_rate']:g}"
            grid = {f"{lr:g}" for lr in budget.lr_grids.get(method, ())}
            marks = {lr: "" if lr in grid else "⁺" for lr in cell["selection"]}
            entries = [f"**{lr}{marks[lr]}: {100 * acc:.1f}**" if lr == chosen else f"{lr}{marks[lr]}: {100 * acc:.1f}"
                       for lr, acc in sorted(cell["selection"].items(), key=lambda item: float(item[0]))]  # fmt: skip
            source = budget.lr_from.get(method)
            empty = f"**{chosen}** ({'from ' + METHOD_TITLES[source] if source else 'grid of one'})"
            row.append(", ".join(entries) if entries else empty)
        lines.append(f"| {METHOD_TITLES[method]} | " + " | ".join(row) + " |")
    return lines


def setup_section(tasks: Sequence[Task], budget: Budget, meta: dict) -> list[str]:
    lines = ["", "## Setup", "",
             f"- Command: `{meta['command']}`",
             f"- Date: {meta['date']}; {meta['runs']} runs ({meta['test_evaluations']} of them evaluated the test "
             f"split, once each). {suite_time_text(meta)}",
             f"- Machine: {meta['machine']}.",
             f"- Backbone: `{meta['model']}`; every run goes through `examples/run.py` in its own process.",
             f"- Budget, identical for every method: {length_text(budget, tasks)} at batch {budget.train_batch_size}, "
             f"{budget.image_size} px, AdamW, linear decay after {budget.warmup:.0%} warm-up, weight decay "
             f"{budget.weight_decay:g}; augmentation: random resized crop (at least {budget.min_crop_scale:.0%} of "
             f"the image area) and horizontal flip{flip_text(budget, tasks)}; evaluation at the end only (resize + "
             f"centre crop). Final seeds {', '.join(map(str, budget.seeds))}; LR selection on "
             f"{seeds_text(budget.selection_seeds)}{lr_from_text(budget)}.",
             f"- Every other setting is what `examples/run.py` gives every user: {defaults_text(budget)}.",
             "- Tasks:"]  # fmt: skip
    for task in tasks:
        record = task.record
        if "sizes_per_split" in record:
            sizes = record["sizes_per_split"]
            lines.append(f"  - `{task.name}`: {len(record['classes'])} classes ({', '.join(record['classes'])}); "
                         f"{sizes['train']} train / {sizes['validation']} validation / {sizes['test']} test images "
                         f"(`benchmarks/prepare_data.py --scale {record['scale']}`, seed {record['seed']}).")  # fmt: skip
        else:
            lines.append(f"  - `{task.name}`: `{record.get('source', '')}`.")
    lines += ["- GPU columns (`--full --image_size 224` on a GPU, the paper's resolution) are **not measured "
              "here**: this machine has no GPU. The same script produces them where one is available.",
              "- Raw results of every run: the `.json` beside this file; the chart: the `.png`."]  # fmt: skip
    return lines


def seeds_text(seeds: Sequence[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def suite_time_text(meta: dict) -> str:
    """What the suite costs from scratch (the runs' own times, added up), per method set, and what this invocation
    ran itself (the rest came from --resume)."""
    sets = meta.get("run_time_s_by_method_set", {})
    per_set = "; ".join(f"{name}: {minutes(seconds)}" for name, seconds in sets.items())
    resumed = meta.get("runs_resumed", 0)
    this = f"This invocation ran {meta['runs'] - resumed} of them in {minutes(meta['total_wall_s'])}"
    return f"Time of the runs, added up: {per_set}. {this}{f' and resumed {resumed}' if resumed else ''}."


def method_set_times(results: Sequence[dict]) -> dict[str, float]:
    """Added-up run time of the default method set and of what --extended adds."""
    core = sum(r["wall_s"] for r in results if r["method"] in CORE_METHODS)
    extra = sum(r["wall_s"] for r in results if r["method"] not in CORE_METHODS)
    times = {"default methods": core}
    if extra:
        times["--extended adds"] = extra
    return times


def length_text(budget: Budget, tasks: Sequence[Task]) -> str:
    if budget.max_steps is not None:
        return f"{budget.max_steps} steps"
    steps = ", ".join(f"{t.name} {budget.steps(train_images(t))}" for t in tasks if train_images(t))
    return f"{budget.epochs} epochs (steps: {steps})"


def flip_text(budget: Budget, tasks: Sequence[Task]) -> str:
    unflipped = [
        t.name for t in tasks if budget.task_aware_flips and t.name in prepare_data.MIRROR_SENSITIVE_TASKS
    ]
    return f" (not for {', '.join(unflipped)}: mirrored digits are not digits)" if unflipped else ""


def lr_from_text(budget: Budget) -> str:
    text = ""
    if budget.lr_from:
        shared = ", ".join(
            f"{METHOD_TITLES[m]} takes {METHOD_TITLES[s]}'s" for m, s in budget.lr_from.items()
        )
        text += f"; the ablations share the LR chosen for AdaFilter ({shared})"
    if budget.grid_extensions:
        text += (f"; when the best LR is at an edge of the grid, the grid is extended by one step that way (up to "
                 f"{budget.grid_extensions}x; extended LRs are marked ⁺ in the selection table)")  # fmt: skip
    return text


def defaults_text(budget: Budget) -> str:
    """The examples/run.py defaults the runs use (read from the package, so the report cannot drift)."""
    from hf_adafilter.training.arguments import AdaFilterArguments

    defaults = AdaFilterArguments()
    momentum = (
        budget.batchnorm_momentum if budget.batchnorm_momentum is not None else defaults.batchnorm_momentum
    )
    gate_lr = (
        budget.gate_learning_rate if budget.gate_learning_rate is not None else defaults.gate_learning_rate
    )
    return (
        f"BatchNorm momentum {momentum:g} (PyTorch meaning; the linear probe keeps the pretrained statistics); for "
        f"AdaFilter: gate learning rate {gate_lr:g}, prior log-odds {defaults.gate_init_log_odds:g}, Gumbel "
        f"temperature {defaults.gumbel_temperature_start:g} → {defaults.gumbel_temperature_end:g} (geometric), "
        f"decision noise {defaults.gate_noise_start:g} → {defaults.gate_noise_end:g} (linear), gate regulariser "
        f"{defaults.gate_regularization}"
    )


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


def write_chart(path: Path, report: dict, tasks: Sequence[str], methods: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 2.2 + 2.2 * len(tasks)), 4.8))
    for index, method in enumerate(methods):
        xs, means, stds = [], [], []
        for position, task in enumerate(tasks):
            cell = cells.get(task, {}).get(method)
            if cell:
                xs.append(position + (index - (len(methods) - 1) / 2) * width)
                means.append(100 * cell["test_accuracy_mean"])
                stds.append(100 * cell["test_accuracy_std"])
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=METHOD_TITLES[method])
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    lows = [100 * c["test_accuracy_mean"] for t in cells.values() for c in t.values()]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 15), 100)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def preset_name(preset: str) -> str:
    return "transfer" if preset == DEFAULT_PRESET else f"transfer_{preset}"


def output_prefix(args: argparse.Namespace) -> Path:
    return args.output_prefix if args.output_prefix is not None else RESULTS_DIR / preset_name(args.preset)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [WORKER_FLAG]:  # a run's own process; its flags are examples/run.py's
        worker(argv[1], int(argv[2]), argv[3:])
        return {}
    args = parse_args(argv)
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    budget = budget_from_args(args)
    try:
        tasks = resolve_tasks(args, budget)
    except prepare_data.MissingPackageError as error:
        raise SystemExit(f"error: {error}") from None
    prefix = output_prefix(args)
    plan = plan_runs(tasks, args.methods, budget)
    if args.dry_run:
        for spec in plan:
            print(spec.label.replace("lr=nan", "lr=<chosen>"))
        estimate = prior_estimate_s(plan, budget, eval_sizes(tasks))
        print(
            f"{len(plan)} runs, prior estimate {minutes(estimate)} on 2 quiet CPU cores{CPU_ONLY_NOTE if args.preset == 'full' else ''}"
        )
        return {}
    # One cache of finished runs per preset, whatever the report is called: a run's key is its command line.
    work_dir = args.data_dir / "runs" / preset_name(args.preset)
    work_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run_suite(args, budget, tasks, work_dir)
    total = time.perf_counter() - start
    names = [t.name for t in tasks]
    if args.selection_only:
        path = prefix.parent / f"{prefix.name}_validation.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(validation_table(results, names, args.methods, budget)) + "\n")
        print(path.read_text() + f"\nwrote {path} in {minutes(total)}")
        return {"runs": results}
    report = summarize(results, names, args.methods)
    num_labels = len(tasks[0].record.get("classes", ())) or 10
    report["costs"] = method_costs(args.methods, args.model_name_or_path, num_labels, work_dir)
    meta = {
        "preset": args.preset,
        "command": "python benchmarks/transfer.py " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(args.threads),
        "model": args.model_name_or_path,
        "total_wall_s": total,
        "runs": len(results),
        "test_evaluations": sum(r["phase"] == "final" for r in results),
        "runs_resumed": sum(bool(r.get("resumed")) for r in results),
        "run_time_s_by_method_set": method_set_times(results),
        "cost_num_labels": num_labels,
    }
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(prefix.with_suffix(".md"), report, tasks, args.methods, budget, meta)
    title = f"AdaFilter vs baselines, {args.model_name_or_path}, {budget.image_size} px" + (
        " (QUICK)" if args.preset == "quick" else ""
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
        f"\n{verdict(report['differences'], names, args.preset == 'quick')}\nwrote {prefix}.md/.json/.png in {minutes(total)}"
    )
    return payload


if __name__ == "__main__":
    main()
