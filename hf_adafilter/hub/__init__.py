"""What a run leaves for people: the model card, the per-layer plot, the output files and predictions with each
image's fine-tuned fraction."""

from .model_card import *  # noqa: F403  (the public names of `model_card`)
from .model_card import __all__  # noqa: F401
