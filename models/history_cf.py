"""Features read off the user's bounded history: the item-item CF columns of
:class:`~sketchstream.models.batches.Features` and the window counts.

For each event, the item's similarity (an :class:`~sketchstream.models.similarity.ItemSimilarity`)
to the liked and to the disliked items of the user's bounded history as it stands before the
event, earlier events of the same batch included: :func:`cf_features` (called by
:meth:`~sketchstream.models.aggregator.Aggregator.score_then_fold` on user-sorted rows) and the
sums behind the columns (:class:`CfSums`). :func:`window_counts`: how many entries of that same
history fall within given spans before the event (the
:data:`~sketchstream.models.channels.WINDOWS` columns).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sketchstream.models import kernels
from sketchstream.models.batches import StateBatch
from sketchstream.models.segments import (
    excl,
    excl_cumsum,
    group_cummax,
    group_first,
    run_max,
    run_starts,
)

__all__ = ["CfSums", "cf_features", "rank_scores", "window_counts"]


class CfSums:
    """Per-event sums behind the CF columns (:data:`~sketchstream.models.similarity.CF_NAMES`)
    over the (event, history entry) pairs added: ``s`` the similarity, ``v`` the entry's
    value; liked ``v >= like_min``, disliked ``v < like_min``, unrated (nan) neither. The pairs
    of one event are added as one contiguous run per call."""

    def __init__(self, n: int, like_min: float) -> None:
        self.n, self.like_min = n, like_min
        self.liked_n, self.dis_n = np.zeros(n), np.zeros(n)
        # The weighted sums and maxima, one (n, 8) array (what the compiled kernel adds to);
        # the names are views of its columns, updated in place.
        self.weighted = np.zeros((n, 8))
        (
            self.liked,
            self.dis,
            self.value,
            self.liked_max,
            self.dis_max,
            self.sq,  # the same with weights s^2
            self.liked_sq,
            self.value_sq,
        ) = self.weighted.T

    def add(self, ev: np.ndarray, s: np.ndarray, v: np.ndarray) -> None:
        """All of the events' pairs: the counts, then :meth:`add_weighted`."""
        self.liked_n += np.bincount(ev, v >= self.like_min, self.n)
        self.dis_n += np.bincount(ev, v < self.like_min, self.n)
        self.add_weighted(ev, s, v)

    def add_counts(self, rows: np.ndarray, liked: np.ndarray, disliked: np.ndarray) -> None:
        """Events ``rows`` have ``liked`` liked and ``disliked`` disliked entries more."""
        self.liked_n[rows] += liked
        self.dis_n[rows] += disliked

    def add_weighted(self, ev: np.ndarray, s: np.ndarray, v: np.ndarray) -> None:
        """The similarity-weighted sums and maxima. A pair with ``s == 0`` and a finite or nan
        value adds exactly nothing to them, so callers may leave such pairs out (they are most
        pairs: an item keeps only its top-K neighbours)."""
        n = self.n
        s = s.astype(np.float64)
        lk, dk = v >= self.like_min, v < self.like_min
        rated = lk | dk
        sv = np.where(rated, s * v, 0.0)
        s2 = s * s
        self.liked += np.bincount(ev, s * lk, n)
        self.dis += np.bincount(ev, s * dk, n)
        self.value += np.bincount(ev, sv, n)
        runs = run_starts(ev)
        np.maximum(self.liked_max, run_max(ev, runs, np.where(lk, s, 0.0), n), out=self.liked_max)
        np.maximum(self.dis_max, run_max(ev, runs, np.where(dk, s, 0.0), n), out=self.dis_max)
        self.sq += np.bincount(ev, s2 * rated, n)
        self.liked_sq += np.bincount(ev, s2 * lk, n)
        self.value_sq += np.bincount(ev, sv * s, n)

    def columns(self) -> np.ndarray:
        """``(n, len(CF_NAMES))`` float32 in :data:`CF_NAMES` order."""
        from sketchstream.models.similarity import CF_NAMES

        if kernels.ENABLED:
            out = np.empty((self.n, len(CF_NAMES)), np.float32)
            kernels.cf_columns(self.liked_n, self.dis_n, self.weighted, out)
            return out

        def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.where(b > 0, a / np.where(b > 0, b, 1.0), 0.0)

        has_l, has_d = self.liked_n > 0, self.dis_n > 0
        m_l, m_d = ratio(self.liked, self.liked_n), ratio(self.dis, self.dis_n)
        mass = self.liked + self.dis
        cols = {
            "cf_liked": m_l,
            "cf_disliked": m_d,
            "cf_difference": np.where(has_l & has_d, m_l - m_d, 0.0),
            "cf_has_liked": has_l,
            "cf_has_disliked": has_d,
            "cf_liked_share": ratio(self.liked, mass),
            "cf_log_mass": np.log1p(np.maximum(mass, 0.0)),
            "cf_weighted_value": ratio(self.value, mass),
            "cf_max_liked": self.liked_max,
            "cf_max_disliked": self.dis_max,
            "cf_sharp_liked_share": ratio(self.liked_sq, self.sq),
            "cf_sharp_value": ratio(self.value_sq, self.sq),
        }
        return np.stack([cols[c] for c in CF_NAMES], axis=1).astype(np.float32)


