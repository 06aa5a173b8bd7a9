"""The evaluation report: ``report.json``, ``report.md`` and PNG plots, written by ``train`` and
``evaluate`` alike.

``report.json``::

    {"test": {"auc", "ap", "logloss", "rce", "n", "positive_rate"},
     "val": {...},
     "baselines": {name: {"val": {...}, "test": {...}}},
     "timings": {step: seconds},
     "model": {...}, "data": {...}, "heads": {head: {"val": {...}, "test": {...}}}}

``test``/``val`` are the first (primary) head's figures; ``heads`` has all of them. Plots, on
the test period of the primary head: ``roc.png``, ``calibration.png``, ``scores.png``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "markdown",
    "paired_user_bootstrap",
    "plot_calibration",
    "plot_roc",
    "plot_scores",
    "write_report",
]

log = logging.getLogger(__name__)

_METRICS = ("auc", "ap", "logloss", "rce")


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, nan/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the model against the baselines, then details."""
    lines = ["# sketchstream evaluation", ""]
    data = report.get("data", {})
    if data:
        lines += [
            f"Data: `{data.get('path', '?')}`, {data.get('events', '?')} events "
            f"(train {data.get('train', '?')}, val {data.get('val', '?')}, "
            f"test {data.get('test', '?')}); stream md5 `{data.get('stream_md5', '?')}`.",
            "",
        ]
    model = report.get("model", {})
    if model:
        lines += [
            f"Model: `{model.get('version', '?')}`; codebooks {model.get('codebooks', {})}.",
            "",
        ]
    lines += [
        "Protocol: stream sorted by (ts, user, item); 80/10/10 train/val/test; prequential "
        "features (score, then fold); weights fixed after training. RCE = 100·(1 − CE/CE_naive), "
        "naive = the period's positive rate.",
        "",
        "| model | test AUC | test AP | test log loss | test RCE | val AUC | val RCE |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("**sketchstream**", report.get("val", {}), report.get("test", {}))]
    for name, fig in (report.get("baselines") or {}).items():
        rows.append((name, fig.get("val", {}), fig.get("test", {})))
    for name, val, test in rows:
        lines.append(
            f"| {name} | {_fmt(test.get('auc'))} | {_fmt(test.get('ap'))} | "
            f"{_fmt(test.get('logloss'))} | {_fmt(test.get('rce'), 2)} | "
            f"{_fmt(val.get('auc'))} | {_fmt(val.get('rce'), 2)} |"
        )
    heads = report.get("heads") or {}
    if len(heads) > 1:
        lines += ["", "| head | test AUC | test RCE | val AUC |", "|---|---|---|---|"]
        for name, fig in heads.items():
            lines.append(
                f"| {name} | {_fmt(fig['test'].get('auc'))} | {_fmt(fig['test'].get('rce'), 2)} "
                f"| {_fmt(fig['val'].get('auc'))} |"
            )
    boost = report.get("boost") or {}
    if boost:
        lines += [
            "",
            "Trees on the MLP's dense inputs, blended with these heads' logits at the weight "
            "validation chose (0: the MLP alone):",
            "",
            "| head | weight | trees | val AUC, MLP alone | val AUC, blended |",
            "|---|---|---|---|---|",
        ]
        for name, fig in boost.items():
            lines.append(
                f"| {name} | {fig['weight']:.1f} | {fig['rounds']} | "
                f"{_fmt(fig['val_auc_mlp'])} | {_fmt(fig['val_auc'])} |"
            )
    timings = report.get("timings") or {}
    if timings:
        lines += ["", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {_fmt(float(v), 1)} |" for k, v in timings.items()]
    plots = report.get("plots") or []
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def paired_user_bootstrap(
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    users: np.ndarray,
    *,
    draws: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``(difference, low, high)``: AUC of ``p_a`` minus AUC of ``p_b`` on labels ``y``, and
    the percentile interval of that difference over ``draws`` paired user-level bootstrap
    resamples.

    ``y``, ``p_a``, ``p_b``, ``users``: ``(n,)`` labels (nan rows are dropped), two scores of
    the same events, and each event's user. A resample draws as many users as there are, with
    replacement, and takes all events of each drawn user as often as it was drawn, for both
    scores at once (paired), so the interval reflects that events of one user are not
    independent. Draws with a single class are skipped.
    """
    from sketchstream.models.metrics import roc_auc

    y = np.asarray(y, dtype=np.float64)
    known = ~np.isnan(y)
    y, p_a, p_b = y[known], np.asarray(p_a)[known], np.asarray(p_b)[known]
    _, code = np.unique(np.asarray(users)[known].astype(str), return_inverse=True)
    n_users = int(code.max()) + 1 if len(code) else 0
    diff = roc_auc(y, p_a) - roc_auc(y, p_b)
    rng = np.random.default_rng(seed)
    rows_of = np.argsort(code, kind="stable")
    start = np.r_[0, np.cumsum(np.bincount(code, minlength=n_users))]
    diffs = []
    for _ in range(draws):
        times = np.bincount(rng.integers(0, n_users, n_users), minlength=n_users)
        picked = np.repeat(np.arange(n_users), times)
        rows = np.concatenate([rows_of[start[u] : start[u + 1]] for u in picked])
        yb = y[rows]
        if yb.min() == yb.max():
            continue
        diffs.append(roc_auc(yb, p_a[rows]) - roc_auc(yb, p_b[rows]))
    if not diffs:
        return diff, math.nan, math.nan
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return float(diff), float(low), float(high)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(y: np.ndarray, p: np.ndarray, path: Path, label: str = "sketchstream") -> None:
    """ROC curve of scores ``p (n,)`` for labels ``y (n,)``."""
    from sketchstream.models.metrics import roc_auc

    plt = _figure()
    order = np.argsort(-p, kind="stable")
    ys, ps = y[order], p[order]
    last = np.r_[ps[1:] != ps[:-1], True]  # one point per distinct threshold
    tpr = np.r_[0.0, np.cumsum(ys)[last] / max(ys.sum(), 1.0)]
    fpr = np.r_[0.0, np.cumsum(1.0 - ys)[last] / max((1.0 - ys).sum(), 1.0)]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc(y, p):.4f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test period")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_calibration(y: np.ndarray, p: np.ndarray, path: Path, bins: int = 15) -> None:
    """Reliability diagram: mean label against mean score in quantile bins of ``p``."""
    plt = _figure()
    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(which, minlength=len(edges) - 1)
    keep = counts > 0
    mean_p = np.bincount(which, weights=p, minlength=len(edges) - 1)[keep] / counts[keep]
    mean_y = np.bincount(which, weights=y, minlength=len(edges) - 1)[keep] / counts[keep]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(mean_p, mean_y, "o-")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed positive rate",
        title="calibration, test period",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scores(y: np.ndarray, p: np.ndarray, path: Path) -> None:
    """Histograms of the scores of positive and negative test events."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 51)
    ax.hist(p[y == 1], bins=bins, alpha=0.6, label="positive", density=True)
    ax.hist(p[y == 0], bins=bins, alpha=0.6, label="negative", density=True)
    ax.set(xlabel="predicted probability", ylabel="density", title="scores, test period")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    out_dir: str | Path,
    *,
    heads: dict[str, dict[str, dict[str, float]]],
    y_test: np.ndarray,
    p_test: np.ndarray,
    baselines: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    model: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir``; return the report.

    ``heads``: ``{head: {"val": metrics, "test": metrics}}`` in head order (the first is
    primary). ``y_test``/``p_test``: ``(n,)`` labels and scores of the primary head on the test
    period, for the plots (rows with nan labels are dropped).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    primary = next(iter(heads.values()))
    keep = ~np.isnan(np.asarray(y_test, dtype=np.float64))
    y = np.asarray(y_test, dtype=np.float64)[keep]
    p = np.asarray(p_test, dtype=np.float64)[keep]
    plots = []
    if len(y) and 0 < y.mean() < 1:
        for name, fn in (
            ("roc.png", plot_roc),
            ("calibration.png", plot_calibration),
            ("scores.png", plot_scores),
        ):
            fn(y, p, out / name)
            plots.append(name)
    report = {
        "test": {k: primary["test"].get(k) for k in (*_METRICS, "n", "positive_rate")},
        "val": {k: primary["val"].get(k) for k in (*_METRICS, "n", "positive_rate")},
        "baselines": dict(baselines or {}),
        "timings": {k: round(float(v), 3) for k, v in (timings or {}).items()},
        "heads": heads,
        "model": dict(model or {}),
        "data": dict(data or {}),
        "plots": plots,
        **dict(extra or {}),
    }
    report = _clean(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    log.info("wrote report to %s", out)
    return report
