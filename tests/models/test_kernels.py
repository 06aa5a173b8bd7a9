"""The compiled kernels (models/kernels.py) against the numpy reference they replace: the
same streams folded with ``kernels.ENABLED`` on and off give the same states (sketches to the
bit) and the same features within 1e-6. The other aggregator tests run the compiled path
(the default); these run both."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sketchstream.models import batches, kernels, segments, state_codec
from sketchstream.models.errors import ArtifactError
from test_aggregator import DEPTH, WIDTH, _aggregator, _batch, event_rows
from test_similarity import _spread_similarity, _stream


def _fold(monkeypatch, compiled: bool, rows, cuts, sim=None, history_size: int = 64):
    """``rows`` (users 0-4) folded in batches cut at ``cuts`` (increasing), the kernels on or
    off: the final state and every batch's features, each with ``cf_sums``, the float64 sums
    behind its CF columns (which round them)."""
    from sketchstream.models.history_cf import CfSums

    monkeypatch.setattr(kernels, "ENABLED", compiled)
    agg = _aggregator(history_size=history_size, windows=True)
    state = agg.new_batch(5)
    sums: list[dict[str, np.ndarray]] = []
    columns = CfSums.columns

    def spy(self):
        sums.append({k: v.copy() for k, v in vars(self).items() if isinstance(v, np.ndarray)})
        return columns(self)

    monkeypatch.setattr(CfSums, "columns", spy)
    feats = []
    for lo, hi in itertools.pairwise(cuts):
        feats.append(agg.score_then_fold(state, _batch(rows[lo:hi]), item_similarity=sim))
        feats[-1].cf_sums = sums[-1] if sums else None
        sums.clear()
    monkeypatch.setattr(CfSums, "columns", columns)
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
        for g, w in zip(got, want, strict=True):
            assert (g.cf_sums is None) == (w.cf_sums is None)
            if g.cf_sums is not None:
                assert g.cf_sums.keys() == w.cf_sums.keys()
                for name in g.cf_sums:
                    np.testing.assert_array_equal(g.cf_sums[name], w.cf_sums[name], err_msg=name)


@settings(max_examples=40, deadline=None)
@given(
    rows=event_rows(max_events=30, span=20_000.0, ids=True),
    cuts=st.lists(st.integers(0, 30), max_size=3),
    history_size=st.sampled_from([3, 64]),
)
def test_the_compiled_fold_equals_the_numpy_fold(rows, cuts, history_size) -> None:
    """Decayed and undecayed channels, late events, unknown items, redeliveries, duplicate
    ids, several passes a user (events ~20,000 s apart span hundreds of half-lives), weights
    that rank older events first, histories cut to their top 3."""
    with pytest.MonkeyPatch.context() as mp:
        cuts = sorted({0, len(rows), *(c for c in cuts if c < len(rows))})
        _assert_same(mp, rows, cuts, history_size=history_size)


@pytest.mark.parametrize("table", ["bitmap", "sparse"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("history_size", [6, 48])
def test_the_compiled_cf_sums_equal_the_numpy_ones(
    monkeypatch, seed: int, table: str, history_size: int
) -> None:
    """To the bit, with similarities spread over seven decades (a sum in another order would
    round differently), late events and out-of-rank weights (users 3 and 4: the numpy
    one-by-one path runs beside the kernel); the pairs read from the bitmap of a small
    catalog and, as for a large one, by a search of the sorted pair keys. Histories of 48
    over 400 events of 3 users: windows with many similar pairs among the batch's earlier
    events as well as among the stored ones (each group's order matters from three on)."""
    from sketchstream.models import similarity

    if table == "sparse":
        monkeypatch.setattr(similarity, "BITMAP_MAX_ITEMS", 0)
    if history_size == 6:
        rows, cuts = _stream(seed), [0, 37, 38, 90, 160]
    else:
        rows, cuts = _stream(seed, n=400, n_users=3), [0, 150, 151, 400]
    _assert_same(monkeypatch, rows, cuts, sim=_spread_similarity(seed), history_size=history_size)


def _dump_both_ways(monkeypatch, agg, state) -> tuple[list[bytes], list[bytes]]:
    monkeypatch.setattr(kernels, "ENABLED", True)
    got = agg.dump(state)
    monkeypatch.setattr(kernels, "ENABLED", False)
    return got, agg.dump(state)


def _load_both_ways(monkeypatch, agg, blobs) -> tuple[object, object]:
    """``agg.load(blobs)`` compiled and numpy: each a StateBatch, or the ArtifactError's
    message."""

    def load() -> object:
        try:
            return agg.load(blobs)
        except ArtifactError as exc:
            return str(exc)

    monkeypatch.setattr(kernels, "ENABLED", True)
    got = load()
    monkeypatch.setattr(kernels, "ENABLED", False)
    return got, load()


def _assert_same_load(got, want) -> None:
    if isinstance(want, str):
        assert got == want
    else:
        assert got.same_as(want) and got.rebuilt == want.rebuilt
        assert got.partitions.shape == want.partitions.shape
        assert got.id_hash.shape == want.id_hash.shape


@settings(max_examples=30, deadline=None)
@given(
    rows=st.booleans().flatmap(lambda ids: event_rows(max_events=30, ids=ids)),
    window=st.sampled_from([64, 2]),
)
def test_the_compiled_codec_writes_and_reads_the_numpy_bytes(rows, window) -> None:
    """States folded from streams with and without event ids (formats 3 and 2), a user left
    empty, nan values, weights other than 1; read back with a window of 64 ids or 2 (the
    newest kept), under the same codebooks and under others (rebuilt from the history)."""
    agg = _aggregator(history_size=5)
    state = agg.new_batch(4)
    with pytest.MonkeyPatch.context() as mp:
        agg.score_then_fold(state, _batch(rows))
        got, want = _dump_both_ways(mp, agg, state)
        assert got == want
        mp.setattr(batches, "DEDUP_WINDOW", window)
        blobs = [*want, None]
        _assert_same_load(*_load_both_ways(mp, _aggregator(history_size=3), blobs))
        _assert_same_load(*_load_both_ways(mp, _aggregator(history_size=5, seed=7), blobs))


def _varied_state():
    """An aggregator and a state of six users with each sketch encoding (nibbles, bytes,
    shorts, sparse fractions, nan), fractional times (f8), fractional values (f4), large
    offsets and partitions."""
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
    return agg, state


def test_the_compiled_codec_handles_every_field_encoding_as_numpy_does(monkeypatch) -> None:
    """Also for a batch sliced out of another (not contiguous)."""
    agg, state = _varied_state()
    got, want = _dump_both_ways(monkeypatch, agg, state)
    assert got == want
    _assert_same_load(*_load_both_ways(monkeypatch, agg, want))
    got, want = _dump_both_ways(monkeypatch, agg, state.take(slice(1, None, 2)))
    assert got == want


def test_the_compiled_decoder_refuses_the_bytes_the_numpy_one_refuses(monkeypatch) -> None:
    """Every blob cut short and padded, every byte replaced by 0, 5 or 255, the format byte by
    every format's: the same states or the same ArtifactError (reason, first row named,
    count), every reason met; beside a good blob, so the row named is not always the first."""
    agg, state = _varied_state()
    blobs = agg.dump(state)
    bad: list[bytes] = []
    for blob in blobs:
        bad += [blob[:cut] for cut in range(0, len(blob), 7)] + [blob + b"\x00"]
        for at in range(len(blob)):
            bad += [blob[:at] + bytes([x]) + blob[at + 1 :] for x in (0, 5, 255)]
        bad += [blob[:2] + bytes([x]) + blob[3:] for x in (2, 3, 4)]  # read as another format
    reasons = set()
    for b in bad:
        got, want = _load_both_ways(monkeypatch, agg, [blobs[0], b, b[:-1]])
        _assert_same_load(got, want)
        if isinstance(want, str):
            reasons.add(want.split("unreadable bytes: ")[1].split(" (")[0])
    assert reasons == set(state_codec._REFUSED.values())


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


@settings(max_examples=50, deadline=None)
@given(
    x=st.lists(st.floats(allow_nan=True), max_size=20),
    starts=st.lists(st.booleans(), min_size=20, max_size=20),
)
def test_the_shift_and_run_end_helpers_equal_the_numpy_calls_they_replace(x, starts) -> None:
    values = np.array(x, np.float64)
    np.testing.assert_array_equal(segments.shift1(values), np.roll(values, 1))
    flags = np.array([True, *starts[1 : len(x)]], bool)[: len(x)]
    if len(x):
        want = np.r_[np.flatnonzero(flags)[1:] - 1, len(x) - 1]
        np.testing.assert_array_equal(segments.run_ends(flags), want)


_WARM_UP_THEN_A_BATCH = """
import json
import sys
sys.path.insert(0, {tests!r})
from sketchstream.models import kernels, similarity
from test_aggregator import _aggregator, _batch
from test_similarity import _spread_similarity, _stream

similarity.BITMAP_MAX_ITEMS = {bitmap_max}

# (l2_rows, recent_sketches: the recommender's inputs, warmed up with it: test_recommend)
theirs = ("l2_rows", "recent_sketches")
names = [n for n in kernels.__all__ if hasattr(getattr(kernels, n), "signatures")]
names = [n for n in names if n not in theirs]
agg, sim = _aggregator(history_size=6, windows=True), _spread_similarity(0)
before = dict(agg.counters)
agg.warm_up(sim)
assert agg.counters == before, agg.counters
warm = {{n: len(getattr(kernels, n).signatures) for n in names}}
state = agg.new_batch(5)
agg.score_then_fold(state, _batch(_stream(0)), item_similarity=sim)
agg.load(agg.dump(state))
print(json.dumps([warm, {{n: len(getattr(kernels, n).signatures) for n in names}}]))
"""


@pytest.mark.parametrize("table", ["bitmap", "sparse"])
def test_warm_up_compiles_every_kernel_a_batch_calls(table: str) -> None:
    """In a fresh process (here every kernel is long compiled): after ``warm_up`` each
    kernel has its signature and a batch of every kind of event adds none. A small catalog's
    CF sums and pairs read its bitmap, a large one's (``sparse``) their gathered windows and
    a search of the keys: those kernels are never called."""
    bitmap_max = 16_384 if table == "bitmap" else 0
    code = _WARM_UP_THEN_A_BATCH.format(tests=os.path.dirname(__file__), bitmap_max=bitmap_max)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    warm, after = json.loads(out.stdout)
    unused = ["cf_window_sums"] if table == "bitmap" else ["cf_window_sums_bitmap", "bitmap_values"]
    assert len(warm) == 11 and all(warm.pop(name) == 0 for name in unused), warm
    assert all(warm.values()), warm  # every other kernel compiled
    assert after == {**warm, **dict.fromkeys(unused, 0)}


def test_sketchstream_no_jit_turns_the_kernels_off() -> None:
    code = "from sketchstream.models import kernels; print(kernels.ENABLED)"
    env = {**os.environ, "SKETCHSTREAM_NO_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


@settings(max_examples=30, deadline=None)
@given(
    width=st.integers(1, 300),
    rows=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(-20, 20),
)
def test_the_compiled_l2_normalization_equals_the_numpy_one(width, rows, seed, scale) -> None:
    """``emde.normalize`` (the recommender's inputs) both ways, to the bit: magnitudes over
    many orders, zero rows and zero cells, a nan and an inf row."""
    from sketchstream.models.emde import normalize

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 3, width)) * np.exp(rng.standard_normal((rows, 3, width)) * 3)
    x = (x * 2.0**scale).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = 0.0
    x[0, 0] = 0.0
    if rows > 2:
        x[1, 1, 0], x[2, 2, -1] = np.nan, np.inf
    with pytest.MonkeyPatch.context() as mp, np.errstate(invalid="ignore"):  # inf / inf
        mp.setattr(kernels, "ENABLED", False)
        want = normalize(x)
        mp.setattr(kernels, "ENABLED", True)
        got = normalize(x)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 12), st.integers(1, 2), st.integers(1, 4)),
    width=st.integers(1, 70),
    decays=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_compiled_recent_sketches_equal_the_numpy_ones(shape, width, decays, seed) -> None:
    """``recommend.recent_sketches`` both ways, to the bit: unknown codes (-1), users with no
    item at all, repeated buckets."""
    from sketchstream.models.recommend import recent_sketches

    codes = np.random.default_rng(seed).integers(-1, width, size=shape)
    codes[0] = -1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "ENABLED", False)
        want = recent_sketches(codes, decays, width)
        mp.setattr(kernels, "ENABLED", True)
        got = recent_sketches(codes, decays, width)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)
