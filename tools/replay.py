"""`sketchstream replay FILE`: produce a canonical events file into the events topic.

Each line goes out unchanged as the record value, keyed by its user (partitioned like Kafka's
Java clients, murmur2), with the record time set by the producer: the worker's latency metric
measures from here. Records are packed into per-partition batches by hand (aiokafka's batch
API, no compression), which is several times faster than one ``send`` per record.

    sketchstream replay data/ml-1m/events.jsonl --rate max
    sketchstream replay events.jsonl --rate 20000 --from 978300000 --to 978400000

Delivery: the producer is idempotent (``acks=all``, a producer id and per-partition sequence
numbers), so a batch is retried through a broker restart without being written twice, and as
aiokafka keeps one batch per partition in flight and puts a failed one back at the head of its
partition's queue, nothing after it on that partition is written first: every user's events
arrive once, in file order. Retries are bounded by ``--retry-timeout``: when a batch has waited
that long for its acknowledgement, replay stops with :class:`ReplayStopped`, which says how many
events were acknowledged and the line to resume from (``--from-line``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from sketchstream.models.errors import SketchstreamError
from sketchstream.tools.options import load_settings_or_exit, setting_option

__all__ = ["ReplayStopped", "produce_events", "replay"]

log = logging.getLogger(__name__)

_CHUNK = 2000  # events between rate checks and progress updates, at most
_TICK_S = 0.01  # with a rate: ship and pace about every 10 ms, so the stream is not bursty
RETRY_TIMEOUT_S = 120.0  # how long a batch may wait for its acknowledgement (broker restarts)
_TTL_MARGIN_S = 30.0  # aiokafka fails a batch older than its request timeout: keep it longer
_STOP_S = 2.0  # giving up: how long the producer may take to close over a broker still away


class ReplayStopped(SketchstreamError):
    """Replay gave up on a batch: ``sent`` events were acknowledged; every line before
    ``resume_line`` is in the topic (or was skipped)."""

    def __init__(self, message: str, *, sent: int, resume_line: int) -> None:
        super().__init__(message)
        self.sent = sent
        self.resume_line = resume_line


def _count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            n += chunk.count(b"\n")
    return n


async def produce_events(
    path: Path,
    *,
    bootstrap_kwargs: dict,
    topic: str,
    rate: float | None = None,
    ts_from: float | None = None,
    ts_to: float | None = None,
    from_line: int = 1,
    retry_timeout: float = RETRY_TIMEOUT_S,
    progress: bool = True,
) -> tuple[int, int]:
    """Produce the events of ``path`` in file order; returns ``(sent, skipped)``.

    ``rate``: events per second (None: as fast as the broker takes them). Lines that are not a
    JSON object with a string ``user`` are skipped (and counted): nothing to key them by. Lines
    before ``from_line`` (numbered from 1) are passed over. ``retry_timeout``: seconds a batch
    may wait for its acknowledgement (retried meanwhile) before :class:`ReplayStopped`.
    """
    import orjson
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner
    from sketchstream.models.events import iter_event_lines
    from tqdm.auto import tqdm

    producer = AIOKafkaProducer(
        **bootstrap_kwargs,
        # paced: ship each ~10 ms tick at once (aiokafka holds a partition's next batch until
        # the previous one went out, so a 20 ms linger would cap the pace near 1,000 ev/s)
        linger_ms=1 if rate is not None else 20,
        max_batch_size=1 << 20,
        max_request_size=1 << 23,
        compression_type=None,
        acks="all",
        enable_idempotence=True,
        # aiokafka fails a batch that waited for a partition leader longer than its request
        # timeout, idempotent or not: leave the bound to the retry timeout
        request_timeout_ms=int((retry_timeout + _TTL_MARGIN_S) * 1000),
    )
    await producer.start()
    inflight = _InFlight(topic, retry_timeout)
    skipped = 0
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partition_of = DefaultPartitioner()
        builders: dict[int, Any] = {}
        total = _count_lines(path) if progress else None
        bar = tqdm(total=total, unit="ev", desc="replay", disable=not progress, mininterval=0.5)
        loads = orjson.loads
        started = time.perf_counter()
        in_chunk = appended = 0
        chunk = _CHUNK if rate is None else max(1, min(_CHUNK, int(rate * _TICK_S)))

        async def ship(p: int) -> None:
            batch = builders.pop(p)
            future = await inflight.bounded(producer.send_batch(batch, topic, partition=p))
            inflight.ship(p, future, batch.record_count())

        for number, line in iter_event_lines(path):
            inflight.line = number
            if number < from_line:
                bar.update(1)
                continue
            try:
                record = loads(line)
                user = record["user"]
                ts = record.get("ts")
                if not isinstance(user, str):
                    raise TypeError(user)
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                skipped += 1
                bar.update(1)
                continue
            if ts_from is not None or ts_to is not None:
                if not isinstance(ts, int | float):
                    skipped += 1
                    bar.update(1)
                    continue
                if (ts_from is not None and ts < ts_from) or (ts_to is not None and ts >= ts_to):
                    bar.update(1)
                    continue
            key = user.encode()
            p = partition_of(key, partitions, partitions)
            batch = builders.get(p)
            if batch is None:
                batch = builders[p] = producer.create_batch()
                inflight.open(p, number)
            if batch.append(key=key, value=line, timestamp=None) is None:
                await ship(p)
                batch = builders[p] = producer.create_batch()
                inflight.open(p, number)
                batch.append(key=key, value=line, timestamp=None)
            appended += 1
            in_chunk += 1
            if in_chunk >= chunk:
                bar.update(in_chunk)
                in_chunk = 0
                for q in list(builders):
                    await ship(q)
                inflight.settle()  # a delivery error now rather than at the end
                if rate is not None:
                    ahead = appended / rate - (time.perf_counter() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        inflight.line += 1  # the whole file is read
        for q in list(builders):
            await ship(q)
        await inflight.drain()
        bar.update(in_chunk)
        bar.close()
    except ReplayStopped:
        # the broker may still be away: its flush would wait for it, so do not wait long
        try:
            await asyncio.wait_for(producer.stop(), _STOP_S)
        except TimeoutError:
            log.warning("replay: the producer did not close in %.0fs; leaving it", _STOP_S)
        raise
    except BaseException:
        await producer.stop()
        raise
    await producer.stop()
    return inflight.acked, skipped


class _InFlight:
    """The batches handed to the producer and not yet acknowledged, with the lines they start
    at: how many events are acknowledged, and from which line a stopped replay resumes."""

    def __init__(self, topic: str, retry_timeout: float) -> None:
        self.topic = topic
        self.retry_timeout = retry_timeout
        self.acked = 0  # events acknowledged
        self.line = 0  # the line being read
        self._opened: dict[int, int] = {}  # partition -> first line of its open batch
        self._shipped: list[tuple[asyncio.Future, int, int, float]] = []  # fut, line, n, when

    def open(self, partition: int, line: int) -> None:
        self._opened[partition] = line

    def ship(self, partition: int, future: asyncio.Future, events: int) -> None:
        line = self._opened.pop(partition)
        self._shipped.append((future, line, events, time.monotonic()))

    def _oldest(self) -> float | None:
        """When the oldest batch not acknowledged yet was shipped (None: there is none)."""
        return min((at for fut, _, _, at in self._shipped if not fut.done()), default=None)

    async def bounded(self, awaitable: Any) -> Any:
        """Await ``awaitable`` (a send that waits while the broker is away) no longer than the
        oldest batch in flight has retry time left."""
        oldest = self._oldest()
        if oldest is None:  # nothing in flight: the producer has room, the send cannot wait
            return await awaitable
        try:
            left = self.retry_timeout - (time.monotonic() - oldest)
            return await asyncio.wait_for(awaitable, max(left, 0.0))
        except TimeoutError:
            raise self.stopped(f"no acknowledgement for {self.retry_timeout:g}s") from None

    def settle(self) -> None:
        """Count the acknowledged batches; ReplayStopped on one that failed or waited longer
        than the retry timeout."""
        left, failed = [], None
        for item in self._shipped:
            fut, _, events, _ = item
            if not fut.done():
                left.append(item)
            elif fut.exception() is None:
                self.acked += events
            else:
                failed = failed or fut.exception()
                left.append(item)
        self._shipped = left
        if failed is not None:
            raise self.stopped(f"a batch failed: {failed!r}")
        oldest = self._oldest()
        if oldest is not None and time.monotonic() - oldest > self.retry_timeout:
            raise self.stopped(f"no acknowledgement for {self.retry_timeout:g}s")

    async def drain(self) -> None:
        """Wait for every shipped batch (no longer than the retry timeout each)."""
        while self._shipped:
            oldest = self._oldest()
            if oldest is not None:
                left = self.retry_timeout - (time.monotonic() - oldest)
                await asyncio.wait(
                    [fut for fut, *_ in self._shipped if not fut.done()],
                    timeout=max(left, 0.0) + 0.01,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            self.settle()

    def stopped(self, why: str) -> ReplayStopped:
        """The error that ends a replay: what was acknowledged, where to resume."""
        waiting = [line for fut, line, _, _ in self._shipped if not fut.done() or fut.exception()]
        resume = min([*waiting, *self._opened.values()], default=self.line)
        return ReplayStopped(
            f"replay stopped: {why}; {self.acked:,} events sent (acknowledged) to "
            f"{self.topic!r}; every line before line {resume} is in the topic; resume with "
            f"--from-line {resume} (events after it may be in the topic already: sent again then)",
            sent=self.acked,
            resume_line=resume,
        )


def replay(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Canonical events file.")
    ],
    rate: Annotated[str, typer.Option("--rate", help="Events per second, or 'max'.")] = "max",
    ts_from: Annotated[
        float | None, typer.Option("--from", help="Only events with ts >= this.")
    ] = None,
    ts_to: Annotated[float | None, typer.Option("--to", help="Only events with ts < this.")] = None,
    from_line: Annotated[
        int, typer.Option("--from-line", min=1, help="Start at this line of the file (from 1).")
    ] = 1,
    retry_timeout: Annotated[
        float,
        typer.Option(
            "--retry-timeout",
            min=0.1,
            help="Seconds a batch may go unacknowledged (retried meanwhile) before replay stops.",
        ),
    ] = RETRY_TIMEOUT_S,
    topic: Annotated[str | None, typer.Option("--topic", help="Default: the events topic.")] = None,
    kafka: Annotated[str | None, setting_option("kafka", "--kafka")] = None,
) -> None:
    """Produce a canonical events file into the events topic, keyed by user."""
    if rate == "max":
        per_second = None
    else:
        try:
            per_second = float(rate)
        except ValueError:
            per_second = -1.0
        if not per_second > 0:
            raise typer.BadParameter(f"--rate must be a positive number or 'max', got {rate!r}")
    settings = load_settings_or_exit(kafka=kafka)
    target = topic or settings.topic_events
    t0 = time.perf_counter()
    try:
        sent, skipped = asyncio.run(
            produce_events(
                file,
                bootstrap_kwargs=settings.client_kwargs(),
                topic=target,
                rate=per_second,
                ts_from=ts_from,
                ts_to=ts_to,
                from_line=from_line,
                retry_timeout=retry_timeout,
            )
        )
    except ReplayStopped as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    secs = time.perf_counter() - t0
    typer.echo(
        f"sent {sent:,} events to {target!r} in {secs:.1f}s ({sent / max(secs, 1e-9):,.0f}/s)"
        + (f"; skipped {skipped:,} lines without a user" if skipped else "")
    )
