"""Top-k recommendation requests against the real broker, answered by `sketchstream worker`.

A request is keyed by its user on the recommend topic (co-partitioned with the events), read off
the state the worker holds, answered once on the recommendations topic with the model version,
and never changes the state. The answers are checked against the offline path: the recommender
of the same artifact on inputs from the offline replay (``replay_inputs``) of the same events,
the seen items from the stream itself."""

from __future__ import annotations

import shutil
import time
from collections import Counter

import numpy as np
import orjson
import pytest
from kafka_harness import (
    build_tiny_artifact,
    consume,
    create_topics,
    item_categories,
    produce,
    run,
    synthetic_events,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture
def artifact_dir(tmp_path):
    """The tiny model with a recommender."""
    root = tmp_path / "artifacts"
    build_tiny_artifact(root, recommender=True)
    return root


def keyed(records: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(r["user"].encode(), orjson.dumps(r)) for r in records]


def wait_for(predicate, timeout: float, what: str, worker) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{worker.tail()}")


def offline_answers(artifact_dir, event_records, answers):
    """Each answer recomputed offline: the artifact's recommender on the replay inputs of a
    probe event of the answer's user at its ``as_of`` (appended after the user's events, up to
    the event an answer names in ``"event"``, if any), seen items from the stream, the same
    top-k options. ``[(items, scores)]``."""
    from sketchstream.models.aggregator import Aggregator
    from sketchstream.models.artifacts import ArtifactStore
    from sketchstream.models.channels import aggregator_config_from_dict
    from sketchstream.models.events import EventTable
    from sketchstream.models.ranking import item_rows
    from sketchstream.models.recommend import replay_inputs

    bundle = ArtifactStore(artifact_dir).load()
    parts = bundle.recommender
    config = aggregator_config_from_dict(bundle.aggregator_config)
    ordered = sorted(event_records, key=lambda r: (r.partition, r.offset))  # per user in order
    events = [orjson.loads(r.value) for r in ordered]
    refs = np.array([(r.partition, r.offset) for r in ordered], np.int64).reshape(-1, 2)
    probes = [
        {"user": a["user"], "item": parts.catalogue.ids[0], "action": "view", "ts": a["as_of"]}
        for a in answers
    ]
    rows = events + probes
    table = EventTable(
        user=np.array([e["user"] for e in rows], dtype=object),
        item=np.array([e["item"] for e in rows], dtype=object),
        action=np.array([e["action"] for e in rows], dtype=object),
        ts=np.array([e["ts"] for e in rows], np.float64),
        value=np.array([e.get("value", np.nan) for e in rows], np.float32),
    )
    out = []
    n = len(events)
    for j, a in enumerate(answers):  # one probe at a time: probes must not see each other
        before = np.ones(n, bool)  # the events the answer's state holds
        if "event" in a:  # not the user's events after the one it was published after
            after = (refs[:, 0] == a["event"]["partition"]) & (refs[:, 1] > a["event"]["offset"])
            before &= ~(after & (table.user[:n] == a["user"]))
        rows = np.r_[np.flatnonzero(before), n + j]
        keep = np.zeros(len(rows), bool)
        keep[-1] = True
        sub = EventTable(**{f: getattr(table, f)[rows] for f in _COLUMNS})
        x, _ = replay_inputs(sub, Aggregator(config, bundle.codebooks), keep, parts.spec)
        seen = None
        if a["exclude_seen"]:  # every item of the user's events
            mine = item_rows(
                table.item[:n][before & (table.user[:n] == a["user"])], parts.catalogue.ids
            )
            seen = np.zeros((1, len(parts.catalogue)), bool)
            seen[0, mine[mine >= 0]] = True
        cats = a["categories"]
        wanted = parts.catalogue.candidates(cats) if cats else None
        ids, scores = parts.catalogue.top_k(
            parts.model.log_probs(x), a["k"], exclude=seen, candidates=wanted
        )
        out.append((ids[0], scores[0].tolist()))
    return out


_COLUMNS = ("user", "item", "action", "ts", "value")


def test_requests_are_answered_once_from_the_state_unchanged_and_as_offline(
    stream_env, start_worker
):
    env = stream_env
    run(create_topics(env.bootstrap, {env.topics["recommend"]: env.partitions}))
    events = synthetic_events(200, users=25, seed=5)
    per_user = Counter(e["user"] for e in events)
    assert max(per_user.values()) <= 16, "every item within the states' bounded history"
    run(produce(env.bootstrap, env.topics["events"], keyed(events)))
    worker = start_worker("w1", "--batch-size", "64")
    worker.wait_healthy()
    wait_for(
        lambda: worker.metric("sketchstream_predictions_out_total") >= len(events),
        60,
        "predictions",
        worker,
    )
    wait_for(lambda: len(env.final_states()) == len(per_user), 30, "the changelog", worker)
    changelog_before = len(run(consume(env.bootstrap, env.changelog)))
    states_before = env.final_states()

    later = max(e["ts"] for e in events) + 3600.0
    users = sorted(per_user)
    good = [
        {
            "user": u,
            "request_id": f"r{j}",
            "k": 1 + j % 7,
            "exclude_seen": j % 2 == 0,
            "ts": later + j,
        }
        for j, u in enumerate(users)
    ]
    good[1]["categories"] = ["odd"]
    good[2]["categories"] = ["even"]
    del good[3]["ts"]  # read at the request's Kafka time
    good += [{"user": "nobody", "request_id": "cold", "k": 5, "ts": later}]
    good += [dict(good[0], request_id="again")]  # the same user twice in one batch
    bad = [
        (b"u1", b'{"user": "u1", "request_id": '),
        (b"u1", orjson.dumps({"user": "u1", "request_id": "b1", "k": 0})),
        (b"u2", orjson.dumps({"user": "u1", "request_id": "b2"})),
        (b"u1", orjson.dumps({"user": "u1"})),
    ]
    reasons = ["bad_json", "bad_field", "bad_key", "missing_field"]
    sent = run(produce(env.bootstrap, env.topics["recommend"], keyed(good[:10]) + bad))
    sent += run(produce(env.bootstrap, env.topics["recommend"], keyed(good[10:])))

    got = run(consume(env.bootstrap, env.topics["recommendations"], until=len(good), timeout=45))
    answers = [orjson.loads(r.value) for r in got]
    assert Counter(a["request_id"] for a in answers) == Counter(q["request_id"] for q in good)
    dead = run(consume(env.bootstrap, env.topics["dlq"], until=len(bad), timeout=20))
    letters = {
        (d["source"]["partition"], d["source"]["offset"]): d
        for d in (orjson.loads(r.value) for r in dead)
    }
    assert {ref: d["reason"] for ref, d in letters.items()} == {
        sent[10 + k]: reasons[k] for k in range(len(bad))
    }
    assert all(d["source"]["topic"] == env.topics["recommend"] for d in letters.values())
    time.sleep(1.0)  # nothing more comes: one answer per request
    again = run(consume(env.bootstrap, env.topics["recommendations"]))
    assert len(again) == len(good)

    version = _only_version(env.artifact_dir)
    by_id = {a["request_id"]: a for a in answers}
    for q in good:
        a = by_id[q["request_id"]]
        assert a["model_version"] == version and a["user"] == q["user"]
        assert a["cold_start"] is (q["user"] == "nobody")
        assert len(a["items"]) == q["k"] == len(a["scores"])
        assert a["scores"] == sorted(a["scores"], reverse=True)
        if "ts" in q:
            assert a["as_of"] == q["ts"]
        for c in q.get("categories", ()):
            assert all(c in item_categories(i) for i in a["items"])
    assert by_id["again"]["items"] == by_id["r0"]["items"]

    # requests never touch a state
    assert len(run(consume(env.bootstrap, env.changelog))) == changelog_before
    assert env.final_states() == states_before

    # and the answers are the offline recommender's on the same events
    records = run(consume(env.bootstrap, env.topics["events"]))
    ordered = [by_id[q["request_id"]] for q in good]
    offline = offline_answers(env.artifact_dir, records, ordered)
    for a, (items, scores) in zip(ordered, offline, strict=True):
        assert a["items"] == items, a["request_id"]
        np.testing.assert_allclose(a["scores"], scores, rtol=1e-5, atol=1e-5)
    assert worker.stop() == 0


def test_recommendations_after_events_are_the_offline_answers_on_the_state_after_them(
    stream_env, start_worker
):
    env = stream_env
    events = synthetic_events(240, users=20, seed=10)
    # the offline answers exclude every item of the user's; the worker, those its bounded
    # history holds (a seed with a user of 23 events let one fall out and be recommended)
    assert max(Counter(e["user"] for e in events).values()) <= 16
    first, second = events[:120], events[120:]
    run(produce(env.bootstrap, env.topics["events"], keyed(first)))
    worker = start_worker("w1", "--batch-size", "32", "--recommend-on-event", "3")
    worker.wait_healthy()
    wait_for(
        lambda: worker.metric("sketchstream_predictions_out_total") >= len(first),
        60,
        "the first predictions",
        worker,
    )
    run(produce(env.bootstrap, env.topics["events"], keyed(second)))
    wait_for(
        lambda: worker.metric("sketchstream_predictions_out_total") >= len(events),
        60,
        "every prediction",
        worker,
    )
    wait_for(lambda: len(env.final_states()) == 20, 30, "the changelog", worker)
    assert worker.stop() == 0
    records = run(consume(env.bootstrap, env.topics["events"]))
    answers = [
        orjson.loads(r.value) for r in run(consume(env.bootstrap, env.topics["recommendations"]))
    ]
    by_ref = {(r.partition, r.offset): orjson.loads(r.value) for r in records}
    named = [(a["event"]["partition"], a["event"]["offset"]) for a in answers]
    assert len(set(named)) == len(named), "at most one answer per event"
    # every user's last event is followed by an answer (it is its user's last in its batch)
    last = {}
    for ref in sorted(by_ref):
        last[by_ref[ref]["user"]] = ref
    assert set(last.values()) <= set(named)
    assert len(answers) < len(events), "one answer per user per batch, not per event"
    assert len(answers) > len(last), "answers mid-stream too, judged on their own states"
    version = _only_version(env.artifact_dir)
    for a, ref in zip(answers, named, strict=True):
        assert a["user"] == by_ref[ref]["user"] and a["as_of"] == by_ref[ref]["ts"]
        assert a["request_id"] is None and a["model_version"] == version
        assert len(a["items"]) == 3 and a["exclude_seen"] is True
    offline = offline_answers(env.artifact_dir, records, answers)
    for a, (items, scores) in zip(answers, offline, strict=True):
        assert a["items"] == items, a["event"]
        np.testing.assert_allclose(a["scores"], scores, rtol=1e-5, atol=1e-5)


def test_a_model_without_a_recommender_dead_letters_requests_and_keeps_scoring(
    stream_env, start_worker
):
    env = stream_env
    shutil.rmtree(env.artifact_dir)
    build_tiny_artifact(env.artifact_dir)  # no recommender
    events = synthetic_events(60, users=10, seed=2)
    run(produce(env.bootstrap, env.topics["events"], keyed(events[:30])))
    worker = start_worker("w1")
    worker.wait_healthy()  # it created the recommend topic, with the events' partitions
    requests = [{"user": f"u{j}", "request_id": f"r{j}"} for j in range(5)]
    run(produce(env.bootstrap, env.topics["recommend"], keyed(requests)))
    dead = run(consume(env.bootstrap, env.topics["dlq"], until=len(requests), timeout=30))
    letters = [orjson.loads(r.value) for r in dead]
    assert [d["reason"] for d in letters] == ["no_recommender"] * len(requests)
    assert "has no recommender" in letters[0]["error"]
    run(produce(env.bootstrap, env.topics["events"], keyed(events[30:])))
    wait_for(
        lambda: worker.metric("sketchstream_predictions_out_total") >= len(events),
        30,
        "predictions after the requests",
        worker,
    )
    assert run(consume(env.bootstrap, env.topics["recommendations"], timeout=3)) == []
    parts = run(_partitions(env.bootstrap, env.topics["recommend"]))
    assert parts == env.partitions
    assert worker.stop() == 0


def _only_version(artifact_dir) -> str:
    [version] = [p.name for p in artifact_dir.iterdir() if not p.name.startswith(".")]
    return version


async def _partitions(bootstrap: str, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        return len(cluster.partitions_for_topic(topic) or ())
    finally:
        await consumer.stop()


def test_requests_on_a_recommend_topic_partitioned_unlike_the_events_are_refused(
    stream_env, start_worker
):
    env = stream_env
    run(create_topics(env.bootstrap, {env.topics["recommend"]: env.partitions // 2}))
    events = synthetic_events(40, users=8, seed=4)
    run(produce(env.bootstrap, env.topics["events"], keyed(events)))
    worker = start_worker("w1")
    worker.wait_healthy()
    requests = [{"user": f"u{j}", "request_id": f"r{j}"} for j in range(4)]
    run(produce(env.bootstrap, env.topics["recommend"], keyed(requests)))
    dead = run(consume(env.bootstrap, env.topics["dlq"], until=len(requests), timeout=30))
    letters = [orjson.loads(r.value) for r in dead]
    assert [d["reason"] for d in letters] == ["bad_partitioning"] * len(requests)
    assert f"has {env.partitions // 2} partitions" in letters[0]["error"]
    assert run(consume(env.bootstrap, env.topics["recommendations"], timeout=3)) == []
    assert worker.stop() == 0
