"""The trainer: prequential replay (no leakage, prefix-stable), item statistics, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sketchstream.models.aggregator import Aggregator
from sketchstream.models.channels import default_config
from sketchstream.models.emde import Codebook
from sketchstream.models.events import DEFAULT_HEADS, EventTable, Item, labels
from sketchstream.models.mlp import MLPConfig, MLPInputs, assemble
from sketchstream.models.snapshot import refreshed_item_features
from sketchstream.models.trainer import build_inputs, metadata_hyperedges, replay, train_mlp

torch.set_num_threads(1)

N_USERS, N_ITEMS = 12, 30
D5 = 5 * 86400.0  # the refresh interval of the item snapshot in these tests


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


def _features(events: EventTable, codebooks, batch_size: int = 64, cf: bool = False) -> np.ndarray:
    """Replay ``events`` and return the assembled dense block ``(n, F)`` and codes.

    ``cf``: through the trainer's :func:`build_inputs` with the item-item CF similarity,
    rebuilt at every 5-day refresh boundary."""
    y = labels(events, DEFAULT_HEADS)
    if cf:
        x, _, rep = build_inputs(
            events,
            Aggregator(default_config(), codebooks),
            y,
            heads=["like"],
            item_snapshot=True,
            refresh_s=D5,
            batch_size=batch_size,
            progress=False,
            snapshot_options={"similarity": True, "similarity_min_new_likes": 1},
        )
        assert rep.features.cf is not None and np.abs(rep.features.cf[:, 0]).max() > 0
        return np.concatenate([x.dense, x.codes.reshape(len(events), -1)], axis=1)
    rep = replay(
        events, Aggregator(default_config(), codebooks), batch_size=batch_size, progress=False
    )
    # a 5-day refresh so that the 200-day test stream crosses many refresh boundaries
    items = refreshed_item_features(events, y, ["like"], refresh_s=D5)
    x = assemble(rep.features, items)
    return np.concatenate([x.dense, x.codes.reshape(len(events), -1)], axis=1)


def _with_value(events: EventTable, i: int, value: float) -> EventTable:
    v = events.value.copy()
    v[i] = value
    return EventTable(events.user, events.item, events.action, events.ts, v)


@pytest.mark.parametrize("cf", [False, True], ids=["base", "cf"])
@pytest.mark.parametrize("i", [0, 137, 398])
def test_changing_a_rating_changes_no_earlier_or_own_features_but_some_later(codebooks, i, cf):
    events = _stream()
    flipped = 1.0 if events.value[i] >= 4 else 5.0
    a = _features(events, codebooks, cf=cf)
    b = _features(_with_value(events, i, flipped), codebooks, cf=cf)
    # (tolerance: the aggregator's batched decay sums may differ in the last bits)
    np.testing.assert_allclose(a[: i + 1], b[: i + 1], rtol=1e-6, atol=1e-9)
    # later events of the same user see it at once, other events after the next refresh
    later = np.arange(len(events)) > i
    sees = later & ((events.user == events.user[i]) | (events.ts >= (events.ts[i] // D5 + 1) * D5))
    if sees.any():
        assert np.abs(a[sees] - b[sees]).max() > 1e-3


@pytest.mark.parametrize("cf", [False, True], ids=["base", "cf"])
def test_a_prefix_of_the_stream_gives_the_same_features_as_the_full_stream(codebooks, cf):
    events = _stream()
    full = _features(events, codebooks, batch_size=64, cf=cf)
    for stop in (1, 63, 64, 250) if not cf else (120, 250):
        prefix = _features(events[:stop], codebooks, batch_size=64, cf=cf)
        np.testing.assert_allclose(prefix, full[:stop], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cf", [False, True], ids=["base", "cf"])
def test_features_do_not_depend_on_the_replay_batch_size(codebooks, cf):
    events = _stream()
    np.testing.assert_allclose(
        _features(events, codebooks, batch_size=7, cf=cf),
        _features(events, codebooks, batch_size=1000, cf=cf),
        rtol=1e-5,
        atol=1e-6,
    )


def test_metadata_hyperedges_type_tokens_and_skip_items_without_metadata():
    edges = metadata_hyperedges(
        [Item("x", title="The Matrix", categories=("Sci-Fi",), year=1999), Item("y")]
    )
    assert edges == [("x", ["w:matrix", "c:sci-fi", "y:1999", "d:1990s"])]


def _separable(rng: np.random.Generator) -> tuple:
    """2,000 training and 500 validation rows whose label is the sign of the first dense
    column, with noise: ``((inputs, y), (inputs, y))``."""
    from sketchstream.models.mlp import MLPInputs

    def data(n):
        dense = rng.normal(size=(n, 3)).astype(np.float32)
        codes = rng.integers(-1, 8, (n, 1, 2)).astype(np.int16)
        y = (dense[:, :1] + 0.3 * rng.normal(size=(n, 1)) > 0).astype(np.float32)
        return MLPInputs(dense, codes), y

    return data(2000), data(500)


def test_train_mlp_learns_a_separable_signal_and_is_reproducible():
    (tr, y_tr), (va, y_va) = _separable(np.random.default_rng(0))
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
    # two checks per epoch of 16 steps: the history counts epochs done
    assert [h["epoch"] for h in hist][:4] == [0.5, 1.0, 1.5, 2.0]


def test_train_mlp_with_a_weight_average_and_an_ensemble_learns_and_is_reproducible():
    (tr, y_tr), (va, y_va) = _separable(np.random.default_rng(1))
    cfg = MLPConfig(n_dense=3, modalities=1, depth=2, width=8, hidden=16, blocks=1)
    cfg = MLPConfig.from_dict({**cfg.to_dict(), "members": 2, "quantiles": 16})
    kw = dict(epochs=3, batch_size=128, lr=1e-2, progress=False, seed=3, ema_epochs=0.25)
    (m1, hist), (m2, _) = (train_mlp(tr, y_tr, va, y_va, cfg, **kw) for _ in range(2))
    assert max(h["val_auc"] for h in hist) > 0.9
    np.testing.assert_array_equal(m1.predict(va), m2.predict(va))


def test_the_cf_like_threshold_follows_the_first_head_unless_set():
    from sketchstream.models.events import parse_head
    from sketchstream.models.trainer import TrainConfig, snapshot_options

    reorder = parse_head("reorder:purchase>=1")
    assert snapshot_options(TrainConfig(), [reorder])["like_min"] == 1.0
    assert snapshot_options(TrainConfig(), [])["like_min"] == 4.0
    assert snapshot_options(TrainConfig(similarity_like_min=3.0), [reorder])["like_min"] == 3.0


def _item_signal(rng: np.random.Generator) -> tuple:
    """Rows whose label is carried by the item's codes alone (the dense columns are noise):
    ``((inputs, y), (inputs, y))``."""
    from sketchstream.models.mlp import MLPInputs

    def data(n):
        codes = rng.integers(0, 8, (n, 1, 2)).astype(np.int16)
        y = ((codes[:, 0, :1] >= 4) ^ (rng.random((n, 1)) < 0.1)).astype(np.float32)
        return MLPInputs(rng.normal(size=(n, 3)).astype(np.float32), codes), y

    return data(2000), data(500)


@pytest.mark.parametrize("signal", ["dense", "codes"])
def test_auto_item_codes_keeps_the_model_ahead_on_validation_after_the_race(signal):
    from sketchstream.models.fit import RACE_EPOCHS, train_choosing_codes

    rng = np.random.default_rng(5)
    (tr, y_tr), (va, y_va) = _separable(rng) if signal == "dense" else _item_signal(rng)
    cfg = MLPConfig(n_dense=3, modalities=1, depth=2, width=8, hidden=16, blocks=1)
    fit = dict(
        epochs=RACE_EPOCHS + 1, batch_size=128, lr=1e-2, progress=False, seed=3, ema_epochs=0.25
    )
    model, hist = train_choosing_codes(tr, y_tr, va, y_va, cfg, "auto", fit)
    kept = "on" if model.config.modalities else "off"
    dropped = "off" if kept == "on" else "on"
    assert hist[-1]["item_codes"] == kept  # the kept model's rows come last

    def raced(c):  # best validation AUC within the race's epochs
        return max(h["val_auc"] for h in hist if h["item_codes"] == c and h["epoch"] <= RACE_EPOCHS)

    assert raced(kept) >= raced(dropped)
    # the dropped one ran the race at most; the kept one ran on (no early stop here)
    assert max(h["epoch"] for h in hist if h["item_codes"] == dropped) <= RACE_EPOCHS
    assert max(h["epoch"] for h in hist if h["item_codes"] == kept) == RACE_EPOCHS + 1
    if signal == "codes":  # without the codes the label is noise to the model
        assert kept == "on" and raced("off") < 0.6 < 0.8 < raced("on")
    # paused for the other's epoch and resumed, the kept model is what its choice gives alone
    alone, hist_alone = train_choosing_codes(tr, y_tr, va, y_va, cfg, kept, fit)
    assert hist_alone == [h for h in hist if h["item_codes"] == kept]
    np.testing.assert_array_equal(alone.predict(va), model.predict(va))
    off, hist_off = train_choosing_codes(tr, y_tr, va, y_va, cfg, "off", fit)
    assert off.config.modalities == 0 and {h["item_codes"] for h in hist_off} == {"off"}
    other_items = MLPInputs(va.dense, (va.codes + 1) % 8)
    np.testing.assert_array_equal(off.predict(va), off.predict(other_items))  # codes unread


def test_item_codes_must_be_auto_on_or_off():
    from sketchstream.models.errors import ModelError
    from sketchstream.models.trainer import TrainConfig

    with pytest.raises(ModelError, match="item_codes='sometimes': expected one of auto, on, off"):
        TrainConfig(item_codes="sometimes")


def test_train_offers_exactly_the_item_code_choices_the_trainer_takes():
    """``train``'s option lists them again (importing the trainer would load torch for --help)."""
    from sketchstream.models.fit import ITEM_CODES
    from sketchstream.tools.train import ItemCodes

    assert tuple(c.value for c in ItemCodes) == ITEM_CODES


