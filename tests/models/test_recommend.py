"""The EMDE recommender: prequential inputs, determinism, learning (its catalogue top-k:
test_catalogue.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from sketchstream.models.aggregator import Aggregator
from sketchstream.models.channels import AggregatorConfig, Channel
from sketchstream.models.emde import Codebook, normalize
from sketchstream.models.errors import ModelError
from sketchstream.models.events import EventTable
from sketchstream.models.ranking import recommend_report
from sketchstream.models.recommend import (
    Catalogue,
    InputSpec,
    RecommendConfig,
    SketchRecommender,
    Validation,
    fit_recommender,
    replay_inputs,
)
from sketchstream.models.sasrec import SASRecConfig

torch.set_num_threads(1)

N_ITEMS = 48
HOUR = 3600.0


def _codebooks(seed: int = 0) -> dict[str, Codebook]:
    rng = np.random.default_rng(seed)
    ids = [f"i{k}" for k in range(N_ITEMS)]
    return {
        "interactions": Codebook(depth=4, width=16, seed=seed).fit(
            rng.normal(size=(N_ITEMS, 8)).astype("f4"), ids
        )
    }


def _config() -> AggregatorConfig:
    return AggregatorConfig(
        channels=(
            Channel("all", "interactions"),
            Channel("recent", "interactions", half_life_s=HOUR),
        ),
        actions=("view",),
        history_size=16,
    )


def _cycle_stream(n_users: int = 80, length: int = 20, seed: int = 0) -> EventTable:
    """Each user walks the item cycle i0 -> i1 -> ... from a random start, one step an hour,
    users interleaved in time: the next item is the one after the user's last."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(n_users):
        start = rng.integers(N_ITEMS)
        t0 = rng.uniform(0, 1000 * HOUR)
        for k in range(length):
            users.append(f"u{u}")
            items.append(f"i{(start + k) % N_ITEMS}")
            ts.append(t0 + k * HOUR)
    order = np.lexsort((np.array(items), np.array(users), np.array(ts)))
    n = len(users)
    return EventTable(
        user=np.array(users, dtype=object)[order],
        item=np.array(items, dtype=object)[order],
        action=np.array(["view"] * n, dtype=object),
        ts=np.array(ts)[order],
        value=np.full(n, np.nan, np.float32),
    )


