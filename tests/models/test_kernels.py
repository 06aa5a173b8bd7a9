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
from sketchstream.models import kernels
from test_aggregator import _aggregator, _batch, event_rows
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


def test_sketchstream_no_jit_turns_the_kernels_off() -> None:
    code = "from sketchstream.models import kernels; print(kernels.ENABLED)"
    env = {**os.environ, "SKETCHSTREAM_NO_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