def test_a_distilled_student_learns_the_blend_of_labels_and_teacher_in_its_own_shape():
    """The student is fitted to the labels blended with the teacher's probabilities: a teacher
    trained on flipped labels pulls a student with weight 1 to the flipped answer, while weight
    0 leaves it on the labels; the student keeps its own width and the teacher's item-code
    choice, and the history holds the teacher's checks, then its own."""
    from sketchstream.models.fit import train_choosing_codes, train_distilled

    (tr, y_tr), (va, y_va) = _separable(np.random.default_rng(2))
    big = MLPConfig(n_dense=3, modalities=1, depth=2, width=8, hidden=32, blocks=1)
    small = MLPConfig.from_dict({**big.to_dict(), "hidden": 8})
    fit = dict(epochs=3, batch_size=128, lr=1e-2, progress=False, seed=3)
    teacher, t_hist = train_choosing_codes(tr, 1.0 - y_tr, va, 1.0 - y_va, big, "off", fit)
    aucs = {}
    for weight in (0.0, 1.0):
        student, hist = train_distilled(teacher, t_hist, tr, y_tr, va, y_va, small, weight, fit)
        assert student.config.hidden == 8 and student.config.modalities == 0
        assert [h.get("teacher", False) for h in hist] == [True] * len(t_hist) + [False] * (
            len(hist) - len(t_hist)
        )
        aucs[weight] = _auc(y_va[:, 0], student.predict(va)[:, 0])
    # (early stopping judges the student on the true labels: it keeps its least flipped check)
    assert aucs[0.0] > 0.9 and aucs[1.0] < 0.3


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sketchstream.models.metrics import binary_metrics

    return binary_metrics(y, p)["auc"]


def test_a_teacher_width_and_distill_weight_are_checked():
    from sketchstream.models.errors import ModelError
    from sketchstream.models.trainer import TrainConfig

    with pytest.raises(ModelError, match="teacher_hidden=-1"):
        TrainConfig(teacher_hidden=-1)
    with pytest.raises(ModelError, match=r"distill_weight=1\.5: expected 0 to 1"):
        TrainConfig(distill_weight=1.5)
