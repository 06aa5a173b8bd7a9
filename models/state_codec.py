"""The byte format of a user state: one compact, versioned byte string per user, no pickle.

A user state is one byte string, little-endian, fixed-width fields, no pickle:

  header      _HEAD (43 bytes): magic "SU", format (2, 3 or 4), ids in the window n_ids u1
              (0 in format 2, where the byte was "flags"), layout digest, codebooks digest,
              clock f8, events folded u8, partition slots u2, history length n u2, and the
              encodings of the history's times, values and weights (u1 each)
  times       format 4 only: the time of the event before the clock's (the second latest)
              f8 and the earliest event's f8 (nan: none), what the recency columns read
  partitions  n_parts × (partition i4, last folded offset i8)
  history     item hashes n × u8; times n × u4 seconds before the clock (integral times)
              or n × f8; actions n × u1; values n × u1 (255: none; integers 0..254) or
              n × f4; weights nothing (all 1) or n × f4 -- in rank order
  ids         format 3 only: n_ids × u8 event-id hashes, oldest first (the dedup window)
  sketches    C encodings (u1 each, _EMPTY ... _SPARSE below), then one block per encoding
              holding that encoding's channels in channel order: nibbles, bytes, shorts,
              bitmaps (D × W bits, packbits order), f4 values of the sparse cells. Undecayed
              channels are whole counts, written dense in 4, 8 or 16 bits (as compact as a
              bitmap plus values at MovieLens densities, and no gather); decayed ones sparse.

The ids and everything before them read the same under any layout, so a state made under
other codebooks or channels is rebuilt from its history and keeps its window; the sketches
are read only when the layout and codebook digests match. Every state that has folded an
event is written in format 4; one of format 2 or 3 (written before the times were kept) is
read with its times taken from its history and clock: the earliest time kept, and the latest
below the clock (exact while the history holds every event; a heavy user's earliest is then
the earliest event its history still ranks in). A state without events is written in format 2
(no id in its window) or 3.
Every field has a fixed width, so a batch of states is encoded and decoded with whole-batch
numpy operations and one slicing pass over the byte strings.

:func:`encode` and :func:`decode` are what :meth:`~sketchstream.models.aggregator.Aggregator.dump`
and :meth:`~sketchstream.models.aggregator.Aggregator.load` call; :class:`StateLayout` is what
the bytes depend on besides the states (:func:`state_layout` builds it from an aggregator's
configuration and codebooks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sketchstream.models import batches, kernels
from sketchstream.models.batches import StateBatch
from sketchstream.models.channels import AggregatorConfig
from sketchstream.models.errors import ArtifactError
from sketchstream.models.segments import excl, per_group_all, ranks

__all__ = ["StateLayout", "decode", "encode", "state_layout"]

_MAGIC = b"SU"
_FORMAT_VERSION = 4  # v4: v3 and the times block (the second latest and the earliest times)
_FORMAT_IDS = 3  # v3: v2 and a window of event-id hashes (header byte n_ids, v2's flags)
_FORMAT_NO_IDS = 2  # v2: fixed-width fields, batch at a time
_FORMATS = (_FORMAT_NO_IDS, _FORMAT_IDS, _FORMAT_VERSION)
_TIMES = 16  # the times block of format 4: two f8
_HEAD = np.dtype(
    [
        ("magic", "<u2"),
        ("format", "u1"),
        ("n_ids", "u1"),
        ("layout", "<u8"),
        ("codebooks", "<u8"),
        ("clock", "<f8"),
        ("n_events", "<u8"),
        ("n_parts", "<u2"),
        ("n_hist", "<u2"),
        ("ts_kind", "u1"),
        ("value_kind", "u1"),
        ("weight_kind", "u1"),
    ]
)
_PAIR = np.dtype([("partition", "<i4"), ("offset", "<i8")])
_MAGIC_U2 = int.from_bytes(_MAGIC, "little")
# How a channel's (D, W) sketch is written (its encoding code):
_EMPTY = 0  # all zero: nothing
_NIBBLES = 1  # whole numbers 0..15: D*W/2 bytes, two cells a byte (high nibble first)
_BYTES = 2  # whole numbers 0..255: D*W bytes
_SHORTS = 3  # whole numbers 0..65535: D*W little-endian u2
_SPARSE = 4  # anything else: a bitmap of the non-zero cells (block "bitmaps"), f4 values


# Why bytes are refused (ArtifactError "user state <row>: unreadable bytes: <why>"), in the
# order decode checks them; the keys are kernels.REFUSALS.
_REFUSED = {
    "short": f"shorter than the {_HEAD.itemsize}-byte header",
    "format": "not a sketchstream user state of format v2, v3 or v4",
    "v2 flags": "format v2 with flags set",
    "history encoding": "unknown history encoding",
    "truncated": "truncated",
    "sketch encoding": "unknown sketch encoding",
    **{b: f"sketch block {b!r} truncated" for b in ("nibbles", "bytes", "shorts", "bitmaps")},
    "values": "sketch values truncated or followed by other bytes",
}


@dataclass(frozen=True, eq=False)
class StateLayout:
    """What a state's bytes depend on besides the state.

    ``layout_id``: digest of the channel configuration and the sketch shape; ``codebooks_id``:
    digest of the codebook versions (a state is read whole only when both match, else rebuilt
    from its history); ``n_channels`` C, ``depth`` D, ``width`` W; ``history_size`` K (a longer
    stored history keeps its top K); ``counts (C,)`` bool: the undecayed channels, whose whole
    counts are written dense.
    """

    layout_id: int
    codebooks_id: int
    n_channels: int
    depth: int
    width: int
    history_size: int
    counts: np.ndarray


def state_layout(
    config: AggregatorConfig, depth: int, width: int, codebook_version: str
) -> StateLayout:
    """The :class:`StateLayout` of an aggregator with ``config``, codebooks of ``depth`` x
    ``width`` and the given ``codebook_version``."""
    return StateLayout(
        layout_id=_digest(f"{config.fingerprint()}/{depth}/{width}"),
        codebooks_id=_digest(codebook_version),
        n_channels=len(config.channels),
        depth=depth,
        width=width,
        history_size=config.history_size,
        counts=~np.isfinite(np.array([c.half_life_s for c in config.channels], np.float64)),
    )


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class _Sections:
    """Byte sections of a batch of states, each a flat buffer with per-user lengths, joined
    into one byte string per user at the end (the one per-user Python loop of encoding)."""

    def __init__(self, n_users: int) -> None:
        self.n = n_users
        self.parts: list[tuple[bytes, list[int]]] = []

    def add(self, data: np.ndarray, lengths: np.ndarray) -> None:
        """``data``: all users' bytes of this section, user after user; ``lengths (U,)``."""
        if data.size:
            self.parts.append((data.tobytes(), excl(lengths).tolist()))

    def join(self) -> list[bytes]:
        parts, join = self.parts, b"".join
        return [join([buf[o[u] : o[u + 1]] for buf, o in parts]) for u in range(self.n)]


