"""Recommendations published after events (``recommend_on_event``), without a broker: a real
tiny model with a recommender, states in a dict. One answer per user with a scored event in a
batch, from the state the batch leaves, read at the time of the user's last scored event."""

from __future__ import annotations

import dataclasses
import logging

import orjson
import pytest
from kafka_harness import build_tiny_artifact, synthetic_events
from sketchstream.stream.models_feed import load_serving_model
from test_batch_processor import apply, by_ref, messages, processor_for, raising_at


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return load_serving_model(root / build_tiny_artifact(root, recommender=True))


def answers(result):
    return [orjson.loads(v) for _, v in result.recommendations]


def last_event_of_each_user(events, offsets):
    """``{user: offset}`` of each user's last event among ``offsets``."""
    return {events[o]["user"]: o for o in sorted(offsets)}


def test_off_by_default_no_recommendations_are_published(model):
    result = processor_for(model, {}).process(messages(synthetic_events(30, users=4)))
    assert len(result.predictions) == 30
    assert result.recommendations == []


def test_each_user_gets_one_answer_from_the_state_after_their_last_event_of_the_batch(model):
    store = {}
    events = synthetic_events(80, users=9, seed=3)
    proc = processor_for(model, store, recommend_on_event=4)
    result = proc.process(messages(events))
    apply(store, result)
    got = answers(result)
    want = last_event_of_each_user(events, range(len(events)))
    assert {a["user"]: a["event"]["offset"] for a in got} == want
    assert len(got) == len(want), "one answer per user"
    assert [a["event"]["offset"] for a in got] == sorted(want.values()), "in event order"
    for a in got:
        assert a["request_id"] is None and "request" not in a
        assert a["k"] == 4 == len(a["items"]) == len(a["scores"])
        assert a["exclude_seen"] is True and a["cold_start"] is False
        assert a["model_version"] == model.version
        assert a["event"]["topic"] == "events" and a["event"]["partition"] == 0
        assert a["as_of"] == events[a["event"]["offset"]]["ts"]
        # the recommender's own answer on the state the batch wrote, at that time
        [r] = model.recommender.recommend(
            [store[(0, a["user"].encode())]], [a["as_of"]], k=[4], exclude_seen=[True]
        )
        assert a["items"] == list(r.items)
        assert a["scores"] == pytest.approx([float(s) for s in r.scores], rel=1e-5, abs=1e-5)
        mine = {e["item"] for e in events if e["user"] == a["user"]}
        assert not mine & set(a["items"]), "seen items excluded"


def test_keep_seen_leaves_the_users_items_in(model):
    events = synthetic_events(40, users=3, seed=8)
    result = processor_for(model, {}, recommend_on_event=60, recommend_exclude_seen=False).process(
        messages(events)
    )
    catalogue = set(model.recommender.catalogue.ids)
    assert len(catalogue) == 60
    for a in answers(result):
        assert a["exclude_seen"] is False
        mine = {e["item"] for e in events if e["user"] == a["user"]} & catalogue
        assert mine <= set(a["items"]), "the whole catalogue ranked, seen items included"


def test_redelivered_events_bring_no_answer(model):
    store = {}
    proc = processor_for(model, store, recommend_on_event=3)
    msgs = messages(synthetic_events(40, users=5))
    apply(store, proc.process(msgs))
    again = proc.process(msgs[:25])  # folded already: no prediction, so no answer either
    assert again.predictions == [] and again.recommendations == []


def test_an_isolated_event_is_not_the_one_answered_after(model):
    events = synthetic_events(60, users=6, seed=2)
    bad = {59, 58}  # the batch's last events: their users' answers come after earlier ones
    result = processor_for(raising_at(model, bad), {}, recommend_on_event=2).process(
        messages(events)
    )
    assert len(result.dlq) == 2
    got = {a["user"]: a["event"]["offset"] for a in answers(result)}
    assert got == last_event_of_each_user(events, set(range(60)) - bad)


def test_a_model_without_a_recommender_publishes_none_and_says_so_once(tmp_path, caplog):
    plain = load_serving_model(tmp_path / build_tiny_artifact(tmp_path))
    proc = processor_for(plain, {}, recommend_on_event=5)
    with caplog.at_level(logging.WARNING, logger="sketchstream.stream.worker"):
        for start in (0, 30):
            result = proc.process(messages(synthetic_events(30, users=4, seed=start), start))
            assert len(result.predictions) == 30 and result.recommendations == []
    warned = [r for r in caplog.records if "has no recommender" in r.getMessage()]
    assert len(warned) == 1
    assert plain.version in warned[0].getMessage()


class RaisingRecommender:
    def __init__(self, inner):
        self.inner = inner

    def recommend(self, *args, **kwargs):
        raise RuntimeError("catalogue gone")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_recommender_that_raises_costs_the_answers_not_the_predictions(model, caplog):
    broken = dataclasses.replace(model, recommender=RaisingRecommender(model.recommender))
    store, reference = {}, {}
    events = synthetic_events(30, users=4)
    with caplog.at_level(logging.WARNING, logger="sketchstream.stream.worker"):
        result = processor_for(broken, store, recommend_on_event=3).process(messages(events))
    plain = processor_for(model, reference).process(messages(events))
    assert by_ref(result).keys() == by_ref(plain).keys() and result.dlq == []
    for ref, scores in by_ref(plain).items():
        assert by_ref(result)[ref].tolist() == scores.tolist()
    assert result.table_writes == plain.table_writes
    assert result.recommendations == []
    assert any("catalogue gone" in r.getMessage() for r in caplog.records)
