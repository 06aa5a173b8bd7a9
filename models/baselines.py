"""Reference predictors on the evaluation protocol, for the report to show beside the model.

All features are *prequential*: the feature row of event t is computed from events strictly
earlier in stream order (their labels and values included), in one ordered pass with numpy
(group-by + cumulative sums shifted by one). Models are trained on the train period, tuned or
early-stopped on validation, and reported on validation and test.

Baselines (names are the keys of :func:`run_baselines`'s result):

``constant``
    The train period's positive rate, for every event.
``rates_lr``
    Logistic regression on the logits of the user's and the item's smoothed positive rates
    ``(positives + a * prior) / (labelled + a)``, prior = the running global rate; ``a`` is
    picked on validation.
``counts_gbdt``
    LightGBM on online counts and target encodings: user/item counts, smoothed positive rates
    and mean values (all history and recent windows), user x category rates (needs items),
    the item's year, the running global rate.
``counts_cf_gbdt``
    The same plus online item-item collaborative filtering: for event (u, i), the mean cosine
    similarity between i and the items u liked (or rated negatively) earlier. Similarities come
    from a like co-occurrence matrix refreshed every ``cf_block`` events from the events before
    the block, so they too only see the past.
``recency_gbdt``
    For a return head (:attr:`~sketchstream.models.events.Head.horizon`) only, in place of
    the three above: LightGBM on counts and recency — the user's and the item's event counts
    and mean values, hours since the user's previous event, the gap before it, the user's
    mean gap and age, the user's events in the last day and week, hour of day and weekday.
    No target encodings: a return label is known only a horizon after its event, so the
    rates of a user's earlier labels would read the future.

Figures on MovieLens-1M (head ``like`` = rating >= 4) are in ``tests/models/test_baselines.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sketchstream.models.channels import calendar_columns
from sketchstream.models.errors import ModelError
from sketchstream.models.events import (
    DEFAULT_HEADS,
    EventTable,
    Head,
    Item,
    labels,
    protocol_known,
    protocol_split,
)
from sketchstream.models.metrics import binary_metrics

__all__ = [
    "BASELINES",
    "FeatureSet",
    "OnlineStats",
    "cf_features",
    "count_features",
    "prior_sums",
    "rate_features",
    "recency_features",
    "run_baselines",
]

log = logging.getLogger(__name__)

# an engagement head gets the first four, a return head (a label from the future) the last two
_ENGAGEMENT_BASELINES = ("constant", "rates_lr", "counts_gbdt", "counts_cf_gbdt")
_RETURN_BASELINES = ("constant", "recency_gbdt")
BASELINES = (*_ENGAGEMENT_BASELINES, "recency_gbdt")

FeatureSet = tuple[np.ndarray, list[str]]  # ((n, n_features) float32, names)


def _codes(values: np.ndarray) -> np.ndarray:
    """``(n,)`` int64 dense codes of ids, in order of first appearance."""
    index: dict[Any, int] = {}
    return np.fromiter(
        (index.setdefault(v, len(index)) for v in values.tolist()), np.int64, len(values)
    )


class _Groups:
    """Rows grouped by key, each group in stream order: the scaffolding of every online sum."""

    def __init__(self, keys: np.ndarray) -> None:
        self.order = np.argsort(keys, kind="stable")
        sorted_keys = keys[self.order]
        starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        position = np.arange(len(keys))
        self.start = np.maximum.accumulate(np.where(starts, position, 0))  # group's first slot

    def prior(self, values: np.ndarray, window: int | None = None) -> tuple[np.ndarray, ...]:
        """Per row: how many earlier rows of its group (the last ``window`` at most) and the
        sum of their ``values``; both ``(n,)`` float64, in the input order."""
        v = values[self.order].astype(np.float64)
        before = np.cumsum(v) - v  # exclusive prefix sum: strictly earlier rows only
        position = np.arange(len(v))
        lo = self.start if window is None else np.maximum(self.start, position - window)
        count, total = np.empty(len(v)), np.empty(len(v))
        count[self.order] = position - lo
        total[self.order] = before - before[lo]
        return count, total


def prior_sums(
    keys: np.ndarray, values: np.ndarray, window: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For each row t: the number of rows s < t with ``keys[s] == keys[t]`` (only the last
    ``window`` of them, if given) and the sum of ``values[s]`` over those rows.

    ``keys``: ``(n,)`` ints, ``values``: ``(n,)`` numbers; returns two ``(n,)`` float64.
    """
    count, total = _Groups(np.asarray(keys)).prior(np.asarray(values), window)
    return count, total


