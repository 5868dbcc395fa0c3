"""Predictions with the gates' answer beside the labels: how much of the network each image fine-tuned."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoImageProcessor

from ..metrics.gate_statistics import finetuned_fraction_per_example
from ..modeling.modeling_adafilter import AdaFilterForImageClassification


@torch.no_grad()
def classify_with_gate_fractions(
    model: AdaFilterForImageClassification,
    images: Sequence[Image.Image],
    image_processor=None,
    top_k: int = 5,
) -> list[dict]:
    """Per image: `labels`, the top-k `{"label", "score"}` as `pipeline("image-classification")` returns them, and
    `finetuned_fraction`, the share of the gated filters (each filter once) that used the fine-tuned bank for it.

    `image_processor` defaults to the one `from_backbone` attached, else the one saved with the model.
    """
    processor = image_processor or getattr(model, "image_processor", None)
    if processor is None:
        processor = AutoImageProcessor.from_pretrained(model.config.name_or_path)
    pixels = processor(images=list(images), return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    training = model.training
    try:
        outputs = model.eval()(pixel_values=pixels)
    finally:
        model.train(training)
    probabilities = outputs.logits.float().softmax(-1)
    fractions = finetuned_fraction_per_example(outputs.gates)
    results = []
    for row, fraction in zip(probabilities, fractions.tolist(), strict=True):
        scores, indices = row.topk(min(top_k, row.numel()))
        labels = [
            {"label": model.config.id2label[index], "score": score}
            for score, index in zip(scores.tolist(), indices.tolist(), strict=True)
        ]
        results.append({"labels": labels, "finetuned_fraction": fraction})
    return results
