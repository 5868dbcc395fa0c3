"""The training script's command line: the embedded default job, the five argument dataclasses parsed from flags,
a JSON file or a `<script>.args` file, and the per-method training defaults for every flag the user did not give."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

from .arguments import AdaFilterArguments, BaselineArguments, DataTrainingArguments, ModelArguments
from .methods import TRAINING_DEFAULTS, apply_training_defaults

# The embedded default job: what `python examples/run.py` runs with no arguments.
DEFAULT_ARGS = [
    "--output_dir", "outputs/fashion-mnist-adafilter",
    "--overwrite_output_dir",
    "--do_train", "--do_eval",
    "--num_train_epochs", "3",
    "--image_size", "128",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "64",
    "--learning_rate", "1e-3",
    "--weight_decay", "0.01",
    "--warmup_steps", "10",
    "--eval_strategy", "epoch",
    "--save_strategy", "epoch",
    "--save_total_limit", "1",
    "--logging_steps", "10",
    "--report_to", "none",
    "--seed", "42",
]  # fmt: skip


DESCRIPTION = (
    "Fine-tune a pretrained CNN on an image-classification dataset with AdaFilter (per-example fine-tuned filters) or "
    "a baseline (--method), through the transformers Trainer. Without arguments: the embedded default job."
)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where the help does not already say what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def training_defaults_help() -> str:
    per_method = "; ".join(
        f"{method}: " + ", ".join(f"--{name} {value:g}" for name, value in defaults.items())
        for method, defaults in TRAINING_DEFAULTS.items()
    )
    return (
        "Training defaults per --method, for small labelled datasets, used where the flag is not given (they replace "
        f"transformers' lr 5e-5 / 3 epochs / batch 8, made for transformers, not CNNs): {per_method}."
    )


_UNSET = object()


def args_file_arguments(script: str | None = None) -> list[str]:
    """The arguments of a `<script>.args` file next to the running script (HfArgumentParser's convention), which
    come before the command line's, so a flag given on the command line wins."""
    script = script if script is not None else (sys.argv[0] if sys.argv else "")
    path = Path(script).with_suffix(".args") if script else None
    return path.read_text().split() if path is not None and path.is_file() else []


def given_fields(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The fields `argv` sets, however spelt (`--learning_rate`, `--learning-rate`, `=value`, `--no_...`): argparse
    fills a namespace attribute with its default only where no flag set it, so every attribute still holding a
    placeholder afterwards was not given."""
    probe = argparse.Namespace(**{action.dest: _UNSET for action in parser._actions})
    parser.parse_known_args(args=argv, namespace=probe)
    return {name for name, value in vars(probe).items() if value is not _UNSET}


def parse_args_and_defaults(argv: list[str] | None = None) -> tuple[tuple, dict[str, float | int]]:
    """The parsed dataclasses, and the per-method training defaults applied because the user did not set them."""
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, AdaFilterArguments, BaselineArguments, TrainingArguments),
        description=DESCRIPTION,
        epilog=training_defaults_help(),
        formatter_class=DefaultsHelpFormatter,
        allow_abbrev=False,  # `--learning_r 0.05` would otherwise set the learning rate unseen by the defaults
    )
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("No arguments: running the embedded default job:\n  examples/run.py " + " ".join(DEFAULT_ARGS))
        argv = DEFAULT_ARGS
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        given = set(json.loads(Path(argv[0]).read_text()))
    else:
        argv = [*args_file_arguments(), *argv]
        *parsed, unknown = parser.parse_args_into_dataclasses(
            args=argv, look_for_args_file=False, return_remaining_strings=True
        )
        if unknown:
            parser.error(
                f"unrecognized arguments: {' '.join(unknown)} (flags are matched in full, not abbreviated; "
                "`--help` lists them)"
            )
        given = given_fields(parser, argv)
    model_args, _, adafilter_args, _, training_args = parsed
    applied = apply_training_defaults(training_args, model_args.method, given)
    if "dataloader_num_workers" not in given and torch.cuda.is_available():
        # Decoding and augmenting images in the main process would starve a GPU; on a CPU the workers would take
        # cores from the training itself, so there it stays 0.
        training_args.dataloader_num_workers = min(4, len(os.sched_getaffinity(0)))
    if training_args.ddp_find_unused_parameters is None:
        # transformers searches the graph for unused parameters every DDP step for a PreTrainedModel; here every
        # trainable parameter is used in every step, except the gate network during a gate warm-up.
        training_args.ddp_find_unused_parameters = model_args.method == "adafilter" and adafilter_args.gate_warmup_ratio > 0
    return parsed, applied


def parse_args(argv: list[str] | None = None):
    """The five argument dataclasses of the training script (model, data, AdaFilter, baselines, training), with the
    per-method training defaults filled in where the user set nothing."""
    return parse_args_and_defaults(argv)[0]
