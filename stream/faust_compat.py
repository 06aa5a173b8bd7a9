"""Every use of faust's, mode's and aiokafka's private API, in one place, checked at import.

The worker relies on a few internals of faust-streaming 0.15.3 (and of the mode-streaming and
aiokafka under it) that have no public equivalent. They are all here, so an upgrade has one file
to re-read, and :data:`PRIVATE_NAMES` lists each one with the reason it is needed. Importing this
module checks the installed versions and every name in that list; a mismatch fails here, at
import, naming what is missing and what to install, not in the middle of a fetch or a rebalance.
The other modules of :mod:`sketchstream.stream` call what this one offers and touch no private
name themselves:

* :class:`FetchLoopConsumer` and :class:`FetchLoopApp`: faust's aiokafka consumer with a fetch
  loop of the subclass's own (:mod:`sketchstream.stream.bulk` delivers the events topic in
  batches with it), and faust's read offsets, gaps and acknowledgements under public names,
  acknowledgements a batch at a time too; its :meth:`~FetchLoopConsumer._getmany` fixes a
  fetch that took records of paused partitions;
* :func:`stop_worker_as_a_signal`: mode's ``Worker`` stopped as SIGTERM stops it (``BulkApp.fail``);
* :class:`HandoverRecovery` and :class:`HandoverTableManager`: faust's table recovery with the
  hand-over of the stream partitions reordered so that no record is lost (section below);
* :func:`rocksdb_of`, :func:`aiokafka_producer`, :func:`fetch_metadata`,
  :func:`fetch_all_metadata`: one private read each.

The hand-over after a rebalance
-------------------------------

After every rebalance faust's ``Recovery`` restores the tables, then (``on_recovery_completed``)
gives the stream partitions back to the agents: it resumes them, seeks them to their committed
offsets and resumes flow control. But by then the consumer's flow is already running (faust
resumed it to read the changelogs and the standby partitions), so in faust-streaming 0.15.3 the
sequence loses records:

1. ``consumer.resume_partitions(streams)``: the fetcher at once delivers what aiokafka has
   prefetched for those partitions (aiokafka keeps fetching them while faust "pauses" them in
   its own bookkeeping only) into the agents' queues, and moves the consumer's read offsets on;
2. ``consumer.perform_seek()``: aiokafka goes back to the committed offsets, and the read
   offsets are reset to them, while the fetcher may go on delivering records it fetched before
   the seek; a record past the reset read offset is taken for a gap in the partition, and gaps
   count as acknowledged when offsets are committed;
3. ``app.flow_control.resume()`` clears every channel queue (they are ``clear_on_resume``),
   dropping whatever step 1 or 2 delivered and the agent had not taken yet;
4. the records fetched again from the committed offsets are below the read offsets, so the
   fetcher drops them as already read: the records cleared in step 3 are never processed, and
   the "gap" lets the committed offset pass them.

The hole is as wide as the queue was long at step 3 (39 and 94 records per partition in the
failures seen here), only on a partition that has records waiting when it is handed over, and
only when the fetcher runs during the seek's round trips to the broker: likelier under CPU
load. The same clear also drops standby changelog records queued for recovery. faust fixed
this ordering for apps without tables (faust-streaming issue #216, pull request #217,
``Recovery._resume_streams``), where the flow is still stopped at that point; the path with
tables kept it. The symptom looks like issue #629 (partitions that get no fetch after a
rebalance), but here the partitions are fetched and their records dropped.

:class:`HandoverRecovery` replaces that one method, and :class:`HandoverTableManager` makes the
app use it (``faust.App(..., TableManager=HandoverTableManager)``, a documented setting). The
hand-over becomes:

1. stop the consumer's flow: the fetcher delivers nothing more and abandons the batch it was
   delivering (its records are fetched again below);
2. seek all partitions to their committed offsets (the stream partitions are still paused),
   which also resets the consumer's read offsets;
3. resume flow control, clearing the queues while nothing of the stream partitions is in them;
4. seek the standby changelog partitions back to the last record recovery took from them, so
   whatever step 1 abandoned or step 3 cleared is read again (recovery skips records it has
   seen);
5. only then resume the stream partitions and the flow.

No record of a stream partition reaches an agent between the seek and the resume, so nothing
fetched before the seek is delivered after it, and nothing delivered is cleared.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from importlib import metadata
from typing import Any

import aiokafka
import faust
import mode
from aiokafka.client import AIOKafkaClient
from aiokafka.cluster import ClusterMetadata
from faust.stores.rocksdb import Store as RocksDBStore
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.transport import consumer as faust_consumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types.tuples import ConsumerMessage, ack_lock
from mode.utils.futures import notify

__all__ = [
    "PRIVATE_NAMES",
    "FetchLoopApp",
    "FetchLoopConsumer",
    "HandoverHook",
    "HandoverRecovery",
    "HandoverTableManager",
    "aiokafka_producer",
    "fetch_all_metadata",
    "fetch_metadata",
    "rocksdb_of",
    "stop_worker_as_a_signal",
]

FAUST_VERSION = "0.15.3"  # pyproject.toml pins it: the code below copies and reorders its own
MODE_MIN_VERSION = (0, 6)  # what faust-streaming 0.15.3 requires; 0.7.1 is the one tested
AIOKAFKA_MIN_VERSION = (0, 11)  # pyproject.toml: aiokafka>=0.11; 0.14.0 is the one tested


def _init_sets(owner: type) -> frozenset[str]:
    """The attributes ``owner.__init__`` assigns (instance attributes have no class entry)."""
    return frozenset(owner.__init__.__code__.co_names)


#: ``(owner, name, why)`` for every private name of faust, mode or aiokafka used here; each is
#: checked at import (a method or class attribute on ``owner``, or an attribute its
#: ``__init__`` assigns).
PRIVATE_NAMES: tuple[tuple[type, str, str], ...] = (
    (faust_aiokafka.Consumer, "_drain_messages", "overridden: the fetch loop"),
    (faust_aiokafka.Consumer, "_getmany", "overridden: fetch a copy of the active partitions"),
    (faust_aiokafka.Consumer, "_new_consumer_thread", "overridden: the thread below"),
    (
        faust_aiokafka.AIOKafkaConsumerThread,
        "_create_worker_consumer",
        "overridden: the fetch wait",
    ),
    (aiokafka.AIOKafkaConsumer, "_fetch_max_wait_ms", "set: the fetch wait, before start"),
    (faust_aiokafka.Consumer, "_wait_next_records", "called: one fetch"),
    (faust_aiokafka.Consumer, "_to_message", "called: a record as a faust message"),
    (faust_aiokafka.Consumer, "_add_gap", "called: a hole in a partition's offsets"),
    (faust_consumer.Consumer, "_read_offset", "read and moved: the next offset to deliver"),
    (faust_consumer.Consumer, "_buffered_partitions", "read: partitions faust still delivers"),
    (faust_consumer.Consumer, "_unacked_messages", "changed: a batch in progress is tracked"),
    (faust_consumer.Consumer, "_acked", "appended to: a batch's acknowledged offsets"),
    (faust_consumer.Consumer, "_acked_index", "read and added to: the same, as a set"),
    (faust_consumer.Consumer, "_n_acked", "counted up: acknowledgements since the last commit"),
    (faust_consumer.Consumer, "_waiting_for_ack", "notified: a batch was acknowledged"),
    (faust_consumer.Consumer, "_committed_offset", "read: where a hand-over starts"),
    (faust.App, "_new_transport", "overridden: the app's consumer class"),
    (faust.App, "_fetcher", "called: restarted after the hand-over"),
    (Recovery, "_set_recovery_ended", "called by the hand-over"),
    (Recovery, "_is_changelog_tp", "called by the hand-over"),
    (Recovery, "_seek_offsets", "called by the hand-over: the standbys"),
    (Recovery, "_wait", "called by the hand-over: a seek, or a new rebalance"),
    (TableManager, "_recovery", "set: the recovery service"),
    (faust_aiokafka.Producer, "_ensure_producer", "called: the aiokafka producer under faust's"),
    (RocksDBStore, "_db_for_partition", "called: a table partition's RocksDB"),
    (mode.Worker, "_signal_stop_time", "set: a stop under way"),
    (mode.Worker, "_signal_stop_future", "set: the stop a signal starts"),
    (mode.Worker, "_starting_fut", "cancelled when the stop is done"),
    (AIOKafkaClient, "_metadata_update", "called: one metadata request for given topics"),
    (aiokafka.AIOKafkaConsumer, "_client", "read: the consumer's client, for metadata"),
)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def _release(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _check_versions() -> None:
    """Raise ImportError naming every wrong version and every missing private name."""
    problems: list[str] = []
    faust_version = _version("faust-streaming")
    if faust_version != FAUST_VERSION:
        problems.append(f"faust-streaming is {faust_version}, not {FAUST_VERSION}")
    mode_version = _version("mode-streaming")
    if _release(mode_version) < MODE_MIN_VERSION:
        problems.append(f"mode-streaming is {mode_version}, older than 0.6")
    aiokafka_version = _version("aiokafka")
    if _release(aiokafka_version) < AIOKAFKA_MIN_VERSION:
        problems.append(f"aiokafka is {aiokafka_version}, older than 0.11")
    missing = [
        f"{owner.__name__}.{name}"
        for owner, name, _ in PRIVATE_NAMES
        if not hasattr(owner, name) and name not in _init_sets(owner)
    ]
    if missing:
        problems.append("missing private names: " + ", ".join(missing))
    if problems:
        raise ImportError(
            "sketchstream's worker overrides and reads internals of faust-streaming "
            f"{FAUST_VERSION} (see sketchstream.stream.faust_compat): "
            + "; ".join(problems)
            + f". Install faust-streaming=={FAUST_VERSION} (pyproject.toml pins it), "
            "mode-streaming==0.7.1 and aiokafka>=0.11 (0.14.0 tested)"
        )


_check_versions()


# -- the consumer ------------------------------------------------------------------------------


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """faust's aiokafka consumer thread, its worker consumer given the app's fetch wait.

    faust fixes ``fetch_max_wait_ms`` at 1,500. aiokafka sends one fetch at a time to a broker
    and, once a partition's records have waited ~0.1 s in its buffer, a fetch of the other
    partitions only: with the recommend topic idle, that fetch is held for the whole wait, and
    the events the worker is about to need are fetched only after it."""

    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        wait_ms = getattr(self.app, "fetch_max_wait_ms", None)
        if wait_ms is not None:
            consumer._fetch_max_wait_ms = int(wait_ms)  # read when start() makes the fetcher
        return consumer


class FetchLoopConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer whose fetch loop is :meth:`fetch_loop` (faust's own unless a
    subclass overrides it), with faust's per-partition bookkeeping under public names, and its
    fetch wait from the app (:class:`FetchLoopApp`)."""

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:
        await self.fetch_loop(fetcher)

    async def fetch_loop(self, fetcher: Any) -> None:
        """Run by faust's ``Fetcher`` service until it or the consumer stops."""
        await super()._drain_messages(fetcher)

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
        """faust's fetch from the consumer thread, asked for a copy of the active partitions.

        faust hands over its live set, which aiokafka's ``fetched_records`` reads in the
        consumer thread whenever records arrive, up to ``timeout`` later, and to aiokafka an
        empty set means every partition. Recovery pauses the changelog partitions when it is
        done, which empties that set until the hand-over resumes the stream partitions: a fetch
        waiting meanwhile took the stream partitions' records out of aiokafka (its positions
        moved past them) and the fetch loop, finding those partitions paused, dropped them.
        They were never read again: with nothing newer the worker sat idle after
        "Worker ready" (issue 12's stall); with newer records, the hole would have become a
        gap, committed past."""
        if active_partitions is None:  # a client-only app: every partition
            return await super()._getmany(None, timeout)
        asked = frozenset(active_partitions)
        if not asked:
            return {}
        return await super()._getmany(asked, timeout)

    async def next_records(self, timeout: float) -> tuple[Mapping[Any, Sequence[Any]], Any]:
        """One fetch: ``({tp: [aiokafka record]}, the active partitions or None)``."""
        return await self._wait_next_records(timeout)

    # per record: aliases, not wrappers (a call each would cost ~0.1 µs a record)
    #: ``to_message(tp, record)``: the record as a faust ``ConsumerMessage``
    to_message = faust_aiokafka.Consumer._to_message
    #: ``await add_gap(tp, first, last)``: offsets ``first..last`` never come; commits pass them
    add_gap = faust_aiokafka.Consumer._add_gap

    @property
    def read_offsets(self) -> MutableMapping[Any, int | None]:
        """``{tp: last offset delivered}`` (None when none yet): faust's own, to read and move."""
        return self._read_offset

    @property
    def buffered_partitions(self) -> set[Any]:
        """Partitions faust still delivers while paused (what it has buffered of them)."""
        return self._buffered_partitions

    def untrack(self, messages: Iterable[Any]) -> None:
        """Forget ``messages`` were handed over, so a stop does not wait for their
        acknowledgement (faust's ``wait_empty``, woken now); they are never committed."""
        self._unacked_messages.difference_update(messages)
        notify(self._waiting_for_ack)

    def track_batch(self, first: Any) -> Any:
        """Mark a batch whose first record is ``first`` (``topic``, ``partition``, ``offset``,
        ``timestamp``, ``key``, ``value``) as handed over; returns its token for
        :meth:`ack_batch` (or :meth:`untrack`).

        One faust message stands for the whole batch in faust's set of messages under way,
        which is what a rebalance or a stop waits to see empty (``wait_empty``): tracking
        every record cost ~1 µs each, plus faust's sensor hook per record (which the worker's
        monitor ignores)."""
        token = ConsumerMessage(
            first.topic,
            first.partition,
            first.offset,
            first.timestamp,
            0,
            None,
            first.key,
            first.value,
            None,
        )
        self._unacked_messages.add(token)
        return token

    def ack_batch(self, token: Any, offsets: Mapping[Any, Sequence[int]]) -> None:
        """Acknowledge a batch: every offset of ``offsets`` (``{tp: offsets}``) as faust's
        ``ack`` acknowledges a message's (an offset below the committed one, or already
        acknowledged, is left out; topics without acks are skipped), in one step under
        faust's ack lock, then the batch's ``token`` is done and the waiters notified."""
        with ack_lock:
            for tp, offs in offsets.items():
                if not self.app.topics.acks_enabled_for(tp.topic):
                    continue
                committed = self._committed_offset[tp]
                index = self._acked_index[tp]
                new = [o for o in offs if (committed is None or o >= committed) and o not in index]
                index.update(new)
                self._acked[tp].extend(new)
                self._n_acked += len(new)
            token.acked = True
            self._unacked_messages.discard(token)
        notify(self._waiting_for_ack)

    def committed_offset(self, tp: Any) -> int | None:
        """The offset last committed for ``tp`` (None when none)."""
        return self._committed_offset.get(tp)


