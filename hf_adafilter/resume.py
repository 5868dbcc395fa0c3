"""Which checkpoint a rerun of a training command resumes from, checked before any compute is spent.

A run killed mid-save leaves a `checkpoint-N` folder with a truncated or missing file; resuming from it fails late
(or loads garbage), and it must never block the next run. A finished run must not be silently trained again.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (truncated, corrupt header), or None: its header says how long it is."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"truncated ({size} bytes)"
        header_size = int.from_bytes(prefix, "little")
        if 8 + header_size > size:
            return f"truncated header ({size} bytes)"
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            return "corrupt header"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size < 8 + header_size + end:
        return f"truncated ({size} of {8 + header_size + end} bytes)"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, or None when every file it needs is whole."""
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        json.loads(state.read_text())
    except ValueError:
        return f"{TRAINER_STATE} is truncated"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no weights (*.safetensors)"
    for path in weights:
        if (problem := safetensors_problem(path)) is not None:
            return f"{path.name}: {problem}"
    for path in sorted(folder.glob("*.pt")) + sorted(
        folder.glob("*.pth")
    ):  # torch.save: a zip, directory last
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