def encode(batch: StateBatch, layout: StateLayout) -> list[bytes]:
    """One compact, versioned byte string per user of ``batch`` (no pickle), built under
    ``layout`` (see :meth:`~sketchstream.models.aggregator.Aggregator.dump`).

    Encoded for the whole batch at once (see the format at the top of this module).
    """
    n_users = len(batch)
    if n_users == 0:
        return []
    if kernels.ENABLED:
        return _encode_compiled(batch, layout)
    out = _Sections(n_users)
    head = np.zeros(n_users, _HEAD)
    head["magic"] = _MAGIC_U2
    n_ids = batch.id_len.astype(np.int64)
    timed = np.isfinite(batch.first_ts)
    old = np.where(n_ids > 0, _FORMAT_IDS, _FORMAT_NO_IDS)
    head["format"] = np.where(timed, _FORMAT_VERSION, old)
    head["n_ids"] = n_ids
    head["layout"] = layout.layout_id
    head["codebooks"] = layout.codebooks_id
    head["clock"] = batch.clocks
    head["n_events"] = batch.n_events

    used = batch.partitions >= 0  # (U, P), slots in order
    n_parts = used.sum(axis=1)
    pairs = np.empty(int(n_parts.sum()), _PAIR)
    pairs["partition"] = batch.partitions[used]
    pairs["offset"] = batch.offsets[used]
    head["n_parts"] = n_parts

    n_hist = batch.hist_len.astype(np.int64)
    head["n_hist"] = n_hist
    in_hist = np.arange(batch.hist_item.shape[1])[None, :] < n_hist[:, None]
    owner = np.repeat(np.arange(n_users), n_hist)  # history rows, user after user
    ts = batch.hist_ts[in_hist]
    clock = batch.clocks[owner]
    with np.errstate(invalid="ignore"):
        delta = clock - ts
        ts_ok = (delta >= 0) & (delta < 2.0**32) & (delta == np.floor(delta))
    ts_ok &= clock - np.where(ts_ok, delta, 0.0) == ts
    ts_small = per_group_all(ts_ok, owner, n_users)
    value = batch.hist_value[in_hist]
    nan = np.isnan(value)
    with np.errstate(invalid="ignore"):
        v_small = nan | ((value >= 0) & (value <= 254) & (value == np.floor(value)))
    v_small = per_group_all(v_small, owner, n_users)
    weight = batch.hist_weight[in_hist]
    w_ones = per_group_all(weight == 1.0, owner, n_users)
    head["ts_kind"] = ~ts_small
    head["value_kind"] = ~v_small
    head["weight_kind"] = ~w_ones
    out.add(head, np.full(n_users, _HEAD.itemsize))
    times = np.column_stack([batch.prev_clocks, batch.first_ts])[timed].astype("<f8")
    out.add(times, _TIMES * timed)
    out.add(pairs, n_parts * _PAIR.itemsize)
    out.add(batch.hist_item[in_hist].astype("<u8"), 8 * n_hist)
    rows_small = ts_small[owner]
    out.add(delta[rows_small].astype("<u4"), 4 * n_hist * ts_small)
    out.add(ts[~rows_small].astype("<f8"), 8 * n_hist * ~ts_small)
    out.add(batch.hist_action[in_hist].astype(np.uint8), n_hist)
    rows_small = v_small[owner]
    small = np.where(nan, 255, np.nan_to_num(value))[rows_small].astype(np.uint8)
    out.add(small, n_hist * v_small)
    out.add(value[~rows_small].astype("<f4"), 4 * n_hist * ~v_small)
    out.add(weight[~w_ones[owner]].astype("<f4"), 4 * n_hist * ~w_ones)
    if n_ids.any():
        in_ids = np.arange(batch.id_hash.shape[1])[None, :] < n_ids[:, None]
        out.add(batch.id_hash[in_ids].astype("<u8"), 8 * n_ids)

    n_ch, cells = batch.sketches.shape[1], layout.depth * layout.width
    kind, dense, sparse = _sketch_encodings(batch, layout)
    out.add(kind.astype(np.uint8), np.full(n_users, n_ch))
    user = np.arange(n_users * n_ch) // n_ch
    for code in (_NIBBLES, _BYTES, _SHORTS):
        x = dense[code]
        if code == _NIBBLES:
            x = (x[:, 0::2] << 4) | x[:, 1::2]
        mine = user[kind.reshape(-1) == code]
        out.add(x, np.bincount(mine, minlength=n_users) * (x.shape[1] * x.itemsize))
    rows, x = sparse
    nz = x != 0
    n_bitmap = (cells + 7) // 8
    out.add(np.packbits(nz, axis=1), np.bincount(user[rows], minlength=n_users) * n_bitmap)
    out.add(
        np.compress(nz.reshape(-1), x.reshape(-1)).astype("<f4"),  # x[nz], 4x faster
        4 * np.bincount(user[rows], weights=nz.sum(axis=1), minlength=n_users).astype(np.int64),
    )
    return out.join()


