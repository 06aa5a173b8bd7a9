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

:func:`recommend_report` runs the comparison of the issue: the EMDE model
(:mod:`~sketchstream.models.recommend`), SASRec (:mod:`~sketchstream.models.sasrec`) and two
baselines, each trained on the training period and tuned or early-stopped on validation, all
ranked on the same test events, returned as the ``"recommend"`` block of ``report.json``.

Baselines:

``popularity``
    :class:`RecentPopularity`: the items' event counts over the stream before the event, each
    event decayed by a half-life picked on validation (``inf``: all-time counts).
``item_cf``
    :class:`ItemCF`: cosine similarity of items over the training period's users (binary
    user x item), top-K neighbours per item; an event's score of item ``j`` is the sum of
    ``sim(i, j)`` over the user's last items ``i``, weighted ``gamma ** age`` (age 0: the
    latest); ``gamma`` picked on validation.

Just over 600 lines, on purpose: the metrics, each event's earlier items, the baselines and the
comparison share one rule (a rank sees only earlier events) and are checked together.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.sparse as sp
from sketchstream.models.errors import ModelError

__all__ = [
    "METHODS",
    "RANK_METRICS",
    "EvalEvents",
    "ItemCF",
    "RecentPopularity",
    "UserHistory",
    "ValidationStopper",
    "evaluate_scorer",
    "holdout_recommend",
    "item_rows",
    "protocol_rows",
    "rank_metrics",
    "recommend_report",
    "train_recommender",
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


class ValidationStopper:
    """Early stopping of a next-item model on validation NDCG@10, shared by the EMDE
    recommender and SASRec: each epoch is logged into ``history``, the best weights are kept,
    and training stops after ``patience`` epochs without a gain; :meth:`restore` puts the best
    weights back."""

    def __init__(self, name: str, model: Any, patience: int, progress: bool = False) -> None:
        self.name, self.model, self.patience, self.progress = name, model, patience, progress
        self.history: list[dict[str, float]] = []
        self.best, self.bad, self.state = -math.inf, 0, None
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def epoch(self, loss: float, metrics: Mapping[str, np.ndarray]) -> bool:
        """Record an epoch's mean loss and validation ranks; True when training should stop."""
        some = len(metrics["ndcg@10"]) > 0
        ndcg = float(metrics["ndcg@10"].mean()) if some else -math.inf
        self.history.append(
            {
                "epoch": len(self.history) + 1,
                "loss": loss,
                "val_ndcg@10": ndcg,
                "val_hr@10": float(metrics["hr@10"].mean()) if some else math.nan,
                "seconds": self.seconds,
            }
        )
        log.info("%s epoch %d: %s", self.name, len(self.history), self.history[-1])
        if self.progress:
            print(f"  {self.name} epoch {len(self.history)}: {self.history[-1]}", flush=True)
        if ndcg > self.best + 1e-6:
            self.best, self.bad = ndcg, 0
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad += 1
        return self.bad >= self.patience

    def restore(self) -> list[dict[str, float]]:
        """The best weights back in the model (in eval mode); returns the history."""
        if self.state is not None:
            self.model.load_state_dict(self.state)
        self.model.eval()
        return self.history


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


# --- the offline comparison --------------------------------------------------------------------

#: the methods :func:`recommend_report` compares, in report order
METHODS = ("sketchstream", "popularity", "item_cf", "sasrec")
POPULARITY_HALF_LIVES_S = (3_600.0, 86_400.0, 7 * 86_400.0, 30 * 86_400.0, math.inf)
ITEM_CF_GAMMAS = (0.2, 0.5, 0.8, 0.95, 1.0)


@dataclass
class RecommendResult:
    """What :func:`recommend_report` returns: ``report`` (the ``"recommend"`` block of
    ``report.json``), the trained model, its catalogue and input spec, the choices made on
    validation, per-epoch histories and timings (seconds), and the recommender's own target
    codebooks (``{modality: Codebook}``; None: it predicts the state's buckets)."""

    report: dict[str, dict[str, dict[str, float]]]
    model: Any  # the fitted SketchRecommender, None when not run
    catalogue: Any  # the recommend.Catalogue ranked
    spec: Any  # the recommend.InputSpec of the model's inputs
    chosen: dict[str, Any]
    histories: dict[str, list[dict[str, float]]]
    timings: dict[str, float]
    counts: dict[str, int]
    target_codebooks: dict[str, Any] | None = None


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Seconds the block took into ``timings[key]``, once it finished (not when it raised)."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def protocol_rows(
    n: int, *, max_train_events: int | None, val_events: int | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream rows ``(train, val, test)`` the comparison uses: the last ``max_train_events``
    of the training period (None: all), ``val_events`` of the validation period drawn with
    ``seed`` (None: all; they pick hyperparameters and stop training), all of the test."""
    from sketchstream.models.events import protocol_split

    tr, va, te = protocol_split(n)
    lo = tr.start if max_train_events is None else max(tr.start, tr.stop - max_train_events)
    val = np.arange(va.start, va.stop)
    if val_events is not None and val_events < len(val):
        val = np.sort(np.random.default_rng(seed).choice(val, val_events, replace=False))
    return np.arange(lo, tr.stop), val, np.arange(te.start, te.stop)


def recommend_report(
    events: Any,
    codebooks: Mapping[str, Any],
    aggregator_config: Any,
    items: Sequence[Any] | None = None,
    *,
    config: Any = None,
    sasrec: Any = None,
    val_events: int | None = 20_000,
    inputs: tuple[np.ndarray, np.ndarray] | None = None,
    methods: Sequence[str] = METHODS,
    cleora: Mapping[str, int] | None = None,
    progress: bool = False,
) -> RecommendResult:
    """Train the sketch recommender and the baselines on the protocol's training period, pick
    their settings on validation, and rank the whole catalogue at every test event.

    ``events``: the stream in protocol order; ``codebooks`` and ``aggregator_config``: the
    state the engagement heads use. The EMDE model learns from the last ``config.train_events`` of
    the training period (None: all of it, as SASRec and item-CF). Its inputs are replayed into
    :class:`~sketchstream.models.recommend.StoredInputs`, past
    :data:`~sketchstream.models.recommend.SPILL_BYTES` into temporary files (``tempfile``'s
    folder: ``TMPDIR``), removed on return. ``inputs``: the :func:`replay_stored` or
    :func:`replay_inputs` output for the rows of :func:`protocol_rows` (train, val, test
    concatenated), to skip the replay.
    With ``config.target_width`` the model predicts the buckets of its own codebooks
    (:func:`fit_target_codebooks`; ``cleora``: their embeddings' ``dim`` and ``iterations``,
    the state's, default :func:`~sketchstream.models.trainer.fit_codebooks`'s), and every
    method ranks the catalogue they know.
    ``methods``: the subset of :data:`METHODS` to run (without "sketchstream" there is no
    replay and ``model`` is None).
    ``report``: ``{"test": {"sketchstream" | "popularity" | "item_cf" | "sasrec": {"hr@10",
    "ndcg@10", "mrr"}}, "test_with_seen": {...}}``; "test" excludes the user's seen items.
    """
    from sketchstream.models.aggregator import Aggregator
    from sketchstream.models.recommend import (
        Catalogue,
        InputSpec,
        RecommendConfig,
        StoredInputs,
        Validation,
        fit_recommender,
        replay_stored,
    )
    from sketchstream.models.sasrec import SASRecConfig, fit_sasrec

    config = config or RecommendConfig()
    sasrec = sasrec or SASRecConfig()
    timings: dict[str, float] = {}
    aggregator = Aggregator(aggregator_config, codebooks)
    targets = config.targets or aggregator.modalities
    target_codebooks = None
    if config.target_width is not None:
        with _timed(timings, "target_codebooks"):
            target_codebooks = fit_target_codebooks(events, items, targets, config, cleora)
    catalogue = Catalogue.from_codebooks(target_codebooks or aggregator.codebooks, targets, items)
    n_items = len(catalogue)
    spec = InputSpec.build(aggregator_config, config, aggregator.depth, aggregator.width)
    n = len(events)
    tr, va, te = protocol_rows(n, max_train_events=config.train_events, val_events=val_events)
    rows = item_rows(events.item, catalogue.ids)
    history = UserHistory(events.user, rows)

    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ModelError(f"recommend_report: unknown methods {unknown}: expected some of {METHODS}")
    val_seen = history.seen(va, n_items)
    val = EvalEvents(va, rows[va], history, n_items)
    test = EvalEvents(te, rows[te], history, n_items)
    results: dict[str, dict[bool, dict[str, float]]] = {}
    chosen: dict[str, Any] = {}
    histories: dict[str, list[dict[str, float]]] = {}
    model = None
    train_all = protocol_rows(n, max_train_events=None, val_events=0)[0]

    def ndcg(res: dict[bool, dict[str, float]]) -> float:
        return res[True]["ndcg@10"]

    if "sketchstream" in methods:  # the EMDE model
        with tempfile.TemporaryDirectory(prefix="sketchstream-recommend-") as spill:
            with _timed(timings, "replay"):
                if inputs is None:
                    keep = np.zeros(n, bool)
                    keep[np.concatenate([tr, va, te])] = True
                    inputs = replay_stored(
                        events, aggregator, keep, spec, progress=progress, spill=spill
                    )
                x, codes = inputs
                inputs = None  # a spilled x is not read past this block
                if len(x) != len(tr) + len(va) + len(te) or x.shape[1] != spec.n_features:
                    raise ModelError(
                        f"recommend_report: inputs {x.shape}, expected "
                        f"({len(tr) + len(va) + len(te)}, {spec.n_features})"
                    )
                if not isinstance(x, StoredInputs):  # whole inputs: no recent items to add
                    x = StoredInputs(spec, x, None)
            x_tr, x_va = x.part(0, len(tr)), x.part(len(tr), len(tr) + len(va))
            x_te = x.part(len(tr) + len(va), len(x))
            if target_codebooks is None:  # the state's buckets, as the replay encoded them
                target_idx = [aggregator.modalities.index(m) for m in targets]
            else:
                codes, target_idx = target_codes(target_codebooks, targets, events.item[tr])
            with _timed(timings, "sketchstream_train"):
                model, histories["sketchstream"] = fit_recommender(
                    x_tr,
                    codes[: len(tr)],
                    Validation(x_va, rows[va], val_seen),
                    catalogue,
                    config,
                    target_modalities=target_idx,
                    progress=progress,
                )
            with _timed(timings, "sketchstream_test"):
                fitted = model
                results["sketchstream"] = evaluate_scorer(
                    lambda p: catalogue.scores(fitted.log_probs(x_te[p])), test
                )
            del x, x_tr, x_va, x_te  # the memory map closes before its folder goes

    if "popularity" in methods:  # recent popularity: half-life on validation
        ts = np.asarray(events.ts, np.float64)

        def popularity(half_life: float, ev: EvalEvents) -> dict[bool, dict[str, float]]:
            wanted = np.zeros(n, bool)
            wanted[ev.events] = True
            stop = int(ev.events.max()) + 1
            walk = RecentPopularity(n_items, half_life).scores(rows[:stop], ts[:stop], wanted)
            return evaluate_streamed(walk, ev)

        with _timed(timings, "popularity_train"):
            chosen["popularity_half_life_s"], chosen["popularity_val"] = pick(
                POPULARITY_HALF_LIVES_S, lambda h: ndcg(popularity(h, val)), "popularity half-life"
            )
        with _timed(timings, "popularity_test"):
            results["popularity"] = popularity(chosen["popularity_half_life_s"], test)

    if "item_cf" in methods:  # item-item CF on the training period: recency weight on validation
        with _timed(timings, "item_cf_train"):
            cf = ItemCF(n_items).fit(events.user[train_all], rows[train_all])
            length = sasrec.max_len

            def cf_eval(gamma: float, ev: EvalEvents) -> dict[bool, dict[str, float]]:
                cf.gamma = gamma
                return evaluate_scorer(lambda p: cf.scores(history.last(ev.events[p], length)), ev)

            chosen["item_cf_gamma"], chosen["item_cf_val"] = pick(
                ITEM_CF_GAMMAS, lambda g: ndcg(cf_eval(g, val)), "item-CF gamma"
            )
        with _timed(timings, "item_cf_test"):
            results["item_cf"] = cf_eval(chosen["item_cf_gamma"], test)

    if "sasrec" in methods:  # SASRec on the training period's sequences
        with _timed(timings, "sasrec_train"):
            u_train = np.asarray(events.user[train_all]).astype(str)
            order = np.argsort(u_train, kind="stable")
            cuts = np.flatnonzero(np.r_[True, u_train[order][1:] != u_train[order][:-1]])
            sequences = np.split(rows[train_all][order], cuts[1:])
            sas, histories["sasrec"] = fit_sasrec(
                sequences,
                history.last(va, sasrec.max_len),
                rows[va],
                n_items,
                sasrec,
                val_exclude=val_seen,
                progress=progress,
            )
        with _timed(timings, "sasrec_test"):
            results["sasrec"] = evaluate_scorer(
                lambda p: sas.scores(history.last(te[p], sasrec.max_len)), test
            )

    keys = ("hr@10", "ndcg@10", "mrr")
    report = {
        split: {
            name: {k: results[name][seen][k] for k in keys} for name in METHODS if name in results
        }
        for split, seen in (("test", True), ("test_with_seen", False))
    }
    counts = {
        "test_events": len(te),
        "test_targets_outside_catalogue": int((rows[te] < 0).sum()),
        "catalogue_items": n_items,
        "train_events": len(tr),
        "val_events": len(va),
    }
    return RecommendResult(
        report, model, catalogue, spec, chosen, histories, timings, counts, target_codebooks
    )


def fit_target_codebooks(
    events: Any,
    items: Sequence[Any] | None,
    targets: Sequence[str],
    config: Any,
    cleora: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The recommender's own codebooks ``{modality: Codebook}`` for ``targets``: Cleora on the
    protocol's training period, as the state's codebooks are made (seeded with
    ``config.seed``; ``cleora``: ``dim`` and ``iterations``), partitioned into
    ``config.target_depth`` levels of ``config.target_width`` buckets."""
    from sketchstream.models.events import protocol_split
    from sketchstream.models.trainer import fit_codebooks

    fitted = fit_codebooks(
        events[protocol_split(len(events))[0]],
        items,
        **dict(cleora or {}),
        depth=config.target_depth,
        width=config.target_width,
        metadata="metadata" in targets,
        seed=config.seed,
    )
    missing = [m for m in targets if m not in fitted]
    if missing:
        raise ModelError(
            f"recommend targets {list(missing)}: the training period gives no such codebook "
            f"(it has {', '.join(fitted)})"
        )
    log.info(
        "recommend: its own target codebooks (%s), %d levels x %d buckets each",
        ", ".join(targets),
        config.target_depth,
        config.target_width,
    )
    return {m: fitted[m] for m in targets}


def target_codes(
    codebooks: Mapping[str, Any], targets: Sequence[str], items: Any
) -> tuple[np.ndarray, list[int]]:
    """``(codes (n, M, depth), modalities 0..M-1)``: the target buckets of event ``items`` in
    the recommender's own codebooks, -1 where an item is unknown to one (no loss there)."""
    ids = [str(i) for i in items]
    codes = np.stack([codebooks[m].encode(ids) for m in targets], axis=1)
    return codes, list(range(len(targets)))


def holdout_recommend(parts: Any, bundle: Any, events: Any) -> dict[str, float]:
    """``{"hr@10", "ndcg@10", "mrr", "n"}`` (seen items excluded) of an artifact's recommender
    ``parts`` on the protocol's test period of ``events``: the stream replayed from empty
    states through ``bundle``'s aggregator and codebooks, every test event ranked from the
    state before it. The refresh gate measures the serving recommender with it, on the events
    :func:`train_recommender`'s own figures come from; a target outside the recommender's
    catalogue is a miss."""
    from sketchstream.models.aggregator import Aggregator
    from sketchstream.models.channels import aggregator_config_from_dict
    from sketchstream.models.events import protocol_split
    from sketchstream.models.recommend import replay_stored

    aggregator = Aggregator(aggregator_config_from_dict(bundle.aggregator_config), bundle.codebooks)
    test = np.arange(len(events))[protocol_split(len(events))[2]]
    keep = np.zeros(len(events), bool)
    keep[test] = True
    rows = item_rows(events.item, parts.catalogue.ids)
    ev = EvalEvents(test, rows[test], UserHistory(events.user, rows), len(parts.catalogue))
    with tempfile.TemporaryDirectory(prefix="sketchstream-recommend-") as spill:
        x = replay_stored(events, aggregator, keep, parts.spec, spill=spill)[0]
        scored = evaluate_scorer(
            lambda p, x=x: parts.catalogue.scores(parts.model.log_probs(x[p])),
            ev,
            seen_modes=(True,),
        )
    return scored[True]


def train_recommender(
    events: Any,
    items: Sequence[Any] | None,
    result: Any,
    *,
    seed: int = 0,
    progress: bool = False,
    config: Any = None,
) -> tuple[Any, dict]:
    """The EMDE recommender for an artifact, trained on the codebooks and aggregator of a
    trainer result (``ProtocolResult``) over the same events, seeded like its MLP: returns the
    artifact's ``RecommenderParts`` and the ``recommend`` block of its own figures. Used by
    ``sketchstream train --recommender`` and by the refresh job when the served model has one
    (with the served recommender's ``config``, a ``RecommendConfig``; None: the defaults; its
    seed is ``seed``)."""
    from sketchstream.models.artifacts import RecommenderParts
    from sketchstream.models.channels import aggregator_config_from_dict
    from sketchstream.models.recommend import RecommendConfig

    aggregator = aggregator_config_from_dict(result.aggregator_config)
    config = replace(config or RecommendConfig(), seed=seed)
    train = result.train_config
    ranked = recommend_report(
        events,
        result.codebooks,
        aggregator,
        items or None,
        config=config,
        methods=("sketchstream",),
        cleora={"dim": train.cleora_dim, "iterations": train.cleora_iterations},
        progress=progress,
    )
    return RecommenderParts.from_result(ranked, config, aggregator), ranked.report