def rank_scores(
    batch: StateBatch, users: np.ndarray, w: np.ndarray, ts: np.ndarray, half_life_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """The history's rank key, ``log2 weight + time / half_life_s``, in float64 with numpy's
    log2 (every user of it ranks with the same bits): of events ``(w, ts)``, and of the stored
    entries of state rows ``users`` ``(len(users), K)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.log2(w.astype(np.float64)) + ts / half_life_s
        stored = np.log2(batch.hist_weight[users].astype(np.float64))
        stored += batch.hist_ts[users] / half_life_s
    return score, stored


def cf_features(
    batch: StateBatch,
    sim: Any,
    u: np.ndarray,
    starts: np.ndarray,
    valid: np.ndarray,
    cand: np.ndarray,
    ts: np.ndarray,
    value: np.ndarray,
    scores: tuple[np.ndarray, np.ndarray],
    hashes: np.ndarray,
    *,
    history_size: int,
) -> np.ndarray:
    """``(n, len(sim.columns))`` CF columns in user-sorted order (see
    :meth:`~sketchstream.models.aggregator.Aggregator.score_then_fold` and
    :data:`~sketchstream.models.similarity.CF_NAMES`). ``scores``: :func:`rank_scores` of the
    events and of the users ``u[starts]``; ``history_size`` K from the aggregator's config.

    The history before event j is the top K, by the history's static rank key (decayed
    weight, time, insertion order), of the stored history and the batch's earlier ``cand``
    events of the user: what folding one event at a time leaves, as the key never changes.
    A user whose batch events each rank above everything before them (time-ordered events
    of equal weight: the usual case) is computed vectorized (:func:`_cf_windows`): the
    last ``min(t, K)`` earlier batch events plus the stored history's first ``K - t``
    slots; other users (late events, weights out of time order) from one sort of their
    entries per batch (:func:`_cf_out_of_rank`).
    """
    from sketchstream.models.similarity import CF_NAMES

    n = len(u)
    k_max = history_size
    out = np.zeros((n, len(CF_NAMES)), np.float32)
    pick = [CF_NAMES.index(c) for c in sim.columns]
    if n == 0 or k_max == 0:
        return out[:, pick]
    like_min = float(sim.like_min)
    score, h_score = scores
    first = group_first(starts)
    gid = np.cumsum(starts) - 1
    users = u[starts]
    h_len = batch.hist_len[users].astype(np.int64)
    slot_ok = np.arange(k_max)[None, :] < h_len[:, None]
    old_max_s = np.where(slot_ok, h_score, -np.inf).max(axis=1)
    old_max_t = np.where(slot_ok, batch.hist_ts[users], -np.inf).max(axis=1)
    # running max of earlier candidates (exclusive), seeded with the stored history
    c_s = np.where(cand, score, -np.inf)
    c_t = np.where(cand, ts, -np.inf)
    inc_s = group_cummax(c_s, gid)
    inc_t = group_cummax(c_t, gid)
    prev_s = np.maximum(_after_previous(inc_s, starts), old_max_s[gid])
    prev_t = np.maximum(_after_previous(inc_t, starts), old_max_t[gid])
    bad_ev = cand & ~((score >= prev_s) & (ts >= prev_t) & np.isfinite(score))
    bad_user = np.zeros(len(users), bool)
    bad_user[gid[bad_ev]] = True
    ci = cand.astype(np.int64)
    t = excl_cumsum(ci, first)  # earlier candidates of the user in this batch
    sums = CfSums(n, like_min)

    fast = np.flatnonzero(valid & ~bad_user[gid])
    if fast.size:
        _cf_windows(batch, sim, sums, fast, gid, users, h_len, t, cand, value, hashes, k_max)

    if bad_user.any():
        _cf_out_of_rank(
            batch, sim, sums, bad_user, gid, users, h_len, h_score, t, valid, cand,
            score, ts, value, hashes, k_max,
        )  # fmt: skip

    out[:] = sums.columns()
    out[~valid] = 0.0
    return out[:, pick]


def _after_previous(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each row's previous row of ``x``, ``-inf`` at a user's first row (``starts``; the
    first row of all is one)."""
    out = np.empty_like(x)
    out[1:] = x[:-1]
    out[starts] = -np.inf
    return out


