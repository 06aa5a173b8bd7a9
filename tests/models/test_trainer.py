"""The trainer: prequential replay (no leakage, prefix-stable), item statistics, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sketchstream.models.emde import Codebook
from sketchstream.models.events import DEFAULT_HEADS, EventTable, Item, labels
from sketchstream.models.mlp import MLPConfig, assemble
from sketchstream.models.state import Aggregator, default_config
from sketchstream.models.trainer import ItemStats, metadata_hyperedges, replay, train_mlp

torch.set_num_threads(1)

N_USERS, N_ITEMS = 12, 30


def _stream(n: int = 400, seed: int = 0) -> EventTable:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, n)
    items = rng.integers(0, N_ITEMS, n)
    return EventTable(
        user=np.array([f"u{u}" for u in users], dtype=object),
        item=np.array([f"i{i}" for i in items], dtype=object),
        action=np.array(["rate"] * n, dtype=object),
        ts=1e9 + np.sort(rng.uniform(0, 200 * 86400, n)),
        value=rng.integers(1, 6, n).astype(np.float32),
    )


@pytest.fixture(scope="module")
def codebooks():
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(N_ITEMS - 3)]  # the last 3 items stay unknown
    return {
        m: Codebook(depth=4, width=8, seed=s).fit(rng.normal(size=(len(ids), 8)).astype("f4"), ids)
        for s, m in enumerate(("interactions", "metadata"))
    }


def _features(events: EventTable, codebooks, batch_size: int = 64) -> np.ndarray:
    """Replay ``events`` and return the assembled dense block ``(n, F)`` and codes."""
    y = labels(events, DEFAULT_HEADS)
    rep = replay(
        events,
        Aggregator(default_config(), codebooks),
        labels=y,
        item_stats=ItemStats(["like"]),
        batch_size=batch_size,
        progress=False,
    )
    x = assemble(rep.features, rep.item_stats)
    return np.concatenate([x.dense, x.codes.reshape(len(events), -1)], axis=1)


def _with_value(events: EventTable, i: int, value: float) -> EventTable:
    v = events.value.copy()
    v[i] = value
    return EventTable(events.user, events.item, events.action, events.ts, v)


@pytest.mark.parametrize("i", [0, 137, 398])
def test_changing_a_rating_changes_no_earlier_or_own_features_but_some_later(codebooks, i):
    events = _stream()
    flipped = 1.0 if events.value[i] >= 4 else 5.0
    a = _features(events, codebooks)
    b = _features(_with_value(events, i, flipped), codebooks)
    # (tolerance: the aggregator's batched decay sums may differ in the last bits)
    np.testing.assert_allclose(a[: i + 1], b[: i + 1], rtol=1e-6, atol=1e-9)
    if i < len(events) - 1:
        assert np.abs(a[i + 1 :] - b[i + 1 :]).max() > 1e-3


def test_a_prefix_of_the_stream_gives_the_same_features_as_the_full_stream(codebooks):
    events = _stream()
    full = _features(events, codebooks, batch_size=64)
    for stop in (1, 63, 64, 250):
        prefix = _features(events[:stop], codebooks, batch_size=64)
        np.testing.assert_allclose(prefix, full[:stop], rtol=1e-6, atol=1e-9)


def test_features_do_not_depend_on_the_replay_batch_size(codebooks):
    events = _stream()
    np.testing.assert_allclose(
        _features(events, codebooks, batch_size=7),
        _features(events, codebooks, batch_size=1000),
        rtol=1e-5,
        atol=1e-6,
    )


def test_item_stats_count_only_earlier_events_of_the_item():
    stats = ItemStats(["like"], prior=0.0)
    items = np.array(["a", "b", "a", "a"], dtype=object)
    y = np.array([[1.0], [0.0], [0.0], [np.nan]], dtype=np.float32)
    value = np.array([5, 1, 2, np.nan], dtype=np.float32)
    out = stats.score_then_fold(items, np.arange(4.0) * 86400, y, value)
    names = stats.feature_names
    events = out[:, names.index("item_log_events")]
    np.testing.assert_allclose(np.expm1(events), [0, 0, 1, 2], atol=1e-6)
    rate = out[:, names.index("item_rate_like")]
    assert rate[2] == pytest.approx(1.0) and rate[3] == pytest.approx(0.5)
    age = np.expm1(out[:, names.index("item_log_age_days")])
    np.testing.assert_allclose(age, [0, 0, 2, 3], atol=1e-5)


def test_metadata_hyperedges_type_tokens_and_skip_items_without_metadata():
    edges = metadata_hyperedges(
        [Item("x", title="The Matrix", categories=("Sci-Fi",), year=1999), Item("y")]
    )
    assert edges == [("x", ["w:matrix", "c:sci-fi", "y:1999", "d:1990s"])]


def test_train_mlp_learns_a_separable_signal_and_is_reproducible():
    rng = np.random.default_rng(0)
    from sketchstream.models.mlp import MLPInputs

    def data(n):
        dense = rng.normal(size=(n, 3)).astype(np.float32)
        codes = rng.integers(-1, 8, (n, 1, 2)).astype(np.int16)
        y = (dense[:, :1] + 0.3 * rng.normal(size=(n, 1)) > 0).astype(np.float32)
        return MLPInputs(dense, codes), y

    (tr, y_tr), (va, y_va) = data(2000), data(500)
    cfg = MLPConfig(n_dense=3, modalities=1, depth=2, width=8, hidden=16, blocks=1)
    runs = [
        train_mlp(
            tr, y_tr, va, y_va, cfg, epochs=3, batch_size=128, lr=1e-2, progress=False, seed=3
        )
        for _ in range(2)
    ]
    (m1, hist), (m2, _) = runs
    assert max(h["val_auc"] for h in hist) > 0.9
    np.testing.assert_array_equal(m1.predict(va), m2.predict(va))
