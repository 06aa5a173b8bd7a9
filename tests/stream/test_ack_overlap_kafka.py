"""The worker scores a batch while the one before it waits for its acknowledgement (issue 16),
against the real broker.

The predictions topic is deleted under a running worker (the broker creates no topic on its
own): its produce requests are answered ``UNKNOWN_TOPIC_OR_PARTITION`` and retried, so the
batches it scores next are never acknowledged. It is killed there, between their processing
and their acknowledgement; the topic comes back and the worker restarts.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from kafka_harness import (
    StreamEnv,
    assert_same_states,
    consume,
    offline_reference,
    produce,
    run,
    synthetic_events,
)
from test_worker_kafka import keyed, predictions_by_ref, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def _drop_and_create(bootstrap: str, topic: str, partitions: int, *, create: bool) -> None:
    """Delete ``topic`` (``create`` False) or create it again, once the broker has it gone."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if not create:
            await admin.delete_topics([topic])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if create:
                try:
                    await admin.create_topics([NewTopic(topic, partitions, 1)])
                    return
                except TopicAlreadyExistsError:  # its deletion is still under way
                    pass
            elif topic not in await admin.list_topics():
                return
            await asyncio.sleep(0.5)
        raise AssertionError(f"topic {topic} not {'created' if create else 'deleted'} in 60 s")
    finally:
        await admin.close()


async def _committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets on ``topic``'s partitions."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {
        tp.partition: meta.offset
        for tp, meta in offsets.items()
        if tp.topic == topic and meta.offset >= 0
    }


def test_a_worker_killed_before_its_predictions_are_acknowledged_loses_and_refolds_nothing(
    stream_env: StreamEnv, start_worker
):
    """Before the kill: two batches scored (the second from the states the first one staged,
    then waiting for it), no third one, and since no prediction of theirs was acknowledged,
    not one of their states in the changelog and no offset of theirs committed. After the
    restart: one prediction per event, each the offline replay's score (every batch read the
    states the batches before it left, staged or stored), and the offline replay's states (no
    event lost, none folded twice)."""
    env = stream_env
    predictions = env.topics["predictions"]
    events = synthetic_events(600, users=12, seed=5)  # ~3 events of a user in each batch of 40
    worker = start_worker("w1", "--batch-size", "40")
    worker.wait_healthy()
    [first] = run(produce(env.bootstrap, env.topics["events"], keyed(events[:1])))
    assert len(run(consume(env.bootstrap, predictions, until=1))) == 1
    time.sleep(2.5)  # past a commit interval: the first event's offset is committed
    committed = run(_committed(env.bootstrap, env.app_id, env.topics["events"]))
    assert committed == {first[0]: first[1] + 1}
    run(_drop_and_create(env.bootstrap, predictions, env.partitions, create=False))

    run(produce(env.bootstrap, env.topics["events"], keyed(events[1:])))
    batches = "sketchstream_batch_size_count"
    wait_for(lambda: worker.metric(batches) >= 3, 120, "two more batches scored", worker)
    time.sleep(3.0)  # time enough for a write, a commit or another batch that must not come
    assert worker.metric(batches) == 3
    assert worker.metric("sketchstream_predictions_out_total") == 1
    assert len(run(consume(env.bootstrap, env.changelog, timeout=5))) == 1  # the first user's
    assert run(_committed(env.bootstrap, env.app_id, env.topics["events"])) == committed
    worker.kill()

    run(_drop_and_create(env.bootstrap, predictions, env.partitions, create=True))
    worker = start_worker("w1", "--batch-size", "40")
    worker.wait_healthy()
    by_ref = predictions_by_ref(env, until=len(events) - 1)
    assert worker.stop() == 0  # flushes the changelog

    records = run(consume(env.bootstrap, env.topics["events"]))
    agg, expected, offline = offline_reference(env.artifact_dir, records, batch=997)
    assert set(by_ref) == set(offline) - {first}, "every later event has a prediction"
    for ref, preds in by_ref.items():
        assert len(preds) == 1, f"{ref}: {len(preds)} predictions"
        online = np.array(list(preds[0]["scores"].values()))
        np.testing.assert_allclose(online, offline[ref], atol=1e-5, err_msg=str(ref))
    assert_same_states(agg, expected, env.final_states())
