"""The shipped top-k accuracy metric: offline loading, hand-checked values, Trainer integration."""

from __future__ import annotations

import configparser
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
from transformers import EvalPrediction

from hf_adafilter.metrics import (
    METRICS_DIR,
    available_metrics,
    build_compute_metrics,
    load_metric,
    metric_path,
    select_logits,
)

REPO = Path(__file__).resolve().parent.parent

# Four examples, three classes. Rank of the reference class (0 = best):
#   [0.1, 0.7, 0.2] ref 1 -> rank 0;  [0.5, 0.1, 0.4] ref 2 -> rank 1
#   [0.2, 0.3, 0.5] ref 0 -> rank 2;  [0.9, 0.05, 0.05] ref 0 -> rank 0
SCORES = [[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]]
REFERENCES = [1, 2, 0, 0]


@pytest.fixture(scope="module")
def metric() -> evaluate.EvaluationModule:
    return load_metric()


def test_loads_offline_from_its_path_in_a_fresh_process(tmp_path):
    script = (
        "import evaluate, sys; from hf_adafilter.metrics import metric_path;"
        "path = metric_path('top_k_accuracy');"
        "r1 = evaluate.load(path).compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1]);"
        "r2 = evaluate.load(path + '/top_k_accuracy.py').compute(predictions=[[0.1, 0.9]], references=[0], k=1);"
        "print(r1, r2)"
    )
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # unreachable: any Hub call would fail
        "HF_HOME": str(tmp_path / "hf_home"),
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'accuracy': 0.5, 'top5_accuracy': 1.0} {'accuracy': 0.0}"


def test_hand_checked_values(metric):
    result = metric.compute(predictions=SCORES, references=REFERENCES, k=(1, 2, 3))
    assert result == {"accuracy": 0.5, "top2_accuracy": 0.75, "top3_accuracy": 1.0}
    assert metric.compute(predictions=np.asarray(SCORES), references=REFERENCES, k=2) == {
        "top2_accuracy": 0.75
    }


def test_k_larger_than_num_classes_is_clamped(metric):
    assert metric.compute(predictions=SCORES, references=REFERENCES) == {
        "accuracy": 0.5,
        "top5_accuracy": 1.0,
    }


def test_ties_break_towards_lower_index_and_nan_ranks_last(metric):
    # Constant scores must not count as correct for every class: argmax picks class 0.
    constant = metric.compute(predictions=np.zeros((4, 3)), references=[0, 1, 2, 0], k=(1, 2))
    assert constant == {"accuracy": 0.5, "top2_accuracy": 0.75}
    nan_scores = [[np.nan, 0.2, 0.1], [np.nan, 0.2, 0.1]]
    assert metric.compute(predictions=nan_scores, references=[1, 0], k=(1, 2)) == {
        "accuracy": 0.5,
        "top2_accuracy": 0.5,
    }


def test_bad_inputs_raise(metric):
    with pytest.raises(ValueError, match="reference 3 is not a class id for 3 classes"):
        metric.compute(predictions=SCORES, references=[1, 2, 3, 0])
    with pytest.raises(ValueError, match="k must be a positive int"):
        metric.compute(predictions=SCORES, references=REFERENCES, k=(0,))


def test_compute_metrics_takes_the_first_2d_output():
    compute_metrics = build_compute_metrics(top_k=(1, 2))
    gates = np.ones((4, 7))  # a later 2-D output, e.g. per-layer gate fractions
    prediction = EvalPrediction(
        predictions=(np.float32(0.3), np.asarray(SCORES, np.float32), gates), label_ids=np.asarray(REFERENCES)
    )
    assert compute_metrics(prediction) == {"accuracy": 0.5, "top2_accuracy": 0.75}
    plain = EvalPrediction(predictions=np.asarray(SCORES), label_ids=np.asarray(REFERENCES))
    assert build_compute_metrics()(plain) == {"accuracy": 0.5, "top5_accuracy": 1.0}


def test_select_logits_errors():
    with pytest.raises(ValueError, match="no 2-D logits"):
        select_logits((np.zeros(3), np.zeros((2, 3, 4))))
    with pytest.raises(ValueError, match="expected 2-D logits"):
        select_logits(np.zeros(3))


def test_metric_path_and_unknown_names():
    assert available_metrics() == ["top_k_accuracy"]
    assert Path(metric_path("top_k_accuracy")) == METRICS_DIR / "top_k_accuracy"
    with pytest.raises(
        ValueError, match=r"no shipped metric named 'accuracy'; available: \['top_k_accuracy'\]"
    ):
        metric_path("accuracy")


def test_metric_scripts_are_package_data():
    """setup.cfg must ship every metric script, or evaluate.load(metric_path(...)) fails once installed."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in config["options.package_data"]["hf_adafilter"].split(",")]
    package = REPO / "hf_adafilter"
    for script in METRICS_DIR.glob("*/*.py"):
        relative = script.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
