"""Item-side knowledge as a refreshed snapshot: per-item totals up to a cut-off time.

A worker sees only its own partitions' events, so item statistics kept online in a worker
would differ from the ones the trainer saw replaying every user's events. Item knowledge is
therefore a *snapshot*: totals over all events before a cut-off, computed by the refresh job
(or the trainer), shipped inside the model artifact, and frozen between refreshes. The
trainer and the worker read item features through one function, :meth:`ItemSnapshot.features`,
so serving cannot drift from training.

Per item the snapshot holds: events; per head, labelled and positive counts; count and sum of
values; the time of its first event. Plus the same totals over all items (the global rates).

Offline, :func:`refreshed_item_features` simulates the refresh cadence honestly: an event at
time ``t`` reads the snapshot as of the last refresh boundary ``b <= t`` (boundaries every
``refresh_s`` seconds, aligned to the epoch), built from the events with ``ts < b`` only.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sketchstream.models.errors import ArtifactError, ModelError

__all__ = [
    "DEFAULT_REFRESH_S",
    "ItemSnapshot",
    "refresh_boundaries",
    "refresh_windows",
    "refreshed_item_features",
    "windows_ahead",
]

DEFAULT_REFRESH_S = 86_400.0  # one day: conservative beside an hourly refresh job


class ItemSnapshot:
    """Per-item totals of the events folded in so far; features read off them.

    ``heads``: label head names (the columns of ``y`` given to :meth:`fold`). ``prior``:
    pseudo-count shrinking an item's rates towards the global rate.

    Learned state: ``ids_`` (item ids in first-seen order), ``totals_ (n_items, 3 + 2*heads)``
    float64 ``[events, labelled_h..., positive_h..., value_count, value_sum]``,
    ``first_ts_ (n_items,)`` float64, ``global_`` (the same totals over all items),
    ``as_of_`` (latest event time folded, nan when empty).
    """

    def __init__(
        self,
        heads: Sequence[str],
        prior: float = 10.0,
        *,
        item_age: bool = False,
        global_rate: bool = False,
    ) -> None:
        self.heads = tuple(heads)
        self.prior = float(prior)
        # optional feature columns (off by default: they cost test AUC on MovieLens-1M;
        # artifacts written before these flags read back with both on)
        self.item_age = bool(item_age)
        self.global_rate = bool(global_rate)
        # item-item CF similarity refreshed with the totals (None: no CF features)
        self.similarity: Any = None
        k = len(self.heads)
        self._width = 3 + 2 * k
        self.ids_: list[str] = []
        self._index: dict[str, int] = {}
        self.totals_ = np.zeros((0, self._width), np.float64)
        self.first_ts_ = np.zeros(0, np.float64)
        self.global_ = np.zeros(self._width, np.float64)
        self.as_of_ = math.nan

    # -- naming ---------------------------------------------------------------------------

    @property
    def feature_names(self) -> list[str]:
        names = ["item_log_events"]
        for h in self.heads:
            names += [f"item_rate_{h}", f"item_log_labelled_{h}"]
        names += ["item_mean_value"]
        if self.item_age:
            names.append("item_log_age_days")
        if self.global_rate:
            names += [f"global_rate_{h}" for h in self.heads]
        return names

    def config(self) -> dict[str, Any]:
        """JSON-ready constructor arguments plus what the snapshot covers (for manifests)."""
        return {
            "heads": list(self.heads),
            "prior": self.prior,
            "item_age": self.item_age,
            "global_rate": self.global_rate,
            "similarity": None if self.similarity is None else self.similarity.config(),
            "items": len(self.ids_),
            "events": float(self.global_[0]),
            "as_of": None if math.isnan(self.as_of_) else float(self.as_of_),
        }

    def __len__(self) -> int:
        return len(self.ids_)

    # -- building -------------------------------------------------------------------------

    def _rows(self, items: np.ndarray, add: bool) -> np.ndarray:
        index = self._index
        lst = items.tolist()
        if add:
            rows = np.fromiter(
                (index.setdefault(str(i), len(index)) for i in lst), np.int64, len(lst)
            )
            grow = len(index) - len(self.ids_)
            if grow > 0:
                self.ids_.extend(list(index)[len(self.ids_) :])
                self.totals_ = np.vstack([self.totals_, np.zeros((grow, self._width))])
                self.first_ts_ = np.concatenate([self.first_ts_, np.full(grow, np.nan)])
            return rows
        get = index.get
        return np.fromiter(map(get, map(str, lst), itertools.repeat(-1)), np.int64, len(lst))

    def fold(
        self, items: np.ndarray, ts: np.ndarray, y: np.ndarray, value: np.ndarray
    ) -> ItemSnapshot:
        """Add events to the totals; returns ``self``.

        ``items (n,)`` ids, ``ts (n,)`` float64 seconds, ``y (n, heads)`` float labels (nan
        where a head does not apply), ``value (n,)`` float (nan where absent).
        """
        items = np.asarray(items, dtype=object)
        n, k = len(items), len(self.heads)
        y = np.asarray(y, dtype=np.float64).reshape(n, k)  # ValueError on a wrong width
        if y.shape[1] != k:
            raise ModelError(f"ItemSnapshot.fold: labels have {y.shape[1]} heads, expected {k}")
        if n == 0:
            return self
        ts = np.asarray(ts, dtype=np.float64)
        value = np.asarray(value, dtype=np.float64)
        rows = self._rows(items, add=True)
        q = np.zeros((n, self._width), np.float64)
        q[:, 0] = 1.0
        labelled = ~np.isnan(y)
        q[:, 1 : 1 + k] = labelled
        q[:, 1 + k : 1 + 2 * k] = np.where(labelled, y, 0.0)
        has_value = ~np.isnan(value)
        q[:, 1 + 2 * k] = has_value
        q[:, 2 + 2 * k] = np.where(has_value, value, 0.0)
        np.add.at(self.totals_, rows, q)
        self.global_ += q.sum(axis=0)
        first = np.full(len(self.ids_), np.inf)
        np.minimum.at(first, rows, ts)
        self.first_ts_ = np.fmin(self.first_ts_, np.where(np.isinf(first), np.nan, first))
        latest = float(ts.max())
        self.as_of_ = latest if math.isnan(self.as_of_) else max(self.as_of_, latest)
        return self

    @classmethod
    def from_events(
        cls,
        events: Any,
        y: np.ndarray,
        heads: Sequence[str],
        *,
        prior: float = 10.0,
        until: float | None = None,
        item_age: bool = False,
        global_rate: bool = False,
        similarity: bool = False,
        similarity_top_k: int = 100,
        like_min: float = 4.0,
    ) -> ItemSnapshot:
        """The snapshot of ``events`` (an EventTable) with ``ts < until`` (all when None):
        what the refresh job publishes for cut-off ``until``. ``similarity``: also build the
        item-item CF similarity (:mod:`~sketchstream.models.similarity`) from those events."""
        keep = slice(None) if until is None else np.asarray(events.ts) < until
        snap = cls(heads, prior, item_age=item_age, global_rate=global_rate).fold(
            np.asarray(events.item)[keep],
            np.asarray(events.ts)[keep],
            np.asarray(y)[keep],
            np.asarray(events.value)[keep],
        )
        if similarity:
            from sketchstream.models.similarity import SimilarityBuilder

            b = SimilarityBuilder(top_k=similarity_top_k, like_min=like_min)
            b.add(
                np.asarray(events.user)[keep],
                np.asarray(events.item)[keep],
                np.asarray(events.value)[keep],
            )
            snap.similarity = b.build()
        return snap

    def copy(self) -> ItemSnapshot:
        out = ItemSnapshot(
            self.heads, self.prior, item_age=self.item_age, global_rate=self.global_rate
        )
        out.similarity = self.similarity  # immutable once built
        out.ids_ = list(self.ids_)
        out._index = dict(self._index)
        out.totals_ = self.totals_.copy()
        out.first_ts_ = self.first_ts_.copy()
        out.global_ = self.global_.copy()
        out.as_of_ = self.as_of_
        return out

    # -- reading --------------------------------------------------------------------------

    def features(self, items: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Item features ``(n, len(feature_names))`` float32 for events on ``items (n,)`` at
        ``ts (n,)``, read off the totals only (the snapshot is not changed).

        ``log1p`` of the item's event count; per head its positive rate shrunk to the global
        rate with ``prior`` pseudo-counts and ``log1p`` of its labelled count; its mean value
        (shrunk likewise) less the global mean; ``log1p`` of its age in days (0 when unseen);
        the global rate per head. An item the snapshot has not seen reads as all-zero counts.
        """
        items = np.asarray(items, dtype=object)
        ts = np.asarray(ts, dtype=np.float64)
        k = len(self.heads)
        rows = self._rows(items, add=False)
        seen = rows >= 0
        before = np.zeros((len(items), self._width), np.float64)
        before[seen] = self.totals_[rows[seen]]
        first = np.full(len(items), np.nan)
        first[seen] = self.first_ts_[rows[seen]]
        glob = self.global_
        a = self.prior
        g_rate = (glob[1 + k : 1 + 2 * k] + 0.5) / (glob[1 : 1 + k] + 1.0)
        out = [np.log1p(before[:, 0])]
        for h in range(k):
            lab, pos = before[:, 1 + h], before[:, 1 + k + h]
            out += [(pos + a * g_rate[h]) / np.maximum(lab + a, 1e-9), np.log1p(lab)]
        g_mean = (glob[2 + 2 * k] + 3.0) / (glob[1 + 2 * k] + 1.0)
        vsum, vcount = before[:, 2 + 2 * k], before[:, 1 + 2 * k]
        out.append((vsum + a * g_mean) / np.maximum(vcount + a, 1e-9) - g_mean)
        if self.item_age:
            age = np.where(np.isnan(first), 0.0, np.maximum(ts - first, 0.0) / 86400.0)
            out.append(np.log1p(age))
        if self.global_rate:
            out += [np.full(len(items), g_rate[h]) for h in range(k)]
        return np.stack(out, axis=1).astype(np.float32)

    # -- bytes (no pickle) ----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """safetensors bytes: totals, first times, global totals, ids as UTF-8 + offsets."""
        from safetensors.numpy import save

        encoded = [i.encode() for i in self.ids_]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        offsets[1:] = np.cumsum([len(b) for b in encoded])
        tensors = {
            "totals": np.ascontiguousarray(self.totals_),
            "first_ts": np.ascontiguousarray(self.first_ts_),
            "global": np.ascontiguousarray(self.global_),
            "as_of": np.array([self.as_of_], np.float64),
            "ids_utf8": np.frombuffer(b"".join(encoded), np.uint8).copy(),
            "ids_offsets": offsets,
        }
        doc: dict[str, Any] = {"heads": list(self.heads), "prior": self.prior}
        doc.update(item_age=self.item_age, global_rate=self.global_rate)
        if self.similarity is not None:
            tensors.update(self.similarity.tensors())
            doc["similarity"] = self.similarity.config()
        # one metadata key: safetensors writes its metadata map in hash order, not sorted
        meta = json.dumps(doc, sort_keys=True)
        return save(tensors, metadata={"snapshot": meta})

    @classmethod
    def from_bytes(cls, data: bytes) -> ItemSnapshot:
        """Inverse of :meth:`to_bytes`; :class:`ArtifactError` on anything malformed."""
        from safetensors.numpy import load

        try:
            t = load(data)
            size = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["snapshot"])
            # artifacts from before the flags had both columns
            snap = cls(
                tuple(meta["heads"]),
                float(meta["prior"]),
                item_age=bool(meta.get("item_age", True)),
                global_rate=bool(meta.get("global_rate", True)),
            )
            if meta.get("similarity") is not None:
                from sketchstream.models.similarity import ItemSimilarity

                snap.similarity = ItemSimilarity.from_tensors(t, meta["similarity"])
            raw = t["ids_utf8"].tobytes()
            off = t["ids_offsets"].tolist()
            ids = [raw[a:b].decode() for a, b in itertools.pairwise(off)]
            totals, first = t["totals"], t["first_ts"]
            if totals.shape != (len(ids), snap._width) or first.shape != (len(ids),):
                raise ValueError(f"totals {totals.shape}, first_ts {first.shape}, {len(ids)} ids")
        except ArtifactError:
            raise
        except Exception as exc:  # safetensors raises several unrelated types
            raise ArtifactError(f"item snapshot: unreadable ({exc})") from exc
        snap.ids_ = ids
        snap._index = {i: r for r, i in enumerate(ids)}
        if len(snap._index) != len(ids):
            raise ArtifactError("item snapshot: duplicate item ids")
        snap.totals_ = totals.astype(np.float64)
        snap.first_ts_ = first.astype(np.float64)
        snap.global_ = t["global"].astype(np.float64)
        snap.as_of_ = float(t["as_of"][0])
        return snap

    def same_as(self, other: ItemSnapshot) -> bool:
        """Exact equality of configuration and totals (nan equals nan)."""
        return (
            self.heads == other.heads
            and self.prior == other.prior
            and self.item_age == other.item_age
            and self.global_rate == other.global_rate
            and (self.similarity is None) == (other.similarity is None)
            and (self.similarity is None or self.similarity.same_as(other.similarity))
            and self.ids_ == other.ids_
            and np.array_equal(self.totals_, other.totals_)
            and np.array_equal(self.first_ts_, other.first_ts_, equal_nan=True)
            and np.array_equal(self.global_, other.global_)
            and (
                self.as_of_ == other.as_of_
                or (math.isnan(self.as_of_) and math.isnan(other.as_of_))
            )
        )


