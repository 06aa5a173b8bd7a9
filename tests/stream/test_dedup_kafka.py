"""Deduplication by ``event_id`` against the real broker (issue 12, item 4).

A producer that retries sends the same event twice: the same ``event_id``, two records with
offsets of their own. The worker must score and fold it once, and end with the states of a run
that never saw the retry.
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import orjson
import pytest
from kafka_harness import (
    StreamEnv,
    consume,
    offline_reference,
    produce,
    run,
    synthetic_events,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _send(env: StreamEnv, events: list[dict]) -> list[tuple[int, int]]:
    return run(produce(env.bootstrap, env.topics["events"], [keyed(e) for e in events]))


def keyed(event: dict) -> tuple[bytes, bytes]:
    return event["user"].encode(), orjson.dumps(event)


def _predictions(env: StreamEnv, until: int, timeout: float = 120.0) -> list[dict]:
    """Every prediction record, once ``until`` distinct events have one (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        records = run(consume(env.bootstrap, env.topics["predictions"], timeout=30))
        out = [orjson.loads(r.value) for r in records]
        if len({(p["event"]["partition"], p["event"]["offset"]) for p in out}) >= until:
            return out
        if time.monotonic() > deadline:
            return out
        time.sleep(1.0)


def test_a_retried_event_gets_one_prediction_and_the_states_of_a_run_without_the_retry(
    stream_env, start_worker
):
    """The duplicates: events sent again right after themselves (two or three copies in a row:
    within one batch as a rule, since the worker's batches hold up to 32 records of a backlog
    that is already there), and events of a first phase sent again in a second phase, after
    the worker has folded them and written their users' states (another batch for certain:
    the retry is checked against the state read back from the table). An event of another
    user that carries an id some user already used is not a duplicate.

    What a run without the duplicates looks like: the duplicates shift the offsets of the
    records after them, so the reference is the offline replay (the same aggregator code, in
    offset order per partition) of the records the worker consumed minus the duplicates, each
    at its real offset. Every field of every user's state must equal it, but for two, checked
    apart: the last folded offset of the user's partition, which also covers the dropped
    duplicates (a duplicate is consumed: a redelivery of it is a no-op) and so is the offset of
    the user's last record; and the window of event ids, which must hold the user's event ids
    in offset order (the reference replay may run without ids).
    """
    from sketchstream.models.batches import DEDUP_WINDOW, event_id_hash

    env = stream_env
    events = synthetic_events(400, users=20, seed=11)
    # an event of another user with the id of event 20: a new event, not a duplicate
    j = next(k for k in range(30, 200) if events[k]["user"] != events[20]["user"])
    events[j] = {**events[j], "event_id": events[20]["event_id"]}

    def with_retries(part: list[dict], again: dict[int, int], later: dict[int, dict]) -> list:
        """``part`` with ``again[k]`` extra copies right after event k, and ``later[k]`` sent
        before event k; returns ``(event, is_duplicate)`` pairs."""
        out = []
        for k, e in enumerate(part):
            if k in later:
                out.append((later[k], True))
            out.append((e, False))
            out += [(e, True)] * again.get(k, 0)
        return out

    first, second = events[:200], events[200:]
    phase1 = with_retries(first, {10: 1, 30: 2, 60: 1, 110: 1, 160: 1}, {})
    phase2 = with_retries(
        second,
        {50: 1, 100: 1},
        {20: first[5], 90: first[70], 150: first[150], 180: second[10]},
    )
    worker = start_worker("w1", "--batch-size", "32")
    worker.wait_healthy()
    sent1 = _send(env, [e for e, _ in phase1])
    done = _predictions(env, until=len(first))
    assert len(done) >= len(first), worker.tail()  # phase 1 folded, its states written
    sent2 = _send(env, [e for e, _ in phase2])
    sent = sent1 + sent2
    flags = [dup for _, dup in phase1 + phase2]
    originals = [e for e, dup in phase1 + phase2 if not dup]
    dup_refs = {ref for ref, dup in zip(sent, flags, strict=True) if dup}
    assert len(dup_refs) == 12 and len(originals) == len(events)
    # every partition ends with an original: once all originals are scored, all is consumed
    last = {}
    for ref in sent:
        last[ref[0]] = max(last.get(ref[0], ref), ref)
    assert not set(last.values()) & dup_refs

    predictions = _predictions(env, until=len(originals))
    by_event = Counter((p["user"], p["event"]["event_id"]) for p in predictions)
    assert by_event == Counter((e["user"], e["event_id"]) for e in originals), "one each"
    refs = {(p["event"]["partition"], p["event"]["offset"]) for p in predictions}
    assert not refs & dup_refs, "no duplicate is scored"
    assert worker.metric("sketchstream_events_duplicate_total") == len(dup_refs)
    assert worker.stop() == 0  # flushes the changelog

    records = run(consume(env.bootstrap, env.topics["events"]))
    clean = [r for r in records if (r.partition, r.offset) not in dup_refs]
    agg, expected, offline = offline_reference(env.artifact_dir, clean)
    assert refs == set(offline)
    for p in predictions:
        ref = (p["event"]["partition"], p["event"]["offset"])
        online = np.array(list(p["scores"].values()))
        np.testing.assert_allclose(online, offline[ref], atol=1e-5, err_msg=str(ref))

    actual = env.final_states()
    users = sorted(expected)
    assert sorted(actual) == users
    want = agg.load([expected[u] for u in users])
    got = agg.load([actual[u] for u in users])
    for name, a in want._arrays().items():
        if name in ("partitions", "offsets", "id_len", "id_hash"):
            continue
        b = getattr(got, name)
        if name in ("sketches", "hist_weight"):  # float32 sums in another batch order
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)
    ids: dict[str, list[str]] = {u: [] for u in users}
    last_offset: dict[str, tuple[int, int]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        user = r.key.decode()
        last_offset[user] = (r.partition, r.offset)
        if (r.partition, r.offset) not in dup_refs:
            ids[user].append(orjson.loads(r.value)["event_id"])
    for row, user in enumerate(users):
        folded = {
            (int(p), int(o)) for p, o in zip(got.partitions[row], got.offsets[row], strict=True)
        }
        assert folded - {(-1, -1)} == {last_offset[user]}, user
        window = got.id_hash[row, : got.id_len[row]].tolist()
        assert window == event_id_hash(ids[user][-DEDUP_WINDOW:]).tolist(), user
