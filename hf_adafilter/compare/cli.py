"""`hf-adafilter-compare`: should I use AdaFilter on my data? Fine-tuning, AdaFilter and the baselines a user names,
each with its learning rate chosen on validation from a grid of the same size, trained with the same budget on the
same splits over several seeds, the test split read once per final run; the table of paired 95% intervals, a chart
and a JSON come out.

    hf-adafilter-compare --train_dir photos/train --validation_dir photos/val --test_dir photos/test \\
        --methods finetune adafilter lora --output_dir compare-photos
    python -m hf_adafilter.compare --dataset_name <hub id or folder with a test split> --dry_run

Seeds vary initialisation, order and augmentation on fixed splits: the intervals measure training noise, not how a
different sample of images would move the result (the transfer benchmark draws a split per seed for that).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from transformers.hf_argparser import string_to_bool

from ..data.errors import DataError
from ..data.loading import load_image_classification_data
from ..data.transforms import Augmentation
from ..modeling.backbone_sources import backbone_kind
from ..training.arguments import DataTrainingArguments
from .methods import LEARNING_RATE_GRIDS, METHOD_TITLES, METHODS, SHARED_LEARNING_RATE
from .plan import DATA_FLAGS, Budget, Task, data_args, plan_runs
from .suite import print_plan, run_comparison

REPORT_NAME = "compare"  # <output_dir>/compare.md, .json, .png
DEFAULT_METHODS = ("finetune", "adafilter")
DEFAULT_EPOCHS = 30  # small data: trained to convergence, where fine-tuning fits its training set
# Methods that need an optional package, and how to install it.
NEEDS = {"lora": ("peft", "pip install 'hf_adafilter[baselines]'")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-adafilter-compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    data = parser.add_argument_group("data (the training script's flags; a test split is required)")
    for flag in DATA_FLAGS:
        data.add_argument(f"--{flag}", type=int if flag.startswith("max_") else str, default=None)
    data.add_argument("--task_name", default=None, help="the task's name in the report (default: the data's)")
    data.add_argument("--horizontal_flip", type=string_to_bool, default=Augmentation.horizontal_flip,
                      help="false for classes a mirror image changes (digits, text)")  # fmt: skip
    parser.add_argument("--model_name_or_path", default="efficientnet-lite0")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS),
                        help=f"default: {' '.join(DEFAULT_METHODS)}; fine-tuning is the reference and always runs")  # fmt: skip
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--num_train_epochs", type=int, default=None, help=f"passes over train (default {DEFAULT_EPOCHS})"
    )
    length.add_argument("--max_steps", type=int, default=None, help="optimizer steps of every run")
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=None, help="crop size (default: the backbone's)")
    parser.add_argument("--learning_rates", type=float, nargs="+", default=None,
                        help="one grid for every method (default: each method's own three, e.g. 3e-4 1e-3 3e-3)")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the final runs")
    parser.add_argument("--selection_seeds", type=int, nargs="+", default=[0],
                        help="seeds of the learning-rate selection runs (validation only), pooled")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default: all cores)"
    )
    parser.add_argument("--output_dir", type=Path, default=Path("adafilter-compare"),
                        help=f"gets {REPORT_NAME}.md/.json/.png and runs/ (the finished runs --resume reuses)")  # fmt: skip
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace an earlier comparison's report"
    )
    parser.add_argument("--resume", action="store_true", help="reuse finished runs with identical settings")
    parser.add_argument(
        "--dry_run", action="store_true", help="print the plan and its time estimate, run nothing"
    )
    parser.add_argument("--selection_only", action="store_true",
                        help="only the validation runs: stop before any run reads the test split")  # fmt: skip
    parser.add_argument("--keep_run_dirs", action="store_true", help="keep each run's output_dir and log")
    args = parser.parse_args(argv)
    args.methods = list(dict.fromkeys(["finetune", *args.methods]))
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds: a paired interval needs two differences")
    if not (args.dataset_name or args.train_dir):
        parser.error("give your data: --train_dir (with --validation_dir / --test_dir) or --dataset_name")
    return args


def budget_from_args(args: argparse.Namespace, task: Task) -> Budget:
    """The same budget for every method; each method's LR grid (or the LR of the method it varies) from `methods`,
    or the user's one grid for all."""
    steps, epochs = (
        (args.max_steps, None)
        if args.max_steps is not None
        else (None, args.num_train_epochs or DEFAULT_EPOCHS)
    )
    return Budget(
        image_size=args.image_size,
        train_batch_size=args.per_device_train_batch_size,
        eval_batch_size=args.per_device_eval_batch_size,
        seeds=tuple(args.seeds),
        selection_seeds=tuple(args.selection_seeds),
        # Every grid, also of a method run only as another's LR source (an ablation without AdaFilter itself).
        lr_grids={m: tuple(args.learning_rates or grid) for m, grid in LEARNING_RATE_GRIDS.items()},
        max_steps=steps,
        epochs=epochs,
        min_crop_scale=Augmentation.min_crop_scale,
        unflipped_tasks=() if args.horizontal_flip else (task.name,),
        lr_from={m: source for m, source in SHARED_LEARNING_RATE.items() if m in args.methods},
        # A best LR at an edge of the default grid is bracketed by one more step; a grid the user gave is kept.
        grid_extensions=0 if args.learning_rates else 1,
    )


