"""Records out of the worker: one closed aiokafka record batch per partition, not a ``send``
per record.

A ``send`` costs tens of microseconds a record (a future, a log call, the partitioner, and
through faust a ``FutureMessage`` queued for its producer task and a callback after); building
aiokafka batches directly costs a few. The worker sends thousands of records a batch this way:
its predictions, dead letters and answers (:func:`publish`, partitioned by key as faust's
producer partitions them) and its states' changelog (:func:`publish_to`, on the partitions the
states live in). The batches go out closed: an open one waits out the linger, and a batch's
states are written only once its predictions are acknowledged, while the next batches are
handled (measured on the local broker, 250 records: 6.5 ms median from send to acknowledgement open,
0.6 ms closed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

__all__ = ["Sent", "publish", "publish_to"]


class Sent(NamedTuple):
    """One record batch handed to the producer: its partition, how many records it holds and
    its delivery future (a ``RecordMetadata`` whose offset is the batch's first)."""

    partition: int
    records: int
    future: asyncio.Future


async def publish(
    producer: Any, topic: str, records: Sequence[tuple[bytes | None, bytes]]
) -> list[asyncio.Future]:
    """Send ``(key, value)`` records to ``topic`` through faust's ``producer``, each to the
    partition faust's partitioner gives its key (computed once per distinct key), in order
    within a partition; returns the batches' delivery futures."""
    if not records:
        return []
    from sketchstream.stream.faust_compat import aiokafka_producer  # imports faust: not at import

    kafka = aiokafka_producer(producer)  # faust's has no batch API of its own
    parts = sorted(await kafka.partitions_for(topic))
    partitioner = producer.partitioner
    partition_of: dict[bytes | None, int] = {}

    def placed() -> Iterable[tuple[int, bytes | None, bytes]]:
        for key, value in records:
            p = partition_of.get(key)
            if p is None:
                p = partition_of[key] = partitioner(key, parts, parts)
            yield p, key, value

    return [sent.future for sent in await publish_to(producer, topic, placed())]


async def publish_to(
    producer: Any, topic: str, records: Iterable[tuple[int, bytes | None, bytes]]
) -> list[Sent]:
    """Send ``(partition, key, value)`` records to ``topic`` through faust's ``producer``, in
    order within a partition: one closed batch per partition (more when one fills up)."""
    from sketchstream.stream.faust_compat import aiokafka_producer

    kafka = aiokafka_producer(producer)
    open_: dict[int, Any] = {}  # partition -> the batch being filled
    counts: dict[int, int] = {}
    sent: list[Sent] = []
    for p, key, value in records:
        batch = open_.get(p)
        if batch is None:
            batch = open_[p] = kafka.create_batch()
            counts[p] = 0
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: ship it
            sent.append(Sent(p, counts[p], await kafka.send_batch(batch, topic, partition=p)))
            batch = open_[p] = kafka.create_batch()
            batch.append(key=key, value=value, timestamp=None)
            counts[p] = 0
        counts[p] += 1
    for p, batch in open_.items():
        batch.close()  # complete: ship it now, not after the producer's linger (5 ms a batch)
        sent.append(Sent(p, counts[p], await kafka.send_batch(batch, topic, partition=p)))
    return sent
