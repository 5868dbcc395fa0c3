"""An AdaFilter model as a plain transformers classifier, for deployment without gates: one bank everywhere
(`export_bank`), or each filter fixed to the bank most calibration images chose (`export_static`).

Travels to the Hub as remote code: relative imports only, nothing beyond torch, transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from transformers import AutoModelForImageClassification, PreTrainedModel

from .backbones import find_classifier_linear

BANKS = ("finetuned", "pretrained")


@torch.no_grad()
def plain_classifier_of_bank(model, bank: str) -> PreTrainedModel:
    """`AdaFilterForImageClassification.export_bank`: every filter from `bank`."""
    if bank not in BANKS:
        raise ValueError(f'export_bank takes "finetuned" or "pretrained", got {bank!r}.')
    layers = model.adafilter.gated_layers
    value = bank == "finetuned"
    return plain_classifier(model, {name: _full(layer.out_channels, value) for name, layer in layers.items()})


@torch.no_grad()
def plain_classifier(model, choices: Mapping[str, torch.Tensor]) -> PreTrainedModel:
    """The backbone with each gated layer's filters taken from the fine-tuned bank where `choices[name]` is True and
    from the pre-trained bank elsewhere, each filter with its own bank's norm channel (BatchNorm in eval mode is
    per-channel, so this computes exactly the AdaFilter model with those gates), under the plain backbone's names;
    the ungated layers and the head as they are."""
    adafilter, state = model.adafilter, {}
    for name, layer in adafilter.gated_layers.items():
        choice = choices[name].to(torch.bool)
        pairs = [("base_layer", layer.finetuned_layer, layer.base_layer)]
        if layer.base_norm is not None:
            own_norm = layer.finetuned_norm if layer.finetuned_norm is not None else layer.base_norm
            pairs.append(("base_norm", own_norm, layer.base_norm))
        for slot, finetuned, pretrained in pairs:
            pretrained_state = pretrained.state_dict()
            for key, tensor in finetuned.state_dict().items():
                state[adafilter.backbone_key(f"{name}.{slot}.{key}")] = _per_filter(
                    choice, tensor, pretrained_state[key]
                )
    gated = tuple(f"{name}." for name in adafilter.gated_layers)
    for key, tensor in adafilter.backbone.state_dict().items():
        if not key.startswith(gated):
            state[adafilter.backbone_key(key)] = tensor.detach().clone()
    config = copy.deepcopy(model.config.backbone_config)
    config.id2label, config.label2id = dict(model.config.id2label), dict(model.config.label2id)
    if adafilter.family.classifier_architecture is not None:
        config.architectures = [adafilter.family.classifier_architecture]
    plain = AutoModelForImageClassification.from_config(config)
    plain.base_model.load_state_dict(state, strict=True)
    head = find_classifier_linear(getattr(plain, "classifier", None))
    head.load_state_dict(model.classifier.state_dict())
    return plain.eval()


@torch.no_grad()
def static_classifier(model, calibration: torch.Tensor | Iterable[torch.Tensor]) -> PreTrainedModel:
    """`AdaFilterForImageClassification.export_static`: each filter fixed to the bank the majority of its
    decisions chose over the calibration images (ties: the fine-tuned bank). The returned model's
    `config.adafilter_static` records, per gated layer, the choice of each filter (a string of 0 and 1, 1 = the
    fine-tuned bank) and the agreement: the share of the calibration decisions the fixed choice reproduces."""
    batches = [calibration] if isinstance(calibration, torch.Tensor) else calibration
    totals, images = None, 0
    training = model.training
    model.eval()
    try:
        for pixel_values in batches:
            gates = model(pixel_values=pixel_values).gates
            sums = [g.double().sum(0) for g in gates]
            totals = sums if totals is None else [t + s for t, s in zip(totals, sums, strict=True)]
            images += pixel_values.shape[0]
    finally:
        model.train(training)
    if not images:
        raise ValueError("export_static needs calibration images: pass pixel_values, or an iterable of batches.")
    names = model.gated_layer_names
    shares = {name: total / images for name, total in zip(names, totals, strict=True)}
    choices = {name: share >= 0.5 for name, share in shares.items()}
    layers = {
        name: {
            "filters": "".join("1" if chosen else "0" for chosen in choices[name].tolist()),
            "agreement": float(torch.maximum(share, 1 - share).mean()),
        }
        for name, share in shares.items()
    }
    filters = sum(share.numel() for share in shares.values())
    plain = plain_classifier(model, choices)
    plain.config.adafilter_static = {
        "calibration_images": images,
        "agreement": sum(float(torch.maximum(s, 1 - s).sum()) for s in shares.values()) / filters,
        "finetuned_fraction": sum(int(c.sum()) for c in choices.values()) / filters,
        "layers": layers,
    }
    return plain


def _full(channels: int, value: bool) -> torch.Tensor:
    return torch.full((channels,), value, dtype=torch.bool)


def _per_filter(choice: torch.Tensor, finetuned: torch.Tensor, pretrained: torch.Tensor) -> torch.Tensor:
    """Filter / channel i (dim 0) from `finetuned` where `choice[i]`, else from `pretrained`; tensors without a
    filter dimension (a BatchNorm's batch counter) from the pre-trained bank."""
    if finetuned.ndim == 0 or finetuned.shape[0] != choice.shape[0]:
        return pretrained.detach().clone()
    mask = choice.to(finetuned.device).view(-1, *([1] * (finetuned.ndim - 1)))
    return torch.where(mask, finetuned, pretrained).detach().clone()