def _running_mean(values: np.ndarray, weights: np.ndarray, default: float) -> np.ndarray:
    """``(n,)`` mean of ``values`` over rows before each row (where ``weights`` is 1)."""
    total = np.cumsum(values * weights) - values * weights
    count = np.cumsum(weights) - weights
    return np.where(count > 0, total / np.maximum(count, 1), default)


class OnlineStats:
    """One head's labels and the events' values as online streams: dense user/item codes,
    rows grouped by user and by item, running global rate and mean value. Built once, shared by
    the feature sets (:func:`rate_features`, :func:`count_features`, :func:`cf_features`).

    ``y``: ``(n,)`` labels of the head (1, 0, nan where it does not apply).
    """

    def __init__(self, events: EventTable, y: np.ndarray) -> None:
        self.events = events
        self.y = y
        self.labelled = (~np.isnan(y)).astype(np.float64)
        self.positive = np.nan_to_num(y).astype(np.float64)
        self.has_value = (~np.isnan(events.value)).astype(np.float64)
        self.value = np.nan_to_num(events.value).astype(np.float64)
        self.user = _codes(events.user)
        self.item = _codes(events.item)
        self.by_user = _Groups(self.user)
        self.by_item = _Groups(self.item)
        self.global_rate = _running_mean(self.positive, self.labelled, 0.5)
        self.global_value = _running_mean(self.value, self.has_value, np.nan)

    def rate(self, groups: _Groups, a: float, window: int | None = None) -> np.ndarray:
        labelled, _ = groups.prior(self.labelled, window)
        _, positives = groups.prior(self.labelled * self.positive, window)
        return (positives + a * self.global_rate) / (labelled + a)

    def mean_value(self, groups: _Groups, a: float, window: int | None = None) -> np.ndarray:
        valued, _ = groups.prior(self.has_value, window)
        _, total = groups.prior(self.value, window)
        return (total + a * self.global_value) / (valued + a)


def rate_features(online: OnlineStats, a: float) -> FeatureSet:
    """Smoothed user and item positive rates, ``(n, 2)``."""
    columns = [online.rate(online.by_user, a), online.rate(online.by_item, a)]
    return np.column_stack(columns).astype(np.float32), ["user_rate", "item_rate"]


def count_features(
    online: OnlineStats, items: Sequence[Item] | None = None, a: float = 10.0
) -> FeatureSet:
    """Online counts and target encodings, ``(n, n_features)``; see the module docstring."""
    f: dict[str, np.ndarray] = {}
    f["user_events"], _ = online.by_user.prior(np.ones(len(online.y)))
    f["item_events"], _ = online.by_item.prior(np.ones(len(online.y)))
    f["user_rate"] = online.rate(online.by_user, a)
    f["item_rate"] = online.rate(online.by_item, a)
    f["user_value"] = online.mean_value(online.by_user, a)
    f["item_value"] = online.mean_value(online.by_item, a)
    f["user_item_value"] = f["user_value"] + f["item_value"] - online.global_value
    for window in (10, 50):
        f[f"user_rate_last{window}"] = online.rate(online.by_user, 3.0, window)
        f[f"user_value_last{window}"] = online.mean_value(online.by_user, 3.0, window)
        f[f"item_rate_last{5 * window}"] = online.rate(online.by_item, 3.0, 5 * window)
    f["global_rate"] = online.global_rate
    if items:
        f.update(_category_features(online, items, f["user_rate"], f["user_value"], a))
    names = list(f)
    return np.column_stack([f[k] for k in names]).astype(np.float32), names


