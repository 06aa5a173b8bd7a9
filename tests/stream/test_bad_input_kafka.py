"""Hostile input against a real `sketchstream worker` on the real broker: records built to break
the validator itself (arrays nested 1,000 deep, an id of 600 characters, no key) go to the DLQ
with their reason, the worker never exits, and the good events around them are scored once."""

from __future__ import annotations

import time

import orjson
import pytest
from kafka_harness import (
    assert_same_states,
    consume,
    offline_reference,
    produce,
    run,
    synthetic_events,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

DEEP = b"[" * 1000 + b"]" * 1000  # 2 KB; orjson parses it (its own limit is 1024 levels)
DEEPER = b"[" * 1100 + b"]" * 1100  # over orjson's limit: not JSON at all


def event(user: str = "u1", **fields) -> dict:
    return {"user": user, "item": "i1", "action": "view", "ts": 1.0e9, **fields}


def with_raw(fields: bytes, raw: bytes) -> bytes:
    """A valid event's JSON with ``raw`` spliced in as the value of ``"user"`` or ``"context"``
    (orjson refuses to write such values itself)."""
    base = {"item": "i1", "action": "view", "ts": 1.0e9}
    if fields != b"user":
        base["user"] = "u1"
    return orjson.dumps(base)[:-1] + b',"' + fields + b'":' + raw + b"}"


HOSTILE = [  # (key, value, reason)
    (b"u1", DEEP, "bad_field"),
    (b"u1", with_raw(b"context", DEEP), "bad_field"),
    (b"u1", with_raw(b"user", DEEP), "bad_field"),
    (b"u1", DEEPER, "bad_json"),
    (b"u1", orjson.dumps(event(item="x" * 600)), "bad_field"),
    (None, orjson.dumps(event(user="u2")), "bad_key"),
]


def test_hostile_records_are_dead_lettered_and_never_stop_the_worker(stream_env, start_worker):
    env = stream_env
    good = synthetic_events(400, users=30, seed=11)
    keyed = [(e["user"].encode(), orjson.dumps(e)) for e in good]
    # the hostile records spread through the stream, so batches mix them with good events of
    # every partition
    pairs: list[tuple[bytes | None, bytes]] = []
    step = len(keyed) // (len(HOSTILE) + 1)
    for k, (key, value, _) in enumerate(HOSTILE):
        pairs += keyed[k * step : (k + 1) * step]
        pairs.append((key, value))
    pairs += keyed[len(HOSTILE) * step :]
    sent = run(produce(env.bootstrap, env.topics["events"], pairs))
    hostile_at = {i for i, (_, v) in enumerate(pairs) if v in {h[1] for h in HOSTILE}}
    expected_reasons = {
        sent[i]: reason for i, (_, _, reason) in zip(sorted(hostile_at), HOSTILE, strict=True)
    }
    good_refs = {sent[i] for i in range(len(pairs)) if i not in hostile_at}
    assert len({p for p, _ in good_refs}) == env.partitions, "good events on every partition"

    worker = start_worker("w1", "--batch-size", "32")
    worker.wait_healthy()
    deadline = time.monotonic() + 120
    predictions: dict[tuple[int, int], int] = {}
    while time.monotonic() < deadline:
        assert worker.proc.poll() is None, f"the worker exited:\n{worker.tail()}"
        records = run(consume(env.bootstrap, env.topics["predictions"], timeout=20))
        predictions = {}
        for r in records:
            p = orjson.loads(r.value)["event"]
            ref = (p["partition"], p["offset"])
            predictions[ref] = predictions.get(ref, 0) + 1
        if len(predictions) >= len(good_refs):
            break
        time.sleep(1.0)
    assert worker.proc.poll() is None, f"the worker exited:\n{worker.tail()}"

    dead = run(consume(env.bootstrap, env.topics["dlq"], until=len(HOSTILE), timeout=60))
    got = {
        (d["source"]["partition"], d["source"]["offset"]): d
        for d in (orjson.loads(r.value) for r in dead)
    }
    assert {ref: d["reason"] for ref, d in got.items()} == expected_reasons
    messages = [d["error"] for d in got.values()]
    assert any("'user' makes the event 1001 levels deep" in m for m in messages), messages
    assert any("'item' is 600 characters long: over the limit of 512" in m for m in messages)
    assert any("has no key" in m for m in messages), messages

    assert set(predictions) == good_refs, "every good event scored, no hostile one"
    assert set(predictions.values()) == {1}, "each exactly once"
    assert worker.metric("sketchstream_dlq_total") == len(HOSTILE)
    assert worker.stop() == 0

    # the states are those of a run that never saw the hostile records
    records = run(consume(env.bootstrap, env.topics["events"]))
    clean = [r for r in records if (r.partition, r.offset) in good_refs]
    agg, expected, _ = offline_reference(env.artifact_dir, clean)
    assert_same_states(agg, expected, env.final_states())