def test_the_float16_cast_of_the_inputs_rounds_as_numpy_does() -> None:
    from sketchstream.models.recommend import to_float16

    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    ties = ((halves[:-1] + halves[1:]) / 2).astype(np.float32)  # exactly between two halves
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [ties, -ties, rng.normal(size=1000).astype(np.float32) * 1e-6, [7e4, -7e4, np.inf]]
    ).astype(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    assert np.array_equal(to_float16(x).view(np.uint16), want.view(np.uint16))


def test_inputs_are_the_normalized_sketches_read_before_each_event() -> None:
    events = _cycle_stream(n_users=3, length=5)
    agg = Aggregator(_config(), _codebooks())
    spec = InputSpec.build(
        agg.config, RecommendConfig(inputs=(("all",), ("recent",)), recent_length=10), 4, 16
    )
    x, codes = replay_inputs(events, agg, np.ones(len(events), bool), spec)
    assert x.shape == (len(events), spec.n_features) and x.dtype == np.float16
    cb = _codebooks()["interactions"]
    for i in range(len(events)):
        before = [j for j in range(i) if events.user[j] == events.user[i]]
        raw = np.zeros((4, 16))
        for j in before:
            raw[np.arange(4), cb.encode([events.item[j]])[0]] += 1.0
        want = normalize(raw.astype(np.float32)).reshape(-1)
        np.testing.assert_allclose(x[i, :64].astype(np.float32), want, atol=2e-3)
        assert np.array_equal(codes[i, 0], cb.encode([events.item[i]])[0])


def test_stored_inputs_read_as_the_whole_inputs_in_memory_or_spilled(monkeypatch, tmp_path):
    import sketchstream.models.recommend as recommend
    from sketchstream.models.recommend import StoredInputs, replay_stored

    events = _cycle_stream(n_users=4, length=6)
    spec = InputSpec.build(_config(), RecommendConfig(recent_length=10), 4, 16)
    keep = np.ones(len(events), bool)
    keep[::3] = False
    whole, whole_codes = replay_inputs(events, Aggregator(_config(), _codebooks()), keep, spec)
    agg = Aggregator(_config(), _codebooks())
    held, codes = replay_stored(events, agg, keep, spec, spill=tmp_path)
    assert not isinstance(held.base, np.memmap) and not list(tmp_path.iterdir())  # small
    assert held.shape == whole.shape and len(held) == len(whole)
    assert held.base.shape[1] < whole.shape[1] and held.last.shape == (len(whole), 10, 1, 4)
    rows = np.array([4, 0, 7])
    assert np.array_equal(held[rows], whole[rows]) and np.array_equal(codes, whole_codes)
    assert np.array_equal(held.part(2, 9)[slice(None)], whole[2:9])
    monkeypatch.setattr(recommend, "SPILL_BYTES", 0)
    agg = Aggregator(_config(), _codebooks())
    spilled, _ = replay_stored(events, agg, keep, spec, spill=tmp_path)
    assert isinstance(spilled.base, np.memmap) and isinstance(spilled.last, np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.npy", "last.npy"]
    assert np.array_equal(spilled[slice(None)], whole)
    plain = StoredInputs(spec, whole, None)  # whole inputs given as they are
    assert plain.shape == whole.shape and np.array_equal(plain[rows], whole[rows])


def test_a_spill_the_disk_cannot_hold_is_refused_before_it_is_written(monkeypatch, tmp_path):
    import shutil
    from collections import namedtuple

    import sketchstream.models.recommend as recommend

    monkeypatch.setattr(recommend, "SPILL_BYTES", 0)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**12, 10**12, 10**6))
    with pytest.raises(ModelError, match=r"need .* GB in .*free.*--recommender-train-events"):
        recommend.input_array("inputs", (1000, 1000), np.float16, tmp_path)
    assert not list(tmp_path.iterdir())
    assert recommend.input_array("inputs", (1000, 1000), np.float16).shape == (1000, 1000)


