"""`hf-adafilter-compare` on a user's own image folders: checks before any run, the plan, and a whole comparison
(tiny backbone, two methods, two seeds) with its report, chart, JSON and --resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import make_imagefolder, tiny_backbone_config

from hf_adafilter.compare import cli


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(tiny_backbone_config("resnet")).save_pretrained(root / "backbone")
    transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(
        root / "backbone"
    )
    for split, per_class, seed in (("train", 8, 0), ("val", 4, 1), ("test", 4, 2)):
        make_imagefolder(root / "photos" / split, per_class=per_class, seed=seed)
    return {"root": root, "backbone": root / "backbone", "photos": root / "photos"}


def compare_args(user_data: dict, output_dir, *extra: str) -> list[str]:
    photos = user_data["photos"]
    return [
        "--model_name_or_path", str(user_data["backbone"]),
        "--train_dir", str(photos / "train"), "--validation_dir", str(photos / "val"),
        "--test_dir", str(photos / "test"),
        "--methods", "adafilter",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--image_size", "32", "--seeds", "1", "2", "--threads", "1",
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def test_a_missing_test_split_is_refused_before_any_run(user_data, tmp_path):
    args = compare_args(user_data, tmp_path / "out")
    del args[args.index("--test_dir") : args.index("--test_dir") + 2]
    with pytest.raises(SystemExit, match="--test_dir"):
        cli.main(args)
    assert not (tmp_path / "out").exists()


def test_bad_requests_name_the_fix(user_data, tmp_path, monkeypatch):
    with pytest.raises(SystemExit):  # argparse: one seed cannot give a paired interval
        cli.parse_args(["--train_dir", "x", "--seeds", "1"])
    with pytest.raises(SystemExit):  # no data at all
        cli.parse_args([])
    with pytest.raises(SystemExit):  # an abbreviation is not a flag
        cli.parse_args(["--train_d", "x"])
    with pytest.raises(SystemExit, match="no such folder"):
        cli.main([*compare_args(user_data, tmp_path / "out"), "--model_name_or_path", str(tmp_path / "absent")])
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install 'hf_adafilter\[baselines\]'"):
        cli.main(compare_args(user_data, tmp_path / "out", "--methods", "lora"))


def test_the_plan_selects_each_methods_learning_rate_and_keeps_fine_tuning(user_data, tmp_path, capsys):
    cli.main(compare_args(user_data, tmp_path / "out", "--dry_run"))
    lines = capsys.readouterr().out.splitlines()
    # Fine-tuning is the reference and always runs; three LRs each on the selection seed, then two final seeds.
    assert sum(line.startswith("select") and " finetune " in line for line in lines) == 3
    assert sum(line.startswith("select") and " adafilter " in line for line in lines) == 3
    assert sum(line.startswith("final") for line in lines) == 4
    assert "10 runs, prior estimate" in lines[-1]
    args = cli.parse_args(compare_args(user_data, tmp_path, "--learning_rates", "1e-3", "3e-3"))
    task = cli.load_task(args)
    assert task.record["sizes_per_split"] == {"train": 16, "validation": 8, "test": 8}
    budget = cli.budget_from_args(args, task)
    assert budget.lr_grids["adafilter"] == budget.lr_grids["finetune"] == (1e-3, 3e-3)
    assert budget.grid_extensions == 0 and budget.max_steps == 2 and budget.epochs is None


@pytest.mark.slow
def test_a_comparison_on_image_folders_writes_the_table_and_resumes(user_data, tmp_path):
    output_dir = tmp_path / "out"
    args = compare_args(user_data, output_dir, "--learning_rates", "1e-3", "3e-3")
    threads_before = os.environ.get("OMP_NUM_THREADS")
    payload = cli.main(args)
    assert os.environ.get("OMP_NUM_THREADS") == threads_before  # --threads is each run's, not this process's
    runs = payload["runs"]
    assert [r["phase"] for r in runs].count("select") == 4 and [r["phase"] for r in runs].count("final") == 4
    finals = [r for r in runs if r["phase"] == "final"]
    assert all(0.0 <= r["metrics"]["test_accuracy"] <= 1.0 and len(r["test_correct"]) == 8 for r in finals)
    cell = payload["cells"]["photos"]["adafilter"]
    assert cell["splits"] == 2 and len(cell["paired_ci95"]) == 2
    text = (output_dir / "compare.md").read_text()
    assert text.startswith("# Which method on photos?") and "paired per-seed Δ, 95% CI" in text
    assert "hf-adafilter-compare" in text and "static export" in text
    assert json.loads((output_dir / "compare.json").read_text())["meta"]["test_evaluations"] == 4
    assert (output_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # A rerun without --resume would replace the report: refused, naming both ways on.
    with pytest.raises(SystemExit, match="--resume"):
        cli.main(args)
    again = cli.main([*args, "--resume"])
    assert all(r.get("resumed") for r in again["runs"]) and len(again["runs"]) == len(runs)


def test_the_module_and_the_console_script_are_the_same_command():
    completed = subprocess.run([sys.executable, "-m", "hf_adafilter.compare", "--help"], capture_output=True,
                               text=True, check=True)  # fmt: skip
    assert "--train_dir" in completed.stdout and "--learning_rates" in completed.stdout
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "hf-adafilter-compare"]
    assert script.value == "hf_adafilter.compare.cli:run"
