"""Gate regularisers: push the share of fine-tuned filters toward a budget, or down."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..metrics.gate_statistics import finetuned_fraction

GATE_REGULARIZERS = ("none", "l1", "budget")


def gate_regularization(gates: Sequence[torch.Tensor], kind: str, target_ratio: float = 0.5) -> torch.Tensor:
    """`l1`: the fine-tuned fraction itself (fine-tune as little as possible); `budget`: its squared distance from
    `target_ratio`; `none`: zero."""
    if kind == "none":
        return gates[0].new_zeros(())
    fraction = finetuned_fraction(gates)
    if kind == "l1":
        return fraction
    if kind == "budget":
        return (fraction - target_ratio) ** 2
    raise ValueError(f"gate_regularization must be one of {', '.join(GATE_REGULARIZERS)}, got {kind!r}.")
