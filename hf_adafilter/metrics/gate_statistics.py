"""How much of the network a model fine-tunes: shares of the gate decisions that chose the fine-tuned bank."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
