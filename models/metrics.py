"""Binary engagement metrics of the evaluation protocol, in numpy.

ROC AUC, average precision and log loss agree with scikit-learn's (``roc_auc_score``,
``average_precision_score``, ``log_loss``); RCE is the RecSys Challenge 2021 "relative cross
entropy": ``100 * (1 - CE / CE_naive)``, where ``CE_naive`` is the log loss of always
predicting the evaluated set's own positive rate. 0 means no better than that rate, 100 is
perfect, negative is worse than the naive predictor.
"""

from __future__ import annotations

import numpy as np
from sketchstream.models.errors import ModelError

__all__ = [
    "METRICS",
    "MetricError",
    "average_precision",
    "binary_metrics",
    "log_loss",
    "rce",
    "roc_auc",
]


class MetricError(ModelError):
    """Labels or scores a metric cannot be computed on."""


#: names of the metrics :func:`binary_metrics` returns, in report order
METRICS = ("auc", "ap", "logloss", "rce")

_EPS = np.finfo(np.float64).eps


def _check(y_true: np.ndarray, y_score: np.ndarray, *, both: bool) -> tuple[np.ndarray, ...]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise MetricError(f"{y.size} labels but {s.size} scores")
    if y.size == 0:
        raise MetricError("no labels to evaluate")
    if not np.all((y == 0) | (y == 1)):
        bad = y[(y != 0) & (y != 1)][0]
        raise MetricError(f"labels must be 0 or 1, got {float(bad)!r}")
    if not np.all(np.isfinite(s)):
        raise MetricError(f"scores must be finite, got {float(s[~np.isfinite(s)][0])!r}")
    if both and (y.min() == y.max()):
        raise MetricError(f"needs both classes, got only {int(y[0])}s ({y.size} labels)")
    return y, s


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve of ``(n,)`` labels in {0, 1} and ``(n,)`` scores; tied scores
    count one half (Mann-Whitney U with average ranks)."""
    y, s = _check(y_true, y_score, both=True)
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    # average rank (1-based) of each group of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    group_rank = (starts + ends + 1) / 2.0
    ranks = np.repeat(group_rank, ends - starts)
    n_pos = y.sum()
    n_neg = y.size - n_pos
    rank_sum = ranks[y[order] == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Average precision: sum over distinct thresholds of (recall step) x precision, the
    non-interpolated definition scikit-learn uses. Needs at least one positive."""
    y, s = _check(y_true, y_score, both=False)
    if y.max() == 0:
        raise MetricError(f"average precision needs a positive label, got {y.size} zeros")
    order = np.argsort(-s, kind="stable")
    sorted_s, sorted_y = s[order], y[order]
    last_of_threshold = np.r_[np.flatnonzero(sorted_s[1:] != sorted_s[:-1]), s.size - 1]
    tps = np.cumsum(sorted_y)[last_of_threshold]
    precision = tps / (last_of_threshold + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def log_loss(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean binary cross entropy (natural log) of probabilities of the positive class;
    probabilities are clipped to ``[eps, 1 - eps]``."""
    y, p = _check(y_true, y_prob, both=False)
    if p.min() < 0 or p.max() > 1:
        raise MetricError(
            f"probabilities must lie in [0, 1], got {float(p[(p < 0) | (p > 1)][0])!r}"
        )
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def rce(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Relative cross entropy, in percent: ``100 * (1 - CE / CE_naive)`` with ``CE_naive`` the
    log loss of predicting the positive rate of ``y_true`` itself (RecSys Challenge 2021)."""
    y, _ = _check(y_true, y_prob, both=True)
    naive = log_loss(y, np.full(y.size, y.mean()))
    return float(100.0 * (1.0 - log_loss(y, y_prob) / naive))


def binary_metrics(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, float]:
    """``{"auc", "ap", "logloss", "rce"}`` of probabilities against labels; rows whose label
    is nan (the head does not apply) are left out."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise MetricError(f"{y.size} labels but {p.size} scores")
    known = ~np.isnan(y)
    y, p = y[known], p[known]
    return {
        "auc": roc_auc(y, p),
        "ap": average_precision(y, p),
        "logloss": log_loss(y, p),
        "rce": rce(y, p),
    }
