"""Compiled (numba) kernels of the worker's per-event loops, and the switch back to the numpy
reference.

The numpy code of the aggregator works on whole batches: sorts, segmented scans and scatters,
a few dozen array calls per step. On the worker's batches (ML-1M, hidden-256 model) most of
that time is call overhead and temporaries, paid per batch, so small batches pay it most.
What runs here instead, each the same arithmetic as one loop per user or per state:

- :func:`fold_segments`: features then fold of a batch (``Aggregator._fold_pass``), ~20 ->
  ~1 µs an event;
- :func:`cf_window_sums`: the CF columns' weighted sums (``history_cf._cf_windows``),
  :func:`cf_window_sums_bitmap` the same reading a catalog's bitmap of its similar pairs
  where it sums (no window of similarities gathered first), and :func:`cf_columns` the
  columns from them (``history_cf.CfSums.columns``); :func:`bitmap_values` the pairs'
  values from that bitmap (``ItemSimilarity.pair_values``);
- :func:`hash_rows`: item hashes to similarity rows (``ItemSimilarity.ranks``);
- :func:`group_cummax`: a running max per group (``segments.group_cummax``);
- :func:`merge_history`: each user's bounded history (``Aggregator._merge_history``), and
  :func:`window_counts` the entries of it within spans before each event
  (``history_cf.window_counts``);
- :func:`encode_states`, :func:`decode_states`: the state bytes (``state_codec``), ~8 and
  ~6 -> ~2 µs an event at batch 200;
- :func:`l2_rows`: rows L2-normalised (``emde.normalize``, the recommender's inputs), and
  :func:`recent_sketches` the decayed sketches of a user's last items
  (``recommend.recent_sketches``).

Each numpy version stays as the reference the kernel is tested against
(tests/models/test_kernels.py): states, CF columns and bytes to the bit, density and mass
within 1e-6 (sums in another order).

:data:`ENABLED` is the switch, read at every call: ``SKETCHSTREAM_NO_JIT=1`` in the
environment turns the kernels off at import (the numpy code then runs everywhere), and tests
flip it to run both paths.

Compilation (tens of seconds, once) is cached on disk (``cache=True``): in
``NUMBA_CACHE_DIR`` when set, else beside this file in ``__pycache__``, else, where that is
read-only, in numba's user-wide cache (``~/.cache/numba``); a start with the cache warm loads
the kernels in about a second. Where no cache directory is writable at all, the kernels
compile in memory at every start (logged).

Why over 1,000 lines: each kernel restates a numpy reference step for step (the codec pair is
a third of it); they live together so that the switch and the caching are in one place.
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
    "REFUSALS",
    "bitmap_values",
    "cf_columns",
    "cf_window_sums",
    "cf_window_sums_bitmap",
    "compiled",
    "decode_states",
    "encode_states",
    "fold_segments",
    "group_cummax",
    "hash_rows",
    "l2_rows",
    "merge_history",
    "recent_sketches",
    "window_counts",
]

log = logging.getLogger(__name__)

#: Whether the aggregator runs the compiled kernels (True unless ``SKETCHSTREAM_NO_JIT`` is
#: set to something other than ``0`` or empty); read at every call, so tests may flip it.
ENABLED: bool = os.environ.get("SKETCHSTREAM_NO_JIT", "") in ("", "0")

#: A contribution decayed below this is forgotten (exactly 0): it keeps float32 out of
#: denormals and makes "is the channel empty" the same question on every code path (the
#: aggregator's numpy path and these kernels).
FORGET = 2.0**-100


def compiled(fn: Callable[..., Any] | None = None, *, fastmath: bool = False) -> Any:
    """``fn`` compiled lazily, its machine code cached on disk; in memory only when no cache
    directory is writable (numba raises RuntimeError when it finds none). ``fastmath``: let
    the compiler reorder float sums (vectorized reductions; the result moves in the last
    bits), for the MLP's kernels, never for the states' (:mod:`.mlp_kernels`)."""
    if fn is None:
        return lambda f: compiled(f, fastmath=fastmath)
    try:
        return numba.njit(cache=True, nogil=True, fastmath=fastmath)(fn)
    except RuntimeError as exc:
        log.warning("numba cannot cache %s (%s): compiling at every start", fn.__name__, exc)
        return numba.njit(nogil=True, fastmath=fastmath)(fn)


@compiled
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


@compiled
def _add_window(
    out: np.ndarray,
    e: int,
    sims: np.ndarray,
    kept: np.ndarray,
    m: int,
    values: np.ndarray,
    recent: int,
    like_min: float,
    part: np.ndarray,
) -> None:
    """One event's window of K entries (values ``values``) added to row ``e`` of ``out``:
    its stored slots ``recent .. K - 1`` in slot order, then its ``recent`` newest earlier
    candidates oldest first, each group summed in ``part`` (scratch, 8) then added, as
    ``CfSums.add_weighted`` adds them (the same float64 sums to the bit). ``kept[:m]``: the
    columns that may add something, ascending (all K, or the pairs a lookup found),
    ``sims[:m]`` their similarities."""
    split = 0  # the stored slots (cols >= recent) start here
    while split < m and kept[split] < recent:
        split += 1
    for group in range(2):
        part[:] = 0.0
        lo, hi, step = (split, m, 1) if group == 0 else (split - 1, -1, -1)
        for i in range(lo, hi, step):
            s = np.float64(sims[i])
            v = values[kept[i]]
            if s == 0.0 and not np.isinf(v):
                continue  # adds exactly nothing (the reference leaves it out too)
            _add_pair(part, s, v, like_min)
        _add_part(out, e, part)


@compiled
def _add_pair(part: np.ndarray, s: float, v: float, like_min: float) -> None:
    """One (event, entry) pair of similarity ``s`` and value ``v`` added to a group's sums
    ``part (8,)`` (``CfSums``' order: liked, disliked, value, liked max, disliked max, sq,
    liked sq, value sq), as ``CfSums.add_weighted`` adds it."""
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


@compiled
def _add_part(out: np.ndarray, e: int, part: np.ndarray) -> None:
    """A group's sums ``part`` added to event ``e``'s row of ``out (n, 8)`` (maxima kept)."""
    for q in range(3):
        out[e, q] += part[q]
    for q in range(3, 5):
        out[e, q] = max(out[e, q], part[q])
    for q in range(5, 8):
        out[e, q] += part[q]


@compiled
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
    cols = np.arange(k)
    for r in range(ev.shape[0]):
        window = e_value[start[r] : start[r] + k]
        _add_window(out, ev[r], s_win[r], cols, k, window, recent[r], like_min, part)


@compiled
def _popcount(x: np.uint64) -> int:
    """The set bits of ``x`` (SWAR)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@compiled