@functools.cache
def _transport_with(consumer_class: type) -> type:
    return type(
        f"{consumer_class.__name__}Transport",
        (faust_aiokafka.Transport,),
        {"Consumer": consumer_class},
    )


class FetchLoopApp(faust.App):
    """A faust ``App`` whose consumer is a ``consumer_class`` (a :class:`FetchLoopConsumer`)."""

    consumer_class: type[FetchLoopConsumer] = FetchLoopConsumer
    #: milliseconds the broker may hold a fetch that finds nothing new (None: faust's 1,500)
    fetch_max_wait_ms: int | None = None

    def _new_transport(self) -> Any:
        return _transport_with(self.consumer_class)(self.conf.broker_consumer, self)


# -- mode's worker ----------------------------------------------------------------------------


def stop_worker_as_a_signal(worker: mode.Worker) -> bool:
    """Start the stop SIGTERM starts in mode's ``worker`` (stop, then let
    ``execute_from_commandline`` close the loop: it waits for this stop); False, and nothing
    done, when a stop is already under way (it ends the same way). A later SIGTERM waits for
    this one."""
    if worker._signal_stop_time:
        return False
    worker._signal_stop_time = worker.loop.time()
    worker._signal_stop_future = asyncio.ensure_future(_stop_worker(worker))
    return True


