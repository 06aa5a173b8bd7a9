"""The user-state aggregator: fold events into decayed EMDE sketches, score before folding.

One :class:`Aggregator` serves both the offline replay (trainer) and the streaming worker, so
training and serving build features with the same code::

    agg = Aggregator(default_config(), {"interactions": cb_i, "metadata": cb_m})
    batch = agg.load(blobs)                      # list[bytes | None] -> StateBatch
    feats = agg.score_then_fold(batch, events)   # EventBatch in offset order -> Features
    blobs = agg.dump(batch)                      # list[bytes], written back explicitly

A user state holds, per :class:`Channel`, a decayed sketch ``(depth, width)`` of the items of
the events the channel accepts (an action set and a value range), kept at the state's clock;
the clock (the latest event time folded); the last folded offset per source partition; a
bounded history (top ``history_size`` events by decayed weight) to rebuild the sketches under a
new codebook; and the codebook version the sketches were built on.

Semantics (DESIGN.md, "Semantics that must hold"):

- *Score, then fold*: event ``i``'s features are read from the state before ``i`` is folded,
  and see every earlier event of its user, including earlier events of the same batch.
- *Idempotence*: an event whose offset is ``<=`` the last folded offset of its partition is
  skipped (``Features.valid`` False); redelivery is a no-op.
- *Deduplication*: a state remembers the ids of the last :data:`DEDUP_WINDOW` events folded
  with an ``event_id`` (8-byte hashes, :func:`event_id_hash`). A new event whose id is among
  them, or equals the id of an event of its user folded earlier in the same batch, is a
  duplicate (a producer's retry): not folded, not scored (``valid`` False), counted apart from
  redeliveries (``StateBatch.duplicates``); its offset counts as consumed.
- *Lazy decay*: reading at ``t`` multiplies a channel's sketch by ``2^(-(t - clock)/half_life)``;
  an event older than the clock adds ``weight * 2^(-(clock - ts)/half_life)`` and leaves the
  clock where it is; the clock never moves back.
- *Unknown items* (not in a modality's codebook) add nothing to that modality's channels and
  are counted (``Aggregator.counters``); they still enter the history.
- *Versions*: :meth:`Aggregator.load` rebuilds a state made under other codebooks (or another
  channel layout) from its history and counts it.
- *Table writes are reassignments*: a :class:`StateBatch` is a working buffer; only
  :meth:`Aggregator.dump` bytes, written back, persist.

Batches are columnar and folds vectorize across users: within a batch, each user's events are
folded in closed form (exponential decay makes a user's sketch a weighted prefix sum), so the
cost is a few sorts and scatters per batch, not a Python loop per event.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sketchstream.models.emde import Codebook, item_hash
from sketchstream.models.errors import ArtifactError, ModelError

__all__ = [
    "DEDUP_WINDOW",
    "Aggregator",
    "AggregatorConfig",
    "Channel",
    "Event",
    "EventBatch",
    "Features",
    "StateBatch",
    "default_config",
    "event_id_hash",
    "replay_benchmark",
    "state_size_report",
    "synthetic_ratings",
]

log = logging.getLogger(__name__)

DAY = 86_400.0
_MAGIC = b"SU"
_FORMAT_VERSION = 3  # v3: v2 and a window of event-id hashes (header byte n_ids, v2's flags)
_FORMAT_NO_IDS = 2  # v2: fixed-width fields, batch at a time; still written for states without ids
#: How many event ids a user state remembers for deduplication: the ids of its last
#: ``DEDUP_WINDOW`` events folded with an id, 8 bytes each (so at most 512 bytes a state; a
#: state whose events never carried an id stores none). Raising it later is safe: states keep
#: what they have; lowering it keeps each state's newest ids. At most 255 (one header byte).
DEDUP_WINDOW = 64
# Within one pass, a user's events span at most this many (shortest) half-lives, so the
# scaled weights 2^((ts - t0)/h) stay within float64's comfortable range (see _fold_pass).
_MAX_PASS_HALF_LIVES = 24.0
_ITEM_CACHE_MAX = 4_000_000
# A contribution decayed below this is forgotten (exactly 0): it keeps float32 out of
# denormals and makes "is the channel empty" the same question on every code path.
_FORGET = 2.0**-100


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Channel:
    """One decayed sketch per user: which events feed it and how fast it forgets.

    ``modality``: the codebook the items are sketched with (``"interactions"``, ``"metadata"``).
    ``actions``: action names that feed the channel (None: all known actions).
    ``min_value`` (inclusive) / ``max_value`` (exclusive): a filter on the event value; events
    without a value (nan) fail any filter that is set.
    ``half_life_s``: seconds for a contribution to halve (``math.inf``: no decay).
    ``weight``: multiplies every contribution.
    """

    name: str
    modality: str
    actions: frozenset[str] | None = None
    min_value: float | None = None
    max_value: float | None = None
    half_life_s: float = math.inf
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not self.modality:
            raise ModelError(f"Channel needs a name and a modality, got {self!r}")
        if not self.half_life_s > 0:
            raise ModelError(f"Channel {self.name!r}: half_life_s must be > 0 (or inf)")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ModelError(f"Channel {self.name!r}: weight must be finite and > 0")
        lo, hi = self.min_value, self.max_value
        if lo is not None and hi is not None and not lo < hi:
            raise ModelError(f"Channel {self.name!r}: min_value {lo} must be < max_value {hi}")
        if self.actions is not None:
            object.__setattr__(self, "actions", frozenset(self.actions))


@dataclass(frozen=True)
class AggregatorConfig:
    """Channels, action vocabulary and history bound of a user state.

    ``actions``: the known action names; events carry an index into this tuple. Keep it
    append-only: serialized histories store action indices.
    ``history_size``: K, the events kept per user to rebuild sketches under a new codebook.
    ``history_half_life_s``: the decay that ranks history entries (top K by decayed weight;
    ties go to the most recent).
    """

    channels: tuple[Channel, ...]
    actions: tuple[str, ...]
    history_size: int = 128
    history_half_life_s: float = 30 * DAY

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "actions", tuple(self.actions))
        if not self.channels:
            raise ModelError("AggregatorConfig needs at least one channel")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ModelError(f"AggregatorConfig: channel names must be unique, got {names}")
        if not self.actions or len(set(self.actions)) != len(self.actions):
            raise ModelError(
                f"AggregatorConfig: actions must be unique and non-empty: {self.actions}"
            )
        if len(self.actions) > 255:
            raise ModelError(f"AggregatorConfig: at most 255 actions, got {len(self.actions)}")
        for c in self.channels:
            unknown = sorted((c.actions or frozenset()) - set(self.actions))
            if unknown:
                raise ModelError(
                    f"channel {c.name!r}: unknown actions {unknown}: expected some of "
                    f"{', '.join(self.actions)}"
                )
        if not 0 <= self.history_size <= 65_535:
            raise ModelError(f"history_size must be in [0, 65535], got {self.history_size}")
        if not self.history_half_life_s > 0:
            raise ModelError("history_half_life_s must be > 0 (or inf)")

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities in order of first use by a channel."""
        return tuple(dict.fromkeys(c.modality for c in self.channels))

    def fingerprint(self) -> str:
        """A stable hash of the configuration (part of a serialized state's layout)."""

        def enc(c: Channel) -> dict[str, Any]:
            d = asdict(c)
            d["actions"] = None if c.actions is None else sorted(c.actions)
            return d

        doc = {
            "channels": [enc(c) for c in self.channels],
            "actions": list(self.actions),
            "history_size": self.history_size,
            "history_half_life_s": self.history_half_life_s,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def default_config(actions: Sequence[str] = ("rate",)) -> AggregatorConfig:
    """Channels for a rating data set (MovieLens): liked (value >= 4) and disliked (< 4).

    interactions × {liked, disliked} × {30-day half-life, no decay}, and
    metadata × {liked, disliked} without decay: 6 channels. The decayed metadata channels are
    left out to keep the median MovieLens-1M state under 8 KB (its non-integer values cost 4
    bytes a bucket; the undecayed ones are integer counts, 1 byte). History: 128 events.
    """
    month = 30 * DAY
    liked = {"min_value": 4.0}
    disliked = {"max_value": 4.0}
    return AggregatorConfig(
        channels=(
            Channel("liked", "interactions", **liked),
            Channel("liked_30d", "interactions", half_life_s=month, **liked),
            Channel("disliked", "interactions", **disliked),
            Channel("disliked_30d", "interactions", half_life_s=month, **disliked),
            Channel("meta_liked", "metadata", **liked),
            Channel("meta_disliked", "metadata", **disliked),
        ),
        actions=tuple(actions),
        history_size=128,
    )


# --- events, states, features ----------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event for the scalar path (:meth:`Aggregator.fold`). ``offset`` None: next one."""

    item: str
    action: str
    ts: float
    value: float = math.nan
    partition: int = 0
    offset: int | None = None
    weight: float = 1.0
    event_id: str | None = None


@dataclass
class EventBatch:
    """Columnar micro-batch of events, in offset order per user. All arrays ``(n,)``.

    ``user_index`` row in the StateBatch; ``item`` item ids (str); ``action`` index into
    ``config.actions`` (``-1``: an action the config does not know, folded into no channel);
    ``value`` float32 (nan: none); ``ts`` float64 seconds; ``partition`` int32; ``offset``
    int64 (>= 0); ``weight`` float32 (None: all 1); ``event_id`` object, the producer's id of
    each event (str; None or ``""``: no id), or None when no event has one (a list is taken as
    is, e.g. ``DecodedEvents.event_id``; one without any id becomes None). Ids deduplicate: see
    :meth:`Aggregator.score_then_fold`.
    """

    user_index: np.ndarray
    item: np.ndarray
    action: np.ndarray
    value: np.ndarray
    ts: np.ndarray
    partition: np.ndarray
    offset: np.ndarray
    weight: np.ndarray | None = None
    event_id: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.user_index = np.asarray(self.user_index, dtype=np.int64)
        n = self.user_index.shape[0]
        items = self.item
        self.item = items if isinstance(items, np.ndarray) else np.array(items, dtype=object)
        self.action = np.asarray(self.action, dtype=np.int64)
        self.value = np.asarray(self.value, dtype=np.float32)
        self.ts = np.asarray(self.ts, dtype=np.float64)
        self.partition = np.asarray(self.partition, dtype=np.int32)
        self.offset = np.asarray(self.offset, dtype=np.int64)
        w = np.ones(n, np.float32) if self.weight is None else self.weight
        self.weight = np.asarray(w, dtype=np.float32)
        for name in ("item", "action", "value", "ts", "partition", "offset", "weight"):
            a = getattr(self, name)
            if a.shape != (n,):
                raise ModelError(f"EventBatch.{name} has shape {a.shape}, expected ({n},)")
        if self.event_id is not None:
            self.event_id = _event_ids(self.event_id, n)

    def __len__(self) -> int:
        return int(self.user_index.shape[0])


@dataclass
class StateBatch:
    """User states of a batch, dense and columnar. ``U`` users, ``C`` channels, ``D`` depth,
    ``W`` width, ``P`` partition slots, ``K`` history size.

    ``sketches (U, C, D, W)`` float32, at each user's clock; ``clocks (U,)`` float64 (nan: no
    event yet); ``n_events (U,)`` int64 events folded; ``partitions (U, P)`` int32 (-1: free
    slot) with ``offsets (U, P)`` int64 last folded offset; history ``hist_len (U,)`` and
    ``hist_item`` (uint64 :func:`item_hash`), ``hist_ts`` float64, ``hist_action`` int16,
    ``hist_value`` float32, ``hist_weight`` float32, each ``(U, K)``, slots in rank order
    (highest decayed weight first), padding zeros (action -1) after ``hist_len``.
    Deduplication window: ``id_len (U,)`` int32 and ``id_hash (U, L)`` uint64, the
    :func:`event_id_hash` of the user's last ``id_len`` ids folded, oldest first, zeros after;
    ``L`` is 0 until a state or an event of the batch carries an id, then
    :data:`DEDUP_WINDOW`.
    ``codebook_version``: the codebooks the sketches were built on. ``rebuilt``: rows
    :meth:`Aggregator.load` rebuilt from history. ``duplicates``: events that
    :meth:`Aggregator.score_then_fold` calls on this batch dropped as duplicate ids (for a
    metric, beside the redeliveries).
    """

    sketches: np.ndarray
    clocks: np.ndarray
    n_events: np.ndarray
    partitions: np.ndarray
    offsets: np.ndarray
    hist_len: np.ndarray
    hist_item: np.ndarray
    hist_ts: np.ndarray
    hist_action: np.ndarray
    hist_value: np.ndarray
    hist_weight: np.ndarray
    id_len: np.ndarray
    id_hash: np.ndarray
    codebook_version: str
    rebuilt: int = 0
    duplicates: int = 0

    def __len__(self) -> int:
        return int(self.clocks.shape[0])

    def _arrays(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}

    def take(self, rows: Sequence[int] | np.ndarray | slice) -> StateBatch:
        """A copy holding the given rows."""
        arrays = {k: np.array(v[rows], copy=True) for k, v in self._arrays().items()}
        return StateBatch(**arrays, codebook_version=self.codebook_version)

    def copy(self) -> StateBatch:
        """A deep copy."""
        return self.take(slice(None))

    def same_as(self, other: StateBatch) -> bool:
        """Exact equality (nan equals nan; unused partition and id slots ignored)."""
        if self.codebook_version != other.codebook_version or len(self) != len(other):
            return False
        p = max(_used_slots(self.partitions), _used_slots(other.partitions))
        w = max(self.id_hash.shape[1], other.id_hash.shape[1])
        for k, a in self._arrays().items():
            b = getattr(other, k)
            if k in ("partitions", "offsets"):
                a, b = _pad_slots(a, p), _pad_slots(b, p)
            elif k == "id_hash":
                a, b = _pad_columns(a, w), _pad_columns(b, w)
            if a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                return False
        return True


def _used_slots(partitions: np.ndarray) -> int:
    used = (partitions >= 0).sum(axis=1)
    return int(used.max()) if used.size else 0


def _pad_columns(a: np.ndarray, w: int) -> np.ndarray:
    """``(U, L)`` array padded with zero columns to at least ``w``."""
    if a.shape[1] >= w:
        return a
    return np.concatenate([a, np.zeros((a.shape[0], w - a.shape[1]), a.dtype)], axis=1)


def _event_ids(ids: Any, n: int) -> np.ndarray | None:
    """``EventBatch.event_id`` checked: ``(n,)`` object array, or None when no event has an id
    (None and ``""`` are no id)."""
    listed = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    if len(listed) != n:
        raise ModelError(f"EventBatch.event_id has {len(listed)} ids, expected {n}")
    if not set(map(type, listed)) <= {str, type(None)}:
        i = next(k for k, x in enumerate(listed) if not (x is None or type(x) is str))
        raise ModelError(
            f"EventBatch.event_id[{i}] is {listed[i]!r} ({type(listed[i]).__name__}): "
            "expected a str, or None for no id"
        )
    if not any(listed):
        return None
    if isinstance(ids, np.ndarray) and ids.dtype == object and ids.shape == (n,):
        return ids
    out = np.empty(n, dtype=object)
    out[:] = listed
    return out


def event_id_hash(ids: Sequence[str]) -> np.ndarray:
    """``(n,)`` uint64: the first 8 bytes of the blake2b digest of each id's UTF-8, little-endian.

    What a state remembers of an event id. Two ids collide with probability 2^-64 a pair: a
    user's new event is taken for a duplicate by chance with probability under
    ``DEDUP_WINDOW * 2^-64``.
    """
    blake = hashlib.blake2b
    return np.frombuffer(
        b"".join([blake(i.encode("utf-8", "surrogatepass"), digest_size=8).digest() for i in ids]),
        "<u8",
    ).astype(np.uint64)


def _pad_slots(a: np.ndarray, p: int) -> np.ndarray:
    """``(U, P)`` partition-slot array cut or padded with -1 to ``p`` slots."""
    if a.shape[1] >= p:
        return a[:, :p]
    return np.concatenate([a, np.full((a.shape[0], p - a.shape[1]), -1, a.dtype)], axis=1)


@dataclass
class Features:
    """Features of each event, read before the event was folded. ``n`` events, ``C`` channels,
    ``M`` modalities, ``D`` depth, ``W`` width; rows in the batch's event order.

    ``valid (n,)``: False for skipped events (offset already folded, or a duplicate id); their
    rows are zero.
    ``density (n, C)``: for channel c, the share of the channel's decayed sketch mass in the
    item's buckets under the channel's modality, averaged over depths (0 when the channel is
    empty or the item unknown in its modality). The channels already span modalities, so this
    is the "channel × modality" block: cross pairs (an interactions sketch read with metadata
    buckets) would compare unrelated partitionings.
    ``counts (n, C + 2)``: raw non-negative counts (consumers log-scale them): per channel the
    decayed mass (events) at the event's time, then hours since the user's previous event (0
    for a first event), then events folded so far.
    ``item_codes (n, M, D)`` int16: the item's buckets per modality, -1 unknown.
    ``user_sketch (n, C, D, W)`` float32: the decayed sketches, only with ``with_sketches``.
    ``names``: column names of ``density`` then ``counts``.
    ``cf (n, len(cf_names))`` float32, only with an ``item_similarity``: item-item CF against
    the user's bounded history before the event, the similarity's ``columns`` of
    :data:`~sketchstream.models.similarity.CF_NAMES`; ``cf_names`` their names.
    """

    valid: np.ndarray
    density: np.ndarray
    counts: np.ndarray
    item_codes: np.ndarray
    user_sketch: np.ndarray | None = None
    codebook_version: str = ""
    names: tuple[str, ...] = field(default=())
    cf: np.ndarray | None = None
    cf_names: tuple[str, ...] = field(default=())


# --- the byte format -------------------------------------------------------------------------
#
# A user state is one byte string, little-endian, fixed-width fields, no pickle:
#
#   header      _HEAD (43 bytes): magic "SU", format (2 or 3), ids in the window n_ids u1
#               (0 in format 2, where the byte was "flags"), layout digest, codebooks digest,
#               clock f8, events folded u8, partition slots u2, history length n u2, and the
#               encodings of the history's times, values and weights (u1 each)
#   partitions  n_parts × (partition i4, last folded offset i8)
#   history     item hashes n × u8; times n × u4 seconds before the clock (integral times)
#               or n × f8; actions n × u1; values n × u1 (255: none; integers 0..254) or
#               n × f4; weights nothing (all 1) or n × f4 -- in rank order
#   ids         format 3 only: n_ids × u8 event-id hashes, oldest first (the dedup window)
#   sketches    C encodings (u1 each, _EMPTY ... _SPARSE below), then one block per encoding
#               holding that encoding's channels in channel order: nibbles, bytes, shorts,
#               bitmaps (D × W bits, packbits order), f4 values of the sparse cells. Undecayed
#               channels are whole counts, written dense in 4, 8 or 16 bits (as compact as a
#               bitmap plus values at MovieLens densities, and no gather); decayed ones sparse.
#
# The ids and everything before them read the same under any layout, so a state made under
# other codebooks or channels is rebuilt from its history and keeps its window; the sketches
# are read only when the layout and codebook digests match. A state with no id in its window
# is written in format 2, byte for byte what the code before format 3 wrote (and reads).
# Every field has a fixed width, so a batch of states is encoded and decoded with whole-batch
# numpy operations and one slicing pass over the byte strings.

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


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _excl(counts: np.ndarray) -> np.ndarray:
    """Exclusive prefix sums ``(n + 1,)`` int64: group ``i`` spans ``[out[i], out[i + 1])``."""
    out = np.zeros(counts.shape[0] + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _ranks(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of ``counts (n,)`` consecutive rows: each row's group and rank in it."""
    group = np.repeat(np.arange(counts.shape[0]), counts)
    return group, np.arange(group.shape[0]) - _excl(counts)[group]


def _per_group_all(ok: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    """``(n,)`` bool: every row of the group is ``ok`` (True for empty groups)."""
    return np.bincount(group[~ok], minlength=n) == 0


class _Sections:
    """Byte sections of a batch of states, each a flat buffer with per-user lengths, joined
    into one byte string per user at the end (the one per-user Python loop of encoding)."""

    def __init__(self, n_users: int) -> None:
        self.n = n_users
        self.parts: list[tuple[bytes, list[int]]] = []

    def add(self, data: np.ndarray, lengths: np.ndarray) -> None:
        """``data``: all users' bytes of this section, user after user; ``lengths (U,)``."""
        if data.size:
            self.parts.append((data.tobytes(), _excl(lengths).tolist()))

    def join(self) -> list[bytes]:
        parts, join = self.parts, b"".join
        return [join([buf[o[u] : o[u + 1]] for buf, o in parts]) for u in range(self.n)]


# --- group helpers (rows sorted by group; ``first`` = index of each row's group start) ------


class _CfSums:
    """Per-event sums behind the CF columns (:data:`~sketchstream.models.similarity.CF_NAMES`)
    over the (event, history entry) pairs added: ``s`` the similarity, ``v`` the entry's
    value; liked ``v >= like_min``, disliked ``v < like_min``, unrated (nan) neither. The pairs
    of one event are added as one contiguous run per call."""

    def __init__(self, n: int, like_min: float) -> None:
        self.n, self.like_min = n, like_min
        z = np.zeros
        self.liked, self.liked_n, self.dis, self.dis_n = z(n), z(n), z(n), z(n)
        self.value, self.liked_max, self.dis_max = z(n), z(n), z(n)
        self.sq, self.liked_sq, self.value_sq = z(n), z(n), z(n)  # the same with weights s^2

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
        runs = _run_starts(ev)
        self.liked_max = np.maximum(self.liked_max, _run_max(ev, runs, np.where(lk, s, 0.0), n))
        self.dis_max = np.maximum(self.dis_max, _run_max(ev, runs, np.where(dk, s, 0.0), n))
        self.sq += np.bincount(ev, s2 * rated, n)
        self.liked_sq += np.bincount(ev, s2 * lk, n)
        self.value_sq += np.bincount(ev, sv * s, n)

    def columns(self) -> np.ndarray:
        """``(n, len(CF_NAMES))`` float32 in :data:`CF_NAMES` order."""
        from sketchstream.models.similarity import CF_NAMES

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


def _run_flags(a: np.ndarray) -> np.ndarray:
    """Bool, True where a run of equal values of ``a`` starts, as ``np.r_[True, a[1:] !=
    a[:-1]]`` (which costs ~10 µs of Python a call; this runs several times a batch)."""
    return np.concatenate(([True], a[1:] != a[:-1]))


def _run_starts(ev: np.ndarray) -> np.ndarray:
    """Where each run of equal values of ``ev`` starts."""
    return np.flatnonzero(_run_flags(ev)) if ev.size else np.zeros(0, np.intp)


def _run_max(ev: np.ndarray, starts: np.ndarray, vals: np.ndarray, n: int) -> np.ndarray:
    """``(n,)`` per-index max of ``vals`` (0 where absent) when each index of ``ev`` occupies
    one contiguous run (how the CF lookups are laid out), the runs starting at ``starts``."""
    out = np.zeros(n)
    if ev.size:
        out[ev[starts]] = np.maximum.reduceat(vals, starts)
    return out


def _group_first(starts: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(np.where(starts, np.arange(starts.shape[0]), 0), axis=0)


def _excl_cumsum(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Per row: the sum of integer ``x (n,)`` over earlier rows of its group (exact)."""
    ex = np.cumsum(x, axis=0) - x
    return ex - ex[first]


def _excl_scan(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
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


def _group_cummax(x: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """Inclusive running max of float ``x (n,)`` within groups ``gid`` (non-decreasing)."""
    uniq, rank = np.unique(x, return_inverse=True)
    m = len(uniq)
    key = gid * m + rank
    return uniq[np.maximum.accumulate(key) - gid * m]


def _decay(dt: np.ndarray, half_life: np.ndarray) -> np.ndarray:
    """``2^(-dt/h)`` with broadcasting; h = inf gives 1 (dt must be finite)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp2(-dt / half_life)


# --- the aggregator --------------------------------------------------------------------------


class Aggregator:
    """Folds events into user states and reads features before each fold.

    ``config``: channels, actions, history size. ``codebooks``: modality -> fitted
    :class:`~sketchstream.models.emde.Codebook`, one per modality the channels use, all of the
    same depth and width. ``counters``: events folded, redeliveries skipped (offset already
    folded), duplicate ids dropped, unknown items per modality, states rebuilt; ever-increasing,
    for metrics.
    """

    def __init__(self, config: AggregatorConfig, codebooks: Mapping[str, Codebook]) -> None:
        self.config = config
        mods = config.modalities
        missing = [m for m in mods if m not in codebooks]
        if missing:
            raise ModelError(
                f"Aggregator: no codebook for modalities {missing}; got {sorted(codebooks)}"
            )
        self.codebooks = {m: codebooks[m] for m in mods}
        shapes = {(cb.depth, cb.width) for cb in self.codebooks.values()}
        if len(shapes) != 1:
            raise ModelError(f"Aggregator: codebooks must share depth and width, got {shapes}")
        for m, cb in self.codebooks.items():
            cb._check_fitted()
            if cb.width > 256:
                raise ModelError(f"Aggregator: codebook {m!r} width {cb.width} > 256")
        ((self.depth, self.width),) = shapes
        self.modalities = mods
        self.codebook_version = ";".join(f"{m}={cb.version}" for m, cb in self.codebooks.items())
        layout = f"{config.fingerprint()}/{self.depth}/{self.width}"
        self._layout_id = _digest(layout)
        self._codebooks_id = _digest(self.codebook_version)
        chans = config.channels
        self._ch_mod = np.array([mods.index(c.modality) for c in chans], np.int64)
        self._ch_half = np.array([c.half_life_s for c in chans], np.float64)
        self._ch_weight = np.array([c.weight for c in chans], np.float64)
        self._ch_lo = np.array([-np.inf if c.min_value is None else c.min_value for c in chans])
        self._ch_hi = np.array([np.inf if c.max_value is None else c.max_value for c in chans])
        self._ch_filtered = np.array(
            [c.min_value is not None or c.max_value is not None for c in chans]
        )
        n_act = len(config.actions)
        ok = np.zeros((n_act + 1, len(chans)), bool)  # last row: action -1 (unknown)
        for j, c in enumerate(chans):
            for a, name in enumerate(config.actions):
                ok[a, j] = c.actions is None or name in c.actions
        self._action_ok = ok
        self._cell_base = (np.arange(len(chans))[:, None] * self.depth + np.arange(self.depth))[
            None
        ] * self.width  # (1, C, D): offset of each (channel, depth) row in a user's sketches
        self._mod_channels = [np.flatnonzero(self._ch_mod == mo) for mo in range(len(mods))]
        self.counters: dict[str, int] = {
            "events": 0,
            "redelivered": 0,
            "duplicate_ids": 0,
            "rebuilt": 0,
        }
        self.counters.update({f"unknown_item/{m}": 0 for m in mods})
        self._reset_item_cache()

    # -- naming ---------------------------------------------------------------------------------

    @property
    def feature_names(self) -> list[str]:
        """Column names: ``density/<channel>`` ..., then ``mass/<channel>`` ...,
        ``hours_since_last``, ``events``."""
        chans = [c.name for c in self.config.channels]
        return (
            [f"density/{c}" for c in chans]
            + [f"mass/{c}" for c in chans]
            + ["hours_since_last", "events"]
        )

    # -- item lookup ----------------------------------------------------------------------------

    def _reset_item_cache(self) -> None:
        ids = list(dict.fromkeys(i for cb in self.codebooks.values() for i in cb.ids_))
        self._item_index: dict[str, int] = {}
        self._item_hash = np.zeros(0, np.uint64)
        self._item_codes = np.zeros((0, len(self.modalities), self.depth), np.int16)
        self._add_items(ids)

    def _add_items(self, ids: list[str]) -> None:
        start = len(self._item_index)
        codes = np.stack([cb.encode(ids) for cb in self.codebooks.values()], axis=1)
        self._item_hash = np.concatenate([self._item_hash, item_hash(ids)])
        self._item_codes = np.concatenate([self._item_codes, codes])
        self._item_index.update(zip(ids, range(start, start + len(ids)), strict=True))

    def _lookup(self, items: np.ndarray) -> np.ndarray:
        """Row of each item in the item cache ``(n,)``; unseen items are added."""
        lst = items.tolist()
        get = self._item_index.get
        idx = np.fromiter((get(x, -1) for x in lst), np.int64, len(lst))
        miss = idx < 0
        if miss.any():
            new = list(dict.fromkeys(str(lst[i]) for i in np.flatnonzero(miss)))
            if len(self._item_index) + len(new) > _ITEM_CACHE_MAX:
                self._reset_item_cache()
            self._add_items([x for x in new if x not in self._item_index])
            get = self._item_index.get
            idx = np.fromiter((get(str(x)) for x in lst), np.int64, len(lst))
        return idx

    # -- states ---------------------------------------------------------------------------------

    def new_batch(self, n_users: int) -> StateBatch:
        """``n_users`` empty states."""
        c, d, w, k = len(self.config.channels), self.depth, self.width, self.config.history_size
        return StateBatch(
            sketches=np.zeros((n_users, c, d, w), np.float32),
            clocks=np.full(n_users, np.nan),
            n_events=np.zeros(n_users, np.int64),
            partitions=np.full((n_users, 1), -1, np.int32),
            offsets=np.full((n_users, 1), -1, np.int64),
            hist_len=np.zeros(n_users, np.int32),
            hist_item=np.zeros((n_users, k), np.uint64),
            hist_ts=np.zeros((n_users, k), np.float64),
            hist_action=np.full((n_users, k), -1, np.int16),
            hist_value=np.zeros((n_users, k), np.float32),
            hist_weight=np.zeros((n_users, k), np.float32),
            id_len=np.zeros(n_users, np.int32),
            id_hash=np.zeros((n_users, 0), np.uint64),  # widened when ids come
            codebook_version=self.codebook_version,
        )

    def _check_batch(self, batch: StateBatch) -> None:
        if batch.codebook_version != self.codebook_version:
            raise ModelError(
                f"state batch built on codebooks {batch.codebook_version!r}, this aggregator "
                f"has {self.codebook_version!r}: load the states through this aggregator"
            )
        want = (len(self.config.channels), self.depth, self.width)
        if batch.sketches.shape[1:] != want:
            raise ModelError(f"state sketches {batch.sketches.shape[1:]}, expected {want}")

    # -- the hot path ---------------------------------------------------------------------------

    def score_then_fold(
        self,
        batch: StateBatch,
        events: EventBatch,
        *,
        with_sketches: bool = False,
        item_similarity: Any = None,
    ) -> Features:
        """Features of every event read before it is folded, then fold them all into ``batch``.

        ``events`` in offset order per user (users may interleave). Updates ``batch`` in place.
        An event is not folded (``valid`` False, features zero) when its offset is at or below
        its partition's last folded offset (a redelivery), or when it carries an ``event_id``
        among the ids of the user's last :data:`DEDUP_WINDOW` events folded with one, earlier
        events of this batch included (a duplicate: ``batch.duplicates`` counts them; its
        offset counts as consumed). Folding a stream in one batch or in any split gives the
        same states and valid flags.
        ``with_sketches``: also return each event's decayed user sketches ``(n, C, D, W)``
        (memory heavy: keep such batches small).
        ``item_similarity``: an :class:`~sketchstream.models.similarity.ItemSimilarity`
        (read only): adds ``Features.cf``, the event item's mean similarity to the liked and
        to the disliked items of the user's bounded history as it stands before the event
        (earlier events of this batch included, exactly as one-by-one folding would have it).
        """
        self._check_batch(batch)
        if not batch.sketches.flags.c_contiguous:
            batch.sketches = np.ascontiguousarray(batch.sketches)
        ev = events
        n = len(ev)
        n_ch = len(self.config.channels)
        self._validate_events(batch, ev)
        item_rows = self._lookup(ev.item) if n else np.zeros(0, np.int64)
        codes = self._item_codes[item_rows]  # (n, M, D)
        density = np.zeros((n, n_ch), np.float32)
        counts = np.zeros((n, n_ch + 2), np.float32)
        sk_out = np.zeros((n, n_ch, self.depth, self.width), np.float32) if with_sketches else None
        names = tuple(self.feature_names)
        sim = item_similarity
        cf_names = tuple(sim.columns) if sim is not None else ()
        if n == 0:
            return Features(
                np.zeros(0, bool),
                density,
                counts,
                codes,
                sk_out,
                self.codebook_version,
                names,
                np.zeros((0, len(cf_names)), np.float32) if sim is not None else None,
                cf_names,
            )
        # Work in user-sorted order (stable: each user's events stay in offset order).
        order = np.argsort(ev.user_index, kind="stable")
        u = ev.user_index[order]
        starts = _run_flags(u)
        gid = np.cumsum(starts) - 1
        first = _group_first(starts)
        ts = ev.ts[order]
        part, off = ev.partition[order], ev.offset[order]
        fresh, slot = self._dedup(batch, u, part, off)
        valid = fresh
        n_dup = 0
        if ev.event_id is not None:
            dup = self._duplicate_ids(batch, u, fresh, ev.event_id[order])
            n_dup = int(dup.sum())
            if n_dup:
                valid = fresh & ~dup
        # The clock before each event: the state's clock or the latest earlier valid event.
        clock0 = np.where(np.isnan(batch.clocks[u]), -np.inf, batch.clocks[u])
        incl = np.maximum(clock0, _group_cummax(np.where(valid, ts, -np.inf), gid))
        before = np.where(starts, clock0, np.maximum(clock0, np.roll(incl, 1)))
        read_t = np.maximum(ts, before)
        n_before = batch.n_events[u] + _excl_cumsum(valid.astype(np.int64), first)
        hours = np.where(np.isfinite(before), np.maximum(ts - before, 0.0) / 3600.0, 0.0)
        action = ev.action[order]
        value = ev.value[order].astype(np.float64)
        c_sorted = codes[order]
        arrays = {
            "u": u,
            "ts": ts,
            "valid": valid,
            "codes": c_sorted,
            "known": c_sorted[:, self._ch_mod, 0] >= 0,
            "member": self._membership(action, value) & valid[:, None],
            "w": ev.weight[order].astype(np.float64),
            "read_t": read_t,
            "order": order,
        }
        self._count(valid, fresh, n_dup, c_sorted)
        batch.duplicates += n_dup

        # Passes: cut a user's events where they span too many half-lives for scaled sums.
        h_min = float(self._ch_half.min())
        if math.isfinite(h_min):
            base = np.where(np.isfinite(clock0), clock0, ts[first])
            span = np.where(np.isfinite(incl), incl - base, 0.0)
            seg = np.floor(np.maximum(span, 0.0) / (_MAX_PASS_HALF_LIVES * h_min))
            cut = (starts | _run_flags(seg)).astype(np.int64)
            pass_id = np.cumsum(cut) - np.cumsum(cut)[first]
        else:
            pass_id = np.zeros(n, np.int64)
        dens_s = np.zeros((n, n_ch))
        mass_s = np.zeros((n, n_ch))
        for p in range(int(pass_id.max()) + 1):
            sel = np.flatnonzero(pass_id == p)
            self._fold_pass(batch, sel, arrays, dens_s, mass_s, sk_out)
        cf_out = None
        if sim is not None:
            cf_out = np.zeros((n, len(cf_names)), np.float32)
            cf_out[order] = self._cf_features(
                batch,
                sim,
                u,
                starts,
                valid,
                valid & (action >= 0),
                ts,
                value,
                arrays["w"],
                self._item_hash[item_rows[order]],
            )
        self._merge_history(
            batch,
            u,
            valid & (action >= 0),
            ts,
            action,
            value,
            arrays["w"],
            self._item_hash[item_rows[order]],
        )
        np.maximum.at(batch.offsets, (u[fresh], slot[fresh]), off[fresh])
        np.add.at(batch.n_events, u[valid], 1)

        dens_s[~valid] = 0.0
        mass_s[~valid] = 0.0
        density[order] = dens_s
        counts[order, :n_ch] = mass_s
        counts[order, n_ch] = np.where(valid, hours, 0.0)
        counts[order, n_ch + 1] = np.where(valid, n_before, 0)
        valid_out = np.zeros(n, bool)
        valid_out[order] = valid
        return Features(
            valid_out,
            density,
            counts,
            codes,
            sk_out,
            self.codebook_version,
            names,
            cf_out,
            cf_names,
        )

    # -- pieces of the hot path -----------------------------------------------------------------

    def _validate_events(self, batch: StateBatch, ev: EventBatch) -> None:
        n_act = len(self.config.actions)
        checks = (
            (
                (ev.user_index < 0) | (ev.user_index >= len(batch)),
                f"user_index outside [0, {len(batch)})",
            ),
            (
                (ev.action < -1) | (ev.action >= n_act),
                f"action outside [-1, {n_act}) (index into {self.config.actions})",
            ),
            (~np.isfinite(ev.ts), "ts not finite"),
            (~np.isfinite(ev.weight) | (ev.weight < 0), "weight not finite and >= 0"),
            (ev.offset < 0, "offset < 0"),
            (ev.partition < 0, "partition < 0"),
        )
        for bad, what in checks:
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ModelError(f"event {i} of the batch: {what} ({int(bad.sum())} such events)")

    def _slots(self, batch: StateBatch, u: np.ndarray, part: np.ndarray) -> np.ndarray:
        """Partition slot of each event ``(n,)``, allocating slots for new partitions."""
        match = batch.partitions[u] == part[:, None]
        missing = ~match.any(axis=1)
        if missing.any():
            for uu, pp in dict.fromkeys(
                zip(u[missing].tolist(), part[missing].tolist(), strict=True)
            ):
                free = np.flatnonzero(batch.partitions[uu] < 0)
                if free.size == 0:
                    rows = len(batch)
                    batch.partitions = np.concatenate(
                        [batch.partitions, np.full((rows, 1), -1, np.int32)], axis=1
                    )
                    batch.offsets = np.concatenate(
                        [batch.offsets, np.full((rows, 1), -1, np.int64)], axis=1
                    )
                    free = np.array([batch.partitions.shape[1] - 1])
                batch.partitions[uu, free[0]] = pp
            match = batch.partitions[u] == part[:, None]
        return match.argmax(axis=1)

    def _dedup(
        self, batch: StateBatch, u: np.ndarray, part: np.ndarray, off: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(valid, slot)``: events beyond their partition's last folded offset, in order."""
        slot = self._slots(batch, u, part)
        prev = batch.offsets[u, slot]
        key = u * batch.partitions.shape[1] + slot
        o2 = np.argsort(key, kind="stable")
        kk, ko = key[o2], off[o2]
        if not np.any((kk[1:] == kk[:-1]) & (ko[1:] <= ko[:-1])):
            return off > prev, slot
        # Redelivery inside one batch (rare): walk the events in order.
        valid = np.zeros(len(u), bool)
        last: dict[int, int] = {}
        for j, (k, o, p) in enumerate(zip(key.tolist(), off.tolist(), prev.tolist(), strict=True)):
            m = last.get(k, p)
            if o > m:
                valid[j] = True
                last[k] = o
        return valid, slot

    def _duplicate_ids(
        self, batch: StateBatch, u: np.ndarray, fresh: np.ndarray, ids: np.ndarray
    ) -> np.ndarray:
        """``(n,)`` bool: the ``fresh`` events (not redelivered) whose id is a duplicate, in
        user-sorted order (``u`` sorted, each user's events in offset order); pushes the ids
        of the others into their users' windows.

        One event at a time, an id is a duplicate when it is in the window as it stands then:
        the last :data:`DEDUP_WINDOW` ids folded, earlier events of the batch included. A
        duplicate is never folded, so it never enters the window. Duplicates are rare: a
        superset of them (ids in the stored window or repeated in the batch) is found
        vectorized, and only the users it names are walked in Python.
        """
        n, w = len(u), DEDUP_WINDOW
        listed = ids.tolist()
        has = np.fromiter(map(bool, listed), bool, n)  # None and "" are no id
        dup = np.zeros(n, bool)
        ci = np.flatnonzero(fresh & has)
        if ci.size == 0:
            return dup
        if batch.id_hash.shape[1] < w:
            batch.id_hash = _pad_columns(batch.id_hash, w)
        h = event_id_hash([listed[i] for i in ci.tolist()])
        cu = u[ci]
        n_old = batch.id_len[cu]
        stored = batch.id_hash[cu, :w] == h[:, None]
        maybe = (stored & (np.arange(w) < n_old[:, None])).any(axis=1)
        o = np.lexsort((h, cu))  # stable: a repeated id's later events follow its first
        again = (cu[o][1:] == cu[o][:-1]) & (h[o][1:] == h[o][:-1])
        maybe[o[1:][again]] = True
        is_dup = np.zeros(ci.size, bool)
        if maybe.any():
            hashes = h.tolist()
            for user in np.unique(cu[maybe]).tolist():
                window = batch.id_hash[user, : batch.id_len[user]].tolist()
                for r in np.flatnonzero(cu == user).tolist():
                    if hashes[r] in window[-w:]:
                        is_dup[r] = True
                    else:
                        window.append(hashes[r])
        dup[ci] = is_dup
        self._merge_ids(batch, cu[~is_dup], h[~is_dup])
        return dup

    @staticmethod
    def _merge_ids(batch: StateBatch, nu: np.ndarray, nh: np.ndarray) -> None:
        """Append ids ``nh`` to the windows of users ``nu`` (sorted, each user's ids in fold
        order), keeping each window's last :data:`DEDUP_WINDOW`."""
        if nu.size == 0:
            return
        w = DEDUP_WINDOW
        users, n_new = np.unique(nu, return_counts=True)
        n_old = np.minimum(batch.id_len[users].astype(np.int64), w)
        drop = np.maximum(n_old + n_new - w, 0)  # the oldest ids pushed out
        ol, oslot = np.nonzero(np.arange(w) < n_old[:, None])
        old = batch.id_hash[users[ol], oslot]
        at = oslot - drop[ol]
        keep = at >= 0
        g, rank = _ranks(n_new)
        at_new = n_old[g] + rank - drop[g]
        keep_new = at_new >= 0
        batch.id_hash[users] = 0
        batch.id_hash[users[ol[keep]], at[keep]] = old[keep]
        batch.id_hash[users[g[keep_new]], at_new[keep_new]] = nh[keep_new]
        batch.id_len[users] = np.minimum(n_old + n_new, w)

    def _membership(self, action: np.ndarray, value: np.ndarray) -> np.ndarray:
        """``(n, C)`` bool: the channels each event's action and value feed."""
        ok = self._action_ok[action]
        v = value[:, None]
        in_range = (v >= self._ch_lo[None, :]) & (v < self._ch_hi[None, :])
        return ok & (in_range | ~self._ch_filtered[None, :])

    def _count(self, valid: np.ndarray, fresh: np.ndarray, n_dup: int, codes: np.ndarray) -> None:
        self.counters["events"] += int(valid.sum())
        self.counters["redelivered"] += int((~fresh).sum())
        self.counters["duplicate_ids"] += n_dup
        for m, name in enumerate(self.modalities):
            self.counters[f"unknown_item/{name}"] += int((valid & (codes[:, m, 0] < 0)).sum())

    def _fold_pass(
        self,
        batch: StateBatch,
        sel: np.ndarray,
        arrays: dict[str, np.ndarray],
        dens_out: np.ndarray,
        mass_out: np.ndarray,
        sk_out: np.ndarray | None,
    ) -> None:
        """Features then fold for events ``sel`` (positions in user-sorted order).

        Exponential decay makes a user's sketch at time t0 a sum of ``w 2^((ts - t0)/h)``: with
        t0 the user's clock after this pass, every earlier-event prefix is a cumulative sum of
        scaled weights <= w, so the whole pass is sorts, cumsums and one scatter.
        """
        u = arrays["u"][sel]
        ts = arrays["ts"][sel]
        valid = arrays["valid"][sel]
        codes = arrays["codes"][sel]  # (m, M, D)
        known = arrays["known"][sel]  # (m, C)
        contrib = arrays["member"][sel] & known
        m = len(sel)
        n_ch, depth, width = len(self.config.channels), self.depth, self.width
        starts = _run_flags(u)
        first = _group_first(starts)
        gl = np.cumsum(starts) - 1
        users = u[starts]
        clock0 = batch.clocks[users]
        has_clock = ~np.isnan(clock0)
        t_valid = np.where(valid, ts, -np.inf)
        t0 = np.maximum(
            np.where(has_clock, clock0, -np.inf),
            np.maximum.reduceat(t_valid, np.flatnonzero(starts)),
        )
        active = np.isfinite(t0)
        t0 = np.where(active, t0, 0.0)
        half = self._ch_half[None, :]
        f0 = _decay(np.where(has_clock, t0 - np.nan_to_num(clock0), 0.0)[:, None], half)
        dt = np.where(contrib, (t0[gl] - ts)[:, None], 0.0)
        sw = np.where(contrib, arrays["w"][sel][:, None] * self._ch_weight * _decay(dt, half), 0.0)
        sw[sw < _FORGET] = 0.0

        sk = batch.sketches
        sk_flat = sk.reshape(-1)
        ch_codes = codes[:, self._ch_mod, :]  # (m, C, D) int16
        # Flat index of each (event, channel, depth) bucket in the state's sketches (unknown
        # items point at a neighbouring cell; they are masked out below).
        flat = (u * (n_ch * depth * width))[:, None, None] + self._cell_base + ch_codes
        bucket = sk_flat.take(flat, mode="wrap").astype(np.float64)
        bucket *= f0[gl][:, :, None]
        bucket[bucket < _FORGET] = 0.0
        # Every known event adds to one bucket per depth: depth 0 carries the channel's mass.
        mass0 = sk[users, :, 0, :].sum(axis=-1, dtype=np.float64) * f0  # (Up, C)
        mass0[mass0 < _FORGET] = 0.0
        upos = np.arange(m) - first
        mass = (mass0[gl] + _excl_scan(sw, upos))[:, :, None]  # (m, C, 1)
        # Earlier events of the same user in the same bucket: per modality and depth, group
        # rows by (user, bucket) and scan each group in event order.
        d_ix = np.arange(depth)[None, :]
        rows = np.arange(m)[:, None]
        for mo, chans in enumerate(self._mod_channels):
            keys = gl[:, None] * (width + 1) + codes[:, mo, :].astype(np.int64) + 1  # (m, D)
            perm = np.argsort(keys, axis=0, kind="stable")
            ks = keys[perm, d_ix]
            kstarts = np.ones_like(ks, dtype=bool)
            kstarts[1:] = ks[1:] != ks[:-1]
            kpos = rows - np.maximum.accumulate(np.where(kstarts, rows, 0), axis=0)
            # Column by column, end to end; only groups of two or more rows have a prefix.
            pos = kpos.T.reshape(-1)
            multi = np.flatnonzero((pos >= 1) | np.concatenate((pos[1:] >= 1, [False])))
            if multi.size:
                ev_row = perm.T.reshape(-1)[multi]
                ex = _excl_scan(sw[ev_row][:, chans], pos[multi])  # (k, Cm)
                bucket[ev_row[:, None], chans[None, :], (multi // m)[:, None]] += ex
        ok = known[:, :, None] & (mass > 0) & valid[:, None, None]
        share = np.divide(bucket, mass, out=np.zeros_like(bucket), where=ok)
        dens_out[sel] = share.mean(axis=-1)
        read_t = arrays["read_t"][sel]
        grow = _decay(np.where(valid, read_t - t0[gl], 0.0)[:, None], half)  # >= 1
        mass_out[sel] = mass[:, :, 0] * grow
        i_idx, c_idx = np.nonzero(contrib)
        if sk_out is not None:
            onehot = np.zeros((m, n_ch, depth, width))
            for d in range(depth):
                onehot[i_idx, c_idx, d, ch_codes[i_idx, c_idx, d]] = sw[i_idx, c_idx]
            s0 = sk[users] * f0.astype(np.float32)[:, :, None, None]
            before = _excl_scan(onehot, upos) + s0[gl]
            sk_out[arrays["order"][sel]] = np.where(
                valid[:, None, None, None], before * grow[:, :, None, None], 0.0
            )
        # Fold: decay the touched sketches to t0, then add the scaled contributions.
        for c in np.flatnonzero(np.isfinite(self._ch_half)).tolist():
            moved = f0[:, c] != 1.0
            if moved.any():
                rows_c = sk[users[moved], c] * f0[moved, c].astype(np.float32)[:, None, None]
                rows_c[rows_c < _FORGET] = 0.0
                sk[users[moved], c] = rows_c
        vals = np.repeat(sw[i_idx, c_idx].astype(np.float32), depth)
        np.add.at(sk_flat, flat[i_idx, c_idx].reshape(-1), vals)
        batch.clocks[users] = np.where(active, t0, clock0)

    def _cf_features(
        self,
        batch: StateBatch,
        sim: Any,
        u: np.ndarray,
        starts: np.ndarray,
        valid: np.ndarray,
        cand: np.ndarray,
        ts: np.ndarray,
        value: np.ndarray,
        w: np.ndarray,
        hashes: np.ndarray,
    ) -> np.ndarray:
        """``(n, len(sim.columns))`` CF columns in user-sorted order (see
        :meth:`score_then_fold` and :data:`~sketchstream.models.similarity.CF_NAMES`).

        The history before event j is the top K, by the history's static rank key (decayed
        weight, time, insertion order), of the stored history and the batch's earlier ``cand``
        events of the user: what folding one event at a time leaves, as the key never changes.
        A user whose batch events each rank above everything before them (time-ordered events
        of equal weight: the usual case) is computed vectorized (:meth:`_cf_windows`): the
        last ``min(t, K)`` earlier batch events plus the stored history's first ``K - t``
        slots; other users (late events, weights out of time order) from one sort of their
        entries per batch (:meth:`_cf_out_of_rank`).
        """
        from sketchstream.models.similarity import CF_NAMES

        n = len(u)
        k_max = self.config.history_size
        out = np.zeros((n, len(CF_NAMES)), np.float32)
        pick = [CF_NAMES.index(c) for c in sim.columns]
        if n == 0 or k_max == 0:
            return out[:, pick]
        hl = self.config.history_half_life_s
        like_min = float(sim.like_min)
        with np.errstate(divide="ignore"):
            score = np.log2(w) + ts / hl
        first = _group_first(starts)
        gid = np.cumsum(starts) - 1
        users = u[starts]
        h_len = batch.hist_len[users].astype(np.int64)
        slot_ok = np.arange(k_max)[None, :] < h_len[:, None]
        with np.errstate(divide="ignore"):
            h_score = np.log2(batch.hist_weight[users].astype(np.float64)) + (
                batch.hist_ts[users] / hl
            )
        old_max_s = np.where(slot_ok, h_score, -np.inf).max(axis=1)
        old_max_t = np.where(slot_ok, batch.hist_ts[users], -np.inf).max(axis=1)
        # running max of earlier candidates (exclusive), seeded with the stored history
        c_s = np.where(cand, score, -np.inf)
        c_t = np.where(cand, ts, -np.inf)
        inc_s = _group_cummax(c_s, gid)
        inc_t = _group_cummax(c_t, gid)
        prev_s = np.where(starts, -np.inf, np.roll(inc_s, 1))
        prev_t = np.where(starts, -np.inf, np.roll(inc_t, 1))
        prev_s = np.maximum(prev_s, old_max_s[gid])
        prev_t = np.maximum(prev_t, old_max_t[gid])
        bad_ev = cand & ~((score >= prev_s) & (ts >= prev_t) & np.isfinite(score))
        bad_user = np.zeros(len(users), bool)
        bad_user[gid[bad_ev]] = True
        ci = cand.astype(np.int64)
        t = _excl_cumsum(ci, first)  # earlier candidates of the user in this batch
        sums = _CfSums(n, like_min)

        fast = np.flatnonzero(valid & ~bad_user[gid])
        if fast.size:
            self._cf_windows(batch, sim, sums, fast, gid, users, h_len, t, cand, value, hashes)

        if bad_user.any():
            self._cf_out_of_rank(
                batch, sim, sums, bad_user, gid, users, h_len, h_score, t, valid, cand,
                score, ts, value, hashes,
            )  # fmt: skip

        out[:] = sums.columns()
        out[~valid] = 0.0
        return out[:, pick]

    def _cf_out_of_rank(
        self,
        batch: StateBatch,
        sim: Any,
        sums: _CfSums,
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
        max_pairs: int = 1 << 21,
    ) -> None:
        """The path of :meth:`_cf_features` for users ``bad_user`` (indices into ``users``),
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
        k_max = self.config.history_size
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
        base = _excl(n_e)
        events = np.flatnonzero(valid & bad_user[gid])
        r_events = sim.ranks(hashes[events])  # once per event, not once per pair
        per = n_e[gid[events]]
        ends = np.cumsum(per)
        lo = 0
        while lo < events.size:  # chunks of events with at most max_pairs pairs (or one event)
            done = int(ends[lo - 1]) if lo else 0
            hi = max(lo + 1, int(np.searchsorted(ends, done + max_pairs, side="right")))
            ev, cnt = events[lo:hi], per[lo:hi]
            first = _excl(cnt)[:-1]
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
        self,
        batch: StateBatch,
        sim: Any,
        sums: _CfSums,
        fast: np.ndarray,
        gid: np.ndarray,
        users: np.ndarray,
        h_len: np.ndarray,
        t: np.ndarray,
        cand: np.ndarray,
        value: np.ndarray,
        hashes: np.ndarray,
    ) -> None:
        """The vectorized path of :meth:`_cf_features`: the pairs of events ``fast``.

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
        k = self.config.history_size
        cols = np.arange(k)
        n_cand = np.bincount(gid[cand], minlength=users.shape[0])
        base = _excl(n_cand + k)[:-1]
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
        s_win = sim.pair_values(r_all[fast, None], sliding_window_view(e_rank, k)[start])
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
        liked = _excl(e_value >= sums.like_min)
        disliked = _excl(e_value < sums.like_min)
        sums.add_counts(
            fast, liked[start + k] - liked[start], disliked[start + k] - disliked[start]
        )

    def _merge_history(
        self,
        batch: StateBatch,
        u: np.ndarray,
        cand: np.ndarray,
        ts: np.ndarray,
        action: np.ndarray,
        value: np.ndarray,
        weight: np.ndarray,
        hashes: np.ndarray,
    ) -> None:
        """Keep each user's top-K events by decayed weight (ties: most recent first)."""
        k_max = self.config.history_size
        ci = np.flatnonzero(cand)
        if ci.size == 0 or k_max == 0:
            return
        nu = u[ci]
        users = np.unique(nu)
        n_old = batch.hist_len[users].astype(np.int64)
        ol, oslot = np.nonzero(np.arange(k_max)[None, :] < n_old[:, None])
        ou = users[ol]
        nl = np.searchsorted(users, nu)
        nstarts = _run_flags(nu)
        rank_new = np.arange(ci.size) - _group_first(nstarts)
        user = np.concatenate([ou, nu])
        c_item = np.concatenate([batch.hist_item[ou, oslot], hashes[ci]])
        c_ts = np.concatenate([batch.hist_ts[ou, oslot], ts[ci]])
        c_act = np.concatenate([batch.hist_action[ou, oslot], action[ci].astype(np.int16)])
        c_val = np.concatenate([batch.hist_value[ou, oslot], value[ci].astype(np.float32)])
        c_w = np.concatenate([batch.hist_weight[ou, oslot], weight[ci].astype(np.float32)])
        recency = np.concatenate([n_old[ol] - 1 - oslot, n_old[nl] + rank_new])
        with np.errstate(divide="ignore"):
            score = np.log2(c_w.astype(np.float64)) + c_ts / self.config.history_half_life_s
        o = np.lexsort((-recency, -c_ts, -score, user))
        su = user[o]
        s_starts = _run_flags(su)
        rank = np.arange(o.size) - _group_first(s_starts)
        keep = rank < k_max
        o, su, rank = o[keep], su[keep], rank[keep]
        batch.hist_item[users] = 0
        batch.hist_ts[users] = 0.0
        batch.hist_action[users] = -1
        batch.hist_value[users] = 0.0
        batch.hist_weight[users] = 0.0
        batch.hist_item[su, rank] = c_item[o]
        batch.hist_ts[su, rank] = c_ts[o]
        batch.hist_action[su, rank] = c_act[o]
        batch.hist_value[su, rank] = c_val[o]
        batch.hist_weight[su, rank] = c_w[o]
        batch.hist_len[users] = np.minimum(k_max, n_old + np.bincount(nl, minlength=users.size))

    # -- scalar path, rebuild -------------------------------------------------------------------

    def fold(self, state: StateBatch, event: Event) -> StateBatch:
        """A new one-user state: ``state`` with ``event`` folded in (a one-event batch)."""
        if len(state) != 1:
            raise ModelError(f"fold: expected a one-user state, got {len(state)} users")
        if event.action not in self.config.actions:
            raise ModelError(
                f"unknown action {event.action!r}: expected one of {', '.join(self.config.actions)}"
            )
        out = state.copy()
        offset = event.offset
        if offset is None:
            here = out.partitions[0] == event.partition
            offset = int(out.offsets[0][here].max()) + 1 if here.any() else 0
        self.score_then_fold(
            out,
            EventBatch(
                user_index=[0],
                item=np.array([event.item], dtype=object),
                action=[self.config.actions.index(event.action)],
                value=[event.value],
                ts=[event.ts],
                partition=[event.partition],
                offset=[offset],
                weight=[event.weight],
                event_id=None if event.event_id is None else [event.event_id],
            ),
        )
        return out

    def rebuild(self, batch: StateBatch) -> StateBatch:
        """A copy of ``batch`` whose sketches are re-sketched from the histories under this
        aggregator's codebooks (clock, offsets and counts kept)."""
        out = batch.copy()
        out.codebook_version = self.codebook_version
        self._rebuild_rows(out, np.arange(len(out)))
        return out

    def _rebuild_rows(self, batch: StateBatch, rows: np.ndarray, chunk: int = 512) -> None:
        n_ch, depth, width = len(self.config.channels), self.depth, self.width
        for lo in range(0, len(rows), chunk):
            r = np.asarray(rows[lo : lo + chunk])
            k = batch.hist_item.shape[1]
            mask = (np.arange(k)[None, :] < batch.hist_len[r][:, None]) & (
                batch.hist_action[r] >= 0
            )
            rl, slot = np.nonzero(mask)
            acc = np.zeros(len(r) * n_ch * depth * width)
            if rl.size:
                hashes = batch.hist_item[r[rl], slot]
                codes = np.stack(
                    [cb._codes_at(cb.rows_for_hashes(hashes)) for cb in self.codebooks.values()],
                    axis=1,
                )
                ch_codes = codes[:, self._ch_mod, :].astype(np.int64)  # (E, C, D)
                ts = batch.hist_ts[r[rl], slot]
                member = self._membership(
                    batch.hist_action[r[rl], slot].astype(np.int64),
                    batch.hist_value[r[rl], slot].astype(np.float64),
                ) & (ch_codes[:, :, 0] >= 0)
                dt = np.where(member, (batch.clocks[r[rl]] - ts)[:, None], 0.0)
                sw = (
                    batch.hist_weight[r[rl], slot][:, None]
                    * self._ch_weight
                    * _decay(dt, self._ch_half[None, :])
                )
                sw[sw < _FORGET] = 0.0
                e_idx, c_idx = np.nonzero(member)
                flat = ((rl[e_idx] * n_ch + c_idx)[:, None] * depth + np.arange(depth)) * width
                flat = flat + ch_codes[e_idx, c_idx, :]
                acc = np.bincount(
                    flat.reshape(-1),
                    weights=np.repeat(sw[e_idx, c_idx], depth),
                    minlength=acc.size,
                )
            batch.sketches[r] = acc.reshape(len(r), n_ch, depth, width).astype(np.float32)

    # -- bytes ----------------------------------------------------------------------------------

    def dump(self, batch: StateBatch) -> list[bytes]:
        """One compact, versioned byte string per user (no pickle): write each one back.

        Encoded for the whole batch at once (see the format above ``_HEAD``).
        """
        self._check_batch(batch)
        n_users = len(batch)
        if n_users == 0:
            return []
        out = _Sections(n_users)
        head = np.zeros(n_users, _HEAD)
        head["magic"] = _MAGIC_U2
        n_ids = batch.id_len.astype(np.int64)
        head["format"] = np.where(n_ids > 0, _FORMAT_VERSION, _FORMAT_NO_IDS)
        head["n_ids"] = n_ids
        head["layout"] = self._layout_id
        head["codebooks"] = self._codebooks_id
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
        ts_small = _per_group_all(ts_ok, owner, n_users)
        value = batch.hist_value[in_hist]
        nan = np.isnan(value)
        with np.errstate(invalid="ignore"):
            v_small = nan | ((value >= 0) & (value <= 254) & (value == np.floor(value)))
        v_small = _per_group_all(v_small, owner, n_users)
        weight = batch.hist_weight[in_hist]
        w_ones = _per_group_all(weight == 1.0, owner, n_users)
        head["ts_kind"] = ~ts_small
        head["value_kind"] = ~v_small
        head["weight_kind"] = ~w_ones
        out.add(head, np.full(n_users, _HEAD.itemsize))
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

        n_ch, cells = batch.sketches.shape[1], self.depth * self.width
        kind, dense, sparse = self._sketch_encodings(batch)
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

    def _sketch_encodings(
        self, batch: StateBatch
    ) -> tuple[np.ndarray, dict[int, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """How each user's channel is written: ``(kind (U, C), dense, (rows, values))``.

        Undecayed channels hold counts: written dense as 4-bit, 8-bit or 16-bit integers when
        they are whole numbers in range (``dense[code]``: ``(k, D*W)`` integer rows, user then
        channel order). Anything else (decayed weights, fractional event weights) is written
        sparse: a bitmap of the non-zero cells and their float32 values (``rows`` into the
        ``(U*C, D*W)`` view, ``values`` the rows themselves).
        """
        n_users, n_ch = batch.sketches.shape[:2]
        cells = self.depth * self.width
        sk = batch.sketches.reshape(n_users * n_ch, cells)
        kind = np.full(n_users * n_ch, _SPARSE, np.int64)
        dense: dict[int, np.ndarray] = {}
        if sk.size:
            top, low = sk.max(axis=1), sk.min(axis=1)
            kind[(top == 0) & (low == 0)] = _EMPTY
            counts = np.tile(~np.isfinite(self._ch_half), n_users)
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

    def load(self, blobs: Sequence[bytes | None]) -> StateBatch:
        """States from :meth:`dump` bytes (None: a new user), in order.

        A state built on other codebooks or another channel layout is rebuilt from its history;
        ``StateBatch.rebuilt`` and ``counters["rebuilt"]`` count them. Unreadable bytes raise
        :class:`~sketchstream.models.errors.ArtifactError`.
        """
        n_users = len(blobs)
        batch = self.new_batch(n_users)
        rows = np.array([r for r, b in enumerate(blobs) if b is not None], np.int64)
        given = [blobs[r] for r in rows.tolist()]
        if not given:
            return batch
        size = np.fromiter(map(len, given), np.int64, len(given))
        hs = _HEAD.itemsize
        self._refuse(rows, size < hs, f"shorter than the {hs}-byte header")
        head = np.frombuffer(b"".join([b[:hs] for b in given]), _HEAD)
        fmt = head["format"]
        self._refuse(
            rows,
            (head["magic"] != _MAGIC_U2) | ((fmt != _FORMAT_VERSION) & (fmt != _FORMAT_NO_IDS)),
            f"not a sketchstream user state of format v{_FORMAT_NO_IDS} or v{_FORMAT_VERSION}",
        )
        n_ids = head["n_ids"].astype(np.int64)
        self._refuse(rows, (fmt == _FORMAT_NO_IDS) & (n_ids != 0), "format v2 with flags set")
        n_parts = head["n_parts"].astype(np.int64)
        n_hist = head["n_hist"].astype(np.int64)
        ts_w = np.where(head["ts_kind"] == 0, 4, 8)
        v_w = np.where(head["value_kind"] == 0, 1, 4)
        w_w = np.where(head["weight_kind"] == 0, 0, 4)
        self._refuse(
            rows,
            (head["ts_kind"] > 1) | (head["value_kind"] > 1) | (head["weight_kind"] > 1),
            "unknown history encoding",
        )
        # where each section starts in each blob
        p_hist = hs + _PAIR.itemsize * n_parts
        p_ts = p_hist + 8 * n_hist
        p_act = p_ts + ts_w * n_hist
        p_val = p_act + n_hist
        p_w = p_val + v_w * n_hist
        p_ids = p_w + w_w * n_hist
        p_sk = p_ids + 8 * n_ids
        fresh = (head["layout"] == self._layout_id) & (head["codebooks"] == self._codebooks_id)
        n_ch, cells = len(self.config.channels), self.depth * self.width
        self._refuse(rows, size < p_sk + np.where(fresh, n_ch, 0), "truncated")

        # one pass over the byte strings: slice every section out, then decode each at once
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
        for b, ph, pt, pa, pv, pw, pi, ps, fr, tk, vk in spans:
            pairs_b.append(b[hs:ph])
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
        batch.n_events[rows] = head["n_events"].astype(np.int64)
        slots = max(int(n_parts.max()), 1)
        batch.partitions = np.full((n_users, slots), -1, np.int32)
        batch.offsets = np.full((n_users, slots), -1, np.int64)
        pairs = np.frombuffer(b"".join(pairs_b), _PAIR)
        owner, rank = _ranks(n_parts)
        batch.partitions[rows[owner], rank] = pairs["partition"]
        batch.offsets[rows[owner], rank] = pairs["offset"]

        owner, rank = _ranks(n_hist)
        keep = rank < self.config.history_size  # stored in rank order: keep the top K
        r_keep, k_keep = rows[owner[keep]], rank[keep]
        batch.hist_len[rows] = np.minimum(n_hist, self.config.history_size)
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
            w = DEDUP_WINDOW
            batch.id_hash = np.zeros((n_users, w), np.uint64)
            owner, rank = _ranks(n_ids)
            at = rank - np.maximum(n_ids - w, 0)[owner]  # keep each window's newest w
            keep = at >= 0
            ids = np.frombuffer(b"".join(ids_b), "<u8")
            batch.id_hash[rows[owner[keep]], at[keep]] = ids[keep]
            batch.id_len[rows] = np.minimum(n_ids, w)

        if kinds_b:
            self._load_sketches(batch, rows[fresh], blocks)
        stale = rows[~fresh]
        if stale.size:
            self._rebuild_rows(batch, stale)
            self.counters["rebuilt"] += int(stale.size)
            log.info(
                "rebuilt %d of %d user states under %s",
                stale.size,
                n_users,
                self.codebook_version,
            )
        batch.rebuilt = int(stale.size)
        return batch

    def _load_sketches(
        self, batch: StateBatch, rows: np.ndarray, blocks: dict[str, list[bytes]]
    ) -> None:
        """Fill the sketches of ``rows`` from their sketch sections (``blocks``: per row, the
        encodings and the bytes of each encoding's block), all rows at once."""
        n_ch, cells = len(self.config.channels), self.depth * self.width
        kinds = np.frombuffer(b"".join(blocks["kinds"]), np.uint8).reshape(-1, n_ch)
        self._refuse(rows, (kinds > _SPARSE).any(axis=1), "unknown sketch encoding")
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
            self._refuse(rows, got != want, f"sketch block {name!r} truncated")
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
        self._refuse(rows, got != want, "sketch values truncated or followed by other bytes")
        x = np.zeros(nz.shape, np.float32)
        values = np.frombuffer(b"".join(blocks["values"]), "<f4")
        x.reshape(-1)[np.flatnonzero(nz)] = values  # x[nz] = values, several times faster
        sk[target[flat_kinds == _SPARSE]] = x

    @staticmethod
    def _refuse(rows: np.ndarray, bad: np.ndarray, what: str) -> None:
        if bad.any():
            first = int(rows[np.flatnonzero(bad)[0]])
            raise ArtifactError(
                f"user state {first}: unreadable bytes: {what} ({int(bad.sum())} such states)"
            )


# --- size report and benchmark ---------------------------------------------------------------


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


def replay_benchmark(
    data: Mapping[str, np.ndarray] | None = None,
    *,
    config: AggregatorConfig | None = None,
    depth: int = 12,
    width: int = 64,
    batch_size: int = 4096,
    seed: int = 0,
) -> dict[str, Any]:
    """Replay a rating stream through ``score_then_fold`` in time order; events/s and bytes.

    ``data``: :func:`synthetic_ratings` output (default: the MovieLens-1M-shaped synthetic
    stream). Returns ``{"events", "users", "seconds", "events_per_s", "cpu_seconds",
    "events_per_cpu_s", "dump_seconds", "bytes": state_size_report(...)}`` (CPU time is the
    fairer figure on a shared machine).
    """
    data = synthetic_ratings(seed=seed) if data is None else data
    config = config or default_config()
    ids = [str(i) for i in data["item_ids"]]
    codebooks = {
        "interactions": Codebook(depth, width, seed).fit(data["interaction_vectors"], ids),
        "metadata": Codebook(depth, width, seed + 1).fit(data["metadata_vectors"], ids),
    }
    agg = Aggregator(config, {m: codebooks[m] for m in config.modalities})
    n = len(data["ts"])
    n_users = int(data["user"].max()) + 1
    batch = agg.load([None] * n_users)
    action = np.zeros(n, np.int64)
    offsets = np.arange(n, dtype=np.int64)
    part = np.zeros(n, np.int32)
    t0, c0 = time.perf_counter(), time.process_time()
    for lo in range(0, n, batch_size):
        s = slice(lo, lo + batch_size)
        agg.score_then_fold(
            batch,
            EventBatch(
                data["user"][s],
                data["item"][s],
                action[s],
                data["value"][s],
                data["ts"][s],
                part[s],
                offsets[s],
            ),
        )
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    t1 = time.perf_counter()
    blobs = agg.dump(batch)
    dump_seconds = time.perf_counter() - t1
    return {
        "events": n,
        "users": n_users,
        "seconds": seconds,
        "events_per_s": n / seconds,
        "cpu_seconds": cpu_seconds,
        "events_per_cpu_s": n / cpu_seconds,
        "dump_seconds": dump_seconds,
        "bytes": state_size_report(blobs),
    }
