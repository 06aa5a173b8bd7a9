"""The user-state table: a changelog-backed faust ``Table`` of ``user -> state bytes`` in
RocksDB (through rocksdict), read and written a whole micro-batch at a time.

faust's ``table[key]`` API finds the partition of a key from the *current event* (a task-local
context variable). Under ``Stream.take_events`` that is whichever event the stream saw last,
not the one whose user is being written, so per-key ``table[k] = v`` inside a batch would write
states into the wrong partition's RocksDB and changelog. :class:`UserStates` therefore names
the partition explicitly: reads are one RocksDB multi-get per partition, writes one RocksDB
write batch per partition plus one changelog record per key. Values are always reassigned,
never mutated in place.

The changelog records go out as one record batch per partition (:func:`publish_to`), not
through the table's ``send_changelog``: that makes a faust ``FutureMessage`` per key, queues it
for the producer's task, sends it alone and, once it is acknowledged, writes the partition's
persisted offset into RocksDB, again per key. Here the persisted offset (where recovery resumes
reading the changelog) is written once per partition and batch, when the batch is acknowledged:
the same value faust writes last. The records are the table's own (raw key and value, on the
table's partition of the changelog topic), so faust's recovery and standby replicas read them
as ever, and a commit waits for them (faust flushes the producer before committing offsets).

A batch's states are written only once its predictions are acknowledged (a state never gets
ahead of the predictions made on the way to it), while the next batch is already being
handled (:meth:`~sketchstream.stream.bulk.BulkConsumer._deliver_batch`): :meth:`UserStates.hold`
keeps them meanwhile, and :meth:`UserStates.read` answers from them first, so the next batch
reads every user as the batch before left it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sketchstream.stream.metrics import StageTimes
from sketchstream.stream.publish import publish_to

__all__ = ["UserStates"]

log = logging.getLogger(__name__)


class UserStates:
    """Batched access to a faust ``Table`` with raw (bytes) keys and values and a rocksdb store;
    ``stages`` times the writes (``state_write``, ``changelog``)."""

    def __init__(self, table: Any, stages: StageTimes | None = None) -> None:
        self.table = table
        self.stages = stages if stages is not None else StageTimes()
        #: states held until written: ``(partition, key) -> value`` (see :meth:`hold`)
        self.held: dict[tuple[int, bytes], bytes] = {}

    def _db(self, partition: int) -> Any:
        from sketchstream.stream.faust_compat import rocksdb_of  # imports faust: not at import

        return rocksdb_of(self.table, partition)

    def read(self, partitions: Sequence[int], keys: Sequence[bytes]) -> list[bytes | None]:
        """The state of each key (None when absent): held (:meth:`hold`), else stored;
        ``partitions`` aligned with ``keys``."""
        out: list[bytes | None] = [None] * len(keys)
        groups: dict[int, list[int]] = defaultdict(list)
        held = self.held
        for i, p in enumerate(partitions):
            if held and (value := held.get((p, keys[i]))) is not None:
                out[i] = value
                continue
            groups[p].append(i)
        for p, rows in groups.items():
            values = self._db(p).get([keys[i] for i in rows])
            for i, v in zip(rows, values, strict=True):
                out[i] = v
        return out

    def hold(self, writes: Sequence[tuple[int, bytes, bytes]]) -> None:
        """Keep ``(partition, key, value)`` triples for :meth:`read` until :meth:`write` stores
        them (a later hold of the same key replaces its value)."""
        self.held.update(((p, key), value) for p, key, value in writes)

    async def write(self, writes: Sequence[tuple[int, bytes, bytes]]) -> None:
        """Store ``(partition, key, value)`` triples locally and send them to the changelog
        (handed to the producer, not awaited: the next commit waits for them); a held value
        is let go once stored, unless a later hold replaced it."""
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
        held = self.held
        if held:
            for p, key, value in writes:
                if held.get((p, key)) is value:
                    del held[(p, key)]
        t = stages.lap("state_write", t)
        topic = self.table.changelog_topic.get_topic_name()
        for sent in await publish_to(self.table.app.producer, topic, writes):
            sent.future.add_done_callback(self._persisted(topic, sent.partition, sent.records))
        stages.lap("changelog", t)

    def _persisted(self, topic: str, partition: int, records: int) -> Any:
        """The callback of a changelog batch of ``records`` on ``partition``: its last offset
        becomes the partition's persisted offset (what faust's own callback does per record)."""
        from faust.types import TP

        def done(future: asyncio.Future) -> None:
            if future.cancelled() or future.exception() is not None:
                log.error(
                    "changelog batch of %d states on %s[%d] not written (%r): the local states "
                    "are ahead of their changelog until these users are written again",
                    records,
                    topic,
                    partition,
                    None if future.cancelled() else future.exception(),
                )
                return
            last = future.result().offset + records - 1
            self.table.data.set_persisted_offset(TP(topic, partition), last)

        return done