def load_task(args: argparse.Namespace) -> Task:
    """The user's data, loaded and checked as the training script will (classes, splits) before any run starts;
    its split sizes set each run's steps and the time estimate."""
    options = {flag: getattr(args, flag) for flag in DATA_FLAGS}
    data = load_image_classification_data(
        **options, train_val_split=DataTrainingArguments.train_val_split, seed=args.seeds[0]
    )
    if data.test is None:
        hint = (
            "--test_dir <folder>"
            if args.train_dir
            else f"a --dataset_name with a 'test' split ({args.dataset_name} has none)"
        )
        raise DataError(
            f"a comparison reads a test split once per final run, and none was found: give {hint}"
        )
    data.require("train")
    data.require("validation")
    name = args.task_name or task_name(args.dataset_name or args.train_dir)
    flags = data_args(args)
    sizes = {split: len(getattr(data, split)) for split in ("train", "validation", "test")}
    # `sizes` is what a run's --resume key reads of a task's data: a changed folder reruns.
    record = {"source": shlex.join(flags), "sizes_per_split": sizes, "sizes": sizes, "classes": data.labels}
    return Task(name, flags, record)


def task_name(source: str) -> str:
    """`photos` for `photos/train/` (a folder called train names its parent), `user_cats` for `user/cats`."""
    path = Path(source.rstrip("/"))
    if path.name.lower() in ("train", "training") and path.parent.name:
        path = path.parent
    return source.replace("/", "_") if not path.exists() else path.name


def check_methods(methods: Sequence[str]) -> None:
    for method in methods:
        if method in NEEDS and importlib.util.find_spec(NEEDS[method][0]) is None:
            package, install = NEEDS[method]
            raise SystemExit(f"error: {METHOD_TITLES[method]} needs {package}: {install}")


def check_backbone(name: str) -> None:
    """A backbone that is neither a folder, a packaged alias nor a Hub id fails here, not in the first run."""
    if backbone_kind(name) is None:
        raise SystemExit(f"error: --model_name_or_path {name!r}: no such folder, and neither a packaged alias "
                         "(efficientnet-lite0) nor a Hub model id")  # fmt: skip


def check_output_dir(args: argparse.Namespace) -> None:
    """An earlier comparison's report is replaced only when asked (or extended with --resume)."""
    report = args.output_dir / f"{REPORT_NAME}.json"
    if report.is_file() and not (args.resume or args.overwrite_output_dir or args.dry_run):
        raise SystemExit(f"error: {report} holds an earlier comparison: pass --resume to reuse its finished runs, "
                         "--overwrite_output_dir to replace it, or another --output_dir")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    check_methods(args.methods)
    check_backbone(args.model_name_or_path)
    check_output_dir(args)
    try:
        task = load_task(args)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    budget = budget_from_args(args, task)
    if args.dry_run:
        print_plan(plan_runs([task], args.methods, budget), budget, [task])
        return {}
    meta = {"command": "hf-adafilter-compare " + shlex.join(argv), "title": f"Which method on {task.name}?"}
    return run_comparison(args, budget, [task], args.output_dir / "runs", args.output_dir / REPORT_NAME, meta)


def run() -> None:
    """The console script's entry (its exit status is 0, not main's payload)."""
    main()
