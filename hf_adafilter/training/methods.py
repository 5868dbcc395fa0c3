"""Build the classifier for a training method, so AdaFilter and its baselines share one pipeline.

- `adafilter`: the backbone wrapped with gated filters (`AdaFilterForImageClassification.from_backbone`).
- `finetune`: standard fine-tuning, the plain transformers classifier with every weight trainable.
- `linear_probe`: only the new head trains; the backbone, its BatchNorm statistics included, stays fixed.
- `l2sp`: fine-tuning pulled towards the pre-trained weights (`l2sp.L2SPPenalty`, added by the trainer).
- `lora`: PEFT's LoRA on the layers AdaFilter gates, head and BatchNorms trained (`lora.apply_lora`).
- `bitfit`: only biases, norm affine parameters and the head train.
"""

from __future__ import annotations

import types

from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, PreTrainedModel

from ..baselines.l2sp import L2SPPenalty
from ..baselines.lora import apply_lora
from ..modeling.backbone_sources import resolve_backbone
from ..modeling.backbones import find_classifier_linear, get_family, set_batchnorm_momentum
from ..modeling.modeling_adafilter import AdaFilterForImageClassification
from .arguments import METHODS, AdaFilterArguments, BaselineArguments

# `TrainingArguments` defaults per method for a small labelled image dataset, applied where the user sets nothing.
# transformers' own (learning rate 5e-5, 3 epochs, batch 8, no warm-up) are made for transformer fine-tuning: with
# AdamW they barely move a CNN, and they freeze AdaFilter's gates. Chosen by benchmarks/transfer.py on validation
# (30 images per class, trained to convergence): the median of the learning rates it chose per task.
_CNN_SMALL_DATA = {
    "num_train_epochs": 30,
    "per_device_train_batch_size": 32,
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
}
TRAINING_DEFAULTS: dict[str, dict[str, float | int]] = {
    "adafilter": {**_CNN_SMALL_DATA, "learning_rate": 1e-3},
    "finetune": {**_CNN_SMALL_DATA, "learning_rate": 1e-3},
    "linear_probe": {**_CNN_SMALL_DATA, "learning_rate": 3e-3},
    "l2sp": {**_CNN_SMALL_DATA, "learning_rate": 1e-3},
    "lora": {**_CNN_SMALL_DATA, "learning_rate": 3e-3},
    "bitfit": {**_CNN_SMALL_DATA, "learning_rate": 3e-2},
}


def apply_training_defaults(training_args, method: str, given: set[str]) -> dict[str, float | int]:
    """Sets `TRAINING_DEFAULTS[method]` on `training_args` for every field not in `given` (the names the user
    set); returns what it set."""
    applied = {name: value for name, value in TRAINING_DEFAULTS[method].items() if name not in given}
    for name, value in applied.items():
        setattr(training_args, name, value)
    return applied


def load_image_processor(name_or_path: str, **hub_kwargs):
    return AutoImageProcessor.from_pretrained(resolve_backbone(name_or_path), **hub_kwargs)


def build_classifier(
    method: str,
    name_or_path: str,
    id2label: dict[int, str],
    adafilter_args: AdaFilterArguments | None = None,
    baseline_args: BaselineArguments | None = None,
    ignore_mismatched_sizes: bool = True,
    **hub_kwargs,
) -> nn.Module:
    """The model `method` trains, starting from the pretrained backbone (or an AdaFilter checkpoint) at
    `name_or_path`, with a head for `id2label`: a new one where the checkpoint's labels differ, unless
    `ignore_mismatched_sizes=False` (then that is an error). `hub_kwargs` (revision, cache_dir, token,
    trust_remote_code) reach every download. Ready to train: what it trains is trainable and nothing else, every
    BatchNorm at `adafilter_args.batchnorm_momentum` (for every method; None: the backbone's)."""
    adafilter_args = adafilter_args or AdaFilterArguments()
    model = _build_classifier(method, name_or_path, id2label, adafilter_args, baseline_args, ignore_mismatched_sizes,
                              hub_kwargs)  # fmt: skip
    momentum = adafilter_args.batchnorm_momentum
    return set_batchnorm_momentum(model, momentum) if momentum is not None else model