def recency_features(online: OnlineStats) -> FeatureSet:
    """Online counts and recency of the user, ``(n, n_features)``, from the events alone (no
    label): see ``recency_gbdt`` in the module docstring. nan where there is no earlier event."""
    ts = np.asarray(online.events.ts, dtype=np.float64)
    groups = online.by_user
    order = groups.order  # each user's rows in stream (= time) order
    t = ts[order]
    position = np.arange(len(t))
    first = position == groups.start
    hours = 3600.0
    previous = np.where(first, np.nan, np.r_[np.nan, t[:-1]])
    before_previous = np.r_[np.nan, previous[:-1]]
    before_previous[position - groups.start < 2] = np.nan
    f: dict[str, np.ndarray] = {}
    f["user_events"], _ = groups.prior(np.ones(len(t)))
    f["item_events"], _ = online.by_item.prior(np.ones(len(t)))
    f["user_value"] = online.mean_value(groups, 10.0)
    f["item_value"] = online.mean_value(online.by_item, 10.0)
    in_order = {
        "hours_since_last": (t - previous) / hours,
        "last_gap_hours": (previous - before_previous) / hours,
        "user_age_hours": (t - t[groups.start]) / hours,
    }
    # the user's earlier events within a day and a week: (user, time) keys are sorted
    key = groups.start * (np.ptp(t) + 1.0 if len(t) else 1.0) + (t - (t.min() if len(t) else 0))
    for name, span in (("user_events_1d", 86_400.0), ("user_events_7d", 7 * 86_400.0)):
        lo = np.maximum(np.searchsorted(key, key - span, side="left"), groups.start)
        in_order[name] = (position - lo).astype(np.float64)
    for name, column in in_order.items():
        f[name] = np.empty(len(t))
        f[name][order] = column
    with np.errstate(invalid="ignore", divide="ignore"):
        f["mean_gap_hours"] = f["user_age_hours"] / np.where(
            f["user_events"] > 1, f["user_events"] - 1, np.nan
        )
    f["hour_of_day"], f["weekday"] = calendar_columns(ts)  # 0 = Monday
    names = list(f)
    return np.column_stack([f[k] for k in names]).astype(np.float32), names


def _category_features(
    online: OnlineStats,
    items: Sequence[Item],
    user_rate: np.ndarray,
    user_value: np.ndarray,
    a: float,
) -> dict[str, np.ndarray]:
    """User x category target encodings, averaged over the event item's categories, and the
    item's year; items without categories get nan."""
    n = len(online.y)
    meta = {item.item: item for item in items}
    category_code: dict[str, int] = {}
    per_event = []
    year = np.full(n, np.nan)
    for row, item_id in enumerate(online.events.item.tolist()):
        item = meta.get(item_id)
        if item is None:
            per_event.append(())
            continue
        per_event.append([category_code.setdefault(c, len(category_code)) for c in item.categories])
        if item.year is not None:
            year[row] = item.year
    lengths = np.array([len(c) for c in per_event], dtype=np.int64)
    rows = np.repeat(np.arange(n), lengths)  # one row per (event, category)
    category = np.fromiter((c for cs in per_event for c in cs), np.int64, len(rows))
    pairs = _Groups(online.user[rows] * max(len(category_code), 1) + category)
    labelled, _ = pairs.prior(online.labelled[rows])
    _, positives = pairs.prior((online.labelled * online.positive)[rows])
    valued, _ = pairs.prior(online.has_value[rows])
    _, total = pairs.prior(online.value[rows])
    rate = (positives + a * user_rate[rows]) / (labelled + a)
    value = (total + a * user_value[rows]) / (valued + a)
    with np.errstate(invalid="ignore", divide="ignore"):
        denominator = np.where(lengths > 0, lengths, np.nan)
        return {
            "user_category_rate": np.bincount(rows, rate, n) / denominator,
            "user_category_value": np.bincount(rows, value, n) / denominator,
            "user_category_events": np.bincount(rows, labelled, n) / denominator,
            "item_year": year,
        }


