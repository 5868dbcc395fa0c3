"""Which modules of each backbone family get gated, and how.

Travels to the Hub as remote code: relative imports only, nothing beyond torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .backbone_sources import load_backbone
from .family_names import SUPPORTED_FAMILIES


@dataclass(frozen=True)
class BackboneFamily:
    """What AdaFilter needs to know about one transformers vision backbone family."""

    model_type: str
    # Regexes (full match on module names) left ungated by default: the stem and squeeze-excite convs.
    default_exclude: tuple[str, ...]
    # Conv attribute -> attribute of the BatchNorm (same parent) that normalises exactly its output.
    norm_after: Mapping[str, str] = field(default_factory=dict)
    # Size of the backbone's pooled feature vector.
    feature_size: Callable[[nn.Module], int] = lambda backbone: backbone.config.hidden_sizes[-1]
    # Dropout of the family's own classification head.
    classifier_dropout: Callable[[object], float] = lambda config: 0.0
    # Whether pointwise nn.Linear layers (channels-last convs) are gated too.
    gate_linear: bool = False
    # Fixes applied to a backbone before training: to a freshly built one before any layer is gated, and to the
    # baselines' pretrained classifier.
    prepare: Callable[[nn.Module], None] = lambda backbone: None
    # Stage ("stage1", ..., "head") of a module, for per-stage statistics like the paper's analysis.
    stage_of: Callable[[str, object], str] = lambda name, config: _stage_from_stages_index(name)
    # The classifier class transformers' Auto classes build for the family, where its `model_type` maps to several.
    classifier_architecture: str | None = None
    # Tensors of a source backbone that `prepare` leaves no place for (regexes, full match): ignored when loading.
    dropped_tensors: tuple[str, ...] = ()
    # The features the family's own classifier head reads, from the backbone's output.
    pool: Callable[[object], torch.Tensor] = lambda outputs: outputs.pooler_output.flatten(1)
    # Conv classes (by name) whose forward standardises the weight (per filter, with the module's `eps` and `pad`)
    # before `F.conv2d`: the fast paths replicate that.
    weight_standardized_convs: tuple[str, ...] = ()

    def drops_tensor(self, key: str) -> bool:
        """Whether a source backbone's tensor `key` is one `prepare` leaves no place for (`dropped_tensors`)."""
        return _fullmatch_any(self.dropped_tensors, key)


def _stage_from_stages_index(name: str) -> str:
    match = re.search(r"stages\.(\d+)\.", name)
    return f"stage{int(match.group(1)) + 1}" if match else "stem"


def _stage_from_block_counts(block_counts: Sequence[int], block_pattern: str, first_stage: int = 1):
    """Stage of the i-th block given how many blocks each stage has (families with a flat list of blocks)."""
    bounds = [sum(block_counts[: i + 1]) for i in range(len(block_counts))]

    def stage_of(name: str) -> str:
        match = re.search(block_pattern, name)
        if match is None:
            return "head" if "stem" not in name and "embed" not in name else "stem"
        block = int(match.group(1))
        return f"stage{first_stage + next(i for i, bound in enumerate(bounds) if block < bound)}"

    return stage_of


def _efficientnet_stage(name: str, config) -> str:
    counts = [int(math.ceil(config.depth_coefficient * repeats)) for repeats in config.num_block_repeats]
    return _stage_from_block_counts(counts, r"blocks\.(\d+)\.")(name)


# MobileNetV2's inverted-residual stages after the stem block (fixed by the architecture): 2, 3, 4, 3, 3, 1 blocks.
_MOBILENET_V2_STAGE_BLOCKS = (2, 3, 4, 3, 3, 1)


def _mobilenet_v2_stage(name: str, config) -> str:
    return _stage_from_block_counts(_MOBILENET_V2_STAGE_BLOCKS, r"^layer\.(\d+)\.", first_stage=2)(name)


def _block_stage(pattern: str) -> Callable[[str, object], str]:
    """Stage = block index + 1 (a vision transformer's blocks are its stages for the per-stage statistics)."""

    def stage_of(name: str, config) -> str:
        match = re.search(pattern, name)
        return f"stage{int(match.group(1)) + 1}" if match else ("stem" if "embeddings" in name else "head")

    return stage_of


def _class_token(outputs) -> torch.Tensor:
    """ViT's and DeiT's classifiers read the (final-norm) class token."""
    return outputs.last_hidden_state[:, 0]


def _class_and_mean_patch_tokens(outputs) -> torch.Tensor:
    """DINOv2's classifier reads the class token beside the mean of the patch tokens."""
    tokens = outputs.last_hidden_state
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)


def _drop_unused_pooler(model: nn.Module) -> None:
    """ViT's and DeiT's backbones build a pooler (dense + tanh on the class token) that their classifiers never
    read and pretrained classifiers do not carry: without it, nothing random or unused is left in the model."""
    for module in model.modules():
        if type(module).__name__ in ("ViTModel", "DeiTModel"):
            module.pooler = None


