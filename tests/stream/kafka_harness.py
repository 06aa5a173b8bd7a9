"""The streaming tests' harness: a tiny model artifact, synthetic events, worker processes
against the real broker, Kafka read/write helpers (aiokafka, nothing mocked) and the offline
reference the worker is compared with."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from sketchstream.tools.kafka_io import free_port

ACTIONS = ("view", "like", "rate")
DAY = 86_400.0


# --- the model -----------------------------------------------------------------------------


def build_tiny_artifact(root: Path, seed: int = 0, *, recommender: bool = False) -> str:
    """A small but real model artifact: one codebook (depth 4, width 8) over 60 items, two
    channels, the recency and calendar count columns (so the tests that hold the worker to
    the offline replay cover them), a 16-wide MLP whose head is blended with trees on its
    dense inputs (:func:`_tiny_boost`: the worker, its helper and the offline replay all
    score through it); with ``recommender``, also a top-k
    recommender fitted on :func:`synthetic_events` (recent-item inputs, items with
    categories). Returns its version."""
    import torch
    from sketchstream.models.artifacts import save_model_artifact
    from sketchstream.models.channels import AggregatorConfig, Channel, aggregator_config_to_dict
    from sketchstream.models.emde import Codebook
    from sketchstream.models.mlp import EngagementMLP, MLPConfig

    rng = np.random.default_rng(seed)
    ids = [f"i{k}" for k in range(60)]
    codebook = Codebook(depth=4, width=8, seed=seed).fit(
        rng.normal(size=(60, 8)).astype(np.float32), ids
    )
    config = AggregatorConfig(
        channels=(
            Channel("all", "interactions", half_life_s=1e9),
            Channel("liked_30d", "interactions", min_value=4.0, half_life_s=30 * DAY),
        ),
        actions=ACTIONS,
        history_size=16,
        recency=True,
        windows=True,
        calendar=True,
    )
    n_dense = len(config.channels) + len(config.count_names)  # densities, then the counts
    torch.manual_seed(seed)
    mlp = EngagementMLP(
        MLPConfig(n_dense=n_dense, modalities=1, depth=4, width=8, hidden=16, blocks=1)
    )
    mlp.set_normalization(rng.normal(size=(64, n_dense)).astype(np.float32) + 1.0)
    mlp.boost = _tiny_boost(n_dense, seed)
    codebooks = {"interactions": codebook}
    return save_model_artifact(
        root,
        model=mlp,
        codebooks=codebooks,
        aggregator_config=aggregator_config_to_dict(config),
        recommender=_tiny_recommender(config, codebooks, seed) if recommender else None,
    )


def _tiny_boost(n_dense: int, seed: int) -> Any:
    """Trees for the tiny MLP's one head, half of its logit: fitted on made-up rows (labels a
    step on the first two columns, near the counts' values), so the score moves with the
    features the worker computes."""
    import lightgbm as lgb
    from sketchstream.models.boost import BoostedHead, HeadBoost, Trees

    rng = np.random.default_rng(seed + 1)
    x = rng.exponential(2.0, size=(2000, n_dense)).astype(np.float32)
    y = ((x[:, 0] > 1.0) ^ (x[:, 1] > 2.0)).astype(np.float64)
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(x, y), num_boost_round=10)
    return HeadBoost([BoostedHead("like", 0, 0.5, Trees.from_booster(booster, 10), 10)], n_dense)


def item_categories(item: str) -> tuple[str, ...]:
    """The tiny catalogue's categories: ``even`` or ``odd`` by the item's number."""
    return ("even",) if int(item[1:]) % 2 == 0 else ("odd",)


def _tiny_recommender(config: Any, codebooks: dict[str, Any], seed: int) -> Any:
    from sketchstream.models.aggregator import Aggregator
    from sketchstream.models.artifacts import RecommenderParts
    from sketchstream.models.emde import Codebook
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

    raw = synthetic_events(400, users=30, seed=seed + 100)
    events = EventTable(
        user=np.array([e["user"] for e in raw], dtype=object),
        item=np.array([e["item"] for e in raw], dtype=object),
        action=np.array([e["action"] for e in raw], dtype=object),
        ts=np.array([e["ts"] for e in raw]),
        value=np.array([e.get("value", np.nan) for e in raw], np.float32),
    )
    agg = Aggregator(config, codebooks)
    rec = RecommendConfig(
        hidden=16,
        epochs=1,
        batch_size=32,
        recent_decays=(0.7,),
        recent_length=8,
        target_depth=4,
        target_width=32,
    )
    spec = InputSpec.build(config, rec, agg.depth, agg.width)
    ids = codebooks["interactions"].ids_
    known = np.array([i in ids for i in events.item])
    x, _ = replay_inputs(events, agg, known, spec)
    # its own target codebooks (as train fits them), finer than the state's
    vectors = np.random.default_rng(seed + 7).normal(size=(len(ids), 8)).astype("f4")
    targets = {"interactions": Codebook(depth=4, width=32, seed=seed).fit(vectors, list(ids))}
    codes, _ = target_codes(targets, ["interactions"], events.item[known])
    items = [Item(i, categories=item_categories(i)) for i in ids]
    catalogue = Catalogue.from_codebooks(targets, ["interactions"], items)
    target = np.array([catalogue.ids.index(i) for i in events.item[known]])
    cut = len(x) * 3 // 4
    model, _ = fit_recommender(
        x[:cut], codes[:cut], Validation(x[cut:], target[cut:], None), catalogue, rec
    )
    return RecommenderParts(model, rec, spec, catalogue, ("interactions",), targets)


def synthetic_events(n: int, *, users: int = 40, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` canonical events over ``users`` users and 70 items (10 unknown to the codebook),
    in time order, each with an ``event_id``."""
    rng = np.random.default_rng(seed)
    ts = 1_000_000_000.0 + np.cumsum(rng.exponential(600.0, size=n))
    out = []
    for k in range(n):
        action = ACTIONS[int(rng.integers(0, 3))]
        event: dict[str, Any] = {
            "user": f"u{int(rng.integers(0, users))}",
            "item": f"i{int(rng.integers(0, 70))}",
            "action": action,
            "ts": float(ts[k]),
            "event_id": f"e{k}",
        }
        if action == "rate":
            event["value"] = int(rng.integers(1, 6))
        out.append(event)
    return out