def _encode_compiled(batch: StateBatch, layout: StateLayout) -> list[bytes]:
    """:func:`encode` in compiled code (:func:`~sketchstream.models.kernels.encode_states`),
    the same bytes; the numpy code of :func:`encode` is its reference."""
    n_users, n_ch = batch.sketches.shape[:2]
    head = [_MAGIC_U2, _FORMAT_IDS, _FORMAT_NO_IDS, layout.layout_id, layout.codebooks_id]
    head += [_HEAD.itemsize, _PAIR.itemsize, _FORMAT_VERSION]

    def flat(a: np.ndarray, dtype: type | None = None) -> np.ndarray:
        a = np.ascontiguousarray(a)  # one compiled signature, whatever slicing made a
        return a if dtype is None else a.view(dtype)

    buf, bounds = kernels.encode_states(
        np.array(head, np.uint64).view(np.int64),
        flat(batch.clocks),
        flat(batch.prev_clocks),
        flat(batch.first_ts),
        flat(batch.n_events),
        flat(batch.partitions),
        flat(batch.offsets),
        flat(batch.hist_len),
        flat(batch.hist_item, np.int64),
        flat(batch.hist_ts),
        flat(batch.hist_action),
        flat(batch.hist_value),
        flat(batch.hist_weight),
        flat(batch.id_len),
        flat(batch.id_hash, np.int64),
        flat(batch.sketches).reshape(n_users, n_ch, -1),
        layout.counts,
    )
    data, at = buf.tobytes(), bounds.tolist()
    return [data[at[u] : at[u + 1]] for u in range(n_users)]


