"""The per-batch logic without a broker: a real tiny model, states in a dict."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest
from kafka_harness import assert_same_states, build_tiny_artifact, synthetic_events
from sketchstream.models.errors import ArtifactError
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


def test_each_step_of_a_batch_is_timed_in_the_metrics_stages(model):
    proc = processor(model, {})
    proc.process(messages(synthetic_events(40, users=5)))
    spent = proc.metrics.stages.ns
    steps = ("decode", "state_read", "fold", "item_features", "mlp", "state_encode")
    assert all(spent[s] > 0 for s in (*steps, "predictions_encode")), spent
    assert spent["fetch"] == spent["send"] == 0  # the Kafka side's: the app times those


def test_the_live_auc_of_each_head_is_on_the_metrics_as_labels_arrive(model):
    from sketchstream.models.metrics import roc_auc

    proc = processor(model, {})
    events = synthetic_events(300, users=8)
    result = proc.process(messages(events))
    now = proc.live.snapshot()["heads"]
    assert list(now) == list(model.heads)
    # the like head labels each rating itself: the rolling AUC is the AUC of these predictions
    scores = [orjson.loads(v)["scores"]["like"] for _, v in result.predictions]
    rated = [
        (s, e["value"] >= 4) for s, e in zip(scores, events, strict=True) if e["action"] == "rate"
    ]
    p, y = (np.array(c) for c in zip(*rated, strict=True))
    assert now["like"]["labelled"] == len(rated) > 0
    assert now["like"]["auc"] == pytest.approx(roc_auc(y, p))
    body = proc.metrics.render()[0].decode()
    assert 'sketchstream_live_auc{head="like"}' in body
    assert "sketchstream_live_hr10" in body and 'stage="live_quality"' in body


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


# --- the processing-error policy (on_error) ------------------------------------------------


class RaisingAggregator:
    """The model's aggregator, except that scoring a batch holding one of the chosen source
    offsets raises ``error`` (a bug met only by that event's data)."""

    def __init__(self, inner, offsets, error=None):
        self.inner, self.offsets = inner, set(offsets)
        self.error = ValueError("boom") if error is None else error

    def score_then_fold(self, state, batch, **kwargs):
        if self.offsets & set(batch.offset.tolist()):
            raise self.error
        return self.inner.score_then_fold(state, batch, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class RaisingScorer:
    """The model's scorer, except that scoring one of the chosen items raises (in building
    the MLP's inputs: the worker calls that, then the MLP)."""

    def __init__(self, inner, items):
        self.inner, self.items = inner, set(items)

    def inputs(self, features, items, ts, **kwargs):
        if self.items & set(items.tolist()):
            raise RuntimeError(f"no score for {sorted(self.items)}")
        return self.inner.inputs(features, items, ts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def raising_at(model, offsets, error=None):
    return dataclasses.replace(
        model, aggregator=RaisingAggregator(model.aggregator, offsets, error)
    )


def processor_for(model, store, **kwargs):
    def read(partitions, keys):
        return [store.get((p, k)) for p, k in zip(partitions, keys, strict=True)]

    return BatchProcessor(model, read, metrics=WorkerMetrics(), **kwargs)


def by_ref(result):
    return {
        (p["event"]["partition"], p["event"]["offset"]): np.array(list(p["scores"].values()))
        for p in (orjson.loads(v) for _, v in result.predictions)
    }


def states_of(store):
    return {key.decode(): blob for (_, key), blob in store.items()}


def test_an_event_whose_scoring_raises_is_dead_lettered_as_processing_error(model):
    msgs = messages(synthetic_events(60, users=7))
    result = processor_for(raising_at(model, {23}), {}).process(msgs)
    [(key, letter)] = result.dlq
    dead = orjson.loads(letter)
    assert dead["reason"] == "processing_error"
    assert key == msgs[23].key
    assert dead["source"]["offset"] == 23
    assert len(result.predictions) == 59


def test_the_processing_error_dead_letter_names_the_exception_and_the_source(model):
    msgs = messages(synthetic_events(20, users=3))
    error = KeyError("item vanished")
    result = processor_for(raising_at(model, {5}, error), {}).process(msgs)
    [(_, letter)] = result.dlq
    text = orjson.loads(letter)["error"]
    assert "events[0]@5" in text
    assert "KeyError: 'item vanished'" in text


def test_the_rest_of_a_batch_scores_and_folds_as_if_the_raising_events_were_not_there(model):
    events = synthetic_events(90, users=8, seed=4)
    bad = {0, 31, 32, 89}  # the first, two adjacent ones, the last
    with_bad, without = {}, {}
    result = processor_for(raising_at(model, bad), with_bad).process(messages(events))
    apply(with_bad, result)
    clean = [m for m in messages(events) if m.offset not in bad]
    reference = processor_for(model, without).process(clean)
    apply(without, reference)

    assert sorted(orjson.loads(v)["source"]["offset"] for _, v in result.dlq) == sorted(bad)
    got, want = by_ref(result), by_ref(reference)
    assert list(got) == list(want), "the same events scored, in the same order"
    for ref in want:
        np.testing.assert_allclose(got[ref], want[ref], atol=1e-5, err_msg=str(ref))
    assert_same_states(model.aggregator, states_of(without), states_of(with_bad))


def test_an_exception_in_the_mlp_is_isolated_like_one_in_the_aggregator(model):
    events = synthetic_events(40, users=5)
    item = events[7]["item"]
    broken = dataclasses.replace(model, scorer=RaisingScorer(model.scorer, {item}))
    result = processor_for(broken, {}).process(messages(events))
    refused = {orjson.loads(v)["source"]["offset"] for _, v in result.dlq}
    assert refused == {k for k, e in enumerate(events) if e["item"] == item}
    assert len(result.predictions) == len(events) - len(refused)


def test_a_user_whose_only_events_raised_gets_no_state(model):
    events = synthetic_events(30, users=4)
    events[12] = {**events[12], "user": "lonely"}
    result = processor_for(raising_at(model, {12}), {}).process(messages(events))
    assert b"lonely" not in {key for _, key, _ in result.table_writes}
    assert len(result.table_writes) == len({e["user"] for e in events}) - 1


def test_processing_errors_are_counted_in_the_dlq_metric(model):
    proc = processor_for(raising_at(model, {3, 4}), {})
    proc.process(messages(synthetic_events(10, users=2)))
    assert proc.metrics.dlq.labels(reason="processing_error")._value.get() == 2


def test_on_error_fail_lets_the_exception_leave_process(model):
    proc = processor_for(raising_at(model, {3}), {}, on_error="fail")
    with pytest.raises(ValueError, match="boom"):
        proc.process(messages(synthetic_events(10, users=2)))


def test_a_memory_error_stops_the_batch_whatever_on_error_says(model):
    proc = processor_for(raising_at(model, {3}, MemoryError()), {}, on_error="dead_letter")
    with pytest.raises(MemoryError):
        proc.process(messages(synthetic_events(10, users=2)))


def test_a_full_disk_stops_the_batch_whatever_on_error_says(model):
    disk_full = OSError(28, "No space left on device")
    proc = processor_for(raising_at(model, {3}, disk_full), {}, on_error="dead_letter")
    with pytest.raises(OSError, match="No space left"):
        proc.process(messages(synthetic_events(10, users=2)))


def test_an_unreadable_stored_state_stops_the_batch_whatever_on_error_says(model):
    events = synthetic_events(10, users=2)
    store = {(0, events[0]["user"].encode()): b"\x00 not a state"}
    proc = processor_for(model, store, on_error="dead_letter")
    with pytest.raises(ArtifactError, match="unreadable bytes"):
        proc.process(messages(events))


def test_a_failing_state_store_stops_the_batch_whatever_on_error_says(model):
    def read(partitions, keys):
        raise OSError("rocksdb: IO error")

    proc = BatchProcessor(model, read, on_error="dead_letter")
    with pytest.raises(OSError, match="rocksdb"):
        proc.process(messages(synthetic_events(10, users=2)))


def test_an_event_without_a_key_is_dead_lettered_as_bad_key(model):
    msgs = messages(synthetic_events(5, users=2))
    msgs[2] = msgs[2]._replace(key=None)
    result = processor(model, {}).process(msgs)
    [(key, letter)] = result.dlq
    assert key is None and orjson.loads(letter)["reason"] == "bad_key"
    assert len(result.predictions) == 4
