"""examples/run.py end to end on tiny imagefolders and a tiny backbone saved on disk."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_backbone_config
from PIL import Image

from hf_adafilter.data import DataError
from hf_adafilter.methods import METHODS
from hf_adafilter.trainer import AdaFilterTrainer

REPO = Path(__file__).resolve().parent.parent
RUN_SCRIPT = REPO / "examples" / "run.py"
CLASSES = ("red", "blue")


def load_run_module():
    spec = importlib.util.spec_from_file_location("adafilter_run_example", RUN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


run_example = load_run_module()


def make_imagefolder(root: Path, per_class: int, seed: int) -> Path:
    """Reddish vs bluish photos-to-be; various sizes so the transforms must resize."""
    rng = np.random.default_rng(seed)
    for index, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for item in range(per_class):
            size = int(rng.integers(36, 56))
            pixels = rng.integers(0, 90, (size, size + 4, 3))
            pixels[..., 0 if index == 0 else 2] += 150
            Image.fromarray(pixels.astype("uint8")).save(folder / f"{item}.png")
    return root


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


def test_resume_continues_from_the_saved_step(workspace, tmp_path, monkeypatch):
    args = ("--save_strategy", "steps", "--save_steps", "2", "--max_steps", "6")
    straight = tmp_path / "straight"
    run_example.main(run_args(workspace, straight, "adafilter", *args))
    # An interruption after step 2: only the first checkpoint of the same 6-step run survives.
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(straight / "checkpoint-2", interrupted / "checkpoint-2")
    steps_run = []
    original_step = AdaFilterTrainer.training_step

    def counting_step(self, *step_args, **step_kwargs):
        steps_run.append(self.state.global_step + 1)
        return original_step(self, *step_args, **step_kwargs)

    monkeypatch.setattr(AdaFilterTrainer, "training_step", counting_step)
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


def test_saved_outputs_are_never_silently_overwritten(workspace, tmp_path):
    output_dir = tmp_path / "kept"
    output_dir.mkdir()
    (output_dir / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"already holds \['config.json'\].*--overwrite_output_dir"):
        run_example.main(run_args(workspace, output_dir))
    assert (output_dir / "config.json").read_text() == "{}"


def test_bad_column_and_unsupported_backbone_are_clear_errors(workspace, tmp_path):
    with pytest.raises(DataError, match="photo"):
        run_example.main(run_args(workspace, tmp_path / "a", "adafilter", "--image_column_name", "photo"))
    vit = tmp_path / "vit"
    transformers.ViTForImageClassification(
        transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                               image_size=32, patch_size=8)
    ).save_pretrained(vit)  # fmt: skip
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(vit)
    args = run_args(workspace, tmp_path / "b", "finetune")
    args[args.index("--model_name_or_path") + 1] = str(vit)
    with pytest.raises(ValueError, match="'vit' is not supported.*resnet, efficientnet"):
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


@pytest.mark.parametrize("method", METHODS)
def test_method_defaults_fill_only_what_the_user_did_not_set(tmp_path, method):
    from hf_adafilter.methods import TRAINING_DEFAULTS

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


def test_help_states_the_method_defaults():
    completed = subprocess.run(
        [sys.executable, str(RUN_SCRIPT), "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(completed.stdout.split())
    assert "Training defaults per --method" in text and "adafilter: --num_train_epochs 30" in text
