"""Shared fixtures: tiny random configs of every supported backbone family (fast on 2 CPU cores)."""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Packaged backbones are converted once per test session, never into the user's cache.
os.environ.setdefault("HF_ADAFILTER_CACHE", tempfile.mkdtemp(prefix="hf_adafilter_test_cache_"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from hub_server import LocalHub  # noqa: E402
from PIL import Image  # noqa: E402

TINY_BACKBONE_CONFIGS = {
    # Bottleneck blocks with a projection shortcut: plain convs + BatchNorm.
    "resnet": lambda: transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
    # Depthwise convs, TF "same" padding, squeeze-excite (must stay ungated).
    "efficientnet": lambda: transformers.EfficientNetConfig(
        width_coefficient=0.1, depth_coefficient=0.1, image_size=32, hidden_dim=128
    ),
    # Depthwise conv + pointwise nn.Linear on channels-last input, LayerNorm (no BatchNorm).
    "convnext": lambda: transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    # Grouped convs and squeeze-excite ("attention") convs.
    "regnet": lambda: transformers.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4
    ),
    # Inverted residuals, ReLU6, TF padding helpers reading conv attributes.
    "mobilenet_v2": lambda: transformers.MobileNetV2Config(
        depth_multiplier=0.1, image_size=32, finegrained_output=False
    ),
    # Weight-standardised conv subclass, GroupNorm, pre-activation blocks.
    "bit": lambda: transformers.BitConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2
    ),
    # Vision transformers: gated MLP linears on (batch, tokens, features), LayerNorm, class-token heads.
    "vit": lambda: transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8
    ),
    # A distillation token beside the class token.
    "deit": lambda: transformers.DeiTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8
    ),
    # Layer scale; the head reads the class token and the mean patch token.
    "dinov2": lambda: transformers.Dinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32, patch_size=8
    ),
    # Shifted windows, patch merging between stages, a mean-pooled head.
    "swin": lambda: transformers.SwinConfig(
        embed_dim=8, depths=[1, 2], num_heads=[1, 2], window_size=2, image_size=32, patch_size=4
    ),
}
FAMILIES = tuple(TINY_BACKBONE_CONFIGS)
IMAGE_SIZE = 32
# The package modules a saved model carries as remote code (and nothing else of the package).
REMOTE_CODE_FILES = (
    "configuration_adafilter.py",
    "modeling_adafilter.py",
    "layers.py",
    "gating.py",
    "backbones.py",
    "compact.py",
    "checkpointing.py",
    "backbone_sources.py",
    "from_backbone.py",
    "bank_ops.py",
    "batchnorm_ops.py",
    "gated_training.py",
    "gated_inference.py",
    "bank_export.py",
    "inputs.py",
    "family_names.py",
    "outputs.py",
)


def tiny_backbone_config(family: str) -> transformers.PreTrainedConfig:
    return TINY_BACKBONE_CONFIGS[family]()


def random_backbone(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A plain backbone with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    backbone = transformers.AutoModel.from_config(tiny_backbone_config(family))
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return backbone.eval()


def perturb_finetuned_bank(
    model,
    seed: int = 3,
    scale: float = 0.5,
    mean_shift: float = 0.3,
    gain: float = 1.5,
    bias_shift: float = 0.0,
) -> None:
    """Moves the trainable bank (and its norms) away from the pre-trained one, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adafilter.gated_layers.values():
            for tensor in layer.finetuned_layer.parameters():
                tensor.add_(
                    scale * torch.randn(tensor.shape, generator=generator) * tensor.std().clamp_min(1e-3)
                )
            if layer.finetuned_norm is not None:
                layer.finetuned_norm.running_mean.add_(mean_shift)
                layer.finetuned_norm.weight.mul_(gain)
                layer.finetuned_norm.bias.add_(bias_shift)


def pixel_batch(batch_size: int = 4, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def hub_server() -> Iterator[LocalHub]:
    """One local Hub server per test module."""
    with LocalHub() as server:
        yield server


@pytest.fixture
def hub(hub_server: LocalHub) -> Iterator[LocalHub]:
    """The shared server; the test fails if it hit an unknown route or crashed meanwhile."""
    n_unhandled, n_errors = len(hub_server.unhandled), len(hub_server.errors)
    yield hub_server
    assert hub_server.unhandled[n_unhandled:] == [], "client used endpoints LocalHub does not implement"
    assert hub_server.errors[n_errors:] == [], "LocalHub crashed while serving"


def load_script(path: Path, name: str):
    """A benchmark script (not a package module) imported by file path, registered under `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


CLASSES = ("red", "blue")


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