def _cf_out_of_rank(
    batch: StateBatch,
    sim: Any,
    sums: CfSums,
    bad_user: np.ndarray,
    gid: np.ndarray,
    users: np.ndarray,
    h_len: np.ndarray,
    h_score: np.ndarray,
    t: np.ndarray,
    valid: np.ndarray,
    cand: np.ndarray,
    score: np.ndarray,
    ts: np.ndarray,
    value: np.ndarray,
    hashes: np.ndarray,
    k_max: int,
    max_pairs: int = 1 << 21,
) -> None:
    """The path of :func:`cf_features` for users ``bad_user`` (indices into ``users``),
    whose batch events do not each rank above everything before them: late events, or
    weights that make an older event outrank a newer one.

    Each such user's entries (stored slots and the batch's ``cand`` events) are sorted
    once by the history's rank key (score, time, then insertion order: newer candidates
    first, stored slots in slot order). Event j's history is then the first K entries of
    that order that existed before it: stored slots, and candidates earlier in the batch.
    Its pairs are added in that order, so the sums are those of folding one event at a
    time to the bit. Events are taken in chunks of at most ``max_pairs`` (event, entry)
    pairs: a user with E batch events and L entries costs E x L.
    """
    gb = np.flatnonzero(bad_user)
    so_g, so_s = np.nonzero(np.arange(k_max)[None, :] < h_len[gb][:, None])
    so_g = gb[so_g]
    so_u = users[so_g]
    c_ev = np.flatnonzero(cand & bad_user[gid])
    e_g = np.concatenate([so_g, gid[c_ev]])
    o = np.lexsort(
        (
            -np.concatenate([-1 - so_s, t[c_ev]]).astype(np.float64),  # insertion order
            -np.concatenate([batch.hist_ts[so_u, so_s], ts[c_ev]]),
            -np.concatenate([h_score[so_g, so_s], score[c_ev]]),
            e_g,
        )
    )
    e_rank = sim.ranks(np.concatenate([batch.hist_item[so_u, so_s], hashes[c_ev]])[o])
    e_value = np.concatenate([batch.hist_value[so_u, so_s].astype(np.float64), value[c_ev]])[o]
    e_from = np.concatenate([np.full(so_g.size, -1, np.int64), c_ev])[o]  # seen after
    n_e = np.bincount(e_g, minlength=users.shape[0])
    base = excl(n_e)
    events = np.flatnonzero(valid & bad_user[gid])
    r_events = sim.ranks(hashes[events])  # once per event, not once per pair
    per = n_e[gid[events]]
    ends = np.cumsum(per)
    lo = 0
    while lo < events.size:  # chunks of events with at most max_pairs pairs (or one event)
        done = int(ends[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, done + max_pairs, side="right")))
        ev, cnt = events[lo:hi], per[lo:hi]
        first = excl(cnt)[:-1]
        ev_rep = np.repeat(ev, cnt)
        at = np.repeat(base[gid[ev]] - first, cnt) + np.arange(ev_rep.size)
        seen = e_from[at] < ev_rep
        c = np.cumsum(seen)
        before = np.repeat(np.concatenate(([0], c))[first], cnt)
        keep = np.flatnonzero(seen & (c - before <= k_max))
        pe, pk = ev_rep[keep], at[keep]
        s_val = sim.pair_values(np.repeat(r_events[lo:hi], cnt)[keep], e_rank[pk])
        sums.add(pe, s_val, e_value[pk])
        lo = hi


