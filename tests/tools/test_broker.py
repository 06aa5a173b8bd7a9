"""The local broker serves real Kafka clients; missing Java or Maven is named, not a traceback."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from sketchstream.stream.settings import Settings
from sketchstream.tools.broker import LocalBroker, MissingTool, find_java


@pytest.mark.kafka
async def test_consumer_in_group_resumes_at_the_committed_offset(kafka_settings, make_topic):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = make_topic(partitions=1)
    kwargs = kafka_settings.client_kwargs()
    producer = AIOKafkaProducer(**kwargs, acks="all")
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=b"user-1")
    finally:
        await producer.stop()

    group = f"group-{uuid.uuid4().hex[:8]}"
    tp = TopicPartition(topic, 0)

    def consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic, **kwargs, group_id=group, auto_offset_reset="earliest", enable_auto_commit=False
        )

    first = consumer()
    await first.start()
    try:
        seen = []
        while len(seen) < 4:
            batch = await asyncio.wait_for(first.getmany(tp, max_records=4 - len(seen)), 30)
            seen += batch.get(tp, [])
        await first.commit({tp: seen[-1].offset + 1})
    finally:
        await first.stop()
    assert [m.value for m in seen] == [b"v0", b"v1", b"v2", b"v3"]

    second = consumer()
    await second.start()
    try:
        resumed = await asyncio.wait_for(second.getone(tp), 30)
        committed = await second.committed(tp)
    finally:
        await second.stop()
    assert (resumed.offset, resumed.value, committed) == (4, b"v4", 4)


def test_missing_java_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(MissingTool, match=r"Java .*install .*openjdk-17"):
        find_java()


def test_missing_maven_names_what_to_install(monkeypatch, tmp_path):
    broker = LocalBroker(Settings(home=tmp_path / "empty-home"))  # no jars cached there
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingTool, match=r"Maven \(mvn\).*install Maven"):
        broker.resolve()


def test_jar_cache_and_data_live_under_home(tmp_path):
    broker = LocalBroker(Settings(home=tmp_path / "home"))
    assert broker.libs_dir.is_relative_to(tmp_path / "home")
    assert broker.data_dir == tmp_path / "home" / "kafka" / "data"
    assert LocalBroker(Settings(), data_dir=tmp_path / "d").pid_path.parent == tmp_path / "d"


def test_a_lease_shows_this_process_as_a_user_to_others(tmp_path):
    broker = LocalBroker(Settings(home=tmp_path), data_dir=tmp_path / "data")
    with broker.lease():
        assert (broker.lease_dir / str(os.getpid())).exists()
        assert broker.users() == []  # a process does not count itself
    stale = broker.lease_dir / "999999999"  # no such pid: removed when seen
    stale.touch()
    assert broker.users() == []
    assert not stale.exists()
