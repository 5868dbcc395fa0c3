"""Which checkpoint a rerun of a training command resumes from, checked before any compute is spent.

A run killed mid-save leaves a `checkpoint-N` folder with a truncated or missing file; resuming from it fails late
(or loads garbage), and it must never block the next run. A finished run must not be silently trained again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from ..data.errors import DataError
from ..modeling.compact import STAGING_PREFIX
from .run_lock import RUN_LOCK

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from .arguments import ModelArguments

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# Entries of an output folder that are no saved result: a save's staging folder, the run lock.
NOT_SAVED_PREFIXES = (STAGING_PREFIX, RUN_LOCK)
TRAINER_STATE = "trainer_state.json"


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable, or None, as safetensors itself reads it (`safe_open` checks the header
    and that the data covers every tensor it lists)."""
    try:
        with safe_open(path, "pt"):
            return None
    except SafetensorError as error:
        detail = str(error)
        if any(sign in detail for sign in ("not fully covered", "header too small", "invalid header length")):
            return f"truncated ({path.stat().st_size} bytes)"
        return f"corrupt ({detail})"


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, or None when every file it needs is whole."""
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        json.loads(state.read_text())
    except ValueError:
        return f"{TRAINER_STATE} is truncated"
    if (problem := weights_problem(folder)) is not None:
        return problem
    torch_files = sorted([*folder.glob("*.pt"), *folder.glob("*.pth")])
    for path in torch_files:  # torch.save writes a zip, its directory last: a truncated one is no zip
        if not zipfile.is_zipfile(path):
            return f"{path.name}: truncated or not a torch file"
    return None


def checkpoint_step(folder: Path) -> int:
    return int(json.loads((folder / TRAINER_STATE).read_text()).get("global_step", 0))


def find_resumable_checkpoint(output_dir: Path) -> tuple[Path | None, dict[Path, str]]:
    """The newest complete checkpoint in `output_dir` (None if there is none), and each broken checkpoint newer than
    it with what is wrong."""
    numbered = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if p.is_dir() and (m := CHECKPOINT_PATTERN.fullmatch(p.name))
    ]
    broken = {}
    for _, folder in sorted(numbered, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, broken
        broken[folder] = problem
    return None, broken


def final_model_problem(output_dir: Path) -> str | None:
    """Why the model the script saves at the end of training is not loadable from `output_dir`, or None."""
    if not (output_dir / "config.json").is_file():
        return "missing (no config.json)"
    problem = weights_problem(output_dir)
    return None if problem is None else f"incomplete ({problem})"


def weights_problem(folder: Path) -> str | None:
    """Why the safetensors weights of `folder` are unusable (none, or one truncated), or None."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no weights (*.safetensors)"
    for path in weights:
        if (problem := safetensors_problem(path)) is not None:
            return f"{path.name}: {problem}"
    return None


def check_chosen_checkpoint(folder: Path) -> None:
    """`--resume_from_checkpoint` at a missing or broken checkpoint: say so before any compute, not as a traceback
    from deep inside the Trainer."""
    if not folder.is_dir():
        raise DataError(f"--resume_from_checkpoint {folder}: no such folder. Pass a checkpoint-N folder of a run.")
    problem = checkpoint_problem(folder)
    if problem is not None:
        newest, _ = find_resumable_checkpoint(folder.parent) if folder.parent.is_dir() else (None, {})
        alternative = f" The newest complete one there is {newest}." if newest is not None else ""
        raise DataError(
            f"--resume_from_checkpoint {folder} cannot be resumed from: {problem} (a killed save?).{alternative} "
            "Pass another checkpoint, or drop the flag to resume from the newest complete one."
        )


def check_output_dir(output_dir: str) -> None:
    """A file or an unwritable place fails now, not at the first save, after training."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise DataError(f"--output_dir {output_dir} is a file, not a folder: choose another --output_dir.")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(
            f"--output_dir {output_dir}: {existing} is not writable: choose another --output_dir."
        )


def detect_checkpoint(training_args: TrainingArguments, model_args: ModelArguments) -> str | None:
    """Resume from the newest complete checkpoint in output_dir (as HF examples do, skipping any a killed save left
    incomplete); refuse to train a finished run again or to overwrite a saved model."""
    output_dir = Path(training_args.output_dir)
    if training_args.do_train and training_args.resume_from_checkpoint is not None:
        check_chosen_checkpoint(Path(training_args.resume_from_checkpoint))
        return None  # the user's choice
    if not training_args.do_train or not output_dir.is_dir() or model_args.overwrite_output_dir:
        return None
    fresh_start = "pass --overwrite_output_dir to train from scratch, or choose another --output_dir"
    if (output_dir / "train_results.json").is_file():
        raise DataError(
            f"--output_dir {output_dir} holds a finished training run (train_results.json): rerunning would train "
            f"it again and overwrite its model. {fresh_start[0].upper()}{fresh_start[1:]} (or continue it with "
            "--resume_from_checkpoint <its checkpoint> and a larger --max_steps)."
        )
    checkpoint, broken = find_resumable_checkpoint(output_dir)
    for folder, problem in broken.items():
        logger.warning(
            f"{folder} is incomplete ({problem}), probably from a killed save: it is skipped; delete it."
        )
    if checkpoint is not None:
        step = checkpoint_step(checkpoint)
        if 0 < training_args.max_steps <= step and (problem := final_model_problem(output_dir)) is not None:
            raise DataError(
                f"{checkpoint} finished training (step {step}), but the final model in --output_dir {output_dir} "
                f"is {problem}, probably from a killed save. The trained model is intact in {checkpoint}: load it "
                f"from there, or copy its config.json, *.safetensors and preprocessor_config.json into {output_dir} "
                f"(or pass --overwrite_output_dir to train from scratch)."
            )
        if 0 < training_args.max_steps <= step:
            raise DataError(
                f"{checkpoint} is already at step {step}, which --max_steps {training_args.max_steps} does not "
                f"exceed: nothing to train. Raise --max_steps to continue, or {fresh_start}."
            )
        logger.info(f"Checkpoint detected, resuming training at {checkpoint}.")
        return str(checkpoint)
    if broken:
        raise DataError(
            f"--output_dir {output_dir} holds only incomplete checkpoints ({', '.join(p.name for p in broken)}): "
            f"delete them, or {fresh_start}."
        )
    saved = [p.name for p in output_dir.iterdir() if not p.name.startswith(NOT_SAVED_PREFIXES)]
    if saved:
        raise DataError(f"--output_dir {output_dir} already holds {sorted(saved)[:4]}; {fresh_start}.")
    return None


def check_checkpoint_labels(checkpoint: str | None, id2label: dict[int, str]) -> None:
    """Resuming an output_dir trained on other labels would mix two tasks in one model: refuse."""
    config = Path(checkpoint or "") / "config.json"
    if checkpoint is None or not config.is_file():
        return
    saved = {int(k): v for k, v in json.loads(config.read_text()).get("id2label", {}).items()}
    if saved and saved != id2label:
        raise DataError(
            f"{checkpoint} was trained on labels {list(saved.values())[:5]}..., the data has "
            f"{list(id2label.values())[:5]}...: this --output_dir belongs to another dataset; choose another "
            "--output_dir (or pass --overwrite_output_dir to replace it)."
        )
