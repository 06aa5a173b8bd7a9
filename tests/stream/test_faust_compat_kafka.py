"""What ``stream/faust_compat.py`` builds on faust's, mode's and aiokafka's internals works against
the installed (pinned) versions, on the real broker with a real faust app, no fake: the bulk
consumer's fetch loop delivers batches and commits them, the hand-over after a rebalance (a table
restored from its changelog, then the stream partitions resumed at their committed offsets)
delivers every record once, the RocksDB accessor reads what the table wrote, the producer
accessor sends, and both metadata fetches answer. (``BulkApp.fail``'s stop through mode's
``Worker`` is exercised on a real worker by ``test_worker_kafka.py``'s failed-batch tests.)"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka_harness import create_topics, delete_topics, produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 2


class TinyApp:
    """A :class:`~sketchstream.stream.bulk.BulkApp` as the worker builds it (its client
    settings, the hand-over recovery, a rocksdict table of raw bytes), whose batch handler
    records what it gets and writes each event's value under its key in the table."""

    def __init__(self, bootstrap: str, suffix: str, state_dir: Path) -> None:
        from sketchstream.stream.app import faust_app
        from sketchstream.stream.settings import Settings
        from sketchstream.stream.tables import UserStates

        self.topic = f"events-{suffix}"
        settings = Settings(
            kafka=bootstrap,
            app_id=f"compat-{suffix}",
            topic_events=self.topic,
            partitions=PARTITIONS,
            state_dir=state_dir,
            batch_size=64,
            commit_interval=0.5,
            fetch_max_wait=0.25,
        )
        self.app = app = faust_app(settings, web=False, bulk=True)
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        events = app.topic(self.topic, partitions=PARTITIONS, **raw)
        self.table = app.Table(
            "users",
            default=None,
            key_type=bytes,
            value_type=bytes,
            partitions=PARTITIONS,
            options={"driver": "rocksdict"},
        )
        states = UserStates(self.table)
        self.batches: list[list[tuple[int, int]]] = []
        self.handovers: list[dict[int, int | None]] = []
        app.tables.on_handover = lambda offsets: self.handovers.append(
            {tp.partition: o for tp, o in offsets.items() if tp.topic == self.topic}
        )

        async def handle(messages: list[Any]) -> None:
            self.batches.append([(m.partition, m.offset) for m in messages])
            await states.write([(m.partition, m.key, m.value) for m in messages])

        app.bulk(events, handle, size=settings.batch_size)

    def delivered(self) -> list[tuple[int, int]]:
        return [ref for batch in self.batches for ref in batch]

    async def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.delivered()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.delivered())} of {n} records delivered")
            await asyncio.sleep(0.1)


async def committed(bootstrap: str, group: str, topic: str) -> dict[int, int | None]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        await consumer.stop()


async def in_order_once(app: TinyApp, sent: list[tuple[int, int]]) -> None:
    """Every record of ``sent`` delivered exactly once, in offset order per partition."""
    got = app.delivered()
    assert sorted(got) == sorted(sent), f"{len(set(sent) - set(got))} missing"
    for p in range(PARTITIONS):
        offsets = [o for q, o in got if q == p]
        assert offsets == sorted(offsets)


@pytest.fixture
def suffix(kafka_bootstrap: str) -> Iterator[str]:
    """A name of this test's own for its topics and app id; its topics are deleted after."""
    suffix = uuid.uuid4().hex[:8]
    yield suffix
    asyncio.run(delete_topics(kafka_bootstrap, (f"events-{suffix}", f"compat-{suffix}"), suffix))


async def test_the_private_api_uses_work_against_the_pinned_faust(
    kafka_bootstrap: str, suffix: str, tmp_path: Path
):
    from aiokafka import AIOKafkaConsumer
    from sketchstream.stream.faust_compat import (
        aiokafka_producer,
        fetch_all_metadata,
        fetch_metadata,
        rocksdb_of,
    )

    topic = f"events-{suffix}"
    await create_topics(kafka_bootstrap, {topic: PARTITIONS})
    keys = [f"user-{i}".encode() for i in range(500)]
    sent = await produce(kafka_bootstrap, topic, [(k, b"first " + k) for k in keys])

    # 1. the bulk consumer: batches of what each fetch brought, committed
    first = TinyApp(kafka_bootstrap, suffix, tmp_path / "state-1")
    await first.app.start()
    try:
        await first.wait_for(len(sent))
        await in_order_once(first, sent)
        assert max(len(b) for b in first.batches) > 1, "records came one by one"
        assert first.handovers == [dict.fromkeys(range(PARTITIONS))]  # nothing committed yet
        # the fetch wait is the setting's, not faust's 1.5 s, in the fetcher that uses it
        assert first.app.consumer._thread._ensure_consumer()._fetcher._fetch_max_wait_ms == 250
        # the RocksDB accessor reads what the table wrote, in the key's partition
        for (p, _), key in zip(sent, keys, strict=True):
            assert rocksdb_of(first.table, p).get(key) == b"first " + key
        # the producer accessor sends; the metadata fetches answer
        kafka = aiokafka_producer(first.app.producer)
        meta = await kafka.send_and_wait(topic, b"from the accessor", key=b"user-x")
        sent.append((meta.partition, meta.offset))
        assert await fetch_metadata(kafka.client, [topic]) is True
        standalone = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
        await standalone.start()
        try:
            cluster = await fetch_all_metadata(standalone)
            assert cluster.partitions_for_topic(topic) == set(range(PARTITIONS))
        finally:
            await standalone.stop()
        await first.wait_for(len(sent))
    finally:
        await first.app.stop()
    ends = {p: max(o for q, o in sent if q == p) + 1 for p in range(PARTITIONS)}
    assert await committed(kafka_bootstrap, f"compat-{suffix}", topic) == ends

    # 2. the hand-over: a fresh state dir, so the table is restored from its changelog, then
    # the stream partitions resume at their committed offsets with records waiting
    more = await produce(kafka_bootstrap, topic, [(k, b"second " + k) for k in keys[:200]])
    second = TinyApp(kafka_bootstrap, suffix, tmp_path / "state-2")
    await second.app.start()
    try:
        await second.wait_for(len(more))
        await in_order_once(second, more)
        assert second.handovers[0] == ends
        for (p, _), key in zip(sent, keys, strict=False):
            expected = b"second " if key in keys[:200] else b"first "
            assert rocksdb_of(second.table, p).get(key) == expected + key
    finally:
        await second.app.stop()
