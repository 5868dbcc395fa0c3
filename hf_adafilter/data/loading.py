"""Dataset loading for image-classification fine-tuning.

Data comes from the Hub (`dataset_name`) or from image folders (`train_dir`, ...), always as
`datasets.Dataset` splits that share one `ClassLabel` label set (checked in `labels.py`). Bad data fails early with a
`DataError` whose message names the column, file or label at fault and the fix. Reading the
images is `images.py`; turning them into model inputs is `transforms.py`.

Typical use::

    data = load_image_classification_data(train_dir="pets/train")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from .errors import DataError
from .labels import FOLDER_FLAGS, check_classes_learnable, drop_unlabelled_test_split, unify_labels

__all__ = [
    "DEFAULT_DATASET_DIR",
    "DataError",
    "ImageClassificationData",
    "load_default_dataset",
    "load_image_classification_data",
]

logger = logging.getLogger(__name__)

#: The embedded Fashion-MNIST subset (2000 train / 500 validation images, 10 classes), used by
#: `examples/run.py` when no dataset is given. It ships with a source checkout, not with a wheel;
#: `examples/make_default_dataset.py` rebuilds it.
DEFAULT_DATASET_DIR: Path = (
    Path(__file__).resolve().parents[2] / "examples" / "data" / "fashion_mnist_small"
)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "pixel_values", "picture", "photo")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "coarse_label", "class", "target", "category")
VALIDATION_SPLIT_NAMES = ("validation", "val", "valid", "dev")
TEST_SPLIT_NAMES = ("test",)


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
    splits = drop_unlabelled_test_split(splits, label_column)
    splits, labels = unify_labels(splits, label_column)
    if from_folders:
        dirs = {"train": train_dir, "validation": validation_dir, "test": test_dir}
        where = {split: f"{FOLDER_FLAGS[split]} {folder}" for split, folder in dirs.items()}
        fix = "expected one sub-folder per class, laid out as <train_dir>/<class>/<image>"
    else:
        where = {split: f"the {split} split of {dataset_name}" for split in splits}
        fix = f"check --label_column_name ({label_column!r} was used) and that the dataset holds several classes"
    check_classes_learnable(splits, label_column, labels, where, fix)
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
