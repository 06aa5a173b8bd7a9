"""The byte format of a user state (models/state_codec.py), through ``Aggregator.dump`` and
``load``: round trips, versions, rebuild under other codebooks, refusal of bad bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sketchstream.models.errors import ArtifactError
from test_aggregator import (
    DEPTH,
    WIDTH,
    _aggregator,
    _batch,
    event_rows,
)


@settings(max_examples=20, deadline=None)
@given(rows=st.booleans().flatmap(lambda ids: event_rows(ids=ids)))
def test_serialized_state_deserializes_to_the_same_state(rows: list[tuple]) -> None:
    agg = _aggregator(history_size=5)
    state = agg.new_batch(4)  # user 3 stays empty
    agg.score_then_fold(state, _batch(rows))
    blobs = agg.dump(state)
    back = agg.load(blobs)
    assert back.rebuilt == 0
    assert back.same_as(state)
    assert _aggregator(history_size=5).load(blobs).same_as(state)  # a fresh process agrees


def test_serialized_bytes_are_versioned_and_tampering_is_refused() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    agg.score_then_fold(state, _batch([(0, "i1", 0, 5.0, 10.0, 0, 0, 1.0)]))
    blob = agg.dump(state)[0]
    assert blob[:2] == b"SU"
    with pytest.raises(ArtifactError):
        agg.load([b"XX" + blob[2:]])
    with pytest.raises(ArtifactError):
        agg.load([blob[:-3]])


def test_load_rebuilds_a_state_built_on_another_codebook() -> None:
    old, new = _aggregator(seed=0), _aggregator(seed=5)
    state = old.new_batch(1)
    rows = [(0, f"i{k}", 0, 5.0, 10.0 * k, 0, k, 1.0) for k in range(6)]
    old.score_then_fold(state, _batch(rows))
    loaded = new.load([*old.dump(state), None])
    assert loaded.rebuilt == 1 and new.counters["rebuilt"] == 1
    assert loaded.codebook_version == new.codebook_version != old.codebook_version
    fresh = new.new_batch(1)
    new.score_then_fold(fresh, _batch(rows))
    np.testing.assert_allclose(loaded.sketches[:1], fresh.sketches, rtol=1e-5)
    assert loaded.clocks[0] == state.clocks[0] and loaded.n_events[0] == 6


def test_serialized_state_keeps_large_offsets_counts_and_fractional_times() -> None:
    agg = _aggregator()
    state = agg.new_batch(1)
    rows = [(0, "i1", 0, 5.0, 1e9 + 0.25 * k, 3, 2**40 + k, 1.0) for k in range(200)]
    rows.append((0, "i2", 1, 7.25, 2e9, 70_000, 2**62, 3.5))
    agg.score_then_fold(state, _batch(rows))
    assert state.sketches.max() == 200  # one bucket counted past one varint byte
    assert agg.load(agg.dump(state)).same_as(state)


@settings(max_examples=20, deadline=None)
@given(rows=event_rows())
def test_a_users_bytes_do_not_depend_on_the_rest_of_the_batch(rows: list[tuple]) -> None:
    agg = _aggregator(history_size=5)
    state = agg.new_batch(4)
    agg.score_then_fold(state, _batch(rows))
    together = agg.dump(state)
    alone = [agg.dump(state.take([r]))[0] for r in range(len(state))]
    assert together == alone
    back = agg.load([together[2], None, together[0]])
    assert back.take([0]).same_as(agg.load([together[2]]))
    assert back.take([2]).same_as(agg.load([together[0]]))
    assert np.isnan(back.clocks[1]) and back.n_events[1] == 0  # None: a new, empty user


def test_every_sketch_encoding_round_trips_exactly() -> None:
    agg = _aggregator()
    state = agg.new_batch(6)
    cells = DEPTH * WIDTH
    rng = np.random.default_rng(0)
    for r, top in enumerate((15, 255, 65_535, 70_000)):  # nibbles, bytes, shorts, float32
        counts = rng.integers(0, top + 1, cells).astype(np.float32)
        counts[rng.random(cells) < 0.5] = 0
        counts[0] = top
        state.sketches[r, 0] = counts.reshape(DEPTH, WIDTH)
        state.clocks[r] = 1000.0
    state.sketches[4, 2, 1, 3] = 2.5  # a fractional count (event weights): written sparse
    state.sketches[4, 1] = rng.random((DEPTH, WIDTH), dtype=np.float32)  # decayed: sparse
    state.sketches[5, 2] = np.nan  # not a count at all: kept bit for bit anyway
    state.clocks[4:] = 1000.0
    state.first_ts[:] = 900.0  # a clock comes with a first time (else read as an old state's)
    blobs = agg.dump(state)
    assert agg.load(blobs).same_as(state)
    assert len(blobs[0]) < len(blobs[1]) < len(blobs[2])  # 4, 8 and 16 bits a cell


def test_truncated_or_padded_bytes_are_refused_with_the_row_named() -> None:
    agg = _aggregator()
    state = agg.new_batch(2)
    agg.score_then_fold(state, _batch([(1, "i1", 0, 5.0, 10.0, 0, 0, 1.0)]))
    good, blob = agg.dump(state)
    for bad in (blob + b"\x00", blob[:-1], blob[:30], b""):
        with pytest.raises(ArtifactError, match="user state 1"):
            agg.load([good, bad])
