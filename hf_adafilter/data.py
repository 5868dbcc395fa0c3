"""Dataset loading and image transforms for image-classification fine-tuning.

Data comes from the Hub (`dataset_name`) or from image folders (`train_dir`, ...), always as
`datasets.Dataset` splits that share one `ClassLabel` label set. Bad data fails early with a
`DataError` whose message names the column, file or label at fault and the fix.

Transforms need no torchvision: they reproduce the backbone image processor's geometry and
normalisation with PIL and numpy, and draw their randomness from torch's RNG so that
`transformers.set_seed` makes training reproducible and DataLoader workers get distinct streams.

Typical use::

    data = load_image_classification_data(train_dir="pets/train")
    train_tf, eval_tf = build_transforms(image_processor, image_column=data.image_column,
                                         label_column=data.label_column)
    train_ds = data.train.with_transform(train_tf)
    # Trainer(..., args=TrainingArguments(..., remove_unused_columns=False),
    #         data_collator=collate_fn)

The Trainer must be given `remove_unused_columns=False`: otherwise it drops the image and label
columns (they are not arguments of the model's `forward`) before `with_transform` sees them.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch

__all__ = [
    "DEFAULT_DATASET_DIR",
    "DataError",
    "ImageClassificationData",
    "ImageTransform",
    "Preprocessing",
    "Augmentation",
    "build_transforms",
    "collate_fn",
    "decode_image",
    "load_default_dataset",
    "load_image_classification_data",
    "random_resized_crop_box",
    "resize_image_processor",
    "resolve_preprocessing",
    "to_rgb",
]

logger = logging.getLogger(__name__)

#: The embedded Fashion-MNIST subset (2000 train / 500 validation images, 10 classes), used by
#: `examples/run.py` when no dataset is given. It ships with a source checkout, not with a wheel;
#: `examples/make_default_dataset.py` rebuilds it.
DEFAULT_DATASET_DIR: Path = (
    Path(__file__).resolve().parent.parent / "examples" / "data" / "fashion_mnist_small"
)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "pixel_values", "picture", "photo")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "coarse_label", "class", "target", "category")
VALIDATION_SPLIT_NAMES = ("validation", "val", "valid", "dev")
TEST_SPLIT_NAMES = ("test",)
INTEGER_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})
FOLDER_FLAGS = {"train": "--train_dir", "validation": "--validation_dir", "test": "--test_dir"}
RANDOM_RESIZED_CROP_SCALE = (0.08, 1.0)
RANDOM_RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
# ConvNeXt's processor crops (by crop_pct) only below this size and warps at or above it.
CONVNEXT_WARP_SIZE = 384


class DataError(ValueError):
    """Bad input data; the message names the column, file or label at fault and how to fix it."""


@dataclass
class ImageClassificationData:
    """The splits of one image-classification dataset and their shared label set.

    Image columns are stored undecoded (`datasets.Image(decode=False)`) so the transforms can
    name a file that fails to decode; use `decode_image` to look at one. Every label column is
    a `ClassLabel` whose names are `labels`.
    """

    train: datasets.Dataset | None
    validation: datasets.Dataset | None
    test: datasets.Dataset | None
    image_column: str
    label_column: str
    labels: list[str]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def require(self, split: str) -> datasets.Dataset:
        """Return a split, or say which flag provides it (an eval-only load has no train split)."""
        dataset = getattr(self, split)
        if dataset is None:
            hint = f"pass {FOLDER_FLAGS.get(split, '--dataset_name')} or a --dataset_name that has one"
            if split == "validation":
                hint += ", or a --train_val_split above 0 to carve one from train"
            raise DataError(f"no {split} split was loaded: {hint}")
        return dataset


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_image_classification_data(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | Path | None = None,
    validation_dir: str | Path | None = None,
    test_dir: str | Path | None = None,
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    train_val_split: float | None = 0.15,
    seed: int = 42,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    max_predict_samples: int | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> ImageClassificationData:
    """Load a Hub dataset or image folders as checked splits with one shared label set.

    Give either `dataset_name` (a Hub id or a local dataset folder, passed to
    `datasets.load_dataset`) or image folders laid out as `<dir>/<class>/<image>`. There is no
    implicit default: the caller chooses one (see `load_default_dataset`). Hub splits named
    validation/val/valid/dev become the validation split and "test" the test split. Without a
    validation split, a stratified, seeded `train_val_split` fraction of train becomes one
    (`None` or 0 keeps all of train). `max_{train,eval,predict}_samples` keep a seeded random subset of
    train, validation and test.
    """
    splits, from_folders = _load_splits(
        dataset_name, dataset_config_name, train_dir, validation_dir, test_dir, cache_dir, token
    )
    image_column = _resolve_image_column(splits, image_column_name)
    label_column = _resolve_label_column(splits, label_column_name, image_column)
    splits = _drop_unlabelled_test_split(splits, label_column)
    splits, labels = _unify_labels(splits, label_column)
    if from_folders:
        _check_folder_classes(
            splits, label_column, labels, {"train": train_dir, "validation": validation_dir, "test": test_dir}
        )
    if splits.get("train") is not None and splits.get("validation") is None and train_val_split:
        splits["train"], splits["validation"] = _carve_validation(
            splits["train"], label_column, train_val_split, seed
        )
    limits = {"train": ("--max_train_samples", max_train_samples)}
    limits |= {"validation": ("--max_eval_samples", max_eval_samples)}
    limits |= {"test": ("--max_predict_samples", max_predict_samples)}
    undecoded = datasets.Image(decode=False)
    for name, (flag, limit) in limits.items():
        if splits.get(name) is not None:
            splits[name] = _subsample(splits[name], limit, seed, flag).cast_column(image_column, undecoded)
    return ImageClassificationData(
        train=splits.get("train"),
        validation=splits.get("validation"),
        test=splits.get("test"),
        image_column=image_column,
        label_column=label_column,
        labels=labels,
    )


def load_default_dataset(**kwargs: Any) -> ImageClassificationData:
    """Load the embedded Fashion-MNIST subset in `DEFAULT_DATASET_DIR`.

    Keyword arguments are those of `load_image_classification_data` other than the data source.
    """
    if not (DEFAULT_DATASET_DIR / "train.parquet").is_file():
        raise DataError(
            f"the embedded default dataset is missing from {DEFAULT_DATASET_DIR} (it ships with a source "
            "checkout, not with the wheel): run `python examples/make_default_dataset.py`, or pass "
            "--dataset_name / --train_dir"
        )
    return load_image_classification_data(dataset_name=str(DEFAULT_DATASET_DIR), **kwargs)


def _load_splits(
    dataset_name: str | None,
    config_name: str | None,
    train_dir: str | Path | None,
    validation_dir: str | Path | None,
    test_dir: str | Path | None,
    cache_dir: str | None,
    token: str | bool | None,
) -> tuple[dict[str, datasets.Dataset], bool]:
    """Return ({"train"|"validation"|"test": Dataset}, loaded-from-folders)."""
    dirs = {
        name: d for name, d in (("train", train_dir), ("validation", validation_dir), ("test", test_dir)) if d
    }
    if dataset_name and dirs:
        raise DataError(
            f"got both --dataset_name ({dataset_name}) and {', '.join(FOLDER_FLAGS[n] for n in dirs)}: pass one source"
        )
    if dataset_name:
        return _load_named_dataset(dataset_name, config_name, cache_dir, token), False
    if dirs:
        return _load_image_folders(dirs, cache_dir), True
    raise DataError(
        "no dataset given: pass --dataset_name (a Hub dataset or local dataset folder) or --train_dir "
        f"(image folders laid out as <dir>/<class>/<image>); load_default_dataset() loads the embedded "
        f"Fashion-MNIST subset in {DEFAULT_DATASET_DIR}"
    )


def _load_named_dataset(
    name: str, config_name: str | None, cache_dir: str | None, token: str | bool | None
) -> dict[str, datasets.Dataset]:
    try:
        loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir, token=token)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DataError(f"cannot load --dataset_name {name!r}: {err}") from err
    available = list(loaded)
    splits = {"train": loaded["train"]} if "train" in loaded else {}
    for role, names in (("validation", VALIDATION_SPLIT_NAMES), ("test", TEST_SPLIT_NAMES)):
        found = next((n for n in names if n in loaded), None)
        if found is not None:
            splits[role] = loaded[found]
    if not splits:
        raise DataError(
            f"dataset {name!r} has splits {available}, none named train, {'/'.join(VALIDATION_SPLIT_NAMES)} "
            "or test: rename them or load the images with --train_dir"
        )
    return splits


def _load_image_folders(dirs: dict[str, str | Path], cache_dir: str | None) -> dict[str, datasets.Dataset]:
    """Load all folders in ONE imagefolder call, so every split gets the same ClassLabel names."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {ext.lower() for ext in ImageFolder.EXTENSIONS}
    data_files = {}
    for split, directory in dirs.items():
        path = Path(directory).expanduser()
        flag = FOLDER_FLAGS[split]
        if not path.is_dir():
            raise DataError(f"{flag} {directory}: no such directory")
        if not any(f.suffix.lower() in extensions for f in path.rglob("*") if f.is_file()):
            raise DataError(
                f"{flag} {directory}: no image files found (expected <dir>/<class>/<image> with one of "
                f"{', '.join(sorted(extensions)[:8])}, ...)"
            )
        _warn_about_folder_layout(path, flag, extensions)
        data_files[split] = str(path.resolve() / "**")
    # drop_labels=False: infer labels from folder names even when the split folders sit at different depths.
    loaded = datasets.load_dataset(
        "imagefolder", data_files=data_files, drop_labels=False, cache_dir=cache_dir
    )
    return {split: loaded[split] for split in dirs}


