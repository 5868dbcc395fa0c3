"""Image transforms without torchvision: evaluation is the backbone's own image processor (transformers' PIL
backend); training takes random resized crops and flips drawn from torch's RNG (so `transformers.set_seed` makes
training reproducible and DataLoader workers get distinct streams) to the processor's output size and normalises
as it does; and the collate function.

Typical use::

    train_tf, eval_tf = build_transforms(image_processor, image_column=data.image_column,
                                         label_column=data.label_column)
    train_ds = data.train.with_transform(train_tf)
    # Trainer(..., args=TrainingArguments(..., remove_unused_columns=False), data_collator=collate_fn)

The Trainer must be given `remove_unused_columns=False`: otherwise it drops the image and label columns (they are
not arguments of the model's `forward`) before `with_transform` sees them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from .errors import DataError
from .images import decode_image, to_rgb

RANDOM_RESIZED_CROP_SCALE = (0.08, 1.0)
RANDOM_RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
PROBE_SIZE = 1024  # the square image `output_size` shows a processor: above any crop or warp size in use


@dataclass(frozen=True)
class Preprocessing:
    """What training reads of an image processor, resolved once.

    Training takes a random resized crop straight to `crop_size` (the processor's output size) with `resample`.
    Pixels (0..255) become `pixel * scale + shift` per channel, one affine map folding the processor's rescale,
    offset and normalisation.
    """

    crop_size: tuple[int, int]
    resample: int
    scale: tuple[float, float, float]
    shift: tuple[float, float, float]


def resolve_preprocessing(image_processor: Any) -> Preprocessing:
    """Read a transformers image processor's output size (what it makes of a square image: its crop, or its warp),
    resampling filter and normalisation."""
    scale, shift = _normalisation(image_processor)
    return Preprocessing(
        crop_size=output_size(image_processor),
        resample=_pil_resample(getattr(image_processor, "resample", None)),
        scale=scale,
        shift=shift,
    )


def output_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) of what `image_processor` makes of a square image, by asking it (each processor class has its
    own rules: crop_pct, warps above a size, ...)."""
    probe = PIL.Image.new("RGB", (PROBE_SIZE, PROBE_SIZE))
    pixels = image_processor(images=probe, return_tensors="np", **square_crop(image_processor))["pixel_values"]
    return int(pixels.shape[-2]), int(pixels.shape[-1])


def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value else None


def square_crop(image_processor: Any) -> dict[str, Any]:
    """Overrides for a processor that keeps the aspect ratio and crops nothing (its outputs would not stack): the
    center square of the resized image, as a batch needs."""
    size = getattr(image_processor, "size", None)
    shortest = _size_field(size, "shortest_edge")
    crops = getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None)
    if not shortest or crops or getattr(image_processor, "crop_pct", None):
        return {}
    return {"do_center_crop": True, "crop_size": {"height": shortest, "width": shortest}}


def _per_channel(value: Any, default: float) -> np.ndarray:
    array = np.asarray(default if value is None else value, dtype=np.float64).reshape(-1)
    return np.broadcast_to(array, (3,)) if array.size == 1 else array[:3]


