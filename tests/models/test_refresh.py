"""The refreshed model and its gate (models/refresh.py): pure, no broker."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sketchstream.models.events import EventTable, protocol_split
from sketchstream.models.refresh import (
    GateConfig,
    build_candidate,
    gate,
    score_serving,
    stream_order,
)
from sketchstream.models.trainer import TrainConfig

TINY = TrainConfig(
    cleora_dim=16,
    cleora_iterations=2,
    depth=4,
    width=8,
    hidden=32,
    blocks=1,
    epochs=8,
    lr=1e-2,
    batch_size=64,
    replay_batch=512,
    metadata=False,
)


def learnable_events(n: int = 3000, *, users: int = 40, items: int = 60, seed: int = 0):
    """Ratings driven by item quality and user bias (so a model can learn), plus views and
    likes, 5 minutes apart on average, in stream order."""
    rng = np.random.default_rng(seed)
    quality = rng.uniform(1.0, 5.0, items)
    bias = rng.normal(0.0, 0.7, users)
    user = rng.integers(0, users, n)
    item = np.minimum(rng.zipf(1.3, n) - 1, items - 1)
    rated = rng.random(n) < 0.7
    value = np.clip(np.round(quality[item] + bias[user] + rng.normal(0, 0.6, n)), 1, 5)
    action = np.where(rated, "rate", np.where(rng.random(n) < 0.5, "view", "like"))
    table = EventTable(
        user=np.array([f"u{u}" for u in user], dtype=object),
        item=np.array([f"i{i}" for i in item], dtype=object),
        action=action.astype(object),
        ts=1.7e9 + np.cumsum(rng.exponential(300.0, n)),
        value=np.where(rated, value, np.nan).astype(np.float32),
    )
    return stream_order(table)


def _figures(auc: float, logloss: float) -> dict[str, float]:
    return {"auc": auc, "logloss": logloss}


# --- the gate --------------------------------------------------------------------------------


def test_with_nothing_served_any_usable_candidate_is_published():
    verdict = gate({"like": _figures(0.61, 0.66)}, None)
    assert verdict.publish
    assert "no serving model" in verdict.reason


def test_an_auc_drop_beyond_the_tolerance_is_refused_and_the_reason_names_the_head():
    verdict = gate(
        {"like": _figures(0.780, 0.52)}, {"like": _figures(0.790, 0.52)}, GateConfig(0.002)
    )
    assert not verdict.publish
    assert "head like: AUC 0.7800 vs serving 0.7900" in verdict.reason
    assert "tolerance 0.002" in verdict.reason
    [head] = verdict.heads
    assert head.delta_auc == pytest.approx(-0.01)


def test_an_auc_drop_within_the_tolerance_passes():
    verdict = gate(
        {"like": _figures(0.7885, 0.52)}, {"like": _figures(0.790, 0.52)}, GateConfig(0.002)
    )
    assert verdict.publish, verdict.reason


def test_a_log_loss_rise_beyond_its_tolerance_is_refused():
    verdict = gate(
        {"like": _figures(0.80, 0.60)},
        {"like": _figures(0.79, 0.55)},
        GateConfig(tolerance=0.002, logloss_tolerance=0.01),
    )
    assert not verdict.publish
    assert "log loss 0.6000 vs serving 0.5500" in verdict.reason


def test_a_candidate_missing_a_served_head_is_refused():
    verdict = gate(
        {"like": _figures(0.8, 0.5)}, {"like": _figures(0.8, 0.5), "click": _figures(0.7, 0.4)}
    )
    assert not verdict.publish
    assert "no head click" in verdict.reason


def test_a_candidate_without_a_finite_auc_is_refused():
    verdict = gate({"like": _figures(math.nan, 0.5)}, {"like": _figures(0.7, 0.5)})
    assert not verdict.publish
    assert "no finite AUC" in verdict.reason


def test_every_task_is_gated_and_a_refusal_names_the_worse_one():
    serving = {"like": _figures(0.80, 0.50), "return": _figures(0.75, 0.10)}
    verdict = gate({"like": _figures(0.80, 0.50), "return": _figures(0.70, 0.10)}, serving)
    assert not verdict.publish
    assert "head return: AUC 0.7000 vs serving 0.7500" in verdict.reason
    assert "head like" not in verdict.reason


def test_a_head_the_holdout_labels_no_event_of_is_named_not_judged():
    unlabelled = {"auc": math.nan, "logloss": math.nan, "n": 0}
    serving = {"like": _figures(0.80, 0.50), "return": unlabelled}
    verdict = gate({"like": _figures(0.80, 0.50), "return": dict(unlabelled)}, serving)
    assert verdict.publish, verdict.reason
    assert verdict.reason.endswith("not judged (no labelled holdout event): return")
    assert [h.head for h in verdict.heads] == ["like"]
    verdict = gate({"like": _figures(0.70, 0.50), "return": dict(unlabelled)}, serving)
    assert not verdict.publish and "head like: AUC" in verdict.reason
    assert "not judged (no labelled holdout event): return" in verdict.reason
    only = gate({"return": dict(unlabelled)}, None)
    assert not only.publish and "the candidate has no heads judged" in only.reason


def test_the_recommendations_are_gated_with_the_heads():
    heads = {"like": _figures(0.80, 0.50)}
    worse = gate(heads, heads, recommend=({"hr@10": 0.10}, {"hr@10": 0.12}))
    assert not worse.publish
    assert "recommend: HR@10 0.1000 vs serving 0.1200 (-0.0200, tolerance 0.005)" in worse.reason
    assert worse.to_dict()["recommend"] == {"candidate": 0.10, "serving": 0.12, "tolerance": 0.005}
    level = gate(heads, heads, recommend=({"hr@10": 0.118}, {"hr@10": 0.12}))
    assert level.publish and "recommend HR@10 0.1180 vs 0.1200" in level.reason
    broken = gate(heads, heads, recommend=({"hr@10": math.nan}, None))
    assert not broken.publish and "no finite HR@10" in broken.reason
    assert "recommend" not in gate(heads, heads).to_dict()


@pytest.mark.parametrize("bad", [-0.1, math.inf, math.nan])
def test_gate_tolerances_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="tolerance"):
        GateConfig(tolerance=bad)


# --- the window ------------------------------------------------------------------------------


def test_stream_order_sorts_by_time_then_user_then_item():
    table = EventTable(
        user=np.array(["b", "a", "a", "c"], dtype=object),
        item=np.array(["x", "y", "x", "z"], dtype=object),
        action=np.array(["rate"] * 4, dtype=object),
        ts=np.array([2.0, 2.0, 2.0, 1.0]),
        value=np.ones(4, np.float32),
    )
    ordered = stream_order(table)
    assert list(zip(ordered.user, ordered.item, strict=True)) == [
        ("c", "z"),
        ("a", "x"),
        ("a", "y"),
        ("b", "x"),
    ]


# --- the candidate ---------------------------------------------------------------------------


def test_the_candidate_never_sees_the_holdout_or_validation_items_in_its_codebooks():
    window = learnable_events(2000)
    n = len(window)
    _, val, hold = protocol_split(n)
    # items that first appear after the training part
    item = window.item.copy()
    item[val.start + 5] = "fresh_in_validation"
    item[hold.start + 5] = "fresh_in_holdout"
    window = EventTable(window.user, item, window.action, window.ts, window.value)

    candidate = build_candidate(window, None, TINY)

    ids = set(candidate.result.codebooks["interactions"].ids_)
    assert "fresh_in_validation" not in ids and "fresh_in_holdout" not in ids
    assert "i0" in ids
    assert candidate.window["holdout_from"] == pytest.approx(window.ts[hold.start])
    assert candidate.window["holdout_events"] == hold.stop - hold.start
    assert set(candidate.timings) >= {"graph_cleora", "emde", "replay", "train"}
    assert candidate.holdout["like"]["auc"] > 0.7  # it learned the item qualities


def test_a_candidate_trained_on_shuffled_labels_is_refused_against_a_good_serving_model(
    tmp_path,
):
    from sketchstream.models.artifacts import load_model_artifact, save_trained_artifact
    from sketchstream.models.trainer import head_defs

    window = learnable_events(3000, seed=3)
    good = build_candidate(window, None, TINY)
    r = good.result
    version = save_trained_artifact(
        tmp_path,
        r,
        item_snapshot=good.item_snapshot,
        extra={"head_defs": head_defs(_heads()), "train": TINY.to_dict()},
    )
    serving = score_serving(load_model_artifact(tmp_path / version), window)
    assert serving["like"]["auc"] == pytest.approx(good.holdout["like"]["auc"], abs=1e-4)

    # the labels of everything before the holdout shuffled: the holdout itself unchanged
    hold = protocol_split(len(window))[2]
    value = window.value.copy()
    rng = np.random.default_rng(0)
    value[: hold.start] = rng.permutation(value[: hold.start])
    noisy = EventTable(window.user, window.item, window.action, window.ts, value)
    worse = build_candidate(noisy, None, TINY)

    verdict = gate(worse.holdout, serving, GateConfig(tolerance=0.002))
    assert not verdict.publish
    assert "head like: AUC" in verdict.reason and "vs serving" in verdict.reason


def _heads():
    from sketchstream.models.events import DEFAULT_HEADS

    return DEFAULT_HEADS