async def _stop_worker(worker: Any) -> None:
    await worker.stop()
    starting = worker._starting_fut
    if starting is not None and not starting.done():
        starting.cancel()


# -- one private read each --------------------------------------------------------------------


def rocksdb_of(table: Any, partition: int) -> Any:
    """The rocksdict ``Rdict`` of one partition of a faust ``table`` stored in RocksDB (faust
    opens one per partition and has no public accessor for it)."""
    return table.data._db_for_partition(partition)


def aiokafka_producer(producer: Any) -> aiokafka.AIOKafkaProducer:
    """The aiokafka producer under faust's ``producer`` (started with it): for its batch API,
    which faust's has not."""
    return producer._ensure_producer()


async def fetch_metadata(client: AIOKafkaClient, topics: Sequence[str]) -> bool:
    """One metadata request for ``topics`` through aiokafka's ``client``; True when a broker
    answered. aiokafka's public ``fetch_all_metadata`` asks for every topic, and its refresh
    is rate-limited: this asks once, now, for these."""
    return await client._metadata_update(ClusterMetadata(), list(topics))


async def fetch_all_metadata(consumer: aiokafka.AIOKafkaConsumer) -> ClusterMetadata:
    """Fresh cluster metadata through an aiokafka ``consumer``'s client: the partitions of a
    topic it is not subscribed to (aiokafka has no public way to ask, fresh)."""
    return await consumer._client.fetch_all_metadata()


