"""Datasets for training: Hub datasets or image folders as `datasets` splits sharing one label set, their checks,
reading images, and the transforms that turn them into batches."""

from .loading import *  # noqa: F403  (the public names of `loading`)
from .loading import __all__  # noqa: F401