def _build_classifier(method, name_or_path, id2label, adafilter_args, baseline_args, ignore_mismatched_sizes,
                      hub_kwargs: dict) -> nn.Module:  # fmt: skip
    """`build_classifier` before the BatchNorm momentum is set."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}.")
    location = resolve_backbone(name_or_path)
    config = AutoConfig.from_pretrained(location, **hub_kwargs)
    label2id = {label: index for index, label in id2label.items()}
    if config.model_type == "adafilter":
        if method != "adafilter":
            raise ValueError(
                f"{name_or_path!r} is an AdaFilter checkpoint; it trains only with --method adafilter."
            )
        model = AdaFilterForImageClassification.from_pretrained(location, **hub_kwargs)
        if model.config.id2label == id2label:
            return model
        if not ignore_mismatched_sizes:
            raise ValueError(
                f"{name_or_path!r} was trained on labels {list(model.config.id2label.values())[:5]}..., the data has "
                f"{list(id2label.values())[:5]}...; pass --ignore_mismatched_sizes to train a new head on it."
            )
        return AdaFilterForImageClassification.from_pretrained(
            location, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=True, **hub_kwargs
        )
    get_family(config.model_type)  # a clear error for unsupported backbones, for every method alike
    if method == "adafilter":
        overrides = adafilter_args.model_overrides()
        downloads = {key: hub_kwargs.get(key) for key in ("revision", "cache_dir", "token")}
        model = AdaFilterForImageClassification.from_backbone(
            name_or_path, id2label=id2label, **downloads, **overrides
        )
        return model.train()
    model = AutoModelForImageClassification.from_pretrained(
        location,
        id2label=id2label,
        label2id=label2id,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
        **hub_kwargs,
    )
    get_family(model.config.model_type).prepare(model)
    if method == "linear_probe":
        freeze_all_but_head(model)
    elif method == "bitfit":
        freeze_all_but_biases_norms_head(model)
    elif method == "lora":
        args = baseline_args or BaselineArguments()
        return apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
    return model


def build_weight_penalty(
    method: str, model: nn.Module, baseline_args: BaselineArguments | None = None
) -> L2SPPenalty | None:
    """The penalty the trainer adds to the loss for `method` (L2-SP's), or None."""
    if method != "l2sp":
        return None
    args = baseline_args or BaselineArguments()
    return L2SPPenalty(model, classifier_head(model), args.l2sp_alpha, args.l2sp_beta)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each shared tensor once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def classifier_head(model: PreTrainedModel) -> nn.Linear:
    """The new linear head of a transformers image classifier."""
    head = find_classifier_linear(getattr(model, "classifier", None))
    if head is None:
        raise ValueError(f"{type(model).__name__} has no linear classification head.")
    return head


def freeze_all_but_biases_norms_head(model: PreTrainedModel) -> None:
    """BitFit (Ben Zaken et al., 2022; for CNNs with the norms, as TinyTL): every conv and linear weight stays as
    pretrained; biases, norm affine parameters (their running statistics adapt) and the head train."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    selected = {id(p) for p in classifier_head(model).parameters()}
    for module in model.modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if isinstance(module, norms) or parameter_name == "bias":
                selected.add(id(parameter))
    for parameter in model.parameters():  # what was frozen before (identity squeeze-excite) stays frozen
        parameter.requires_grad_(parameter.requires_grad and id(parameter) in selected)


def freeze_all_but_head(model: PreTrainedModel) -> None:
    """Linear probe: the head trains; the backbone's weights and BatchNorm statistics stay as pretrained."""
    head = classifier_head(model)
    model.requires_grad_(False)
    head.requires_grad_(True)
    backbone = model.base_model
    # The Trainer switches the model to train mode every step; keep the backbone's norms in eval mode.
    backbone.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), backbone)
    backbone.eval()
