"""The user-state aggregator: fold events into decayed EMDE sketches, score before folding.

One :class:`Aggregator` serves both the offline replay (trainer) and the streaming worker, so
training and serving build features with the same code::

    agg = Aggregator(default_config(), {"interactions": cb_i, "metadata": cb_m})
    batch = agg.load(blobs)                      # list[bytes | None] -> StateBatch
    feats = agg.score_then_fold(batch, events)   # EventBatch in offset order -> Features
    blobs = agg.dump(batch)                      # list[bytes], written back explicitly

A user state holds, per :class:`~sketchstream.models.channels.Channel`, a decayed sketch
``(depth, width)`` of the items of the events the channel accepts (an action set and a value
range), kept at the state's clock; the clock (the latest event time folded), the time before it and
the earliest (the recency columns; order-free: a second max and a min); the last folded
offset per source partition; a bounded history (top ``history_size`` events by decayed weight)
to rebuild the sketches under a new codebook; the ids of the last events folded (the
deduplication window); and the codebook version the sketches were built on. Its bytes:
:mod:`~sketchstream.models.state_codec`.

Semantics (DESIGN.md, "Semantics that must hold"):

- *Score, then fold*: event ``i``'s features are read from the state before ``i`` is folded,
  and see every earlier event of its user, including earlier events of the same batch.
- *Idempotence*: an event whose offset is ``<=`` the last folded offset of its partition is
  skipped (``Features.valid`` False); redelivery is a no-op.
- *Deduplication*: a state remembers the ids of the last
  :data:`~sketchstream.models.batches.DEDUP_WINDOW` events folded with an ``event_id`` (8-byte
  hashes, :func:`~sketchstream.models.batches.event_id_hash`). A new event whose id is among
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
- *Table writes are reassignments*: a :class:`~sketchstream.models.batches.StateBatch` is a
  working buffer; only :meth:`Aggregator.dump` bytes, written back, persist.

Batches are columnar and folds vectorize across users: within a batch, each user's events are
folded in closed form (exponential decay makes a user's sketch a weighted prefix sum), so the
cost is a few sorts and scatters per batch, not a Python loop per event. The same closed form
runs compiled, one loop per user (:func:`~sketchstream.models.kernels.fold_segments`, where
:data:`~sketchstream.models.kernels.ENABLED`): the numpy passes stay as its reference and serve
``with_sketches``.

Why ~800 lines: score-then-fold, deduplication, the bounded history and rebuild all read and
write the same per-batch arrays (user-sorted rows, partition slots, the item cache) inside one
call; split further, each piece would take a dozen of those arrays as arguments. What stands
alone lives beside it: the channels (:mod:`~sketchstream.models.channels`), the batches
(:mod:`~sketchstream.models.batches`), the group scans (:mod:`~sketchstream.models.segments`),
the byte format (:mod:`~sketchstream.models.state_codec`) and the CF columns
(:mod:`~sketchstream.models.history_cf`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sketchstream.models import batches, kernels, state_codec
from sketchstream.models.batches import (
    Event,
    EventBatch,
    Features,
    StateBatch,
    event_id_hash,
    pad_columns,
)
from sketchstream.models.channels import (
    CALENDAR,
    RECENCY,
    WINDOW_SPANS,
    AggregatorConfig,
    calendar_columns,
)
from sketchstream.models.emde import Codebook, item_hash
from sketchstream.models.errors import ModelError
from sketchstream.models.history_cf import cf_features, rank_scores, window_counts
from sketchstream.models.segments import (
    excl_cumsum,
    excl_scan,
    group_cummax,
    group_first,
    ranks,
    run_ends,
    run_flags,
    shift1,
)
from sketchstream.models.state_codec import state_layout

__all__ = ["Aggregator"]

log = logging.getLogger(__name__)

# Within one pass, a user's events span at most this many (shortest) half-lives, so the
# scaled weights 2^((ts - t0)/h) stay within float64's comfortable range (see _fold_pass).
_MAX_PASS_HALF_LIVES = 24.0
_ITEM_CACHE_MAX = 4_000_000
_FORGET = kernels.FORGET


def _decay(dt: np.ndarray, half_life: np.ndarray) -> np.ndarray:
    """``2^(-dt/h)`` with broadcasting; h = inf gives 1 (dt must be finite)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp2(-dt / half_life)


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
        self._layout = state_layout(config, self.depth, self.width, self.codebook_version)
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
        ``hours_since_last``, ``events`` (and the recency, window and calendar columns the
        config asks for): ``density/...`` then ``config.count_names``."""
        return [f"density/{c.name}" for c in self.config.channels] + list(self.config.count_names)

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
        idx = np.fromiter(map(get, lst, itertools.repeat(-1)), np.int64, len(lst))
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
            prev_clocks=np.full(n_users, np.nan),
            first_ts=np.full(n_users, np.nan),
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
        among the ids of the user's last :data:`~.batches.DEDUP_WINDOW` events folded with one,
        earlier events of this batch included (a duplicate: ``batch.duplicates`` counts them; its
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
        counts = np.zeros((n, len(self.config.count_names)), np.float32)
        sk_out = np.zeros((n, n_ch, self.depth, self.width), np.float32) if with_sketches else None
        names = tuple(self.feature_names)
        sim = item_similarity
        cf_names = tuple(sim.columns) if sim is not None else ()

        def features(valid: np.ndarray, cf: np.ndarray | None) -> Features:
            """The result: ``density`` and ``counts`` are filled in place before it is built."""
            v = self.codebook_version
            return Features(valid, density, counts, codes, sk_out, v, names, cf, cf_names)

        if n == 0:
            empty_cf = np.zeros((0, len(cf_names)), np.float32) if sim is not None else None
            return features(np.zeros(0, bool), empty_cf)
        # Work in user-sorted order (stable: each user's events stay in offset order).
        order = np.argsort(ev.user_index, kind="stable")
        u = ev.user_index[order]
        starts = run_flags(u)
        gid = np.cumsum(starts) - 1
        first = group_first(starts)
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
        incl = np.maximum(clock0, group_cummax(np.where(valid, ts, -np.inf), gid))
        before = np.where(starts, clock0, np.maximum(clock0, shift1(incl)))
        read_t = np.maximum(ts, before)
        n_before = batch.n_events[u] + excl_cumsum(valid.astype(np.int64), first)
        hours = np.where(np.isfinite(before), np.maximum(ts - before, 0.0) / 3600.0, 0.0)
        # The second latest time before each event (a running second max: the larger of the
        # state's and of each valid time capped by the max before it) and the earliest.
        prev0 = np.where(np.isnan(batch.prev_clocks[u]), -np.inf, batch.prev_clocks[u])
        capped = np.minimum(np.where(valid, ts, -np.inf), before)
        second = np.maximum(prev0, group_cummax(capped, gid))
        before2 = np.where(starts, prev0, shift1(second))
        first0 = np.where(np.isnan(batch.first_ts[u]), np.inf, batch.first_ts[u])
        earliest = np.minimum(first0, -group_cummax(np.where(valid, -ts, -np.inf), gid))
        first_before = np.where(starts, first0, shift1(earliest))
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
            cut = starts | run_flags(seg)
        else:
            cut = starts
        dens_s = np.zeros((n, n_ch))
        mass_s = np.zeros((n, n_ch))
        if kernels.ENABLED and sk_out is None:
            self._fold_compiled(batch, cut, arrays, dens_s, mass_s)
        else:
            pass_id = np.cumsum(cut) - np.cumsum(cut)[first]
            for p in range(int(pass_id.max()) + 1):
                sel = np.flatnonzero(pass_id == p)
                self._fold_pass(batch, sel, arrays, dens_s, mass_s, sk_out)
        cand = valid & (action >= 0)  # what the history keeps
        if sim is not None or self.config.windows:  # what reads the history before the batch
            scores = rank_scores(batch, u[starts], arrays["w"], ts, self.config.history_half_life_s)
        cf_out = None
        if sim is not None:
            cf_out = np.zeros((n, len(cf_names)), np.float32)
            cf_out[order] = cf_features(
                batch,
                sim,
                u,
                starts,
                valid,
                cand,
                ts,
                value,
                scores,
                self._item_hash[item_rows[order]],
                history_size=self.config.history_size,
            )
        if self.config.windows:  # the history as it stands before the batch
            at = n_ch + 2 + (len(RECENCY) if self.config.recency else 0)
            counts[order, at : at + len(WINDOW_SPANS)] = (
                window_counts(
                    batch,
                    u,
                    starts,
                    cand,
                    ts,
                    scores,
                    read_t,
                    WINDOW_SPANS,
                    history_size=self.config.history_size,
                )
                * valid[:, None]
            )
        self._merge_history(
            batch,
            u,
            cand,
            ts,
            action,
            value,
            arrays["w"],
            self._item_hash[item_rows[order]],
        )
        np.maximum.at(batch.offsets, (u[fresh], slot[fresh]), off[fresh])
        np.add.at(batch.n_events, u[valid], 1)
        last = run_ends(starts)  # each user's last event
        batch.prev_clocks[u[last]] = np.where(np.isfinite(second[last]), second[last], np.nan)
        batch.first_ts[u[last]] = np.where(np.isfinite(earliest[last]), earliest[last], np.nan)

        dens_s[~valid] = 0.0
        mass_s[~valid] = 0.0
        density[order] = dens_s
        counts[order, :n_ch] = mass_s
        counts[order, n_ch] = np.where(valid, hours, 0.0)
        counts[order, n_ch + 1] = np.where(valid, n_before, 0)
        if self.config.recency:
            with np.errstate(invalid="ignore"):  # inf - inf where a time is missing
                gap = np.where(np.isfinite(before2), (before - before2) / 3600.0, 0.0)
                age = np.where(np.isfinite(first_before), np.maximum(ts - first_before, 0.0), 0.0)
            age = age / 3600.0
            mean_gap = age / np.maximum(n_before - 1, 1)
            for j, column in enumerate((gap, age, np.where(n_before > 1, mean_gap, 0.0))):
                counts[order, n_ch + 2 + j] = np.where(valid, column, 0.0)
        if self.config.calendar:
            at = len(self.config.count_names) - len(CALENDAR)
            for j, column in enumerate(calendar_columns(ts)):
                counts[order, at + j] = np.where(valid, column, 0.0)
        valid_out = np.zeros(n, bool)
        valid_out[order] = valid
        return features(valid_out, cf_out)

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
        the last :data:`~.batches.DEDUP_WINDOW` ids folded, earlier events of the batch included. A
        duplicate is never folded, so it never enters the window. Duplicates are rare: a
        superset of them (ids in the stored window or repeated in the batch) is found
        vectorized, and only the users it names are walked in Python.
        """
        n, w = len(u), batches.DEDUP_WINDOW
        listed = ids.tolist()
        has = np.fromiter(map(bool, listed), bool, n)  # None and "" are no id
        dup = np.zeros(n, bool)
        ci = np.flatnonzero(fresh & has)
        if ci.size == 0:
            return dup
        if batch.id_hash.shape[1] < w:
            batch.id_hash = pad_columns(batch.id_hash, w)
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
        order), keeping each window's last :data:`~.batches.DEDUP_WINDOW`."""
        if nu.size == 0:
            return
        w = batches.DEDUP_WINDOW
        users, n_new = np.unique(nu, return_counts=True)
        n_old = np.minimum(batch.id_len[users].astype(np.int64), w)
        drop = np.maximum(n_old + n_new - w, 0)  # the oldest ids pushed out
        ol, oslot = np.nonzero(np.arange(w) < n_old[:, None])
        old = batch.id_hash[users[ol], oslot]
        at = oslot - drop[ol]
        keep = at >= 0
        g, rank = ranks(n_new)
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
        starts = run_flags(u)
        first = group_first(starts)
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
        mass = (mass0[gl] + excl_scan(sw, upos))[:, :, None]  # (m, C, 1)
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
                ex = excl_scan(sw[ev_row][:, chans], pos[multi])  # (k, Cm)
                bucket[ev_row[:, None], chans[None, :], (multi // m)[:, None]] += ex
        ok = known[:, :, None] & (mass > 0) & valid[:, None, None]
        share = np.divide(bucket, mass, out=np.zeros_like(bucket), where=ok)
        dens_out[sel] = share.mean(axis=-1)
        read_t = arrays["read_t"][sel]
        grow = _decay(np.where(valid, read_t - t0[gl], 0.0)[:, None], half)  # >= 1
        mass_out[sel] = mass[:, :, 0] * grow
        i_idx, c_idx = np.nonzero(contrib)
        if sk_out is not None:
            s0 = sk[users]
            s0 *= f0.astype(np.float32)[:, :, None, None]
            if i_idx.size:
                onehot = np.zeros((m, n_ch, depth, width))
                for d in range(depth):
                    onehot[i_idx, c_idx, d, ch_codes[i_idx, c_idx, d]] = sw[i_idx, c_idx]
                before = excl_scan(onehot, upos) + s0[gl]
            else:  # nothing folds (a recommendation's probe): the same values, no (m, C, D, W)
                # float64 zeros scanned and added would change no bit; one event a user: no take
                before = s0 if len(users) == m else s0[gl]
            if valid.all() and (grow == 1.0).all():  # read at the clock: x * 1.0 is x
                sk_out[arrays["order"][sel]] = before
            else:
                sk_out[arrays["order"][sel]] = np.where(
                    valid[:, None, None, None], before * grow[:, :, None, None], 0.0
                )
        # Fold: decay the touched sketches to t0, then add the scaled contributions.
        for c in np.flatnonzero(np.isfinite(self._ch_half)).tolist():
            moved = f0[:, c] != 1.0
            if moved.any():
                rows_c = sk[users[moved], c] * f0[moved, c].astype(np.float32)[:, None, None]
                np.copyto(rows_c, 0.0, where=rows_c < _FORGET)  # one pass, no index of the cells
                sk[users[moved], c] = rows_c
        vals = np.repeat(sw[i_idx, c_idx].astype(np.float32), depth)
        np.add.at(sk_flat, flat[i_idx, c_idx].reshape(-1), vals)
        batch.clocks[users] = np.where(active, t0, clock0)

    def _fold_compiled(
        self,
        batch: StateBatch,
        seg_start: np.ndarray,
        arrays: dict[str, np.ndarray],
        dens_out: np.ndarray,
        mass_out: np.ndarray,
    ) -> None:
        """What the passes of :meth:`_fold_pass` do, one user's pass (a segment: ``seg_start``
        True where one begins, in user-sorted order) at a time, in compiled code
        (:func:`~sketchstream.models.kernels.fold_segments`)."""
        kernels.fold_segments(
            arrays["u"],
            seg_start,
            arrays["ts"],
            arrays["valid"],
            arrays["codes"],
            np.ascontiguousarray(arrays["known"]),  # one compiled signature, not C and F
            arrays["member"] & arrays["known"],
            arrays["w"],
            arrays["read_t"],
            batch.sketches,
            batch.clocks,
            self._ch_mod,
            self._ch_half,
            self._ch_weight,
            dens_out,
            mass_out,
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
        if kernels.ENABLED:
            self._merge_history_compiled(
                batch, u[ci], ts[ci], action[ci], value[ci], weight[ci], hashes[ci]
            )
            return
        nu = u[ci]
        users = np.unique(nu)
        n_old = batch.hist_len[users].astype(np.int64)
        ol, oslot = np.nonzero(np.arange(k_max)[None, :] < n_old[:, None])
        ou = users[ol]
        nl = np.searchsorted(users, nu)
        nstarts = run_flags(nu)
        rank_new = np.arange(ci.size) - group_first(nstarts)
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
        s_starts = run_flags(su)
        rank = np.arange(o.size) - group_first(s_starts)
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

    def _merge_history_compiled(
        self,
        batch: StateBatch,
        nu: np.ndarray,
        ts: np.ndarray,
        action: np.ndarray,
        value: np.ndarray,
        weight: np.ndarray,
        hashes: np.ndarray,
    ) -> None:
        """:meth:`_merge_history` of the candidate events (their columns, ``nu`` their users,
        sorted) in compiled code (:func:`~sketchstream.models.kernels.merge_history`)."""
        at = np.flatnonzero(run_flags(nu))  # each user's first candidate (``nu`` is sorted)
        users = nu[at]
        # user i's candidates: [spans[i], spans[i + 1])
        spans = np.concatenate((at, [nu.shape[0]])).astype(np.int64)
        weight = weight.astype(np.float32)
        hl = self.config.history_half_life_s
        new_score, old_score = rank_scores(batch, users, weight, ts, hl)  # ties as the reference
        kernels.merge_history(
            users,
            spans,
            hashes.view(np.int64),
            ts,
            action.astype(np.int16),
            value.astype(np.float32),
            weight,
            new_score,
            old_score,
            batch.hist_len,
            batch.hist_item.view(np.int64),
            batch.hist_ts,
            batch.hist_action,
            batch.hist_value,
            batch.hist_weight,
        )

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

    # -- start-up -------------------------------------------------------------------------------

    def warm_up(self, item_similarity: Any = None) -> None:
        """Compile the kernels this aggregator calls (or load them from numba's disk cache) on
        a throwaway two-event state, so that a worker pays it before its first batch, not in
        it: tens of seconds the first time on a machine, about a second from the cache.

        Every kernel runs through the very calls a batch makes (score-then-fold with
        ``item_similarity``, dump, load), so a batch afterwards compiles nothing more. Leaves
        the aggregator as it was (counters included); a no-op with the kernels off.
        """
        if not kernels.ENABLED:
            return
        counters = dict(self.counters)
        item = next(iter(self._item_index), "warm-up")  # a known item: the cache stays as is
        state = self.new_batch(1)
        self.score_then_fold(
            state,
            EventBatch(
                user_index=[0, 0],
                item=np.array([item, item], dtype=object),
                action=[0, 0],
                value=[5.0, 1.0],
                ts=[0.0, 1.0],
                partition=[0, 0],
                offset=[0, 1],
                event_id=["warm-up-0", "warm-up-1"],
            ),
            item_similarity=item_similarity,
        )
        self.load(self.dump(state))
        if item_similarity is not None:  # and the one-by-one path's pairs (late events)
            item_similarity.pair_values(np.zeros(1, np.intp), np.zeros(1, np.intp))
        self.counters.update(counters)

    # -- bytes ----------------------------------------------------------------------------------

    def dump(self, batch: StateBatch) -> list[bytes]:
        """One compact, versioned byte string per user (no pickle): write each one back.

        Encoded for the whole batch at once (the format: :mod:`sketchstream.models.state_codec`).
        """
        self._check_batch(batch)
        return state_codec.encode(batch, self._layout)

    def load(self, blobs: Sequence[bytes | None]) -> StateBatch:
        """States from :meth:`dump` bytes (None: a new user), in order.

        A state built on other codebooks or another channel layout is rebuilt from its history;
        ``StateBatch.rebuilt`` and ``counters["rebuilt"]`` count them. Unreadable bytes raise
        :class:`~sketchstream.models.errors.ArtifactError`.
        """
        n_users = len(blobs)
        batch = self.new_batch(n_users)
        stale = state_codec.decode(blobs, batch, self._layout)
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
