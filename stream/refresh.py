"""The refresh job: a window of events → candidate model → gate → artifact store + announcement.

One run (:meth:`RefreshJob.run_once`)::

    read     the window: from the events topic (offsets-for-times, streamed) or a file
    serving  the version being served: the newest announced on the models topic, else the
             artifact store's newest; loaded and verified
    build    Cleora + EMDE on the window's training part, replay, MLP
             (:func:`sketchstream.models.refresh.build_candidate`)
    evaluate both models on the window's holdout; the gate decides
    publish  only when the gate passes (or ``force``): the artifact into the store, then
             ``(version, path, content hash)`` on the models topic; workers swap it in between
             two batches
    prune    the store keeps the ``keep`` newest versions and never the one being served

:func:`run_every` runs a job on a fixed cadence, one run at a time, with jittered start times;
a failed run is logged and the next one still happens; setting the stop event ends it between
runs. Across processes, a lock file in the artifact directory keeps two jobs sharing a store
from running at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sketchstream.models.errors import SketchstreamError
from sketchstream.stream.errors import StreamError
from sketchstream.stream.settings import Settings
from sketchstream.stream.window import read_window, resolve_window

__all__ = [
    "DEFAULT_KAFKA_WINDOW",
    "RefreshJob",
    "RefreshOptions",
    "RefreshSummary",
    "ServingInfo",
    "next_start",
    "run_every",
]

log = logging.getLogger(__name__)

Status = Literal["published", "rejected", "failed", "skipped"]

#: window of a Kafka refresh given neither --window nor --since/--until
DEFAULT_KAFKA_WINDOW = "30d"

LOCK_FILE = ".refresh.lock"
STAGING_DIR = ".staging"  # hidden: ArtifactStore skips dot-directories


@dataclass(frozen=True)
class RefreshOptions:
    """What one refresh reads, how it trains and gates, what it publishes.

    Window bounds stay as given (``"30d"``) and are resolved at each run, so a scheduled job
    always reads the latest window. With ``data`` the window is read from the file instead of
    Kafka, and a ``window`` is measured back from the file's last event time.
    """

    data: Path | None = None  # folder with events.jsonl (and items.jsonl)
    items: Path | None = None  # items.jsonl (default: <data>/items.jsonl, <data_dir>/items.jsonl)
    window: str | None = None  # "30d"; Kafka default DEFAULT_KAFKA_WINDOW
    since: str | None = None
    until: str | None = None
    max_events: int | None = None  # memory bound of a Kafka window: the newest are kept
    tolerance: float = 0.002  # AUC the candidate may lose per head
    logloss_tolerance: float = 0.01  # log loss it may gain per head
    hr_tolerance: float = 0.005  # recommendations' HR@10 it may lose (served model has them)
    train: Any = None  # TrainConfig; None: the serving model's, else the trainer's defaults
    overrides: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig fields to change
    keep: int = 5  # versions the store keeps (never deleting the serving one)
    announce: bool = True  # announce on the models topic (needs Kafka)
    force: bool = False  # publish even when the gate refuses
    progress: bool = False  # progress bars of replay and training
    heads: tuple = ()  # label heads (Head); empty: the serving model's, else first_heads
    first_heads: tuple = ()  # heads without a serving model (empty: like = rate >= 4)

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise StreamError(f"keep must be >= 1 (the new version), got {self.keep}")
        if self.max_events is not None and self.max_events < 10:
            raise StreamError(f"max_events must be >= 10, got {self.max_events}")

    @property
    def uses_kafka(self) -> bool:
        return self.data is None or self.announce


@dataclass(frozen=True)
class ServingInfo:
    """The version being served and where its artifact lies."""

    version: str
    path: Path
    source: Literal["topic", "store"]


@dataclass
class RefreshSummary:
    """What one run did; :meth:`to_dict` is the JSON the command prints."""

    status: Status
    reason: str
    version: str | None = None  # the candidate's (published or not)
    serving_version: str | None = None
    window: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    pruned: list[str] = field(default_factory=list)
    announced: dict[str, Any] | None = None
    started: float = 0.0
    finished: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 published, 3 refused by the gate, 1 failed, 0 skipped (another run holds the lock)."""
        return {"published": 0, "rejected": 3, "failed": 1, "skipped": 0}[self.status]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "version": self.version,
            "serving_version": self.serving_version,
            "window": self.window,
            "gate": self.gate,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "pruned": self.pruned,
            "announced": self.announced,
            "started": self.started,
            "finished": self.finished,
        }