def _warn_about_folder_layout(path: Path, flag: str, extensions: set[str]) -> None:
    """Class folders without images make no class, and images one level too deep are labelled by their own folder's
    name: both are easy to do by accident, so say so."""
    loose = sorted(f.name for f in path.iterdir() if f.is_file() and f.suffix.lower() in extensions)
    if loose:
        logger.warning(
            f"{flag} {path}: images directly in it ({loose[:3]}) become a class named {path.name!r}: move them into "
            "their class folder"
        )
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        images = [f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in extensions]
        if not images:
            logger.warning(f"{flag} {path}: class folder {folder.name!r} has no images, so it is no class")
        nested = sorted({f.parent.relative_to(path).as_posix() for f in images if f.parent != folder})
        if nested:
            logger.warning(
                f"{flag} {path}: images in nested folders {nested[:3]} are labelled by their own folder name, "
                f"not {folder.name!r}: move them up to <dir>/<class>/<image>"
            )


def _columns_error(splits: dict[str, datasets.Dataset], what: str, flag: str, detail: str) -> DataError:
    split, dataset = next(iter(splits.items()))
    return DataError(
        f"{detail}; the {split} split has columns {dataset.column_names}: pass {flag} to name the {what} column"
    )


def _resolve_image_column(splits: dict[str, datasets.Dataset], name: str | None) -> str:
    """Pick the image column: the given name, else the first Image feature, else a common name."""
    features = next(iter(splits.values())).features
    if name is None:
        name = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
        name = name or next((c for c in IMAGE_COLUMN_CANDIDATES if c in features), None)
        if name is None:
            raise _columns_error(splits, "image", "--image_column_name", "found no image column")
    _require_column(splits, name, "--image_column_name")
    for split, dataset in splits.items():
        feature = dataset.features[name]
        if not isinstance(feature, datasets.Image):
            raise DataError(
                f"column {name!r} of the {split} split holds {feature!r}, not images (datasets.Image): pass "
                "--image_column_name to pick the image column, or cast a column of file paths with "
                f"dataset.cast_column({name!r}, datasets.Image())"
            )
    return name


