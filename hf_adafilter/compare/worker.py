"""Inside one run's process: the training script's `main(argv)`, timed, with its peak memory, the gates' per-layer
fractions and each test image's correctness written to a JSON file for the suite.

    python -m hf_adafilter.compare.worker <result.json> <threads, 0: all> <training-script flags...>
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def worker(result_path: str, threads: int, argv: list[str]) -> None:
    """Runs `hf_adafilter.training.cli.main(argv)` and writes what the suite reads of it to `result_path`."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from ..hub.model_card import GATE_FRACTIONS_FILE, PREDICTIONS_FILE
    from ..training import cli

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


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
