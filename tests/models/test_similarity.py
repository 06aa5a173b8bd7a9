"""Item-item CF: the similarity in the item snapshot, the CF columns of score_then_fold."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sketchstream.models import history_cf, similarity
from sketchstream.models.emde import item_hash
from sketchstream.models.errors import ArtifactError
from sketchstream.models.history_cf import CfSums
from sketchstream.models.similarity import (
    CF_NAMES,
    CF_NAMES_V1,
    ItemSimilarity,
    SimilarityBuilder,
)
from sketchstream.models.snapshot import ItemSnapshot, refresh_windows
from test_aggregator import ITEMS, N_ITEMS, _aggregator, _batch, event_rows

DAY = 86400.0


def _random_similarity(seed: int = 0, density: float = 0.4) -> ItemSimilarity:
    rng = np.random.default_rng(seed)
    ids = ITEMS + [f"i{k}" for k in range(N_ITEMS, N_ITEMS + 3)]  # a few unknown to codebooks
    n = len(ids)
    dense = rng.uniform(0.05, 1.0, (n, n)) * (rng.uniform(size=(n, n)) < density)
    dense = np.triu(dense, 1)
    dense = dense + dense.T
    hashes = item_hash(ids)
    order = np.argsort(hashes)
    r, c = np.nonzero(dense[np.ix_(order, order)])
    keys = r.astype(np.int64) * n + c
    vals = dense[np.ix_(order, order)][r, c].astype(np.float32)
    return ItemSimilarity(hashes[order], keys, vals)


def _reference_cf(agg, sim, n_users: int, rows: list[tuple]) -> np.ndarray:
    """Fold one event at a time; read each event's CF off the stored history before it."""
    state = agg.new_batch(n_users)
    out = np.zeros((len(rows), len(CF_NAMES)), np.float32)
    for j, r in enumerate(rows):
        u, item = r[0], r[1]
        k = int(state.hist_len[u])
        hv = state.hist_value[u, :k].astype(np.float64)
        s = sim.lookup(np.full(k, item_hash([item])[0], np.uint64), state.hist_item[u, :k])
        feats = agg.score_then_fold(state, _batch([r]))
        if not feats.valid[0]:
            continue
        lk, dk = hv >= sim.like_min, hv < sim.like_min
        m_l = s[lk].mean() if lk.any() else 0.0
        m_d = s[dk].mean() if dk.any() else 0.0
        mass = s[lk].sum() + s[dk].sum()
        share = s[lk].sum() / mass if mass > 0 else 0.0
        weighted = (s[lk | dk] * hv[lk | dk]).sum() / mass if mass > 0 else 0.0
        sq = (s[lk | dk] ** 2).sum()
        out[j] = [
            m_l,
            m_d,
            m_l - m_d if lk.any() and dk.any() else 0.0,
            lk.any(),
            dk.any(),
            share,
            np.log1p(mass),
            weighted,
            s[lk].max() if lk.any() else 0.0,
            s[dk].max() if dk.any() else 0.0,
            (s[lk] ** 2).sum() / sq if sq > 0 else 0.0,
            (s[lk | dk] ** 2 * hv[lk | dk]).sum() / sq if sq > 0 else 0.0,
        ]
    return out


def test_lookup_reads_pairs_and_unknown_pairs_read_zero():
    sim = _random_similarity()
    a = item_hash(["i1", "i2", "nope"])
    b = item_hash(["i2", "i1", "i1"])
    got = sim.lookup(a, b)
    assert got[0] == got[1] and got[2] == 0.0
    assert sim.lookup(item_hash(["i3"]), item_hash(["i3"]))[0] == 0.0
    assert ItemSimilarity.empty().lookup(a, b).tolist() == [0.0, 0.0, 0.0]


