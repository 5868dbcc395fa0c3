#!/usr/bin/env python
"""The prepared GPU check: everything a lent GPU should confirm, in one run of under 8 minutes.

    python benchmarks/gpu_check.py --output_dir gpu_results          # on a machine with CUDA
    python benchmarks/gpu_check.py --output_dir /tmp/check --dry-run  # anywhere: parses and plans, runs nothing

Steps, each a subprocess with its own time limit and log:
1. the fast-path equivalence tests (`tests/test_fast_paths.py`: float32, float64, bf16 and fp16 autocast,
   inference paths, incremental batch-1 kernels, in-place edits) on CUDA;
2. two epochs of the embedded default job (`examples/run.py`) in bf16;
3. `benchmarks/speed.py --device cuda` for ResNet-50 at 224 px, fp32 and bf16, into a copy of `speed.md`
   (commit its CUDA section back into `benchmarks/results/speed.md`).

`summary.md` and `summary.json` in the output folder say what each step did, how long it took and where its log
is. A dry run checks that each step's arguments parse and that the test selection is not empty (pytest collects
it), and writes the same summary with every step marked "dry run".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The equivalence tests that exercise the kernels (the rest of the module tests CPU rules and helpers).
FAST_PATH_TESTS = "matches_reference or autocast or incremental or in_place or forced_gates"


@dataclasses.dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    status: str = "not run"
    seconds: float = 0.0
    log: str = ""
    detail: str = ""


def plan(output_dir: Path) -> list[Step]:
    """The three steps, with their commands and time limits (together under 8 minutes)."""
    python = sys.executable
    from hf_adafilter.training.cli import DEFAULT_ARGS

    training = [
        *DEFAULT_ARGS,
        "--num_train_epochs", "2",
        "--bf16",
        "--output_dir", str(output_dir / "default_job_bf16"),
    ]  # fmt: skip
    return [
        Step(
            "fast-path equivalence tests on CUDA",
            [python, "-m", "pytest", "-q", "tests/test_fast_paths.py", "-k", FAST_PATH_TESTS,
             "--junitxml", str(output_dir / "fast_paths.xml")],
            timeout_s=150,
            env={"HF_ADAFILTER_TEST_DEVICE": "cuda"},
        ),
        Step("embedded default job, 2 epochs, bf16", [python, "examples/run.py", *training], timeout_s=150),
        Step(
            "speed benchmark, ResNet-50 at 224 px, CUDA",
            [python, "benchmarks/speed.py", "--device", "cuda", "--configs", "resnet-50",
             "--output", str(output_dir / "speed.md")],
            timeout_s=170,
        ),
    ]  # fmt: skip


def dry_run(step: Step) -> None:
    """What can be checked without a GPU: the step's arguments parse, the test selection is not empty."""
    arguments = step.command[2:]
    if step.command[1] == "examples/run.py":
        from hf_adafilter.training.cli import parse_args

        # transformers refuses bf16 without a GPU unless told to use the CPU
        parse_args([*arguments, "--use_cpu"])
        step.detail = "arguments parse"
    elif step.command[1] == "benchmarks/speed.py":
        # A sibling script, imported the way transfer.py imports prepare_data.
        if str(ROOT / "benchmarks") not in sys.path:
            sys.path.insert(0, str(ROOT / "benchmarks"))
        import speed

        speed.parse_args(arguments)
        step.detail = "arguments parse"
    else:
        collect = [*step.command[:4], "--collect-only", *step.command[4:7]]
        completed = subprocess.run(collect, capture_output=True, text=True, cwd=ROOT, check=False)
        selected = [line for line in completed.stdout.splitlines() if "::" in line]
        if completed.returncode != 0 or not selected:
            raise RuntimeError(
                f"the test selection {FAST_PATH_TESTS!r} collected nothing:\n{completed.stdout[-2000:]}"
            )
        step.detail = f"{len(selected)} tests selected"
    step.status = "dry run"


def execute(step: Step, output_dir: Path, index: int) -> None:
    log = output_dir / f"step{index}.log"
    step.log = log.name
    start = time.perf_counter()
    with log.open("w") as handle:
        try:
            completed = subprocess.run(
                step.command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **step.env},
                timeout=step.timeout_s,
                check=False,
            )
            step.status = "passed" if completed.returncode == 0 else f"failed (exit {completed.returncode})"
        except subprocess.TimeoutExpired:
            step.status = f"timed out after {step.timeout_s} s"
    step.seconds = time.perf_counter() - start
    lines = log.read_text(errors="replace").strip().splitlines()
    step.detail = lines[-1][:200] if lines else ""


def write_summary(steps: list[Step], output_dir: Path, dry: bool, device: str) -> None:
    rows = ["| step | status | seconds | limit | detail | log |", "|---|---|---|---|---|---|"]
    for step in steps:
        detail = step.detail.replace("|", "/")
        rows.append(
            f"| {step.name} | {step.status} | {step.seconds:.0f} | {step.timeout_s} | {detail} | {step.log} |"
        )
    header = f"# GPU check{' (dry run)' if dry else ''}\n\n- device: {device}\n"
    (output_dir / "summary.md").write_text(header + "\n" + "\n".join(rows) + "\n")
    payload = {"dry_run": dry, "device": device, "steps": [dataclasses.asdict(step) for step in steps]}
    (output_dir / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True, help="Folder for the summary, logs and speed report.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Parse and plan every step, run none (no GPU needed)."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run on a GPU machine, or pass --dry-run to check the plan here.")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (dry run)"
    steps = plan(output_dir)
    # The speed step updates a copy of the committed report, so its CPU section and notes survive.
    with contextlib.suppress(FileNotFoundError):
        shutil.copyfile(ROOT / "benchmarks" / "results" / "speed.md", output_dir / "speed.md")
    for index, step in enumerate(steps, start=1):
        if args.dry_run:
            dry_run(step)
        else:
            execute(step, output_dir, index)
        write_summary(steps, output_dir, args.dry_run, device)  # after every step: a kill keeps what ran
        print(f"{step.name}: {step.status} ({step.seconds:.0f} s) {step.detail}", flush=True)
    return 0 if all(step.status in ("passed", "dry run") for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
