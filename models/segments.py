"""Scans over rows sorted by group (a batch's events sorted by user).

The aggregator works on a batch's events in user-sorted order: each user's events are one
contiguous run of rows. These helpers compute per-group quantities over such runs without a
Python loop per group. Vocabulary: ``starts (n,)`` bool, True where a group's run begins;
``first (n,)`` int, the index of each row's group start (:func:`group_first`); ``gid (n,)`` int,
each row's group number (``cumsum(starts) - 1``); ``counts (g,)``, rows per group.
"""

from __future__ import annotations

import numpy as np
from sketchstream.models import kernels

__all__ = [
    "excl",
    "excl_cumsum",
    "excl_scan",
    "group_cummax",
    "group_first",
    "per_group_all",
    "ranks",
    "run_flags",
    "run_max",
    "run_starts",
]


def excl(counts: np.ndarray) -> np.ndarray:
    """Exclusive prefix sums ``(n + 1,)`` int64: group ``i`` spans ``[out[i], out[i + 1])``."""
    out = np.zeros(counts.shape[0] + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def ranks(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of ``counts (n,)`` consecutive rows: each row's group and rank in it."""
    group = np.repeat(np.arange(counts.shape[0]), counts)
    return group, np.arange(group.shape[0]) - excl(counts)[group]


def per_group_all(ok: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    """``(n,)`` bool: every row of the group is ``ok`` (True for empty groups)."""
    return np.bincount(group[~ok], minlength=n) == 0


def run_flags(a: np.ndarray) -> np.ndarray:
    """Bool, True where a run of equal values of ``a`` starts, as ``np.r_[True, a[1:] !=
    a[:-1]]`` (which costs ~10 µs of Python a call; this runs several times a batch)."""
    return np.concatenate(([True], a[1:] != a[:-1]))


def shift1(x: np.ndarray) -> np.ndarray:
    """``np.roll(x, 1)`` of a 1-D array (each row's previous row, the last one first),
    without ``roll``'s ~10 µs of Python a call."""
    out = np.empty_like(x)
    if x.shape[0]:
        out[1:] = x[:-1]
        out[0] = x[-1]
    return out


def run_ends(starts: np.ndarray) -> np.ndarray:
    """Where each run ends (its last row), from the run-start flags ``starts`` (the first row's
    set), as ``np.r_[np.flatnonzero(starts)[1:] - 1, len(starts) - 1]``."""
    return np.flatnonzero(np.concatenate((starts[1:], [True])))


def run_starts(ev: np.ndarray) -> np.ndarray:
    """Where each run of equal values of ``ev`` starts."""
    return np.flatnonzero(run_flags(ev)) if ev.size else np.zeros(0, np.intp)


def run_max(ev: np.ndarray, starts: np.ndarray, vals: np.ndarray, n: int) -> np.ndarray:
    """``(n,)`` per-index max of ``vals`` (0 where absent) when each index of ``ev`` occupies
    one contiguous run (how the CF lookups are laid out), the runs starting at ``starts``."""
    out = np.zeros(n)
    if ev.size:
        out[ev[starts]] = np.maximum.reduceat(vals, starts)
    return out


def group_first(starts: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(np.where(starts, np.arange(starts.shape[0]), 0), axis=0)


def excl_cumsum(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per row: the sum of integer ``x (n,)`` over earlier rows of its group (exact)."""
    ex = np.cumsum(x, axis=0) - x
    return ex - ex[first]


def excl_scan(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Per row: the sum of ``x`` over earlier rows of its group, along axis 0, for floats.

    ``pos``: each row's position in its (contiguous) group, shape ``x.shape[:pos.ndim]``. A
    segmented Hillis-Steele scan: log2(longest group) vectorized steps, each adding only rows of
    the same group, so one user's small decayed weights never mix with another user's rounding
    (a single global cumsum would) and an empty prefix is exactly 0.
    """
    p = pos.reshape(pos.shape + (1,) * (x.ndim - pos.ndim))
    y = np.zeros_like(x)
    y[1:] = np.where(p[1:] >= 1, x[:-1], 0)
    top = int(pos.max()) if pos.size else 0
    k = 1
    while k <= top:
        prev = y
        y = y.copy()
        y[k:] += np.where(p[k:] >= k, prev[:-k], 0)
        k *= 2
    return y


def group_cummax(x: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """Inclusive running max of float ``x (n,)`` within groups ``gid`` (non-decreasing).

    Compiled where :data:`~sketchstream.models.kernels.ENABLED` (one loop instead of a sort:
    ~0.1 ms a call less); this numpy code is its reference."""
    if kernels.ENABLED:
        return kernels.group_cummax(x, gid)
    uniq, rank = np.unique(x, return_inverse=True)
    m = len(uniq)
    key = gid * m + rank
    return uniq[np.maximum.accumulate(key) - gid * m]
