"""The columnar batches the aggregator reads and writes: events in, user states, features out.

:class:`Event` (one event, for the scalar fold), :class:`EventBatch` (a micro-batch of events),
:class:`StateBatch` (the states of a batch's users, a working buffer), :class:`Features` (what
each event is scored on), and the event-id hash of the deduplication window
(:func:`event_id_hash`, :data:`DEDUP_WINDOW`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from sketchstream.models.errors import ModelError

__all__ = [
    "DEDUP_WINDOW",
    "Event",
    "EventBatch",
    "Features",
    "StateBatch",
    "event_id_hash",
    "pad_columns",
]

#: How many event ids a user state remembers for deduplication: the ids of its last
#: ``DEDUP_WINDOW`` events folded with an id, 8 bytes each (so at most 512 bytes a state; a
#: state whose events never carried an id stores none). Raising it later is safe: states keep
#: what they have; lowering it keeps each state's newest ids. At most 255 (one header byte).
#: The aggregator and the byte format read it at call time (``batches.DEDUP_WINDOW``), so one
#: patch of this name changes the window everywhere.
DEDUP_WINDOW = 64


@dataclass(frozen=True)
class Event:
    """One event for the scalar path (:meth:`~sketchstream.models.aggregator.Aggregator.fold`).
    ``offset`` None: the next one."""

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
    :meth:`~sketchstream.models.aggregator.Aggregator.score_then_fold`.
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

    @classmethod
    def from_table(
        cls, events: Any, rows: slice, *, user_index: np.ndarray, action: np.ndarray
    ) -> EventBatch:
        """Rows ``rows`` of an :class:`~sketchstream.models.events.EventTable` in stream order,
        as the offline replay feeds them: one partition (0), each event's offset its row number.
        ``user_index (n,)`` and ``action (n,)`` cover the whole table (row in the StateBatch,
        index into ``config.actions``); the table's ``event_id`` column, when it has one, comes
        along."""
        start, stop, _ = rows.indices(len(events))
        event_ids = getattr(events, "event_id", None)
        return cls(
            user_index=user_index[rows],
            item=events.item[rows],
            action=action[rows],
            value=events.value[rows],
            ts=events.ts[rows],
            partition=np.zeros(stop - start, dtype=np.int32),
            offset=np.arange(start, stop, dtype=np.int64),
            event_id=None if event_ids is None else event_ids[rows],
        )


@dataclass
class StateBatch:
    """User states of a batch, dense and columnar. ``U`` users, ``C`` channels, ``D`` depth,
    ``W`` width, ``P`` partition slots, ``K`` history size.

    ``sketches (U, C, D, W)`` float32, at each user's clock; ``clocks (U,)`` float64, the
    latest time of an event folded (nan: no event yet); ``prev_clocks (U,)`` float64, the time
    of the event before it (the second latest; nan: fewer than two); ``first_ts (U,)`` float64,
    the earliest (nan: none); ``n_events (U,)`` int64 events folded; ``partitions (U, P)`` int32
    (-1: free slot) with ``offsets (U, P)`` int64 last folded offset; history ``hist_len (U,)``
    and ``hist_item`` (uint64 :func:`~.emde.item_hash`), ``hist_ts`` float64, ``hist_action``
    int16, ``hist_value`` float32, ``hist_weight`` float32, each ``(U, K)``, slots in rank order
    (highest decayed weight first), padding zeros (action -1) after ``hist_len``.
    Deduplication window: ``id_len (U,)`` int32 and ``id_hash (U, L)`` uint64, the
    :func:`event_id_hash` of the user's last ``id_len`` ids folded, oldest first, zeros after;
    ``L`` is 0 until a state or an event of the batch carries an id, then
    :data:`DEDUP_WINDOW`.
    ``codebook_version``: the codebooks the sketches were built on. ``rebuilt``: rows
    :meth:`~.aggregator.Aggregator.load` rebuilt from history. ``duplicates``: events that
    :meth:`~.aggregator.Aggregator.score_then_fold` calls on this batch dropped as duplicate
    ids (for a metric, beside the redeliveries).
    """

    sketches: np.ndarray
    clocks: np.ndarray
    prev_clocks: np.ndarray
    first_ts: np.ndarray
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
                a, b = pad_columns(a, w), pad_columns(b, w)
            if a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                return False
        return True


def _used_slots(partitions: np.ndarray) -> int:
    used = (partitions >= 0).sum(axis=1)
    return int(used.max()) if used.size else 0


def pad_columns(a: np.ndarray, w: int) -> np.ndarray:
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
    ``counts (n, C + 2 [+ 3] [+ 2] [+ 2])``: raw non-negative counts (consumers log-scale
    them): per channel the decayed mass (events) at the event's time, then hours since the
    user's previous event (0 for a first event), then events folded so far, then (with the
    aggregator config's ``recency``, ``windows``, ``calendar``) the
    :data:`~.channels.RECENCY`, :data:`~.channels.WINDOWS`, :data:`~.channels.CALENDAR` columns.
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

    def take(self, rows: np.ndarray | slice) -> Features:
        """The given rows (the array fields with a row axis; the rest as is)."""
        n = len(self.valid)
        kwargs = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray) and v.ndim and v.shape[0] == n:
                v = v[rows]
            kwargs[f.name] = v
        return Features(**kwargs)

    @staticmethod
    def concat(parts: Sequence[Features]) -> Features:
        """``parts`` row after row (array fields concatenated, the rest taken from the first);
        one part is returned as is."""
        first = parts[0]
        if len(parts) == 1:
            return first
        kwargs = {}
        for f in fields(first):
            v = getattr(first, f.name)
            if isinstance(v, np.ndarray):
                kwargs[f.name] = np.concatenate([getattr(p, f.name) for p in parts], axis=0)
            else:
                kwargs[f.name] = v
        return Features(**kwargs)
