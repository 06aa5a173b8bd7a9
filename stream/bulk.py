"""Batch delivery of the events topic: each fetch becomes micro-batches, not records one by one.

faust hands records to agents one at a time. Per record its fetch loop races the delivery
against a flow stop (``Service.wait_first``: four asyncio tasks and a ``wait``), the conductor
wraps the record in an ``Event`` and queues it, and the agent's stream takes it back out and
re-batches it (``take``). That costs 75–115 µs of CPU per record on this project's machine:
faust's no-op agent passes 9–13k events/s where a bare aiokafka consume→produce loop passes
56–65k (``sketchstream bench stream``). The worker needs none of it for its events topic: its
:class:`~sketchstream.stream.worker.BatchProcessor` takes raw messages, many at a time.

:class:`BulkConsumer` is faust's aiokafka consumer with a fetch loop of its own:

* records of the *bulk* topics (the events topic, the recommendation requests) go to their
  topic's handler as lists of at most that handler's ``size`` messages
  (:class:`~sketchstream.stream.records.RawMessage`): everything one fetch returned, every
  partition's records in offset order. No waiting to fill a batch: under load
  a fetch brings thousands of records, when the input is slow a batch is whatever has
  arrived, so latency stays low at low rates. A fetch's batches go out handler by handler,
  in the order the handlers were added (events first, then the requests that may read the
  states those events just wrote);
* records of every other topic (the tables' changelogs, read for recovery and the standby
  replicas) keep faust's per-record delivery, unchanged.

faust's bookkeeping stays in charge. Every bulk batch is tracked when handed over and its
offsets acknowledged when the handler returns (or, for a handler that hands back the rest of
its batch, when that rest has finished, behind the next batch: :meth:`BulkConsumer._deliver_batch`),
so offsets are committed as for an agent, a
rebalance waits for the batch in progress (``wait_empty``) and the hand-over
(:class:`~sketchstream.stream.faust_compat.HandoverRecovery`) seeks these partitions like any
other. When the flow stops (a rebalance) or the consumer generation changes, the rest of a
fetch is abandoned and the partitions are sought back to their committed offsets, so nothing
abandoned is skipped. None of it is per record any more: a batch is one tracked token and one
acknowledgement of its offsets, and its records are plain ``RawMessage`` tuples, not faust
messages (together ~6 µs a record of faust's, measured: a tenth of the worker's time).

A handler that raises is a failure of the worker, not bad input (the handler dead-letters
that): the fetch loop ends without acknowledging the batch and the worker stops as it does on
SIGTERM (it commits the batches it finished, leaves its group), then exits non-zero for its
supervisor to restart it; the failed batch is read again after the restart (at-least-once).
Not ``App.crash``: mode marks every service crashed at once, the consumer thread included,
and that thread then shuts itself down while the app's own stop still needs it to commit the
batches acknowledged since the last commit. That commit then waits forever and the worker
neither works nor exits: one of the two causes of issue 12's "stall after restoring an
unreadable state" (it needed a batch acknowledged less than a commit interval before the
failing one, and the thread to see the crash before the commit reached it; the other cause:
:meth:`~sketchstream.stream.faust_compat.FetchLoopConsumer._getmany`). See
:meth:`BulkApp.fail`.

This module is the batching; every private part of faust and mode it needs (the fetch loop
override, the fix of faust's ``_getmany``, the read offsets, gaps and acknowledgements, the
stop of mode's ``Worker``) is in :mod:`sketchstream.stream.faust_compat`, which checks the
installed versions at import.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import mode
from faust.types import TP
from sketchstream.stream.faust_compat import (
    FetchLoopApp,
    FetchLoopConsumer,
    stop_worker_as_a_signal,
)
from sketchstream.stream.metrics import StageTimes
from sketchstream.stream.records import RawMessage

__all__ = ["BulkApp", "BulkConsumer", "BulkFinish", "BulkHandler"]

log = logging.getLogger(__name__)

#: The rest of a batch a handler hands back (see :data:`BulkHandler`): awaited behind the
#: batch before it, then the batch is acknowledged.
BulkFinish = Callable[[], Awaitable[None]]

#: ``await handler(messages)``: one micro-batch of messages of the bulk topics
#: (:class:`~sketchstream.stream.records.RawMessage`), every partition's in offset order.
#: Returning None, it is acknowledged then; returning a :data:`BulkFinish`, the batch is
#: acknowledged when that finishes, which runs while the next batch is handled (see
#: :meth:`BulkConsumer._deliver_batch`).
BulkHandler = Callable[[list[RawMessage]], Awaitable[BulkFinish | None]]

#: Batches at most finishing behind the fetch loop (handed back, not yet finished): three, so
#: that a batch waiting for its scores from the worker's MLP helper (whose core the broker
#: shares) does not stall the next one (two: the fetch loop waited 2.6-2.8 us an event of a
#: drain for them, three: 1.7, drain +3 % in two runs each)
FINISHING_BEHIND = 3


class _Abandoned(Exception):
    """The flow stopped or the generation changed while a fetch was being delivered."""


class _Failed(Exception):
    """The batch handler failed: the worker is stopping (:meth:`BulkApp.fail`), fetch no more."""


class BulkConsumer(FetchLoopConsumer):
    """faust's aiokafka consumer delivering the bulk topics in micro-batches (module docstring).

    ``bulk_topics``, ``bulk_handler`` and ``bulk_size`` come from the :class:`BulkApp`."""

    _bulk_acked = 0  # acknowledged since this loop last committed
    _committing = False  # a commit this loop started is in flight
    _finishing: asyncio.Future | None = None  # the last batch handed over to finish behind
    # the ones before it still finishing, oldest first: the oldest is awaited before a batch is
    # handed over once FINISHING_BEHIND - 1 of them wait
    _behind: collections.deque[asyncio.Future] | None = None
    _finish_failed = False  # a batch failed to finish: the worker is stopping, fetch no more

    @property
    def _bulk(self) -> tuple[Mapping[str, int], tuple[BulkHandler, ...], tuple[int, ...]]:
        app = self.app
        return app.bulk_routes, app.bulk_handlers, app.bulk_sizes

    async def fetch_loop(self, fetcher: Any) -> None:
        """The fetch loop (run by faust's ``Fetcher`` service until it or the consumer stops).

        A round that delivers records counts as busy time in the app's ``stages``, its fetch
        (the wait for records included) as ``fetch``; a round that fetched nothing counts as
        busy only what batches finishing behind it timed meanwhile (their states, predictions,
        acknowledgements), so the stages never add up to more than the busy time.
        """
        stages = self.app.stages
        try:
            while not (self.should_stop or fetcher.should_stop or self._finish_failed):
                started, inner = time.perf_counter_ns(), stages.total_ns()
                records, active = await self.next_records(1.0)
                await asyncio.sleep(0)  # a fetch can return at once, again and again
                if not records or self.should_stop or self._finish_failed:
                    stages.busy_ns += stages.total_ns() - inner  # the finishing batches' work
                    continue
                stages.lap_outside("fetch", started, inner)
                try:
                    await self._deliver_through_a_stop(records, active)
                except _Abandoned:
                    if not self.app.should_stop:  # stopping: the next owner reads from the commit
                        await self._seek_back()
                except _Failed:
                    return  # not raised on: that would crash the fetcher, and every service
                finally:
                    stages.busy_ns += time.perf_counter_ns() - started
        except self.consumer_stopped_errors:
            if self.app.should_stop:
                log.info("consumer stopped by the broker while shutting down")
                return
            raise
        except asyncio.CancelledError:
            if self.app.should_stop:
                return
            raise

    async def _deliver_through_a_stop(
        self, records: Mapping[Any, Sequence[Any]], active: Any
    ) -> None:
        """:meth:`_deliver`, with the batch under way finished when a stop cancels the fetch
        loop. faust's stop cancels the fetcher before it waits for the streams' acknowledgements
        (its agents run apart from the fetcher; here the handler runs inside it), so a batch cut
        short would have published predictions whose states are never written nor offsets
        committed: read again after the restart, they would be published twice. Stopped
        flows end the fetch at the next batch (:meth:`_check_flow`), so the stop waits for one
        batch at most; the worker's stop timeout bounds it. A cancel that is not a stop (a
        rebalance restarting the fetcher) cuts the delivery as before."""
        delivery = asyncio.ensure_future(self._deliver(records, active))
        while True:
            try:
                await asyncio.shield(delivery)
                return
            except asyncio.CancelledError:
                if self.app.should_stop and not delivery.done():
                    log.info("stopping: the batch under way is finished first")
                    continue
                if delivery.done() and not delivery.cancelled():
                    delivery.exception()  # retrieved: it ended as the cancel came
                delivery.cancel()
                raise

    async def _deliver(self, records: Mapping[Any, Sequence[Any]], active: Any) -> None:
        """One fetch: the other topics' records one by one, then the bulk topics' in batches."""
        t = time.perf_counter_ns()
        routes, handlers, sizes = self._bulk
        generation = self.app.consumer_generation_id
        buffered = self.buffered_partitions
        bulk: list[list[RawMessage]] = [[] for _ in handlers]  # per handler
        paused: dict[Any, int] = {}
        for tp, recs in records.items():
            if active is not None and tp not in active and tp not in buffered:
                if recs:  # paused while the fetch was under way
                    paused[tp] = recs[0].offset
                continue
            fresh = await self._fresh(tp, recs)
            if not fresh:
                continue
            route = routes.get(tp.topic)
            if route is not None:
                bulk[route].extend(_raw(r) for r in fresh)
            else:
                await self._deliver_each(tp, fresh, generation)
        if paused:
            await self._put_back(paused)
        self.app.stages.lap("deliver", t)
        for messages, handler, size in zip(bulk, handlers, sizes, strict=True):
            for start in range(0, len(messages), size):
                await self._deliver_batch(handler, messages[start : start + size], generation)

    async def _put_back(self, first: Mapping[Any, int]) -> None:
        """Seek partitions paused while a fetch was under way back to the first record it
        brought of them: aiokafka's positions are past those records, which the fetch loop
        does not deliver, so they would never be read again (a hand-over seeks the stream
        partitions anyway; nothing else that resumes a partition does)."""
        log.info(
            "records fetched for partitions paused meanwhile, read again later: %s",
            ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(first.items())),
        )
        try:
            await self.seek_wait(dict(first))
        except Exception as exc:  # revoked meanwhile: its next owner starts at the commit
            log.warning("seek back of the paused partitions failed: %r", exc)

    async def _fresh(self, tp: Any, records: Sequence[Any]) -> list[Any]:
        """The records not read before (a seek can bring some again), with any hole between
        them recorded as a gap, so commits can pass offsets Kafka never delivers."""
        read = self.read_offsets[tp]
        if read is not None:
            records = [r for r in records if r.offset >= read]
        if not records or not self.app.topics.acks_enabled_for(tp.topic):
            return list(records)
        prev = read
        for r in records:
            if prev and r.offset - prev > 1:
                await self.add_gap(tp, prev + 1, r.offset - 1)
            prev = r.offset
        return list(records)

    def _check_flow(self, generation: int) -> None:
        if not self.flow_active or self.app.consumer_generation_id != generation:
            raise _Abandoned()

    async def _deliver_each(self, tp: Any, records: Iterable[Any], generation: int) -> None:
        """faust's own path: one record at a time through the conductor (tables, standbys)."""
        for record in records:
            self._check_flow(generation)
            message = self.to_message(tp, record)
            waited = await self.wait_first(self.callback(message), self.suspend_flow.wait())
            if waited.stopped or self.suspend_flow.is_set():  # the delivery may be cancelled
                raise _Abandoned()
            self.read_offsets[tp] = record.offset

    async def _deliver_batch(
        self, handler: BulkHandler | None, messages: list[RawMessage], generation: int
    ) -> None:
        """Track, hand over, acknowledge; then the read offsets move on.

        A handler that hands back the rest of its batch (a :data:`BulkFinish`: for the worker,
        waiting for the predictions' acknowledgements, then writing the states) gets it run as
        a task behind the previous batch's, and the batch acknowledged when it has finished:
        the next fetch and the next batch go on meanwhile (its handler sees what the one before
        left, the worker's held states), so the broker's round trip overlaps the fetch loop's
        work. :data:`FINISHING_BEHIND` batches at most finish behind the fetch loop: before a
        batch is handed over, the one that many before it must have finished. A finish that
        fails stops the worker as a
        failing handler does; the batches behind it are not acknowledged (read again after the
        restart). Runs as a task, a finish goes on through a stop or a rebalance, which wait for
        its acknowledgement (faust's ``wait_empty``)."""
        assert handler is not None
        stages = self.app.stages
        t = time.perf_counter_ns()
        behind = self._behind
        if behind is None:
            behind = self._behind = collections.deque()
        while len(behind) >= FINISHING_BEHIND - 1:
            inner = stages.total_ns()
            finished = await _finished(behind.popleft())
            t = stages.lap_outside("send_wait", t, inner)
            if not finished:
                raise _Failed()
        if self._finish_failed:
            raise _Failed()
        self._check_flow(generation)
        token = self.track_batch(messages[0])
        stages.lap("deliver", t)
        try:
            finish = await handler(messages)
        except Exception as exc:
            # not bad input (the handler dead-letters that) but a failure of the worker itself:
            # stop it. Seek back first, so a restarted fetch cannot skip the batch.
            log.exception("batch handler failed: stopping; the batch is read again on restart")
            # never acknowledged here, so never committed; untracked, so faust's stop does not
            # wait for their acknowledgement (``wait_empty``: forever, and the worker would hang
            # instead of exiting for its supervisor to restart it)
            self.untrack([token])
            await self._seek_back()
            await self.app.fail(exc)
            raise _Failed() from exc
        t = time.perf_counter_ns()
        offsets = _offsets(messages)
        self.read_offsets.update((tp, done[-1]) for tp, done in offsets.items())
        if finish is None and self._finishing is not None:
            finish = _nothing  # acknowledged behind the batches before it, never ahead of them
        if finish is None:
            self._acknowledge(token, offsets)
            t = stages.lap("deliver", t)
        else:
            previous = self._finishing
            self._finishing = asyncio.ensure_future(
                self._finish_behind(previous, finish, token, offsets)
            )
            if previous is not None:
                behind.append(previous)
            t = stages.lap("deliver", t)
        if self._bulk_acked >= self.app.conf.broker_commit_every and not self._committing:
            # a task, as faust's commit timer: the commit first waits for the producer's flush
            # (~10 ms in a drain) and the fetch loop goes on meanwhile (faust's commit lock
            # keeps one commit at a time with the timer's)
            self._bulk_acked = 0
            self._committing = True
            task = asyncio.ensure_future(self.commit())
            task.add_done_callback(self._committed)
            stages.lap("commit", t)

    def _committed(self, task: asyncio.Future) -> None:
        self._committing = False
        if not task.cancelled() and task.exception() is not None:
            log.warning("a commit of the acknowledged offsets failed: %r", task.exception())

    def _acknowledge(self, token: Any, offsets: Mapping[TP, list[int]]) -> None:
        self.ack_batch(token, offsets)
        self._bulk_acked += sum(len(done) for done in offsets.values())

    async def _finish_behind(
        self,
        previous: asyncio.Future | None,
        finish: BulkFinish,
        token: Any,
        offsets: Mapping[TP, list[int]],
    ) -> bool:
        """Finish a batch after ``previous`` (the batch before it) has, then acknowledge it;
        whether it did (see :meth:`_deliver_batch`)."""
        try:
            if previous is not None and not await _finished(previous):
                self.untrack([token])  # after a failed batch: read again after the restart
                return False
            await finish()
        except Exception as exc:
            log.exception("a batch failed to finish: stopping; it is read again on restart")
            self.untrack([token])
            self._finish_failed = True
            await self.app.fail(exc)
            return False
        except asyncio.CancelledError:  # the loop going away: never acknowledged, not waited for
            self.untrack([token])
            self._finish_failed = True
            raise
        self._acknowledge(token, offsets)
        return True

    async def _seek_back(self) -> None:
        """Back to the committed offsets, so what was fetched and abandoned is read again."""
        try:
            await self.perform_seek()
        except Exception as exc:  # a rebalance under way: its hand-over seeks again
            log.warning("seek back to the committed offsets failed: %r", exc)


