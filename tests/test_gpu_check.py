"""The prepared GPU check plans and parses every step on a machine without a GPU (its dry run)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    return load_script(ROOT / "benchmarks" / "gpu_check.py", "adafilter_gpu_check")


def test_dry_run_parses_every_step_and_writes_the_summary(tmp_path):
    gpu_check = load_gpu_check()
    assert gpu_check.main(["--output_dir", str(tmp_path), "--dry-run"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and len(summary["steps"]) == 3
    assert all(step["status"] == "dry run" for step in summary["steps"])
    tests, training, speed = summary["steps"]
    assert int(tests["detail"].split()[0]) >= 20 and tests["env"] == {"HF_ADAFILTER_TEST_DEVICE": "cuda"}
    command = training["command"]
    last_epochs = len(command) - 1 - command[::-1].index("--num_train_epochs")  # the last flag given wins
    assert "--bf16" in command and command[last_epochs + 1] == "2"
    assert speed["command"][-1] == str(tmp_path / "speed.md")
    assert sum(step["timeout_s"] for step in summary["steps"]) <= 8 * 60
    assert "| speed benchmark, ResNet-50 at 224 px, CUDA | dry run |" in (tmp_path / "summary.md").read_text()
    assert "<!-- cuda -->" in (tmp_path / "speed.md").read_text()  # the report copy the speed step updates


def test_without_cuda_a_real_run_refuses_before_running_anything(tmp_path, monkeypatch):
    gpu_check = load_gpu_check()
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    try:
        gpu_check.main(["--output_dir", str(tmp_path)])
    except SystemExit as error:
        assert "--dry-run" in str(error)
    else:
        raise AssertionError("expected a refusal")
    assert not (tmp_path / "summary.json").exists()