def _normalisation(processor: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Fold rescale (with its offset), mean/std and a second division by std (`include_top`) into one affine map."""
    factor = (
        float(getattr(processor, "rescale_factor", 1 / 255))
        if getattr(processor, "do_rescale", True)
        else 1.0
    )
    offset = 1.0 if getattr(processor, "rescale_offset", False) else 0.0
    if getattr(processor, "do_normalize", True):
        mean = _per_channel(getattr(processor, "image_mean", None), 0.0)
        std = _per_channel(getattr(processor, "image_std", None), 1.0)
    else:
        mean, std = np.zeros(3), np.ones(3)
    if getattr(processor, "include_top", False):  # the processor divides by std a second time
        std = std * _per_channel(getattr(processor, "image_std", None), 1.0)
    scale, shift = factor / std, -(offset + mean) / std
    return tuple(float(s) for s in scale), tuple(float(s) for s in shift)


def _pil_resample(resample: Any) -> int:
    if resample is None:
        return int(PIL.Image.Resampling.BILINEAR)
    try:
        return int(resample)
    except (TypeError, ValueError):  # e.g. a torchvision InterpolationMode
        name = str(getattr(resample, "name", resample)).upper()
        return int(getattr(PIL.Image.Resampling, name, PIL.Image.Resampling.BILINEAR))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = RANDOM_RESIZED_CROP_SCALE,
    ratio: tuple[float, float] = RANDOM_RESIZED_CROP_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params on torch's RNG; returns (left, top, width, height)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return left, top, w, h
    in_ratio = width / height  # fallback: the central crop with the aspect ratio clamped
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation: a random resized crop of at least `min_crop_scale` of the image area, and a random
    horizontal flip if `horizontal_flip` (wrong for digits and text). Defaults: torchvision's / HF examples'."""

    min_crop_scale: float = RANDOM_RESIZED_CROP_SCALE[0]
    horizontal_flip: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {self.min_crop_scale!r}.")


def train_geometry(
    image: PIL.Image.Image, spec: Preprocessing, augmentation: Augmentation = Augmentation()
) -> PIL.Image.Image:
    """Random resized crop (one PIL call: crop box + resize) and, if enabled, a random horizontal flip."""
    scale = (augmentation.min_crop_scale, RANDOM_RESIZED_CROP_SCALE[1])
    left, top, w, h = random_resized_crop_box(image.width, image.height, scale=scale)
    crop_h, crop_w = spec.crop_size
    image = image.resize((crop_w, crop_h), resample=spec.resample, box=(left, top, left + w, top + h))
    if augmentation.horizontal_flip and torch.rand(1).item() < 0.5:
        image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    return image


class ImageTransform:
    """Batch transform for `Dataset.with_transform`: {image, label} -> {pixel_values, labels}; training's random crop
    and normalisation (`train=True`) or the image processor itself (evaluation).

    A class rather than a closure so datasets carrying it pickle into spawned DataLoader workers.
    """

    def __init__(
        self,
        image_processor: Any,
        train: bool,
        image_column: str = "image",
        label_column: str = "label",
        augmentation: Augmentation = Augmentation(),
    ):
        self.image_processor, self.train, self.augmentation = image_processor, train, augmentation
        self.image_column, self.label_column = image_column, label_column
        # Each mode reads of the processor only what it uses: training its output size and normalisation (asked
        # once, here), evaluation the overrides its calls need.
        self.spec = resolve_preprocessing(image_processor) if train else None
        self._overrides = {} if train else square_crop(image_processor)
        if self.spec is not None:
            self._scale = np.asarray(self.spec.scale, dtype=np.float32).reshape(3, 1, 1)
            self._shift = np.asarray(self.spec.shift, dtype=np.float32).reshape(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(train={self.train}, {self.spec or type(self.image_processor).__name__})"

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list]:
        for column in (self.image_column, self.label_column):
            if column not in batch:
                raise DataError(f"the transform needs column {column!r}; the batch has columns {list(batch)}")
        images = [to_rgb(decode_image(value, self.image_column)) for value in batch[self.image_column]]
        if self.train:
            pixel_values = [self.normalise(train_geometry(image, self.spec, self.augmentation)) for image in images]
        else:
            processed = self.image_processor(images=images, return_tensors="np", **self._overrides)["pixel_values"]
            pixel_values = [torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)) for pixels in processed]
        return {"pixel_values": pixel_values, "labels": [int(label) for label in batch[self.label_column]]}

    def normalise(self, image: PIL.Image.Image) -> torch.Tensor:
        """uint8 HWC -> float32 CHW in one multiply-add."""
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
        out = np.multiply(pixels, self._scale)
        out += self._shift
        return torch.from_numpy(out)


def resize_image_processor(image_processor: Any, image_size: int) -> Any:
    """A copy of `image_processor` whose own geometry is `image_size`, keeping its crop fraction.

    Training at `--image_size` uses it for the transforms and saves it with the model, so whoever loads the
    model preprocesses exactly as the evaluation did.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    processor = copy.deepcopy(image_processor)
    size, crop_size = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    shortest = _size_field(size, "shortest_edge")
    height, width = _size_field(size, "height"), _size_field(size, "width")
    crop_height = _size_field(crop_size, "height") if getattr(processor, "do_center_crop", True) else None
    if shortest and crop_height:  # resize the shortest edge, then crop
        processor.size = {"shortest_edge": round(image_size * shortest / crop_height)}
    elif shortest:  # no crop size: any crop fraction lives in crop_pct
        processor.size = {"shortest_edge": image_size}
    elif height and width and crop_height:  # warp, then crop
        processor.size = {
            "height": round(image_size * height / crop_height),
            "width": round(image_size * width / crop_height),
        }
    elif height and width:  # warp only (a crop_pct scales it inside the processor)
        processor.size = {"height": image_size, "width": image_size}
    else:
        raise ValueError(
            f"image processor size {size!r} is not supported (need shortest_edge or height and width)"
        )
    if crop_height:
        processor.crop_size = {"height": image_size, "width": image_size}
    return processor


def build_transforms(
    image_processor: Any,
    image_size: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    augmentation: Augmentation = Augmentation(),
) -> tuple[ImageTransform, ImageTransform]:
    """(train_transform, eval_transform) for `Dataset.with_transform`.

    Eval: the image processor. Train: RandomResizedCrop (scale `augmentation.min_crop_scale`-1, ratio 3/4-4/3) to
    the processor's output size, random horizontal flip unless disabled, normalised as the processor does.
    `image_size` stands for `resize_image_processor(image_processor, image_size)` (the processor `examples/run.py`
    saves with the model). Because `with_transform` is used, the Trainer needs `remove_unused_columns=False`.
    """
    if image_size is not None:
        image_processor = resize_image_processor(image_processor, image_size)
    columns = {"image_column": image_column, "label_column": label_column}
    return (
        ImageTransform(image_processor, train=True, augmentation=augmentation, **columns),
        ImageTransform(image_processor, train=False, **columns),
    )


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into {"pixel_values": (B, 3, H, W) float, "labels": (B,) long}."""
    pixel_values = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]).float()
    labels = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    return {"pixel_values": pixel_values, "labels": labels}
