"""The per-batch logic without a broker: a real tiny model, states in a dict."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from kafka_harness import build_tiny_artifact, synthetic_events
from sketchstream.stream.metrics import WorkerMetrics
from sketchstream.stream.models_feed import load_serving_model
from sketchstream.stream.records import RawMessage
from sketchstream.stream.worker import BatchProcessor


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return load_serving_model(root / build_tiny_artifact(root))


def messages(events, start=0):
    return [
        RawMessage("events", 0, start + k, e["user"].encode(), orjson.dumps(e), 1.0)
        for k, e in enumerate(events)
    ]


def processor(model, store):
    def read(partitions, keys):
        return [store.get((p, k)) for p, k in zip(partitions, keys, strict=True)]

    return BatchProcessor(model, read, metrics=WorkerMetrics())


def apply(store, result):
    for p, key, value in result.table_writes:
        store[(p, key)] = value


def test_every_valid_event_gets_one_prediction_and_every_user_one_write(model):
    store = {}
    events = synthetic_events(50, users=7)
    result = processor(model, store).process(messages(events))
    assert len(result.predictions) == 50
    assert sorted(k for _, k, _ in result.table_writes) == sorted(
        {e["user"].encode() for e in events}
    )
    first = orjson.loads(result.predictions[0][1])
    assert first["model_version"] == model.version
    assert set(first["scores"]) == set(model.heads)


def test_redelivered_events_get_no_prediction_and_fold_nothing(model):
    store = {}
    proc = processor(model, store)
    msgs = messages(synthetic_events(40, users=5))
    apply(store, proc.process(msgs))
    before = dict(store)
    again = proc.process(msgs[10:30])
    assert again.predictions == []
    apply(store, again)  # rewritten (so a lost changelog write heals), but unchanged
    assert store == before
    assert proc.metrics.redelivered._value.get() == 20


def test_scores_do_not_depend_on_how_the_stream_is_cut_into_batches(model):
    msgs = messages(synthetic_events(120, users=9))
    whole, cut = {}, {}
    a = processor(model, whole).process(msgs)
    apply(whole, a)
    proc = processor(model, cut)
    parts = []
    for start in range(0, 120, 17):
        r = proc.process(msgs[start : start + 17])
        apply(cut, r)
        parts.extend(r.predictions)

    def scores(preds):
        return np.array([list(orjson.loads(v)["scores"].values()) for _, v in preds])

    np.testing.assert_allclose(scores(parts), scores(a.predictions), atol=1e-5)


def test_bad_events_become_dead_letters_and_the_rest_is_scored(model):
    store = {}
    msgs = messages(synthetic_events(5, users=2))
    msgs.insert(2, RawMessage("events", 0, 99, b"u1", b"{nope", 1.0))
    result = processor(model, store).process(msgs)
    assert len(result.predictions) == 5
    [(key, letter)] = result.dlq
    assert key == b"u1" and orjson.loads(letter)["reason"] == "bad_json"


def test_a_swapped_model_serves_from_the_next_batch(model, tmp_path):
    other = load_serving_model(tmp_path / build_tiny_artifact(tmp_path, seed=5))
    store = {}
    proc = processor(model, store)
    msgs = messages(synthetic_events(20, users=3))
    apply(store, proc.process(msgs[:10]))
    proc.swap(other)
    result = proc.process(msgs[10:])
    assert {orjson.loads(v)["model_version"] for _, v in result.predictions} == {other.version}
    assert proc.metrics.model_swaps._value.get() == 1