def cf_features(online: OnlineStats, block: int = 50_000) -> FeatureSet:
    """Online item-item CF, ``(n, 3)``: mean similarity of the event's item to the user's
    earlier liked items, to the earlier negatively labelled ones, and their difference.

    Similarity = cosine of items' like vectors over users, from the likes before the event's
    block of ``block`` events (the co-occurrence matrix ``(n_items, n_items)`` is updated once
    per block with the likes of the block before). The user's own liked items are exact up to
    the event. nan where there is nothing to average yet.
    """
    import scipy.sparse as sp

    n = len(online.y)
    user, item = online.user, online.item
    n_users, n_items = int(user.max()) + 1, int(item.max()) + 1
    liked = online.positive * online.labelled > 0
    disliked = (online.labelled > 0) & ~liked
    cooccurrence = np.zeros((n_items, n_items), dtype=np.float32)
    user_rows = online.by_user.order  # positions grouped by user, each group in stream order
    user_bounds = np.searchsorted(user[user_rows], np.arange(n_users + 1))
    out = np.full((n, 2), np.nan, dtype=np.float32)

    def likes(mask: np.ndarray) -> sp.csr_matrix:
        ones = np.ones(int(mask.sum()), dtype=np.float32)
        return sp.csr_matrix((ones, (user[mask], item[mask])), shape=(n_users, n_items))

    for start in range(block, n, block):
        stop = min(n, start + block)
        # fold the previous block's likes into the co-occurrences:
        # (old + new)^T (old + new) - old^T old = new^T (old + new) + old^T new
        new = np.zeros(n, dtype=bool)
        new[start - block : start] = liked[start - block : start]
        old = liked.copy()
        old[start - block :] = False
        old &= np.isin(user, np.unique(user[new]))
        a_new, a_old = likes(new), likes(old)
        delta = (a_new.T @ (a_old + a_new) + a_old.T @ a_new).tocoo()
        cooccurrence[delta.row, delta.col] += delta.data
        scale = 1.0 / np.sqrt(np.maximum(np.diag(cooccurrence), 1.0))
        similarity = cooccurrence * scale[:, None]
        similarity *= scale[None, :]
        np.fill_diagonal(similarity, 0.0)
        for u in np.unique(user[start:stop]):
            history = user_rows[user_bounds[u] : user_bounds[u + 1]]
            history = history[history < stop]
            rows = history[history >= start]
            for column, kind in enumerate((liked, disliked)):
                earlier = history[kind[history]]
                if len(earlier) == 0:
                    continue
                sims = similarity[item[rows][:, None], item[earlier][None, :]]
                before = earlier[None, :] < rows[:, None]
                count = before.sum(axis=1)
                with np.errstate(invalid="ignore"):
                    out[rows, column] = np.where(count > 0, (sims * before).sum(1) / count, np.nan)
    columns = np.column_stack([out, out[:, 0] - out[:, 1]])
    return columns, ["cf_liked", "cf_disliked", "cf_difference"]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def _fit_rates_lr(
    online: OnlineStats,
    y: np.ndarray,
    split: tuple[slice, slice, slice],
    smoothing: Sequence[float],
) -> tuple[np.ndarray, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression

    train, val, _ = split
    best: tuple[float, float, np.ndarray] | None = None
    for a in smoothing:
        x, _ = rate_features(online, a)
        x = _logit(x)
        known = ~np.isnan(y[train])
        model = LogisticRegression().fit(x[train][known], y[train][known])
        p = model.predict_proba(x)[:, 1]
        val_loss = binary_metrics(y[val], p[val])["logloss"]
        if best is None or val_loss < best[0]:
            best = (val_loss, a, p)
    assert best is not None
    return best[2], {"smoothing": best[1]}


def _fit_gbdt(
    x: np.ndarray,
    names: list[str],
    y: np.ndarray,
    split: tuple[slice, slice, slice],
    n_threads: int,
    seed: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    import lightgbm as lgb

    train, val, _ = split
    params = {
        "objective": "binary",
        "learning_rate": 0.1,
        "num_leaves": 31,
        "min_data_in_leaf": 500,
        "max_bin": 63,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.5,
        "bagging_freq": 1,
        "num_threads": n_threads,
        "seed": seed,
        "deterministic": True,
        "verbose": -1,
    }
    fit_rows = np.arange(len(y))[train][~np.isnan(y[train])]
    val_rows = np.arange(len(y))[val][~np.isnan(y[val])]
    train_set = lgb.Dataset(x[fit_rows], y[fit_rows], feature_name=names, free_raw_data=True)
    val_set = lgb.Dataset(x[val_rows], y[val_rows], reference=train_set)
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=1000,
        valid_sets=[val_set],
        callbacks=[lgb.early_stopping(30, verbose=False)],
    )
    p = booster.predict(x, num_iteration=booster.best_iteration)
    return p, {"rounds": booster.best_iteration, "features": names}


def _both_classes(y: np.ndarray) -> bool:
    known = y[~np.isnan(y)]
    return bool(len(known)) and 0 < known.mean() < 1


def run_baselines(
    events: EventTable,
    heads: Sequence[Head] = DEFAULT_HEADS,
    split: tuple[slice, slice, slice] | None = None,
    *,
    items: Sequence[Item] | None = None,
    baselines: Sequence[str] = BASELINES,
    smoothing: Sequence[float] = (3.0, 10.0, 30.0),
    cf_block: int = 50_000,
    n_threads: int = 2,
    seed: int = 0,
    scores: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fit and score the baselines on ``events`` (in stream order) for each head.

    Returns ``{name: {"val": metrics, "test": metrics, "seconds": s, "params": {...}}}`` with
    metrics from :func:`~sketchstream.models.metrics.binary_metrics` (auc, ap, logloss, rce);
    with several heads, names are ``"<baseline>/<head>"``. Each head gets those of
    ``baselines`` that suit it (a return head ``constant`` and ``recency_gbdt``, an engagement
    head the others). ``seconds`` is the baseline's wall time, its share of the feature
    computation included.

    ``items`` (optional) adds user x category and year features to the boosted baselines;
    ``smoothing`` is the grid of prior strengths ``rates_lr`` picks from on validation;
    ``cf_block`` the number of events between refreshes of the CF similarities; ``n_threads``
    LightGBM's threads. ``scores`` (optional): a dict that receives each baseline's ``(n,)``
    predictions under its result name, for comparisons that need them (a paired bootstrap).
    """
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ModelError(f"unknown baselines {unknown}: expected some of {', '.join(BASELINES)}")
    split = split if split is not None else protocol_split(len(events))
    train, val, test = split
    all_labels = labels(events, heads, protocol_known(split))
    results: dict[str, dict[str, Any]] = {}
    for column, head in enumerate(heads):
        allowed = _RETURN_BASELINES if head.is_return else _ENGAGEMENT_BASELINES
        y = all_labels[:, column].astype(np.float64)
        if np.isnan(y[train]).all():
            raise ModelError(f"head {head.name!r} labels no event of the train period")
        if head.is_return and not all(_both_classes(y[part]) for part in split):
            # a horizon longer than what follows validation or test: nothing to fit or judge
            log.warning("head %s: a period has no labels of both classes; no baseline", head.name)
            continue
        suffix = "" if len(heads) == 1 else f"/{head.name}"
        start = time.perf_counter()
        online = OnlineStats(events, y)
        shared = time.perf_counter() - start
        counts: FeatureSet | None = None
        counts_seconds = 0.0
        for name in (b for b in baselines if b in allowed):
            start = time.perf_counter()
            seconds = shared
            if name == "constant":
                rate = float(np.nanmean(y[train]))
                p, params = np.full(len(y), rate), {"rate": rate}
            elif name == "rates_lr":
                p, params = _fit_rates_lr(online, y, split, smoothing)
            elif name == "recency_gbdt":
                x, names = recency_features(online)
                p, params = _fit_gbdt(x, names, y, split, n_threads, seed)
            else:
                if counts is None:
                    counts = count_features(online, items)
                    counts_seconds = time.perf_counter() - start
                else:
                    seconds += counts_seconds  # computed for an earlier baseline, used here too
                x, names = counts
                if name == "counts_cf_gbdt":
                    cf, cf_names = cf_features(online, cf_block)
                    x, names = np.column_stack([x, cf]), names + cf_names
                p, params = _fit_gbdt(x, names, y, split, n_threads, seed)
            seconds += time.perf_counter() - start
            if scores is not None:
                scores[name + suffix] = p
            results[name + suffix] = {
                "val": binary_metrics(y[val], p[val]),
                "test": binary_metrics(y[test], p[test]),
                "seconds": seconds,
                "params": params,
            }
            log.info(
                "%s: test auc %.4f rce %.2f (%.1f s)",
                name + suffix,
                results[name + suffix]["test"]["auc"],
                results[name + suffix]["test"]["rce"],
                seconds,
            )
    return results
