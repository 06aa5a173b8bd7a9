"""Prequential ranking: metric definitions, each event's earlier items, and the baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sketchstream.models.errors import ModelError
from sketchstream.models.ranking import (
    EvalEvents,
    ItemCF,
    RecentPopularity,
    UserHistory,
    evaluate_scorer,
    item_rows,
    rank_metrics,
)


def _one(scores: list[float], target: int, exclude: list[int] = (), k: int = 10) -> dict:
    s = np.array([scores], dtype=np.float64)
    ex = np.zeros_like(s, dtype=bool)
    ex[0, list(exclude)] = True
    return {key: float(v[0]) for key, v in rank_metrics(s, np.array([target]), ex, k=k).items()}


def test_a_target_ranked_second_has_the_textbook_values() -> None:
    m = _one([3.0, 2.0, 1.0, 0.0], target=1)
    assert m["hr@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert m["rr"] == 0.5


def test_a_target_below_k_is_a_miss_but_keeps_its_reciprocal_rank() -> None:
    m = _one([3.0, 2.0, 1.0, 0.0], target=3, k=2)
    assert m["hr@2"] == 0.0 and m["ndcg@2"] == 0.0
    assert m["rr"] == 0.25


def test_ties_count_as_the_expected_rank_under_random_tie_breaking() -> None:
    n = 40
    m = _one([0.0] * n, target=7)
    assert m["hr@10"] == pytest.approx(10 / n)
    assert m["rr"] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)
    assert m["ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 1) for r in range(1, 11)) / n)
    # one item above and two tied: rank uniform on {2, 3, 4}
    m = _one([5.0, 1.0, 1.0, 1.0, 0.0], target=2, k=3)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["rr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)


def test_excluded_items_leave_the_ranking_and_an_excluded_target_is_a_miss() -> None:
    assert _one([3.0, 2.0, 1.0], target=1, exclude=[0])["rr"] == 1.0
    assert _one([3.0, 2.0, 1.0], target=1, exclude=[1]) == {"hr@10": 0, "ndcg@10": 0, "rr": 0}


def test_a_target_outside_the_catalogue_is_a_miss() -> None:
    assert _one([3.0, 2.0, 1.0], target=-1) == {"hr@10": 0, "ndcg@10": 0, "rr": 0}


def test_mismatched_shapes_are_a_clear_error() -> None:
    with pytest.raises(ModelError, match="disagree"):
        rank_metrics(np.zeros((2, 3)), np.zeros(3, np.int64))


def _stream(n: int = 300, n_users: int = 7, n_items: int = 15, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = np.array([f"u{u}" for u in rng.integers(n_users, size=n)], dtype=object)
    rows = rng.integers(-1, n_items, size=n)  # -1: outside the catalogue
    ts = np.sort(rng.integers(0, 50, size=n)).astype(np.float64) * 3600.0  # many equal times
    return users, rows, ts


def test_history_gives_each_event_its_users_earlier_items_only() -> None:
    users, rows, _ = _stream()
    h = UserHistory(users, rows)
    events = np.arange(len(rows))
    seen, last = h.seen(events, 15), h.last(events, 4)
    for i in events:
        before = [int(rows[j]) for j in range(i) if users[j] == users[i]]
        want = np.zeros(15, bool)
        want[[r for r in before if r >= 0]] = True
        assert np.array_equal(seen[i], want)
        tail = ([-1] * 4 + before)[-4:]
        assert last[i].tolist() == tail


def test_item_rows_name_the_catalogue_row_or_minus_one() -> None:
    assert item_rows(np.array(["b", "z", "a"], dtype=object), ["a", "b"]).tolist() == [1, -1, 0]


@pytest.mark.parametrize("half_life", [math.inf, 7200.0])
def test_popularity_counts_exactly_the_earlier_events_decayed(half_life: float) -> None:
    _, rows, ts = _stream()
    wanted = np.zeros(len(rows), bool)
    wanted[::3] = True
    got = {}
    for events, s in RecentPopularity(15, half_life).scores(rows, ts, wanted, chunk=16):
        got.update(zip(events.tolist(), s, strict=True))
    assert sorted(got) == np.flatnonzero(wanted).tolist()
    for i, s in got.items():
        want = np.zeros(15)
        for j in range(i):  # only events before i, never i itself
            if rows[j] >= 0:
                want[rows[j]] += 2.0 ** (-(ts[i] - ts[j]) / half_life)
        np.testing.assert_allclose(s, want, rtol=1e-9, atol=1e-12)


def test_item_cf_is_the_cosine_of_item_columns_weighted_by_recency() -> None:
    users = np.array(["a", "a", "b", "b", "b", "c"], dtype=object)
    rows = np.array([0, 1, 0, 1, 2, 2])
    cf = ItemCF(3, top_k=10, gamma=0.5).fit(users, rows)
    sim = cf.similarity_.toarray()
    assert sim[0, 1] == pytest.approx(1.0)  # both items liked by a and b
    assert sim[0, 2] == pytest.approx(1 / 2)  # 1 common user / sqrt(2 * 2)
    assert np.all(np.diag(sim) == 0)
    s = cf.scores(np.array([[0, 2]]))  # 2 the latest (weight 1), 0 before it (0.5)
    np.testing.assert_allclose(s[0], 0.5 * sim[0] + sim[2], rtol=1e-6)


def test_evaluate_scorer_reports_both_seen_modes() -> None:
    users, rows, _ = _stream(n_items=15)
    h = UserHistory(users, rows)
    events = np.arange(200, 300)
    ev = EvalEvents(events, rows[events], h, 15)
    oracle = lambda p: np.eye(15)[np.maximum(rows[events[p]], 0)]  # noqa: E731
    res = evaluate_scorer(oracle, ev, chunk=32)
    inside = (rows[events] >= 0).mean()
    assert res[False]["hr@10"] == pytest.approx(inside)
    assert res[False]["mrr"] == pytest.approx(inside)
    assert res[True]["hr@10"] <= res[False]["hr@10"]  # seen targets are misses
    assert res[True]["n"] == res[False]["n"] == 100
