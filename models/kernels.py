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

__all__ = [
    "ENABLED",
    "FORGET",
    "cf_window_sums",
    "encode_states",
    "fold_segments",
    "group_cummax",
]

log = logging.getLogger(__name__)

#: Whether the aggregator runs the compiled kernels (True unless ``SKETCHSTREAM_NO_JIT`` is
#: set to something other than ``0`` or empty); read at every call, so tests may flip it.
ENABLED: bool = os.environ.get("SKETCHSTREAM_NO_JIT", "") in ("", "0")

#: A contribution decayed below this is forgotten (exactly 0): it keeps float32 out of
#: denormals and makes "is the channel empty" the same question on every code path (the
#: aggregator's numpy path and these kernels).
FORGET = 2.0**-100


def _compiled(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """``fn`` compiled lazily, its machine code cached on disk; in memory only when no cache
    directory is writable (numba raises RuntimeError when it finds none). ``options``: more
    ``numba.njit`` options (``inline="always"`` for the small helpers of the loops)."""
    if fn is None:
        return lambda f: _compiled(f, **options)
    try:
        return numba.njit(cache=True, nogil=True, **options)(fn)
    except RuntimeError as exc:
        log.warning("numba cannot cache %s (%s): compiling at every start", fn.__name__, exc)
        return numba.njit(nogil=True, **options)(fn)


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


@_compiled(inline="always")
def _put(buf: np.ndarray, p: int, x: int, n_bytes: int) -> int:
    """Write the low ``n_bytes`` of ``x`` at ``buf[p]``, little-endian; the next position."""
    for k in range(n_bytes):
        buf[p + k] = (x >> (8 * k)) & 0xFF
    return p + n_bytes


@_compiled(inline="always")
def _sketch_kind(x: np.ndarray, counts: bool, nibbles_ok: bool) -> int:
    """How ``state_codec`` writes a channel's cells ``x (D*W,)`` (its ``_sketch_encodings``,
    one channel): 0 empty, 1 nibbles, 2 bytes, 3 shorts, 4 sparse."""
    top, low, whole, nan = -np.inf, np.inf, True, False
    for v in x:
        if np.isnan(v):
            nan = True
        top = max(top, v)
        low = min(low, v)
        whole = whole and v == np.floor(v)
    if nan:
        return 4
    if top == 0 and low == 0:
        return 0
    if not (counts and whole and low >= 0 and top < 65536):
        return 4
    if top < 16 and nibbles_ok:
        return 1
    return 2 if top < 256 else 3


@_compiled
def encode_states(
    head: np.ndarray,
    clocks: np.ndarray,
    n_events: np.ndarray,
    partitions: np.ndarray,
    offsets: np.ndarray,
    hist_len: np.ndarray,
    hist_item: np.ndarray,
    hist_ts: np.ndarray,
    hist_action: np.ndarray,
    hist_value: np.ndarray,
    hist_weight: np.ndarray,
    id_len: np.ndarray,
    id_hash: np.ndarray,
    sketches: np.ndarray,
    counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """``state_codec.encode`` (the numpy reference; the format is documented there) in one
    pass per user: ``(buf, bounds)``, user ``i``'s bytes ``buf[bounds[i] : bounds[i + 1]]``.

    ``head (7,)`` int64: the magic, the formats with and without ids, the layout and the
    codebooks digests, the sizes of the header and of a partition pair; ``hist_item``,
    ``id_hash``: int64 views of the uint64 hashes; ``sketches (U, C, D*W)`` float32; the
    rest as in :class:`~sketchstream.models.batches.StateBatch`.
    """
    n_users, n_ch, cells = sketches.shape
    row_bytes = np.array([0, cells // 2, cells, 2 * cells, (cells + 7) // 8])
    kinds = np.empty((n_users, n_ch), np.int64)
    small = np.empty((n_users, 3), np.bool_)  # times as u4 deltas, values as u1, weights all 1
    bounds = np.zeros(n_users + 1, np.int64)
    for i in range(n_users):
        n_hist, size = hist_len[i], head[5] + 8 * id_len[i] + n_ch
        for s in range(partitions.shape[1]):
            size += head[6] if partitions[i, s] >= 0 else 0
        ts_ok, v_ok, w_ok = True, True, True
        for k in range(n_hist):
            delta = clocks[i] - hist_ts[i, k]
            ts_ok = ts_ok and 0 <= delta < 2.0**32 and delta == np.floor(delta)
            ts_ok = ts_ok and clocks[i] - delta == hist_ts[i, k]
            v = hist_value[i, k]
            v_ok = v_ok and (np.isnan(v) or (0 <= v <= 254 and v == np.floor(v)))
            w_ok = w_ok and hist_weight[i, k] == 1.0
        small[i, 0], small[i, 1], small[i, 2] = ts_ok, v_ok, w_ok
        size += n_hist * (8 + (4 if ts_ok else 8) + 1 + (1 if v_ok else 4) + (0 if w_ok else 4))
        for c in range(n_ch):
            kind = _sketch_kind(sketches[i, c], counts[c], cells % 2 == 0)
            kinds[i, c] = kind
            size += row_bytes[kind]
            if kind == 4:
                for v in sketches[i, c]:
                    size += 4 if v != 0 else 0
        bounds[i + 1] = bounds[i] + size
    buf = np.empty(bounds[n_users], np.uint8)
    f8, f4 = np.empty(1, np.float64), np.empty(1, np.float32)
    f8_bits, f4_bits = f8.view(np.int64), f4.view(np.int32)
    for i in range(n_users):
        n_hist, n_ids = hist_len[i], id_len[i]
        n_parts = 0
        for s in range(partitions.shape[1]):
            n_parts += partitions[i, s] >= 0
        f8[0] = clocks[i]
        p = _put(buf, bounds[i], head[0], 2)
        p = _put(buf, p, head[1] if n_ids > 0 else head[2], 1)
        p = _put(buf, p, n_ids, 1)
        p = _put(buf, p, head[3], 8)
        p = _put(buf, p, head[4], 8)
        p = _put(buf, p, f8_bits[0], 8)
        p = _put(buf, p, n_events[i], 8)
        p = _put(buf, p, n_parts, 2)
        p = _put(buf, p, n_hist, 2)
        for q in range(3):
            p = _put(buf, p, 0 if small[i, q] else 1, 1)
        for s in range(partitions.shape[1]):
            if partitions[i, s] >= 0:
                p = _put(buf, p, partitions[i, s], 4)
                p = _put(buf, p, offsets[i, s], 8)
        for k in range(n_hist):
            p = _put(buf, p, hist_item[i, k], 8)
        for k in range(n_hist):
            if small[i, 0]:
                p = _put(buf, p, np.int64(clocks[i] - hist_ts[i, k]), 4)
            else:
                f8[0] = hist_ts[i, k]
                p = _put(buf, p, f8_bits[0], 8)
        for k in range(n_hist):
            p = _put(buf, p, hist_action[i, k], 1)
        for k in range(n_hist):
            if small[i, 1]:
                v = hist_value[i, k]
                p = _put(buf, p, 255 if np.isnan(v) else np.int64(v), 1)
            else:
                f4[0] = hist_value[i, k]
                p = _put(buf, p, f4_bits[0], 4)
        if not small[i, 2]:
            for k in range(n_hist):
                f4[0] = hist_weight[i, k]
                p = _put(buf, p, f4_bits[0], 4)
        for k in range(n_ids):
            p = _put(buf, p, id_hash[i, k], 8)
        for c in range(n_ch):
            p = _put(buf, p, kinds[i, c], 1)
        for kind in range(1, 5):  # the blocks: nibbles, bytes, shorts, then sparse bitmaps
            for c in range(n_ch):
                if kinds[i, c] != kind:
                    continue
                x = sketches[i, c]
                if kind == 1:
                    for j in range(0, cells, 2):
                        p = _put(buf, p, (np.int64(x[j]) << 4) | np.int64(x[j + 1]), 1)
                elif kind == 4:
                    for j in range(0, cells, 8):
                        bits = 0
                        for b in range(8):
                            bits = (bits << 1) | (1 if j + b < cells and x[j + b] != 0 else 0)
                        p = _put(buf, p, bits, 1)
                else:
                    for j in range(cells):
                        p = _put(buf, p, np.int64(x[j]), kind - 1)
        for c in range(n_ch):  # the sparse channels' non-zero values
            if kinds[i, c] == 4:
                for v in sketches[i, c]:
                    if v != 0:
                        f4[0] = v
                        p = _put(buf, p, f4_bits[0], 4)
    return buf, bounds


@_compiled
def group_cummax(x: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """``segments.group_cummax`` (its numpy reference: a sort of ``x`` and one accumulate):
    the inclusive running max of ``x (n,)`` within the runs of ``gid (n,)``, nan the largest
    value (it holds to the end of its group)."""
    out = np.empty_like(x)
    for j in range(x.shape[0]):
        v = x[j]
        if j and gid[j] == gid[j - 1]:
            m = out[j - 1]
            if np.isnan(m) or not (np.isnan(v) or v > m):
                v = m
        out[j] = v
    return out