async def _finished(task: asyncio.Future) -> bool:
    """Whether a batch's finish (:meth:`BulkConsumer._finish_behind`) succeeded, once it is
    done; a cancel of the waiter does not reach the task, nor does the task's cancel raise."""
    await asyncio.wait((task,))
    return not task.cancelled() and task.exception() is None and task.result()


async def _nothing() -> None:
    """The finish of a batch with nothing left to do."""


def _raw(record: Any) -> RawMessage:
    """An aiokafka ``ConsumerRecord`` as the worker reads it (its Kafka time in seconds)."""
    ts = record.timestamp
    return RawMessage(
        record.topic,
        record.partition,
        record.offset,
        record.key,
        record.value,
        None if ts is None else ts / 1000.0,
    )


def _offsets(messages: Sequence[RawMessage]) -> dict[TP, list[int]]:
    """``{tp: offsets}`` of a batch, each partition's in batch (offset) order (a partition's
    records come in one run: a ``TP`` per run, not per record)."""
    out: dict[TP, list[int]] = {}
    offsets: list[int] = []
    topic, partition = None, -1
    for m in messages:
        if m.partition != partition or m.topic != topic:
            topic, partition = m.topic, m.partition
            offsets = out.setdefault(TP(topic, partition), [])
        offsets.append(m.offset)
    return out


