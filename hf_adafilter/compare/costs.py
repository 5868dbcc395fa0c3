"""What choosing a method costs beyond accuracy: the parameters it trains and the bytes it saves."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from ..hub.model_card import weight_bytes
from ..training.command_line import parse_args
from ..training.methods import build_classifier, count_parameters
from .methods import ADAFILTER_METHODS, method_flags


def method_costs(methods: Sequence[str], model: str, num_labels: int, work_dir: Path) -> dict[str, dict]:
    """What each method trains and what it saves: its model built and saved as the training script builds and saves
    it (before training: sizes do not depend on it), with a `num_labels`-class head. AdaFilter also compact."""
    id2label = {index: str(index) for index in range(num_labels)}
    costs = {}
    for method in methods:
        model_args, _, adafilter_args, baseline_args, _ = parse_args(
            [*method_flags(method, 1e-3), "--model_name_or_path", model, "--output_dir", str(work_dir)]
        )
        classifier = build_classifier(method=model_args.method, name_or_path=model, id2label=id2label,
                                      adafilter_args=adafilter_args, baseline_args=baseline_args)  # fmt: skip
        trainable, total = count_parameters(classifier)
        folder = work_dir / f"cost-{method}"
        shutil.rmtree(folder, ignore_errors=True)
        classifier.save_pretrained(folder)
        costs[method] = {"trainable_parameters": trainable, "total_parameters": total,
                         "saved_bytes": weight_bytes(folder)}  # fmt: skip
        if method in ADAFILTER_METHODS:
            classifier.save_pretrained(folder / "compact", compact=True)
            costs[method]["compact_bytes"] = weight_bytes(folder / "compact")
        shutil.rmtree(folder)
    return costs
