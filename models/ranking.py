"""Prequential next-item ranking: the metrics, each event's earlier items, and two baselines.

At every evaluated event of a user, a recommender ranks the whole catalogue from what it knew
*before* the event; the target is the event's item. :func:`rank_metrics` turns a score matrix
into HR@k, NDCG@k and reciprocal rank per event; :class:`UserHistory` gives each event its
user's earlier items (the "seen" mask and the last ``L`` items) from the stream alone, so no
rank can read a later event.

Ties: the target's rank is uniform over the positions its tied items share (the expected value
under random tie-breaking), so a constant scorer gets HR@10 = 10 / n_items and nothing gains
by returning equal scores. An event whose target is outside the catalogue, or was excluded
(seen before, with ``exclude_seen``), scores 0 on every metric: it is a miss for every method.

Baselines on the same events (:func:`recommend_report` adds the EMDE model and SASRec):

``popularity``
    :class:`RecentPopularity`: the items' event counts over the stream before the event, each
    event decayed by a half-life picked on validation (``inf``: all-time counts).
``item_cf``
    :class:`ItemCF`: cosine similarity of items over the training period's users (binary
    user x item), top-K neighbours per item; an event's score of item ``j`` is the sum of
    ``sim(i, j)`` over the user's last items ``i``, weighted ``gamma ** age`` (age 0: the
    latest); ``gamma`` picked on validation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from sketchstream.models.errors import ModelError

__all__ = [
    "RANK_METRICS",
    "ItemCF",
    "RecentPopularity",
    "UserHistory",
    "evaluate_scorer",
    "item_rows",
    "rank_metrics",
]

log = logging.getLogger(__name__)

RANK_METRICS = ("hr@10", "ndcg@10", "mrr")


# --- metrics -----------------------------------------------------------------------------------


def _prefix(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``H[r] = sum_{q<=r} 1/q`` and ``G[r] = sum_{q<=r} 1/log2(q+1)`` for r in [0, n]."""
    r = np.arange(1, n + 1, dtype=np.float64)
    h = np.concatenate([[0.0], np.cumsum(1.0 / r)])
    g = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(r + 1.0))])
    return h, g