def _resolve_label_column(splits: dict[str, datasets.Dataset], name: str | None, image_column: str) -> str:
    """Pick the label column: the given name, else the first ClassLabel, else a common name."""
    features = next(iter(splits.values())).features
    if name is None:
        name = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        name = name or next((c for c in LABEL_COLUMN_CANDIDATES if c in features and c != image_column), None)
        if name is None:
            raise _columns_error(splits, "label", "--label_column_name", "found no label column")
    if name == image_column:
        raise DataError(f"column {name!r} cannot be both the image and the label column")
    _require_column(splits, name, "--label_column_name")
    return name


def _require_column(splits: dict[str, datasets.Dataset], name: str, flag: str) -> None:
    for split, dataset in splits.items():
        if name not in dataset.column_names:
            raise DataError(
                f"column {name!r} not found in the {split} split, whose columns are {dataset.column_names}: "
                f"pass {flag} with one of them"
            )


def _drop_unlabelled_test_split(
    splits: dict[str, datasets.Dataset], column: str
) -> dict[str, datasets.Dataset]:
    """Hub test splits are often withheld (every label -1): drop them instead of failing the whole load."""
    test = splits.get("test")
    if test is None or len(splits) == 1 or not isinstance(test.features[column], datasets.ClassLabel):
        return splits
    if len(test) and (_label_values(test, column) == -1).all():
        logger.warning("the test split has no labels (all -1 in column %r): it is not loaded", column)
        return {name: dataset for name, dataset in splits.items() if name != "test"}
    return splits