def _bitmap_value(
    bits: np.ndarray, first: np.ndarray, values: np.ndarray, row: int, col: int
) -> tuple[bool, float]:
    """Whether the pair ``(row, col)`` is kept in ``ItemSimilarity.bitmap_table`` and its
    float32 value (0 where not): a bit per pair, the value at the word's first pair plus
    the set bits below it. (The flag, not the value, is what a caller should branch on:
    testing the value for 0 made the CF sums ~15 % slower.)"""
    word = bits[row, col >> 6]
    bit = np.uint64(col & 63)
    if (word >> bit) & np.uint64(1):
        below = word & ((np.uint64(1) << bit) - np.uint64(1))
        return True, values[first[row, col >> 6] + _popcount(below)]
    return False, np.float32(0.0)


@compiled
def bitmap_values(
    ra: np.ndarray,
    rb: np.ndarray,
    bits: np.ndarray,
    first: np.ndarray,
    values: np.ndarray,
    out: np.ndarray,
) -> None:
    """``ItemSimilarity.pair_values`` for flat rows ``ra``, ``rb`` from its bitmap table,
    into ``out`` (float32): each pair's value, 0 where it is not kept."""
    for j in range(ra.shape[0]):
        out[j] = _bitmap_value(bits, first, values, ra[j], rb[j])[1]