def test_a_recommender_learns_from_the_last_train_events_only() -> None:
    with pytest.raises(ModelError, match="train_events"):
        RecommendConfig(train_events=0)
    events = _cycle_stream(n_users=20, length=10)
    small = RecommendConfig(hidden=16, epochs=1, batch_size=64, recent_length=10)
    counts = {
        n: recommend_report(
            events,
            _codebooks(),
            _config(),
            config=RecommendConfig(**{**small.to_dict(), "train_events": n}),
            methods=("sketchstream",),
            val_events=None,
        ).counts["train_events"]
        for n in (None, 50)
    }
    assert counts == {None: len(events) * 8 // 10, 50: 50}


def test_an_events_inputs_do_not_depend_on_later_events() -> None:
    events = _cycle_stream(n_users=5, length=8)
    agg = lambda: Aggregator(_config(), _codebooks())  # noqa: E731
    spec = InputSpec.build(_config(), RecommendConfig(recent_length=10), 4, 16)
    cut = len(events) // 2
    changed = events.item.copy()
    changed[cut:] = "i0"
    other = EventTable(events.user, changed, events.action, events.ts, events.value)
    keep = np.ones(len(events), bool)
    a, _ = replay_inputs(events, agg(), keep, spec, batch_size=7)
    b, _ = replay_inputs(other, agg(), keep, spec, batch_size=7)
    assert np.array_equal(a[: cut + 1], b[: cut + 1])  # event `cut` itself: read before it
    assert not np.array_equal(a, b)


def _small_model(seed: int = 0, products: str = "int8") -> tuple[Any, np.ndarray]:
    """A 32-wide recommender fitted on a cycle stream's first 150 events, and the rest's
    inputs (held out)."""
    events = _cycle_stream(n_users=20, length=10)
    agg = Aggregator(_config(), _codebooks())
    spec = InputSpec.build(agg.config, RecommendConfig(recent_length=10), 4, 16)
    x, codes = replay_inputs(events, agg, np.ones(len(events), bool), spec)
    cat = Catalogue.from_codebooks(agg.codebooks, ["interactions"])
    target = np.array([cat.ids.index(i) for i in events.item])
    cfg = RecommendConfig(hidden=32, epochs=2, batch_size=32, seed=seed, products=products)
    val = Validation(x[150:], target[150:], None)
    model, _ = fit_recommender(x[:150], codes[:150], val, cat, cfg)
    return model, x[150:]


def _small_fit(seed: int) -> np.ndarray:
    model, held_out = _small_model(seed)
    return model.log_probs(held_out)


def _fit_both(seed: int = 0) -> tuple[Any, Any, np.ndarray]:
    """The same training as an ``"int8"`` and a ``"float32"`` recommender, and held-out inputs."""
    fixed, x = _small_model(seed, "int8")
    plain, _ = _small_model(seed, "float32")
    return fixed, plain, x


def test_an_int8_recommender_is_calibrated_after_training_and_close_to_float32(monkeypatch):
    """Trained the same way (the same weights), the int8 model's log-probabilities stay close
    to float32's; they do not depend on the batch, and the torch reference path (no JIT) gives
    the same bits."""
    from sketchstream.models import kernels

    fixed, plain, x = _fit_both()
    assert fixed.calibrated and fixed._int8_layers() is not None
    assert plain.calibrated and plain._int8_layers() is None
    for a, b in zip(fixed.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)
    got, want = fixed.log_probs(x), plain.log_probs(x)
    assert not np.array_equal(got, want)  # the int8 path ran
    # one digit a weight: ~0.6 % of the first layer's largest output on this 32-wide model
    np.testing.assert_allclose(got, want, atol=0.05)
    assert np.abs(got - want).mean() < 0.01
    rows = [fixed.log_probs(x[a : a + 3]) for a in range(0, len(x), 3)]
    np.testing.assert_array_equal(np.concatenate(rows), got)
    monkeypatch.setattr(kernels, "ENABLED", False)
    np.testing.assert_array_equal(fixed.log_probs(x), got)


def test_an_int8_recommenders_scales_are_saved_and_an_uncalibrated_one_runs_float32() -> None:
    fixed, plain, x = _fit_both()
    state = fixed.state_dict()
    assert {f"fixed_scale_{i}" for i in range(4)} <= set(state)
    assert not any(k.startswith("fixed_scale") for k in plain.state_dict())
    fresh = SketchRecommender(x.shape[1], 4, 16, hidden=32, blocks=2, dropout=0.1, products="int8")
    assert not fresh.calibrated  # no scales yet: the float32 forward
    fresh.load_state_dict(plain.state_dict(), strict=False)
    np.testing.assert_array_equal(fresh.log_probs(x), plain.log_probs(x))
    fresh.load_state_dict(state)
    assert fresh.calibrated
    np.testing.assert_array_equal(fresh.log_probs(x), fixed.log_probs(x))
    with pytest.raises(ModelError, match="products"):
        RecommendConfig(products="bf16")


def test_training_is_deterministic_given_a_seed() -> None:
    assert np.array_equal(_small_fit(0), _small_fit(0))
    assert not np.array_equal(_small_fit(0), _small_fit(1))


def test_on_a_predictable_stream_the_model_beats_popularity() -> None:
    events = _cycle_stream()
    result = recommend_report(
        events,
        _codebooks(),
        _config(),
        config=RecommendConfig(hidden=64, epochs=15, patience=3, batch_size=64, recent_length=10),
        sasrec=SASRecConfig(max_len=10, dim=16, blocks=1, epochs=3),
        val_events=None,
    )
    test = result.report["test"]
    assert set(result.report) == {"test", "test_with_seen"}
    assert set(test) == {"sketchstream", "popularity", "item_cf", "sasrec"}
    assert all(set(m) == {"hr@10", "ndcg@10", "mrr"} for m in test.values())
    assert all(0.0 <= v <= 1.0 for m in test.values() for v in m.values() if not math.isnan(v))
    assert test["sketchstream"]["ndcg@10"] > 0.5
    assert test["sketchstream"]["hr@10"] > test["popularity"]["hr@10"] + 0.2
    assert result.counts["test_events"] == len(events) - len(events) * 9 // 10
    stages = {f"{m}_{part}" for m in ("sketchstream", "popularity", "item_cf", "sasrec")
              for part in ("train", "test")}  # fmt: skip
    assert set(result.timings) == stages | {"replay", "target_codebooks"}
    assert all(seconds >= 0.0 for seconds in result.timings.values())


def test_recent_items_read_off_the_state_equal_those_read_off_the_stream() -> None:
    from sketchstream.models.batches import EventBatch
    from sketchstream.models.ranking import UserHistory
    from sketchstream.models.recommend import state_last_codes, stream_last_codes

    events = _cycle_stream(n_users=6, length=20)
    agg = Aggregator(_config(), _codebooks())  # history_size 16: older items fall out
    _, uid = np.unique(events.user.astype(str), return_inverse=True)
    state = agg.new_batch(int(uid.max()) + 1)
    all_codes = np.stack([cb.encode(events.item.tolist()) for cb in agg.codebooks.values()], 1)
    history = UserHistory(events.user, np.arange(len(events)))
    cbs = list(agg.codebooks.values())
    action = np.zeros(len(events), np.int64)
    for i in range(len(events)):  # before each event: the state's last items = the stream's
        online = state_last_codes(state, uid[i : i + 1], cbs, 10)
        offline = stream_last_codes(all_codes, history, np.array([i]), 10)
        assert np.array_equal(online, offline)
        batch = EventBatch.from_table(events, slice(i, i + 1), user_index=uid, action=action)
        agg.score_then_fold(state, batch)


def test_recent_sketches_weigh_the_newest_item_most() -> None:
    from sketchstream.models.recommend import recent_sketches

    last = np.array([[[[0, 1]], [[2, 3]]]])  # (1 user, 2 items, 1 modality, 2 levels)
    s = recent_sketches(last, [0.5], width=4).reshape(2, 4)
    norm = np.sqrt(1 + 0.25)
    np.testing.assert_allclose(s[0], [0.5 / norm, 0, 1 / norm, 0], rtol=1e-6)
    np.testing.assert_allclose(s[1], [0, 0.5 / norm, 0, 1 / norm], rtol=1e-6)


def test_recent_item_sketches_follow_the_state_sketches_in_the_inputs() -> None:
    from sketchstream.models.ranking import UserHistory
    from sketchstream.models.recommend import recent_sketches, stream_last_codes

    events = _cycle_stream(n_users=4, length=12)
    agg = Aggregator(_config(), _codebooks())
    rec = RecommendConfig(inputs=(("all",),), recent_decays=(0.5, 1.0), recent_length=6)
    spec = InputSpec.build(agg.config, rec, 4, 16)
    keep = np.zeros(len(events), bool)
    keep[::5] = True
    x, _ = replay_inputs(events, agg, keep, spec, batch_size=8)
    assert x.shape[1] == spec.n_features == 64 + 4 + 2 * 64
    all_codes = np.stack([cb.encode(events.item.tolist()) for cb in agg.codebooks.values()], 1)
    last = stream_last_codes(
        all_codes, UserHistory(events.user, np.arange(len(events))), np.flatnonzero(keep), 6
    )
    want = recent_sketches(last, (0.5, 1.0), 16).astype(np.float16)
    assert np.array_equal(x[:, 68:], want)


def test_recent_items_beyond_the_states_history_are_refused() -> None:
    with pytest.raises(ModelError, match="history_size"):
        InputSpec.build(_config(), RecommendConfig(recent_decays=(0.5,), recent_length=99), 4, 16)


_REC_WARM_UP_THEN_ANSWERS = """
import json
import numpy as np
from sketchstream.models import kernels, mlp_kernels
from sketchstream.models.emde import normalize
from sketchstream.models.recommend import SketchRecommender, recent_sketches

compiled = {
    "quantize16": mlp_kernels.quantize16,
    "dequantize8": mlp_kernels.dequantize8,
    "l2_rows": kernels.l2_rows,  # the inputs' normalization
    "recent_sketches": kernels.recent_sketches,
}
def signatures():
    return {n: len(k.signatures) for n, k in compiled.items()}
model = SketchRecommender(30, 4, 8, hidden=16, blocks=2, dropout=0.1, products="int8").eval()
x = np.random.default_rng(0).normal(size=(50, 30)).astype(np.float16)
model.set_normalization(x)
model.calibrate_products(x)  # the float32 forward: no kernel
before = signatures()
model.warm_up()
warm = signatures()
model.log_probs(x[:7])
normalize(np.ones((7, 3, 16), np.float32))
recent_sketches(np.zeros((7, 5, 2, 3), np.int32), (0.1, 0.9), 16)
print(json.dumps([before, warm, signatures()]))
"""


def test_warm_up_compiles_the_int8_recommenders_kernels() -> None:
    """In a fresh process: ``warm_up`` compiles the int8 products' kernels and the inputs'
    normalization, answers add none (the worker warms a served recommender up when it loads
    the model)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _REC_WARM_UP_THEN_ANSWERS], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    before, warm, after = json.loads(out.stdout)
    assert all(n == 0 for n in before.values()), before
    assert all(n == 1 for n in warm.values()) and after == warm, (warm, after)


def test_the_recommenders_own_codebooks_give_both_its_targets_and_its_catalogue() -> None:
    from sketchstream.models.catalogue import Catalogue
    from sketchstream.models.ranking import fit_target_codebooks, target_codes

    events = _cycle_stream()
    config = RecommendConfig(target_depth=3, target_width=32, seed=4)
    cleora = {"dim": 8, "iterations": 2}
    books = fit_target_codebooks(events, None, ("interactions",), config, cleora)
    book = books["interactions"]
    assert (book.depth, book.width) == (3, 32)
    # seeded: the same codebooks again, and the training period only (protocol_split)
    again = fit_target_codebooks(events, None, ("interactions",), config, cleora)
    assert again["interactions"].version == book.version
    catalogue = Catalogue.from_codebooks(books, ["interactions"])
    codes, modalities = target_codes(books, ["interactions"], events.item)
    assert codes.shape == (len(events), 1, 3) and modalities == [0]
    for item, code in zip(events.item[:50], codes[:50], strict=True):
        row = catalogue.ids.index(item)  # the catalogue's buckets are the target's, offset
        np.testing.assert_array_equal(catalogue.levels[row], code[0] + 32 * np.arange(3))
    unknown, _ = target_codes(books, ["interactions"], ["not-an-item"])
    assert (unknown == -1).all()  # no loss on it
    with pytest.raises(ModelError, match="no such codebook"):
        fit_target_codebooks(events, None, ("metadata",), config, cleora)
    with pytest.raises(ModelError, match="go together"):
        RecommendConfig(target_depth=3, target_width=None)
    with pytest.raises(ModelError, match="target_width"):
        RecommendConfig(target_width=1)
