"""Reading stored images: decoding with the file named on failure, a scan that decodes every file before training,
and conversion of any PIL mode to 8-bit RGB."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import PIL.Image
from tqdm.auto import tqdm

from .errors import DataError

if TYPE_CHECKING:
    from .loading import ImageClassificationData

_DECODER = datasets.Image()
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)


def decode_image(value: Any, column: str = "image") -> PIL.Image.Image:
    """Decode a stored image value (PIL image, path, or {"path", "bytes"}), naming the file on failure."""
    if isinstance(value, PIL.Image.Image):
        return value
    if value is None:
        raise DataError(f"column {column!r} has an example without an image (None): drop that row")
    if isinstance(value, str | Path):
        value = {"path": str(value), "bytes": None}
    try:
        return _DECODER.decode_example(value)
    except DECODE_ERRORS as err:
        raise DataError(
            f"cannot read the image {describe_source(value)} in column {column!r} ({type(err).__name__}: {err}): "
            "replace or delete that file"
        ) from err


def check_images(data: ImageClassificationData, splits: Sequence[str], workers: int | None = None) -> None:
    """Decodes every image of `splits` in full (`verify()` alone passes a truncated JPEG), in threads (PIL decodes
    without the GIL), and names every unreadable one, so a bad file stops the run before training, not halfway
    through it."""
    values = [
        value
        for split in splits
        if (dataset := getattr(data, split)) is not None
        for batch in dataset.select_columns([data.image_column]).iter(batch_size=256)
        for value in batch[data.image_column]
        if value is not None and not isinstance(value, PIL.Image.Image)  # no file: decoding names the problem
    ]
    workers = workers or min(8, len(os.sched_getaffinity(0)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(
            tqdm(pool.map(decode_problem, values), total=len(values), desc="Checking images", unit="image",
                 disable=len(values) < 2000 or None)
        )  # fmt: skip
    unreadable = [problem for problem in problems if problem is not None]
    if unreadable:
        shown = "; ".join(unreadable[:10]) + (
            f"; and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
        )
        raise DataError(
            f"{len(unreadable)} image(s) cannot be read: {shown}. Replace or delete them (or pass "
            "--skip_image_check to find out during training)"
        )


def decode_problem(value: Mapping[str, Any]) -> str | None:
    """Why a stored image (`{"path", "bytes"}`) cannot be decoded in full, or None."""
    try:
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        with PIL.Image.open(source) as image:
            image.load()
    except DECODE_ERRORS + (PIL.UnidentifiedImageError,) as err:
        return f"{describe_source(value)} ({type(err).__name__})"
    return None


def describe_source(value: Mapping[str, Any]) -> str:
    path, data = value.get("path"), value.get("bytes")
    if data is not None:
        return f"{path!r} ({len(data)} embedded bytes)" if path else f"of {len(data)} embedded bytes"
    return repr(path)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white.

    White, not the black that dropping alpha gives, because cut-out images (stamps, product
    shots) are made to be seen on a white page. 16-bit and integer greyscale are scaled, not
    clipped, to 0..255; float greyscale in [0, 1] is scaled by 255, any other range clipped.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_l(image)
    try:
        if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
            background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:
        raise DataError(
            f"cannot convert an image of mode {image.mode!r} to RGB ({err}): re-save it as RGB"
        ) from err


def _high_depth_to_l(image: PIL.Image.Image) -> PIL.Image.Image:
    """Scale wide greyscale to 8 bits; PIL's own convert("L") would clip 16-bit data to white."""
    pixels = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = pixels.astype(np.float32) / 257.0
    elif image.mode == "F":
        in_unit_range = pixels.size and np.nanmin(pixels) >= 0 and np.nanmax(pixels) <= 1
        scaled = np.nan_to_num(pixels) * (255.0 if in_unit_range else 1.0)
    else:  # "I": 8-bit data stored wide stays as is, anything larger is taken as 16-bit
        scaled = pixels.astype(np.float32) / (257.0 if pixels.size and pixels.max() > 255 else 1.0)
    return PIL.Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
