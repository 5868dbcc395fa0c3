"""The comparison's bar chart: test accuracy per task and method, mean ± std over seeds."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .methods import METHOD_TITLES


def write_chart(path: Path, report: dict, tasks: Sequence[str], methods: Sequence[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(7.0, 2.2 + 2.2 * len(tasks)), 4.8))
    for index, method in enumerate(methods):
        xs, means, stds = [], [], []
        for position, task in enumerate(tasks):
            cell = cells.get(task, {}).get(method)
            if cell:
                xs.append(position + (index - (len(methods) - 1) / 2) * width)
                means.append(100 * cell["test_accuracy_mean"])
                stds.append(100 * cell["test_accuracy_std"])
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=METHOD_TITLES[method])
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    lows = [100 * c["test_accuracy_mean"] for t in cells.values() for c in t.values()]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 15), 100)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
