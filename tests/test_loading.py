"""Saving and loading: bit-exact round trip, Auto classes, remote code without the package, pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import FAMILIES, REMOTE_CODE_FILES, pixel_batch, random_backbone
from PIL import Image

from hf_adafilter import AdaFilterForImageClassification, AdaFilterModel

LABELS = {0: "cat", 1: "dog", 2: "fox"}


def trained_looking_model(family: str = "resnet") -> AdaFilterForImageClassification:
    """A model whose two banks differ, so a loader that mixed them up would be caught."""
    model = AdaFilterForImageClassification.from_backbone(random_backbone(family), id2label=LABELS)
    with torch.no_grad():
        for layer in model.adafilter.gated_layers.values():
            layer.finetuned_layer.weight.mul_(1.1)
    return model.eval()


def save_with_processor(model: AdaFilterForImageClassification, path) -> None:
    model.save_pretrained(path)
    transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_is_bit_exact(family, tmp_path):
    model = trained_looking_model(family)
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")), "only safetensors are written"
    loaded = AdaFilterForImageClassification.from_pretrained(tmp_path).eval()
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    pixels = pixel_batch()
    with torch.no_grad():
        assert torch.equal(model(pixels).logits, loaded(pixels).logits)
    frozen = [
        p.requires_grad
        for layer in loaded.adafilter.gated_layers.values()
        for p in layer.base_layer.parameters()
    ]
    assert frozen and not any(frozen), "the pre-trained bank is frozen again after from_pretrained"


def test_auto_classes_load_adafilter(tmp_path):
    model = trained_looking_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_adafilter.AdaFilterConfig",
        "AutoModel": "modeling_adafilter.AdaFilterModel",
        "AutoModelForImageClassification": "modeling_adafilter.AdaFilterForImageClassification",
    }
    for name in REMOTE_CODE_FILES:
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "pretrained.py").exists(), "package-only modules do not travel as remote code"
    classifier = transformers.AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(classifier) is AdaFilterForImageClassification
    base = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(base) is AdaFilterModel
    pixels = pixel_batch()
    with torch.no_grad():
        assert torch.equal(base.eval()(pixels).pooler_output, model.adafilter(pixels).pooler_output)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_adafilter"] = None  # the package is hidden: `import hf_adafilter` raises ImportError
    import torch, transformers
    path = sys.argv[1]
    try:
        transformers.AutoModelForImageClassification.from_pretrained(path)
    except Exception as error:  # without trust_remote_code an unknown model type must be refused
        refused = type(error).__name__
    else:
        refused = None
    model = transformers.AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(pixels).logits
    frozen = all(not p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n)
    print(); print("RESULT=" + json.dumps({"module": type(model).__module__, "refused": refused, "frozen": frozen,
                      "logits": logits.tolist()}))
    """
)


def test_remote_code_loads_without_the_package(tmp_path):
    model = trained_looking_model()
    save_with_processor(model, tmp_path / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(tmp_path / "model")],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,  # transformers asks before running remote code; no answer means no
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.rpartition("RESULT=")[2])
    assert report["module"].startswith("transformers_modules."), report["module"]
    assert report["refused"] is not None
    assert report["frozen"]
    with torch.no_grad():
        expected = model(pixel_batch()).logits
    assert torch.equal(torch.tensor(report["logits"]), expected)


def test_pipeline_classifies_with_the_saved_labels(tmp_path):
    save_with_processor(trained_looking_model(), tmp_path)
    classifier = transformers.pipeline("image-classification", model=str(tmp_path))
    image = Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8"))
    predictions = classifier(image, top_k=3)
    assert {p["label"] for p in predictions} == set(LABELS.values())
    assert abs(sum(p["score"] for p in predictions) - 1) < 1e-4


SAVED_BEFORE_FOLDERS = Path(__file__).parent / "fixtures" / "saved_before_package_folders"


@pytest.mark.parametrize("loader", [AdaFilterForImageClassification, transformers.AutoModelForImageClassification])
def test_a_model_saved_before_the_package_had_folders_loads_with_identical_outputs(loader):
    """A checkpoint saved by the flat package (its remote code left out: this package's classes load it) gives the
    logits and gates it gave when it was saved."""
    expected = json.loads((SAVED_BEFORE_FOLDERS / "expected_outputs.json").read_text())
    model = loader.from_pretrained(SAVED_BEFORE_FOLDERS).eval()
    assert isinstance(model, AdaFilterForImageClassification)
    with torch.no_grad():
        output = model(pixel_batch(**expected["pixel_batch"]))
    torch.testing.assert_close(output.logits, torch.tensor(expected["logits"]), rtol=0, atol=1e-6)
    for gates, saved in zip(output.gates, expected["gates"], strict=True):
        assert gates.tolist() == saved


def test_a_config_with_keys_this_version_does_not_know_loads_keeps_them_and_warns_once(tmp_path):
    """transformers keeps unknown config keys (a newer version's, another tool's, the user's own): so do we."""
    from transformers.testing_utils import CaptureLogger

    from hf_adafilter.modeling import configuration_adafilter

    model = trained_looking_model()
    model.config.dataset_name = "my-photos"  # set by the user before saving
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update({"finetuning_task": "image-classification", "task_specific_params": {"a": 1}, "added_later": 3})
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with CaptureLogger(configuration_adafilter.logger) as captured:
        loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path)
    assert "added_later" in captured.out and "dataset_name" in captured.out
    assert (loaded.config.dataset_name, loaded.config.added_later) == ("my-photos", 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_batch(2)).logits, model(pixel_batch(2)).logits, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (again["dataset_name"], again["added_later"]) == ("my-photos", 3)


def test_a_misspelt_key_passed_in_code_to_from_pretrained_names_the_closest_field(tmp_path):
    trained_looking_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'gate_hiden_size': did you mean `gate_hidden_size`"):
        AdaFilterForImageClassification.from_pretrained(tmp_path, gate_hiden_size=8)
    with pytest.raises(ValueError, match=r"'gate_hiden_size': did you mean `gate_hidden_size`"):
        transformers.AutoConfig.from_pretrained(tmp_path, gate_hiden_size=8)
