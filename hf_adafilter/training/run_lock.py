"""One training run per output folder at a time: a lock file naming its holder, taken over from a dead process.

Two runs writing one `--output_dir` would both exit 0 with each other's checkpoints mixed in.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil

from ..data.errors import DataError

logger = logging.getLogger(__name__)

# A leading underscore: `Trainer.push_to_hub` leaves `_*` files out of the upload.
RUN_LOCK = "_hf_adafilter_run.lock"


@contextlib.contextmanager
def output_dir_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Holds `output_dir`'s run lock inside the block (creating the folder, removed again if the run wrote nothing);
    refuses if a live run holds it."""
    path = Path(output_dir) / RUN_LOCK
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    _acquire(path, record)
    try:
        yield
    finally:
        if _holder(path) == record:
            path.unlink(missing_ok=True)
        if created and not any(path.parent.iterdir()):  # a run that stopped early leaves no empty folder behind
            path.parent.rmdir()


def _acquire(path: Path, record: dict) -> None:
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:  # being written by its creator, or unreadable: treat as held
                holder = {"pid": "?", "host": "?", "started": "?"}
            if _is_alive(holder):
                raise DataError(
                    f"--output_dir {path.parent} is in use by another training run (PID {holder['pid']} on "
                    f"{holder['host']}, since {holder['started']}): wait for it to finish, or choose another "
                    f"--output_dir. If that run is gone, delete {path}."
                ) from None
            logger.warning(
                f"Taking over {path} from a run that is no longer running (PID {holder['pid']}, started "
                f"{holder['started']}); its checkpoints are checked before resuming."
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(record, handle)
        return
    raise DataError(f"Could not take the run lock {path}: another run keeps creating it; choose another --output_dir.")


def _holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and {"pid", "host", "started"} <= set(holder) else None


def _is_alive(holder: dict) -> bool:
    """Whether the lock's process still runs; one on another machine cannot be checked, so it counts as alive."""
    if holder["host"] != socket.gethostname() or not isinstance(holder["pid"], int):
        return True
    return psutil.pid_exists(holder["pid"])