# A vision transformer's gated layers by default: its MLP linears (attention projections behind target_modules).
_TRANSFORMER_EXCLUDE = (r"embeddings\..*", r".*\.attention\..*")


def set_batchnorm_momentum(model: nn.Module, momentum: float | None) -> nn.Module:
    """Every BatchNorm's running-statistics momentum (PyTorch meaning). Norms kept in eval mode (the linear probe's
    backbone) never update their statistics, so they are unaffected."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return model


def freeze_identity_squeeze_excite(model: nn.Module) -> None:
    """Backbones without squeeze-excite (EfficientNet-Lite) carry HF SE blocks made an exact identity; they are
    no parameters of the real network, so no method may train them (weight decay would erode the identity)."""
    for name, module in model.named_modules():
        if name.endswith("squeeze_excite") and _is_identity_squeeze_excite(module):
            module.requires_grad_(False)


def _is_identity_squeeze_excite(module: nn.Module) -> bool:
    reduce, expand = getattr(module, "reduce", None), getattr(module, "expand", None)
    if reduce is None or expand is None or reduce.weight.is_meta:  # no values yet (a skeleton being built)
        return False
    return bool(
        (reduce.weight == 0).all() and (expand.weight == 0).all() and torch.sigmoid(expand.bias).eq(1).all()
    )


def global_pooling(model: nn.Module) -> nn.Module:
    """transformers' EfficientNet pools with `nn.AvgPool2d(config.hidden_dim, ceil_mode=True)` (a 1280-wide window
    for a 4x4 map): the same numbers as a global mean in eager mode, but `torch.compile` (inductor) lowers it to a
    loop over the whole 1280 x 1280 window, slower than all the rest of the model (`speed.py --compile`). An
    adaptive pool of output 1 is that global mean exactly (for maps no larger than the window), so it replaces the
    pooler."""
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] != "pooler" or not isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        global_pool = nn.AdaptiveAvgPool2d(1) if isinstance(module, nn.AvgPool2d) else nn.AdaptiveMaxPool2d(1)
        parent.pooler = global_pool
    return model


def _prepare_efficientnet(model: nn.Module) -> nn.Module:
    """Momentum made uniform, the pooler a global pool, and the identity squeeze-excite of EfficientNet-Lite frozen
    (once weights are in).

    transformers builds EfficientNet's expansion BatchNorm without `momentum=config.batch_norm_momentum`, so those
    layers keep PyTorch's 0.1 (ten times the 0.01 of all the others) and forget their statistics when fine-tuned.
    """
    freeze_identity_squeeze_excite(
        global_pooling(set_batchnorm_momentum(model, model.config.batch_norm_momentum))
    )
    return model


FAMILIES: dict[str, BackboneFamily] = {
    family.model_type: family
    for family in (
        BackboneFamily(
            model_type="resnet",
            default_exclude=(r"embedder\..*",),
            norm_after={"convolution": "normalization"},
        ),
        BackboneFamily(
            model_type="efficientnet",
            default_exclude=(r"embeddings\..*", r".*\.squeeze_excite\..*"),
            norm_after={
                "expand_conv": "expand_bn",
                "depthwise_conv": "depthwise_norm",
                "project_conv": "project_bn",
                "top_conv": "top_bn",
                "convolution": "batchnorm",
            },
            feature_size=lambda backbone: backbone.encoder.top_conv.out_channels,
            classifier_dropout=lambda config: config.dropout_rate,
            prepare=_prepare_efficientnet,
            stage_of=_efficientnet_stage,
        ),
        BackboneFamily(
            model_type="convnext",
            default_exclude=(r"embeddings\..*",),
            gate_linear=True,
        ),
        BackboneFamily(
            model_type="regnet",
            default_exclude=(r"embedder\..*", r".*\.attention\.\d+"),
            norm_after={"convolution": "normalization"},
        ),
        BackboneFamily(
            model_type="mobilenet_v2",
            default_exclude=(r"conv_stem\..*",),
            norm_after={"convolution": "normalization"},
            feature_size=lambda backbone: backbone.conv_1x1.convolution.out_channels,
            classifier_dropout=lambda config: config.classifier_dropout_prob,
            stage_of=_mobilenet_v2_stage,
        ),
        BackboneFamily(
            model_type="bit",
            default_exclude=(r"embedder\..*",),
            weight_standardized_convs=("WeightStandardizedConv2d",),
        ),
        *(
            BackboneFamily(
                model_type=model_type,
                default_exclude=_TRANSFORMER_EXCLUDE,
                gate_linear=True,
                feature_size=lambda backbone: backbone.config.hidden_size,
                prepare=_drop_unused_pooler,
                dropped_tensors=(r"pooler\..*",),
                stage_of=_block_stage(r"layers\.(\d+)\."),
                pool=_class_token,
                classifier_architecture=architecture,
            )
            # DeiT's distilled classifier (with teacher) averages two heads; the plain one reads the class token.
            for model_type, architecture in (("vit", None), ("deit", "DeiTForImageClassification"))
        ),
        BackboneFamily(
            model_type="dinov2",
            default_exclude=_TRANSFORMER_EXCLUDE,
            gate_linear=True,
            feature_size=lambda backbone: 2 * backbone.config.hidden_size,
            stage_of=_block_stage(r"encoder\.layer\.(\d+)\."),
            pool=_class_and_mean_patch_tokens,
        ),
        BackboneFamily(
            model_type="swin",
            default_exclude=(*_TRANSFORMER_EXCLUDE, r".*\.downsample\..*"),
            gate_linear=True,
            feature_size=lambda backbone: backbone.num_features,
            stage_of=_block_stage(r"encoder\.layers\.(\d+)\."),
        ),
    )
}
if tuple(FAMILIES) != SUPPORTED_FAMILIES:
    raise ImportError(f"backbones.FAMILIES {tuple(FAMILIES)} and family_names.SUPPORTED_FAMILIES disagree")


def weight_standardization_eps(module: nn.Module) -> float | None:
    """The `eps` of a family's weight-standardised conv, None for any other module: what the model hands each
    gated layer when it builds it (the kernels know no families)."""
    name = type(module).__name__
    if any(name in family.weight_standardized_convs for family in FAMILIES.values()):
        return float(module.eps)
    return None


def get_family(model_type: str) -> BackboneFamily:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"Backbone model_type {model_type!r} is not supported by AdaFilter. "
            f"Supported backbone families: {', '.join(SUPPORTED_FAMILIES)}."
        ) from None


@dataclass
class GateTarget:
    """One module to gate, with the BatchNorm that directly follows it (if any)."""

    name: str
    parent: nn.Module
    attribute: str
    module: nn.Module
    norm_name: str | None = None


def _fullmatch_any(patterns: Sequence[str], name: str) -> bool:
    return any(re.fullmatch(pattern, name) for pattern in patterns)


def _is_gateable(module: nn.Module, family: BackboneFamily) -> bool:
    return isinstance(module, nn.Conv2d) or (family.gate_linear and isinstance(module, nn.Linear))


def find_gate_targets(
    backbone: nn.Module,
    family: BackboneFamily,
    target_modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] | None = None,
) -> list[GateTarget]:
    """Walks the backbone in registration order (as PEFT injects adapters) and picks the layers to gate."""
    modules = dict(backbone.named_modules())
    targets = []
    for name, module in modules.items():
        if not name:
            continue
        if target_modules is not None:
            if not _fullmatch_any(target_modules, name):
                continue
            if not _is_gateable(module, family):
                raise ValueError(
                    f"target_modules matched {name!r}, a {type(module).__name__}; AdaFilter gates only "
                    f"nn.Conv2d{' and nn.Linear' if family.gate_linear else ''} layers of a {family.model_type} "
                    "backbone. Narrow the regex."
                )
        elif not _is_gateable(module, family) or _fullmatch_any(family.default_exclude, name):
            continue
        if exclude_modules and _fullmatch_any(exclude_modules, name):
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = modules[parent_name]
        targets.append(
            GateTarget(name, parent, attribute, module, _following_norm(parent, attribute, module, family))
        )
    if not targets:
        examples = [n for n, m in modules.items() if _is_gateable(m, family)][:5]
        raise ValueError(
            f"No {family.model_type} layer matched target_modules={list(target_modules or [])!r} "
            f"(exclude_modules={list(exclude_modules or [])!r}). Gateable layers look like: {examples}."
        )
    return targets


def _following_norm(
    parent: nn.Module, attribute: str, module: nn.Module, family: BackboneFamily
) -> str | None:
    norm_attribute = family.norm_after.get(attribute)
    if norm_attribute is None:
        return None
    norm = getattr(parent, norm_attribute, None)
    if isinstance(norm, nn.BatchNorm2d) and norm.num_features == module.out_channels:
        return norm_attribute
    return None


def find_classifier_linear(classifier: nn.Module | None) -> nn.Linear | None:
    """The Linear inside a family's classification head (some wrap it with Flatten or Dropout)."""
    if classifier is None:
        return None
    if isinstance(classifier, nn.Linear):
        return classifier
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if len(linears) == 1 else None


def load_supported_backbone(backbone, **kwargs):
    """`backbone_sources.load_backbone`, refusing a family AdaFilter does not support before any weights are read."""
    return load_backbone(backbone, check_config=lambda config: get_family(config.model_type), **kwargs)
