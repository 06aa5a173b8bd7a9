"""Model artifacts: content-addressed, checksummed, refused when tampered with."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sketchstream.models.artifacts import (
    MANIFEST,
    WEIGHTS,
    ArtifactStore,
    load_model_artifact,
    save_model_artifact,
)
from sketchstream.models.channels import aggregator_config_to_dict, default_config
from sketchstream.models.emde import Codebook
from sketchstream.models.errors import ArtifactError
from sketchstream.models.mlp import EngagementMLP, MLPConfig, MLPInputs

torch.set_num_threads(1)


@pytest.fixture
def parts():
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(40)]
    codebook = Codebook(depth=3, width=8, seed=0).fit(rng.normal(size=(40, 6)).astype("f4"), ids)
    torch.manual_seed(0)
    model = EngagementMLP(MLPConfig(n_dense=4, modalities=1, depth=3, width=8, hidden=8))
    model.set_normalization(rng.normal(size=(10, 4)) * 3 + 1)
    return model, {"interactions": codebook}


def _save(root, parts, **kw):
    model, codebooks = parts
    return save_model_artifact(
        root,
        model=model,
        codebooks=codebooks,
        aggregator_config=aggregator_config_to_dict(default_config()),
        metrics={"test": {"auc": 0.8}},
        **kw,
    )


def _flip_last_byte(path) -> None:
    """Tamper with a file of an artifact: one bit of its last byte flipped."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _edit_manifest(artifact, edit) -> None:
    """Tamper with an artifact's manifest: ``edit(manifest)`` changes the parsed JSON."""
    path = artifact / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_round_trip_gives_the_same_predictions_and_config(tmp_path, parts):
    model, codebooks = parts
    version = _save(tmp_path, parts)
    bundle = load_model_artifact(tmp_path / version)
    assert bundle.version == version
    assert bundle.mlp_config == model.config
    assert bundle.codebook_versions == {"interactions": codebooks["interactions"].version}
    assert bundle.aggregator_config == aggregator_config_to_dict(default_config())
    assert bundle.metrics["test"]["auc"] == 0.8
    rng = np.random.default_rng(1)
    x = MLPInputs(rng.normal(size=(5, 4)).astype("f4"), rng.integers(-1, 8, (5, 1, 3)))
    np.testing.assert_array_equal(bundle.model.predict(x), model.predict(x))
    np.testing.assert_array_equal(
        bundle.codebooks["interactions"].encode(["i1", "zz"]),
        codebooks["interactions"].encode(["i1", "zz"]),
    )


def test_a_model_without_the_item_codes_round_trips(tmp_path, parts):
    """What ``train --item-codes off`` (or ``auto`` choosing off) saves: no sparse layer."""
    _, codebooks = parts
    torch.manual_seed(0)
    model = EngagementMLP(MLPConfig(n_dense=4, modalities=0, depth=3, width=8, hidden=8))
    model.set_normalization(np.random.default_rng(0).normal(size=(10, 4)))
    bundle = load_model_artifact(tmp_path / _save(tmp_path, (model, codebooks)))
    assert bundle.mlp_config.modalities == 0 and bundle.model.codes_in is None
    rng = np.random.default_rng(1)
    x = MLPInputs(rng.normal(size=(5, 4)).astype("f4"), rng.integers(-1, 8, (5, 1, 3)))
    np.testing.assert_array_equal(bundle.model.predict(x), model.predict(x))


@pytest.mark.parametrize("products", ["fixed16", "int8"])
def test_a_fixed_point_model_round_trips_and_one_never_calibrated_is_refused(
    tmp_path, parts, products
):
    """A fixed-point model's scales travel in the weights file: the loaded model predicts the
    same to the bit. One saved before ``calibrate_products`` would serve float32 products
    in place of the ones its test figures were measured with: refused at load."""
    _, codebooks = parts
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    config = MLPConfig(n_dense=4, modalities=1, depth=3, width=8, hidden=8, products=products)
    model = EngagementMLP(config)
    model.set_normalization(rng.normal(size=(10, 4)))
    raw = _save(tmp_path / "raw", (model, codebooks))
    with pytest.raises(ArtifactError, match="no calibrated input scales"):
        load_model_artifact(tmp_path / "raw" / raw)
    x = MLPInputs(rng.normal(size=(50, 4)).astype("f4"), rng.integers(-1, 8, (50, 1, 3)))
    model.calibrate_products(x)
    bundle = load_model_artifact(tmp_path / _save(tmp_path, (model, codebooks)))
    assert bundle.mlp_config.products == products and bundle.model.fixed_ready
    np.testing.assert_array_equal(bundle.model.predict(x), model.predict(x))


