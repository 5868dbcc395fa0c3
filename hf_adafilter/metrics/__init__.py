"""What is measured: `evaluate` metric modules shipped with the package, so evaluation needs no Hub access, and
the gates' fine-tuned fractions (`gate_statistics`).

Each metric lives in `metrics/<name>/<name>.py` (the layout `evaluate.load(<folder>)` expects)
and is installed as package data. `evaluate` is imported when a metric is loaded, not with the package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import EvalPrediction

if TYPE_CHECKING:
    import evaluate

__all__ = [
    "METRICS_DIR",
    "available_metrics",
    "build_compute_metrics",
    "load_metric",
    "metric_path",
    "select_logits",
]

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> str:
    """Absolute path of a shipped metric module's folder, for `evaluate.load`."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"no shipped metric named {name!r}; available: {available_metrics()}")
    return str(path)


def load_metric(name: str = "top_k_accuracy", **kwargs: Any) -> evaluate.EvaluationModule:
    """`evaluate.load` of a shipped metric; kept in memory by default so concurrent ranks share no cache file."""
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)


def select_logits(predictions: Any) -> np.ndarray:
    """The classification scores among a model's outputs: the first 2-D array.

    Models may return extra outputs (AdaFilter returns per-layer gates after the logits), which
    the Trainer hands over as a tuple.
    """
    if isinstance(predictions, tuple | list):
        for item in predictions:
            if np.ndim(item) == 2:
                return np.asarray(item)
        shapes = [np.shape(item) for item in predictions]
        raise ValueError(f"no 2-D logits among the model's outputs (shapes {shapes})")
    scores = np.asarray(predictions)
    if scores.ndim != 2:
        raise ValueError(f"expected 2-D logits (batch, num_classes), got shape {scores.shape}")
    return scores


def build_compute_metrics(top_k: Sequence[int] = (1, 5)) -> Callable[[EvalPrediction], dict[str, float]]:
    """A Trainer `compute_metrics` reporting `accuracy` and `top{k}_accuracy` for each k."""
    metric = load_metric("top_k_accuracy")
    ks = tuple(int(k) for k in top_k)

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        labels = eval_prediction.label_ids
        labels = labels[0] if isinstance(labels, tuple | list) else labels
        return metric.compute(predictions=select_logits(eval_prediction.predictions), references=labels, k=ks)

    return compute_metrics