def refresh_boundaries(ts: np.ndarray, refresh_s: float) -> np.ndarray:
    """``(n,)`` float64: the last refresh boundary ``<= ts`` (multiples of ``refresh_s``)."""
    if not refresh_s > 0:
        raise ModelError(f"refresh interval must be > 0 seconds, got {refresh_s}")
    return np.floor(np.asarray(ts, dtype=np.float64) / refresh_s) * refresh_s


def refresh_windows(
    events: Any,
    y: np.ndarray,
    heads: Sequence[str],
    *,
    prior: float = 10.0,
    refresh_s: float = DEFAULT_REFRESH_S,
    item_age: bool = False,
    global_rate: bool = False,
    similarity: bool = False,
    similarity_top_k: int = 100,
    like_min: float = 4.0,
    similarity_min_new_likes: int = 20_000,
) -> Iterator[tuple[np.ndarray, ItemSnapshot]]:
    """Replay the refresh cadence over ``events`` (an EventTable): yield ``(rows, snapshot)``
    per refresh window in time order, ``rows`` the window's event rows (stream order) and
    ``snapshot`` built from exactly the events with ``ts <`` the window's boundary.

    The window's events are folded in when the consumer asks for the next window, so use the
    snapshot before that (copy it to keep it).

    ``similarity``: the snapshot also carries the item-item CF similarity of the events before
    the boundary; it is rebuilt at a boundary once ``similarity_min_new_likes`` likes arrived
    since the last build (a cost bound: the similarity is then at most that many likes
    stale, and never sees an event at or after the boundary).
    """
    n = len(events)
    y = np.asarray(y, dtype=np.float64).reshape(n, -1)
    ts = np.asarray(events.ts, dtype=np.float64)
    items = np.asarray(events.item, dtype=object)
    value = np.asarray(events.value, dtype=np.float64)
    snap = ItemSnapshot(heads, prior, item_age=item_age, global_rate=global_rate)
    builder = None
    if similarity:
        from sketchstream.models.similarity import ItemSimilarity, SimilarityBuilder

        builder = SimilarityBuilder(top_k=similarity_top_k, like_min=like_min)
        snap.similarity = ItemSimilarity.empty(top_k=similarity_top_k, like_min=like_min)
        users = np.asarray(events.user)
        pending = 0
    bound = refresh_boundaries(ts, refresh_s)
    order = np.argsort(bound, kind="stable")
    b_sorted = bound[order]
    cuts = np.flatnonzero(np.r_[True, b_sorted[1:] != b_sorted[:-1], True]) if n else [0]
    for lo, hi in itertools.pairwise(cuts):
        rows = order[lo:hi]
        yield rows, snap
        snap.fold(items[rows], ts[rows], y[rows], value[rows])
        if builder is not None:
            pending += builder.add(users[rows], items[rows], value[rows])
            if pending >= similarity_min_new_likes:
                snap.similarity = builder.build()
                pending = 0


