"""Compiled (numba) kernels of the aggregator's per-event loops, and the switch to the numpy
reference.

The numpy code of :mod:`~sketchstream.models.aggregator` and
:mod:`~sketchstream.models.history_cf` folds a batch in closed form: sorts, segmented scans and
scatters, a few dozen whole-batch calls. Measured on the worker's batches (ML-1M, batch 2048
and 200), those calls cost ~15 µs an event in the fold alone, most of it call overhead and
intermediate arrays; the same arithmetic as one loop over a user's events costs about 1 µs.
So the loops that dominate run here, compiled, and the numpy code stays as the reference
they are tested against (equal within 1e-6; the sketches written back to the bit).

:data:`ENABLED` is the switch, read at every call: ``SKETCHSTREAM_NO_JIT=1`` in the
environment turns the kernels off at import (the numpy path then runs everywhere), and tests
flip it to run both paths.

Compilation is cached on disk (``cache=True``): beside this file in ``__pycache__``, or, where
that is read-only, in numba's user-wide cache (``~/.cache/numba``, or ``NUMBA_CACHE_DIR``), so
a worker pays it on its first start only. Where no cache directory is writable at all, the
kernels compile in memory at every start (logged).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

__all__ = ["ENABLED", "cf_window_sums", "fold_segments"]

log = logging.getLogger(__name__)

#: Whether the aggregator runs the compiled kernels (True unless ``SKETCHSTREAM_NO_JIT`` is
#: set to something other than ``0`` or empty); read at every call, so tests may flip it.
ENABLED: bool = os.environ.get("SKETCHSTREAM_NO_JIT", "") in ("", "0")

#: A contribution decayed below this is forgotten (exactly 0): it keeps float32 out of
#: denormals and makes "is the channel empty" the same question on every code path (the
#: aggregator's numpy path and these kernels).
FORGET = 2.0**-100


def _compiled(fn: Callable[..., Any]) -> Any:
    """``fn`` compiled lazily, its machine code cached on disk; in memory only when no cache
    directory is writable (numba raises RuntimeError when it finds none)."""
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError as exc:
        log.warning("numba cannot cache %s (%s): compiling at every start", fn.__name__, exc)
        return numba.njit(nogil=True)(fn)


@_compiled
def fold_segments(
    u: np.ndarray,
    seg_start: np.ndarray,
    ts: np.ndarray,
    valid: np.ndarray,
    codes: np.ndarray,
    known: np.ndarray,
    contrib: np.ndarray,
    w: np.ndarray,
    read_t: np.ndarray,
    sketches: np.ndarray,
    clocks: np.ndarray,
    ch_mod: np.ndarray,
    ch_half: np.ndarray,
    ch_weight: np.ndarray,
    dens_out: np.ndarray,
    mass_out: np.ndarray,
) -> None:
    """Features then fold for a batch's events in user-sorted order, one segment at a time.

    A segment (``seg_start (n,)`` True where one begins) is one pass of one user (see
    ``Aggregator._fold_pass``, the numpy reference): every event of it is read at the user's
    clock after the pass, ``t0``, its earlier events' contributions scaled by
    ``2^((ts - t0)/h)``; then the touched channels are decayed to ``t0`` and the contributions
    added, in the reference's order (event, channel, depth) and float32 arithmetic, so the
    sketches come out the same to the bit.

    ``u (n,)`` state rows; ``ts, w, read_t (n,)`` float64; ``valid (n,)``; ``codes (n, M, D)``
    int16 item buckets; ``known, contrib (n, C)`` bool (item known in the channel's modality;
    event feeds the channel); ``sketches (U, C, D, W)`` float32 and ``clocks (U,)``, updated in
    place; ``ch_mod, ch_half, ch_weight (C,)``; ``dens_out, mass_out (n, C)`` float64, written.
    """
    n = u.shape[0]
    n_ch, depth, width = sketches.shape[1], sketches.shape[2], sketches.shape[3]
    acc = np.zeros((n_ch, depth, width))  # earlier events' scaled weights, per bucket
    sw = np.zeros((n, n_ch))
    f0 = np.empty(n_ch)
    mass0 = np.empty(n_ch)
    run_mass = np.empty(n_ch)
    a = 0
    while a < n:
        b = a + 1
        while b < n and not seg_start[b]:
            b += 1
        user = u[a]
        clock0 = clocks[user]
        has_clock = not np.isnan(clock0)
        t0 = clock0 if has_clock else -np.inf
        for j in range(a, b):
            if valid[j] and ts[j] > t0:
                t0 = ts[j]
        active = np.isfinite(t0)
        if not active:
            t0 = 0.0
        for c in range(n_ch):
            f0[c] = np.exp2(-((t0 - clock0) if has_clock else 0.0) / ch_half[c])
            total = 0.0
            for x in range(width):
                total += np.float64(sketches[user, c, 0, x])
            m0 = total * f0[c]
            mass0[c] = m0 if m0 >= FORGET else 0.0
            run_mass[c] = 0.0
        for j in range(a, b):
            for c in range(n_ch):
                mo = ch_mod[c]
                mass = mass0[c] + run_mass[c]
                dens = 0.0
                if known[j, c] and valid[j] and mass > 0:
                    for d in range(depth):
                        code = codes[j, mo, d]
                        bucket = np.float64(sketches[user, c, d, code]) * f0[c]
                        if bucket < FORGET:
                            bucket = 0.0
                        dens += (bucket + acc[c, d, code]) / mass
                    dens /= depth
                dens_out[j, c] = dens
                dt_read = (read_t[j] - t0) if valid[j] else 0.0
                mass_out[j, c] = mass * np.exp2(-dt_read / ch_half[c])
                if contrib[j, c]:
                    s = w[j] * ch_weight[c] * np.exp2(-(t0 - ts[j]) / ch_half[c])
                    if s < FORGET:
                        s = 0.0
                    sw[j, c] = s
                    run_mass[c] += s
                    for d in range(depth):
                        acc[c, d, codes[j, mo, d]] += s
        # Fold: decay the user's channels to t0, then add the contributions.
        for c in range(n_ch):
            if np.isfinite(ch_half[c]) and f0[c] != 1.0:
                f32 = np.float32(f0[c])
                for d in range(depth):
                    for x in range(width):
                        v = sketches[user, c, d, x] * f32
                        sketches[user, c, d, x] = v if v >= FORGET else np.float32(0.0)
        for j in range(a, b):
            for c in range(n_ch):
                if contrib[j, c]:
                    s32 = np.float32(sw[j, c])
                    mo = ch_mod[c]
                    for d in range(depth):
                        code = codes[j, mo, d]
                        sketches[user, c, d, code] += s32
                        acc[c, d, code] = 0.0  # clean for the next segment
        if active:
            clocks[user] = t0
        a = b


@_compiled
def cf_window_sums(
    ev: np.ndarray,
    start: np.ndarray,
    recent: np.ndarray,
    s_win: np.ndarray,
    e_value: np.ndarray,
    like_min: float,
    out: np.ndarray,
) -> None:
    """The similarity-weighted CF sums of ``history_cf._cf_windows`` (the numpy reference:
    ``CfSums.add_weighted`` over the non-zero pairs): for window row ``r`` (event ``ev[r]``),
    its stored slots ``recent[r] .. K - 1`` in slot order, then its ``recent[r]`` newest
    earlier candidates oldest first, each sum over the first group then the second, as the
    reference adds them, so the float64 sums are the same to the bit.

    ``s_win (R, K)`` float32 similarities of each window; ``e_value`` the entries' values,
    window ``r`` being ``e_value[start[r] : start[r] + K]``; ``out (n, 8)`` float64, added to:
    liked, disliked, value, liked max, disliked max, sq, liked sq, value sq (``CfSums``' order).
    """
    k = s_win.shape[1]
    part = np.zeros(8)
    for r in range(ev.shape[0]):
        e = ev[r]
        for group in range(2):
            part[:] = 0.0
            lo, hi, step = (recent[r], k, 1) if group == 0 else (recent[r] - 1, -1, -1)
            for col in range(lo, hi, step):
                s = np.float64(s_win[r, col])
                v = e_value[start[r] + col]
                if s == 0.0 and not np.isinf(v):
                    continue  # adds exactly nothing (the reference leaves it out too)
                lk = v >= like_min
                dk = v < like_min
                sv = s * v if (lk or dk) else 0.0
                part[0] += s * lk
                part[1] += s * dk
                part[2] += sv
                part[3] = max(part[3], s if lk else 0.0)
                part[4] = max(part[4], s if dk else 0.0)
                part[5] += (s * s) * (lk or dk)
                part[6] += (s * s) * lk
                part[7] += sv * s
            for q in range(3):
                out[e, q] += part[q]
            for q in range(3, 5):
                out[e, q] = max(out[e, q], part[q])
            for q in range(5, 8):
                out[e, q] += part[q]
