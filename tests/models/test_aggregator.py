"""The user-state aggregator (models/aggregator.py): decay, idempotence, score-then-fold,
history, rebuild. The byte format is in test_state_codec.py, deduplication in test_dedup.py;
the helpers here (``_aggregator``, ``_batch``, ``event_rows``) serve all three."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sketchstream.models import batches
from sketchstream.models.aggregator import Aggregator
from sketchstream.models.batches import Event, EventBatch
from sketchstream.models.channels import DAY, WINDOWS, AggregatorConfig, Channel
from sketchstream.models.emde import Codebook
from sketchstream.models.errors import ModelError

N_ITEMS, DEPTH, WIDTH = 40, 4, 8
ITEMS = [f"i{k}" for k in range(N_ITEMS)]
ACTIONS = ("rate", "view")


def _codebook(seed: int, n: int = N_ITEMS) -> Codebook:
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    return Codebook(depth=DEPTH, width=WIDTH, seed=seed).fit(x, ITEMS[:n])


def _config(history_size: int = 64, windows: bool = False) -> AggregatorConfig:
    return AggregatorConfig(
        channels=(
            Channel("liked", "interactions", frozenset({"rate"}), min_value=4.0),
            Channel("liked_100s", "interactions", frozenset({"rate"}), 4.0, half_life_s=100.0),
            Channel("disliked", "interactions", frozenset({"rate"}), max_value=4.0),
            Channel("views_50s", "interactions", frozenset({"view"}), half_life_s=50.0),
            Channel("meta_all_30s", "metadata", half_life_s=30.0, weight=2.0),
        ),
        actions=ACTIONS,
        history_size=history_size,
        history_half_life_s=60.0,
        recency=True,
        windows=windows,
    )


def _aggregator(history_size: int = 64, seed: int = 0, windows: bool = False) -> Aggregator:
    # metadata knows only 30 items: the rest are unknown to it, as new items are.
    codebooks = {"interactions": _codebook(seed), "metadata": _codebook(seed + 1, 30)}
    return Aggregator(_config(history_size, windows), codebooks)


def _batch(rows: list[tuple]) -> EventBatch:
    """Rows: (user, item, action, value, ts, partition, offset, weight[, event_id])."""
    with_ids = any(len(r) == 9 for r in rows)
    rows = [(*r, None) if len(r) == 8 else r for r in rows] if with_ids else rows
    cols = list(zip(*rows, strict=True)) if rows else [()] * 8
    return EventBatch(
        user_index=np.array(cols[0], np.int64),
        item=np.array(cols[1], dtype=object),
        action=np.array(cols[2], np.int64),
        value=np.array(cols[3], np.float32),
        ts=np.array(cols[4], np.float64),
        partition=np.array(cols[5], np.int32),
        offset=np.array(cols[6], np.int64),
        weight=np.array(cols[7], np.float32),
        event_id=list(cols[8]) if with_ids else None,
    )


@st.composite
def event_rows(
    draw: st.DrawFn,
    n_users: int = 3,
    max_events: int = 14,
    span: float = 400.0,
    ids: bool = False,
):
    """Events in offset order per (user, partition), with some redelivered offsets.

    ``ids``: rows get a 9th column, an event id from a pool of six (or None), so ids repeat
    within and across users: producer retries, and equal ids of different users.
    """
    n = draw(st.integers(1, max_events))
    next_offset: dict[tuple[int, int], int] = {}
    rows = []
    for _ in range(n):
        user = draw(st.integers(0, n_users - 1))
        part = draw(st.integers(0, 1))
        off = next_offset.get((user, part), 0)
        if off and draw(st.integers(0, 6)) == 0:
            off -= 1  # redelivery of the previous offset
        next_offset[(user, part)] = off + 1
        item = f"i{draw(st.integers(0, N_ITEMS + 4))}"  # i40..i44: unknown to both
        action = draw(st.sampled_from([0, 0, 1, -1]))
        value = draw(st.sampled_from([math.nan, 1.0, 3.0, 3.5, 4.0, 5.0]))
        ts = draw(st.floats(0, span, allow_nan=False).map(lambda t: round(t, 1)))
        weight = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0]))
        row = (user, item, action, value, 1000.0 + ts, part, off, weight)
        if ids:
            row = (*row, draw(st.sampled_from([None, "", "e0", "e1", "e2", "e3", "e4", "e5"])))
        rows.append(row)
    return rows


def _fold_one_by_one(agg: Aggregator, n_users: int, rows: list[tuple]):
    state = agg.new_batch(n_users)
    feats = [agg.score_then_fold(state, _batch([r])) for r in rows]
    return state, feats


def test_aggregator_requires_a_codebook_per_modality() -> None:
    with pytest.raises(ModelError, match="metadata"):
        Aggregator(_config(), {"interactions": _codebook(0)})


@settings(max_examples=20, deadline=None)
@given(t1=st.floats(0, 500), t2=st.floats(0, 500))
def test_decay_composes(t1: float, t2: float) -> None:
    agg = _aggregator()
    start = agg.new_batch(1)
    agg.score_then_fold(start, _batch([(0, "i1", 1, math.nan, 0.0, 0, 0, 1.0)]))
    zero = (0, "i2", 1, math.nan)
    two_steps = start.copy()
    agg.score_then_fold(two_steps, _batch([(*zero, t1, 0, 1, 0.0)]))
    agg.score_then_fold(two_steps, _batch([(*zero, t1 + t2, 0, 2, 0.0)]))
    one_step = start.copy()
    agg.score_then_fold(one_step, _batch([(*zero, t1 + t2, 0, 1, 0.0)]))
    assert two_steps.clocks[0] == one_step.clocks[0] == t1 + t2
    np.testing.assert_allclose(two_steps.sketches, one_step.sketches, rtol=1e-5, atol=1e-30)
    expected = 2.0 ** (-(t1 + t2) / 50.0)  # views_50s channel, one view of weight 1
    np.testing.assert_allclose(one_step.sketches[0, 3, 0].sum(), expected, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(rows=st.booleans().flatmap(lambda ids: event_rows(ids=ids)))
def test_refolding_a_folded_offset_is_a_noop(rows: list[tuple]) -> None:
    agg = _aggregator()
    state = agg.new_batch(3)
    agg.score_then_fold(state, _batch(rows))
    before = agg.dump(state)
    again = agg.score_then_fold(state, _batch(rows))
    assert not again.valid.any()
    assert np.all(again.density == 0) and np.all(again.counts == 0)
    assert agg.dump(state) == before


@settings(max_examples=20, deadline=None)
@given(
    items=st.lists(st.integers(0, N_ITEMS + 2), min_size=1, max_size=12),
    seed=st.integers(0, 1000),
)
def test_a_set_folded_at_one_timestamp_in_any_order_gives_the_same_sketch(
    items: list[int], seed: int
) -> None:
    agg = _aggregator()
    rows = [(0, f"i{k}", j % 2, 4.0 + j % 2, 500.0, 0, j, 1.0) for j, k in enumerate(items)]
    shuffled = [rows[j] for j in np.random.default_rng(seed).permutation(len(rows))]
    shuffled = [(*r[:6], j, r[7]) for j, r in enumerate(shuffled)]  # offsets stay in order
    a, b = agg.new_batch(1), agg.new_batch(1)
    agg.score_then_fold(a, _batch(rows))
    agg.score_then_fold(b, _batch(shuffled))
    assert np.array_equal(a.sketches, b.sketches)


@settings(max_examples=20, deadline=None)
@given(rows=event_rows(n_users=2))
def test_rebuild_under_the_same_codebook_equals_the_incremental_state(rows: list[tuple]) -> None:
    agg = _aggregator(history_size=64)  # holds every event
    state = agg.new_batch(2)
    agg.score_then_fold(state, _batch(rows))
    rebuilt = agg.rebuild(state)
    np.testing.assert_allclose(rebuilt.sketches, state.sketches, rtol=1e-5, atol=1e-6)


def test_out_of_order_event_is_folded_with_the_decay_of_its_age_and_keeps_the_clock() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    agg.score_then_fold(state, _batch([(0, "i1", 0, 5.0, 1000.0, 0, 0, 1.0)]))
    agg.score_then_fold(state, _batch([(0, "i2", 0, 5.0, 900.0, 0, 1, 1.0)]))
    assert state.clocks[0] == 1000.0
    liked_100s = state.sketches[0, 1]
    np.testing.assert_allclose(liked_100s.sum(axis=-1), 1.5, rtol=1e-6)  # 1 + 2^(-100/100)
    assert state.sketches[0, 0].sum(axis=-1).tolist() == [2.0] * DEPTH  # no decay: counts


def test_unknown_items_do_not_crash_and_are_counted_but_enter_history() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    feats = agg.score_then_fold(state, _batch([(0, "brand-new", 0, 5.0, 1.0, 0, 0, 1.0)]))
    assert feats.valid.all() and np.all(feats.item_codes == -1)
    assert agg.counters["unknown_item/interactions"] == 1
    assert agg.counters["unknown_item/metadata"] == 1
    assert np.all(state.sketches == 0)
    assert state.hist_len[0] == 1 and state.n_events[0] == 1


def test_items_unknown_to_one_modality_still_feed_the_other() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    agg.score_then_fold(state, _batch([(0, "i35", 0, 5.0, 1.0, 0, 0, 1.0)]))  # not in metadata
    assert agg.counters["unknown_item/metadata"] == 1
    assert state.sketches[0, 0].sum() == DEPTH and state.sketches[0, 4].sum() == 0


@settings(max_examples=20, deadline=None)
@given(rows=event_rows(), cut=st.integers(0, 13), seed=st.integers(0, 100))
def test_features_of_an_event_do_not_depend_on_it_or_later_events(
    rows: list[tuple], cut: int, seed: int
) -> None:
    cut = min(cut, len(rows) - 1)
    rng = np.random.default_rng(seed)
    changed = rows[:cut] + [
        (r[0], f"i{rng.integers(N_ITEMS)}", r[2], 5.0, r[4] + 3.0, *r[5:]) for r in rows[cut:]
    ]
    agg = _aggregator()
    a = agg.score_then_fold(agg.new_batch(3), _batch(rows))
    b = agg.score_then_fold(agg.new_batch(3), _batch(changed))
    np.testing.assert_allclose(a.density[:cut], b.density[:cut], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.counts[:cut], b.counts[:cut], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "ids, window", [(False, 64), (True, 64), (True, 2)], ids=["no-ids", "ids", "ids-window-2"]
)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_batch_gives_the_same_result_as_one_event_at_a_time(
    ids: bool, window: int, data: st.DataObject
) -> None:
    rows = data.draw(event_rows(span=20_000.0, ids=ids))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batches, "DEDUP_WINDOW", window)
        agg = _aggregator(history_size=4)
        state = agg.new_batch(3)
        feats = agg.score_then_fold(state, _batch(rows))
        one_state, one_feats = _fold_one_by_one(agg, 3, rows)
    assert feats.valid.tolist() == [f.valid[0] for f in one_feats]
    np.testing.assert_allclose(
        feats.density, np.concatenate([f.density for f in one_feats]), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        feats.counts, np.concatenate([f.counts for f in one_feats]), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(state.sketches, one_state.sketches, rtol=1e-5, atol=1e-7)
    one_state.sketches = state.sketches
    assert state.same_as(one_state)  # clocks, offsets, histories, id windows exactly
    assert state.duplicates == one_state.duplicates


@pytest.mark.parametrize("window", [64, 2], ids=["window-64", "window-2"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_split_of_a_stream_with_repeated_ids_gives_the_same_states_and_valid_flags(
    window: int, data: st.DataObject
) -> None:
    rows = data.draw(event_rows(max_events=20, span=20_000.0, ids=True))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(rows)), max_size=4))))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batches, "DEDUP_WINDOW", window)
        agg = _aggregator(history_size=4)
        whole = agg.new_batch(3)
        whole_valid = agg.score_then_fold(whole, _batch(rows)).valid.tolist()
        split, split_valid, duplicates = agg.new_batch(3), [], 0
        for lo, hi in zip([0, *cuts], [*cuts, len(rows)], strict=True):
            split_valid += agg.score_then_fold(split, _batch(rows[lo:hi])).valid.tolist()
            duplicates += split.duplicates
            split = agg.load(agg.dump(split))  # between batches, states live as bytes
    assert split_valid == whole_valid
    assert duplicates == whole.duplicates
    np.testing.assert_allclose(split.sketches, whole.sketches, rtol=1e-5, atol=1e-7)
    split.sketches = whole.sketches
    assert split.same_as(whole)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_recency_columns_are_the_users_gaps_and_age_in_any_split_and_order(
    data: st.DataObject,
) -> None:
    """last_gap_hours: the latest time before the event minus the second latest (ties: 0);
    age_hours: the event's time minus the earliest, never below 0; mean_gap_hours: the age
    over the gaps so far. Out-of-order times included: the columns read times as a multiset.
    The states between batches live as bytes."""
    rows = data.draw(event_rows(max_events=20, span=20_000.0))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(rows)), max_size=4))))
    agg = _aggregator(history_size=4)
    state, counts, valid = agg.new_batch(3), [], []
    for lo, hi in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        feats = agg.score_then_fold(state, _batch(rows[lo:hi]))
        counts.append(feats.counts)
        valid += feats.valid.tolist()
        state = agg.load(agg.dump(state))
    got = np.concatenate(counts)[:, -3:]
    times: dict[int, list[float]] = {}
    for row, ok, columns in zip(rows, valid, got, strict=True):
        seen = sorted(times.setdefault(row[0], []), reverse=True)
        want = [0.0, 0.0, 0.0]
        if ok and len(seen) >= 2:
            want[0] = (seen[0] - seen[1]) / 3600
        if ok and seen:
            want[1] = max(row[4] - seen[-1], 0.0) / 3600
            want[2] = want[1] / max(len(seen) - 1, 1) if len(seen) > 1 else 0.0
        np.testing.assert_allclose(columns, want, rtol=1e-6, atol=1e-9)
        if ok:
            times[row[0]].append(row[4])
    for user, seen in times.items():
        seen.sort(reverse=True)
        assert state.first_ts[user] == seen[-1]
        assert state.prev_clocks[user] == (seen[1] if len(seen) > 1 else None) or (
            len(seen) == 1 and np.isnan(state.prev_clocks[user])
        )


@settings(max_examples=40, deadline=None)
@given(data=st.data(), half_life_days=st.sampled_from([0.5, 3.0]))
def test_window_columns_count_the_bounded_history_within_a_day_and_a_week_in_any_split(
    data: st.DataObject, half_life_days: float
) -> None:
    """events_1d / events_7d: the entries of the user's history before the event (the top 3
    of its earlier events of known action by log2 weight + time / half-life) within a day / a
    week before the time the event is read at (its own; the latest earlier one when late).
    Weights that rank an older event above a newer one, late events, redeliveries; the same
    counts in any split, the states between batches as bytes."""
    rows = data.draw(event_rows(max_events=24, span=12 * DAY))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(rows)), max_size=4))))
    hl = half_life_days * DAY
    base = _aggregator(history_size=3, windows=True)
    agg = Aggregator(dataclasses.replace(base.config, history_half_life_s=hl), base.codebooks)
    at = agg.config.count_names.index(WINDOWS[0])
    state, got, valid = agg.new_batch(3), [], []
    for lo, hi in zip([0, *cuts], [*cuts, len(rows)], strict=True):
        feats = agg.score_then_fold(state, _batch(rows[lo:hi]))
        got += feats.counts[:, at : at + 2].tolist()
        valid += feats.valid.tolist()
        state = agg.load(agg.dump(state))
    entries: dict[int, list[tuple[float, float, int]]] = {}
    latest: dict[int, float] = {}
    for i, (row, ok, columns) in enumerate(zip(rows, valid, got, strict=True)):
        user, action, ts, weight = row[0], row[2], row[4], row[7]
        want = [0, 0]
        if ok:
            read_t = max(ts, latest.get(user, -math.inf))
            kept = sorted(entries.get(user, []), reverse=True)[:3]
            want = [sum(t >= read_t - span for _, t, _ in kept) for span in (DAY, 7 * DAY)]
            latest[user] = read_t
            if action >= 0:
                entries.setdefault(user, []).append((math.log2(weight) + ts / hl, ts, i))
        assert columns == want, (i, row)


def test_density_is_the_share_of_channel_mass_in_the_items_buckets() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    liked = [(0, "i1", 0, 5.0, 0.0, 0, 0, 1.0), (0, "i2", 0, 5.0, 0.0, 0, 1, 1.0)]
    agg.score_then_fold(state, _batch(liked))
    feats = agg.score_then_fold(state, _batch([(0, "i1", 0, math.nan, 0.0, 0, 2, 1.0)]))
    codes = agg.codebooks["interactions"].encode(["i1", "i2"])
    expected = np.mean((1 + (codes[0] == codes[1])) / 2.0)
    assert feats.density[0, 0] == pytest.approx(expected)
    names = list(feats.names)
    assert names == agg.feature_names and len(names) == 5 + 5 + 2 + 3
    assert feats.counts[0, names.index("events") - 5] == 2
    assert feats.counts[0, names.index("mass/liked") - 5] == 2


def test_with_sketches_returns_the_decayed_state_before_each_event() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    rows = [(0, f"i{k}", k % 2, 5.0, 7.0 * k, 0, k, 1.0) for k in range(5)]
    feats = agg.score_then_fold(state, _batch(rows), with_sketches=True)
    replay = agg.new_batch(1)
    for k, r in enumerate(rows):
        probe = replay.copy()
        agg.score_then_fold(probe, _batch([(0, "i0", 1, math.nan, r[4], 0, 99, 0.0)]))
        np.testing.assert_allclose(feats.user_sketch[k], probe.sketches[0], rtol=1e-5, atol=1e-7)
        agg.score_then_fold(replay, _batch([r]))


def test_a_probe_reads_the_same_sketches_whether_or_not_other_events_fold_beside_it() -> None:
    """A batch where nothing folds (a recommendation's probe: no action) reads its sketches
    without the scan of contributions; with an event folding beside it, through the scan:
    the probe's sketches and counts are the same to the bit either way."""
    from sketchstream.models import kernels

    agg = _aggregator()
    state = agg.new_batch(2)
    rows = [(u, f"i{k}", k % 2, 5.0, 7.0 * k, 0, k, 1.0) for k in range(6) for u in (0, 1)]
    agg.score_then_fold(state, _batch(rows))
    probe = (1, "i0", -1, math.nan, 80.0, 0, 99, 0.0)
    alone = agg.score_then_fold(state.copy(), _batch([probe]), with_sketches=True)
    beside = agg.score_then_fold(
        state.copy(), _batch([(0, "i3", 0, 5.0, 60.0, 0, 98, 1.0), probe]), with_sketches=True
    )
    assert kernels.ENABLED  # with sketches the numpy pass runs either way
    np.testing.assert_array_equal(alone.user_sketch[0], beside.user_sketch[1])
    np.testing.assert_array_equal(alone.counts[0], beside.counts[1])
    assert beside.user_sketch[1].any()


def test_history_keeps_the_top_k_by_decayed_weight_ties_to_the_most_recent() -> None:
    agg = _aggregator(history_size=3)
    state = agg.new_batch(1)
    rows = [(0, f"i{k}", 0, 5.0, 100.0, 0, k, 1.0) for k in range(4)]
    rows.append((0, "i9", 0, 5.0, 40.0, 0, 4, 8.0))  # 8 * 2^(-60/60) = 4 > 1: kept first
    agg.score_then_fold(state, _batch(rows))
    kept = agg.codebooks["interactions"].rows_for_hashes(state.hist_item[0])
    assert [agg.codebooks["interactions"].ids_[k] for k in kept] == ["i9", "i3", "i2"]


def test_scalar_fold_equals_a_one_event_batch() -> None:
    agg = _aggregator()
    s = agg.fold(agg.new_batch(1), Event("i4", "rate", ts=5.0, value=5.0))
    s = agg.fold(s, Event("i5", "view", ts=6.0))
    batch = agg.new_batch(1)
    agg.score_then_fold(
        batch, _batch([(0, "i4", 0, 5.0, 5.0, 0, 0, 1.0), (0, "i5", 1, math.nan, 6.0, 0, 1, 1.0)])
    )
    assert s.same_as(batch)
    with pytest.raises(ModelError, match="unknown action 'lik'"):
        agg.fold(s, Event("i5", "lik", ts=6.0))


def test_bad_events_are_refused_with_the_event_named() -> None:
    agg = _aggregator()
    with pytest.raises(ModelError, match=r"event 1 .*action"):
        agg.score_then_fold(
            agg.new_batch(1),
            _batch([(0, "i1", 0, 5.0, 1.0, 0, 0, 1.0), (0, "i1", 7, 5.0, 1.0, 0, 1, 1.0)]),
        )


def test_calendar_columns_are_the_events_hour_and_weekday_in_utc() -> None:
    base = _aggregator()
    agg = Aggregator(dataclasses.replace(base.config, calendar=True), base.codebooks)
    assert agg.config.fingerprint() == base.config.fingerprint()  # the same states
    assert agg.config.count_names[-2:] == ("hour_of_day", "weekday")
    day = 86_400.0
    rows = [
        (0, "i1", 0, 5.0, 0.0, 0, 0, 1.0),  # 1970-01-01 00:00 UTC, a Thursday
        (1, "i2", 0, 3.0, 4 * day + 13.5 * 3600, 0, 1, 1.0),  # Monday 13:30
        (0, "i3", 0, 5.0, 9 * day + 23 * 3600, 0, 2, 1.0),  # Saturday 23:00
    ]
    state = agg.new_batch(2)
    feats = agg.score_then_fold(state, _batch(rows))
    np.testing.assert_allclose(feats.counts[:, -2:], [[0.0, 3.0], [13.5, 0.0], [23.0, 5.0]])
    # the other columns are those of the same aggregator without the calendar
    plain = base.score_then_fold(base.new_batch(2), _batch(rows))
    np.testing.assert_array_equal(feats.counts[:, :-2], plain.counts)
    # a redelivered event (its offset folded already) gets none, as every column
    again = agg.score_then_fold(state, _batch(rows[2:]))
    assert not again.valid[0] and (again.counts[0] == 0).all()