def windows_ahead(
    windows: Iterator[tuple[np.ndarray, ItemSnapshot]], depth: int = 2
) -> Iterator[tuple[np.ndarray, ItemSnapshot]]:
    """:func:`refresh_windows` computed ahead in a background thread, at most ``depth`` windows
    ahead: the next snapshots (the similarity builds, mostly numpy and torch that release the
    GIL) are made while the caller replays the current window, on the second core.

    Yields copies, so a snapshot stays valid after the caller asks for the next window. An
    exception in the producer is raised here; closing this generator stops the producer.
    """
    import queue
    import threading

    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for rows, snap in windows:
                if not put((rows, snap.copy())):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=produce, name="refresh-windows", daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is done:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        thread.join()


def refreshed_item_features(
    events: Any,
    y: np.ndarray,
    heads: Sequence[str],
    *,
    prior: float = 10.0,
    refresh_s: float = DEFAULT_REFRESH_S,
    item_age: bool = False,
    global_rate: bool = False,
) -> np.ndarray:
    """Item features ``(n, s)`` float32 of every event as a snapshot refreshed every
    ``refresh_s`` seconds serves them (:func:`refresh_windows`)."""
    items = np.asarray(events.item, dtype=object)
    ts = np.asarray(events.ts, dtype=np.float64)
    width = len(ItemSnapshot(heads, item_age=item_age, global_rate=global_rate).feature_names)
    out = np.zeros((len(events), width), np.float32)
    windows = refresh_windows(
        events,
        y,
        heads,
        prior=prior,
        refresh_s=refresh_s,
        item_age=item_age,
        global_rate=global_rate,
    )
    for rows, snap in windows:
        out[rows] = snap.features(items[rows], ts[rows])
    return out