@compiled
def cf_window_sums_bitmap(
    ev: np.ndarray,
    start: np.ndarray,
    recent: np.ndarray,
    r_ev: np.ndarray,
    e_rank: np.ndarray,
    bits: np.ndarray,
    first: np.ndarray,
    values: np.ndarray,
    e_value: np.ndarray,
    width: int,
    like_min: float,
    out: np.ndarray,
    liked_n: np.ndarray,
    dis_n: np.ndarray,
) -> None:
    """:func:`cf_window_sums` over windows of ``width`` (K) entries, reading each pair's
    similarity where it sums from a catalog's bitmap of its pairs (``ItemSimilarity.
    bitmap_table``: ``bits``, ``first``, ``values``), the pair of row ``r_ev[r]`` and
    ``e_rank[start[r] + col]``, and counting each window's liked and disliked entries into
    ``liked_n``, ``dis_n`` (``history_cf._cf_windows``' counts). No ``(R, K)`` window of
    similarities nor cumulative counts in memory: a window's kept pairs (about one in ten)
    are found in one pass, then summed by :func:`_add_window`, the stored slots in slot
    order and the candidates oldest first: the same sums to the bit. (A dense
    ``(N + 1)^2`` float32 table read here before, 54 MB on MovieLens-1M and a cache miss a
    pair: 1.25 -> 1.0 µs an event there; instacart's 6,911 items took a search of all the
    pairs: its fold 9.6 -> 3.5 µs an event at batches of 2,048.)"""
    part = np.zeros(8)
    sims = np.empty(width, np.float64)
    kept = np.empty(width, np.int64)
    for r in range(ev.shape[0]):
        e = ev[r]
        row = r_ev[r]
        window = e_value[start[r] : start[r] + width]
        ranks = e_rank[start[r] : start[r] + width]
        n_liked = 0
        n_dis = 0
        m = 0
        for col in range(width):
            v = window[col]
            found, s = _bitmap_value(bits, first, values, row, ranks[col])
            if found or np.isinf(v):  # a missing pair adds nothing, but for an infinite value
                sims[m], kept[m] = s, col
                m += 1
            if v >= like_min:
                n_liked += 1
            elif v < like_min:
                n_dis += 1
        liked_n[e] += n_liked
        dis_n[e] += n_dis
        _add_window(out, e, sims, kept, m, window, recent[r], like_min, part)


@compiled
def hash_rows(
    h: np.ndarray,
    shift: int,
    first: np.ndarray,
    padded: np.ndarray,
    hashes: np.ndarray,
    unknown: int,
    out: np.ndarray,
) -> None:
    """``ItemSimilarity.ranks`` (the numpy reference) for flat ``h``: each hash's row in the
    sorted ``hashes``, ``unknown`` where it has none, into ``out``. A probe of the bucket's
    first row (``first``, ``padded``: the directory), a binary search where the bucket holds
    more rows and the first is not it."""
    n = hashes.shape[0]
    for j in range(h.shape[0]):
        x = h[j]
        b = np.int64(x >> np.uint64(shift))
        lo = first[b]
        if padded[lo] == x:
            out[j] = lo
        elif first[b + 1] - lo > 1:
            r = min(np.searchsorted(hashes, x), n - 1)
            out[j] = r if hashes[r] == x else unknown
        else:
            out[j] = unknown


@compiled
def cf_columns(liked_n: np.ndarray, dis_n: np.ndarray, sums: np.ndarray, out: np.ndarray) -> None:
    """``history_cf.CfSums.columns`` (the numpy reference) in one pass: ``out (n, 12)``
    float32 in :data:`~sketchstream.models.similarity.CF_NAMES` order from the pair counts
    ``liked_n``, ``dis_n`` and the weighted sums ``sums (n, 8)`` (``CfSums``' order), each
    column computed in float64 as the reference does, then rounded: the same to the bit."""
    for e in range(out.shape[0]):
        liked, dis, value = sums[e, 0], sums[e, 1], sums[e, 2]
        sq, liked_sq, value_sq = sums[e, 5], sums[e, 6], sums[e, 7]
        has_l, has_d = liked_n[e] > 0, dis_n[e] > 0
        m_l = liked / liked_n[e] if liked_n[e] > 0 else 0.0
        m_d = dis / dis_n[e] if dis_n[e] > 0 else 0.0
        mass = liked + dis
        out[e, 0] = m_l
        out[e, 1] = m_d
        out[e, 2] = m_l - m_d if has_l and has_d else 0.0
        out[e, 3] = 1.0 if has_l else 0.0
        out[e, 4] = 1.0 if has_d else 0.0
        out[e, 5] = liked / mass if mass > 0 else 0.0
        out[e, 6] = np.log1p(max(mass, 0.0))
        out[e, 7] = value / mass if mass > 0 else 0.0
        out[e, 8] = sums[e, 3]
        out[e, 9] = sums[e, 4]
        out[e, 10] = liked_sq / sq if sq > 0 else 0.0
        out[e, 11] = value_sq / sq if sq > 0 else 0.0