def _pair_table(sim: ItemSimilarity) -> dict[tuple[int, int], float]:
    n = len(sim.hashes)
    pairs = zip(sim.keys.tolist(), sim.values.tolist(), strict=True)
    return {(int(sim.hashes[k // n]), int(sim.hashes[k % n])): v for k, v in pairs}


def _dict_lookup(sim: ItemSimilarity, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sim.lookup`` the plain way: a dict of the pairs by their two hashes."""
    table = _pair_table(sim)
    got = [table.get(p, 0.0) for p in zip(a.tolist(), b.tolist(), strict=True)]
    return np.array(got, np.float32)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("bitmap", [True, False])
def test_ranks_and_pair_values_read_the_pairs_and_zero_for_unknown_items(
    bitmap, compiled, monkeypatch
):
    """Against a plain search, the compiled lookup of the hashes' rows and the numpy one;
    the pairs' values from the bitmap (compiled, a small catalog) or the sorted keys."""
    from sketchstream.models import kernels

    monkeypatch.setattr(kernels, "ENABLED", compiled)
    if not bitmap:
        monkeypatch.setattr(similarity, "BITMAP_MAX_ITEMS", 0)
    rng = np.random.default_rng(7)
    # crowded buckets too: hashes sharing their top bits, only the first of them one probe away
    base = rng.integers(0, 2**63, 40, dtype=np.uint64) * np.uint64(2)
    hashes = np.unique(np.concatenate([base, base[:10] + np.uint64(1), base[:5] + np.uint64(2)]))
    n = len(hashes)
    dense_values = np.triu(rng.uniform(0.1, 1.0, (n, n)) * (rng.uniform(size=(n, n)) < 0.3), 1)
    r, c = np.nonzero(dense_values + dense_values.T)
    sim = ItemSimilarity(hashes, r * n + c, (dense_values + dense_values.T)[r, c])
    stranger = rng.integers(0, 2**63, 30, dtype=np.uint64)
    queries = np.concatenate([hashes, stranger, base[:10] + np.uint64(3), [np.uint64(0)]])
    ranks = sim.ranks(queries.reshape(3, -1)).reshape(-1)
    want = [int(np.flatnonzero(hashes == q)[0]) if q in hashes else n for q in queries]
    assert ranks.tolist() == want and sim.unknown == n
    a = rng.choice(queries, 2000)
    b = rng.choice(queries, 2000)
    np.testing.assert_array_equal(sim.lookup(a, b), _dict_lookup(sim, a, b))
    assert (sim.lookup(a, b) > 0).any()
    empty = ItemSimilarity.empty()
    assert empty.ranks(a).tolist() == [empty.unknown] * len(a)
    assert not empty.lookup(a, b).any()


def _spread_similarity(seed: int) -> ItemSimilarity:
    """:func:`_random_similarity`'s pairs with values spread over seven decades, so that
    summing them in another order would round differently."""
    rng = np.random.default_rng(seed)
    base = _random_similarity(seed)
    spread = np.float32(10.0) ** -rng.uniform(0, 7, len(base)).astype(np.float32)
    return ItemSimilarity(base.hashes, base.keys, spread)


def _run_cf(agg, sim, rows: list[tuple], cuts: list[int]):
    """``rows`` through ``agg.score_then_fold`` in batches cut at ``cuts`` (5 users): the CF
    columns, how many events were valid, and the float64 sums behind each batch's columns."""
    sums: list[dict[str, np.ndarray]] = []
    columns = CfSums.columns

    def spy(self):
        sums.append({k: v.copy() for k, v in vars(self).items() if isinstance(v, np.ndarray)})
        return columns(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CfSums, "columns", spy)
        state = agg.new_batch(5)
        got = [
            agg.score_then_fold(state, _batch(rows[lo:hi]), item_similarity=sim)
            for lo, hi in itertools.pairwise(cuts)
        ]
    return np.concatenate([f.cf for f in got]), sum(int(f.valid.sum()) for f in got), sums


def _bit_equal_against(monkeypatch, name: str, stand_in, sim, rows, cuts, history_size: int):
    """``rows`` as the aggregator reads them, then with ``history_cf.<name>`` replaced by
    ``stand_in`` (called with a dict to count in first): the CF columns and every batch's
    float64 sums equal to the bit. Returns the columns, how many events were valid, and the
    stand-in's counts."""
    got, valid, got_sums = _run_cf(_aggregator(history_size=history_size), sim, rows, cuts)
    seen: dict[str, int] = {}
    monkeypatch.setattr(history_cf, name, functools.partial(stand_in, seen))
    want, _, want_sums = _run_cf(_aggregator(history_size=history_size), sim, rows, cuts)
    monkeypatch.undo()
    np.testing.assert_array_equal(got, want)
    assert len(got_sums) == len(want_sums)
    for a, b in zip(got_sums, want_sums, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    return got, valid, seen


def _pairwise_windows(seen, batch, sim, sums, fast, gid, users, h_len, t, cand, value, hashes, k):
    """Stands in for ``history_cf._cf_windows``: the vectorized path as it was first written,
    every (event, entry) pair listed and looked up one by one, stored slots first."""
    g = gid[fast]
    keep_n = np.minimum(h_len[g], np.maximum(k - t[fast], 0))
    r, c = np.nonzero(np.arange(k)[None, :] < keep_n[:, None])
    ev, hu = fast[r], users[g[r]]
    s = _dict_lookup(sim, hashes[ev], batch.hist_item[hu, c])
    sums.add(ev, s, batch.hist_value[hu, c].astype(np.float64))
    lens = np.minimum(t[fast], k)  # then the last min(t, K) earlier candidates, oldest first
    ev = np.repeat(fast, lens)
    ci = cand.astype(np.int64)
    first = np.repeat(np.cumsum(ci)[fast] - ci[fast] - lens, lens)
    offs = np.arange(ev.size) - np.repeat(np.cumsum(lens) - lens, lens)
    partner = np.flatnonzero(cand)[first + offs]
    sums.add(ev, _dict_lookup(sim, hashes[ev], hashes[partner]), value[partner])
    seen["fast_events"] = seen.get("fast_events", 0) + fast.size


def _stream(seed: int, n: int = 160, n_users: int = 5) -> list[tuple]:
    """Rows for _batch: bursts per user in time order, with equal times, nan (unrated) values,
    unknown items, actions that fold into no history, redelivered offsets, and users 3 and 4
    whose weights and times are out of rank order (the one-by-one path)."""
    rng = np.random.default_rng(seed)
    clock = np.full(n_users, 1000.0)
    offset = np.zeros(n_users, np.int64)
    rows = []
    for _ in range(n):
        u = int(rng.integers(0, n_users))
        clock[u] += float(rng.choice([0.0, 0.0, 5.0, 60.0]))
        ts = clock[u] - float(rng.uniform(0, 3000)) if u == 3 else clock[u]
        weight = float(rng.choice([1.0, 0.5, 2.0])) if u == 4 else 1.0
        if offset[u] and rng.uniform() < 0.05:
            offset[u] -= 1
        value = float(rng.choice([np.nan, 1.0, 3.0, 4.0, 4.0, 5.0]))
        item = f"i{rng.integers(0, N_ITEMS + 5)}"
        action = int(rng.choice([0, 0, 0, 1, -1]))
        rows.append((u, item, action, value, ts, 0, int(offset[u]), weight))
        offset[u] += 1
    return rows


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("history_size", [3, 16])
def test_cf_windows_equal_the_pairwise_sums_to_the_bit(seed, history_size, monkeypatch):
    """The windowed gather of the vectorized path sums the same pairs in the same order as
    listing every pair: the float64 sums equal to the bit (similarities spread over seven
    decades, so that another order would round differently) over batches that leave users
    with short and full histories, ties, unrated entries and users of the one-by-one path.
    Against the one-by-one reference: equal within float rounding."""
    sim = _spread_similarity(seed)
    rows = _stream(seed)
    cuts = [0, 23, 24, 70, 131, len(rows)]
    got, valid, pairwise = _bit_equal_against(
        monkeypatch, "_cf_windows", _pairwise_windows, sim, rows, cuts, history_size
    )
    assert 0 < pairwise["fast_events"] < valid  # both paths ran
    ref = _reference_cf(_aggregator(history_size=history_size), sim, 5, rows)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def _one_by_one(
    seen, batch, sim, sums, bad_user, gid, users, h_len, h_score, t, valid, cand, score, ts,
    value, hashes, k_max, max_pairs=0,
):  # fmt: skip
    """Stands in for ``history_cf._cf_out_of_rank``: the path as it was first written, each
    user's entries kept in a list and sorted again for every event."""
    bounds = np.searchsorted(gid, np.arange(users.size + 1))
    for gu in np.flatnonzero(bad_user).tolist():
        uu = int(users[gu])
        entries = [
            (
                float(h_score[gu, s]),
                float(batch.hist_ts[uu, s]),
                -1 - s,
                int(batch.hist_item[uu, s]),
                float(batch.hist_value[uu, s]),
            )
            for s in range(int(h_len[gu]))
        ]
        seq = 0
        for j in range(int(bounds[gu]), int(bounds[gu + 1])):
            if valid[j] and entries:
                kept = sorted(entries, key=lambda e: (-e[0], -e[1], -e[2]))[:k_max]
                hv = np.array([e[4] for e in kept], np.float64)
                hh = np.array([e[3] for e in kept], np.uint64)
                s_val = sim.lookup(np.full(len(kept), hashes[j], np.uint64), hh)
                sums.add(np.full(len(kept), j), s_val, hv)
            if cand[j]:
                entry = (float(score[j]), float(ts[j]), seq, int(hashes[j]), float(value[j]))
                entries.append(entry)
                seq += 1
    seen["late_users"] = seen.get("late_users", 0) + int(bad_user.sum())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("history_size", "max_pairs"), [(3, 1 << 21), (16, 1 << 21), (16, 7)])
def test_out_of_rank_users_sum_as_one_event_at_a_time_to_the_bit(
    seed, history_size, max_pairs, monkeypatch
):
    """Users whose batch events arrive late or out of rank (users 3 and 4 of the stream, and
    every user of a second pass over it, late for all) are read off one sort of their entries
    per batch: the same pairs in the same order as sorting each event's history in turn, so
    the float64 sums are equal to the bit; ``max_pairs`` 7 splits them into many chunks."""
    sim = _spread_similarity(seed)
    rows = _stream(seed)
    late = [(u, item, a, v, ts - 5000.0, p, off + 1000, w) for u, item, a, v, ts, p, off, w in rows]
    rows = rows + late[:90]
    cuts = [0, 23, 24, 70, 131, 160, 161, 200, len(rows)]
    method = history_cf._cf_out_of_rank
    monkeypatch.setattr(
        history_cf,
        "_cf_out_of_rank",
        lambda *a: method(*a, max_pairs=max_pairs),
    )
    got, _, reference = _bit_equal_against(
        monkeypatch, "_cf_out_of_rank", _one_by_one, sim, rows, cuts, history_size
    )
    assert reference["late_users"] >= 5  # the late pass makes every user's events late
    ref = _reference_cf(_aggregator(history_size=history_size), sim, 5, rows)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_an_infinite_value_reads_as_it_did_pair_by_pair(monkeypatch):
    """Zero-similarity pairs are skipped, except where s * value is nan (value +-inf)."""
    sim = _random_similarity(2)
    rows = [(0, f"i{k % 9}", 0, np.inf if k == 3 else 5.0, 10.0 + k, 0, k, 1.0) for k in range(12)]

    def run():
        agg = _aggregator(history_size=8)
        with np.errstate(invalid="ignore"):
            return agg.score_then_fold(agg.new_batch(1), _batch(rows), item_similarity=sim).cf

    got = run()
    monkeypatch.setattr(history_cf, "_cf_windows", functools.partial(_pairwise_windows, {}))
    np.testing.assert_array_equal(got, run())
    assert np.isnan(got).any()


@settings(max_examples=30, deadline=None)
@given(rows=event_rows(span=20_000.0), history_size=st.sampled_from([2, 4, 64]))
def test_cf_columns_equal_the_history_before_each_event(rows, history_size):
    """Batched CF (fast path and the one-by-one fallback for out-of-rank events) equals
    reading the user's stored bounded history right before each event."""
    sim = _random_similarity()
    agg = _aggregator(history_size=history_size)
    feats = agg.score_then_fold(agg.new_batch(3), _batch(rows), item_similarity=sim)
    assert feats.cf_names == CF_NAMES and feats.cf.shape == (len(rows), len(CF_NAMES))
    ref = _reference_cf(_aggregator(history_size=history_size), sim, 3, rows)
    np.testing.assert_allclose(feats.cf, ref, rtol=1e-5, atol=1e-6)


def test_cf_columns_equal_the_history_in_time_ordered_bursts():
    """The vectorized path: many events per user per batch, more than the history holds."""
    rng = np.random.default_rng(3)
    n = 300
    rows = [
        (
            int(rng.integers(0, 3)),
            f"i{rng.integers(0, N_ITEMS + 3)}",
            0,
            float(rng.integers(1, 6)),
            1000.0 + 7.0 * k,
            0,
            k,
            1.0,
        )
        for k in range(n)
    ]
    sim = _random_similarity(1)
    agg = _aggregator(history_size=16)
    state = agg.new_batch(3)
    feats = [
        agg.score_then_fold(state, _batch(rows[lo : lo + 97]), item_similarity=sim).cf
        for lo in range(0, n, 97)
    ]
    ref = _reference_cf(_aggregator(history_size=16), sim, 3, rows)
    np.testing.assert_allclose(np.concatenate(feats), ref, rtol=1e-5, atol=1e-6)
    assert (ref[:, 3] > 0).mean() > 0.9


@settings(max_examples=25, deadline=None)
@given(rows=event_rows(span=20_000.0), cut=st.integers(0, 13), seed=st.integers(0, 99))
def test_cf_columns_do_not_depend_on_the_event_or_later_events(rows, cut, seed):
    cut = min(cut, len(rows) - 1)
    rng = np.random.default_rng(seed)
    sim = _random_similarity(seed)
    # event `cut` keeps its item (the one being scored) but changes everything else;
    # later events change entirely
    changed = rows[:cut] + [
        (
            r[0],
            r[1] if k == 0 else f"i{rng.integers(N_ITEMS)}",
            r[2],
            5.0 - r[3] % 3,
            r[4] + 3.0,
            *r[5:],
        )
        for k, r in enumerate(rows[cut:])
    ]
    agg = _aggregator(history_size=4)
    a = agg.score_then_fold(agg.new_batch(3), _batch(rows), item_similarity=sim)
    b = agg.score_then_fold(agg.new_batch(3), _batch(changed), item_similarity=sim)
    np.testing.assert_array_equal(a.cf[: cut + 1], b.cf[: cut + 1])


def test_without_a_similarity_there_are_no_cf_columns():
    agg = _aggregator()
    feats = agg.score_then_fold(agg.new_batch(1), _batch([(0, "i1", 0, 5.0, 1.0, 0, 0, 1.0)]))
    assert feats.cf is None and feats.cf_names == ()


def test_builder_is_the_cosine_of_like_vectors_top_k():
    rng = np.random.default_rng(0)
    n = 400
    users = rng.integers(0, 30, n).astype(str)
    items = np.array([f"i{k}" for k in rng.integers(0, 12, n)], dtype=object)
    value = rng.integers(1, 6, n).astype(np.float64)
    b = SimilarityBuilder(top_k=11)  # everything
    b.add(users[:150], items[:150], value[:150])
    b.add(users[150:], items[150:], value[150:])  # incremental == at once
    sim = b.build()
    liked = value >= 4
    ids = sorted(set(items[liked]))
    a = np.zeros((30, len(ids)))
    for u, i in zip(users[liked], items[liked], strict=True):
        a[int(u), ids.index(i)] = 1.0
    c = a.T @ a
    norm = np.sqrt(np.maximum(np.diag(c), 1.0))
    want = c / norm[:, None] / norm[None, :]
    np.fill_diagonal(want, 0.0)
    h = item_hash(ids)
    got = sim.lookup(np.repeat(h, len(ids)), np.tile(h, len(ids))).reshape(len(ids), -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    small = SimilarityBuilder(top_k=2)
    small.add(users, items, value)
    kept = small.build()
    got = kept.lookup(np.repeat(h, len(ids)), np.tile(h, len(ids))).reshape(len(ids), -1)
    # the rule, ties included: row i keeps j when c[i, j] / norm[j] is at least its 2nd largest
    by_col = c / norm[None, :]
    np.fill_diagonal(by_col, 0.0)
    kth = np.sort(by_col, axis=1)[:, -2]
    rule = (by_col >= kth[:, None]) & (by_col > 0)
    rule |= rule.T
    np.testing.assert_allclose(got, np.where(rule, want, 0.0), rtol=1e-5, atol=1e-6)
    assert 0 < len(kept) < len(ids) * (len(ids) - 1)  # top-2 drops pairs


def test_refreshed_similarity_is_built_strictly_from_events_before_the_boundary(random_ratings):
    events, y = random_ratings(600, users=20, items=25, days=20)
    seen = 0
    for rows, snap in refresh_windows(
        events, y, ["like"], refresh_s=DAY, similarity=True, similarity_min_new_likes=1
    ):
        before = np.asarray(events.ts) < np.asarray(events.ts)[rows].min() // DAY * DAY
        b = SimilarityBuilder()
        b.add(events.user[before], events.item[before], events.value[before])
        assert snap.similarity.same_as(b.build())
        seen += 1
    assert seen > 10


def test_snapshot_bytes_carry_the_similarity_and_refuse_tampering(random_ratings):
    events, y = random_ratings(600, users=20, items=25, days=20)
    snap = ItemSnapshot.from_events(events, y, ["like"], similarity=True, similarity_top_k=5)
    assert len(snap.similarity) > 0 and snap.config()["similarity"]["top_k"] == 5
    back = ItemSnapshot.from_bytes(snap.to_bytes())
    assert back.same_as(snap) and back.similarity.same_as(snap.similarity)
    assert not back.item_age and not back.global_rate
    bad = snap.copy()
    bad.similarity = ItemSimilarity(
        snap.similarity.hashes, snap.similarity.keys[::-1].copy(), snap.similarity.values
    )
    with pytest.raises(ArtifactError):
        ItemSnapshot.from_bytes(bad.to_bytes())


def test_default_item_features_leave_out_age_and_global_rate():
    names = ItemSnapshot(["like"]).feature_names
    assert "item_log_age_days" not in names and "global_rate_like" not in names
    full = ItemSnapshot(["like"], item_age=True, global_rate=True).feature_names
    assert full[-2:] == ["item_log_age_days", "global_rate_like"]


def test_a_snapshot_written_before_the_flags_reads_back_with_age_and_global_rate(random_ratings):
    """Artifacts from before the flags: their models were trained with both columns."""
    import json

    from safetensors.numpy import load, save

    events, y = random_ratings(50, users=20, items=25, days=20)
    new = ItemSnapshot.from_events(events, y, ["like"], item_age=True, global_rate=True)
    tensors = load(new.to_bytes())
    old = save(tensors, metadata={"snapshot": json.dumps({"heads": ["like"], "prior": 10.0})})
    back = ItemSnapshot.from_bytes(old)
    assert back.item_age and back.global_rate and back.similarity is None
    assert back.feature_names == new.feature_names


def test_a_similarity_written_before_the_new_columns_serves_the_first_five():
    """Artifacts trained on the first five CF columns keep getting exactly those."""
    full = _random_similarity()
    meta = full.config()
    del meta["columns"]
    old = ItemSimilarity.from_tensors(full.tensors(), meta)
    assert old.columns == CF_NAMES_V1
    rng = np.random.default_rng(5)
    values = rng.integers(1, 6, 200)
    items = rng.integers(0, len(ITEMS), 200)
    users = rng.integers(0, 3, 200)
    # (user, item, action, value, ts, partition, offset, weight)
    rows = [
        (int(users[j]), ITEMS[items[j]], 0, float(values[j]), 1.0 + j, 0, j, 1.0)
        for j in range(200)
    ]
    a, b = _aggregator(), _aggregator()
    got_full = a.score_then_fold(a.new_batch(3), _batch(rows), item_similarity=full)
    got_old = b.score_then_fold(b.new_batch(3), _batch(rows), item_similarity=old)
    assert got_old.cf_names == CF_NAMES_V1 and got_full.cf_names == CF_NAMES
    assert got_full.cf[:, 5:].any()
    np.testing.assert_array_equal(got_old.cf, got_full.cf[:, :5])
    with pytest.raises(ArtifactError, match="unknown CF columns"):
        ItemSimilarity.from_tensors(full.tensors(), {**meta, "columns": ["cf_bogus"]})
