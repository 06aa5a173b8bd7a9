"""Trees on the dense inputs blended with a head's logit: fitted and weighted on validation,
applied by the model's own predict (both forwards), saved and loaded exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sketchstream.models import kernels
from sketchstream.models.artifacts import BOOST, load_model_artifact, save_model_artifact
from sketchstream.models.boost import HeadBoost, Trees, boost_heads, fit_boost
from sketchstream.models.channels import aggregator_config_to_dict, default_config
from sketchstream.models.emde import Codebook
from sketchstream.models.errors import ArtifactError, ModelError
from sketchstream.models.events import Head
from sketchstream.models.metrics import roc_auc
from sketchstream.models.mlp import EngagementMLP, MLPConfig, MLPInputs

torch.set_num_threads(1)

N_DENSE = 4
HEADS = ("like", "return")


def rows(n, seed):
    """Dense rows and two heads' labels: ``like`` linear in column 0, ``return`` a step on
    column 1 times a band of column 2 (what trees split and a linear logit does not)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_DENSE)).astype(np.float32)
    like = (x[:, 0] + rng.normal(scale=0.5, size=n) > 0).astype(np.float64)
    band = (x[:, 1] > 0.3) & (np.abs(x[:, 2]) < 0.8)
    ret = np.where(rng.random(n) < 0.9, band, ~band).astype(np.float64)
    y = np.stack([like, ret], axis=1)
    y[rng.random(n) < 0.1, 1] = np.nan  # unlabelled rows, as at the stream's end
    return x, y


@pytest.fixture(scope="module")
def fitted():
    x_tr, y_tr = rows(6000, 0)
    x_va, y_va = rows(2000, 1)
    z_va = np.stack([x_va[:, 0] * 2.0, x_va[:, 1]], axis=1).astype(np.float64)  # "the MLP"
    boost, report = fit_boost([1], HEADS, (x_tr, y_tr), (x_va, y_va, z_va), threads=1)
    return boost, report, (x_va, y_va, z_va)


def test_the_weight_is_chosen_on_validation_and_the_blend_beats_the_logit_alone(fitted):
    boost, report, (x_va, y_va, z_va) = fitted
    assert boost is not None and [h.head for h in boost.heads] == ["return"]
    r = report["return"]
    assert 0.0 < r["weight"] <= 1.0 and 1 <= r["rounds"] <= 100
    assert r["val_auc"] > r["val_auc_mlp"] + 0.05
    logits = z_va.astype(np.float32).copy()
    boost.blend(x_va, logits)
    np.testing.assert_array_equal(logits[:, 0], z_va[:, 0].astype(np.float32))  # not boosted
    known = ~np.isnan(y_va[:, 1])
    assert roc_auc(y_va[known, 1], logits[known, 1]) == pytest.approx(r["val_auc"], abs=1e-6)


def test_a_head_the_trees_cannot_improve_keeps_the_mlp_alone():
    x_tr, y_tr = rows(3000, 2)
    x_va, y_va = rows(1000, 3)
    perfect = np.where(np.isnan(y_va), 0.0, y_va * 20.0 - 10.0)  # validation AUC 1 already
    boost, report = fit_boost([0, 1], HEADS, (x_tr, y_tr), (x_va, y_va, perfect), threads=1)
    assert boost is None
    assert report["like"]["weight"] == 0.0 and report["return"]["weight"] == 0.0


def test_which_heads_are_boosted():
    heads = [Head("like", ("rate",), 4.0), Head("return", (), horizon=7 * 86400.0)]
    assert boost_heads("return", heads) == [1]
    assert boost_heads("all", heads) == [0, 1]
    assert boost_heads("off", heads) == []
    with pytest.raises(ModelError, match="boost='trees'"):
        boost_heads("trees", heads)


def test_train_offers_exactly_the_boost_choices_the_trainer_takes():
    from sketchstream.models.boost import BOOST_HEADS
    from sketchstream.tools.train import Boost

    assert tuple(c.value for c in Boost) == BOOST_HEADS


def boosted_model(boost):
    torch.manual_seed(0)
    cfg = MLPConfig(n_dense=N_DENSE, modalities=1, depth=3, width=8, hidden=8, heads=HEADS)
    model = EngagementMLP(cfg)
    model.set_normalization(rows(500, 4)[0])
    model.eval()
    model.boost = boost
    return model


def model_inputs(n, seed):
    rng = np.random.default_rng(seed)
    return MLPInputs(rows(n, seed)[0], rng.integers(-1, 8, (n, 1, 3)).astype(np.int16))


def test_predict_blends_the_boosted_head_in_both_forwards(fitted, monkeypatch):
    boost = fitted[0]
    model = boosted_model(None)
    inputs = model_inputs(300, 5)
    plain = model.predict(inputs)
    model.boost = boost
    got = model.predict(inputs, batch_size=64)  # blended chunk by chunk
    np.testing.assert_array_equal(got[:, 0], plain[:, 0])
    raw = boost.heads[0].trees.raw(inputs.dense)
    w = boost.heads[0].weight
    z = np.log(plain[:, 1].astype(np.float64)) - np.log1p(-plain[:, 1].astype(np.float64))
    want = 1.0 / (1.0 + np.exp(-((1 - w) * z + w * raw)))
    np.testing.assert_allclose(got[:, 1], want, rtol=0, atol=1e-5)
    monkeypatch.setattr(kernels, "ENABLED", False)  # torch's forward, the reference
    np.testing.assert_allclose(model.predict(inputs), got, rtol=0, atol=1e-6)


