"""Synthetic rating data and state-size figures for the benchmarks (``bench stream``).

:func:`synthetic_ratings`: a rating stream shaped like MovieLens-1M, with item embeddings for
two modalities; :func:`state_size_report`: bytes per serialized user state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from sketchstream.models.channels import DAY

__all__ = ["state_size_report", "synthetic_ratings"]


def state_size_report(states: Iterable[bytes]) -> dict[str, float]:
    """Bytes per serialized user state: ``{"n", "median", "p90", "max", "mean"}``."""
    sizes = np.array([len(s) for s in states], np.float64)
    if sizes.size == 0:
        return {"n": 0, "median": 0.0, "p90": 0.0, "max": 0.0, "mean": 0.0}
    return {
        "n": int(sizes.size),
        "median": float(np.median(sizes)),
        "p90": float(np.percentile(sizes, 90)),
        "max": float(sizes.max()),
        "mean": float(sizes.mean()),
    }


def synthetic_ratings(
    n_users: int = 6040,
    n_items: int = 3700,
    *,
    median_events: float = 96.0,
    mean_events: float = 165.0,
    n_clusters: int = 40,
    dim: int = 32,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A rating stream shaped like MovieLens-1M, with item embeddings for two modalities.

    Events per user: log-normal with the given median and mean, at least 20. Items: Zipf
    popularity; each item belongs to one of ``n_clusters`` taste clusters and each user draws
    60 % of its items from two favourite clusters (so user sketches are as concentrated as
    real ones, not uniform). Ratings 1..5 with MovieLens-1M's frequencies; times integral
    seconds, sessions of minutes with gaps of days.

    Returns ``user (n,)`` int64, ``item (n,)`` str, ``value (n,)`` float32, ``ts (n,)``
    float64 sorted by time; ``item_ids (n_items,)``, ``interaction_vectors`` and
    ``metadata_vectors (n_items, dim)`` float32.
    """
    rng = np.random.default_rng(seed)
    sigma = math.sqrt(2.0 * math.log(mean_events / median_events))
    per_user = np.maximum(20, rng.lognormal(math.log(median_events), sigma, n_users))
    per_user = np.minimum(per_user, n_items // 2).astype(np.int64)
    popularity = 1.0 / (np.arange(n_items) + 10.0)
    popularity = rng.permutation(popularity / popularity.sum())
    cluster = rng.integers(0, n_clusters, n_items)
    users, items, stamps = [], [], []
    t_start = 956_700_000.0  # April 2000, as MovieLens-1M
    span = 3 * 365 * DAY
    for user, count in enumerate(per_user.tolist()):
        fav = np.isin(cluster, rng.integers(0, n_clusters, 2))
        p = 0.4 * popularity + 0.6 * np.where(fav, popularity, 0.0) / popularity[fav].sum()
        items.append(rng.choice(n_items, size=count, replace=False, p=p))
        gaps = rng.exponential(90.0, count)
        gaps[rng.random(count) < 0.03] = rng.exponential(20 * DAY)
        stamps.append(np.floor(t_start + span * rng.beta(0.6, 3.0) + np.cumsum(gaps)))
        users.append(np.full(count, user))
    user = np.concatenate(users)
    item = np.concatenate(items)
    ts = np.concatenate(stamps)
    value = rng.choice(5, size=ts.size, p=[0.056, 0.108, 0.261, 0.349, 0.226]) + 1.0
    order = np.argsort(ts, kind="stable")
    centers = rng.standard_normal((n_clusters, dim))
    inter = centers[cluster] + 0.5 * rng.standard_normal((n_items, dim))
    combos = rng.standard_normal((300, dim))
    combo_of = (cluster * 7 + rng.integers(0, 8, n_items)) % 300  # genres follow taste
    meta = combos[combo_of] + 0.01 * rng.standard_normal((n_items, dim))
    ids = np.array([f"i{k}" for k in range(n_items)], dtype=object)
    return {
        "user": user[order].astype(np.int64),
        "item": ids[item[order]],
        "value": value[order].astype(np.float32),
        "ts": ts[order],
        "item_ids": ids,
        "interaction_vectors": inter.astype(np.float32),
        "metadata_vectors": meta.astype(np.float32),
    }