def test_directory_is_named_by_content_and_identical_content_saves_once(tmp_path, parts):
    v1 = _save(tmp_path, parts)
    v2 = _save(tmp_path, parts)
    assert v1 == v2
    assert [p.name for p in tmp_path.iterdir()] == [v1]
    manifest = json.loads((tmp_path / v1 / MANIFEST).read_text())
    assert manifest["content_hash"].startswith(v1)


def test_a_tampered_weights_file_is_refused_naming_the_file(tmp_path, parts):
    version = _save(tmp_path, parts)
    _flip_last_byte(tmp_path / version / WEIGHTS)
    with pytest.raises(ArtifactError, match=r"weights\.safetensors.*checksum"):
        load_model_artifact(tmp_path / version)


def test_a_tampered_manifest_is_refused(tmp_path, parts):
    version = _save(tmp_path, parts)
    _edit_manifest(tmp_path / version, lambda m: m["metrics"]["test"].update(auc=0.99))
    with pytest.raises(ArtifactError, match=r"manifest\.json was modified"):
        load_model_artifact(tmp_path / version)


def test_a_missing_or_extra_file_is_refused(tmp_path, parts):
    version = _save(tmp_path, parts)
    (tmp_path / version / "evil.pt").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="unexpected files"):
        load_model_artifact(tmp_path / version)
    (tmp_path / version / "evil.pt").unlink()
    (tmp_path / version / "codebook-interactions.bin").unlink()
    with pytest.raises(ArtifactError, match=r"codebook-interactions\.bin.*missing"):
        load_model_artifact(tmp_path / version)


def test_an_unknown_format_version_is_refused(tmp_path, parts):
    version = _save(tmp_path, parts)
    _edit_manifest(tmp_path / version, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_model_artifact(tmp_path / version)


def test_store_publishes_lists_newest_first_and_prunes_but_never_the_served(tmp_path, parts):
    model, codebooks = parts
    build = tmp_path / "build"
    versions = []
    for k in range(3):
        with torch.no_grad():
            model.head.bias.fill_(float(k))
        versions.append(_save(build, (model, codebooks)))
    store = ArtifactStore(tmp_path / "store")
    for v in versions:
        assert store.publish(build / v) == v
    assert store.versions() == versions[::-1]
    assert store.latest() == versions[-1]
    removed = store.prune(keep=1, serving=versions[0])
    assert removed == [versions[1]]
    assert set(store.versions()) == {versions[2], versions[0]}
    assert store.load(versions[0]).version == versions[0]


def test_store_refuses_to_publish_a_tampered_artifact(tmp_path, parts):
    version = _save(tmp_path / "build", parts)
    src = tmp_path / "build" / version
    shutil.copy(src / WEIGHTS, tmp_path / "w")
    (src / WEIGHTS).write_bytes((tmp_path / "w").read_bytes()[:-1])
    with pytest.raises(ArtifactError, match="checksum"):
        ArtifactStore(tmp_path / "store").publish(src)
    assert ArtifactStore(tmp_path / "store").versions() == []


def _snapshot():
    from sketchstream.models.snapshot import ItemSnapshot

    items = np.array(["i1", "i2", "i1", "ünï"], dtype=object)
    y = np.array([[1.0], [0.0], [np.nan], [1.0]])
    return ItemSnapshot(["like"], prior=5.0).fold(
        items, np.array([10.0, 20.0, 30.0, 40.5]), y, np.array([5, 1, np.nan, 4.0])
    )


def test_the_item_snapshot_round_trips_exactly_and_is_checksummed(tmp_path, parts):
    snap = _snapshot()
    version = _save(tmp_path, parts, item_snapshot=snap)
    bundle = load_model_artifact(tmp_path / version)
    assert bundle.item_snapshot.same_as(snap)
    assert bundle.manifest["config"]["item_snapshot"]["items"] == 3
    assert _save(tmp_path / "again", parts, item_snapshot=_snapshot()) == version
    _flip_last_byte(tmp_path / version / "item-snapshot.safetensors")
    with pytest.raises(ArtifactError, match=r"item-snapshot\.safetensors"):
        load_model_artifact(tmp_path / version)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda a: a.update(clock=True), r"unknown keys \['clock'\]"),
        (lambda a: a["channels"][0].update(decay="fast"), r"channel 'liked': unknown keys"),
        (lambda a: a.update(channels=["liked"]), "aggregator config"),
        (lambda a: a.update(history_size=-1), "history_size"),
    ],
)
def test_an_aggregator_config_this_version_cannot_compute_is_refused(tmp_path, parts, edit, match):
    """An artifact of a newer sketchstream (a key this one does not know) or a malformed
    config: a clear ArtifactError at load, which a worker's model feed refuses and logs, not a
    TypeError that stops it."""
    config = aggregator_config_to_dict(default_config())
    edit(config)
    model, codebooks = parts
    version = save_model_artifact(
        tmp_path, model=model, codebooks=codebooks, aggregator_config=config, metrics={}
    )
    with pytest.raises(ArtifactError, match=match):
        load_model_artifact(tmp_path / version)