def _label_values(dataset: datasets.Dataset, column: str) -> np.ndarray:
    return np.asarray(dataset.select_columns([column]).with_format("numpy")[:][column])


def _unify_labels(
    splits: dict[str, datasets.Dataset], column: str
) -> tuple[dict[str, datasets.Dataset], list[str]]:
    """Check that all splits share one label set and make the column a ClassLabel everywhere."""
    features = {split: dataset.features[column] for split, dataset in splits.items()}
    is_class_label = {split: isinstance(f, datasets.ClassLabel) for split, f in features.items()}
    if all(is_class_label.values()):
        return splits, _class_label_names(splits, features, column)
    if any(is_class_label.values()):
        raise DataError(
            f"label column {column!r} is a ClassLabel in some splits but not others ({features}): "
            "give every split the same ClassLabel"
        )
    for split, feature in features.items():
        if not (isinstance(feature, datasets.Value) and feature.dtype in INTEGER_DTYPES):
            raise DataError(
                f"label column {column!r} of the {split} split holds {feature!r}, neither a ClassLabel nor "
                f"integer class ids: encode it, e.g. dataset.class_encode_column({column!r}), or pass "
                "--label_column_name to pick the label column"
            )
    values = {split: _label_values(dataset, column) for split, dataset in splits.items()}
    for split, array in values.items():
        _check_label_range(array, column, split, None)
    num_labels = _integer_classes(values, column)
    class_label = datasets.ClassLabel(names=[str(i) for i in range(num_labels)])
    return {split: ds.cast_column(column, class_label) for split, ds in splits.items()}, class_label.names


def _integer_classes(values: dict[str, np.ndarray], column: str) -> int:
    """The number of classes of integer labels: the training split's ids, which must be 0..K-1 with none missing
    (the head gets one output per id), and which every other split must stay within."""
    reference = "train" if "train" in values else next(iter(values), None)
    if reference is None:
        return 0
    seen = {int(v) for v in np.unique(values[reference])}
    num_labels = max(seen, default=-1) + 1
    missing = sorted(set(range(num_labels)) - seen)
    if missing:
        raise DataError(
            f"integer labels of column {column!r} in the {reference} split are not 0..{num_labels - 1}: "
            f"{len(missing)} ids never occur ({missing[:5]}{'...' if len(missing) > 5 else ''}), which would make a "
            f"{num_labels}-class head. Remap them to consecutive ids, or give the column a ClassLabel feature"
        )
    for split, array in values.items():
        unknown = sorted({int(v) for v in np.unique(array)} - seen)
        if unknown:
            raise DataError(
                f"label column {column!r} of the {split} split holds ids {unknown[:5]} that the {reference} split "
                f"does not have (it has 0..{num_labels - 1}): drop those rows, or fix the labels"
            )
    return num_labels


def _class_label_names(
    splits: dict[str, datasets.Dataset], features: dict[str, datasets.ClassLabel], column: str
) -> list[str]:
    reference_split, reference = next(iter(features.items()))
    for split, feature in features.items():
        if list(feature.names) != list(reference.names):
            raise DataError(
                f"label column {column!r} has classes {feature.names} in the {split} split but "
                f"{reference.names} in the {reference_split} split: all splits need the same class names "
                "in the same order"
            )
    labels = [str(n) for n in reference.names]
    for split, dataset in splits.items():
        _check_label_range(_label_values(dataset, column), column, split, len(labels))
    return labels