class BulkApp(FetchLoopApp):
    """A faust ``App`` whose consumer is a :class:`BulkConsumer`; :meth:`bulk` routes a topic to
    a batch handler (the topic is subscribed, and co-partitioned with the tables and the other
    topics of the same partition count, as an agent's would be)."""

    # topic name -> index into bulk_handlers; replaced, never mutated (the class default too)
    bulk_routes: Mapping[str, int] = MappingProxyType({})
    bulk_handlers: tuple[BulkHandler, ...] = ()
    bulk_sizes: tuple[int, ...] = ()
    consumer_class = BulkConsumer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: where the worker's time goes, batch stage by batch stage (the fetch loop's own
        #: stages here, the handlers' from them): ``/metrics`` shows it
        self.stages = StageTimes()

    @property
    def bulk_topics(self) -> frozenset[str]:
        """The topics delivered in batches."""
        return frozenset(self.bulk_routes)

    def bulk(self, topic: Any, handler: BulkHandler, *, size: int) -> None:
        """Deliver ``topic`` (a faust topic) to ``handler`` in batches of at most ``size``;
        a fetch's batches go to the handlers in the order they were added."""
        if size < 1:
            raise ValueError(f"bulk batch size must be at least 1, got {size}")
        taken = sorted(set(topic.topics) & set(self.bulk_routes))
        if taken:
            raise ValueError(f"topics {taken} already have a bulk handler")
        self.topics.add(topic)
        route = len(self.bulk_handlers)
        self.bulk_routes = {**self.bulk_routes, **{t: route for t in topic.topics}}
        self.bulk_handlers = (*self.bulk_handlers, handler)
        self.bulk_sizes = (*self.bulk_sizes, size)

    async def fail(self, exc: BaseException) -> None:
        """Stop the worker running this app because it failed with ``exc``, so that it exits
        non-zero and its supervisor restarts it.

        The stop is the one SIGTERM makes (flow stopped, finished batches committed, group
        left), started from here; mode's ``Worker`` re-raises ``exc`` once its loop is closed:
        exit status 1. A stop already under way (SIGTERM) goes on and ends the same way.

        Not ``App.crash`` (see the module docstring): a crash reaches the consumer thread at
        once, and that thread may shut down before the app's stop has committed through it,
        which then waits forever. An app run without a mode ``Worker`` above it (embedded)
        has nobody to stop it and exit: it is crashed, as faust does."""
        node = self.beacon
        while node.parent is not None:
            node = node.parent
        worker = node.data
        if not isinstance(worker, mode.Worker):
            await self.crash(exc)
            return
        worker.crash_reason = exc  # mode's Worker re-raises it after its loop is closed
        stop_worker_as_a_signal(worker)  # unless a stop is under way: it ends the same way
