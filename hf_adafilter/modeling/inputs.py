"""What an AdaFilter model accepts: checks of `pixel_values` and `labels` that name the fix, before any compute.

Travels to the Hub as remote code: relative imports only, nothing beyond torch.
"""

from __future__ import annotations

import torch


def check_pixel_values(pixel_values: torch.Tensor | None, num_channels: int) -> None:
    if pixel_values is None:
        raise ValueError("AdaFilter models need `pixel_values` (batch, channels, height, width).")
    if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
        raise ValueError(
            f"pixel_values must have shape (batch, {num_channels}, height, width), got {tuple(pixel_values.shape)}. "
            "Convert images to RGB (e.g. `image.convert('RGB')`) and run them through the model's image processor."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values are {pixel_values.dtype}: run the images through the model's image processor, which "
            "returns normalised floats."
        )


def check_labels(labels: torch.Tensor, num_labels: int) -> None:
    if labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8) and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_labels:
            raise ValueError(
                f"labels must be class indices in [0, {num_labels - 1}], got values in [{low}, {high}]. "
                "Check the label column and config.num_labels / id2label."
            )