# --- Kafka helpers ---------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def create_topics(bootstrap: str, topics: dict[str, int], compacted: tuple = ()) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=p,
                    replication_factor=1,
                    topic_configs={"cleanup.policy": "compact"} if name in compacted else {},
                )
                for name, p in topics.items()
            ]
        )
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, prefixes: tuple[str, ...], suffix: str) -> None:
    """Delete the topics whose names start with one of ``prefixes`` and contain ``suffix``
    (a test's own: its data topics, its workers' changelog and assignor topics)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        doomed = [t for t in await admin.list_topics() if suffix in t and t.startswith(prefixes)]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, pairs: list[tuple[bytes | None, bytes | None]]):
    """Send ``(key, value)`` pairs in order; returns their ``(partition, offset)``."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, value=v, key=k) for k, v in pairs]
        meta = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in meta]


async def consume(
    bootstrap: str, topic: str, *, until: int | None = None, timeout: float = 60.0
) -> list[Any]:
    """Every record of ``topic`` from the beginning: waits for ``until`` records (or ``timeout``
    seconds), else reads to the current end."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = None
        deadline = time.monotonic() + timeout
        while not parts and time.monotonic() < deadline:
            cluster = await consumer._client.fetch_all_metadata()
            parts = cluster.partitions_for_topic(topic)
            if not parts:
                await asyncio.sleep(0.5)
        if not parts:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        end = await consumer.end_offsets(tps)
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for rs in batch.values():
                records.extend(rs)
            if until is None:
                if all([await consumer.position(tp) >= end[tp] for tp in tps]):
                    break
            elif len(records) >= until:
                break
        return records
    finally:
        await consumer.stop()


# --- worker processes ----------------------------------------------------------------------


_WORKER = "import typer; from sketchstream.tools.worker import worker; typer.run(worker)"


def record_batch_codecs(bootstrap: str, topic: str) -> set[int] | None:
    """The compression codec of every record batch of ``topic`` as the broker stored it
    (0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd: the low bits of each batch's attributes), read
    off the local broker's log segments; None when ``bootstrap`` is another broker."""
    import struct

    from sketchstream.stream.settings import load_settings
    from sketchstream.tools.broker import LocalBroker

    broker = LocalBroker(load_settings())
    if broker.bootstrap_servers != bootstrap or broker.pid() is None:
        return None
    codecs = set()
    for segment in broker.storage_dir.glob(f"{topic}-*/*.log"):
        data = segment.read_bytes()
        at = 0
        while at + 23 <= len(data):  # base offset 8, length 4, epoch 4, magic 1, crc 4, attrs 2
            (length,) = struct.unpack_from(">i", data, at + 8)
            if length <= 0:
                break
            (attributes,) = struct.unpack_from(">h", data, at + 21)
            codecs.add(attributes & 0x7)
            at += 12 + length
    return codecs


@dataclass
class StreamEnv:
    """Unique topics, app id and directories of one test."""

    bootstrap: str
    root: Path
    artifact_dir: Path
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    partitions: int = 4

    @property
    def app_id(self) -> str:
        return f"ssw-{self.suffix}"

    @property
    def topics(self) -> dict[str, str]:
        return {
            "events": f"events-{self.suffix}",
            "predictions": f"predictions-{self.suffix}",
            "dlq": f"events.dlq-{self.suffix}",
            "models": f"models-{self.suffix}",
            "recommend": f"recommend-{self.suffix}",
            "recommendations": f"recommendations-{self.suffix}",
        }

    @property
    def changelog(self) -> str:
        return f"{self.app_id}-users-changelog"

    def settings(self) -> Any:
        from sketchstream.stream.settings import Settings

        t = self.topics
        return Settings(
            kafka=self.bootstrap,
            topic_events=t["events"],
            topic_predictions=t["predictions"],
            topic_dlq=t["dlq"],
            topic_models=t["models"],
            topic_recommend=t["recommend"],
            topic_recommendations=t["recommendations"],
            partitions=self.partitions,
            artifact_dir=self.artifact_dir,
        )

    def delete_topics(self) -> None:
        """Everything this environment's tests made on the broker (a developer's broker
        otherwise collects thousands of test topics)."""
        prefixes = (*self.topics.values(), self.app_id)
        run(delete_topics(self.bootstrap, prefixes, self.suffix))

    def final_states(self) -> dict[str, bytes]:
        """The user states as the worker's changelog has them: each user's last record, the
        users whose last record is a tombstone left out."""
        records = run(consume(self.bootstrap, self.changelog))
        last: dict[str, bytes | None] = {}
        for r in sorted(records, key=lambda r: (r.partition, r.offset)):
            last[r.key.decode()] = r.value
        return {user: state for user, state in last.items() if state is not None}

    def create_topics(self) -> None:
        t = self.topics
        run(
            create_topics(
                self.bootstrap,
                {t["events"]: self.partitions, t["models"]: 1},
                compacted=(t["models"],),
            )
        )


class WorkerProcess:
    """``sketchstream worker`` in a subprocess, with its own state dir and web port."""

    def __init__(self, env: StreamEnv, name: str, *args: str) -> None:
        self.env = env
        self.name = name
        self.port = free_port()
        self.state_dir = env.root / f"state-{name}"
        self.log_path = env.root / f"worker-{name}.log"
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        t = self.env.topics
        environ = {
            **os.environ,
            "SKETCHSTREAM_KAFKA": self.env.bootstrap,
            "SKETCHSTREAM_TOPIC_EVENTS": t["events"],
            "SKETCHSTREAM_TOPIC_PREDICTIONS": t["predictions"],
            "SKETCHSTREAM_TOPIC_DLQ": t["dlq"],
            "SKETCHSTREAM_TOPIC_MODELS": t["models"],
            "SKETCHSTREAM_TOPIC_RECOMMEND": t["recommend"],
            "SKETCHSTREAM_TOPIC_RECOMMENDATIONS": t["recommendations"],
            "SKETCHSTREAM_PARTITIONS": str(self.env.partitions),
            "SKETCHSTREAM_STATE_DIR": str(self.state_dir),
            "SKETCHSTREAM_ARTIFACT_DIR": str(self.env.artifact_dir),
            "SKETCHSTREAM_WEB_PORT": str(self.port),
            "SKETCHSTREAM_APP_ID": self.env.app_id,
            "OMP_NUM_THREADS": "1",
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, *self.args],
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.env.root,
        )
        return self

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited:\n{self.tail()}")
            try:
                status, _ = self.get("/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"worker {self.name} not healthy in {timeout}s:\n{self.tail()}")

    def metric(self, name: str) -> float:
        """Sum of a Prometheus sample over its labels."""
        _, body = self.get("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --- the offline reference -----------------------------------------------------------------


def offline_reference(artifact_dir: Path, records: list[Any], batch: int = 10_000):
    """The offline replay engine over consumed event records: per partition in offset order,
    ``Aggregator.score_then_fold`` then the worker's ``Scorer`` (same inputs, same MLP).
    Returns ``(states, scores)``: ``{user: StateBatch row bytes}`` and
    ``{(partition, offset): scores (n_heads,)}``."""
    from sketchstream.models.aggregator import Aggregator
    from sketchstream.models.artifacts import ArtifactStore
    from sketchstream.models.batches import EventBatch
    from sketchstream.models.channels import aggregator_config_from_dict
    from sketchstream.models.scorer import Scorer

    bundle = ArtifactStore(artifact_dir).load()
    agg = Aggregator(aggregator_config_from_dict(bundle.aggregator_config), bundle.codebooks)
    scorer = Scorer.from_bundle(bundle)
    action_of = {a: k for k, a in enumerate(agg.config.actions)}
    states: dict[str, bytes] = {}
    scores: dict[tuple[int, int], np.ndarray] = {}
    by_partition: dict[int, list[Any]] = {}
    for r in records:
        by_partition.setdefault(r.partition, []).append(r)
    for p, rs in sorted(by_partition.items()):
        rs.sort(key=lambda r: r.offset)
        events = [orjson.loads(r.value) for r in rs]
        for start in range(0, len(rs), batch):
            chunk = list(range(start, min(start + batch, len(rs))))
            users = list(dict.fromkeys(events[i]["user"] for i in chunk))
            index = {u: k for k, u in enumerate(users)}
            state = agg.load([states.get(u) for u in users])
            eb = EventBatch(
                user_index=[index[events[i]["user"]] for i in chunk],
                item=np.array([events[i]["item"] for i in chunk], dtype=object),
                action=[action_of[events[i]["action"]] for i in chunk],
                value=[events[i].get("value", np.nan) for i in chunk],
                ts=[events[i]["ts"] for i in chunk],
                partition=[p] * len(chunk),
                offset=[rs[i].offset for i in chunk],
                event_id=np.array([events[i].get("event_id") for i in chunk], dtype=object),
            )
            feats = agg.score_then_fold(state, eb, item_similarity=scorer.item_similarity)
            assert feats.valid.all()
            pred = scorer.score(feats, eb.item, np.asarray(eb.ts, dtype=np.float64))
            for j, i in enumerate(chunk):
                scores[(p, rs[i].offset)] = pred[j]
            for u, blob in zip(users, agg.dump(state), strict=True):
                states[u] = blob
    return agg, states, scores


def assert_same_states(agg: Any, expected: dict[str, bytes], actual: dict[str, bytes]) -> None:
    """Same users with the same states: counts, offsets, clocks and history exactly; sketch
    weights up to float32 rounding (a fold split into other batch sizes sums in another order).
    """
    assert sorted(actual) == sorted(expected)
    users = sorted(expected)
    want = agg.load([expected[u] for u in users])
    got = agg.load([actual[u] for u in users])
    assert got.codebook_version == want.codebook_version
    for name, a in want._arrays().items():
        b = getattr(got, name)
        if name in ("partitions", "offsets"):  # slot order may differ: compare as sets
            for row in range(len(users)):
                pa = {
                    (int(p), int(o))
                    for p, o in zip(a[row], want.offsets[row], strict=True)
                    if p >= 0
                }
                pb = {
                    (int(p), int(o))
                    for p, o in zip(b[row], got.offsets[row], strict=True)
                    if p >= 0
                }
                if name == "partitions":
                    assert pa == pb, f"{users[row]}: last folded offsets {pb}, expected {pa}"
        elif a.dtype.kind == "f" and name in ("sketches", "hist_weight"):
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)
