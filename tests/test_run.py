"""examples/run.py end to end on tiny imagefolders and a tiny backbone saved on disk."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers
from conftest import CLASSES, make_imagefolder, tiny_backbone_config

from hf_adafilter.data.loading import DataError
from hf_adafilter.training.methods import METHODS
from hf_adafilter.training.trainer import AdaFilterTrainer

REPO = Path(__file__).resolve().parent.parent
RUN_SCRIPT = REPO / "examples" / "run.py"


def load_run_module():
    spec = importlib.util.spec_from_file_location("adafilter_run_example", RUN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


run_example = load_run_module()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    backbone = transformers.ResNetForImageClassification(tiny_backbone_config("resnet"))
    backbone.save_pretrained(root / "backbone")
    transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(
        root / "backbone"
    )
    return {
        "backbone": root / "backbone",
        "train": make_imagefolder(root / "data" / "train", per_class=12, seed=0),
        "val": make_imagefolder(root / "data" / "val", per_class=4, seed=1),
        "root": root,
    }


def run_args(workspace, output_dir: Path, method: str = "adafilter", *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(workspace["backbone"]),
        "--train_dir", str(workspace["train"]),
        "--validation_dir", str(workspace["val"]),
        "--method", method,
        "--output_dir", str(output_dir),
        "--do_train", "--do_eval",
        "--max_steps", "4",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "5e-3",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu",
        "--disable_tqdm", "true",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def test_forced_gates_and_the_static_export_are_scored_beside_the_learned_gates(workspace, tmp_path):
    test_dir = make_imagefolder(tmp_path / "test", per_class=3, seed=5)
    args = run_args(workspace, tmp_path / "out", "adafilter", "--test_dir", str(test_dir), "--do_predict",
                    "--evaluate_forced_gates", "true", "--evaluate_static_export", "true")  # fmt: skip
    results = run_example.main(args)
    for split in ("eval", "test"):
        for variant in ("forced_finetuned", "forced_pretrained", "static"):
            assert 0.0 <= results[f"{split}_{variant}_accuracy"] <= 1.0
    assert 0.5 <= results["static_agreement"] <= 1.0  # the majority choice reproduces at least half the decisions
    baseline = run_example.main(run_args(workspace, tmp_path / "ft", "finetune", "--evaluate_static_export", "true"))
    assert not any("static" in key for key in baseline)  # nothing to export without gates


@pytest.mark.parametrize("method", ["adafilter", "finetune", "linear_probe", "l2sp", "bitfit"])
def test_each_method_trains_evaluates_and_saves_a_loadable_model(workspace, tmp_path, method):
    output_dir = tmp_path / method
    results = run_example.main(run_args(workspace, output_dir, method))
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "eval_top5_accuracy" in results
    for name in (
        "all_results.json",
        "eval_results.json",
        "train_results.json",
        "config.json",
        "model.safetensors",
        "README.md",  # the model card, written locally as HF's scripts do (no --push_to_hub)
    ):
        assert (output_dir / name).is_file(), name
    saved = json.loads((output_dir / "config.json").read_text())
    assert saved["id2label"] == {"0": "blue", "1": "red"} or saved["id2label"] == {"0": "red", "1": "blue"}
    model = transformers.AutoModelForImageClassification.from_pretrained(output_dir).eval()
    assert transformers.AutoImageProcessor.from_pretrained(output_dir) is not None
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 2)
    backbone = transformers.AutoModel.from_pretrained(workspace["backbone"]).state_dict()
    if method == "adafilter":
        assert (output_dir / "finetuned_fraction_per_layer.png").stat().st_size > 1000
        fractions = json.loads((output_dir / "gate_fractions.json").read_text())
        assert list(fractions) == model.gated_layer_names
        frozen = model.adafilter.pretrained_state_dict()
        assert frozen and all(torch.equal(tensor, backbone[key]) for key, tensor in frozen.items())
        assert "eval_gates/finetuned_fraction" in results
    else:
        assert not (output_dir / "finetuned_fraction_per_layer.png").exists()
        trained = model.base_model.state_dict()
        unchanged = [torch.equal(trained[key], backbone[key]) for key in backbone]
        # linear probe: the backbone, BatchNorm statistics included, is exactly the pretrained one
        assert all(unchanged) if method == "linear_probe" else not all(unchanged)


@pytest.fixture(scope="module")
def vit_backbone(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vit") / "backbone"
    torch.manual_seed(0)
    transformers.ViTForImageClassification(tiny_backbone_config("vit")).save_pretrained(folder)
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", list(METHODS))
def test_a_tiny_vision_transformer_trains_end_to_end_with_every_method(workspace, vit_backbone, tmp_path, method):
    if method == "lora":
        pytest.importorskip("peft", reason="pip install 'hf_adafilter[baselines]'")
    args = run_args(workspace, tmp_path / method, method)
    args[args.index("--model_name_or_path") + 1] = str(vit_backbone)
    results = run_example.main(args)
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    model = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / method).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 2)
    if method == "adafilter":
        assert model.gated_layer_names == [f"layers.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)]
        backbone = transformers.AutoModel.from_pretrained(vit_backbone).state_dict()
        frozen = model.adafilter.pretrained_state_dict()
        assert frozen and all(torch.equal(tensor, backbone[key]) for key, tensor in frozen.items())


def test_resume_continues_from_the_saved_step(workspace, tmp_path, monkeypatch):
    args = ("--save_strategy", "steps", "--save_steps", "2", "--max_steps", "6")
    straight = tmp_path / "straight"
    run_example.main(run_args(workspace, straight, "adafilter", *args))
    # An interruption after step 2: only the first checkpoint of the same 6-step run survives.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(straight / "checkpoint-2", interrupted / "checkpoint-2")
    steps_run = count_training_steps(monkeypatch)
    checkpoint = str(interrupted / "checkpoint-2")
    run_example.main(
        run_args(workspace, interrupted, "adafilter", *args, "--resume_from_checkpoint", checkpoint)
    )
    assert steps_run == [3, 4, 5, 6], "only the steps after the checkpoint run again"
    state = json.loads((interrupted / "checkpoint-6" / "trainer_state.json").read_text())
    expected = json.loads((straight / "checkpoint-6" / "trainer_state.json").read_text())
    history = [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]
    expected_history = [(e["step"], e["loss"]) for e in expected["log_history"] if "loss" in e]
    assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6]
    assert history[:2] == expected_history[:2], "steps 1-2 are the checkpoint's own history"
    model = transformers.AutoModelForImageClassification.from_pretrained(interrupted)
    backbone = transformers.AutoModel.from_pretrained(workspace["backbone"]).state_dict()
    assert all(torch.equal(t, backbone[k]) for k, t in model.adafilter.pretrained_state_dict().items())


def count_training_steps(monkeypatch) -> list[int]:
    steps_run = []
    original_step = AdaFilterTrainer.training_step

    def counting_step(self, *step_args, **step_kwargs):
        steps_run.append(self.state.global_step + 1)
        return original_step(self, *step_args, **step_kwargs)

    monkeypatch.setattr(AdaFilterTrainer, "training_step", counting_step)
    return steps_run


@pytest.fixture(scope="module")
def four_steps(workspace, tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    """A finished 4-step finetune run with checkpoints at steps 2 and 4, and the flags that made it."""
    args = ("--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4")
    output_dir = tmp_path_factory.mktemp("four") / "out"
    run_example.main(run_args(workspace, output_dir, "finetune", *args))
    return output_dir, args


def test_a_killed_save_never_blocks_the_next_run(workspace, four_steps, tmp_path, monkeypatch, caplog):
    finished, args = four_steps
    rerun = tmp_path / "rerun"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(finished / name, rerun / name)
    weights = rerun / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # killed mid-save
    steps_run = count_training_steps(monkeypatch)
    with caplog.at_level("WARNING"):
        run_example.main(run_args(workspace, rerun, "finetune", *args))
    assert steps_run == [3, 4], "resumed from the newest complete checkpoint"
    assert "checkpoint-4 is incomplete (model.safetensors: truncated" in caplog.text
    only_broken = tmp_path / "only_broken"
    shutil.copytree(rerun / "checkpoint-2", only_broken / "checkpoint-2")
    (only_broken / "checkpoint-2" / "trainer_state.json").write_text('{"global_st')
    with pytest.raises(DataError, match=r"holds only incomplete checkpoints \(checkpoint-2\): delete them"):
        run_example.main(run_args(workspace, only_broken, "finetune", *args))


def test_rerunning_a_finished_command_trains_nothing_and_keeps_the_model(workspace, four_steps, tmp_path):
    finished, args = four_steps
    before = (finished / "model.safetensors").read_bytes()
    with pytest.raises(DataError, match=r"holds a finished training run.*--overwrite_output_dir"):
        run_example.main(run_args(workspace, finished, "finetune", *args))
    assert (finished / "model.safetensors").read_bytes() == before
    at_the_end = tmp_path / "at_the_end"  # killed after the final save, before its results were written
    shutil.copytree(finished / "checkpoint-4", at_the_end / "checkpoint-4")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(finished / name, at_the_end / name)
    with pytest.raises(DataError, match=r"already at step 4, which --max_steps 4 does not exceed"):
        run_example.main(run_args(workspace, at_the_end, "finetune", *args))


def test_a_rerun_after_a_killed_final_save_names_it_and_the_intact_checkpoint(workspace, four_steps, tmp_path):
    finished, args = four_steps
    killed = tmp_path / "killed"
    shutil.copytree(finished / "checkpoint-4", killed / "checkpoint-4")
    shutil.copy(finished / "config.json", killed / "config.json")
    weights = (finished / "model.safetensors").read_bytes()
    (killed / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(DataError, match=r"final model .* is incomplete \(model\.safetensors: truncated") as refusal:
        run_example.main(run_args(workspace, killed, "finetune", *args))
    assert f"intact in {killed / 'checkpoint-4'}" in str(refusal.value)
    for pattern in ("config.json", "*.safetensors", "preprocessor_config.json"):  # the recovery the message names
        for path in (killed / "checkpoint-4").glob(pattern):
            shutil.copy(path, killed / path.name)
    recovered = transformers.AutoModelForImageClassification.from_pretrained(killed)
    expected = transformers.AutoModelForImageClassification.from_pretrained(finished)
    recovered_state, expected_state = recovered.state_dict(), expected.state_dict()
    assert recovered_state.keys() == expected_state.keys()
    assert all(torch.equal(recovered_state[key], expected_state[key]) for key in expected_state)


def test_an_explicit_broken_checkpoint_is_refused_before_training_naming_a_complete_one(
    workspace, four_steps, tmp_path
):
    finished, args = four_steps
    run = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(finished / name, run / name)
    (run / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')
    chosen = run / "checkpoint-4"
    with pytest.raises(DataError, match=r"cannot be resumed from: trainer_state.json is truncated.*checkpoint-2"):
        run_example.main(run_args(workspace, run, "finetune", *args, "--resume_from_checkpoint", str(chosen)))
    with pytest.raises(DataError, match=r"--resume_from_checkpoint .*nowhere: no such folder"):
        run_example.main(run_args(workspace, run, "finetune", *args, "--resume_from_checkpoint", str(run / "nowhere")))


def test_one_output_dir_takes_one_run_at_a_time(workspace, tmp_path, caplog):
    from hf_adafilter.training.run_lock import RUN_LOCK

    output_dir = tmp_path / "locked"
    output_dir.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-03T10:00:00+00:00"}
    (output_dir / RUN_LOCK).write_text(json.dumps(holder))  # a live run (this very process) holds it
    with pytest.raises(DataError, match=rf"in use by another training run \(PID {os.getpid()} on"):
        run_example.main(run_args(workspace, output_dir, "finetune"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (output_dir / RUN_LOCK).write_text(json.dumps({**holder, "pid": int(gone.stdout)}))  # a run that died
    with caplog.at_level("WARNING"):
        run_example.main(run_args(workspace, output_dir, "finetune"))
    assert "from a run that is no longer running" in caplog.text
    assert (output_dir / "model.safetensors").is_file() and not (output_dir / RUN_LOCK).exists()


def test_an_output_dir_of_another_dataset_is_not_resumed(workspace, four_steps, tmp_path):
    finished, args = four_steps
    other = tmp_path / "other"
    shutil.copytree(finished / "checkpoint-2", other / "checkpoint-2")
    relabelled = tmp_path / "relabelled"
    for split in ("train", "val"):
        for old, new in zip(CLASSES, ("crimson", "navy"), strict=True):
            shutil.copytree(workspace[split] / old, relabelled / split / new)
    run = run_args(workspace, other, "finetune", *args)
    run[run.index("--train_dir") + 1] = str(relabelled / "train")
    run[run.index("--validation_dir") + 1] = str(relabelled / "val")
    with pytest.raises(DataError, match=r"checkpoint-2 was trained on labels .*belongs to another dataset"):
        run_example.main(run)


def test_an_output_dir_that_cannot_be_written_fails_before_training(workspace, tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    with pytest.raises(DataError, match=r"--output_dir .*a_file is a file, not a folder"):
        run_example.main(run_args(workspace, a_file))
    assert a_file.read_text() == "keep me"
    steps_run = count_training_steps(monkeypatch)
    monkeypatch.setattr(
        run_example.os, "access", lambda path, mode: False
    )  # a read-only place, even for root
    with pytest.raises(DataError, match=r"is not writable: choose another --output_dir"):
        run_example.main(run_args(workspace, tmp_path / "new" / "out"))
    assert steps_run == []


def test_saved_outputs_are_never_silently_overwritten(workspace, tmp_path):
    output_dir = tmp_path / "kept"
    output_dir.mkdir()
    (output_dir / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"already holds \['config.json'\].*--overwrite_output_dir"):
        run_example.main(run_args(workspace, output_dir))
    assert (output_dir / "config.json").read_text() == "{}"


def test_do_predict_without_a_test_split_stops_before_training(workspace, tmp_path):
    output_dir = tmp_path / "predict"
    with pytest.raises(DataError, match=r"--do_predict needs a test split: pass --test_dir"):
        run_example.main(run_args(workspace, output_dir, "finetune", "--do_predict"))
    assert not output_dir.exists()


def test_a_checkpoint_with_other_labels_gets_a_new_head_unless_refused(workspace, tmp_path):
    first = tmp_path / "first"
    run_example.main(run_args(workspace, first, "adafilter", "--max_steps", "1"))
    relabelled = tmp_path / "relabelled"
    for split in ("train", "val"):
        for old, new in zip(CLASSES, ("crimson", "navy"), strict=True):
            shutil.copytree(workspace[split] / old, relabelled / split / new)
    args = run_args(workspace, tmp_path / "second", "adafilter", "--max_steps", "1")
    args[args.index("--model_name_or_path") + 1] = str(first)
    args[args.index("--train_dir") + 1] = str(relabelled / "train")
    args[args.index("--validation_dir") + 1] = str(relabelled / "val")
    with pytest.raises(ValueError, match=r"pass --ignore_mismatched_sizes to train a new head"):
        run_example.main([*args, "--ignore_mismatched_sizes", "false"])
    run_example.main(args)
    config = json.loads((tmp_path / "second" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["crimson", "navy"]


def test_remote_code_and_mismatched_sizes_flags_are_hf_style(tmp_path):
    model_args, *_ = run_example.parse_args(["--output_dir", str(tmp_path), "--trust_remote_code"])
    assert model_args.trust_remote_code and model_args.ignore_mismatched_sizes
    model_args, *_ = run_example.parse_args(
        ["--output_dir", str(tmp_path), "--ignore_mismatched_sizes", "false"]
    )
    assert not model_args.trust_remote_code and not model_args.ignore_mismatched_sizes


def test_bad_column_and_unsupported_backbone_are_clear_errors(workspace, tmp_path):
    with pytest.raises(DataError, match="photo"):
        run_example.main(run_args(workspace, tmp_path / "a", "adafilter", "--image_column_name", "photo"))
    poolformer = tmp_path / "poolformer"
    transformers.PoolFormerForImageClassification(
        transformers.PoolFormerConfig(hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2)
    ).save_pretrained(poolformer)
    transformers.PoolFormerImageProcessorPil(size={"shortest_edge": 32}).save_pretrained(poolformer)
    args = run_args(workspace, tmp_path / "b", "finetune")
    args[args.index("--model_name_or_path") + 1] = str(poolformer)
    with pytest.raises(ValueError, match="'poolformer' is not supported.*resnet, efficientnet"):
        run_example.main(args)


def run_script(args: list[str], timeout: int = 600, launcher: list[str] | None = None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [*(launcher or [sys.executable]), str(RUN_SCRIPT), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_unreadable_image_stops_with_the_file_name_and_no_traceback(workspace, tmp_path):
    broken = tmp_path / "broken"
    make_imagefolder(broken, per_class=4, seed=3)
    (broken / "red" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    args = run_args(workspace, tmp_path / "out")
    args[args.index("--train_dir") + 1] = str(broken)
    result = run_script(args)
    assert result.returncode != 0
    assert "corrupt.png" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_two_process_ddp_on_cpu_agrees_and_saves_a_loadable_model(workspace, tmp_path):
    output_dir = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    result = run_script(run_args(workspace, output_dir, "adafilter", "--per_device_train_batch_size", "4"),
                        launcher=launcher)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d)/2 final weights sha256 ([0-9a-f]{64})", result.stdout))
    assert set(digests) == {"0", "1"}, result.stdout[-2000:]
    assert digests["0"] == digests["1"], "both ranks end with the same weights"
    model = transformers.AutoModelForImageClassification.from_pretrained(output_dir)
    assert type(model).__name__ == "AdaFilterForImageClassification"
    assert run_example.weights_digest(model) == digests["0"]


def test_accelerate_launch_single_process(workspace, tmp_path):
    output_dir = tmp_path / "launched"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    result = run_script(run_args(workspace, output_dir, "adafilter", "--max_steps", "2"), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval accuracy" in result.stdout
    assert transformers.AutoModelForImageClassification.from_pretrained(output_dir) is not None


class FakeLauncher:
    """Stands for the `accelerate launch` process: its command line and environment."""

    def __init__(self, *flags: str, **environ: str) -> None:
        self.command = [sys.executable, "/usr/bin/accelerate", "launch", *flags, "examples/run.py"]
        self.variables = environ

    def cmdline(self) -> list[str]:
        return self.command

    def environ(self) -> dict[str, str]:
        return self.variables


def test_accelerate_launch_on_cpu_gets_the_cores_unless_the_user_chose(monkeypatch):
    choose = run_example.accelerate_default_cpu_threads
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what accelerate exports when nobody chose
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert choose(FakeLauncher()) == cores
    assert choose(FakeLauncher("--num_cpu_threads_per_process", "1")) is None
    assert choose(FakeLauncher("--num_cpu_threads_per_process=1")) is None
    assert choose(FakeLauncher(OMP_NUM_THREADS="1")) is None  # set in the launching shell
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert choose(FakeLauncher()) == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert choose(FakeLauncher()) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # not under accelerate launch
    assert choose(FakeLauncher()) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to tell 1 thread from all")
def test_accelerate_launch_command_of_the_readme_uses_every_core(workspace, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = [
        *launcher,
        str(RUN_SCRIPT),
        *run_args(workspace, tmp_path / "out", "finetune", "--max_steps", "1"),
    ]
    result = subprocess.run(command, cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"CPU threads: {len(os.sched_getaffinity(0))}" in result.stderr
    # The defaults that replaced flags not given are logged where the user sees them.
    assert "finetune defaults for flags not given: {'num_train_epochs': 30" in result.stderr


def test_console_script_is_the_example_script():
    script = Path(sysconfig.get_path("scripts")) / "hf-adafilter-train"  # where pip installs console scripts
    completed = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    assert "Training defaults per --method" in " ".join(completed.stdout.split())


@pytest.mark.parametrize("method", METHODS)
def test_method_defaults_fill_only_what_the_user_did_not_set(tmp_path, method):
    from hf_adafilter.training.methods import TRAINING_DEFAULTS

    base = ["--method", method, "--output_dir", str(tmp_path)]
    *_, training_args = run_example.parse_args(base)
    for name, value in TRAINING_DEFAULTS[method].items():
        assert getattr(training_args, name) == value, name
    *_, training_args = run_example.parse_args([*base, "--learning_rate", "5e-5", "--num_train_epochs=2"])
    assert (training_args.learning_rate, training_args.num_train_epochs) == (5e-5, 2)
    assert (
        training_args.per_device_train_batch_size == TRAINING_DEFAULTS[method]["per_device_train_batch_size"]
    )
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"method": method, "output_dir": str(tmp_path), "learning_rate": 0.5}))
    *_, training_args = run_example.parse_args([str(config)])
    assert training_args.learning_rate == 0.5
    assert training_args.num_train_epochs == TRAINING_DEFAULTS[method]["num_train_epochs"]


@pytest.mark.parametrize(
    "spelling",
    [
        ["--learning-rate", "0.05", "--num-train-epochs", "2"],
        ["--learning_rate=0.05", "--num_train_epochs=2"],
        ["--learning-rate=0.05", "--num_train_epochs", "2"],
    ],
    ids=["dashes", "equals", "mixed"],
)
def test_a_given_flag_wins_over_the_method_defaults_however_it_is_spelt(tmp_path, spelling):
    *_, training_args = run_example.parse_args(["--output_dir", str(tmp_path), *spelling])
    assert (training_args.learning_rate, training_args.num_train_epochs) == (0.05, 2)
    assert training_args.per_device_train_batch_size == 32  # not given: the method default


def test_flags_of_an_args_file_next_to_the_script_win_over_defaults_and_lose_to_the_command_line(
    tmp_path, monkeypatch
):
    script = tmp_path / "train.py"
    script.with_suffix(".args").write_text("--learning_rate 0.07 --num_train_epochs 4\n")
    monkeypatch.setattr(sys, "argv", [str(script)])
    *_, training_args = run_example.parse_args(["--output_dir", str(tmp_path), "--num_train_epochs", "5"])
    assert (training_args.learning_rate, training_args.num_train_epochs) == (0.07, 5)


def test_an_abbreviated_flag_is_refused_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_example.parse_args(["--output_dir", str(tmp_path), "--learning_r", "0.05"])
    assert "--learning_r" in capsys.readouterr().err


def test_help_states_the_method_defaults():
    completed = subprocess.run(
        [sys.executable, str(RUN_SCRIPT), "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(completed.stdout.split())
    assert "Training defaults per --method" in text and "adafilter: --num_train_epochs 30" in text
    assert "Fine-tune a pretrained CNN" in text  # a description, as HF's scripts have
    for option in completed.stdout.split("\n  --"):
        assert option.count("(default") <= 1, option


def test_download_flags_reach_the_adafilter_backbone(workspace, tmp_path, monkeypatch):
    from hf_adafilter import AdaFilterForImageClassification

    calls = []
    real = AdaFilterForImageClassification.from_backbone.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AdaFilterForImageClassification, "from_backbone", classmethod(spy))
    cache = str(tmp_path / "cache")
    run_example.main(run_args(workspace, tmp_path / "out", "adafilter", "--max_steps", "1", "--cache_dir", cache,
                              "--model_revision", "main", "--token", "hf_test"))  # fmt: skip
    assert (calls[0]["revision"], calls[0]["cache_dir"], calls[0]["token"]) == ("main", cache, "hf_test")


def test_fine_tuning_and_adafilter_see_the_same_augmentation_draws(workspace, tmp_path, monkeypatch):
    """The gate noise has its own RNG, so a paired comparison is paired: same seed, same crops, same flips."""
    import hf_adafilter.data.transforms as transforms

    original = transforms.random_resized_crop_box
    boxes: dict[str, list[tuple]] = {"finetune": [], "adafilter": []}
    for method, drawn in boxes.items():

        def recorded(*args, drawn=drawn, **kwargs):
            drawn.append(original(*args, **kwargs))
            return drawn[-1]

        monkeypatch.setattr(transforms, "random_resized_crop_box", recorded)
        run_example.main(run_args(workspace, tmp_path / method, method, "--max_steps", "6"))
    assert len(boxes["adafilter"]) >= 6 * 8 and boxes["adafilter"] == boxes["finetune"]


def test_gate_warmup_fine_tunes_first_then_the_gates_learn(workspace, tmp_path):
    output_dir = tmp_path / "warmup"
    run_example.main(run_args(workspace, output_dir, "adafilter", "--max_steps", "6", "--gate_warmup_ratio", "0.5",
                              "--gate_init_log_odds", "-6"))  # fmt: skip
    logs = [e for e in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    fractions = [e["gates/finetuned_fraction"] for e in logs]
    assert fractions[:3] == [1.0, 1.0, 1.0]  # warm-up: every gate on the fine-tuned bank
    assert max(fractions[3:]) < 0.1  # then the gates decide (a prior of -6 picks the pre-trained bank)
    with pytest.raises(ValueError, match="gate_warmup_ratio"):
        run_example.parse_args(run_args(workspace, output_dir, "adafilter", "--gate_warmup_ratio", "1"))


def test_do_predict_writes_the_prediction_of_every_test_image(workspace, tmp_path):
    output_dir = tmp_path / "predict"
    args = run_args(workspace, output_dir, "finetune", "--test_dir", str(workspace["val"]), "--do_predict")
    results = run_example.main(args)
    lines = (output_dir / "predict_results.txt").read_text().splitlines()
    assert lines[0] == "index\tlabel\tprediction" and len(lines) == 1 + 2 * 4
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(row[0]) for row in rows] == list(range(8)) and {row[1] for row in rows} == set(CLASSES)
    assert sum(label == guess for _, label, guess in rows) / 8 == pytest.approx(results["test_accuracy"])


def test_ddp_skips_the_unused_parameter_search_unless_a_gate_warm_up_leaves_the_gates_idle(workspace, tmp_path):
    def find_unused(*extra: str):
        return run_example.parse_args(run_args(workspace, tmp_path, "adafilter", *extra))[-1].ddp_find_unused_parameters

    assert find_unused() is False
    assert find_unused("--gate_warmup_ratio", "0.2") is True
    assert find_unused("--ddp_find_unused_parameters", "true") is True  # the user's choice stands


def test_gradient_checkpointing_flag_trains_adafilter(workspace, tmp_path, monkeypatch):
    from hf_adafilter.modeling import layers

    calls = []
    original = layers._RecomputableBanks.__call__
    monkeypatch.setattr(layers._RecomputableBanks, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    results = run_example.main(run_args(workspace, tmp_path / "gc", "adafilter", "--activation_checkpointing"))
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    assert len(calls) == 2 * 4 * len(json.loads((tmp_path / "gc" / "gate_fractions.json").read_text()))


def test_data_loader_workers_default_to_four_on_a_gpu_and_none_on_a_cpu(workspace, tmp_path, monkeypatch):
    def workers(*extra: str) -> int:
        return run_example.parse_args(run_args(workspace, tmp_path, "adafilter", *extra))[-1].dataloader_num_workers

    assert workers() == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert workers() == 4
    assert workers("--dataloader_num_workers", "1") == 1


def test_save_compact_writes_a_compact_final_model_and_full_checkpoints(workspace, tmp_path):
    output_dir = tmp_path / "compact"
    args = ("--save_compact", "--save_strategy", "steps", "--save_steps", "4")
    run_example.main(run_args(workspace, output_dir, "adafilter", *args))
    assert (output_dir / "model.compact.safetensors").is_file() and not (output_dir / "model.safetensors").exists()
    assert (output_dir / "checkpoint-4" / "model.safetensors").is_file()  # resuming reads full checkpoints
    compact = transformers.AutoModelForImageClassification.from_pretrained(output_dir).eval()
    full = transformers.AutoModelForImageClassification.from_pretrained(output_dir / "checkpoint-4").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compact(pixels).logits, full(pixels).logits, rtol=0, atol=0)
    assert (output_dir / "model.compact.safetensors").stat().st_size < (
        output_dir / "checkpoint-4" / "model.safetensors"
    ).stat().st_size
    with pytest.raises(DataError, match=r"--save_compact .*--method finetune"):
        run_example.main(run_args(workspace, tmp_path / "other", "finetune", "--save_compact"))
