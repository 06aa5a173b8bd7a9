"""The compiled kernels (models/kernels.py) against the numpy reference they replace: the
same streams folded with ``kernels.ENABLED`` on and off give the same states (sketches to the
bit) and the same features within 1e-6. The other aggregator tests run the compiled path
(the default); these run both."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sketchstream.models import kernels, segments
from test_aggregator import DEPTH, WIDTH, _aggregator, _batch, event_rows
from test_similarity import _spread_similarity, _stream


def _fold(monkeypatch, compiled: bool, rows, cuts, sim=None, history_size: int = 64):
    """``rows`` (users 0-4) folded in batches cut at ``cuts`` (increasing), the kernels on or
    off: the final state and every batch's features."""
    monkeypatch.setattr(kernels, "ENABLED", compiled)
    agg = _aggregator(history_size=history_size)
    state = agg.new_batch(5)
    feats = [
        agg.score_then_fold(state, _batch(rows[lo:hi]), item_similarity=sim)
        for lo, hi in itertools.pairwise(cuts)
    ]
    return state, feats


def _assert_same(monkeypatch, rows, cuts, sim=None, history_size: int = 64) -> None:
    want_state, want = _fold(monkeypatch, False, rows, cuts, sim, history_size)
    got_state, got = _fold(monkeypatch, True, rows, cuts, sim, history_size)
    assert got_state.same_as(want_state)  # clocks, offsets, histories, id windows exactly
    np.testing.assert_array_equal(got_state.sketches, want_state.sketches)

    def column(name: str, feats) -> np.ndarray:
        return np.concatenate([getattr(f, name) for f in feats])

    assert column("valid", got).tolist() == column("valid", want).tolist()
    for name in ("density", "counts"):  # sums in another order: within float rounding
        np.testing.assert_allclose(column(name, got), column(name, want), rtol=1e-6, atol=1e-9)
    if sim is None:
        assert all(f.cf is None for f in got)
    else:  # the same float64 sums in the same order: to the bit
        np.testing.assert_array_equal(column("cf", got), column("cf", want))


@settings(max_examples=40, deadline=None)
@given(
    rows=event_rows(max_events=30, span=20_000.0, ids=True),
    cuts=st.lists(st.integers(0, 30), max_size=3),
)
def test_the_compiled_fold_equals_the_numpy_fold(rows, cuts) -> None:
    """Decayed and undecayed channels, late events, unknown items, redeliveries, duplicate
    ids, several passes a user (events ~20,000 s apart span hundreds of half-lives)."""
    with pytest.MonkeyPatch.context() as mp:
        _assert_same(mp, rows, sorted({0, len(rows), *(c for c in cuts if c < len(rows))}))


@pytest.mark.parametrize("seed", range(3))
def test_the_compiled_cf_sums_equal_the_numpy_ones(monkeypatch, seed: int) -> None:
    """To the bit, with similarities spread over seven decades (a sum in another order would
    round differently), late events and out-of-rank weights (users 3 and 4: the numpy
    one-by-one path runs beside the kernel)."""
    rows = _stream(seed)
    cuts = [0, 37, 38, 90, len(rows)]
    _assert_same(monkeypatch, rows, cuts, sim=_spread_similarity(seed), history_size=6)


def _dump_both_ways(monkeypatch, agg, state) -> tuple[list[bytes], list[bytes]]:
    monkeypatch.setattr(kernels, "ENABLED", True)
    got = agg.dump(state)
    monkeypatch.setattr(kernels, "ENABLED", False)
    return got, agg.dump(state)


@settings(max_examples=30, deadline=None)
@given(rows=st.booleans().flatmap(lambda ids: event_rows(max_events=30, ids=ids)))
def test_the_compiled_encoder_writes_the_numpy_bytes(rows) -> None:
    """States folded from streams with and without event ids (formats 3 and 2), a user left
    empty, unknown actions (history action -1), nan values, weights other than 1."""
    agg = _aggregator(history_size=5)
    state = agg.new_batch(4)
    with pytest.MonkeyPatch.context() as mp:
        agg.score_then_fold(state, _batch(rows))
        got, want = _dump_both_ways(mp, agg, state)
    assert got == want


def test_the_compiled_encoder_writes_every_field_encoding_as_numpy_does(monkeypatch) -> None:
    """Each sketch encoding (nibbles, bytes, shorts, sparse fractions, nan), fractional
    times (f8), fractional values (f4), large offsets and partitions, a state sliced out of
    a batch (not contiguous)."""
    agg = _aggregator()
    state = agg.new_batch(6)
    rows = [(0, "i1", 0, 5.0, 1e9 + 0.25 * k, 3, 2**40 + k, 1.0) for k in range(30)]
    rows.append((0, "i2", 1, 7.25, 2e9, 70_000, 2**62, 3.5))
    agg.score_then_fold(state, _batch(rows))
    rng = np.random.default_rng(0)
    cells = DEPTH * WIDTH
    for r, top in enumerate((15, 255, 65_535, 70_000), start=1):
        counts = rng.integers(0, top + 1, cells).astype(np.float32)
        counts[rng.random(cells) < 0.5] = 0
        state.sketches[r, 0] = counts.reshape(DEPTH, WIDTH)
        state.clocks[r] = 1000.0
    state.sketches[5, 2, 1, 3] = 2.5
    state.sketches[5, 1] = rng.random((DEPTH, WIDTH), dtype=np.float32)
    state.sketches[5, 4] = np.nan
    got, want = _dump_both_ways(monkeypatch, agg, state)
    assert got == want
    got, want = _dump_both_ways(monkeypatch, agg, state.take(slice(1, None, 2)))
    assert got == want


@settings(max_examples=50, deadline=None)
@given(
    x=st.lists(st.sampled_from([-np.inf, -1.5, 0.0, 2.0, 2.0, 7.25, np.inf, np.nan]), max_size=30),
    cuts=st.lists(st.booleans(), min_size=30, max_size=30),
)
def test_the_compiled_group_cummax_equals_the_numpy_one(x, cuts) -> None:
    values = np.array(x, np.float64)
    gid = np.cumsum(cuts[: len(x)]).astype(np.int64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "ENABLED", False)
        want = segments.group_cummax(values, gid)
        mp.setattr(kernels, "ENABLED", True)
        got = segments.group_cummax(values, gid)
    np.testing.assert_array_equal(got, want)


def test_sketchstream_no_jit_turns_the_kernels_off() -> None:
    code = "from sketchstream.models import kernels; print(kernels.ENABLED)"
    env = {**os.environ, "SKETCHSTREAM_NO_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