def _cf_windows(
    batch: StateBatch,
    sim: Any,
    sums: CfSums,
    fast: np.ndarray,
    gid: np.ndarray,
    users: np.ndarray,
    h_len: np.ndarray,
    t: np.ndarray,
    cand: np.ndarray,
    value: np.ndarray,
    hashes: np.ndarray,
    k: int,
) -> None:
    """The vectorized path of :func:`cf_features`: the pairs of events ``fast``.

    Each user's entries are laid out as one run: its ``cand`` events of this batch newest
    first, then its K stored slots (those past its length unknown to the similarity).
    Event j's history, the last ``min(t, K)`` earlier candidates and the first
    ``min(len, K - t)`` stored slots, is then the K entries from its newest earlier
    candidate on: one ``(len(fast), K)`` similarity gather, with the item hashes mapped to
    similarity rows once per entry rather than once per pair. Only its non-zero cells are
    summed (about one in ten), per event its stored slots in slot order, then its
    candidates oldest first: the order of a listing of every pair, so the float64 sums
    are the same to the bit.
    """
    cols = np.arange(k)
    n_cand = np.bincount(gid[cand], minlength=users.shape[0])
    base = excl(n_cand + k)[:-1]
    r_all = sim.ranks(hashes)
    e_rank = np.empty(int(n_cand.sum()) + k * users.shape[0], np.intp)
    e_value = np.empty(e_rank.shape[0], np.float64)
    at = (base + n_cand)[:, None] + cols  # the stored slots
    filled = cols < h_len[:, None]
    e_rank[at] = np.where(filled, sim.ranks(batch.hist_item[users]), sim.unknown)
    e_value[at] = np.where(filled, batch.hist_value[users], np.nan)
    cpos = np.flatnonzero(cand)
    at = base[gid[cpos]] + n_cand[gid[cpos]] - 1 - t[cpos]  # the candidates, newest first
    e_rank[at] = r_all[cpos]
    e_value[at] = value[cpos]

    start = base[gid[fast]] + n_cand[gid[fast]] - t[fast]
    table = sim.bitmap_table() if kernels.ENABLED else None
    if table is not None:  # the pairs read where they are summed, the counts there too
        n_recent = np.minimum(t[fast], k)
        kernels.cf_window_sums_bitmap(
            fast, start, n_recent, r_all[fast], e_rank, *table, e_value, k,
            sums.like_min, sums.weighted, sums.liked_n, sums.dis_n,
        )  # fmt: skip
        return
    s_win = sim.pair_values(r_all[fast, None], e_rank[start[:, None] + cols])
    if kernels.ENABLED:
        n_recent = np.minimum(t[fast], k)
        kernels.cf_window_sums(fast, start, n_recent, s_win, e_value, sums.like_min, sums.weighted)
    else:
        _add_window_pairs(sums, fast, start, t, s_win, e_value, k)
    liked = excl(e_value >= sums.like_min)
    disliked = excl(e_value < sums.like_min)
    sums.add_counts(fast, liked[start + k] - liked[start], disliked[start + k] - disliked[start])


