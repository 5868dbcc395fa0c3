"""Datasets for training: Hub datasets or image folders as `datasets` splits sharing one label set, their checks,
reading images, and the transforms that turn them into batches."""

from .loading import (
    DEFAULT_DATASET_DIR,
    DataError,
    ImageClassificationData,
    load_default_dataset,
    load_image_classification_data,
)

__all__ = [
    "DEFAULT_DATASET_DIR",
    "DataError",
    "ImageClassificationData",
    "load_default_dataset",
    "load_image_classification_data",
]
