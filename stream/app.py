"""The streaming worker's faust application, built by :func:`create_app`.

Declared top-down, like faust's examples, but inside a factory (no import-time app)::

    events (raw bytes, keyed by user) ─► "score": one batch per fetch ─► BatchProcessor
        ├─► predictions (keyed by user)        └─► table "users" (RocksDB + changelog)
        ├─► events.dlq (refused events, with the reason)
        └─► recommendations (with recommend_on_event: top-k after the users' events)
    recommend (requests, keyed by user) ─► "answer": reads table "users", never writes it
        ├─► recommendations (keyed by user)
        └─► events.dlq (refused requests, with the reason)
    sketchstream.models ─► ModelFeed ─► swapped in between batches
    web: /health, /metrics (Prometheus text, the worker's own registry)

The recommend topic is co-partitioned with the events (same partition count, same consumer
group: the worker creates it with ``settings.partitions`` when missing), so a request keyed by
its user reaches the worker that holds that user's state. A fetch's events are handled before
its requests, so a request sees the events fetched with it.

Delivery is at-least-once and the user state remembers the last offset folded, so a crash
replays without double counting. Order inside a batch: predictions and dead letters are sent
and acknowledged *before* the new states are written (RocksDB + changelog). A crash in
between re-folds the batch from the old states and re-publishes the same predictions (same
event reference, same scores); a state is never stored ahead of its predictions. The wait for
those acknowledgements and the writes after it run while the next batch is handled (which reads
the states held meanwhile, :meth:`~sketchstream.stream.tables.UserStates.hold`); the batch's
offsets are acknowledged once they are done
(:meth:`~sketchstream.stream.bulk.BulkConsumer._deliver_batch`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mode import Service
from sketchstream.stream.errors import ConfigError
from sketchstream.stream.metrics import WorkerMetrics
from sketchstream.stream.models_feed import ModelFeed
from sketchstream.stream.publish import publish
from sketchstream.stream.records import EventLimits, RequestLimits
from sketchstream.stream.settings import Settings
from sketchstream.stream.tables import UserStates
from sketchstream.stream.worker import BatchProcessor, BatchResult

if TYPE_CHECKING:  # pragma: no cover
    import faust
    from sketchstream.stream.mlp_helper import MLPHelper

__all__ = ["Health", "create_app", "faust_app"]

log = logging.getLogger(__name__)


def _broker_credentials(settings: Settings) -> Any:
    import faust

    kwargs = settings.client_kwargs()
    ssl_context = kwargs.get("ssl_context")
    if settings.sasl_mechanism:
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=ssl_context,
        )
    if ssl_context is not None:
        return faust.SSLCredentials(ssl_context)
    return None


def _retrieved(future: asyncio.Future) -> None:
    """Retrieve a delivery future's error (the worker is stopping on an earlier one), so that
    asyncio does not log it again as never retrieved."""
    if not future.cancelled():
        future.exception()


def _settle_heap() -> None:
    """Move everything alive now (faust, the model, its similarity and snapshot: hundreds of
    thousands of objects) out of the garbage collector's reach. Otherwise every full collection
    walks them all: 120–230 ms pauses measured in the worker, each one a latency spike for
    every event waiting. The worker's own per-batch garbage is freed by reference counting.
    Called again after a model swap: what the old model left in cycles is collected then."""
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()


def faust_app(settings: Settings, *, web: bool = True, bulk: bool = False) -> faust.App:
    """A bare faust ``App`` with the worker's client settings (no topics, tables or agents):
    :func:`create_app` builds on it, and ``sketchstream bench stream`` runs its no-op
    passthrough on it, so the two differ only by how records reach the code. ``bulk``: a
    :class:`~sketchstream.stream.bulk.BulkApp` (batch delivery), else faust's own ``App``.

    The group membership is static (KIP-345, ``settings.member_id``): a worker restarted under
    the same id gets its partitions back without a rebalance, instead of waiting for its dead
    predecessor's session to time out. It does not leave the group on a stop either, so its
    partitions move to the others only after ``session_timeout``.
    """
    import faust
    from faust.sensors import Monitor
    from sketchstream.stream.bulk import BulkApp
    from sketchstream.stream.faust_compat import HandoverTableManager

    class QuietMonitor(Monitor):
        """faust's statistics sensor minus its per-message hooks (a few microseconds each,
        on every event in and record out); the worker keeps its own Prometheus metrics."""

        def on_message_in(self, *args: Any) -> None:
            return None

        def on_stream_event_in(self, *args: Any) -> None:
            return None

        def on_stream_event_out(self, *args: Any, **kwargs: Any) -> None:
            return None

        def on_message_out(self, *args: Any) -> None:
            return None

        def on_send_initiated(self, *args: Any, **kwargs: Any) -> None:
            return None

        def on_send_completed(self, *args: Any, **kwargs: Any) -> None:
            return None

    servers = settings.bootstrap_servers.split(",")
    batch_size = settings.batch_size
    app = (BulkApp if bulk else faust.App)(
        settings.app_id,
        Monitor=QuietMonitor,
        broker=[f"kafka://{s.strip()}" for s in servers if s.strip()],
        broker_credentials=_broker_credentials(settings),
        store="rocksdb://",  # with rocksdict installed (and python-rocksdb not) faust uses it
        datadir=str(settings.state_dir),
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=settings.standby_replicas,
        TableManager=HandoverTableManager,  # the hand-over that loses nothing: faust_compat.py
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=settings.commit_interval,
        consumer_group_instance_id=settings.member_id,
        broker_session_timeout=settings.session_timeout,
        broker_heartbeat_interval=settings.heartbeat_interval,
        broker_rebalance_timeout=settings.rebalance_timeout,
        # a JoinGroup is answered when the rebalance completes: up to the rebalance timeout
        broker_request_timeout=max(30.0, settings.session_timeout, settings.rebalance_timeout + 5),
        broker_commit_every=max(10_000, batch_size * 4),
        stream_buffer_maxsize=max(8192, batch_size * 4),
        producer_linger_ms=5,
        producer_max_batch_size=1 << 20,
        producer_compression_type=producer_compression(settings),
        web_enabled=web,
        web_port=settings.web_port,
        web_bind="0.0.0.0",
        web_in_thread=False,
        key_serializer="raw",
        value_serializer="raw",
    )
    if bulk:
        app.fetch_max_wait_ms = max(1, round(settings.fetch_max_wait * 1000))
    return app


def producer_compression(settings: Settings) -> str | None:
    """The worker producer's codec (``settings.compression``; None: uncompressed), refused
    with the setting's name when this Python cannot write it (snappy, lz4 and zstd come with
    ``cramjam``, a dependency), not as a codec error from deep inside the producer's start."""
    if settings.compression == "none":
        return None
    from aiokafka import codec

    available = {
        "gzip": codec.has_gzip,
        "snappy": codec.has_snappy,
        "lz4": codec.has_lz4,
        "zstd": codec.has_zstd,
    }[settings.compression]
    if not available():
        raise ConfigError(
            f"SKETCHSTREAM_COMPRESSION={settings.compression}: no {settings.compression} codec "
            "in this Python (install cramjam, a dependency of sketchstream), or set it to none"
        )
    return settings.compression