def _add_window_pairs(
    sums: CfSums,
    fast: np.ndarray,
    start: np.ndarray,
    t: np.ndarray,
    s_win: np.ndarray,
    e_value: np.ndarray,
    k: int,
) -> None:
    """The numpy reference of :func:`~sketchstream.models.kernels.cf_window_sums`: the
    weighted sums of the windows ``s_win (len(fast), K)`` of :func:`_cf_windows` (see there),
    over their non-zero pairs listed in the order of a listing of every pair."""
    cols = np.arange(k)
    nonzero = s_win != 0
    infinite = np.isinf(e_value)
    if infinite.any():  # s * inf is nan even for s == 0: keep those pairs as they are
        nonzero |= infinite[start[:, None] + cols]
    flat = np.flatnonzero(nonzero)  # (a 2-D np.nonzero is several times slower)
    r, c = np.divmod(flat, k)
    ev, s_val, v = fast[r], s_win.reshape(-1)[flat], e_value[start[r] + c]
    recent = c < np.minimum(t[fast], k)[r]
    sums.add_weighted(ev[~recent], s_val[~recent], v[~recent])
    # reversed as a whole: each event's candidates oldest first, its run still contiguous
    oldest_first = np.flatnonzero(recent)[::-1]
    sums.add_weighted(ev[oldest_first], s_val[oldest_first], v[oldest_first])


def window_counts(
    batch: StateBatch,
    u: np.ndarray,
    starts: np.ndarray,
    cand: np.ndarray,
    ts: np.ndarray,
    scores: tuple[np.ndarray, np.ndarray],
    read_t: np.ndarray,
    spans: tuple[float, ...],
    *,
    history_size: int,
) -> np.ndarray:
    """``(n, len(spans))`` int64 in user-sorted order (see :func:`cf_features` for ``u``,
    ``starts``, ``cand``, ``ts``, ``scores``): per event, the entries of the user's bounded history
    before it (the top K of the stored history and the batch's earlier ``cand`` events, by the
    history's rank key: what folding one event at a time leaves) whose time is at least
    ``read_t - span``, for each span. Only the set of the top K matters, and entries tied on
    the key have the same time, so no tie-break changes a count: a stream folded in one batch
    or in any split gives the same counts.

    Compiled where :data:`~sketchstream.models.kernels.ENABLED` (one pass per user over its
    entries, sorted once); the numpy code below is its reference: every (event, entry) pair.
    """
    n, k_max = len(u), history_size
    out = np.zeros((n, len(spans)), np.int64)
    if n == 0 or k_max == 0:
        return out
    users = u[starts]
    h_len = np.minimum(batch.hist_len[users], k_max).astype(np.int64)
    score, h_score = scores
    if kernels.ENABLED:
        span = np.asarray(spans, np.float64)
        kernels.window_counts(
            starts, cand, score, ts, read_t, h_len, h_score, batch.hist_ts[users], span, k_max, out
        )
        return out
    gid = np.cumsum(starts) - 1
    so_g, so_s = np.nonzero(np.arange(k_max)[None, :] < h_len[:, None])
    c_ev = np.flatnonzero(cand)
    e_g = np.concatenate([so_g, gid[c_ev]])
    e_ts = np.concatenate([batch.hist_ts[users[so_g], so_s], ts[c_ev]])
    e_score = np.concatenate([h_score[so_g, so_s], score[c_ev]])
    o = np.lexsort((-e_ts, -e_score, e_g))  # each user's entries by rank (nan scores last)
    e_ts = e_ts[o]
    e_from = np.concatenate([np.full(so_g.size, -1, np.int64), c_ev])[o]  # seen after
    n_e = np.bincount(e_g, minlength=users.shape[0])
    per = n_e[gid]  # every event pairs with all of its user's entries
    ev = np.repeat(np.arange(n), per)
    at = np.repeat(excl(n_e)[gid] - excl(per)[:-1], per) + np.arange(ev.size)
    seen = e_from[at] < ev
    taken = np.cumsum(seen)
    taken -= np.repeat((taken - seen)[excl(per)[:-1][per > 0]], per[per > 0])
    kept = seen & (taken <= k_max)
    for j, span in enumerate(spans):
        out[:, j] = np.bincount(ev, kept & (e_ts[at] >= read_t[ev] - span), n)
    return out
