"""What a run leaves for people: the model card, the per-layer plot, the output files and predictions with each
image's fine-tuned fraction."""

from .model_card import (
    GATE_FRACTIONS_FILE,
    PLOT_FILE,
    hub_model_id,
    push_model_card,
    render_model_card,
    training_settings,
)

__all__ = [
    "GATE_FRACTIONS_FILE",
    "PLOT_FILE",
    "hub_model_id",
    "push_model_card",
    "render_model_card",
    "training_settings",
]
