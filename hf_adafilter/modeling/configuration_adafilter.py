"""AdaFilter configuration.

Travels to the Hub as remote code: relative imports only, nothing beyond transformers.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields
from typing import Any, ClassVar

from transformers import AutoConfig, GenerationConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

from .family_names import SUPPORTED_FAMILIES

logger = logging.get_logger(__name__)

GATE_NETWORKS = ("lstm", "gru", "independent")
# How gated layers compute (layers.GATED_FORWARDS): all give the same outputs up to float rounding.
GATED_IMPLEMENTATIONS = ("reference", "fused", "merged", "auto")
# How inference validates its folded copy of the banks (gated_inference.FoldedBanks).
FOLDED_WEIGHTS_CHECKS = ("content", "version")
# Refused before anything is allocated: an LSTM of this width already holds ~4 * 4096^2 weights per matrix pair.
MAX_GATE_SIZE = 4096


class AdaFilterConfig(PreTrainedConfig):
    r"""
    Configuration of an AdaFilter model: a CNN backbone whose selected layers keep two filter banks (the frozen
    pre-trained filters and a trainable copy) mixed per example and per output filter by a recurrent gate network.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Full config of the wrapped backbone (its `model_type` picks the family). Defaults to a ResNet-50-shaped
            `ResNetConfig`, the paper's backbone. Never pass `backbone=`: that makes transformers contact the Hub;
            use `AdaFilterForImageClassification.from_backbone` to start from pretrained weights.
        backbone_name_or_path (`str`, *optional*):
            Where the pretrained backbone came from (Hub id, local path or a packaged alias). Recorded for model cards
            and compact checkpoints; not used to build the model.
        gate_network (`str`, *optional*, defaults to `"lstm"`):
            `"lstm"` (the paper's recurrent gate network), `"gru"`, or `"independent"` (the paper's no-RNN ablation:
            every layer decides from its own input only).
        gate_input_size (`int`, *optional*, defaults to 64):
            Size the pooled input of every gated layer is projected to before it enters the recurrent cell.
        gate_hidden_size (`int`, *optional*, defaults to 64):
            Hidden size of the shared recurrent cell.
        gumbel_temperature (`float`, *optional*, defaults to 1.0):
            Initial temperature of the straight-through Gumbel-softmax used in training (annealed by the trainer).
        gate_init_log_odds (`float`, *optional*, defaults to 0.0):
            Initial bias of every gate head, i.e. every filter's learnable prior log-odds of using the fine-tuned
            bank. The paper's zero makes training decisions fair coin flips that the gates cannot leave in a short
            run; a negative prior starts from the pre-trained filters, and each filter moves to the fine-tuned bank
            only where the task loss asks for it.
        gated_norm (`bool`, *optional*, defaults to `True`):
            Normalise the two banks by separate BatchNorms before mixing (the paper's gated batch norm). `False` is
            the paper's ablation: one BatchNorm after mixing.
        target_modules (`str` or `list[str]`, *optional*):
            Regexes (full match on backbone module names) of the convolutions / linears to gate. `None` uses the
            family default: every conv except the stem and squeeze-excite.
        exclude_modules (`str` or `list[str]`, *optional*):
            Regexes of modules never to gate, applied after `target_modules`.
        classifier_dropout (`float`, *optional*):
            Dropout before the classification head; `None` takes the backbone family's own classifier dropout.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initialisation of the gate network and head.
        gated_implementation (`str`, *optional*, defaults to `"auto"`):
            How the gated layers compute, like transformers' `attn_implementation`: `"reference"` (the definition,
            module by module), `"fused"`, `"merged"` or `"auto"` (fast paths; see `layers.apply_gated_implementation`).
            Change it on a built model with `model.set_gated_implementation(name)`.
        folded_weights_check (`str`, *optional*, defaults to `"content"`):
            How inference knows its cached copy of the banks with their BatchNorms folded in is current.
            `"content"` compares an exact checksum of every tensor the copy is computed from on each call, so any
            edit is seen, also through `.data` (which PyTorch's version counters do not record). `"version"` trusts
            the version counters and skips that read of the weights: for serving a model nobody edits through
            `.data`.
        compact_base (`dict`, *optional*):
            Set only in the `config.json` of a compact checkpoint (`save_pretrained(..., compact=True)`), which stores
            what training changed but not the frozen pre-trained bank: where that bank is rebuilt from and its
            checksum, `{"name_or_path", "revision", "source", "sha256", "dtype"}`. `None` for full checkpoints.
    """

    model_type = "adafilter"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet")}
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["gates", "gate_probs", "hidden_states"]

    backbone_config: dict | PreTrainedConfig | None = None
    backbone_name_or_path: str | None = None
    gate_network: str = "lstm"
    gate_input_size: int = 64
    gate_hidden_size: int = 64
    gumbel_temperature: float | int = 1.0
    gate_init_log_odds: float | int = 0.0
    gated_norm: bool = True
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    classifier_dropout: float | int | None = None
    initializer_range: float | int = 0.02
    gated_implementation: str = "auto"
    folded_weights_check: str = "content"
    compact_base: dict | None = None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        """A saved config may hold keys this version does not know (written by a newer version or another tool, or
        set by a user before saving, `config.dataset_name = ...`): they are kept as attributes, as transformers
        keeps them, so they survive the next save, with one warning naming them. Keys passed in code
        (`AdaFilterConfig.from_pretrained(path, gate_hiden_size=8)`) are still checked, with the closest field
        suggested; through a model's `from_pretrained` they reach the model's `__init__`, which checks them."""
        if not kwargs.get("return_unused_kwargs"):  # with it (a model's from_pretrained), the model checks the rest
            check_known_keys({key: value for key, value in kwargs.items() if key not in _FROM_DICT_KWARGS})
        config_dict = dict(config_dict)
        unknown = {key: config_dict.pop(key) for key in _unknown_keys(config_dict)}
        if unknown:
            logger.warning_once(
                f"AdaFilterConfig: keeping keys this version does not use, as they were saved: {sorted(unknown)}"
            )
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        for key, value in unknown.items():
            setattr(config, key, value)
        return loaded

    def __post_init__(self, **kwargs: Any) -> None:
        if kwargs.get("backbone") is not None:
            raise ValueError(
                "AdaFilterConfig does not take `backbone=` (transformers would contact the Hub to resolve it). "
                "Pass `backbone_config=`, or build from pretrained weights with "
                "`AdaFilterForImageClassification.from_backbone(name_or_path)`."
            )
        check_known_keys(kwargs)
        # Before transformers builds `id2label` for `num_labels` or the backbone config: both can be huge.
        backbone = self.backbone_config if isinstance(self.backbone_config, dict) else {}
        _check_sizes(kwargs.get("num_labels") or len(kwargs.get("id2label") or {}), backbone)
        if isinstance(self.backbone_config, dict):
            if "model_type" not in self.backbone_config:
                raise ValueError(
                    "AdaFilterConfig.backbone_config needs a `model_type` key; one of: "
                    + ", ".join(SUPPORTED_FAMILIES)
                )
            _check_family(self.backbone_config["model_type"])  # before transformers looks the name up
        super().__post_init__(**kwargs)
        self._validate_adafilter_fields()

    def _validate_adafilter_fields(self) -> None:
        _check_family(self.backbone_config.model_type)
        _check_sizes(self.num_labels, self.backbone_config.to_dict())
        if self.gate_network not in GATE_NETWORKS:
            raise ValueError(
                f"AdaFilterConfig.gate_network must be one of {', '.join(map(repr, GATE_NETWORKS))}, "
                f"got {self.gate_network!r}."
            )
        if self.gated_implementation not in GATED_IMPLEMENTATIONS:
            raise ValueError(
                f"AdaFilterConfig.gated_implementation must be one of {', '.join(map(repr, GATED_IMPLEMENTATIONS))}, "
                f"got {self.gated_implementation!r}."
            )
        if self.folded_weights_check not in FOLDED_WEIGHTS_CHECKS:
            raise ValueError(
                f"AdaFilterConfig.folded_weights_check must be one of {', '.join(map(repr, FOLDED_WEIGHTS_CHECKS))}, "
                f"got {self.folded_weights_check!r}."
            )
        for name in ("gate_input_size", "gate_hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_GATE_SIZE:
                raise ValueError(
                    f"AdaFilterConfig.{name} must be an integer in [1, {MAX_GATE_SIZE}], got {value!r} (the gate "
                    "network is a small controller: the paper uses tens of units)."
                )
        self.gumbel_temperature = _positive_float("gumbel_temperature", self.gumbel_temperature)
        self.initializer_range = _positive_float("initializer_range", self.initializer_range)
        self.gate_init_log_odds = _float("gate_init_log_odds", self.gate_init_log_odds)
        if self.classifier_dropout is not None:
            dropout = _float("classifier_dropout", self.classifier_dropout)
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"AdaFilterConfig.classifier_dropout must be in [0, 1), got {dropout!r}.")
            self.classifier_dropout = dropout
        if not isinstance(self.gated_norm, bool):
            raise ValueError(f"AdaFilterConfig.gated_norm must be True or False, got {self.gated_norm!r}.")
        for name in ("target_modules", "exclude_modules"):
            setattr(self, name, _regex_list(name, getattr(self, name)))
        _check_compact_base(self.compact_base)


# Sizes refused before anything is allocated, unless ALLOW_LARGE_CONFIGS is set: a config.json with
# `num_labels: 100000000` or `depths: [100000, 1]` would otherwise take gigabytes before anything failed.
MAX_LABELS = 100_000
MAX_WIDTH = 16_384  # any channel count, hidden size or embedding size of the backbone
MAX_BLOCKS = 1_000  # blocks of the backbone (the sum of its per-stage depths)
MAX_COEFFICIENT = 16.0  # EfficientNet's width / depth coefficients, MobileNetV2's depth multiplier
ALLOW_LARGE_CONFIGS = "HF_ADAFILTER_ALLOW_LARGE_CONFIGS"
_WIDTH_KEYS = ("hidden_sizes", "hidden_size", "hidden_dim", "embedding_size", "in_channels", "out_channels",
               "groups_width", "num_channels", "intermediate_size", "embed_dim")
_BLOCK_KEYS = ("depths", "num_block_repeats", "num_hidden_layers")
_COEFFICIENT_KEYS = ("width_coefficient", "depth_coefficient", "depth_multiplier")


def _check_sizes(num_labels: Any, backbone: dict[str, Any]) -> None:
    if os.environ.get(ALLOW_LARGE_CONFIGS, "") not in ("", "0"):
        return
    problems = []
    if isinstance(num_labels, int) and num_labels > MAX_LABELS:
        problems.append(f"num_labels {num_labels} > {MAX_LABELS}")
    for key in _WIDTH_KEYS:
        values = _ints(backbone.get(key))
        if values and max(values) > MAX_WIDTH:
            problems.append(f"backbone {key} {max(values)} > {MAX_WIDTH}")
    for key in _BLOCK_KEYS:
        values = _ints(backbone.get(key))
        if values and sum(values) > MAX_BLOCKS:
            problems.append(f"backbone {key} summing to {sum(values)} blocks > {MAX_BLOCKS}")
    for key in _COEFFICIENT_KEYS:
        value = backbone.get(key)
        if isinstance(value, int | float) and value > MAX_COEFFICIENT:
            problems.append(f"backbone {key} {value} > {MAX_COEFFICIENT}")
    if problems:
        raise ValueError(
            f"AdaFilterConfig refuses sizes that would allocate far more memory than any CNN backbone needs: "
            f"{'; '.join(problems)}. Fix the config.json, or set {ALLOW_LARGE_CONFIGS}=1 if the sizes are meant."
        )


def _ints(value: Any) -> list[int]:
    values = value if isinstance(value, list | tuple) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


# Keys transformers itself writes into a config.json or passes when building a config, beyond the dataclass fields.
_TRANSFORMERS_KEYS = frozenset(
    {"auto_map", "model_type", "num_labels", "torch_dtype", "use_cache", "name_or_path", "attn_implementation",
     "experts_implementation", "output_attentions", "tie_word_embeddings", "rope_scaling", "rope_theta"}
)  # fmt: skip
# Download settings belong to `from_pretrained` / `from_backbone`, never to the config.
_HUB_KEYS = frozenset({"revision", "cache_dir", "token", "force_download", "local_files_only", "proxies", "subfolder",
                       "trust_remote_code"})  # fmt: skip


# What `from_pretrained` hands `from_dict` besides the user's own keyword arguments.
_FROM_DICT_KWARGS = frozenset(
    {"return_unused_kwargs", "_from_auto", "_from_pipeline", "dtype", "torch_dtype", "gguf_file"}
)


def _unknown_keys(keys: Any) -> list[str]:
    known = {f.name for f in fields(AdaFilterConfig)} | _TRANSFORMERS_KEYS
    known |= set(GenerationConfig._get_default_generation_params())  # transformers drops these itself
    return sorted(k for k in keys if k not in known and not k.startswith("_"))


def check_known_keys(kwargs: dict[str, Any]) -> None:
    """A misspelt field (`gate_hiden_size=8`) or a download setting passed in code would otherwise become a silent
    attribute."""
    unknown = _unknown_keys(kwargs)
    if not unknown:
        return
    key = unknown[0]
    if key in _HUB_KEYS:
        hint = f"`{key}` is a download setting: pass it to `from_pretrained` / `from_backbone`, not to the config"
    else:
        close = difflib.get_close_matches(key, [f.name for f in fields(AdaFilterConfig)], n=1)
        hint = f"did you mean `{close[0]}`?" if close else "see `help(AdaFilterConfig)` for the fields"
    raise ValueError(f"AdaFilterConfig got unknown key(s) {', '.join(map(repr, unknown))}: {hint}.")


def _check_family(model_type: Any) -> None:
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"AdaFilterConfig.backbone_config has model_type {model_type!r}, which AdaFilter does not support. "
            f"Supported backbone families: {', '.join(SUPPORTED_FAMILIES)}."
        )


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"AdaFilterConfig.{name} must be a number, got {value!r}.")
    return float(value)


def _positive_float(name: str, value: Any) -> float:
    value = _float(name, value)
    if not value > 0:
        raise ValueError(f"AdaFilterConfig.{name} must be > 0, got {value!r}.")
    return value


COMPACT_BASE_SOURCES = ("hub", "packaged", "local")


def _check_compact_base(value: Any) -> None:
    """A hand-edited or truncated marker must fail here, not as a confusing error halfway through loading."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ValueError(f"AdaFilterConfig.compact_base must be a dict or None, got {value!r}.")
    name, sha256 = value.get("name_or_path"), value.get("sha256")
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"AdaFilterConfig.compact_base['name_or_path'] must name the base backbone, got {name!r}."
        )
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(
            f"AdaFilterConfig.compact_base['sha256'] must be a sha256 hex digest, got {sha256!r}."
        )
    if value.get("source") not in COMPACT_BASE_SOURCES:
        raise ValueError(
            f"AdaFilterConfig.compact_base['source'] must be one of {', '.join(COMPACT_BASE_SOURCES)}, "
            f"got {value.get('source')!r}."
        )
    for key in ("revision", "dtype"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise ValueError(
                f"AdaFilterConfig.compact_base[{key!r}] must be a string or None, got {value[key]!r}."
            )


def _regex_list(name: str, value: Any) -> list[str] | None:
    """Normalises to a list (so the JSON round trip is exact) and compiles each pattern to fail early."""
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"AdaFilterConfig.{name} must be a regex string or a list of them, got {value!r}.")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"AdaFilterConfig.{name} has an invalid regex {pattern!r}: {error}.") from None
    return list(patterns)


__all__ = ["AdaFilterConfig"]