def test_the_boost_round_trips_through_its_dict_and_refuses_another_models_heads(fitted):
    boost = fitted[0]
    again = HeadBoost.from_dict(json.loads(json.dumps(boost.to_dict())), HEADS)
    x = model_inputs(200, 6).dense
    a, b = np.zeros((200, 2), np.float32), np.zeros((200, 2), np.float32)
    boost.blend(x, a)
    again.blend(x, b)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ModelError, match="the model's heads are"):
        HeadBoost.from_dict(boost.to_dict(), ("like", "click"))
    trees = boost.heads[0].trees
    assert trees.columns > 2  # its trees read column 2 at least (the label's own)
    with pytest.raises(ModelError, match="the model's dense block has 2"):
        HeadBoost.from_dict({**boost.to_dict(), "n_dense": 2}, HEADS)
    with pytest.raises(ModelError, match="malformed"):
        HeadBoost.from_dict({"heads": [{"head": "return"}]}, HEADS)
    with pytest.raises(ModelError, match="malformed"):
        HeadBoost.from_dict({**boost.to_dict(), "heads": [{"head": "return", "trees": 7}]}, HEADS)


def broken(trees, **change):
    """``trees``' dict with some arrays replaced: what a hand-edited file might hold."""
    return {**trees.to_dict(), **change}


def test_trees_that_would_not_end_or_read_outside_are_refused(fitted):
    trees = fitted[0].heads[0].trees
    n = len(trees.feature)
    loop = [0, *trees.to_dict()["left"][1:]]  # node 0's left child is itself
    for bad, match in (
        (broken(trees, left=loop), "node 0 has a bad left child"),
        (broken(trees, right=[n] * n), "bad right child"),
        (broken(trees, roots=[~len(trees.leaf_value)]), "root is neither"),
        (broken(trees, feature=[-1] * n), "negative column"),
        (broken(trees, leaf_value=[float("nan")] * len(trees.leaf_value)), "not a number"),
        (broken(trees, threshold=trees.to_dict()["threshold"][:-1]), "differ in length"),
    ):
        with pytest.raises(ModelError, match=match):
            Trees.from_dict(bad)


def test_the_trees_score_as_lightgbm_does_compiled_and_in_numpy(monkeypatch):
    """The arrays walked by the kernel and by the numpy reference give LightGBM's own raw
    score to the bit, NaN included (read as 0: its rule for splits that saw no missing value),
    for the best iteration and for all of them."""
    import lightgbm as lgb

    x, y = rows(3000, 8)
    booster = lgb.train(
        {"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1},
        lgb.Dataset(x, np.nan_to_num(y[:, 1])),
        num_boost_round=30,
    )
    probe = rows(500, 9)[0]
    probe[::7, 1] = np.nan
    probe[::11, 2] = np.inf
    for rounds in (12, 30):
        trees = Trees.from_booster(booster, rounds)
        want = booster.predict(probe, raw_score=True, num_iteration=rounds)
        assert len(trees.roots) == rounds
        np.testing.assert_array_equal(trees.raw(probe), want)
        np.testing.assert_array_equal(trees.raw_reference(probe), want)
    monkeypatch.setattr(kernels, "ENABLED", False)
    np.testing.assert_array_equal(trees.raw(probe), want)
    assert trees.raw(probe[:0]).shape == (0,)


def save(root, model):
    ids = [f"i{k}" for k in range(40)]
    rng = np.random.default_rng(0)
    codebook = Codebook(depth=3, width=8, seed=0).fit(rng.normal(size=(40, 6)).astype("f4"), ids)
    return save_model_artifact(
        root,
        model=model,
        codebooks={"interactions": codebook},
        aggregator_config=aggregator_config_to_dict(default_config()),
    )


def test_an_artifact_carries_the_boost_and_loads_the_same_scores(tmp_path, fitted):
    model = boosted_model(fitted[0])
    version = save(tmp_path, model)
    bundle = load_model_artifact(tmp_path / version)
    assert bundle.manifest["config"]["boost"] == fitted[0].summary()
    inputs = model_inputs(100, 7)
    np.testing.assert_array_equal(bundle.model.predict(inputs), model.predict(inputs))
    plain = save(tmp_path, boosted_model(None))
    assert plain != version and load_model_artifact(tmp_path / plain).model.boost is None
    assert not (tmp_path / plain / BOOST).exists()


def test_an_artifact_whose_boost_was_altered_is_refused(tmp_path, fitted):
    model = boosted_model(fitted[0])
    path = tmp_path / save(tmp_path, model)
    (path / BOOST).write_text(json.dumps({**fitted[0].to_dict(), "n_dense": 5}))
    with pytest.raises(ArtifactError, match=f"file '{BOOST}' fails its checksum"):
        load_model_artifact(path)
