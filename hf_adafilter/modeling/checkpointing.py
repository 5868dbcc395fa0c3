"""Saving, loading and pushing AdaFilter checkpoints (full or compact), as a mixin of the model classes.

transformers' own `from_pretrained` / `save_pretrained` / `push_to_hub` do the work; this adds the compact format
(`compact.py`), safetensors-only loading, the auto map every saved config carries, and the model card writers.

Travels to the Hub as remote code: relative imports only, nothing beyond huggingface_hub, torch, transformers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils.hub import create_and_tag_model_card

from .backbones import load_supported_backbone
from .compact import (
    COMPACT_VARIANT,
    COMPACT_WEIGHT_PATTERNS,
    FULL_WEIGHT_PATTERNS,
    STAGING_PREFIX,
    assemble_state_dict,
    check_base,
    compact_save_plan,
    download_kwargs,
    load_base_state_dict,
    load_compact_state_dict,
    publish_staged_save,
    read_marker,
    saved_marker,
)

# Saved configs carry all three entries, so remote code resolves AutoConfig, AutoModel and the classifier alike
# (`register_for_auto_class` alone records only the saved class's own auto class).
AUTO_MAP = {
    "AutoConfig": "configuration_adafilter.AdaFilterConfig",
    "AutoModel": "modeling_adafilter.AdaFilterModel",
    "AutoModelForImageClassification": "modeling_adafilter.AdaFilterForImageClassification",
}

# Write the README.md of `push_to_hub` (model, saved folder, card so far, repo id -> card). The pip package
# registers the AdaFilter card; remote code keeps transformers' default card.
MODEL_CARD_WRITERS: list[Callable[[PreTrainedModel, str, ModelCard, str], ModelCard]] = []


class AdaFilterCheckpointMixin:
    """`from_pretrained`, `save_pretrained` and `push_to_hub` of the AdaFilter models, compact format included."""

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args, base_revision: str | None = None, **kwargs
    ):
        """Loads a full or a compact checkpoint (Hub id, local folder, or the cache offline); safetensors only.

        `base_revision` overrides the revision a compact checkpoint's Hub base is read from, e.g. the commit it was
        trained on after the base repository moved on.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                "AdaFilter checkpoints are safetensors only and loading never unpickles; drop use_safetensors=False."
            )
        kwargs["use_safetensors"] = True
        marker = None
        if kwargs.get("state_dict") is None:
            marker = read_marker(pretrained_model_name_or_path, kwargs.get("config"), download_kwargs(kwargs))
        if marker is not None:
            loaded = cls._from_compact(pretrained_model_name_or_path, marker, base_revision, *args, **kwargs)
        else:
            loaded = _load_full(super().from_pretrained, pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # transformers recreates parameters with requires_grad=True on load: freezing done in __init__ is lost.
        model.freeze_pretrained_bank()
        return loaded

    @classmethod
    def _from_compact(cls, path, marker: dict, base_revision: str | None, *args, **kwargs):
        """Rebuilds the pre-trained bank from the base, checks its checksum, adds the trained tensors, loads the whole
        through transformers' own `state_dict=` path (dtype, device map, loading report as usual)."""
        download = download_kwargs(kwargs, pop=True)
        config = kwargs.pop("config", None)
        if not isinstance(config, PreTrainedConfig):
            config = cls.config_class.from_pretrained(config if config is not None else path, **download)
        with torch.device("meta"):
            skeleton = cls(config)  # names and shapes only, no memory
        base_state = load_base_state_dict(path, marker, load_supported_backbone, download, base_revision)
        state_dict = assemble_state_dict(
            path, skeleton, marker, base_state, lambda: load_compact_state_dict(path, download)
        )
        del base_state, skeleton
        loaded = super().from_pretrained(None, *args, config=config, state_dict=state_dict, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.config.name_or_path = str(path)
        return loaded

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args,
        compact: bool = False,
        base_model: str | None = None,
        base_revision: str | None = None,
        **kwargs,
    ):
        """transformers' `save_pretrained` (safetensors only), or with `compact=True` a compact checkpoint: only what
        training changed, in `model.compact.safetensors`, plus `config.compact_base` naming the base backbone
        (`base_model`, default `config.backbone_name_or_path`; `base_revision` for a Hub base) and the sha256 of the
        pre-trained bank, verified against the base before anything is written. Saving one format removes the
        other's weights from the folder. The files are written to a staging folder and moved in by atomic renames.
        """
        if self._auto_class is not None:
            self.config.auto_map = dict(AUTO_MAP)
        previous, marker = self.config.compact_base, None
        if compact:
            if args or kwargs.get("state_dict") is not None or kwargs.get("variant") is not None:
                raise ValueError(
                    "save_pretrained(compact=True) chooses the tensors and the file name itself: pass no state_dict= "
                    "or variant=, and the other options by keyword."
                )
            marker, trained = compact_save_plan(self, base_model, base_revision)
            # Before anything is written: a compact checkpoint loads only if its base is reachable and matches.
            base_state = load_base_state_dict(save_directory, marker, load_supported_backbone, {})
            check_base(
                f"Cannot save a compact AdaFilter checkpoint to {str(save_directory)!r}",
                marker,
                self.frozen_parameter_names().values(),
                base_state,
                fix="Pass base_model= the backbone this model was built from (and base_revision= for a Hub base), "
                "or save a full checkpoint (compact=False). Nothing was written.",
            )
            del base_state
            kwargs.update(state_dict=trained, variant=COMPACT_VARIANT)
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        self.config.compact_base = marker
        try:
            if not is_main_process:
                return super().save_pretrained(save_directory, *args, **kwargs)
            os.makedirs(save_directory, exist_ok=True)
            # Written in full beside the folder's files first, then moved in: a kill never leaves a half-written
            # model where a loadable one was.
            staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=save_directory)
            try:
                result = super().save_pretrained(staging, *args, **kwargs)
                # The backbone's preprocessing travels with the model, so `pipeline(model=path)` works on any save.
                if getattr(self, "image_processor", None) is not None:
                    self.image_processor.save_pretrained(staging)
                publish_staged_save(staging, save_directory)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        finally:
            self.config.compact_base = previous
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        compact: bool = False,
        base_model: str | None = None,
        base_revision: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> CommitInfo:
        """transformers' `push_to_hub`, plus `compact=` (see `save_pretrained`). The commit also deletes the other
        format's weights from the repo, and the model card is rewritten to describe what is pushed."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(
                folder,
                compact=compact,
                base_model=base_model,
                base_revision=base_revision,
                max_shard_size=max_shard_size,
            )
            marker = saved_marker(os.path.join(folder, "config.json"))
            if marker is not None and marker["source"] == "local":
                raise ValueError(
                    f"A compact checkpoint pushed to the Hub must rebuild its pre-trained bank from a shared base, but "
                    f"{marker['name_or_path']!r} is a local folder. Push that backbone first and pass "
                    "base_model='org/backbone' (the checksum guards the match), or push a full checkpoint."
                )
            api = HfApi()
            repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
            card = create_and_tag_model_card(repo_id, tags, token=token)
            for write_card in MODEL_CARD_WRITERS:
                card = write_card(self, folder, card, repo_id)
            card.save(os.path.join(folder, "README.md"))
            stale = FULL_WEIGHT_PATTERNS if compact else COMPACT_WEIGHT_PATTERNS
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message
                or ("Upload compact AdaFilter model" if compact else "Upload AdaFilter model"),
                commit_description=commit_description,
                token=token,
                revision=revision,
                create_pr=create_pr,
                delete_patterns=list(stale),
            )


def _load_full(load: Callable, path, *args, **kwargs):
    """transformers' `from_pretrained` of a full checkpoint, refusing one that lacks pre-trained-bank tensors:
    transformers would initialise them randomly, and training never updates the frozen bank to repair them."""
    wants_info = kwargs.pop("output_loading_info", False)
    model, info = load(path, *args, output_loading_info=True, **kwargs)
    missing = sorted(set(info["missing_keys"]) & set(model.frozen_parameter_names()))
    if missing:
        raise ValueError(
            f"The AdaFilter checkpoint {str(path)!r} lacks {len(missing)} tensor(s) of its frozen pre-trained bank "
            f"({missing[:3]}...), which would be random and which training never updates. The file is incomplete or "
            "was written by other code: save the model again, or load an intact checkpoint."
        )
    return (model, info) if wants_info else model
