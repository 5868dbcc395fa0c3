"""LoRA through PEFT on the layers AdaFilter gates, so the two adapt the same part of the backbone.

`apply_lora` wraps a transformers classifier with `peft.get_peft_model`: LoRA on the backbone's convs (and the
pointwise linears of channels-last families), the head and every BatchNorm trained in full (`modules_to_save`, so
they travel in the adapter with their running statistics). The saved adapter loads with
`PeftModel.from_pretrained(base_classifier, path)`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from ..modeling.backbones import find_gate_targets, get_family

logger = logging.getLogger(__name__)

PEFT_INSTALL = 'pip install "peft>=0.15" (in a checkout of hf_adafilter: pip install -e ".[baselines]")'
# The adapter-size settings most LoRA recipes start from.
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.0


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError(f"--method lora needs PEFT, which is not installed: {PEFT_INSTALL}") from None
    return peft


@dataclass(frozen=True)
class LoraTargets:
    """The layers LoRA adapts (full module names of the classifier), and those PEFT refused with its reason."""

    accepted: tuple[str, ...]
    refused: dict[str, str]


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer


def lora_targets(model: PreTrainedModel, r: int) -> LoraTargets:
    """AdaFilter's default gated layers of `model`'s backbone, each tried with PEFT on a copy of itself: PEFT
    refuses some (depthwise convs need a rank divisible by their groups), and those are left out."""
    peft = require_peft()
    family = get_family(model.config.model_type)
    prefix = model.base_model_prefix
    accepted, refused = [], {}
    verdicts: dict[tuple, str | None] = {}  # one probe per distinct layer shape
    for target in find_gate_targets(model.base_model, family):
        layer = target.module
        signature = (type(layer), getattr(layer, "groups", 1), getattr(layer, "weight", None).shape)
        if signature not in verdicts:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    peft.inject_adapter_in_model(
                        peft.LoraConfig(r=r, target_modules=["layer"]), _Holder(copy.deepcopy(layer))
                    )
                verdicts[signature] = None
            except (ValueError, TypeError, NotImplementedError) as error:
                verdicts[signature] = str(error).split(". ")[0]
        name = f"{prefix}.{target.name}"
        if verdicts[signature] is None:
            accepted.append(name)
        else:
            refused[name] = verdicts[signature]
    return LoraTargets(tuple(accepted), refused)


def apply_lora(
    model: PreTrainedModel, r: int = LORA_R, alpha: float = LORA_ALPHA, dropout: float = LORA_DROPOUT
) -> nn.Module:
    """`model` as a `PeftModel`: LoRA of rank `r` on `lora_targets(model, r)`, head and BatchNorms trainable."""
    peft = require_peft()
    targets = lora_targets(model, r)
    if targets.refused:
        logger.warning(
            f"LoRA skips {len(targets.refused)} of {len(targets.refused) + len(targets.accepted)} layers PEFT refuses "
            f"at r={r} (they stay frozen): {', '.join(targets.refused)}. PEFT's reason, e.g.: "
            f"{next(iter(targets.refused.values()))}."
        )
    if not targets.accepted:
        raise ValueError(f"PEFT refused every layer of {model.config.model_type} for LoRA at r={r}.")
    norms = [
        name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets.accepted),
        modules_to_save=["classifier", *norms],
    )
    with warnings.catch_warnings():  # grouped convs: "merging is not supported", irrelevant to training
        warnings.filterwarnings("ignore", message=".*groups > 1.*")
        return peft.get_peft_model(model, config)