def _check_label_range(values: np.ndarray, column: str, split: str, num_labels: int | None) -> None:
    if values.dtype.kind not in "iu":
        raise DataError(
            f"label column {column!r} of the {split} split has missing labels (None): drop those rows"
        )
    if not values.size:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise DataError(
            f"label column {column!r} of the {split} split holds the negative label {low} (datasets uses -1 for "
            "'no label'): drop the unlabelled rows or do not use that split"
        )
    if num_labels is not None and high >= num_labels:
        raise DataError(
            f"label column {column!r} of the {split} split holds label {high}, out of range for its "
            f"{num_labels} class names: fix the labels or the ClassLabel names"
        )


def _check_folder_classes(
    splits: dict[str, datasets.Dataset], column: str, labels: list[str], dirs: Mapping[str, Any]
) -> None:
    """Every class must have training images; folder names outside train would be unlearnable classes."""
    train = splits.get("train")
    if train is None:
        return
    train_counts = np.bincount(_label_values(train, column), minlength=len(labels))
    present = [labels[i] for i in np.flatnonzero(train_counts)]
    if len(present) < 2:
        raise DataError(
            f"--train_dir {dirs['train']} holds {len(present)} class ({present}): expected one sub-folder per "
            "class, laid out as <train_dir>/<class>/<image>"
        )
    for split, dataset in splits.items():
        counts = np.bincount(_label_values(dataset, column), minlength=len(labels))
        missing = [labels[i] for i in np.flatnonzero((counts > 0) & (train_counts == 0))]
        if missing:
            raise DataError(
                f"class {missing[0]!r} appears in {FOLDER_FLAGS[split]} {dirs[split]} but has no images in "
                f"--train_dir {dirs['train']}: add <train_dir>/{missing[0]}/ images or remove that class folder"
            )


