"""`sketchstream replay FILE`: produce a canonical events file into the events topic.

Each line goes out unchanged as the record value, keyed by its user (partitioned like Kafka's
Java clients, murmur2), with the record time set by the producer: the worker's latency metric
measures from here. Records are packed into per-partition batches by hand (aiokafka's batch
API, no compression), which is several times faster than one ``send`` per record.

    sketchstream replay data/ml-1m/events.jsonl --rate max
    sketchstream replay events.jsonl --rate 20000 --from 978300000 --to 978400000
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["replay"]

log = logging.getLogger(__name__)

_CHUNK = 2000  # events between rate checks and progress updates, at most
_TICK_S = 0.01  # with a rate: ship and pace about every 10 ms, so the stream is not bursty


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
    progress: bool = True,
) -> tuple[int, int]:
    """Produce the events of ``path`` in file order; returns ``(sent, skipped)``.

    ``rate``: events per second (None: as fast as the broker takes them). Lines that are not a
    JSON object with a string ``user`` are skipped (and counted): nothing to key them by.
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
        acks=1,
    )
    await producer.start()
    sent = skipped = 0
    pending: list[asyncio.Future] = []
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partition_of = DefaultPartitioner()
        builders: dict[int, object] = {}
        total = _count_lines(path) if progress else None
        bar = tqdm(total=total, unit="ev", desc="replay", disable=not progress, mininterval=0.5)
        loads = orjson.loads
        started = time.perf_counter()
        in_chunk = 0
        chunk = _CHUNK if rate is None else max(1, min(_CHUNK, int(rate * _TICK_S)))

        async def ship(p: int) -> None:
            pending.append(await producer.send_batch(builders.pop(p), topic, partition=p))

        for _, line in iter_event_lines(path):
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
            if batch.append(key=key, value=line, timestamp=None) is None:
                await ship(p)
                batch = builders[p] = producer.create_batch()
                batch.append(key=key, value=line, timestamp=None)
            sent += 1
            in_chunk += 1
            if in_chunk >= chunk:
                bar.update(in_chunk)
                in_chunk = 0
                for q in list(builders):
                    await ship(q)
                done = [f for f in pending if f.done()]
                for f in done:
                    f.result()  # raise a delivery error now rather than at the end
                pending[:] = [f for f in pending if not f.done()]
                if rate is not None:
                    ahead = sent / rate - (time.perf_counter() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        for q in list(builders):
            await ship(q)
        if pending:
            await asyncio.gather(*pending)
        bar.update(in_chunk)
        bar.close()
    finally:
        await producer.stop()
    return sent, skipped


def replay(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Canonical events file.")
    ],
    rate: Annotated[str, typer.Option("--rate", help="Events per second, or 'max'.")] = "max",
    ts_from: Annotated[
        float | None, typer.Option("--from", help="Only events with ts >= this.")
    ] = None,
    ts_to: Annotated[float | None, typer.Option("--to", help="Only events with ts < this.")] = None,
    topic: Annotated[str | None, typer.Option("--topic", help="Default: the events topic.")] = None,
    kafka: Annotated[str | None, typer.Option("--kafka", help="Bootstrap servers.")] = None,
) -> None:
    """Produce a canonical events file into the events topic, keyed by user."""
    from sketchstream.stream.settings import load_settings

    if rate == "max":
        per_second = None
    else:
        try:
            per_second = float(rate)
        except ValueError:
            per_second = -1.0
        if not per_second > 0:
            raise typer.BadParameter(f"--rate must be a positive number or 'max', got {rate!r}")
    settings = load_settings(kafka=kafka)
    target = topic or settings.topic_events
    t0 = time.perf_counter()
    sent, skipped = asyncio.run(
        produce_events(
            file,
            bootstrap_kwargs=settings.client_kwargs(),
            topic=target,
            rate=per_second,
            ts_from=ts_from,
            ts_to=ts_to,
        )
    )
    secs = time.perf_counter() - t0
    typer.echo(
        f"sent {sent:,} events to {target!r} in {secs:.1f}s ({sent / max(secs, 1e-9):,.0f}/s)"
        + (f"; skipped {skipped:,} lines without a user" if skipped else "")
    )
