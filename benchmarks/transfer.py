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
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hf_adafilter.compare.methods import (
    CORE_METHODS,
    EXTENDED_METHODS,
    FEW_PARAMETERS,
    LEAN_GATE_METHODS,
    LEARNING_RATE_GRIDS,
    METHODS,
    OWN_OPTIMIZER,
    SGD_GRID,
    SHARED_LEARNING_RATE,
)
from hf_adafilter.compare.plan import DATA_FLAGS, Budget, Task, data_args, plan_runs
from hf_adafilter.compare.suite import print_plan, run_comparison

BENCHMARKS = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS / "results"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import prepare_data  # noqa: E402

CPU_ONLY_NOTE = " (a CPU figure: --full is meant for a GPU, where it is far shorter)"
UNSET = object()  # an argparse default that is never type-converted: "not given" vs an explicit "none"
WHY_NOT = "What was checked and why: `transfer_investigation.md` beside this file."


@dataclass(frozen=True)
class Preset(Budget):
    """A budget and the packaged tasks it runs on, prepared by `prepare_data.py` at `scale`."""

    scale: str = "default"
    # Resplit presets: `scale` for the final seeds (every non-training image in test), `selection_scale` for the
    # selection seeds (every such image in validation).
    selection_scale: str | None = None
    tasks: tuple[str, ...] | None = None  # the preset's packaged tasks (None: all)


_SHORT_GRID = (3e-4, 1e-3)

_SHORT_PROBE_GRID = (3e-3, 1e-2)


def _natural_grid(method: str) -> tuple[float, ...]:
    if method in OWN_OPTIMIZER:
        return SGD_GRID
    return (3e-3, 1e-2, 3e-2) if method in FEW_PARAMETERS else (3e-4, 1e-3, 3e-3)


# The natural-image protocol: Tux Paint photos, 20 training images per class, 25 independent stratified splits,
# each a paired replicate (same images, order and augmentation draws for every method); choices are made on 2 other
# splits' validation images, pooled.
NATURAL = Preset(
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
    lr_from=SHARED_LEARNING_RATE,
    grid_extensions=1,
)

PRESETS: dict[str, Budget] = {
    # The paper's regime: 30 labelled images per class, trained to convergence (fine-tuning fits its training set).
    "paper": Preset(
        scale="paper",
        image_size=64,
        epochs=30,
        train_batch_size=32,
        eval_batch_size=100,
        seeds=(1, 2, 3),
        selection_seeds=(0,),
        lr_grids=LEARNING_RATE_GRIDS,
        min_crop_scale=0.25,
        unflipped_tasks=tuple(sorted(prepare_data.MIRROR_SENSITIVE_TASKS)),
        lr_from=SHARED_LEARNING_RATE,
        grid_extensions=1,
    ),
    # The first benchmark's budget: 72 steps on 100 images per class, every method underfits.
    "short": Preset(
        scale="default",
        image_size=96,
        max_steps=72,
        train_batch_size=32,
        eval_batch_size=100,
        seeds=(1, 2, 3),
        selection_seeds=(0,),
        lr_grids={m: _SHORT_PROBE_GRID if m in FEW_PARAMETERS else _SHORT_GRID for m in METHODS},
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
    "quick": Preset(
        scale="quick",
        image_size=64,
        max_steps=3,
        train_batch_size=8,
        eval_batch_size=32,
        seeds=(1,),
        selection_seeds=(0,),
        lr_grids={m: (1e-2,) if m in FEW_PARAMETERS else (1e-3,) for m in METHODS},
        warmup=0.0,
    ),
    "full": Preset(
        scale="full",
        image_size=224,
        max_steps=2000,
        train_batch_size=64,
        eval_batch_size=128,
        seeds=(1, 2, 3),
        selection_seeds=(0,),
        lr_grids={m: (1e-3, 3e-3, 1e-2) if m in FEW_PARAMETERS else (1e-4, 3e-4, 1e-3) for m in METHODS},
        dataloader_workers=4,
    ),
}

DEFAULT_PRESET = "paper"


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
    for flag in DATA_FLAGS:
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



def custom_task(args: argparse.Namespace) -> Task | None:
    if not (args.dataset_name or args.train_dir):
        return None
    name = args.task_name or Path(args.dataset_name or args.train_dir).name.replace("/", "_")
    flags = data_args(args)
    return Task(name=name, data_args=flags, record={"source": " ".join(flags)})


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


def preset_name(preset: str) -> str:
    return "transfer" if preset == DEFAULT_PRESET else f"transfer_{preset}"


def output_prefix(args: argparse.Namespace) -> Path:
    return args.output_prefix if args.output_prefix is not None else RESULTS_DIR / preset_name(args.preset)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    budget = budget_from_args(args)
    try:
        tasks = resolve_tasks(args, budget)
    except prepare_data.MissingPackageError as error:
        raise SystemExit(f"error: {error}") from None
    if args.dry_run:
        print_plan(
            plan_runs(tasks, args.methods, budget),
            budget,
            tasks,
            CPU_ONLY_NOTE if args.preset == "full" else "",
        )
        return {}
    meta = {
        "preset": args.preset,
        "command": "python benchmarks/transfer.py " + shlex.join(argv),
        "why_not": WHY_NOT,
    }
    # One cache of finished runs per preset, whatever the report is called: a run's key is its command line.
    work_dir = args.data_dir / "runs" / preset_name(args.preset)
    return run_comparison(args, budget, tasks, work_dir, output_prefix(args), meta)


if __name__ == "__main__":
    main()
