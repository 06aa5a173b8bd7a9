"""Deduplication by ``event_id`` (models/aggregator.py): a producer's retry is folded once.

A state remembers the ids of its last ``DEDUP_WINDOW`` events folded with an id. An event
whose id is among them, or repeats an id of its user earlier in the same batch, is dropped as
a duplicate: not folded, not scored, counted apart from redeliveries. The batch-split and
serialization properties with repeated ids are in test_aggregator.py and
test_state_codec.py, beside the ones without.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sketchstream.models import batches
from sketchstream.models.aggregator import Aggregator
from sketchstream.models.batches import DEDUP_WINDOW, Event, EventBatch, event_id_hash
from sketchstream.models.channels import default_config
from sketchstream.models.errors import ArtifactError, ModelError
from sketchstream.models.events import EventTable
from sketchstream.models.trainer import replay
from test_aggregator import _aggregator, _batch, _codebook


def _rate(user: int, item: str, ts: float, offset: int, event_id: str | None) -> tuple:
    return (user, item, 0, 5.0, ts, 0, offset, 1.0, event_id)


def test_a_retried_event_is_dropped_as_a_duplicate_and_counted_apart_from_redeliveries() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    agg.score_then_fold(state, _batch([_rate(0, "i1", 10.0, 0, "e1")]))
    before = agg.dump(state)
    retry = agg.score_then_fold(state, _batch([_rate(0, "i1", 10.0, 1, "e1")]))
    assert not retry.valid.any()
    assert np.all(retry.density == 0) and np.all(retry.counts == 0)
    assert state.duplicates == 1
    assert agg.counters["duplicate_ids"] == 1 and agg.counters["redelivered"] == 0
    assert state.n_events[0] == 1 and state.hist_len[0] == 1
    assert state.offsets[0, 0] == 1  # the retry's offset is consumed: redelivering it is a no-op
    after = agg.load([agg.dump(state)[0]])
    after.offsets[0, 0] = 0
    assert after.same_as(agg.load(before))  # nothing else moved


def test_a_repeated_id_within_one_batch_is_folded_once() -> None:
    agg = _aggregator()
    state = agg.new_batch(2)
    rows = [
        _rate(0, "i1", 10.0, 0, "e1"),
        _rate(1, "i2", 11.0, 0, "x"),
        _rate(0, "i1", 10.0, 1, "e1"),
        _rate(0, "i3", 12.0, 2, "e2"),
        _rate(0, "i1", 10.0, 3, "e1"),
    ]
    feats = agg.score_then_fold(state, _batch(rows))
    assert feats.valid.tolist() == [True, True, False, True, False]
    assert state.duplicates == 2 and state.n_events.tolist() == [2, 1]


def test_the_same_id_for_two_users_is_two_events() -> None:
    agg = _aggregator()
    state = agg.new_batch(2)
    rows = [_rate(0, "i1", 10.0, 0, "e1"), _rate(1, "i1", 10.0, 0, "e1")]
    assert agg.score_then_fold(state, _batch(rows)).valid.all()
    assert state.duplicates == 0


def test_redelivering_the_original_is_still_a_redelivery() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    original = _batch([_rate(0, "i1", 10.0, 5, "e1")])
    agg.score_then_fold(state, original)
    assert not agg.score_then_fold(state, original).valid.any()
    assert agg.counters["redelivered"] == 1 and agg.counters["duplicate_ids"] == 0
    assert state.duplicates == 0


def test_events_without_an_id_or_with_an_empty_one_are_never_duplicates() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    rows = [_rate(0, "i1", 10.0, k, eid) for k, eid in enumerate([None, None, "", ""])]
    assert agg.score_then_fold(state, _batch(rows)).valid.all()
    assert state.id_len[0] == 0


def test_the_window_holds_the_last_dedup_window_ids_folded() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    ids = [f"e{k}" for k in range(DEDUP_WINDOW + 1)]
    agg.score_then_fold(state, _batch([_rate(0, "i1", 10.0 + k, k, e) for k, e in enumerate(ids)]))
    assert state.id_len[0] == DEDUP_WINDOW
    assert state.id_hash[0].tolist() == event_id_hash(ids[1:]).tolist()  # oldest first
    n = len(ids)
    late = agg.score_then_fold(
        state, _batch([_rate(0, "i1", 99.0, n, "e0"), _rate(0, "i1", 99.0, n + 1, "e2")])
    )
    assert late.valid.tolist() == [True, False]  # e0 was forgotten; folding it pushed e1 out
    assert state.id_hash[0].tolist() == event_id_hash([*ids[2:], "e0"]).tolist()


def test_duplicates_do_not_enter_the_window_nor_push_ids_out() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    rows = [_rate(0, "i1", 10.0, k, e) for k, e in enumerate(["a", "b", "a", "a", "b"])]
    assert agg.score_then_fold(state, _batch(rows)).valid.tolist() == [True, True] + [False] * 3
    assert state.id_hash[0, : state.id_len[0]].tolist() == event_id_hash(["a", "b"]).tolist()


def test_the_scalar_fold_deduplicates_too() -> None:
    agg = _aggregator()
    s = agg.fold(agg.new_batch(1), Event("i4", "rate", ts=5.0, value=5.0, event_id="e1"))
    s = agg.fold(s, Event("i4", "rate", ts=5.0, value=5.0, event_id="e1"))
    assert s.n_events[0] == 1 and s.duplicates == 1


def test_event_ids_come_as_a_list_of_str_or_none_as_the_worker_decodes_them() -> None:
    base = dict(
        user_index=[0, 0], item=["i1", "i2"], action=[0, 0], value=[5.0, 5.0], ts=[1.0, 2.0]
    )
    where = dict(partition=[0, 0], offset=[0, 1])
    assert EventBatch(**base, **where, event_id=[None, None]).event_id is None  # no ids
    assert EventBatch(**base, **where, event_id=["", None]).event_id is None
    batch = EventBatch(**base, **where, event_id=["e1", None])
    assert batch.event_id.dtype == object and batch.event_id.tolist() == ["e1", None]
    with pytest.raises(ModelError, match=r"event_id\[1\] is 7 \(int\): expected a str"):
        EventBatch(**base, **where, event_id=["e1", 7])
    with pytest.raises(ModelError, match="event_id has 1 ids, expected 2"):
        EventBatch(**base, **where, event_id=["e1"])


# --- bytes -----------------------------------------------------------------------------------

# Three states (history size 4) written by the code before event ids deduplicated (format 2):
# they must load unchanged and, holding no id, be written back byte for byte.
_FORMAT_2 = [
    "53550200a42c626d99e4ed87b063ed128e1f206e00000000001c9040050000000000000002000400000000000000"
    "000300000000000000010000000700000000000000c0f2fd564a47d515a4fd92d5d9ea16c539b05ba84e72c0fb20"
    "9ea37d642c973200000000010000000b0000001500000000000001010403ff01040104040000011001000010100000"
    "100010010011000000010000100100001000010001064282240108800468275c654f3b7e3f13804e3f13804e3f4f"
    "3b7e3f13804e3f4f3b7e3f13804e3f4f3b7e3f38573f3f38573f3f38573f3f38573f3f94137d4028277a3f24969d3f"
    "28277a3f2827fa3f0000004024969d3f2827fa3f0000004028277a3f24969d3f28277a3f24969d3f2827fa3f0000"
    "0040",
    "53550200a42c626d99e4ed87b063ed128e1f206e000000000000f87f0000000000000000000000000000000000000000",
    "53550200a42c626d99e4ed87b063ed128e1f206e0000000000428f400200000000000000010002000101010200000004"
    "00000000000000a82a27342bb406917911b6644df307770000000000388f400000000000428f4001000000c07f0000"
    "9040000000400000003f04040000040402020104020201102040040000003f0000003f0000003f0000003f0000003f"
    "0000003f0000003f0000003f0000803f0000803f0000803f0000803f",
]
_FORMAT_2_ROWS = [
    (0, "i1", 0, 5.0, 1000.0, 0, 0, 1.0),
    (0, "i2", 1, math.nan, 1010.0, 0, 1, 1.0),
    (0, "i33", 0, 3.0, 1020.0, 1, 7, 1.0),
    (2, "i4", 0, 4.5, 1000.25, 2, 3, 0.5),
    (2, "i44", 1, math.nan, 999.0, 2, 4, 2.0),
    (0, "i5", 0, 4.0, 1030.0, 0, 2, 1.0),
    (0, "i6", 0, 1.0, 1031.0, 0, 3, 1.0),
]


def test_states_written_before_ids_load_unchanged_with_their_times_from_their_histories() -> None:
    agg = _aggregator(history_size=4)
    # the fixture's codebooks are fitted again here, and their version hashes float bits that
    # another CPU's BLAS may round differently (the buckets, which the bytes hold, agree): the
    # header's codebooks digest (bytes 12-20) is this machine's
    digest = agg.dump(agg.new_batch(1))[0][12:20]
    old = [b[:12] + digest + b[20:] for b in (bytes.fromhex(h) for h in _FORMAT_2)]
    loaded = agg.load(old)
    assert loaded.rebuilt == 0 and not loaded.id_len.any()
    expected = agg.new_batch(3)
    agg.score_then_fold(expected, _batch(_FORMAT_2_ROWS))
    # format 2 kept no times: they come from the history (4 events) and the clock. User 2's
    # two events are both kept, so its times are exact; user 0's five are not, and its
    # earliest kept is its second event; user 1 has none
    assert loaded.prev_clocks.tolist()[::2] == expected.prev_clocks.tolist()[::2] == [1030, 999]
    assert loaded.first_ts.tolist()[::2] == [1010.0, 999.0]
    assert expected.first_ts.tolist()[::2] == [1000.0, 999.0]
    assert np.isnan(loaded.first_ts[1]) and np.isnan(loaded.prev_clocks[1])
    loaded.first_ts[0] = expected.first_ts[0]
    assert loaded.same_as(expected)
    written = agg.dump(loaded)
    assert [b[2] for b in written] == [4, 2, 4]  # the times, in format 4 (user 1: no events)
    assert written[1] == old[1]
    assert written == agg.dump(expected)
    assert agg.load(written).same_as(expected)


def test_ids_cost_eight_bytes_each_and_round_trip() -> None:
    agg = _aggregator(history_size=4)
    rows = [_rate(0, "i1", 10.0 + k, k, None) for k in range(3)]
    plain = agg.new_batch(1)
    agg.score_then_fold(plain, _batch(rows))
    with_ids = agg.new_batch(1)
    agg.score_then_fold(with_ids, _batch([(*r[:8], f"e{k}") for k, r in enumerate(rows)]))
    (a,), (b,) = agg.dump(plain), agg.dump(with_ids)
    assert a[2] == b[2] == 4  # the format byte
    assert len(b) - len(a) == 3 * 8
    assert agg.load([b]).same_as(with_ids)


def test_a_full_window_costs_dedup_window_times_eight_bytes() -> None:
    agg = _aggregator(history_size=4)
    n = DEDUP_WINDOW + 10
    plain, with_ids = agg.new_batch(1), agg.new_batch(1)
    rows = [_rate(0, "i1", 10.0 + k, k, f"e{k}") for k in range(n)]
    agg.score_then_fold(plain, _batch([r[:8] for r in rows]))
    agg.score_then_fold(with_ids, _batch(rows))
    assert len(agg.dump(with_ids)[0]) - len(agg.dump(plain)[0]) == 8 * DEDUP_WINDOW


def test_the_window_survives_a_codebook_swap() -> None:
    old = _aggregator(seed=0)
    new = Aggregator(old.config, {"interactions": _codebook(7), "metadata": _codebook(8, 30)})
    state = old.new_batch(1)
    old.score_then_fold(state, _batch([_rate(0, f"i{k}", 10.0 * k, k, f"e{k}") for k in range(5)]))
    swapped = new.load(old.dump(state))
    assert swapped.rebuilt == 1
    assert swapped.id_hash[0, :5].tolist() == state.id_hash[0, :5].tolist()
    retry = new.score_then_fold(swapped, _batch([_rate(0, "i3", 30.0, 5, "e3")]))
    assert not retry.valid.any() and swapped.duplicates == 1
    assert new.load(new.dump(swapped)).same_as(swapped)  # and is written on


def test_a_state_read_under_a_smaller_window_keeps_its_newest_ids(monkeypatch) -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    agg.score_then_fold(state, _batch([_rate(0, "i1", 10.0, k, f"e{k}") for k in range(5)]))
    blob = agg.dump(state)
    monkeypatch.setattr(batches, "DEDUP_WINDOW", 2)
    back = agg.load(blob)
    assert back.id_len[0] == 2
    assert back.id_hash[0].tolist() == event_id_hash(["e3", "e4"]).tolist()


def test_tampered_id_windows_are_refused() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    agg.score_then_fold(state, _batch([_rate(0, "i1", 10.0, 0, "e1")]))
    blob = agg.dump(state)[0]
    with pytest.raises(ArtifactError, match="format v2 with flags set"):
        agg.load([blob[:2] + b"\x02" + blob[3:]])
    with pytest.raises(ArtifactError, match="format v2, v3 or v4"):
        agg.load([blob[:2] + b"\x05" + blob[3:]])
    with pytest.raises(ArtifactError, match="truncated"):
        agg.load([blob[:2] + b"\x04\xff" + blob[4:]])


# --- the trainer goes through the same code --------------------------------------------------


def test_the_trainers_replay_drops_the_duplicates_the_worker_drops() -> None:
    codebooks = {"interactions": _codebook(0), "metadata": _codebook(1, 30)}
    n = 12
    ids = np.array([f"e{k}" for k in range(n)], dtype=object)
    ids[5], ids[6] = "e2", "e2"  # row 2 is u0's e2: row 6 retries it, row 5 is u1's own
    events = EventTable(
        user=np.array(["u0", "u1"] * (n // 2), dtype=object),
        item=np.array([f"i{k}" for k in range(n)], dtype=object),
        action=np.array(["rate"] * n, dtype=object),
        ts=1e9 + np.arange(n, dtype=np.float64),
        value=np.full(n, 5.0, np.float32),
        event_id=ids,
    )
    got = replay(events, Aggregator(default_config(), codebooks), batch_size=4, progress=False)
    valid = got.features.valid.tolist()
    assert valid == [k != 6 for k in range(n)]
    plain = EventTable(events.user, events.item, events.action, events.ts, events.value)
    again = replay(plain, Aggregator(default_config(), codebooks), batch_size=4, progress=False)
    assert again.features.valid.all()
