"""Top-k accuracy from class scores, as an `evaluate` metric loadable offline from its path.

`evaluate.load("accuracy")` fetches its script from the Hub; this module ships with the package
so `evaluate.load(<this folder>)` works with no network. It takes the model's scores rather than
argmax predictions so that top-1 and top-5 come from one pass over the logits.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the fraction of examples whose reference class is among the k highest-scoring
classes. k larger than the number of classes is clamped to it (top-5 of a 3-class problem is 1.0).
Ties are broken towards the lower class index, as `argmax` does, so top-1 equals argmax accuracy
and constant scores are not counted as correct for every class. NaN scores rank last.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): scores (logits or probabilities), shape (n, num_classes).
    references (`list` of `int`): the true class ids, shape (n,).
    k (`int` or sequence of `int`, defaults to (1, 5)): the k values to report.

Returns:
    One float per k: `accuracy` for k = 1, `top{k}_accuracy` otherwise; the keys use the requested
    k even when it is clamped, so they stay the same across datasets.

Examples:
    >>> metric = evaluate.load("hf_adafilter/metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]], references=[2, 2], k=(1, 2))
    {'accuracy': 0.0, 'top2_accuracy': 1.0}
"""

_CITATION = ""


def metric_name(k: int) -> str:
    return "accuracy" if k == 1 else f"top{k}_accuracy"


def reference_ranks(scores: np.ndarray, references: np.ndarray) -> np.ndarray:
    """0-based rank of each reference class: higher scores, plus equal scores at lower indices, come first."""
    scores = np.where(np.isnan(scores), -np.inf, scores)
    reference_scores = scores[np.arange(len(references)), references][:, None]
    lower_index = np.arange(scores.shape[1])[None, :] < references[:, None]
    ahead = (scores > reference_scores) | ((scores == reference_scores) & lower_index)
    return ahead.sum(axis=1)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)) -> dict[str, float]:
        ks = (k,) if isinstance(k, int) else tuple(k)
        if not ks or any(not isinstance(v, int | np.integer) or v < 1 for v in ks):
            raise ValueError(f"k must be a positive int or a sequence of them, got {k!r}")
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
            raise ValueError(
                f"predictions must be (n, num_classes) scores for n references; got shape {scores.shape} "
                f"for {labels.shape[0]} references"
            )
        num_classes = scores.shape[1]
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise ValueError(f"reference {int(bad[0])} is not a class id for {num_classes} classes")
        ranks = reference_ranks(scores, labels)
        return {metric_name(int(v)): float(np.mean(ranks < min(int(v), num_classes))) for v in ks}
