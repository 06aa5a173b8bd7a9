"""Metrics agree with scikit-learn; RCE follows the RecSys Challenge 2021 definition."""

from __future__ import annotations

import numpy as np
import pytest
from sketchstream.models.metrics import (
    MetricError,
    average_precision,
    binary_metrics,
    log_loss,
    rce,
    roc_auc,
)
from sklearn import metrics as sk


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    scores = rng.random(n)
    if seed % 2:  # many ties
        scores = np.round(scores, 1)
    return y, np.clip(scores, 0.001, 0.999)


@pytest.mark.parametrize("seed", range(12))
def test_metrics_match_scikit_learn(seed: int) -> None:
    y, p = _random_case(seed)
    assert roc_auc(y, p) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    assert average_precision(y, p) == pytest.approx(sk.average_precision_score(y, p), abs=1e-12)
    assert log_loss(y, p) == pytest.approx(sk.log_loss(y, p), abs=1e-12)


def test_rce_is_relative_to_the_evaluated_sets_own_positive_rate() -> None:
    y, p = _random_case(3)
    naive = sk.log_loss(y, np.full(len(y), y.mean()))
    assert rce(y, p) == pytest.approx(100 * (1 - sk.log_loss(y, p) / naive))
    assert rce(y, np.full(len(y), y.mean())) == pytest.approx(0.0, abs=1e-9)
    assert rce(y, np.where(y == 1, 0.999, 0.001)) > 99


def test_binary_metrics_leaves_out_unlabelled_rows() -> None:
    y, p = _random_case(5)
    with_gaps = np.r_[y, np.nan, np.nan].astype(float)
    report = binary_metrics(with_gaps, np.r_[p, 0.0, 1.0])
    assert report == pytest.approx(binary_metrics(y, p))
    assert list(report) == ["auc", "ap", "logloss", "rce"]


def test_metrics_refuse_inputs_they_cannot_score() -> None:
    with pytest.raises(MetricError, match="needs both classes"):
        roc_auc(np.ones(3), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(MetricError, match="3 labels but 2 scores"):
        roc_auc(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(MetricError, match=r"labels must be 0 or 1, got 2\.0"):
        log_loss(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(MetricError, match=r"probabilities must lie in \[0, 1\]"):
        log_loss(np.array([0, 1]), np.array([0.1, 1.2]))
