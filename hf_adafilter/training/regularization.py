"""Gate regularisers: push the share of fine-tuned filters toward a budget, or down."""

from __future__ import annotations

from collections.abc import Sequence

import torch

GATE_REGULARIZERS = ("none", "l1", "budget")


def finetuned_fraction(gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Share of (example, filter) decisions that chose the fine-tuned bank, over all gated filters.

    Every filter counts once, so wide layers weigh more: this is the fraction of the network's filters that were
    fine-tuned for the batch. Differentiable through straight-through gates.
    """
    total = sum(g.sum() for g in gates)
    count = sum(g.numel() for g in gates)
    return total / count


def filter_weighted_mean(values: Sequence[float], widths: Sequence[int]) -> float:
    """Per-layer shares (e.g. each layer's fine-tuned fraction) combined with every filter counted once, as
    `finetuned_fraction` counts the raw gates; 0 for no filters."""
    total = sum(widths)
    return sum(value * width for value, width in zip(values, widths, strict=True)) / total if total else 0.0


def finetuned_fraction_per_example(gates: Sequence[torch.Tensor]) -> torch.Tensor:
    """`finetuned_fraction` of each example of the batch: a (batch,) tensor."""
    return sum(g.flatten(1).sum(1) for g in gates) / sum(g[0].numel() for g in gates)


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