def _sketch_encodings(
    batch: StateBatch, layout: StateLayout
) -> tuple[np.ndarray, dict[int, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """How each user's channel is written: ``(kind (U, C), dense, (rows, values))``.

    Undecayed channels hold counts: written dense as 4-bit, 8-bit or 16-bit integers when
    they are whole numbers in range (``dense[code]``: ``(k, D*W)`` integer rows, user then
    channel order). Anything else (decayed weights, fractional event weights) is written
    sparse: a bitmap of the non-zero cells and their float32 values (``rows`` into the
    ``(U*C, D*W)`` view, ``values`` the rows themselves).
    """
    n_users, n_ch = batch.sketches.shape[:2]
    cells = layout.depth * layout.width
    sk = batch.sketches.reshape(n_users * n_ch, cells)
    kind = np.full(n_users * n_ch, _SPARSE, np.int64)
    dense: dict[int, np.ndarray] = {}
    if sk.size:
        top, low = sk.max(axis=1), sk.min(axis=1)
        kind[(top == 0) & (low == 0)] = _EMPTY
        counts = np.tile(layout.counts, n_users)
        cand = np.flatnonzero(counts & (kind != _EMPTY) & (low >= 0) & (top < 65536))
        x = sk[cand]
        xi = x.astype(np.uint16)
        whole = (xi == x).all(axis=1)
        cand, xi, top = cand[whole], xi[whole], top[cand[whole]]
        code = np.where(top < 16, _NIBBLES, np.where(top < 256, _BYTES, _SHORTS))
        if cells % 2:
            code[code == _NIBBLES] = _BYTES
        kind[cand] = code
        for c, dtype in ((_NIBBLES, np.uint8), (_BYTES, np.uint8), (_SHORTS, "<u2")):
            dense[c] = xi[code == c].astype(dtype)
    else:
        for c, dtype in ((_NIBBLES, np.uint8), (_BYTES, np.uint8), (_SHORTS, "<u2")):
            dense[c] = np.zeros((0, cells), dtype)
    rows = np.flatnonzero(kind == _SPARSE)
    return kind.reshape(n_users, n_ch), dense, (rows, sk[rows])


def decode(blobs: Sequence[bytes | None], batch: StateBatch, layout: StateLayout) -> np.ndarray:
    """Read :func:`encode` bytes (None: a new user, left as ``batch`` has it) into the rows of
    ``batch`` (new states, one row per blob, in order). Returns the rows whose sketches were
    not read, ``(k,)`` int64: states built on other codebooks or another channel layout, which
    the caller rebuilds from their histories (clock, offsets, history and id window are read
    under any layout). Unreadable bytes raise
    :class:`~sketchstream.models.errors.ArtifactError`.
    """
    n_users = len(blobs)
    rows = np.array([r for r, b in enumerate(blobs) if b is not None], np.int64)
    given = [blobs[r] for r in rows.tolist()]
    if not given:
        return np.zeros(0, np.int64)
    if kernels.ENABLED:
        return _decode_compiled(rows, given, batch, layout)
    size = np.fromiter(map(len, given), np.int64, len(given))
    hs = _HEAD.itemsize
    _refuse(rows, size < hs, _REFUSED["short"])
    head = np.frombuffer(b"".join([b[:hs] for b in given]), _HEAD)
    fmt = head["format"]
    _refuse(rows, (head["magic"] != _MAGIC_U2) | ~np.isin(fmt, _FORMATS), _REFUSED["format"])
    n_ids = head["n_ids"].astype(np.int64)
    _refuse(rows, (fmt == _FORMAT_NO_IDS) & (n_ids != 0), _REFUSED["v2 flags"])
    n_parts = head["n_parts"].astype(np.int64)
    n_hist = head["n_hist"].astype(np.int64)
    ts_w = np.where(head["ts_kind"] == 0, 4, 8)
    v_w = np.where(head["value_kind"] == 0, 1, 4)
    w_w = np.where(head["weight_kind"] == 0, 0, 4)
    _refuse(
        rows,
        (head["ts_kind"] > 1) | (head["value_kind"] > 1) | (head["weight_kind"] > 1),
        _REFUSED["history encoding"],
    )
    # where each section starts in each blob
    timed = fmt == _FORMAT_VERSION
    p_parts = hs + _TIMES * timed
    p_hist = p_parts + _PAIR.itemsize * n_parts
    p_ts = p_hist + 8 * n_hist
    p_act = p_ts + ts_w * n_hist
    p_val = p_act + n_hist
    p_w = p_val + v_w * n_hist
    p_ids = p_w + w_w * n_hist
    p_sk = p_ids + 8 * n_ids
    fresh = (head["layout"] == layout.layout_id) & (head["codebooks"] == layout.codebooks_id)
    n_ch, cells = layout.n_channels, layout.depth * layout.width
    _refuse(rows, size < p_sk + np.where(fresh, n_ch, 0), _REFUSED["truncated"])

    # one pass over the byte strings: slice every section out, then decode each at once
    times_b: list[bytes] = []
    pairs_b: list[bytes] = []
    items_b: list[bytes] = []
    ts_b: tuple[list[bytes], list[bytes]] = ([], [])  # by encoding: u4 deltas, f8 times
    act_b: list[bytes] = []
    val_b: tuple[list[bytes], list[bytes]] = ([], [])  # by encoding: u1, f4
    w_b: list[bytes] = []
    ids_b: list[bytes] = []
    blocks: dict[str, list[bytes]] = {
        k: [] for k in ("kinds", "nibbles", "bytes", "shorts", "bitmaps", "values")
    }
    kinds_b, nib_b, bytes_b = blocks["kinds"], blocks["nibbles"], blocks["bytes"]
    shorts_b, bits_b, values_b = blocks["shorts"], blocks["bitmaps"], blocks["values"]
    n_nib, n_bytes, n_shorts, n_bits = cells // 2, cells, 2 * cells, (cells + 7) // 8
    spans = zip(
        given,
        p_parts.tolist(),
        p_hist.tolist(),
        p_ts.tolist(),
        p_act.tolist(),
        p_val.tolist(),
        p_w.tolist(),
        p_ids.tolist(),
        p_sk.tolist(),
        fresh.tolist(),
        head["ts_kind"].tolist(),
        head["value_kind"].tolist(),
        strict=True,
    )
    for b, pp, ph, pt, pa, pv, pw, pi, ps, fr, tk, vk in spans:
        times_b.append(b[hs:pp])
        pairs_b.append(b[pp:ph])
        items_b.append(b[ph:pt])
        ts_b[tk].append(b[pt:pa])
        act_b.append(b[pa:pv])
        val_b[vk].append(b[pv:pw])
        w_b.append(b[pw:pi])
        if pi != ps:
            ids_b.append(b[pi:ps])
        if fr:
            kinds = b[ps : ps + n_ch]
            kinds_b.append(kinds)
            p0 = ps + n_ch
            p1 = p0 + n_nib * kinds.count(_NIBBLES)
            p2 = p1 + n_bytes * kinds.count(_BYTES)
            p3 = p2 + n_shorts * kinds.count(_SHORTS)
            p4 = p3 + n_bits * kinds.count(_SPARSE)
            nib_b.append(b[p0:p1])
            bytes_b.append(b[p1:p2])
            shorts_b.append(b[p2:p3])
            bits_b.append(b[p3:p4])
            values_b.append(b[p4:])

    batch.clocks[rows] = head["clock"]
    times = np.frombuffer(b"".join(times_b), "<f8").reshape(-1, 2)
    batch.prev_clocks[rows[timed]] = times[:, 0]
    batch.first_ts[rows[timed]] = times[:, 1]
    batch.n_events[rows] = head["n_events"].astype(np.int64)
    slots = max(int(n_parts.max()), 1)
    batch.partitions = np.full((n_users, slots), -1, np.int32)
    batch.offsets = np.full((n_users, slots), -1, np.int64)
    pairs = np.frombuffer(b"".join(pairs_b), _PAIR)
    owner, rank = ranks(n_parts)
    batch.partitions[rows[owner], rank] = pairs["partition"]
    batch.offsets[rows[owner], rank] = pairs["offset"]

    owner, rank = ranks(n_hist)
    keep = rank < layout.history_size  # stored in rank order: keep the top K
    r_keep, k_keep = rows[owner[keep]], rank[keep]
    batch.hist_len[rows] = np.minimum(n_hist, layout.history_size)
    batch.hist_item[r_keep, k_keep] = np.frombuffer(b"".join(items_b), "<u8")[keep]
    small = (head["ts_kind"] == 0)[owner]
    ts = np.empty(owner.shape[0])
    ts[small] = head["clock"][owner[small]] - np.frombuffer(b"".join(ts_b[0]), "<u4")
    ts[~small] = np.frombuffer(b"".join(ts_b[1]), "<f8")
    batch.hist_ts[r_keep, k_keep] = ts[keep]
    batch.hist_action[r_keep, k_keep] = np.frombuffer(b"".join(act_b), np.uint8)[keep]
    small = (head["value_kind"] == 0)[owner]
    value = np.empty(owner.shape[0], np.float32)
    raw = np.frombuffer(b"".join(val_b[0]), np.uint8)
    value[small] = np.where(raw == 255, np.nan, raw)
    value[~small] = np.frombuffer(b"".join(val_b[1]), "<f4")
    batch.hist_value[r_keep, k_keep] = value[keep]
    ones = (head["weight_kind"] == 0)[owner]
    weight = np.ones(owner.shape[0], np.float32)
    weight[~ones] = np.frombuffer(b"".join(w_b), "<f4")
    batch.hist_weight[r_keep, k_keep] = weight[keep]
    if ids_b:
        w = batches.DEDUP_WINDOW
        batch.id_hash = np.zeros((n_users, w), np.uint64)
        owner, rank = ranks(n_ids)
        at = rank - np.maximum(n_ids - w, 0)[owner]  # keep each window's newest w
        keep = at >= 0
        ids = np.frombuffer(b"".join(ids_b), "<u8")
        batch.id_hash[rows[owner[keep]], at[keep]] = ids[keep]
        batch.id_len[rows] = np.minimum(n_ids, w)

    if kinds_b:
        _load_sketches(batch, rows[fresh], blocks, layout)
    _times_from_history(batch, rows[~timed])
    return rows[~fresh]


def _load_sketches(
    batch: StateBatch, rows: np.ndarray, blocks: dict[str, list[bytes]], layout: StateLayout
) -> None:
    """Fill the sketches of ``rows`` from their sketch sections (``blocks``: per row, the
    encodings and the bytes of each encoding's block), all rows at once."""
    n_ch, cells = layout.n_channels, layout.depth * layout.width
    kinds = np.frombuffer(b"".join(blocks["kinds"]), np.uint8).reshape(-1, n_ch)
    _refuse(rows, (kinds > _SPARSE).any(axis=1), _REFUSED["sketch encoding"])
    sk = batch.sketches.reshape(-1, cells)
    target = (rows[:, None] * n_ch + np.arange(n_ch)).reshape(-1)  # rows of sk, in order
    flat_kinds = kinds.reshape(-1)
    n_bitmap = (cells + 7) // 8
    sizes = {
        _NIBBLES: ("nibbles", cells // 2, np.uint8),
        _BYTES: ("bytes", cells, np.uint8),
        _SHORTS: ("shorts", 2 * cells, "<u2"),
        _SPARSE: ("bitmaps", n_bitmap, np.uint8),
    }
    data: dict[int, np.ndarray] = {}
    for code, (name, row_bytes, dtype) in sizes.items():
        got = np.fromiter(map(len, blocks[name]), np.int64, len(rows))
        want = (kinds == code).sum(axis=1) * row_bytes
        _refuse(rows, got != want, _REFUSED[name])
        data[code] = np.frombuffer(b"".join(blocks[name]), dtype).reshape(
            -1, row_bytes // np.dtype(dtype).itemsize
        )
    packed = data[_NIBBLES]
    nibbles = np.empty((packed.shape[0], cells), np.uint8)
    nibbles[:, 0::2] = packed >> 4
    nibbles[:, 1::2] = packed & 15
    sk[target[flat_kinds == _NIBBLES]] = nibbles
    sk[target[flat_kinds == _BYTES]] = data[_BYTES]
    sk[target[flat_kinds == _SHORTS]] = data[_SHORTS]
    nz = np.unpackbits(data[_SPARSE], axis=1, count=cells).view(bool)
    owner = np.repeat(np.arange(len(rows)), (kinds == _SPARSE).sum(axis=1))
    want = 4 * np.bincount(owner, weights=nz.sum(axis=1), minlength=len(rows))
    got = np.fromiter(map(len, blocks["values"]), np.int64, len(rows))
    _refuse(rows, got != want, _REFUSED["values"])
    x = np.zeros(nz.shape, np.float32)
    values = np.frombuffer(b"".join(blocks["values"]), "<f4")
    x.reshape(-1)[np.flatnonzero(nz)] = values  # x[nz] = values, several times faster
    sk[target[flat_kinds == _SPARSE]] = x


def _decode_compiled(
    rows: np.ndarray, given: list[bytes], batch: StateBatch, layout: StateLayout
) -> np.ndarray:
    """:func:`decode` of the blobs ``given`` into ``rows`` in compiled code
    (:func:`~sketchstream.models.kernels.decode_states`): the same states, the same refusals;
    the numpy code of :func:`decode` is its reference."""
    n_users, n_ch = batch.sketches.shape[:2]
    k, window = len(given), batches.DEDUP_WINDOW
    data = np.frombuffer(b"".join(given), np.uint8)
    bounds = excl(np.fromiter(map(len, given), np.int64, k))
    head = [_MAGIC_U2, _FORMAT_IDS, _FORMAT_NO_IDS, layout.layout_id, layout.codebooks_id]
    head += [_HEAD.itemsize, _PAIR.itemsize, layout.history_size, window, _FORMAT_VERSION]
    refused, fresh = np.zeros(k, np.int8), np.zeros(k, bool)
    n_parts, n_ids = np.zeros(k, np.int64), np.zeros(k, np.int64)

    def run(fill: bool) -> None:
        kernels.decode_states(
            data,
            bounds,
            rows,
            np.array(head, np.uint64).view(np.int64),
            fill,
            refused,
            n_parts,
            n_ids,
            fresh,
            batch.clocks,
            batch.prev_clocks,
            batch.first_ts,
            batch.n_events,
            batch.partitions,
            batch.offsets,
            batch.hist_len,
            batch.hist_item.view(np.int64),
            batch.hist_ts,
            batch.hist_action,
            batch.hist_value,
            batch.hist_weight,
            batch.id_len,
            batch.id_hash.view(np.int64),
            batch.sketches.reshape(n_users, n_ch, -1),
        )

    run(fill=False)
    if refused.any():  # the first check any blob fails, as the numpy code raises it
        first = int(refused[refused > 0].min())
        _refuse(rows, refused == first, _REFUSED[kernels.REFUSALS[first]])
    slots = max(int(n_parts.max()), 1)
    batch.partitions = np.full((n_users, slots), -1, np.int32)
    batch.offsets = np.full((n_users, slots), -1, np.int64)
    if n_ids.any():
        batch.id_hash = np.zeros((n_users, window), np.uint64)
    run(fill=True)
    _times_from_history(batch, rows[data[bounds[:-1] + 2] != _FORMAT_VERSION])
    return rows[~fresh]


def _times_from_history(batch: StateBatch, rows: np.ndarray) -> None:
    """The times of states written before format 4 (``rows``), from their history and clock:
    the earliest time kept (the clock when none), and the latest kept below the clock, or at
    it when the clock's event is kept and another one has the same time."""
    rows = rows[np.isfinite(batch.clocks[rows])]
    if rows.size == 0:
        return
    k = batch.hist_ts.shape[1]
    kept = np.arange(k)[None, :] < batch.hist_len[rows][:, None]
    ts = batch.hist_ts[rows]
    clock = batch.clocks[rows]
    batch.first_ts[rows] = np.minimum(clock, np.where(kept, ts, np.inf).min(axis=1, initial=np.inf))
    desc = -np.sort(-np.where(kept, ts, -np.inf), axis=1)  # latest first
    top = desc[:, 0] if k else np.full(rows.size, -np.inf)
    second = desc[:, 1] if k > 1 else np.full(rows.size, -np.inf)
    prev = np.where(top < clock, top, second)  # the clock's own event is the top when kept
    batch.prev_clocks[rows] = np.where(np.isfinite(prev), prev, np.nan)


def _refuse(rows: np.ndarray, bad: np.ndarray, what: str) -> None:
    if bad.any():
        first = int(rows[np.flatnonzero(bad)[0]])
        raise ArtifactError(
            f"user state {first}: unreadable bytes: {what} ({int(bad.sum())} such states)"
        )
