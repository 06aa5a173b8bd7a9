"""The worker scores with the artifact's item snapshot, exactly as the offline path does."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch
from kafka_harness import ACTIONS, synthetic_events
from sketchstream.models.aggregator import Aggregator
from sketchstream.models.artifacts import load_model_artifact, save_model_artifact
from sketchstream.models.batches import EventBatch
from sketchstream.models.channels import (
    DAY,
    AggregatorConfig,
    Channel,
    aggregator_config_from_dict,
    aggregator_config_to_dict,
)
from sketchstream.models.emde import Codebook
from sketchstream.models.events import EventTable, labels
from sketchstream.models.mlp import EngagementMLP, MLPConfig
from sketchstream.models.scorer import Scorer
from sketchstream.models.snapshot import ItemSnapshot
from sketchstream.stream.records import RawMessage
from sketchstream.stream.worker import BatchProcessor, serving_model


def _table(events):
    return EventTable(
        user=np.array([e["user"] for e in events], dtype=object),
        item=np.array([e["item"] for e in events], dtype=object),
        action=np.array([e["action"] for e in events], dtype=object),
        ts=np.array([e["ts"] for e in events]),
        value=np.array([e.get("value", np.nan) for e in events], np.float32),
    )


def _artifact(root, history, similarity=False):
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(60)]
    codebook = Codebook(depth=4, width=8, seed=0).fit(rng.normal(size=(60, 8)).astype("f4"), ids)
    config = AggregatorConfig(
        channels=(Channel("liked_30d", "interactions", min_value=4.0, half_life_s=30 * DAY),),
        actions=ACTIONS,
        history_size=16,
    )
    table = _table(history)
    snapshot = ItemSnapshot.from_events(table, labels(table), ["like"], similarity=similarity)
    cf_width = len(snapshot.similarity.columns) if similarity else 0
    n_dense = 1 + 3 + len(snapshot.feature_names) + cf_width
    torch.manual_seed(0)
    mlp = EngagementMLP(MLPConfig(n_dense=n_dense, modalities=1, depth=4, width=8, hidden=16))
    mlp.set_normalization(rng.normal(size=(64, n_dense)).astype(np.float32) + 1.0)
    version = save_model_artifact(
        root,
        model=mlp,
        codebooks={"interactions": codebook},
        aggregator_config=aggregator_config_to_dict(config),
        item_snapshot=snapshot,
    )
    return load_model_artifact(root / version)


@pytest.mark.parametrize("similarity", [False, True], ids=["totals", "with_cf"])
def test_worker_scores_equal_offline_scores_with_the_same_snapshot(tmp_path, similarity):
    # with CF: a longer history, so that the similarity has neighbours to find
    n_hist = 900 if similarity else 250
    stream = synthetic_events(n_hist + 150, users=12, seed=4)
    history, live = stream[:n_hist], stream[n_hist:]
    bundle = _artifact(tmp_path, history, similarity)
    sim = bundle.item_snapshot.similarity
    assert (sim is not None and len(sim) > 0) == similarity
    assert bundle.item_snapshot.global_[0] == n_hist

    # the worker: two batches, states kept in a dict
    store: dict = {}
    proc = BatchProcessor(
        serving_model(bundle),
        lambda parts, keys: [store.get((p, k)) for p, k in zip(parts, keys, strict=True)],
    )
    online = {}
    for lo, hi in ((0, 70), (70, len(live))):
        msgs = [
            RawMessage("events", 0, k, live[k]["user"].encode(), orjson.dumps(live[k]), 1.0)
            for k in range(lo, hi)
        ]
        result = proc.process(msgs)
        for p, key, value in result.table_writes:
            store[(p, key)] = value
        for _, raw in result.predictions:
            rec = orjson.loads(raw)
            online[rec["event"]["offset"]] = rec["scores"]["like"]
    snapshot_after = bundle.item_snapshot.global_[0]
    assert snapshot_after == n_hist, "the worker never folds into the snapshot"

    # offline: one replay of the same events, scored through the same Scorer
    agg = Aggregator(aggregator_config_from_dict(bundle.aggregator_config), bundle.codebooks)
    users = list(dict.fromkeys(e["user"] for e in live))
    table = _table(live)
    feats = agg.score_then_fold(
        agg.new_batch(len(users)),
        EventBatch(
            user_index=[users.index(e["user"]) for e in live],
            item=table.item,
            action=[ACTIONS.index(e["action"]) for e in live],
            value=table.value,
            ts=table.ts,
            partition=np.zeros(len(live), np.int32),
            offset=np.arange(len(live)),
        ),
        item_similarity=Scorer.from_bundle(bundle).item_similarity,
    )
    if similarity:  # the CF columns are live: users like items with neighbours
        assert feats.cf is not None and np.abs(feats.cf[:, 0]).max() > 0
    offline = Scorer.from_bundle(bundle).score(feats, table.item, table.ts)[:, 0]
    assert sorted(online) == list(range(len(live)))
    np.testing.assert_allclose([online[k] for k in range(len(live))], offline, atol=1e-6)
    # and the snapshot matters: another snapshot gives other scores
    other = ItemSnapshot(["like"])
    moved = Scorer.from_bundle(bundle).score(feats, table.item, table.ts, snapshot=other)[:, 0]
    assert np.abs(moved - offline).max() > 1e-4
