"""The user-state table: a changelog-backed faust ``Table`` of ``user -> state bytes`` in
RocksDB (through rocksdict), read and written a whole micro-batch at a time.

faust's ``table[key]`` API finds the partition of a key from the *current event* (a task-local
context variable). Under ``Stream.take_events`` that is whichever event the stream saw last,
not the one whose user is being written, so per-key ``table[k] = v`` inside a batch would write
states into the wrong partition's RocksDB and changelog. :class:`UserStates` therefore names
the partition explicitly: reads are one RocksDB multi-get per partition, writes one RocksDB
write batch per partition plus one changelog record per key (sent through the table, so faust's
recovery, standby replicas and persisted-offset bookkeeping work as for any table).
Values are always reassigned, never mutated in place.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sketchstream.stream.metrics import StageTimes

__all__ = ["UserStates"]


class UserStates:
    """Batched access to a faust ``Table`` with raw (bytes) keys and values and a rocksdb store;
    ``stages`` times the writes (``state_write``, ``changelog``)."""

    def __init__(self, table: Any, stages: StageTimes | None = None) -> None:
        self.table = table
        self.stages = stages if stages is not None else StageTimes()

    def _db(self, partition: int) -> Any:
        from sketchstream.stream.faust_compat import rocksdb_of  # imports faust: not at import

        return rocksdb_of(self.table, partition)

    def read(self, partitions: Sequence[int], keys: Sequence[bytes]) -> list[bytes | None]:
        """The stored state of each key (None when absent); ``partitions`` aligned with ``keys``."""
        out: list[bytes | None] = [None] * len(keys)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, p in enumerate(partitions):
            groups[p].append(i)
        for p, rows in groups.items():
            values = self._db(p).get([keys[i] for i in rows])
            for i, v in zip(rows, values, strict=True):
                out[i] = v
        return out

    def write(self, writes: Sequence[tuple[int, bytes, bytes]]) -> None:
        """Store ``(partition, key, value)`` triples locally and send them to the changelog."""
        from rocksdict import WriteBatch

        stages = self.stages
        t = time.perf_counter_ns()
        batches: dict[int, Any] = {}
        for p, key, value in writes:
            batch = batches.get(p)
            if batch is None:
                batch = batches[p] = WriteBatch(raw_mode=True)
            batch.put(key, value)
        for p, batch in batches.items():
            self._db(p).write(batch)
        t = stages.lap("state_write", t)
        send = self.table.send_changelog
        for p, key, value in writes:
            send(p, key, value)
        stages.lap("changelog", t)
