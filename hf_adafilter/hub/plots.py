"""Plots of what AdaFilter chose to fine-tune (the paper's per-layer analysis)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_gate_fractions(
    fractions: Mapping[str, float],
    path: str | Path,
    stages: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Bar chart of the fine-tuned share of filters per gated layer, in forward order, coloured by stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    names, values = list(fractions), list(fractions.values())
    stages = list(stages) if stages is not None else ["layers"] * len(names)
    palette = plt.get_cmap("tab10")
    stage_order = list(dict.fromkeys(stages))
    colours = [palette(stage_order.index(stage) % 10) for stage in stages]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.16 * len(names) + 2), 3.6), dpi=120)
    axes.bar(range(len(values)), values, color=colours, width=0.85)
    legend = [Patch(color=palette(index % 10), label=stage) for index, stage in enumerate(stage_order)]
    axes.set_xlabel("gated layer (forward order)")
    axes.set_ylabel("share of filters fine-tuned")
    axes.set_ylim(0, 1)
    axes.set_xlim(-0.7, len(values) - 0.3)
    axes.set_title(title or "AdaFilter: fine-tuned share of filters per layer (validation set)")
    axes.legend(
        handles=legend, ncol=min(len(stage_order), 8), fontsize="small", loc="upper left", frameon=False
    )
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