# -- the hand-over after a rebalance (module docstring) ---------------------------------------

#: ``on_handover({tp: committed offset or None})``: called once per rebalance, when the stream
#: partitions have been sought to their committed offsets, just before they resume.
HandoverHook = Callable[[Mapping[Any, int | None]], None]


class HandoverRecovery(Recovery):
    """faust's ``Recovery`` whose ``on_recovery_completed`` hands the stream partitions over
    without losing records (see the module docstring)."""

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        """The tables are restored: finish them, then hand the stream partitions over."""
        self.log.info("tables restored")
        await self.app.on_rebalance_complete.send()
        self._set_recovery_ended()
        await self._tables_recovery_completed()
        if self.app.consumer_generation_id != generation_id:
            self.log.warning(
                "a newer rebalance (generation %s, recovery was for %s): no hand-over now",
                self.app.consumer_generation_id,
                generation_id,
            )
            return
        await self._hand_over_streams()
        self.tables.on_actives_ready()
        if not self.app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        self.app.on_rebalance_end()
        self.log.info("Worker ready")  # faust's own readiness line, kept for operators

    async def _tables_recovery_completed(self) -> None:
        callbacks = [
            asyncio.ensure_future(
                table.on_recovery_completed(
                    self.actives_for_table[table], self.standbys_for_table[table]
                )
            )
            for table in self.tables.values()
        ]
        if callbacks:
            await asyncio.wait(callbacks)

    async def _hand_over_streams(self) -> None:
        """Seek, clear, re-read the standbys, and only then resume the stream partitions."""
        app, consumer = self.app, self.app.consumer
        assignment = consumer.assignment()
        streams = {tp for tp in assignment if not self._is_changelog_tp(tp)}
        consumer.stop_flow()
        if assignment:  # also resets the read offsets of the changelog partitions
            self.log.info("seeking the assigned partitions to their committed offsets")
            await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
        self.completed.set()
        app.flow_control.resume()  # clears the queues: nothing of the streams is in them yet
        if self.standby_tps:
            await self._wait(
                self._seek_offsets(consumer, self.standby_tps, self.standby_offsets, "standby"),
                timeout=app.conf.broker_request_timeout,
            )
        on_handover = getattr(self.tables, "on_handover", None)
        if on_handover is not None:
            on_handover({tp: consumer._committed_offset.get(tp) for tp in streams})
        consumer.resume_partitions(streams)
        consumer.resume_flow()
        await app._fetcher.maybe_start()


class HandoverTableManager(TableManager):
    """faust's ``TableManager`` with :class:`HandoverRecovery` as its recovery service;
    ``on_handover`` (a :data:`HandoverHook`), when set, hears of every hand-over."""

    on_handover: HandoverHook | None = None

    @property
    def recovery(self) -> Recovery:
        """Recovery service used by this table manager."""
        if self._recovery is None:
            self._recovery = HandoverRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