def test_online_item_stats_configs_are_refused(tmp_path, parts):
    with pytest.raises(ArtifactError, match="item_snapshot"):
        _save(tmp_path, parts, item_snapshot={"heads": ["like"], "prior": 10.0})


def _recommender(
    codebooks,
    *,
    categories: bool = True,
    recent: bool = True,
    products: str = "int8",
    own: bool = True,
):
    """A tiny fitted recommender on a cycle stream (each user walks i0 -> i1 -> ...) and the
    aggregator config it reads, as ``(RecommenderParts, aggregator config, inputs)``; ``own``:
    it predicts the buckets of its own codebooks (4 x 16), else the state's."""
    from sketchstream.models.aggregator import Aggregator
    from sketchstream.models.artifacts import RecommenderParts
    from sketchstream.models.channels import AggregatorConfig, Channel
    from sketchstream.models.events import EventTable, Item
    from sketchstream.models.ranking import target_codes
    from sketchstream.models.recommend import (
        Catalogue,
        InputSpec,
        RecommendConfig,
        Validation,
        fit_recommender,
        replay_inputs,
    )

    config = AggregatorConfig(
        channels=(
            Channel("all", "interactions"),
            Channel("recent", "interactions", half_life_s=3600.0),
        ),
        actions=("view",),
        history_size=8,
    )
    users = [f"u{k // 6}" for k in range(60)]
    items = [f"i{(k // 6 * 7 + k % 6) % 40}" for k in range(60)]
    order = np.lexsort((np.array(items), np.array(users), np.arange(60) % 6))
    events = EventTable(
        user=np.array(users, dtype=object)[order],
        item=np.array(items, dtype=object)[order],
        action=np.array(["view"] * 60, dtype=object),
        ts=1e9 + 3600.0 * (np.arange(60) % 6)[order],
        value=np.full(60, np.nan, np.float32),
    )
    agg = Aggregator(config, codebooks)
    rec = RecommendConfig(
        hidden=16,
        epochs=1,
        batch_size=16,
        recent_decays=(0.5,) if recent else (),
        recent_length=4,
        products=products,
        target_depth=4 if own else None,
        target_width=16 if own else None,
    )
    spec = InputSpec.build(config, rec, agg.depth, agg.width)
    x, codes = replay_inputs(events, agg, np.ones(60, bool), spec)
    targets = codebooks
    if own:
        ids = list(codebooks["interactions"].ids_)
        vectors = np.random.default_rng(1).normal(size=(len(ids), 6)).astype("f4")
        targets = {"interactions": Codebook(depth=4, width=16, seed=3).fit(vectors, ids)}
        codes, _ = target_codes(targets, ["interactions"], events.item)
    cats = [Item(f"i{k}", categories=("even",) if k % 2 == 0 else ("odd",)) for k in range(40)]
    catalogue = Catalogue.from_codebooks(targets, ["interactions"], cats if categories else None)
    target = np.array([catalogue.ids.index(i) for i in events.item])
    model, _ = fit_recommender(
        x[:40], codes[:40], Validation(x[40:], target[40:], None), catalogue, rec
    )
    own_codebooks = targets if own else None
    parts = RecommenderParts(model, rec, spec, catalogue, ("interactions",), own_codebooks)
    return parts, config, x


def _save_with_recommender(root, parts, **kw):
    from sketchstream.models.channels import aggregator_config_to_dict

    model, codebooks = parts
    recommender, config, x = _recommender(codebooks, **kw)
    version = save_model_artifact(
        root,
        model=model,
        codebooks=codebooks,
        aggregator_config=aggregator_config_to_dict(config),
        recommender=recommender,
    )
    return version, recommender, x