def _carve_validation(
    train: datasets.Dataset, column: str, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Stratified so small classes still appear in validation; seeded so reruns split identically."""
    if not 0 < fraction < 1:
        raise DataError(f"--train_val_split must be a fraction in (0, 1), got {fraction}")
    try:
        parts = train.train_test_split(test_size=fraction, stratify_by_column=column, seed=seed)
    except ValueError as err:
        raise DataError(
            f"cannot carve a stratified {fraction:.0%} validation split from the {len(train)} training examples "
            f"({err}): give a validation split (--validation_dir) or change --train_val_split"
        ) from err
    return parts["train"], parts["test"]


def _subsample(dataset: datasets.Dataset, limit: int | None, seed: int, flag: str) -> datasets.Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        raise DataError(f"{flag} must be positive, got {limit}")
    return dataset.shuffle(seed=seed).select(range(limit))


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

_DECODER = datasets.Image()
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)


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
    except _DECODE_ERRORS as err:
        raise DataError(
            f"cannot read the image {_describe_source(value)} in column {column!r} ({type(err).__name__}: {err}): "
            "replace or delete that file"
        ) from err


def check_images(data: ImageClassificationData, splits: Sequence[str]) -> None:
    """Opens every image of `splits` once (header and integrity check, no full decode) and names every unreadable
    one, so a bad file stops the run before training, not halfway through it."""
    unreadable = []
    for split in splits:
        dataset = getattr(data, split)
        if dataset is None:
            continue
        for batch in dataset.select_columns([data.image_column]).iter(batch_size=256):
            for value in batch[data.image_column]:
                if value is None or isinstance(value, PIL.Image.Image):
                    continue  # no file to check; decoding it will name the problem
                try:
                    source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
                    with PIL.Image.open(source) as image:
                        image.verify()
                except _DECODE_ERRORS + (PIL.UnidentifiedImageError,) as err:
                    unreadable.append(f"{_describe_source(value)} ({type(err).__name__})")
    if unreadable:
        shown = "; ".join(unreadable[:10]) + (
            f"; and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
        )
        raise DataError(f"{len(unreadable)} image(s) cannot be read: {shown}. Replace or delete them")


def _describe_source(value: Mapping[str, Any]) -> str:
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


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """Geometry and normalisation resolved once from an image processor.

    Evaluation resizes to `resize` (an int: shortest edge, aspect kept; a pair: exact height,
    width), then center-crops to `crop_size` if `center_crop`. Training takes a random resized
    crop straight to `crop_size`. Pixels (0..255) become `pixel * scale + shift` per channel, one
    affine map folding the processor's rescale, offset and normalisation.
    """

    crop_size: tuple[int, int]
    resize: int | tuple[int, int]
    center_crop: bool
    resample: int
    scale: tuple[float, float, float]
    shift: tuple[float, float, float]


def resolve_preprocessing(image_processor: Any, image_size: int | None = None) -> Preprocessing:
    """Read a transformers image processor's settings (no torchvision needed).

    At the processor's native size the evaluation geometry is exactly the processor's own
    (including ConvNeXt's crop_pct rule and PoolFormer's resize). `image_size` replaces the crop
    size and keeps the processor's crop fraction: resize the shortest edge to
    round(image_size / crop_pct), then center-crop.
    """
    if image_size is None:
        resize, crop, _ = _native_geometry(image_processor)
    else:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        try:
            crop_fraction = _native_geometry(image_processor)[2]
        except ValueError:  # a size we cannot reproduce does not matter once image_size replaces it
            crop_fraction = getattr(image_processor, "crop_pct", None) or 1.0
        resize, crop = round(image_size / crop_fraction), (image_size, image_size)
    center_crop = crop is not None
    if crop is None:  # a warp to (height, width) is already the output size
        crop = resize
    scale, shift = _normalisation(image_processor)
    return Preprocessing(
        crop_size=(int(crop[0]), int(crop[1])),
        resize=resize,
        center_crop=center_crop,
        resample=_pil_resample(getattr(image_processor, "resample", None)),
        scale=scale,
        shift=shift,
    )


def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value else None


def _native_geometry(processor: Any) -> tuple[int | tuple[int, int], tuple[int, int] | None, float]:
    """Return (eval resize, eval crop or None, crop fraction used when image_size overrides)."""
    size, crop_size = getattr(processor, "size", None), getattr(processor, "crop_size", None)
    shortest = _size_field(size, "shortest_edge")
    height, width = _size_field(size, "height"), _size_field(size, "width")
    crop_pct = getattr(processor, "crop_pct", None)
    if crop_pct and shortest and crop_size is None:  # ConvNeXt
        if shortest < CONVNEXT_WARP_SIZE:
            return int(shortest / crop_pct), (shortest, shortest), crop_pct
        return (shortest, shortest), None, crop_pct
    if shortest:
        resize: int | tuple[int, int] = int(shortest / crop_pct) if crop_pct else shortest
    elif height and width:
        if crop_pct:  # PoolFormer scales the target size by 1 / crop_pct
            resize = (
                int(height / crop_pct) if height == width else (int(height / crop_pct), int(width / crop_pct))
            )
        else:
            resize = (height, width)
    else:
        raise ValueError(
            f"image processor size {size!r} is not supported (need shortest_edge or height and width): "
            "pass image_size"
        )
    crop_h, crop_w = _size_field(crop_size, "height"), _size_field(crop_size, "width")
    do_crop = getattr(processor, "do_center_crop", None)
    do_crop = bool(crop_h and crop_w) if do_crop is None else bool(do_crop and crop_h and crop_w)
    resized_short = resize if isinstance(resize, int) else min(resize)
    if do_crop:
        return resize, (crop_h, crop_w), crop_h / resized_short
    if isinstance(resize, int):  # aspect-kept resize without crop: crop square so batches stack
        return resize, (resize, resize), 1.0
    return resize, None, 1.0


def _per_channel(value: Any, default: float) -> np.ndarray:
    array = np.asarray(default if value is None else value, dtype=np.float64).reshape(-1)
    return np.broadcast_to(array, (3,)) if array.size == 1 else array[:3]


def _normalisation(processor: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Fold rescale, EfficientNet's offset and include_top, and mean/std into one affine map."""
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
    if getattr(processor, "include_top", False):  # EfficientNet divides by std a second time
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


def _shortest_edge_size(width: int, height: int, shortest: int) -> tuple[int, int]:
    """(width, height) with the short side at `shortest`, truncating like transformers does."""
    if width <= height:
        return shortest, int(shortest * height / width)
    return int(shortest * width / height), shortest


def _center_crop(image: PIL.Image.Image, size: tuple[int, int]) -> PIL.Image.Image:
    """transformers' offsets ((in - out) // 2); PIL pads with black if the image is smaller."""
    crop_h, crop_w = size
    top, left = (image.height - crop_h) // 2, (image.width - crop_w) // 2
    if (top, left) == (0, 0) and image.size == (crop_w, crop_h):
        return image
    return image.crop((left, top, left + crop_w, top + crop_h))


def eval_geometry(image: PIL.Image.Image, spec: Preprocessing) -> PIL.Image.Image:
    """Deterministic resize + center crop."""
    if isinstance(spec.resize, int):
        target = _shortest_edge_size(image.width, image.height, spec.resize)
    else:
        target = (spec.resize[1], spec.resize[0])
    if image.size != target:
        image = image.resize(target, resample=spec.resample)
    return _center_crop(image, spec.crop_size) if spec.center_crop else image


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
    """Batch transform for `Dataset.with_transform`: {image, label} -> {pixel_values, labels}.

    A class rather than a closure so datasets carrying it pickle into spawned DataLoader workers.
    """

    def __init__(
        self,
        spec: Preprocessing,
        train: bool,
        image_column: str = "image",
        label_column: str = "label",
        augmentation: Augmentation = Augmentation(),
    ):
        self.spec, self.train, self.augmentation = spec, train, augmentation
        self.image_column, self.label_column = image_column, label_column
        self._scale = np.asarray(spec.scale, dtype=np.float32).reshape(3, 1, 1)
        self._shift = np.asarray(spec.shift, dtype=np.float32).reshape(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(train={self.train}, {self.spec})"

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list]:
        for column in (self.image_column, self.label_column):
            if column not in batch:
                raise DataError(f"the transform needs column {column!r}; the batch has columns {list(batch)}")
        pixel_values = [
            self.normalise(self.geometry(to_rgb(decode_image(value, self.image_column))))
            for value in batch[self.image_column]
        ]
        return {"pixel_values": pixel_values, "labels": [int(label) for label in batch[self.label_column]]}

    def geometry(self, image: PIL.Image.Image) -> PIL.Image.Image:
        if self.train:
            return train_geometry(image, self.spec, self.augmentation)
        return eval_geometry(image, self.spec)

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
    if shortest and crop_height:  # resize shortest edge, then crop (BiT, CLIP-style)
        processor.size = {"shortest_edge": round(image_size * shortest / crop_height)}
    elif shortest:  # ConvNeXt: the crop fraction lives in crop_pct
        processor.size = {"shortest_edge": image_size}
    elif height and width and crop_height:  # warp, then crop (EfficientNet)
        processor.size = {
            "height": round(image_size * height / crop_height),
            "width": round(image_size * width / crop_height),
        }
    elif height and width:  # warp only (ViT); PoolFormer scales it by 1 / crop_pct itself
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

    Train: RandomResizedCrop (scale `augmentation.min_crop_scale`-1, ratio 3/4-4/3) to the crop size, random
    horizontal flip unless disabled. Eval: the processor's resize and center crop. Both normalise as the processor
    does.
    `image_size` overrides the crop size (see `resolve_preprocessing`). Because `with_transform`
    is used, the Trainer needs `remove_unused_columns=False`.
    """
    spec = resolve_preprocessing(image_processor, image_size)
    return (
        ImageTransform(
            spec, train=True, image_column=image_column, label_column=label_column, augmentation=augmentation
        ),
        ImageTransform(spec, train=False, image_column=image_column, label_column=label_column),
    )


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into {"pixel_values": (B, 3, H, W) float, "labels": (B,) long}."""
    pixel_values = torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]).float()
    labels = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    return {"pixel_values": pixel_values, "labels": labels}
