"""Live quality: rolling AUC per head and HR@10 of recommendations, from labels that arrive
on the stream (issue 15, item 4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sketchstream.models import live_quality
from sketchstream.models.events import EventTable, Head, labels
from sketchstream.models.live_quality import LiveQuality, LiveQualityError
from sketchstream.models.metrics import roc_auc

LIKE = Head("like", ("rate",), threshold=4.0)
RETURN = Head("return", (), horizon=100.0)


def feed(live, events, partitions=None):
    """``events``: (user, item, action, value, ts, scores...) tuples, one batch."""
    users, items, actions, values, ts = (
        list(c) for c in zip(*(e[:5] for e in events), strict=True)
    )
    scores = np.array([e[5:] for e in events], dtype=np.float64)
    live.observe(users, items, actions, values, ts, scores, partitions)


def returns(live, *events, partitions=None):
    """Feed ``(user, ts, score)`` events to a tracker of RETURN alone; its figures after."""
    feed(live, [(u, "i", "view", math.nan, t, s) for u, t, s in events], partitions)
    return live.snapshot()["heads"]["return"]


def random_ratings(rng, n, users=20):
    user = [f"u{k}" for k in rng.integers(0, users, n)]
    value = rng.integers(1, 6, n).astype(float)
    ts = np.sort(rng.uniform(0, 10_000, n))
    score = np.clip(value / 5 + rng.normal(0, 0.4, n), 0, 1)  # informative, with ties
    return user, value, ts, np.round(score, 2)


# --- engagement heads ----------------------------------------------------------------------------


@pytest.mark.parametrize("flush_every", [4096, 50])  # labelled at each read; also between
def test_rolling_auc_is_roc_auc_over_the_last_window_as_it_slides(monkeypatch, flush_every):
    monkeypatch.setattr(live_quality, "FLUSH_EVENTS", flush_every)
    rng = np.random.default_rng(0)
    user, value, ts, score = random_ratings(rng, 700)
    live = LiveQuality([LIKE], window=150)
    start = 0
    for size in rng.integers(1, 90, 40):  # batches of every size, some larger than a step
        rows = slice(start, min(start + size, 700))
        start = rows.stop
        batch = [
            (user[i], f"i{i}", "rate", value[i], ts[i], score[i])
            for i in range(rows.start, rows.stop)
        ]
        if batch:
            feed(live, batch)
        y = (value[:start] >= 4)[-150:]
        got = live.snapshot()["heads"]["like"]
        assert got["n"] == len(y) and got["positives"] == int(y.sum())
        assert got["labelled"] == start
        assert got["auc"] == pytest.approx(roc_auc(y, score[:start][-150:]), abs=1e-12)
    assert start == 700


def test_a_batch_larger_than_the_window_keeps_its_newest_labels():
    live = LiveQuality([LIKE], window=4)
    values = [5, 5, 1, 1, 5, 1, 5, 1]
    scores = [0.1, 0.1, 0.9, 0.9, 0.9, 0.1, 0.8, 0.2]  # the last four: perfectly ranked
    feed(
        live,
        [("u", "i", "rate", v, k, s) for k, (v, s) in enumerate(zip(values, scores, strict=True))],
    )
    like = live.snapshot()["heads"]["like"]
    assert (like["auc"], like["n"], like["positives"], like["labelled"]) == (1.0, 4, 2, 8)


def test_events_a_head_does_not_label_stay_out_of_its_window():
    live = LiveQuality([LIKE])
    feed(live, [("u", "a", "view", math.nan, 1.0, 0.9), ("u", "b", "rate", math.nan, 2.0, 0.9)])
    assert live.snapshot()["heads"]["like"]["n"] == 0  # not a rating; a rating without value


def test_auc_is_nan_until_the_window_holds_both_classes():
    live = LiveQuality([LIKE])
    feed(live, [("u", "a", "rate", 5.0, 1.0, 0.2), ("u", "b", "rate", 4.0, 2.0, 0.7)])
    assert math.isnan(live.snapshot()["heads"]["like"]["auc"])
    feed(live, [("u", "c", "rate", 1.0, 3.0, 0.1)])
    assert live.snapshot()["heads"]["like"]["auc"] == 1.0


def test_scores_of_another_shape_are_refused_naming_the_heads():
    live = LiveQuality([LIKE, RETURN])
    with pytest.raises(LiveQualityError, match=r"shape \(1, 1\), expected \(1, 2\).*like, return"):
        live.observe(["u"], ["i"], ["rate"], [5.0], [1.0], np.array([[0.5]]))


# --- return heads --------------------------------------------------------------------------------


def test_the_next_event_within_the_horizon_labels_a_prediction_positive():
    live = LiveQuality([RETURN])
    got = returns(live, ("u", 0.0, 0.8), ("u", 100.0, 0.3))  # exactly the horizon later: in
    assert (got["labelled"], got["positives"], got["pending"]) == (1, 1, 1)


def test_a_next_event_after_the_horizon_labels_it_negative():
    live = LiveQuality([RETURN])
    got = returns(live, ("u", 0.0, 0.8), ("u", 100.5, 0.3))
    assert (got["labelled"], got["positives"], got["pending"]) == (1, 0, 1)


def test_the_watermark_passing_the_horizon_labels_it_negative():
    live = LiveQuality([RETURN])
    got = returns(live, ("u", 0.0, 0.8), ("v", 100.0, 0.3))
    assert (got["labelled"], got["pending"]) == (0, 2)  # at the deadline: v's could still come
    got = returns(live, ("w", 100.5, 0.5))
    assert (got["labelled"], got["positives"], got["pending"]) == (1, 0, 2)


def test_another_partitions_watermark_does_not_close_a_prediction():
    live = LiveQuality([RETURN])
    got = returns(live, ("u", 0.0, 0.8), ("v", 500.0, 0.3), ("w", 10.0, 0.5), partitions=[0, 1, 0])
    assert (got["labelled"], got["pending"]) == (0, 3)  # partition 1 ran ahead, 0 is at 10
    got = returns(live, ("u", 50.0, 0.4), partitions=[0])
    assert (got["labelled"], got["positives"]) == (1, 1)


def test_a_next_event_stamped_earlier_labels_positive_as_the_trainer_does():
    events = [("u", 10.0, 0.8), ("u", 4.0, 0.3), ("v", 200.0, 0.5)]  # u's gap: -6 s
    live = LiveQuality([RETURN])
    got = returns(live, *events)
    table = EventTable(
        user=np.array([e[0] for e in events], dtype=object),
        item=np.array(["i"] * 3, dtype=object),
        action=np.array(["view"] * 3, dtype=object),
        ts=np.array([e[1] for e in events]),
        value=np.full(3, np.nan, dtype=np.float32),
    )
    trainer = labels(table, [RETURN])[:, 0]
    assert trainer[:2].tolist() == [1.0, 0.0] and math.isnan(trainer[2])
    assert (got["labelled"], got["positives"], got["pending"]) == (2, 1, 1)


def test_an_event_later_than_the_horizon_gets_no_label_and_is_counted_late():
    live = LiveQuality([RETURN])
    got = returns(live, ("u", 0.0, 0.8), ("v", 500.0, 0.5), ("u", 300.0, 0.1))
    # u's first prediction: closed by the watermark at 500; u's late event (its own window
    # ended at 400 < 500) is not pending, and does not reopen the closed one
    assert (got["labelled"], got["positives"], got["late"], got["pending"]) == (1, 0, 1, 1)


def test_late_event_still_resolves_its_users_open_prediction():
    live = LiveQuality([RETURN])
    got = returns(live, ("v", 150.0, 0.5), ("u", 100.0, 0.8), ("u", 20.0, 0.1))
    # u at 100 is open (deadline 200 > watermark 150); u at 20 is late (120 < 150) but is
    # u's next event, 80 s earlier: a return
    assert (got["labelled"], got["positives"], got["late"], got["pending"]) == (1, 1, 1, 1)


def test_live_return_labels_are_the_trainers_where_it_labels():
    rng = np.random.default_rng(1)
    n = 600
    user = [f"u{k}" for k in rng.integers(0, 30, n)]
    ts = np.sort(rng.uniform(0, 20_000, n))
    score = rng.permutation(n) / n  # distinct: each label's score names its event
    live = LiveQuality([RETURN], window=n)
    for start in range(0, n, 64):
        stop = min(start + 64, n)
        returns(live, *zip(user[start:stop], ts[start:stop], score[start:stop], strict=True))
    # a plain reference: the next event of the same user, or the watermark past the horizon
    expected = {}
    for i in range(n):
        later = [j for j in range(i + 1, n) if user[j] == user[i]]
        if later:
            expected[score[i]] = ts[later[0]] - ts[i] <= RETURN.horizon
        elif ts[i] + RETURN.horizon < ts[-1]:
            expected[score[i]] = False
    got = live.snapshot()["heads"]["return"]
    y = np.array(list(expected.values()))
    assert got["labelled"] == len(expected) and got["positives"] == int(y.sum())
    assert got["pending"] == n - len(expected)
    assert got["auc"] == pytest.approx(roc_auc(y, np.array(list(expected))), abs=1e-12)
    table = EventTable(
        user=np.array(user, dtype=object),
        item=np.array(["i"] * n, dtype=object),
        action=np.array(["view"] * n, dtype=object),
        ts=ts,
        value=np.full(n, np.nan, dtype=np.float32),
    )
    trainer = labels(table, [RETURN])[:, 0]
    known = ~np.isnan(trainer)
    assert known.sum() > n / 2
    assert all(expected[score[i]] == bool(trainer[i]) for i in np.flatnonzero(known))


def test_pending_predictions_are_bounded_dropping_the_least_recently_active():
    live = LiveQuality([RETURN], max_pending=2)
    got = returns(live, ("a", 0.0, 0.1), ("b", 1.0, 0.2), ("a", 2.0, 0.3), ("c", 3.0, 0.4))
    assert (got["pending"], got["dropped"], got["labelled"]) == (2, 1, 1)  # b went, not a
    got = returns(live, ("a", 4.0, 0.5), ("b", 5.0, 0.6))  # b's was dropped: no label
    assert (got["pending"], got["dropped"], got["labelled"]) == (2, 2, 2)  # then c went


def test_resolved_predictions_do_not_pile_up_in_the_deadline_heaps():
    live = LiveQuality([RETURN], max_pending=50)
    events = [(f"u{t % 50}", "i", "view", math.nan, t / 1000, 0.5) for t in range(20_000)]
    for start in range(0, len(events), 500):  # each event resolves its user's last one
        feed(live, events[start : start + 500])
    tracker = live._returns[0]
    assert len(tracker.pending) == 50 and live.snapshot()["heads"]["return"]["labelled"] > 0
    assert tracker.entries() <= 2 * 50 + 1024


def test_how_events_are_cut_into_batches_changes_nothing():
    rng = np.random.default_rng(2)
    user, value, ts, score = random_ratings(rng, 400, users=15)
    ts[::7] -= 150.0  # some out of order
    ret = rng.uniform(size=400)
    parts = [int(u[1:]) % 3 for u in user]
    events = [
        (user[i], f"i{i % 12}", "rate", value[i], ts[i], score[i], ret[i]) for i in range(400)
    ]
    whole, one_by_one = (LiveQuality([LIKE, RETURN], window=100) for _ in range(2))
    feed(whole, events, parts)
    for event, part in zip(events, parts, strict=True):
        feed(one_by_one, [event], [part])
    assert repr(whole.snapshot()) == repr(one_by_one.snapshot())
    assert whole.snapshot()["heads"]["return"]["late"] > 0


# --- recommendations -----------------------------------------------------------------------------


def test_the_next_event_hits_when_its_item_is_in_the_answers_first_ten():
    live = LiveQuality([LIKE])
    ranked = [f"i{k}" for k in range(20)]
    live.answered(["a", "b"], [ranked, ranked])
    feed(live, [("a", "i9", "rate", 5.0, 1.0, 0.5), ("b", "i10", "rate", 5.0, 2.0, 0.5)])
    rec = live.snapshot()["recommend"]
    assert (rec["hr@10"], rec["n"], rec["pending"]) == (0.5, 2, 0)  # i10 is the 11th


def test_a_user_without_an_answer_does_not_count():
    live = LiveQuality([LIKE])
    feed(live, [("a", "i1", "rate", 5.0, 1.0, 0.5)])
    live.answered(["b"], [["i1"]])
    feed(live, [("a", "i1", "rate", 5.0, 2.0, 0.5)])
    rec = live.snapshot()["recommend"]
    assert rec["n"] == 0 and math.isnan(rec["hr@10"]) and rec["pending"] == 1


def test_an_answer_is_resolved_by_the_next_event_only_and_a_newer_one_replaces_it():
    live = LiveQuality([LIKE])
    live.answered(["a"], [["x"]])
    live.answered(["a"], [["y"]])
    feed(live, [("a", "y", "view", math.nan, 1.0, 0.5), ("a", "y", "view", math.nan, 2.0, 0.5)])
    rec = live.snapshot()["recommend"]
    assert (rec["hr@10"], rec["n"], rec["resolved"]) == (1.0, 1, 1)


def test_answers_waiting_are_bounded_dropping_the_least_recently_answered():
    live = LiveQuality([LIKE], max_answers=2)
    live.answered(["a", "b", "a", "c"], [["x"], ["x"], ["x"], ["x"]])
    feed(live, [("b", "x", "view", math.nan, 1.0, 0.5), ("c", "x", "view", math.nan, 2.0, 0.5)])
    rec = live.snapshot()["recommend"]
    assert (rec["n"], rec["pending"], rec["dropped"]) == (1, 1, 1)  # b's was dropped, not a's
