"""One bank of an AdaFilter model as a plain transformers classifier, for deployment without gates.

Travels to the Hub as remote code: relative imports only, nothing beyond torch, transformers.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForImageClassification, PreTrainedModel

from .backbones import find_classifier_linear

BANKS = ("finetuned", "pretrained")


@torch.no_grad()
def plain_classifier_of_bank(model, bank: str) -> PreTrainedModel:
    """`AdaFilterForImageClassification.export_bank`: the backbone with each gated layer's chosen conv and norm
    (the fine-tuned bank's norm where it has its own) under the plain backbone's names, the ungated layers and the
    head as they are."""
    if bank not in BANKS:
        raise ValueError(f'export_bank takes "finetuned" or "pretrained", got {bank!r}.')
    adafilter = model.adafilter
    chosen = {}
    for name, layer in adafilter.gated_layers.items():
        finetuned = bank == "finetuned"
        chosen[f"{name}.base_layer"] = layer.finetuned_layer if finetuned else layer.base_layer
        if layer.base_norm is not None:
            own_norm = finetuned and layer.finetuned_norm is not None
            chosen[f"{name}.base_norm"] = layer.finetuned_norm if own_norm else layer.base_norm
    state = {
        adafilter.backbone_key(f"{module_name}.{key}"): tensor.detach().clone()
        for module_name, module in chosen.items()
        for key, tensor in module.state_dict().items()
    }
    gated = tuple(f"{name}." for name in adafilter.gated_layers)
    for key, tensor in adafilter.backbone.state_dict().items():
        if not key.startswith(gated):
            state[adafilter.backbone_key(key)] = tensor.detach().clone()
    config = copy.deepcopy(model.config.backbone_config)
    config.id2label, config.label2id = dict(model.config.id2label), dict(model.config.label2id)
    plain = AutoModelForImageClassification.from_config(config)
    plain.base_model.load_state_dict(state, strict=True)
    head = find_classifier_linear(getattr(plain, "classifier", None))
    head.load_state_dict(model.classifier.state_dict())
    return plain.eval()