@compiled
def _put(buf: np.ndarray, p: int, x: int, n_bytes: int) -> int:
    """Write the low ``n_bytes`` of ``x`` at ``buf[p]``, little-endian; the next position."""
    for k in range(n_bytes):
        buf[p + k] = (x >> (8 * k)) & 0xFF
    return p + n_bytes


@compiled
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


@compiled
def encode_states(
    head: np.ndarray,
    clocks: np.ndarray,
    prev_clocks: np.ndarray,
    first_ts: np.ndarray,
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

    ``head (8,)`` int64: the magic, the formats with and without ids, the layout and the
    codebooks digests, the sizes of the header and of a partition pair, the format with the
    times (written for every state with a finite ``first_ts``); ``hist_item``,
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
        size += 16 if np.isfinite(first_ts[i]) else 0
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
        timed = np.isfinite(first_ts[i])
        p = _put(buf, bounds[i], head[0], 2)
        p = _put(buf, p, head[7] if timed else (head[1] if n_ids > 0 else head[2]), 1)
        p = _put(buf, p, n_ids, 1)
        p = _put(buf, p, head[3], 8)
        p = _put(buf, p, head[4], 8)
        p = _put(buf, p, f8_bits[0], 8)
        p = _put(buf, p, n_events[i], 8)
        p = _put(buf, p, n_parts, 2)
        p = _put(buf, p, n_hist, 2)
        for q in range(3):
            p = _put(buf, p, 0 if small[i, q] else 1, 1)
        if timed:
            f8[0] = prev_clocks[i]
            p = _put(buf, p, f8_bits[0], 8)
            f8[0] = first_ts[i]
            p = _put(buf, p, f8_bits[0], 8)
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


@compiled
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


@compiled
def _get(data: np.ndarray, p: int, n_bytes: int) -> int:
    """The little-endian integer of ``n_bytes`` at ``data[p]`` (8 bytes: its int64 bits)."""
    x = 0
    for k in range(n_bytes):
        x |= np.int64(data[p + k]) << (8 * k)
    return x


#: Why :func:`decode_states` refuses a blob (``refused``), in the order ``state_codec.decode``
#: checks: 0 readable, then the keys of ``state_codec``'s messages.
REFUSALS = (
    "",
    "short",
    "format",
    "v2 flags",
    "history encoding",
    "truncated",
    "sketch encoding",
    "nibbles",
    "bytes",
    "shorts",
    "bitmaps",
    "values",
)


@compiled
def _sketches_refused(data: np.ndarray, p: int, end: int, n_ch: int, cells: int) -> int:
    """Why a blob's sketch section at ``data[p:end]`` is refused (:data:`REFUSALS`; 0: it
    is not): an unknown encoding, a block (nibbles, bytes, shorts, bitmaps, in block order)
    cut short, or values that are not 4 bytes for each bit of the bitmaps."""
    row_bytes = (0, cells // 2, cells, 2 * cells, (cells + 7) // 8)
    block_end = p + n_ch
    for kind in range(1, 5):
        rows = 0
        for c in range(n_ch):
            if data[p + c] > 4:
                return 6
            rows += data[p + c] == kind
        block_end += rows * row_bytes[kind]
        if rows and end < block_end:
            return 6 + kind
    n_sparse = 0
    for c in range(n_ch):
        n_sparse += data[p + c] == 4
    nnz, bits = 0, block_end - n_sparse * row_bytes[4]
    for _ in range(n_sparse):
        for j in range(cells):
            nnz += (data[bits + j // 8] >> (7 - j % 8)) & 1
        bits += row_bytes[4]
    return 11 if end - block_end != 4 * nnz else 0


@compiled
def _read_sketches(data: np.ndarray, p: int, cells: int, out: np.ndarray) -> None:
    """A blob's sketch section at ``data[p]`` into ``out (C, D*W)`` float32."""
    n_ch = out.shape[0]
    row_bytes = (0, cells // 2, cells, 2 * cells, (cells + 7) // 8)
    at = p + n_ch  # the start of the block being read
    bitmaps = at
    for kind in range(1, 5):
        for c in range(n_ch):
            if data[p + c] != kind:
                continue
            x = out[c]
            if kind == 1:
                for j in range(0, cells, 2):
                    x[j], x[j + 1] = data[at + j // 2] >> 4, data[at + j // 2] & 15
            elif kind == 2:
                for j in range(cells):
                    x[j] = data[at + j]
            elif kind == 3:
                for j in range(cells):
                    x[j] = _get(data, at + 2 * j, 2)
            at += row_bytes[kind]
        if kind == 3:
            bitmaps = at
    f4 = np.empty(1, np.float32)
    f4_bits = f4.view(np.int32)
    for c in range(n_ch):  # the values follow the bitmaps, in channel order
        if data[p + c] != 4:
            continue
        x = out[c]
        for j in range(cells):
            if (data[bitmaps + j // 8] >> (7 - j % 8)) & 1:
                f4_bits[0] = _get(data, at, 4)
                x[j] = f4[0]
                at += 4
            else:
                x[j] = 0.0
        bitmaps += row_bytes[4]


@compiled
def decode_states(
    data: np.ndarray,
    bounds: np.ndarray,
    rows: np.ndarray,
    head: np.ndarray,
    fill: bool,
    refused: np.ndarray,
    n_parts: np.ndarray,
    n_ids: np.ndarray,
    fresh: np.ndarray,
    clocks: np.ndarray,
    prev_clocks: np.ndarray,
    first_ts: np.ndarray,
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
) -> None:
    """``state_codec.decode`` (the numpy reference; the format is documented there) in one
    pass per blob ``data[bounds[k] : bounds[k + 1]]``, run twice.

    With ``fill`` False it checks every blob and writes why each is refused (``refused
    (k,)``, an index into :data:`REFUSALS`, the first check it fails in the reference's
    order), its partition and id counts and whether its sketches are read (``fresh``), so
    the caller raises as the reference does and sizes the partition and id arrays. With
    ``fill`` True it reads blob ``k`` into row ``rows[k]`` of the batch arrays (``hist_item``,
    ``id_hash``: int64 views of the uint64 hashes; ``sketches (U, C, D*W)`` float32).

    ``head (10,)`` int64: the magic, the formats with and without ids, the layout and codebooks
    digests, the header and pair sizes, the history size K, the id window and the format with
    the times (``prev_clocks``, ``first_ts``: nan from the formats without them). The
    header's fields are read at the offsets ``state_codec._HEAD`` gives them
    (tests/models/test_kernels.py reads every encoding both ways).
    """
    n_ch, cells = sketches.shape[1], sketches.shape[2]
    layout, books, hs, ps, k_max, window = head[3], head[4], head[5], head[6], head[7], head[8]
    f8, f4 = np.empty(1, np.float64), np.empty(1, np.float32)
    f8_bits, f4_bits = f8.view(np.int64), f4.view(np.int32)
    for r in range(rows.shape[0]):
        b0, end = bounds[r], bounds[r + 1]
        if not fill:
            refused[r] = _blob_refused(data, b0, end, head, n_ch, cells)
            if refused[r] > 4 or refused[r] == 0:
                n_parts[r], n_ids[r] = _get(data, b0 + 36, 2), data[b0 + 3]
                fresh[r] = _get(data, b0 + 4, 8) == layout and _get(data, b0 + 12, 8) == books
            continue
        u = rows[r]
        parts, ids, n_hist = n_parts[r], n_ids[r], _get(data, b0 + 38, 2)
        ts_kind, v_kind, w_kind = data[b0 + 40], data[b0 + 41], data[b0 + 42]
        f8_bits[0] = _get(data, b0 + 20, 8)
        clock = f8[0]
        clocks[u] = clock
        n_events[u] = _get(data, b0 + 28, 8)
        p = b0 + hs
        prev_clocks[u], first_ts[u] = np.nan, np.nan
        if data[b0 + 2] == head[9]:
            f8_bits[0] = _get(data, p, 8)
            prev_clocks[u] = f8[0]
            f8_bits[0] = _get(data, p + 8, 8)
            first_ts[u] = f8[0]
            p += 16
        for s in range(parts):
            partitions[u, s] = _get(data, p, 4)
            offsets[u, s] = _get(data, p + 4, 8)
            p += ps
        keep = min(n_hist, k_max)  # stored in rank order: keep the top K
        hist_len[u] = keep
        for k in range(keep):
            hist_item[u, k] = _get(data, p + 8 * k, 8)
        p += 8 * n_hist
        for k in range(keep):
            if ts_kind:
                f8_bits[0] = _get(data, p + 8 * k, 8)
                hist_ts[u, k] = f8[0]
            else:
                hist_ts[u, k] = clock - _get(data, p + 4 * k, 4)
        p += (8 if ts_kind else 4) * n_hist
        for k in range(keep):
            hist_action[u, k] = data[p + k]
        p += n_hist
        for k in range(keep):
            if v_kind:
                f4_bits[0] = _get(data, p + 4 * k, 4)
                hist_value[u, k] = f4[0]
            else:
                hist_value[u, k] = np.nan if data[p + k] == 255 else data[p + k]
        p += (4 if v_kind else 1) * n_hist
        for k in range(keep):
            if w_kind:
                f4_bits[0] = _get(data, p + 4 * k, 4)
                hist_weight[u, k] = f4[0]
            else:
                hist_weight[u, k] = 1.0
        p += (4 if w_kind else 0) * n_hist
        drop = max(ids - window, 0)  # keep each window's newest ids
        for k in range(drop, ids):
            id_hash[u, k - drop] = _get(data, p + 8 * k, 8)
        id_len[u] = min(ids, window)
        if fresh[r]:
            _read_sketches(data, p + 8 * ids, cells, sketches[u])


@compiled
def _blob_refused(
    data: np.ndarray, b0: int, end: int, head: np.ndarray, n_ch: int, cells: int
) -> int:
    """Why :func:`decode_states` refuses the blob ``data[b0:end]`` (:data:`REFUSALS`)."""
    hs, ps = head[5], head[6]
    if end - b0 < hs:
        return 1
    fmt, ids = data[b0 + 2], data[b0 + 3]
    if _get(data, b0, 2) != head[0] or (fmt != head[1] and fmt != head[2] and fmt != head[9]):
        return 2
    if fmt == head[2] and ids != 0:
        return 3
    ts_kind, v_kind, w_kind = data[b0 + 40], data[b0 + 41], data[b0 + 42]
    if ts_kind > 1 or v_kind > 1 or w_kind > 1:
        return 4
    parts, n_hist = _get(data, b0 + 36, 2), _get(data, b0 + 38, 2)
    entry = 8 + (8 if ts_kind else 4) + 1 + (4 if v_kind else 1) + (4 if w_kind else 0)
    p_sk = b0 + hs + (16 if fmt == head[9] else 0) + ps * parts + n_hist * entry + 8 * ids
    fresh = _get(data, b0 + 4, 8) == head[3] and _get(data, b0 + 12, 8) == head[4]
    if end < p_sk + (n_ch if fresh else 0):
        return 5
    return _sketches_refused(data, p_sk, end, n_ch, cells) if fresh else 0


@compiled
def _order_desc(x: float, y: float) -> int:
    """1 when ``x`` ranks before ``y`` in a descending order with nan last (``np.lexsort`` of
    ``-x``), -1 when after, 0 when tied."""
    if x == y or (np.isnan(x) and np.isnan(y)):
        return 0
    if np.isnan(y) or (not np.isnan(x) and x > y):
        return 1
    return -1


@compiled
def _sorted_entries(n: int, score: np.ndarray, ts: np.ndarray, recency: np.ndarray) -> np.ndarray:
    """Entries ``0 .. n - 1`` by history rank: score, time and recency descending, nan last
    (``Aggregator._merge_history``'s lexsort); a bottom-up merge sort."""
    src, dst = np.arange(n), np.empty(n, np.int64)
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j = lo, mid
            for k in range(lo, hi):
                take_right = i == mid
                if j < hi and i < mid:
                    a, b = src[i], src[j]
                    order = _order_desc(score[b], score[a])
                    if order == 0:
                        order = _order_desc(ts[b], ts[a])
                    if order == 0:
                        order = 1 if recency[b] > recency[a] else -1
                    take_right = order > 0
                if take_right:
                    dst[k] = src[j]
                    j += 1
                else:
                    dst[k] = src[i]
                    i += 1
        src, dst = dst, src
        width *= 2
    return src


@compiled
def merge_history(
    users: np.ndarray,
    bounds: np.ndarray,
    new_item: np.ndarray,
    new_ts: np.ndarray,
    new_action: np.ndarray,
    new_value: np.ndarray,
    new_weight: np.ndarray,
    new_score: np.ndarray,
    old_score: np.ndarray,
    hist_len: np.ndarray,
    hist_item: np.ndarray,
    hist_ts: np.ndarray,
    hist_action: np.ndarray,
    hist_value: np.ndarray,
    hist_weight: np.ndarray,
) -> None:
    """``Aggregator._merge_history`` (the numpy reference: one lexsort of every entry): each
    user's stored history and new events ranked together, the top K kept, in rank order.

    ``users (G,)`` the state rows, the new events of ``users[g]`` at ``bounds[g] ..
    bounds[g + 1]`` (in fold order) of the ``new_*`` columns (``new_item``: int64 view of
    the hashes); ``new_score (m,)``, ``old_score (G, K)``: each entry's rank score
    (``log2 weight + ts / half-life``, computed by the caller with numpy's log2, so that
    ties break as in the reference); the ``hist_*`` arrays ``(U, K)`` are updated in place.
    """
    k_max = hist_item.shape[1]
    for g in range(users.shape[0]):
        user, lo, hi = users[g], bounds[g], bounds[g + 1]
        n_old = min(hist_len[user], k_max)
        n = n_old + hi - lo
        score, ts, recency = np.empty(n), np.empty(n), np.empty(n, np.int64)
        for e in range(n):
            if e < n_old:
                score[e], ts[e], recency[e] = old_score[g, e], hist_ts[user, e], n_old - 1 - e
            else:
                score[e], ts[e], recency[e] = new_score[lo + e - n_old], new_ts[lo + e - n_old], e
        keep = _sorted_entries(n, score, ts, recency)[:k_max]
        item, action = np.empty(keep.size, np.int64), np.empty(keep.size, np.int16)
        value, weight = np.empty(keep.size, np.float32), np.empty(keep.size, np.float32)
        for s in range(keep.size):
            e = keep[s]
            if e < n_old:
                item[s], action[s] = hist_item[user, e], hist_action[user, e]
                value[s], weight[s] = hist_value[user, e], hist_weight[user, e]
            else:
                f = lo + e - n_old
                item[s], action[s] = new_item[f], new_action[f]
                value[s], weight[s] = new_value[f], new_weight[f]
        for s in range(k_max):
            if s < keep.size:
                e = keep[s]
                hist_item[user, s], hist_ts[user, s], hist_action[user, s] = (
                    item[s],
                    ts[e],
                    action[s],
                )
                hist_value[user, s], hist_weight[user, s] = value[s], weight[s]
            else:
                hist_item[user, s], hist_ts[user, s], hist_action[user, s] = 0, 0.0, -1
                hist_value[user, s], hist_weight[user, s] = 0.0, 0.0
        hist_len[user] = keep.size


@compiled
def _in_rank_order(order: np.ndarray, score: np.ndarray, ts: np.ndarray, by_time: bool) -> bool:
    """Whether entries ``order`` run down the history's rank (score, then time, descending;
    equal pairs in any order), or with ``by_time`` down their times alone."""
    for q in range(1, order.shape[0]):
        a, b = order[q - 1], order[q]
        if by_time:
            if _order_desc(ts[a], ts[b]) < 0:
                return False
            continue
        first = _order_desc(score[a], score[b])
        if first < 0 or (first == 0 and _order_desc(ts[a], ts[b]) < 0):
            return False
    return True


@compiled
def window_counts(
    starts: np.ndarray,
    cand: np.ndarray,
    score: np.ndarray,
    ts: np.ndarray,
    read_t: np.ndarray,
    h_len: np.ndarray,
    h_score: np.ndarray,
    h_ts: np.ndarray,
    spans: np.ndarray,
    k_max: int,
    out: np.ndarray,
) -> None:
    """``history_cf.window_counts`` into ``out (n, S)``: per user (the runs of ``starts``, the
    g-th with ``h_len[g]`` stored entries ``h_score[g]``, ``h_ts[g]``), its ``cand`` events
    newest first then its stored entries, sorted by rank (:func:`_sorted_entries`) unless
    they already are (events in time order and of equal weight: the usual case); each event
    then walks them, takes the first ``k_max`` it has seen (stored, or an earlier event) and
    counts those within each span before ``read_t``. Where that order also runs down the
    times, a walk stops at the first entry older than the longest span."""
    n = starts.shape[0]
    longest = spans.max()
    g, a = -1, 0
    while a < n:
        g += 1
        b = a + 1
        while b < n and not starts[b]:
            b += 1
        n_old = h_len[g]
        n_new = 0
        for j in range(a, b):
            n_new += 1 if cand[j] else 0
        size = n_old + n_new
        e_score, e_ts = np.empty(size), np.empty(size)
        e_from, recency = np.empty(size, np.int64), np.zeros(size, np.int64)
        e = n_new
        for j in range(a, b):  # the events newest first, then the stored entries
            if cand[j]:
                e -= 1
                e_score[e], e_ts[e], e_from[e] = score[j], ts[j], j
        for s in range(n_old):
            e_score[n_new + s], e_ts[n_new + s], e_from[n_new + s] = h_score[g, s], h_ts[g, s], -1
        order = np.arange(size)
        natural = _in_rank_order(order, e_score, e_ts, False)
        if not natural:
            order = _sorted_entries(size, e_score, e_ts, recency)
        by_time = _in_rank_order(order, e_score, e_ts, True)
        unseen = n_new  # (in the natural order) the events not before j lead it
        for j in range(a, b):
            q = unseen if natural else 0
            taken = 0
            while q < size and taken < k_max:
                e = order[q]
                q += 1
                if e_from[e] >= j:
                    continue
                if by_time and e_ts[e] < read_t[j] - longest:
                    break
                taken += 1
                for s in range(spans.shape[0]):
                    if e_ts[e] >= read_t[j] - spans[s]:
                        out[j, s] += 1
            if cand[j]:
                unseen -= 1
        a = b


@compiled
def _sq(v: float) -> float:
    w = np.float64(v)
    return w * w


@compiled
def l2_rows(x: np.ndarray, out: np.ndarray) -> None:
    """``emde.normalize`` of float32 rows ``x (R, W)`` into ``out``: each row over the square
    root of its sum of squares in float64 (in numpy's order for a row of up to 128: eight
    running sums, then the rest), zero rows left zero, the quotient rounded to float32."""
    for a in range(x.shape[0]):
        _l2_row(x, a, out[a])


@compiled
def _l2_row(x: np.ndarray, a: int, out: np.ndarray) -> None:
    """Row ``a`` of :func:`l2_rows` into ``out (W,)``."""
    w = x.shape[1]
    if w < 8:
        total = 0.0
        for j in range(w):
            v = np.float64(x[a, j])
            total += v * v
    else:
        r0, r1 = _sq(x[a, 0]), _sq(x[a, 1])
        r2, r3 = _sq(x[a, 2]), _sq(x[a, 3])
        r4, r5 = _sq(x[a, 4]), _sq(x[a, 5])
        r6, r7 = _sq(x[a, 6]), _sq(x[a, 7])
        j = 8
        while j + 8 <= w:
            r0 += _sq(x[a, j])
            r1 += _sq(x[a, j + 1])
            r2 += _sq(x[a, j + 2])
            r3 += _sq(x[a, j + 3])
            r4 += _sq(x[a, j + 4])
            r5 += _sq(x[a, j + 5])
            r6 += _sq(x[a, j + 6])
            r7 += _sq(x[a, j + 7])
            j += 8
        total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while j < w:
            total += _sq(x[a, j])
            j += 1
    norm = np.sqrt(total)
    for j in range(w):
        out[j] = np.float32(np.float64(x[a, j]) / norm) if norm > 0 else np.float32(0.0)


@compiled
def recent_sketches(codes: np.ndarray, weights: np.ndarray, width: int, out: np.ndarray) -> None:
    """``recommend.recent_sketches`` into ``out (B, G, M, D, width)`` float32 from ``codes
    (B, L, M, D)`` (-1: none) and ``weights (G, L)`` (each decay's weight per position): per
    user, decay, modality and level the weights of its items' buckets summed in float64 in
    position order (numpy's bincount over them in C order adds them so), rounded to float32,
    then L2-normalised (:func:`l2_rows`)."""
    b_n, length, m_n, d_n = codes.shape
    acc = np.zeros((1, width))
    row = np.empty((1, width), np.float32)
    for b in range(b_n):
        for g in range(weights.shape[0]):
            for m in range(m_n):
                for d in range(d_n):
                    acc[:] = 0.0
                    for pos in range(length):
                        c = codes[b, pos, m, d]
                        if c >= 0:
                            acc[0, c] += weights[g, pos]
                    for j in range(width):
                        row[0, j] = np.float32(acc[0, j])
                    _l2_row(row, 0, out[b, g, m, d])