# --- the job ---------------------------------------------------------------------------------


class RefreshJob:
    """One refresh, runnable again and again (:meth:`run_once`) with the same options."""

    def __init__(
        self,
        settings: Settings,
        options: RefreshOptions | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.options = options or RefreshOptions()
        self.clock = clock

    # -- the run ------------------------------------------------------------------------------

    def run_once(self) -> RefreshSummary:
        """Read, build, gate, publish, prune; never raises for a failed run (the summary says
        ``failed`` and why), except on KeyboardInterrupt/SystemExit."""
        started = self.clock()
        summary = RefreshSummary(status="failed", reason="", started=started)
        timings = summary.timings
        t_all = time.perf_counter()
        try:
            with self._lock() as held:
                if not held:
                    summary.status = "skipped"
                    summary.reason = (
                        f"another refresh holds {self.store_root / LOCK_FILE}: one run at a time"
                    )
                else:
                    self._run(summary, timings)
        except (SketchstreamError, OSError, ValueError, RuntimeError) as exc:
            summary.status, summary.reason = "failed", f"{type(exc).__name__}: {exc}"
            log.error("refresh failed: %s", summary.reason)
        finally:
            timings["total"] = time.perf_counter() - t_all
            summary.finished = self.clock()
        level = logging.INFO if summary.status in ("published", "skipped") else logging.WARNING
        log.log(level, "refresh %s: %s", summary.status, summary.reason)
        return summary

    @property
    def store_root(self) -> Path:
        return Path(self.settings.artifact_dir)

    def _run(self, summary: RefreshSummary, timings: dict[str, float]) -> None:
        from sketchstream.models.artifacts import ArtifactStore, load_model_artifact
        from sketchstream.models.refresh import (
            GateConfig,
            build_candidate,
            gate,
            score_serving,
            stream_order,
            train_config_of,
        )

        opts = self.options
        store = ArtifactStore(self.store_root)

        # read
        t0 = time.perf_counter()
        events, items, window_info = self._read()
        events = stream_order(events)
        timings["read"] = time.perf_counter() - t0
        summary.window = window_info
        log.info(
            "refresh: read %d events %s in %.1fs",
            len(events),
            window_info.get("bounds", ""),
            timings["read"],
        )

        # serving model
        serving = self.serving()
        summary.serving_version = serving.version if serving else None
        bundle = None
        if serving is not None:
            try:
                bundle = load_model_artifact(serving.path)
            except SketchstreamError as exc:
                if not opts.force:
                    raise StreamError(
                        f"the serving model {serving.version} ({serving.source}) does not load "
                        f"from {serving.path}: {exc}; nothing to compare with (use --force to "
                        "publish without the gate)"
                    ) from exc
                log.warning("serving model %s does not load (%s): --force", serving.version, exc)

        # candidate
        config = opts.train or (train_config_of(bundle) if bundle is not None else None)
        if config is None:
            from sketchstream.models.trainer import TrainConfig

            config = TrainConfig()
        if opts.overrides:
            config = replace(config, **dict(opts.overrides))
        heads = self._heads(bundle)
        candidate = build_candidate(events, items, config, heads=heads, progress=opts.progress)
        timings.update(
            {k: v for k, v in candidate.timings.items() if k not in ("predict", "codebooks")}
        )
        summary.window.update(candidate.window)
        log.info(
            "refresh: candidate trained (graph+Cleora %.1fs, EMDE %.1fs, replay %.1fs, "
            "train %.1fs)",
            timings.get("graph_cleora", 0.0),
            timings.get("emde", 0.0),
            timings.get("replay", 0.0),
            timings.get("train", 0.0),
        )

        # the recommender, when the served model has one: trained now so the gate judges it
        # too (and requests stay answered after the swap)
        recommender = recommend = None
        if getattr(bundle, "recommender", None) is not None:
            from sketchstream.models.ranking import holdout_recommend, train_recommender

            t0 = time.perf_counter()
            recommender, figures = train_recommender(
                events,
                items,
                candidate.result,
                seed=config.seed,
                progress=opts.progress,
                config=bundle.recommender.config,  # the served one's shape and training
            )
            timings["recommender"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            served = holdout_recommend(bundle.recommender, bundle, events)
            recommend = (figures["test"]["sketchstream"], served)
            timings["evaluate_recommender"] = time.perf_counter() - t0

        # evaluate
        t0 = time.perf_counter()
        serving_metrics = None
        if bundle is not None:
            serving_metrics = score_serving(bundle, events)
        verdict = gate(
            candidate.holdout,
            serving_metrics,
            GateConfig(
                tolerance=opts.tolerance,
                logloss_tolerance=opts.logloss_tolerance,
                hr_tolerance=opts.hr_tolerance,
            ),
            recommend=recommend,
        )
        timings["evaluate"] = time.perf_counter() - t0 + candidate.timings.get("predict", 0.0)
        summary.gate = {
            **verdict.to_dict(),
            "tolerance": opts.tolerance,
            "logloss_tolerance": opts.logloss_tolerance,
            "hr_tolerance": opts.hr_tolerance,
        }
        log.info(
            "refresh: gate %s (%s)", "passed" if verdict.publish else "refused", verdict.reason
        )

        # publish
        t0 = time.perf_counter()
        version = self._save(
            candidate, config, heads, serving, verdict, summary.window, recommender
        )
        summary.version = version
        if verdict.publish or opts.force:
            path = store.path(version).resolve()
            if opts.announce:
                summary.announced = self._announce(version, path)
            summary.status = "published"
            summary.reason = verdict.reason if verdict.publish else f"forced: {verdict.reason}"
            if serving is not None and version == serving.version:
                summary.reason = f"same content as the serving version: {summary.reason}"
        else:
            summary.status = "rejected"
            summary.reason = f"candidate {version} is worse than serving " + (
                f"{serving.version}: {verdict.reason}" if serving else verdict.reason
            )
        timings["publish"] = time.perf_counter() - t0

        # housekeeping: the served version survives whatever keep says
        protect = serving.version if serving is not None else None
        summary.pruned = store.prune(opts.keep, serving=protect)

    # -- reading ------------------------------------------------------------------------------

    def _items(self) -> list[Any]:
        from sketchstream.models.events import read_items

        opts = self.options
        candidates = [opts.items] if opts.items is not None else []
        if opts.items is None:
            if opts.data is not None:
                candidates.append(opts.data / "items.jsonl")
            candidates.append(Path(self.settings.data_dir) / "items.jsonl")
        for path in candidates:
            if path is not None and path.is_file():
                items = read_items(path)
                log.info("refresh: %d items with metadata from %s", len(items), path)
                return items
        if opts.items is not None:
            raise StreamError(f"items file {opts.items} does not exist")
        return []

    def _read(self) -> tuple[Any, list[Any], dict[str, Any]]:
        opts = self.options
        items = self._items()
        if opts.data is not None:
            from sketchstream.models.events import read_events

            path = opts.data / "events.jsonl" if opts.data.is_dir() else opts.data
            events = read_events(path)
            last = float(events.ts.max()) if len(events) else None
            window = resolve_window(opts.window, opts.since, opts.until, anchor=last)
            keep = None
            if window.since is not None:
                keep = events.ts >= window.since
            if window.until is not None:
                before = events.ts < window.until
                keep = before if keep is None else keep & before
            if keep is not None:
                events = events[keep]
            return (
                events,
                items,
                {"source": str(path), "bounds": window.describe(), "time": "event ts"},
            )
        spec = opts.window
        if spec is None and opts.since is None and opts.until is None:
            spec = DEFAULT_KAFKA_WINDOW
        window = resolve_window(spec, opts.since, opts.until, now=self.clock())
        read = asyncio.run(read_window(self.settings, window, max_events=opts.max_events))
        info = {
            "source": f"kafka:{self.settings.topic_events}",
            "bounds": window.describe(),
            "time": "kafka record time",
            "since": window.since,
            "until": window.until,
            "records_skipped": read.skipped,
            "records_dropped": read.dropped,
            "offsets": {str(p): list(o) for p, o in read.offsets.items()},
            "kafka_ts": list(read.kafka_ts) if read.kafka_ts else None,
        }
        return read.events, items, info

    # -- serving version ----------------------------------------------------------------------

    def serving(self) -> ServingInfo | None:
        """The version being served: the newest announcement on the models topic (when Kafka
        is used), else the newest version in the artifact store; None when neither has one."""
        from sketchstream.models.artifacts import ArtifactStore

        store = ArtifactStore(self.store_root)
        if self.options.uses_kafka:
            announced = asyncio.run(latest_announcement(self.settings))
            if announced is not None:
                path = Path(announced.path)
                if not path.exists():
                    path = store.root / announced.version
                return ServingInfo(announced.version, path, "topic")
        latest = store.latest()
        if latest is None:
            return None
        return ServingInfo(latest, store.root / latest, "store")

    # -- publishing ---------------------------------------------------------------------------

    def _heads(self, bundle: Any) -> tuple:
        """The candidate's label heads: the options', else the serving model's (a refresh
        keeps what the served model predicts), else the first run's."""
        from sketchstream.models.events import DEFAULT_HEADS
        from sketchstream.models.trainer import bundle_heads

        if self.options.heads:
            return tuple(self.options.heads)
        if bundle is not None:
            return tuple(bundle_heads(bundle))
        return tuple(self.options.first_heads) or DEFAULT_HEADS

    def _save(
        self,
        candidate: Any,
        config: Any,
        heads: tuple,
        serving: ServingInfo | None,
        verdict: Any,
        window: Mapping[str, Any],
        recommender: Any = None,
    ) -> str:
        """Write the candidate under the store's staging folder; into the store itself only
        when it is to be published. Returns its version."""
        from sketchstream.models.artifacts import ArtifactStore, save_trained_artifact
        from sketchstream.models.trainer import head_defs

        result = candidate.result
        staging = self.store_root / STAGING_DIR
        extra = {
            "train": config.to_dict(),
            "head_defs": head_defs(heads),
            "data": {"events": int(window.get("events", 0))},
            "history": result.history,
            "refresh": {
                "window": {k: v for k, v in window.items() if k != "offsets"},
                "serving_version": serving.version if serving else None,
                "gate": verdict.to_dict(),
            },
        }
        version = save_trained_artifact(
            staging,
            result,
            item_snapshot=candidate.item_snapshot,
            extra=extra,
            recommender=recommender,
        )
        try:
            if verdict.publish or self.options.force:
                ArtifactStore(self.store_root).publish(staging / version)
        finally:
            shutil.rmtree(staging / version, ignore_errors=True)
        return version

    def _announce(self, version: str, path: Path) -> dict[str, Any]:
        from sketchstream.models.artifacts import MANIFEST
        from sketchstream.stream.models_feed import model_announcement

        manifest = json.loads((path / MANIFEST).read_text())
        key, value = model_announcement(version, path, manifest["content_hash"])
        meta = asyncio.run(_produce_one(self.settings, self.settings.topic_models, key, value))
        log.info(
            "announced model %s on %r (offset %d)", version, self.settings.topic_models, meta[1]
        )
        return {
            "topic": self.settings.topic_models,
            "partition": meta[0],
            "offset": meta[1],
            "timestamp": meta[2],
            "path": str(path),
        }

    # -- one run at a time --------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[bool]:
        import fcntl

        self.store_root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.store_root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


# --- Kafka: the models topic -----------------------------------------------------------------


async def latest_announcement(settings: Settings, timeout: float = 30.0) -> Any:
    """The newest valid announcement on ``settings.topic_models`` (None: no topic, or none)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from sketchstream.stream.models_feed import parse_announcement

    consumer = AIOKafkaConsumer(**settings.client_kwargs(), group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        parts = sorted(cluster.partitions_for_topic(settings.topic_models) or ())
        if not parts:
            log.info("no models topic %r: the store's newest version serves", settings.topic_models)
            return None
        tps = [TopicPartition(settings.topic_models, p) for p in parts]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        newest: tuple[tuple[int, int], Any] | None = None
        deadline = time.monotonic() + timeout
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            if time.monotonic() > deadline:
                raise StreamError(f"timed out reading {settings.topic_models!r}")
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    try:
                        ann = parse_announcement(record.value)
                    except StreamError:
                        continue
                    rank = (record.timestamp, record.offset)
                    if newest is None or rank > newest[0]:
                        newest = (rank, ann)
        return newest[1] if newest else None
    finally:
        await consumer.stop()


async def _produce_one(
    settings: Settings, topic: str, key: bytes, value: bytes
) -> tuple[int, int, int]:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**settings.client_kwargs(), acks="all", enable_idempotence=True)
    await producer.start()
    try:
        meta = await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()
    return meta.partition, meta.offset, meta.timestamp


# --- scheduling ------------------------------------------------------------------------------


def next_start(
    scheduled: float, every: float, jitter: float, now: float, rng: random.Random
) -> tuple[float, float, int]:
    """``(next slot, its jittered start, slots skipped)`` after the run of slot ``scheduled``.

    Slots are ``every`` seconds apart; a run that overran skips the slots already past (one
    run at a time, no catch-up burst). The start is the slot plus a uniform jitter in
    ``[0, jitter]``, so several jobs on one cadence spread out.
    """
    slot = scheduled + every
    skipped = 0
    if now > slot:
        skipped = math.ceil((now - slot) / every)
        slot += skipped * every
    return slot, slot + rng.uniform(0.0, jitter), skipped


def run_every(
    job: Callable[[], Any],
    every: float,
    *,
    jitter: float = 0.0,
    stop: threading.Event | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    max_runs: int | None = None,
    on_result: Callable[[Any], None] | None = None,
) -> int:
    """Run ``job`` every ``every`` seconds until ``stop`` is set; returns the number of runs.

    The first run starts after a jitter in ``[0, jitter]``. Runs never overlap. A run that
    raises is logged with its traceback and the schedule goes on. ``stop`` is checked
    between runs (waits return as soon as it is set); a run in progress finishes first.
    ``on_result`` gets each run's return value.
    """
    if not every > 0:
        raise StreamError(f"--every must be > 0 seconds, got {every}")
    if jitter < 0:
        raise StreamError(f"--jitter must be >= 0 seconds, got {jitter}")
    stop = stop or threading.Event()
    rng = rng or random.Random()
    scheduled = clock()
    start_at = scheduled + rng.uniform(0.0, jitter)
    runs = 0
    while not stop.is_set():
        if stop.wait(max(0.0, start_at - clock())):
            break
        runs += 1
        log.info("refresh run %d starting", runs)
        try:
            result = job()
        except Exception:
            log.exception("refresh run %d failed; the next one runs as scheduled", runs)
        else:
            if on_result is not None:
                on_result(result)
        if max_runs is not None and runs >= max_runs:
            break
        scheduled, start_at, skipped = next_start(scheduled, every, jitter, clock(), rng)
        if skipped:
            log.warning("refresh run %d overran its slot: %d slots skipped", runs, skipped)
        log.info("next refresh in %.0fs", max(0.0, start_at - clock()))
    return runs
