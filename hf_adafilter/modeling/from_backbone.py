"""Wrapping a pretrained transformers backbone as an AdaFilter classifier (`from_backbone`): the config from the
backbone's, both banks loaded with its weights, its head and image processor kept where they fit.

Travels to the Hub as remote code: relative imports only, nothing beyond torch, transformers.
"""

from __future__ import annotations

import torch
from transformers import AutoImageProcessor, PreTrainedConfig, PreTrainedModel

from .backbone_sources import resolve_backbone
from .backbones import find_classifier_linear, get_family, load_supported_backbone
from .configuration_adafilter import AdaFilterConfig


def wrap_backbone(
    model_class: type[PreTrainedModel],
    backbone: str | PreTrainedModel,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    **config_overrides,
) -> PreTrainedModel:
    """`AdaFilterForImageClassification.from_backbone(backbone, ...)`: wraps a pretrained backbone. Both banks start
    as its weights, so the new model computes exactly what the backbone computes until training moves the fine-tuned
    bank.

    `backbone` is a model, a Hub id, a local path, or a packaged alias such as `"efficientnet-lite0"`. Without
    `num_labels` / `id2label` the backbone's own classification head and labels are kept. `revision`,
    `cache_dir` and `token` reach the backbone's download; `config_overrides` are `AdaFilterConfig` fields (an
    unknown key is an error).
    """
    downloads = {"revision": revision, "cache_dir": cache_dir, "token": token}
    source_model, name_or_path = load_supported_backbone(backbone, **downloads)
    base = source_model.base_model
    family = get_family(base.config.model_type)
    source_head = (
        find_classifier_linear(getattr(source_model, "classifier", None))
        if source_model is not base
        else None
    )
    if id2label is not None:
        id2label = {int(k): v for k, v in id2label.items()}
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels={num_labels} but id2label has {len(id2label)} entries.")
        num_labels = len(id2label)
    keep_head = num_labels is None and source_head is not None
    if num_labels is None:
        if source_head is None:
            raise ValueError(f"{name_or_path!r} has no classification head: pass num_labels= (or id2label=).")
        num_labels = source_head.out_features
        id2label = source_model.config.id2label
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}.")
    if id2label is not None:
        labels = {"id2label": id2label, "label2id": {label: index for index, label in id2label.items()}}
    else:
        labels = {"num_labels": num_labels}
    config = AdaFilterConfig(
        backbone_config=_backbone_config_dict(base.config),
        backbone_name_or_path=name_or_path,
        **labels,
        **config_overrides,
    )
    if config.classifier_dropout is None:
        config.classifier_dropout = float(family.classifier_dropout(base.config))
    model = model_class(config)
    model.adafilter.load_backbone_state_dict(base.state_dict())
    if keep_head:
        with torch.no_grad():
            model.classifier.weight.copy_(source_head.weight)
            model.classifier.bias.copy_(source_head.bias)
    # Saved with the model (`save_pretrained`); the Trainer's own processor, if any, is written after it.
    model.image_processor = _backbone_image_processor(source_model, name_or_path, **downloads)
    model.eval()
    return model


def _backbone_image_processor(source_model: PreTrainedModel, name_or_path: str | None, **hub_kwargs):
    """The backbone's image processor, or None where it has none (a model built in memory, a folder without one)."""
    location = name_or_path or source_model.config.name_or_path
    if not location:
        return None
    try:
        return AutoImageProcessor.from_pretrained(resolve_backbone(location), **hub_kwargs)
    except (OSError, ValueError):
        return None


def _backbone_config_dict(config: PreTrainedConfig) -> dict:
    """The backbone's architecture only: its labels and head belong to the AdaFilter config."""
    config_dict = config.to_dict()
    for key in (
        "id2label",
        "label2id",
        "architectures",
        "problem_type",
        "_name_or_path",
        "transformers_version",
    ):
        config_dict.pop(key, None)
    return config_dict
