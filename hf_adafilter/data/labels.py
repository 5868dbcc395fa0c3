"""The label set of image-classification splits: one `ClassLabel` shared by every split, and the checks that keep
a model from being trained on labels it cannot learn or that do not mean what the user thinks.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import datasets
import numpy as np

from .errors import DataError

logger = logging.getLogger(__name__)

INTEGER_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"})
FOLDER_FLAGS = {"train": "--train_dir", "validation": "--validation_dir", "test": "--test_dir"}


def drop_unlabelled_test_split(
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


def unify_labels(
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


def check_classes_learnable(
    splits: dict[str, datasets.Dataset], column: str, labels: list[str], where: Mapping[str, str], fix: str
) -> None:
    """Every class must have training images, and there must be two: a class only outside train could never be
    predicted, one class leaves nothing to learn. `where` names each split's source (`--train_dir data/train`,
    `the train split of org/pets`) and `fix` says how to lay out the data."""
    train = splits.get("train")
    if train is None:
        return
    train_counts = np.bincount(_label_values(train, column), minlength=len(labels))
    present = [labels[i] for i in np.flatnonzero(train_counts)]
    if len(present) < 2:
        raise DataError(f"{where['train']} holds {len(present)} class ({present}): {fix}")
    for split, dataset in splits.items():
        counts = np.bincount(_label_values(dataset, column), minlength=len(labels))
        missing = [labels[i] for i in np.flatnonzero((counts > 0) & (train_counts == 0))]
        if missing:
            raise DataError(
                f"class {missing[0]!r} appears in {where[split]} but has no images in {where['train']}: the model "
                "could never learn it; add training images of it or remove it"
            )