def test_an_artifact_without_a_recommender_loads_none(tmp_path, parts):
    assert load_model_artifact(tmp_path / _save(tmp_path, parts)).recommender is None


def test_the_recommender_round_trips_its_scores_catalogue_and_config(tmp_path, parts):
    version, saved, x = _save_with_recommender(tmp_path, parts)
    loaded = load_model_artifact(tmp_path / version).recommender
    assert loaded.config == saved.config and loaded.spec == saved.spec
    assert loaded.targets == ("interactions",)
    own = loaded.codebooks["interactions"]
    assert own.version == saved.codebooks["interactions"].version and own.width == 16
    assert loaded.catalogue.width == 16 and loaded.catalogue.levels.shape == (40, 4)
    assert loaded.catalogue.ids == saved.catalogue.ids
    np.testing.assert_array_equal(loaded.catalogue.levels, saved.catalogue.levels)
    assert loaded.catalogue.categories == saved.catalogue.categories
    np.testing.assert_array_equal(loaded.model.log_probs(x), saved.model.log_probs(x))
    ids, _ = loaded.catalogue.top_k(loaded.model.log_probs(x[:3]), 5)
    assert ids == saved.catalogue.top_k(saved.model.log_probs(x[:3]), 5)[0]


def test_an_int8_recommender_loads_calibrated_and_one_without_scales_is_refused(tmp_path, parts):
    version, saved, _ = _save_with_recommender(tmp_path, parts)
    loaded = load_model_artifact(tmp_path / version).recommender
    assert loaded.config.products == "int8" and loaded.model.calibrated
    saved.model.fixed_scale_0.zero_()  # as if never calibrated
    saved.model._int8 = None
    model, codebooks = parts
    from sketchstream.models.channels import aggregator_config_to_dict

    _, config, _ = _recommender(codebooks)
    bad = save_model_artifact(
        tmp_path / "bad",
        model=model,
        codebooks=codebooks,
        aggregator_config=aggregator_config_to_dict(config),
        recommender=saved,
    )
    with pytest.raises(ArtifactError, match="never calibrated"):
        load_model_artifact(tmp_path / "bad" / bad)


def test_a_recommender_saved_before_int8_products_loads_as_float32(tmp_path, parts):
    from sketchstream.models.artifacts import load_recommender

    version, saved, x = _save_with_recommender(tmp_path, parts, products="float32", own=False)
    manifest = json.loads((tmp_path / version / MANIFEST).read_text())
    entry = manifest["config"]["recommend"]
    for field in ("products", "target_depth", "target_width"):  # as before these fields
        del entry["config"][field]
    loaded = load_recommender(tmp_path / version, manifest, parts[1])
    assert loaded.config.products == "float32"
    assert loaded.config.target_width is None and loaded.codebooks is None  # the state's
    np.testing.assert_array_equal(loaded.catalogue.levels, saved.catalogue.levels)
    np.testing.assert_array_equal(loaded.model.log_probs(x), saved.model.log_probs(x))


def test_a_recommender_whose_config_and_codebooks_disagree_is_refused(tmp_path, parts):
    from sketchstream.models.artifacts import load_recommender

    version, _, _ = _save_with_recommender(tmp_path, parts)
    manifest = json.loads((tmp_path / version / MANIFEST).read_text())
    entry = manifest["config"]["recommend"]
    entry["config"]["target_depth"] = entry["config"]["target_width"] = None
    with pytest.raises(ArtifactError, match="config and its codebooks disagree"):
        load_recommender(tmp_path / version, manifest, parts[1])


def test_the_recommender_changes_the_version_and_a_catalogue_without_categories_loads(
    tmp_path, parts
):
    plain = _save(tmp_path, parts)
    version, _, _ = _save_with_recommender(tmp_path, parts, categories=False, recent=False)
    assert version != plain
    loaded = load_model_artifact(tmp_path / version).recommender
    assert loaded.catalogue.categories is None and loaded.spec.recent_decays == ()


@pytest.mark.parametrize(
    "name",
    ["recommend.safetensors", "recommend-catalogue.json", "recommend-codebook-interactions.bin"],
)
def test_a_tampered_recommender_file_is_refused_naming_it(tmp_path, parts, name):
    version, _, _ = _save_with_recommender(tmp_path, parts)
    _flip_last_byte(tmp_path / version / name)
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.") + ".*checksum"):
        load_model_artifact(tmp_path / version)