class _HelperService(Service):
    """The worker's MLP helper process, started with the worker (before its first model
    loads) and stopped with it."""

    def __init__(self, helper: MLPHelper, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.helper = helper

    async def on_start(self) -> None:
        self.helper.start()

    async def on_stop(self) -> None:
        self.helper.close()


def mlp_helper(settings: Settings) -> MLPHelper | None:
    """The worker's MLP helper process (not started), or None: ``settings.mlp_helper`` off, or
    one CPU only (there is no other core for it)."""
    if not settings.mlp_helper or (os.cpu_count() or 1) < 2:
        return None
    from sketchstream.stream.mlp_helper import MLPHelper

    return MLPHelper(threads=settings.torch_threads)


def create_app(settings: Settings) -> faust.App:
    """The worker app: consumes ``settings.topic_events`` in micro-batches of up to
    ``settings.batch_size`` events: what each fetch brought (see
    :mod:`sketchstream.stream.bulk`).

    ``settings.app_id`` is the consumer group and prefixes the changelog topic
    (``<app_id>-users-changelog``): workers with the same id share the partitions.
    ``/health`` answers 200 only while the worker is serving (see :class:`Health`).
    """
    from sketchstream.stream.faust_compat import HandoverTableManager

    limits = EventLimits(max_bytes=settings.max_event_bytes)
    app = faust_app(settings, bulk=True)

    events = app.topic(
        settings.topic_events,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    requests = app.topic(
        settings.topic_recommend,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
        internal=True,  # declared (created when missing) on subscription, as the events' twin
    )
    outputs = [
        app.topic(
            name, key_serializer="raw", value_serializer="raw", partitions=settings.partitions
        )
        for name in (settings.topic_predictions, settings.topic_dlq, settings.topic_recommendations)
    ]
    predictions_topic, dlq_topic = settings.topic_predictions, settings.topic_dlq
    recommendations_topic = settings.topic_recommendations
    users = app.Table(
        "users",
        default=None,
        key_type=bytes,  # bytes key and value types: the changelog is raw bytes
        value_type=bytes,
        partitions=settings.partitions,
        options={"driver": "rocksdict"},
        help="User states (aggregator bytes), keyed by user.",
    )
    health = Health(app, settings)
    stages = app.stages  # timed by the fetch loop, the batch handlers and the table writes
    metrics = WorkerMetrics(lag_source=health.lag, stages=stages)
    states = UserStates(users, stages)
    helper = mlp_helper(settings)
    if helper is not None:
        metrics.watch_mlp_helper(helper)
        app.add_dependency(_HelperService(helper))  # starting while the first model loads
    feed = ModelFeed(settings, metrics=metrics)
    app.add_dependency(feed)  # started before the app's consumer: the first model loads first

    def on_handover(offsets: Mapping[Any, int | None]) -> None:
        """After a rebalance: where the worker (re)starts each events partition it now has."""
        starts = {tp: o for tp, o in offsets.items() if tp.topic == settings.topic_events}
        health.handed_over(starts)
        metrics.partition_handovers.inc(len(starts))
        log.info(
            "events partitions handed to the worker at their committed offsets: %s",
            ", ".join(
                f"{tp.partition}@{'start' if o is None else o}"
                for tp, o in sorted(starts.items(), key=lambda item: item[0].partition)
            )
            or "none",
        )

    if isinstance(app.tables, HandoverTableManager):
        app.tables.on_handover = on_handover

    processors: list[BatchProcessor] = []  # the one processor, made on the first batch

    async def processor() -> BatchProcessor:
        if not processors:
            for topic in outputs:  # create them if missing (the broker does not auto-create)
                await topic.maybe_declare()
            model = await feed.wait_ready()
            _settle_heap()
            processors.append(
                BatchProcessor(
                    model,
                    states.read,
                    topic=settings.topic_events,
                    limits=limits,
                    metrics=metrics,
                    on_error=settings.on_error,
                    request_topic=settings.topic_recommend,
                    request_limits=RequestLimits(max_bytes=settings.max_event_bytes),
                    recommend_on_event=settings.recommend_on_event,
                    recommend_exclude_seen=not settings.recommend_keep_seen,
                    mlp_helper=helper,
                )
            )
        return processors[0]

    # the last batch whose predictions are published behind the helper's scores: each batch's
    # go out after the batch before it's (partition order), not after its acknowledgements
    publishing: list[asyncio.Future | None] = [None]

    async def publish_outputs(
        predictions: list[tuple[bytes, bytes]],
        letters: list[tuple[bytes | None, bytes]],
        recommendations: list[tuple[bytes, bytes]],
    ) -> list[Any]:
        """A batch's records handed to the producer: the sends to await."""
        sends = await publish(app.producer, predictions_topic, predictions)
        sends += await publish(app.producer, dlq_topic, letters)
        sends += await publish(app.producer, recommendations_topic, recommendations)
        for sent in sends:  # a finish skipped after a failed batch never awaits them
            sent.add_done_callback(_retrieved)
        return sends

    async def publish_scored(
        result: BatchResult, previous: asyncio.Future | None
    ) -> tuple[list[Any], list[tuple[bytes, bytes]], list[float | None]]:
        """A batch's predictions (and dead letters, then its recommendations after events),
        published once its scores are back (``result.pending``; else they are) and the batch
        before it has published its own: ``(sends, predictions, kafka_ts)``."""
        predictions, letters, kafka_ts = result.predictions, [], result.kafka_ts
        if result.pending is not None:
            predictions, letters, kafka_ts = await result.pending.wait()
        if previous is not None:
            await asyncio.wait((previous,))
        t = time.perf_counter_ns()
        sends = await publish_outputs(predictions, letters, result.recommendations)
        stages.lap("send", t)
        return sends, predictions, kafka_ts

    async def score(messages: list[Any]) -> Callable[[], Awaitable[None]]:
        """One micro-batch: validate → score → fold, predictions out; handed back, the rest
        (the predictions' acknowledgements, then the new states), which finishes while the
        next batch is handled, reading these states where they are held meanwhile."""
        started = time.perf_counter()
        batch = await processor()
        new = feed.take_pending()
        if new is not None:
            batch.swap(new)
            _settle_heap()
        result = batch.process(messages)
        t = time.perf_counter_ns()
        scored = None
        previous = publishing[0]
        if result.pending is None and (previous is None or previous.done()):
            sends = await publish_outputs(result.predictions, result.dlq, result.recommendations)
        else:  # its MLP runs in the helper, or an earlier batch's does: behind those
            sends = await publish_outputs([], result.dlq, [])
            scored = publishing[0] = asyncio.ensure_future(publish_scored(result, previous))
        states.hold(result.table_writes)
        stages.lap("send", t)

        async def finish() -> None:
            predictions, kafka_ts = result.predictions, result.kafka_ts
            if scored is not None:
                more, predictions, kafka_ts = await scored
                sends.extend(more)
            if sends:
                await asyncio.gather(*sends)
            published = time.time()
            # only now: a state never gets ahead of the predictions made on the way to it
            await states.write(result.table_writes)
            t = time.perf_counter_ns()
            health.processed(messages)
            metrics.predictions_out.inc(len(predictions))
            metrics.observe_latencies([published - ts for ts in kafka_ts if ts])
            metrics.batch_seconds.observe(time.perf_counter() - started)
            stages.lap("metrics", t)

        return finish

    checked: list[str] = []  # the partitioning check's verdict, once: "" when right

    async def partitioning() -> str:
        """Why requests cannot be answered here ("" when they can): a recommend topic with
        another partition count than the events' would bring requests to partitions whose
        states live elsewhere, and every such answer would be a wrong cold start."""
        if not checked:
            from sketchstream.stream.faust_compat import aiokafka_producer

            kafka = aiokafka_producer(app.producer)
            n_req = len(await kafka.partitions_for(settings.topic_recommend))
            n_ev = len(await kafka.partitions_for(settings.topic_events))
            verdict = ""
            if n_req != n_ev:
                verdict = (
                    f"topic {settings.topic_recommend!r} has {n_req} partitions, "
                    f"{settings.topic_events!r} has {n_ev}: requests would reach workers without "
                    f"their users' states; recreate {settings.topic_recommend!r} with {n_ev}"
                )
                log.error("recommendation requests refused: %s", verdict)
            checked.append(verdict)
        return checked[0]

    async def answer(messages: list[Any]) -> None:
        """One micro-batch of recommendation requests: answers out; no state is written."""
        batch = await processor()
        new = feed.take_pending()
        if new is not None:
            batch.swap(new)
            _settle_heap()
        mismatch = await partitioning()
        if publishing[0] is not None:  # an answer never gets ahead of the predictions of the
            await asyncio.wait((publishing[0],))  # events its user's state holds
        result = (
            batch.refuse(messages, "bad_partitioning", mismatch)
            if mismatch
            else batch.answer(messages)
        )
        sends = await publish(app.producer, recommendations_topic, result.answers)
        sends += await publish(app.producer, dlq_topic, result.dlq)
        if sends:
            await asyncio.gather(*sends)

    app.bulk(events, score, size=settings.batch_size)
    app.bulk(requests, answer, size=settings.batch_size)

    @app.task
    async def probe_broker() -> None:
        await health.probe_forever()

    @app.page("/health")
    async def health_page(self: Any, request: Any) -> Any:
        model = feed.current
        reason = "starting: no model loaded yet" if model is None else health.reason()
        return self.json(
            {
                "status": "ok" if reason is None else "unavailable",
                "reason": reason,
                "model_version": model.version if model else None,
                "codebook_version": model.codebook_version if model else None,
                "partitions": health.partitions(),
                "lag": sum(health.lag().values()),
            },
            status=200 if reason is None else 503,
        )

    @app.page("/metrics")
    async def prometheus(self: Any, request: Any) -> Any:
        body, content_type = metrics.render()
        return self.bytes(body, content_type=content_type.split(";")[0])

    return app


class Health:
    """Whether the worker is doing its job, for ``/health``: :meth:`reason` is None when it
    serves, else why not, cheapest check first. Nothing here blocks a request: the broker is
    probed by a background task (:meth:`probe_forever`), the rest is read off the consumer.

    Lag per events partition is the partition's high watermark minus the next offset this
    worker will process: the last offset processed plus one, or, for a partition not processed
    since it was handed over, its committed offset (so a restarted, caught-up worker reads 0).
    """

    PROBE_EVERY_S = 1.0  # a metadata request for the events topic, this often
    PROBE_TIMEOUT_S = 2.0
    UNREACHABLE_AFTER_S = 4.0  # no probe answered for this long: the broker is unreachable

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.topic = settings.topic_events
        self.servers = settings.bootstrap_servers
        self.stall_timeout = settings.stall_timeout
        self.next_offset: dict[Any, int] = {}  # events TopicPartition -> next to process
        now = time.monotonic()
        self.last_answer = now  # last time the broker answered a probe
        self.last_progress = now  # last batch done, or hand-over

    def handed_over(self, offsets: Mapping[Any, int | None]) -> None:
        """The events partitions now assigned, each at its committed offset (None: none yet)."""
        self.next_offset = {tp: o or 0 for tp, o in offsets.items()}
        self.last_progress = time.monotonic()

    def processed(self, messages: Sequence[Any]) -> None:
        """A batch is done: these messages of the events topic are folded and their
        predictions published."""
        from faust.types import TP

        last = {m.partition: m.offset for m in messages}  # offset order: the last one stays
        self.next_offset.update((TP(self.topic, p), o + 1) for p, o in last.items())
        self.last_progress = time.monotonic()

    def partitions(self) -> list[int]:
        """The events partitions assigned to this worker (empty while none are)."""
        try:
            assigned = self.app.consumer.assignment()
        except Exception:  # no consumer yet (starting) or none any more (stopping)
            return []
        return sorted(tp.partition for tp in assigned if tp.topic == self.topic)

    def lag(self) -> dict[str, float]:
        """``{partition: records not yet processed}`` of the assigned events partitions whose
        high watermark the consumer knows."""
        lags: dict[str, float] = {}
        try:
            consumer = self.app.consumer
            assigned = consumer.assignment()
        except Exception:
            return lags
        for tp in assigned:
            if tp.topic != self.topic:
                continue
            high = consumer.highwater(tp)
            if high is None:
                continue
            lags[str(tp.partition)] = float(max(high - self.next_offset.get(tp, 0), 0))
        return lags

    def reason(self) -> str | None:
        """Why the worker is not serving now, or None when it is."""
        now = time.monotonic()
        silent = now - self.last_answer
        if silent > self.UNREACHABLE_AFTER_S:
            return f"broker unreachable: {self.servers} has not answered for {silent:.0f} s"
        if getattr(self.app, "rebalancing", False) or getattr(self.app, "in_recovery", False):
            return "rebalancing: partitions being assigned or their states restored"
        if not self.partitions():
            return "no partitions assigned: the group has given this worker none of " + self.topic
        lag = sum(self.lag().values())
        idle = now - self.last_progress
        if lag > 0 and idle > self.stall_timeout:
            return (
                f"stalled: no batch completed for {idle:.0f} s with {lag:.0f} events waiting "
                f"(stall_timeout {self.stall_timeout:g} s)"
            )
        return None

    async def probe_forever(self) -> None:
        """Ask the broker for the events topic's metadata every :attr:`PROBE_EVERY_S` through
        the producer's client; record when it last answered."""
        from sketchstream.stream.faust_compat import aiokafka_producer, fetch_metadata

        self.last_answer = time.monotonic()  # the consumer reached it to get this far
        while True:
            try:
                client = aiokafka_producer(self.app.producer).client
                answered = await asyncio.wait_for(
                    fetch_metadata(client, [self.topic]), self.PROBE_TIMEOUT_S
                )
            except Exception:  # refused, timed out, no producer: all say "no answer"
                answered = False
            if answered:
                self.last_answer = time.monotonic()
            await asyncio.sleep(self.PROBE_EVERY_S)