def rank_metrics(
    scores: np.ndarray,
    target: np.ndarray,
    exclude: np.ndarray | None = None,
    *,
    k: int = 10,
) -> dict[str, np.ndarray]:
    """Per-event ``hr@k``, ``ndcg@k`` and ``rr`` ``(B,)`` float64 of targets among scores.

    ``scores (B, N)``: higher is better; ``target (B,)`` int: the target's column, -1 when it
    is outside the catalogue; ``exclude (B, N)`` bool: items removed from the ranking (a
    target removed this way is a miss). The target's rank ``r`` is uniform on
    ``g+1 .. g+t+1`` (``g`` items strictly better, ``t`` tied with it); each metric is its
    expectation over that range.
    """
    s = np.asarray(scores, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    if s.ndim != 2 or target.shape != (s.shape[0],):
        raise ModelError(f"rank_metrics: scores {s.shape} and target {target.shape} disagree")
    if exclude is not None and exclude.shape != s.shape:
        raise ModelError(f"rank_metrics: exclude {exclude.shape}, scores {s.shape}")
    if k < 1:
        raise ModelError(f"rank_metrics: k must be >= 1, got {k}")
    b, n = s.shape
    rows = np.arange(b)
    known = (target >= 0) & (target < n)
    tcol = np.where(known, target, 0)
    if exclude is not None:
        known &= ~exclude[rows, tcol]
        s = np.where(exclude, -np.inf, s)
    ts = s[rows, tcol][:, None]
    greater = (s > ts).sum(axis=1)
    tied = (s == ts).sum(axis=1) - 1
    h, g = _prefix(n + 1)
    last = greater + tied + 1  # the worst rank the target can take
    span = tied + 1.0
    hr = np.clip(np.minimum(k, last) - greater, 0, None) / span
    ndcg = (g[np.minimum(k, last)] - g[np.minimum(k, greater)]) / span
    rr = (h[last] - h[greater]) / span
    alone = tied == 0  # the plain values, without the prefix sums' rounding
    ndcg = np.where(alone, np.where(last <= k, 1.0 / np.log2(last + 1.0), 0.0), ndcg)
    rr = np.where(alone, 1.0 / last, rr)
    zero = np.zeros(b)
    return {
        f"hr@{k}": np.where(known, hr, zero),
        f"ndcg@{k}": np.where(known, ndcg, zero),
        "rr": np.where(known, rr, zero),
    }


def _summary(parts: list[dict[str, np.ndarray]]) -> dict[str, float]:
    hr = np.concatenate([p["hr@10"] for p in parts])
    nd = np.concatenate([p["ndcg@10"] for p in parts])
    rr = np.concatenate([p["rr"] for p in parts])
    if hr.size == 0:
        return {"hr@10": math.nan, "ndcg@10": math.nan, "mrr": math.nan, "n": 0}
    return {
        "hr@10": float(hr.mean()),
        "ndcg@10": float(nd.mean()),
        "mrr": float(rr.mean()),
        "n": int(hr.size),
    }


# --- each event's earlier items ----------------------------------------------------------------


def item_rows(items: np.ndarray, catalogue: Sequence[str]) -> np.ndarray:
    """Row of each item id in ``catalogue`` ``(n,)`` int64; -1 for items outside it."""
    index = {str(i): r for r, i in enumerate(catalogue)}
    get = index.get
    lst = np.asarray(items, dtype=object).tolist()
    return np.fromiter((get(str(x), -1) for x in lst), np.int64, len(lst))


class UserHistory:
    """Each event's earlier items of its user, read off the stream (rows in stream order).

    ``users (n,)``: user ids; ``rows (n,)`` int: each event's catalogue row (-1 outside the
    catalogue; such events still count as earlier events but name no item).
    """

    def __init__(self, users: np.ndarray, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        _, uid = np.unique(np.asarray(users).astype(str), return_inverse=True)
        if uid.shape != rows.shape:
            raise ModelError(f"UserHistory: {uid.shape[0]} users for {rows.shape[0]} rows")
        order = np.argsort(uid, kind="stable")  # per user, stream order
        su = uid[order]
        starts = np.flatnonzero(np.r_[True, su[1:] != su[:-1]])
        first = np.repeat(starts, np.diff(np.r_[starts, len(su)]))
        self.by_user = rows[order]  # (n,) the items, user after user, each in stream order
        self.start = np.empty(len(rows), np.int64)  # event -> where its user's items begin
        self.position = np.empty(len(rows), np.int64)  # event -> how many earlier events
        self.start[order] = first
        self.position[order] = np.arange(len(su)) - first

    def seen(self, events: np.ndarray, n_items: int) -> np.ndarray:
        """``(B, n_items)`` bool: the items each event's user had before it."""
        events = np.asarray(events, dtype=np.int64)
        out = np.zeros((len(events), n_items), bool)
        k = self.position[events]
        owner = np.repeat(np.arange(len(events)), k)
        at = np.repeat(self.start[events], k) + (
            np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)
        )
        item = self.by_user[at]
        ok = item >= 0
        out[owner[ok], item[ok]] = True
        return out

    def last(self, events: np.ndarray, length: int) -> np.ndarray:
        """``(B, length)`` int64: each event's user's last ``length`` items before it, oldest
        first, right-aligned, -1 padding (and -1 for items outside the catalogue)."""
        events = np.asarray(events, dtype=np.int64)
        k = self.position[events]
        offs = np.arange(-length, 0)[None, :] + k[:, None]  # positions within the user
        ok = offs >= 0
        at = np.where(ok, self.start[events][:, None] + offs, 0)
        return np.where(ok, self.by_user[at], -1)


# --- baselines ---------------------------------------------------------------------------------


class RecentPopularity:
    """Decayed item counts over the stream before each event: ``(B, n_items)`` scores.

    ``half_life_s``: seconds for an event's count to halve (``inf``: plain counts). Exact:
    an event's scores include every earlier event in stream order, and no later one.
    """

    def __init__(self, n_items: int, half_life_s: float = math.inf) -> None:
        if not half_life_s > 0:
            raise ModelError(f"RecentPopularity: half_life_s must be > 0, got {half_life_s}")
        self.n_items = n_items
        self.half_life_s = float(half_life_s)

    def scores(
        self, rows: np.ndarray, ts: np.ndarray, wanted: np.ndarray, chunk: int = 512
    ) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Walk the stream (``rows (n,)`` catalogue rows, ``ts (n,)`` times, stream order) and
        yield ``(events, scores (B, n_items))`` for the events where ``wanted (n,)`` is set."""
        n, h = len(rows), self.half_life_s
        counts = np.zeros(self.n_items, np.float64)
        clock = float(ts[0]) if n else 0.0
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            r, t = rows[a:b], ts[a:b].astype(np.float64)
            known = r >= 0
            want = np.flatnonzero(wanted[a:b])
            if want.size:
                # earlier events of the chunk: decay(t_i - t_j) for j < i
                dt = t[want][:, None] - t[None, :]
                w = np.where(np.arange(b - a)[None, :] < want[:, None], np.exp2(-dt / h), 0.0)
                w[:, ~known] = 0.0
                onehot = sp.csr_matrix(
                    (np.ones(known.sum()), (np.flatnonzero(known), r[known])),
                    shape=(b - a, self.n_items),
                )
                s = np.exp2(-(t[want] - clock) / h)[:, None] * counts[None, :]
                s += np.asarray(onehot.T.dot(w.T).T)
                yield a + want, s
            end = t[-1]
            counts *= np.exp2(-(end - clock) / h)
            np.add.at(counts, r[known], np.exp2(-(end - t[known]) / h))
            clock = end


class ItemCF:
    """Item-item cosine CF from a training period: ``fit(users, rows)``, then ``scores(last)``.

    ``top_k``: neighbours kept per item (ties at the K-th value kept); ``gamma``: weight of
    the user's ``age``-th most recent item is ``gamma ** age``.
    """

    def __init__(self, n_items: int, *, top_k: int = 100, gamma: float = 0.9) -> None:
        self.n_items = n_items
        self.top_k = top_k
        self.gamma = gamma

    def fit(self, users: np.ndarray, rows: np.ndarray) -> ItemCF:
        """Fit on training events ``users (n,)``, catalogue ``rows (n,)`` (-1 skipped)."""
        keep = np.asarray(rows) >= 0
        _, uid = np.unique(np.asarray(users)[keep].astype(str), return_inverse=True)
        r = sp.csr_matrix(
            (np.ones(keep.sum(), np.float32), (uid, np.asarray(rows)[keep])),
            shape=(uid.max() + 1 if uid.size else 0, self.n_items),
        )
        r.data[:] = 1.0  # binary: a repeated (user, item) counts once
        r.sum_duplicates()
        r.data[:] = 1.0
        co = np.asarray((r.T @ r).todense(), dtype=np.float32)
        norm = np.sqrt(np.maximum(np.diag(co), 1.0))
        sim = co / norm[:, None] / norm[None, :]
        np.fill_diagonal(sim, 0.0)
        k = min(self.top_k, self.n_items - 1)
        if k > 0:
            kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1 : k]
            sim = np.where(sim >= np.maximum(kth, np.finfo(np.float32).tiny), sim, 0.0)
        self.similarity_ = sp.csr_matrix(sim.astype(np.float32))
        return self

    def scores(self, last: np.ndarray) -> np.ndarray:
        """``(B, n_items)`` from each event's last items ``(B, L)`` (oldest first, -1 none)."""
        b, length = last.shape
        age = np.arange(length - 1, -1, -1)
        w = np.broadcast_to(self.gamma**age, last.shape)
        ok = last >= 0
        weights = sp.csr_matrix((w[ok], (np.nonzero(ok)[0], last[ok])), shape=(b, self.n_items))
        return np.asarray((weights @ self.similarity_).todense())


# --- evaluation --------------------------------------------------------------------------------


@dataclass
class EvalEvents:
    """The events a ranking is measured on: ``events (B,)`` stream rows, ``target (B,)``
    catalogue rows (-1 outside), and the stream's :class:`UserHistory`."""

    events: np.ndarray
    target: np.ndarray
    history: UserHistory
    n_items: int


def evaluate_scorer(
    score_chunk: Callable[[np.ndarray], np.ndarray],
    ev: EvalEvents,
    *,
    chunk: int = 1024,
    seen_modes: Sequence[bool] = (True, False),
) -> dict[bool, dict[str, float]]:
    """``{exclude_seen: {"hr@10", "ndcg@10", "mrr", "n"}}`` of a scorer on ``ev``.

    ``score_chunk(positions)`` returns ``(len(positions), n_items)`` scores for the events at
    ``positions`` (indices into ``ev.events``).
    """
    parts: dict[bool, list[dict[str, np.ndarray]]] = {m: [] for m in seen_modes}
    for a in range(0, len(ev.events), chunk):
        pos = np.arange(a, min(a + chunk, len(ev.events)))
        s = score_chunk(pos)
        seen = ev.history.seen(ev.events[pos], ev.n_items) if True in parts else None
        for mode in seen_modes:
            parts[mode].append(rank_metrics(s, ev.target[pos], seen if mode else None))
    return {m: _summary(p) for m, p in parts.items()}


def evaluate_streamed(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    ev: EvalEvents,
    *,
    seen_modes: Sequence[bool] = (True, False),
) -> dict[bool, dict[str, float]]:
    """As :func:`evaluate_scorer`, for a scorer that walks the stream and yields
    ``(stream rows, scores)`` itself (:meth:`RecentPopularity.scores`)."""
    where = {int(e): p for p, e in enumerate(ev.events.tolist())}
    parts: dict[bool, list[dict[str, np.ndarray]]] = {m: [] for m in seen_modes}
    for events, s in chunks:
        pos = np.array([where[int(e)] for e in events], np.int64)
        seen = ev.history.seen(events, ev.n_items) if True in parts else None
        for mode in seen_modes:
            parts[mode].append(rank_metrics(s, ev.target[pos], seen if mode else None))
    return {m: _summary(p) for m, p in parts.items()}


def pick(
    grid: Sequence[Any], measure: Callable[[Any], float], what: str
) -> tuple[Any, dict[str, float]]:
    """The grid value with the best validation measure, and every value's measure."""
    got = {repr(v): measure(v) for v in grid}
    best = max(grid, key=lambda v: got[repr(v)])
    log.info("%s on validation: %s -> %r", what, got, best)
    return best, got
