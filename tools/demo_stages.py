"""The eight stages of ``sketchstream demo``, in the order :func:`run` calls them.

    1 broker    :func:`open_broker`     SKETCHSTREAM_KAFKA's, or the local one (leased; stopped
                                        at the end only when started here)
    2 topics    :func:`open_topics`     an earlier run's demo topics deleted, `topics create`
    3 data      :func:`load_data`       `data movielens-1m` unless --data; the replay plan
    4 model     :func:`choose_model`    an artifact trained on this data that the worker
                                        accepts (one with a recommender first), else `train`
                                        (--recommender: with one); announced on the models
                                        topic
    5 worker    :func:`start_worker`    `worker` with its own state dir and web port, healthy
    6-7 replay  :func:`~sketchstream.tools.demo_follow.watch`
    8 shutdown  :func:`shut_down`       SIGTERM to the worker; the summary table

Clean-up (children stopped, demo topics deleted, a broker started here stopped) is registered
on the run's ``ExitStack`` by the stage that creates the thing, so it happens on every exit.
Every stage raises :class:`~sketchstream.tools.demo_plan.DemoError` with what failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sketchstream.tools.demo_console import (
    Console,
    final_table,
    fmt_ms,
    fmt_num,
    head_figures,
    hit_figures,
)
from sketchstream.tools.demo_follow import REQUEST_EVERY, Outcome, watch
from sketchstream.tools.demo_plan import DemoError, ReplayPlan, plan_replay, replay_ts
from sketchstream.tools.demo_processes import Processes, tail, wait_healthy
from sketchstream.tools.kafka_io import TopicsNotDeleted, delete_topics, free_port
from sketchstream.tools.model_choice import refusal

if TYPE_CHECKING:
    import subprocess

    from sketchstream.models.events import Head
    from sketchstream.stream.settings import Settings

__all__ = [
    "DEMO_RECOMMENDER_ARGS",
    "DEMO_TRAIN_ARGS",
    "DemoModel",
    "Profile",
    "app_topics",
    "demo_topics",
    "find_artifact",
    "has_recommender",
    "recommend_summary",
    "reusable",
    "run",
]

Profile = Literal["demo", "full"]

TOPIC_PREFIX = "demo."
DEMO_TRAIN_ARGS = (
    "--epochs", "1", "--hidden", "256", "--item-codes", "off", "--products", "float32",
    "--no-baselines",
)  # fmt: skip
"""The demo profile: one epoch (two validation checks), hidden 256, no baselines, test AUC
within 0.01 of the full profile. Item codes off: ``auto`` races the MLP with and without them
for the one epoch there is, and on MovieLens-1M it chooses off (validation AUC 0.7825 against
0.7763 on, ~2.6 min each on two loaded cores). float32 products: at hidden 256 the fixed16
ones (the full profile's) cost the worker's drain ~1 µs an event more (bench batch at 2,048:
MLP 6.7-7.4 against 6.0 µs an event; bench stream 40,692-42,382 events/s against
44,683-47,710), for the same test AUC."""
DEMO_RECOMMENDER_ARGS = (
    "--recommender-epochs", "1", "--recommender-hidden", "256",
    "--recommender-train-events", "300000",
)  # fmt: skip
"""``demo --recommender`` on the demo profile: the recommender sized down too (one epoch,
hidden 256, the last 300,000 training events where the full one reads all of them, ~15 GB
of inputs on MovieLens-1M, spilled to disk): see README, Demo, for its time and test HR@10
against the full one's."""


@dataclass(frozen=True)
class DemoModel:
    """The model the demo serves (stage 4): its ``version``, its label ``heads`` in its score
    columns' order, each head's offline test AUC (``offline_auc``), its recommender's offline
    test HR@10 (seen items excluded) when the training report beside the artifacts is this
    model's (``offline_hr10``), and why recommendations are off (``no_recommender``; None: the
    model has a recommender and the demo asks it)."""

    version: str
    heads: list[Head]
    offline_auc: dict[str, float]
    offline_hr10: float | None
    no_recommender: str | None


def run(
    settings: Settings,
    console: Console,
    *,
    data: Path | None,
    limit: int | None,
    rate: str,
    history: int | None,
    retrain: bool,
    recommender: bool,
    profile: Profile,
    workdir: Path,
    timeout: float,
    keep_topics: bool,
    app_id: str,
) -> None:
    """The whole demo; clean-up on every exit (see the module docstring)."""
    with contextlib.ExitStack() as stack:
        open_broker(settings, console, stack)
        client_kwargs = settings.client_kwargs()
        topics = demo_topics(settings)
        env = {**os.environ, **topics, "PYTHONUNBUFFERED": "1"}
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
        procs = Processes(console, env)
        open_topics(client_kwargs, topics, app_id, procs, stack, keep_topics=keep_topics)
        data, plan, n_events, md5 = load_data(settings, data, limit, history, procs)
        model = choose_model(
            settings, data, n_events, md5, procs, retrain=retrain, recommender=recommender,
            profile=profile,
        )  # fmt: skip
        models_topic = topics["SKETCHSTREAM_TOPIC_MODELS"]
        asyncio.run(_announce(client_kwargs, models_topic, settings.artifact_dir, model.version))
        console.say(f"announced model {model.version} on {models_topic}")
        worker, worker_log = start_worker(settings, workdir, app_id, procs)

        # 6-7 replay and follow -----------------------------------------------------------
        console.step(
            f"6/8 history: {plan.n_history:,} events before the test period, at full speed"
            if plan.n_history
            else "6/8 history: none (--history none: user states start empty)"
        )
        outcome = asyncio.run(
            watch(
                client_kwargs,
                topics,
                plan,
                procs,
                worker,
                worker_log,
                data,
                heads=model.heads,
                recommend=model.no_recommender is None,
                workdir=workdir,
                rate=rate,
                console=console,
                timeout=timeout,
            )
        )
        shut_down(
            procs,
            worker,
            worker_log,
            outcome,
            plan,
            data=data,
            n_events=n_events,
            model=model,
            rate=rate,
        )


# --- 1 broker ----------------------------------------------------------------------------------


def open_broker(settings: Settings, console: Console, stack: contextlib.ExitStack) -> str:
    """Stage 1: the broker the demo talks to (the local one started when needed, leased so a
    test session does not stop it under us). Returns its bootstrap servers."""
    from sketchstream.models.errors import SketchstreamError
    from sketchstream.tools.broker import LocalBroker, ensure_broker

    console.step("1/8 Kafka broker")
    broker = LocalBroker(settings) if settings.uses_local_broker else None
    started_here = broker is not None and broker.pid() is None and not broker.answering()
    try:
        bootstrap = ensure_broker(settings)
    except SketchstreamError as exc:
        raise DemoError(f"no broker: {exc}") from None
    if broker is not None:
        stack.enter_context(broker.lease())  # a test session will not stop it under us
        if started_here:
            stack.callback(_stop_broker, broker, console)
    console.say(
        f"{'started the local broker' if started_here else 'using the broker'} at {bootstrap}"
    )
    return bootstrap


def _stop_broker(broker: Any, console: Console) -> None:
    if broker.users():
        console.say("left the local broker running: another session uses it")
        return
    broker.stop()
    console.say("stopped the local broker (this demo started it)")


# --- 2 topics ----------------------------------------------------------------------------------


def open_topics(
    client_kwargs: Mapping[str, Any],
    topics: Mapping[str, str],
    app_id: str,
    procs: Processes,
    stack: contextlib.ExitStack,
    *,
    keep_topics: bool,
) -> None:
    """Stage 2: delete the demo topics an earlier run left, create them with ``topics
    create``; at the end, stop the children, then delete the topics (unless ``keep_topics``)."""
    console = procs.console
    console.step("2/8 topics")
    names = [*topics.values(), *app_topics(app_id)]
    deleted = asyncio.run(_reset_topics(client_kwargs, names))
    if deleted:
        console.say(f"deleted the topics of an earlier demo run: {', '.join(sorted(deleted))}")
    console.say("the demo's topics: " + ", ".join(topics.values()) + " (SKETCHSTREAM_TOPIC_* set)")
    procs.run(["topics", "create"], "creating the topics")
    if not keep_topics:
        stack.callback(_delete_topics, client_kwargs, names, console)
    stack.callback(procs.stop_all)  # runs first: nothing writes to a topic being deleted


def demo_topics(settings: Settings) -> dict[str, str]:
    """The environment that points commands at the demo's topics."""
    return {
        "SKETCHSTREAM_TOPIC_EVENTS": TOPIC_PREFIX + settings.topic_events,
        "SKETCHSTREAM_TOPIC_PREDICTIONS": TOPIC_PREFIX + settings.topic_predictions,
        "SKETCHSTREAM_TOPIC_DLQ": TOPIC_PREFIX + settings.topic_dlq,
        "SKETCHSTREAM_TOPIC_RECOMMEND": TOPIC_PREFIX + settings.topic_recommend,
        "SKETCHSTREAM_TOPIC_RECOMMENDATIONS": TOPIC_PREFIX + settings.topic_recommendations,
        "SKETCHSTREAM_TOPIC_MODELS": TOPIC_PREFIX + settings.topic_models,
    }


def app_topics(app_id: str) -> list[str]:
    """The topics the worker's faust app creates for itself: the changelog of its ``users``
    table and faust's assignor topic."""
    return [f"{app_id}-users-changelog", f"{app_id}-__assignor-__leader"]


async def _reset_topics(client_kwargs: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """Delete those of ``names`` that exist (the topics of an earlier demo run); wait until
    the broker no longer lists them. Returns the names deleted."""
    try:
        return await delete_topics(client_kwargs, names, wait_s=60.0)
    except TopicsNotDeleted as exc:
        raise DemoError(str(exc)) from None


def _delete_topics(
    client_kwargs: Mapping[str, Any], names: Sequence[str], console: Console
) -> None:
    try:
        deleted = asyncio.run(_reset_topics(client_kwargs, names))
    except Exception as exc:  # clean-up only: the figures are out already
        console.say(f"could not delete the demo topics: {exc}")
        return
    if deleted:
        console.say(f"deleted the demo topics ({len(deleted)}); keep them with --keep-topics")


# --- 3 data ------------------------------------------------------------------------------------


def load_data(
    settings: Settings,
    data: Path | None,
    limit: int | None,
    history: int | None,
    procs: Processes,
) -> tuple[Path, ReplayPlan, int, str]:
    """Stage 3: the data folder (MovieLens-1M fetched when ``data`` is None) and its replay
    plan. Returns ``(folder, plan, number of events, stream md5)``."""
    from sketchstream.models.events import read_events, stream_md5

    console = procs.console
    console.step("3/8 data")
    if data is None:
        data = settings.data_dir / "ml-1m"
        procs.run(["data", "movielens-1m", "--out", str(data)], "fetching MovieLens-1M")
    elif not (data / "events.jsonl").is_file():
        raise DemoError(f"{data} has no events.jsonl")
    table = read_events(data / "events.jsonl")
    plan = plan_replay(table, limit, history)
    md5 = stream_md5(table)
    n_events = len(table)
    del table
    console.say(
        f"{n_events:,} events; the test period starts at ts {replay_ts(plan.live_from)}; "
        f"replaying {plan.n_history:,} events before it as history, {plan.n_live:,} live"
    )
    return data, plan, n_events, md5


# --- 4 model -----------------------------------------------------------------------------------


def choose_model(
    settings: Settings,
    data: Path,
    n_events: int,
    md5: str,
    procs: Processes,
    *,
    retrain: bool,
    recommender: bool,
    profile: Profile,
) -> DemoModel:
    """Stage 4: the newest artifact in the artifact dir trained on this data that the worker
    serves (one with a recommender before one without), else one trained now (with
    ``recommender``, with a recommender)."""
    console = procs.console
    console.step("4/8 model")
    artifacts = settings.artifact_dir
    found = [] if retrain else find_artifact(artifacts, n_events, md5)
    version = reusable(artifacts, found, console)
    if version is not None:
        console.say(
            f"reusing model {version} from {artifacts}, trained on this data "
            "(--retrain trains a new one)"
        )
    else:
        version = _train(data, artifacts, n_events, md5, procs, profile, recommender=recommender)
    no_recommender = None
    if not has_recommender(artifacts / version):
        no_recommender = (
            f"model {version} has no recommender (trained without --recommender); "
            "`sketchstream demo --retrain --recommender` trains one with it"
        )
        console.say(f"recommendations off: {no_recommender}")
    return DemoModel(
        version=version,
        heads=_model_heads(artifacts / version),
        offline_auc=_offline_auc(artifacts / version),
        offline_hr10=_offline_hr10(artifacts, version),
        no_recommender=no_recommender,
    )


def reusable(root: Path, candidates: Sequence[str], console: Console) -> str | None:
    """The first of ``candidates`` (versions under ``root``, newest first) that the worker
    serves, one with a recommender before one without (a model without one is still served,
    with recommendations off); None when it serves none."""
    fallback = None
    for candidate in candidates:
        with_recommender = has_recommender(root / candidate)
        if fallback is not None and not with_recommender:
            continue  # it could only be the fallback, and there is one
        reason = refusal(root / candidate)
        if reason is not None:
            console.say(f"not reusing model {candidate}: {reason}")
        elif with_recommender:
            return candidate
        else:
            fallback = candidate
    return fallback


def _train(
    data: Path,
    artifacts: Path,
    n_events: int,
    md5: str,
    procs: Processes,
    profile: Profile,
    *,
    recommender: bool,
) -> str:
    """``sketchstream train`` with ``profile`` (and ``--recommender``); the new artifact's
    version."""
    console = procs.console
    argv = ["train", "--data", str(data), "--out", str(artifacts)]
    argv += ["--recommender"] if recommender else []
    if profile == "demo":
        argv += list(DEMO_TRAIN_ARGS)
        argv += list(DEMO_RECOMMENDER_ARGS) if recommender else []
        console.say(
            "training with the demo profile (1 epoch, hidden 256, item codes off, float32 "
            "products, no "
            f"baselines){' and a recommender of 1 epoch, hidden 256' if recommender else ''}. "
            "The full profile: "
            f"`sketchstream train --data {data} --out {artifacts}"
            f"{' --recommender' if recommender else ''}` "
            "(or `sketchstream demo --retrain --profile full`)"
        )
    if not console.tty:
        argv.append("--no-progress")
    procs.run(argv, "training")
    found = find_artifact(artifacts, n_events, md5)
    if not found:
        raise DemoError(f"training wrote no artifact for this data into {artifacts}")
    reason = refusal(artifacts / found[0])
    if reason is not None:
        raise DemoError(f"the worker would refuse the new model {found[0]}: {reason}")
    return found[0]


def find_artifact(root: Path, n_events: int, md5: str) -> list[str]:
    """The model artifacts under ``root`` trained on these events (count and
    :func:`~sketchstream.models.events.stream_md5` as ``sketchstream train`` records them),
    newest first."""
    import json

    from sketchstream.models.artifacts import MANIFEST, ArtifactStore

    if not root.is_dir():
        return []
    found = []
    for version in ArtifactStore(root).versions():
        try:
            manifest = json.loads((root / version / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        data = manifest.get("config", {}).get("data", {})
        if data.get("events") == n_events and data.get("stream_md5") == md5:
            found.append(version)
    return found


def has_recommender(path: Path) -> bool:
    """Whether the model artifact at ``path`` carries a top-k recommender (its manifest
    names one; loading it checks the rest)."""
    import json

    from sketchstream.models.artifacts import MANIFEST

    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("config", {}).get("recommend") is not None


def _model_heads(path: Path) -> list[Head]:
    """The label heads of the artifact at ``path``, in its score columns' order."""
    from sketchstream.models.artifacts import load_model_artifact
    from sketchstream.models.trainer import bundle_heads

    return bundle_heads(load_model_artifact(path))


def _offline_auc(path: Path) -> dict[str, float]:
    """Each head's test AUC as the artifact's report has it (heads without one left out)."""
    import json

    from sketchstream.models.artifacts import MANIFEST

    try:
        metrics = json.loads((path / MANIFEST).read_text()).get("metrics", {})
    except (OSError, ValueError):
        return {}
    found = {}
    for head, figures in metrics.items():
        try:
            found[head] = float(figures["test"]["auc"])
        except (KeyError, TypeError, ValueError):
            continue
    return found


def _offline_hr10(root: Path, version: str) -> float | None:
    """The recommender's test HR@10 (seen items excluded): from the artifact's manifest
    (``recommend_figures``, which ``train --recommender`` records), else from the training
    report under ``root`` (``report/report.json``, which each ``train --out root`` rewrites)
    when that report is ``version``'s; None otherwise."""
    import json

    from sketchstream.models.artifacts import MANIFEST
    from sketchstream.models.live_quality import HIT_AT

    def hr10(block: dict) -> float:
        return float(block["recommend"]["test"]["sketchstream"][f"hr@{HIT_AT}"])

    try:
        config = json.loads((root / version / MANIFEST).read_text())["config"]
        return hr10({"recommend": config["recommend_figures"]})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        report = json.loads((root / "report" / "report.json").read_text())
        return hr10(report) if report["model"]["version"] == version else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def _announce(client_kwargs: Mapping[str, Any], topic: str, root: Path, version: str) -> None:
    import json

    from aiokafka import AIOKafkaProducer
    from sketchstream.models.artifacts import MANIFEST
    from sketchstream.stream.models_feed import model_announcement

    manifest = json.loads((root / version / MANIFEST).read_text())
    key, value = model_announcement(version, (root / version).resolve(), manifest["content_hash"])
    producer = AIOKafkaProducer(**client_kwargs, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


# --- 5 worker ----------------------------------------------------------------------------------


def start_worker(
    settings: Settings, workdir: Path, app_id: str, procs: Processes
) -> tuple[subprocess.Popen, Path]:
    """Stage 5: ``sketchstream worker`` on a fresh state dir and a free web port, until its
    ``/health`` says ok. Returns ``(the process, its log)``."""
    console = procs.console
    console.step("5/8 worker")
    state = workdir / "state"
    shutil.rmtree(state, ignore_errors=True)
    port = free_port()
    worker_log = workdir / "worker.log"
    worker_argv = [
        "worker", "--app-id", app_id, "--state-dir", str(state), "--artifact-dir",
        str(settings.artifact_dir), "--web-port", str(port), "--standby-replicas", "0",
        "--loglevel", "warning",
    ]  # fmt: skip
    worker = procs.start(worker_argv, worker_log, "worker")
    health = wait_healthy(worker, port, worker_log)
    console.say(
        f"healthy: http://127.0.0.1:{port}/health serves model {health['model_version']} "
        f"on partitions {health['partitions']}; metrics at http://127.0.0.1:{port}/metrics"
    )
    return worker, worker_log


# --- 8 shutdown --------------------------------------------------------------------------------


def shut_down(
    procs: Processes,
    worker: subprocess.Popen,
    worker_log: Path,
    outcome: Outcome,
    plan: ReplayPlan,
    *,
    data: Path,
    n_events: int,
    model: DemoModel,
    rate: str,
) -> None:
    """Stage 8: SIGTERM to the worker, then the summary table; :class:`DemoError` when the
    worker's stop failed, an event got no prediction or a request no answer."""
    import time

    console = procs.console
    console.step("8/8 shutdown")
    t0 = time.monotonic()
    code = procs.stop(worker)
    console.say(f"worker stopped (exit {code}) in {time.monotonic() - t0:.1f}s")
    stats = outcome.stats
    overall = stats.overall()
    models = ", ".join(sorted(stats.model_versions)) or "-"
    rows = [
        ("data", f"{data} ({n_events:,} events)"),
        ("model", models),
    ]
    if outcome.history_seconds is not None:
        rows.append(
            (
                "history",
                f"{plan.n_history:,} events in {outcome.history_seconds:.1f}s "
                f"({plan.n_history / outcome.history_seconds:,.0f} ev/s)",
            )
        )
    rows += [
        ("live events", f"{plan.n_live:,} (test period, --rate {rate})"),
        ("predictions", f"{stats.count:,}"),
        ("dead letters", f"{outcome.dlq:,}"),
        ("events/s", f"{stats.mean_rate():,.0f}"),
        ("latency p50", fmt_ms(overall["p50"])),
        ("latency p99", fmt_ms(overall["p99"])),
    ]
    for name, figures in overall["heads"].items():
        test = f"; offline test {fmt_num(model.offline_auc.get(name))}"
        rows.append((f"AUC ({name})", f"{head_figures(figures)}{test}"))
    rows += recommend_summary(outcome, overall["recommend"], model)
    console.say("\nsketchstream demo: summary\n" + final_table(rows))
    if code not in (0, None):
        raise DemoError(f"the worker exited {code} on SIGTERM:\n{tail(worker_log)}")
    if stats.count < plan.n_live:
        raise DemoError(f"only {stats.count:,} of {plan.n_live:,} events got a prediction")
    if outcome.requests is not None and stats.answers < outcome.requests:
        raise DemoError(f"only {stats.answers:,} of {outcome.requests:,} requests got an answer")


def recommend_summary(
    outcome: Outcome, figures: Mapping[str, Any], model: DemoModel
) -> list[tuple[str, str]]:
    """The summary's rows on recommendations: answers / requests and live HR@10 beside the
    offline one, or why they were off."""
    from sketchstream.models.live_quality import HIT_AT

    if model.no_recommender is not None:
        return [("recommendations", f"off: {model.no_recommender}")]
    asked = (
        f"{outcome.stats.answers:,} answers to {outcome.requests or 0:,} requests (the user of "
        f"every {REQUEST_EVERY}th prediction, k {HIT_AT}, seen items excluded)"
    )
    offline = f"; offline test {fmt_num(model.offline_hr10)}"
    return [("recommendations", asked), (f"HR@{HIT_AT}", f"{hit_figures(figures)}{offline}")]
