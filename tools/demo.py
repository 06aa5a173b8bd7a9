"""`sketchstream demo`: the whole system end to end, from nothing, with a live summary.

Each step runs the real command a user would run, as a subprocess, on the demo's own topics
(``demo.events``, ``demo.predictions``, ``demo.events.dlq``, ``demo.sketchstream.models``,
set through the ``SKETCHSTREAM_TOPIC_*`` variables) so it never mixes with other work::

    1 broker    SKETCHSTREAM_KAFKA's, or the local one (started here, and stopped at the end,
                only when it was not running)
    2 topics    the demo topics of an earlier run are deleted; `sketchstream topics create`
    3 data      `sketchstream data movielens-1m` (a no-op when the files are intact)
    4 model     an artifact trained on this very data that the worker accepts is reused from
                the artifact dir, else `sketchstream train` with the demo profile; it is
                announced on the models topic
    5 worker    `sketchstream worker` with its own state dir and web port, until /health is ok
    6 history   `sketchstream replay --from H --to T --rate max`: the latest events before the
                test period (``--history``: 200,000 by default, or all), so the states of the
                users who come back are warm; at full speed, so it shows the worker's throughput
    7 live      `sketchstream replay --from T --rate R`: the test period, while the demo
                consumes the predictions and prints events/s, latency p50/p99 and a rolling AUC
                against the ratings (like = rating >= 4)
    8 shutdown  SIGTERM to the worker, demo topics deleted, broker stopped if started here

T is the time of the first event of the protocol's test period (the last 10 %,
:func:`~sketchstream.models.events.protocol_split`). The replay tool selects by time, so events
sharing that second with the last validation events are replayed live too.

Latency of a prediction: the Kafka time of the prediction record minus the Kafka time of its
event (both set by the producing clients on this machine): queueing in Kafka, the worker's
batching, scoring and publishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from sketchstream.models.errors import SketchstreamError
from sketchstream.tools.kafka_io import TopicsNotDeleted, delete_topics, end_offsets, free_port

if TYPE_CHECKING:
    from sketchstream.stream.settings import Settings

__all__ = [
    "DemoError",
    "LiveStats",
    "ReplayPlan",
    "demo",
    "demo_topics",
    "find_artifact",
    "plan_replay",
]

Profile = Literal["demo", "full"]

APP_ID = "sketchstream-demo"
TOPIC_PREFIX = "demo."
DEMO_TRAIN_ARGS = ("--epochs", "1", "--hidden", "256", "--no-baselines")
"""The demo profile: one epoch (two validation checks), hidden 256, no baselines: about a
minute on two cores for MovieLens-1M, test AUC within 0.01 of the full profile."""
ROLLING = 10_000  # predictions in the rolling AUC and latency window
_STALL_S = 120.0  # no new prediction for this long while some are due: give up


class DemoError(SketchstreamError):
    """A step of the demo failed; the message says which and why."""


# --- what to replay --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayPlan:
    """How the events file splits into the history (replayed first, at full speed, to warm the
    user states) and the live part (the test period, or its first ``--events``).

    The bounds are the replay tool's ``--from``/``--to`` (None: from the start, to the end);
    the history is ``[history_from, live_from)``, the live part ``[live_from, live_to)``.
    ``labels``: ``{(user, item, ts): label}`` of the live events, nan where unlabelled.
    """

    history_from: float | None
    n_history: int
    live_from: float
    live_to: float | None
    n_live: int
    labels: dict[tuple[str, str, float], float] = field(repr=False)


def plan_replay(events: Any, limit: int | None = None, history: int | None = None) -> ReplayPlan:
    """The replay plan for an :class:`~sketchstream.models.events.EventTable` in stream order.

    The live part starts at the time of the test period's first event and holds at most
    ``limit`` events (None: the whole test period); the history is every event before it
    (``history`` None) or the latest ``history`` of them. Selections are by time, like the
    replay tool's, so events sharing a cut-off second fall on the later side.
    """
    import numpy as np
    from sketchstream.models.events import DEFAULT_HEADS, labels, protocol_split

    n = len(events)
    ts = np.asarray(events.ts, dtype=np.float64)
    start = protocol_split(n)[2].start
    if start >= n:
        raise DemoError(f"{n} events are too few for a test period")
    live_from = float(ts[start])
    live = ts >= live_from
    live_to = None
    if limit is not None:
        rows = np.flatnonzero(live)
        later = ts[rows[limit:]]
        later = later[later > live_from]
        if len(later):
            live_to = float(later.min())
            live &= ts < live_to
    before = np.flatnonzero(ts < live_from)
    history_from = None
    if history is not None and history < len(before):
        history_from = float(ts[before[-history]]) if history > 0 else live_from
    n_history = len(before) if history_from is None else int((ts[before] >= history_from).sum())
    rows = np.flatnonzero(live)
    y = labels(events[rows], DEFAULT_HEADS[:1])[:, 0]
    keys = zip(
        events.user[rows].tolist(), events.item[rows].tolist(), ts[rows].tolist(), strict=True
    )
    return ReplayPlan(
        history_from=history_from,
        n_history=n_history,
        live_from=live_from,
        live_to=live_to,
        n_live=len(rows),
        labels=dict(zip(keys, y.tolist(), strict=True)),
    )


def parse_history(text: str) -> int | None:
    """``--history``: 'all' (None), 'none' (0) or a count of events."""
    if text == "all":
        return None
    if text == "none":
        return 0
    try:
        count = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        count = -1
    if count < 0:
        raise typer.BadParameter(f"--history must be 'all', 'none' or a count, got {text!r}")
    return count


# --- the live summary ------------------------------------------------------------------------


class LiveStats:
    """Figures of the predictions seen so far: counts, throughput, latency, AUC.

    Fed one prediction at a time (:meth:`add`) with its event's Kafka time (None when unknown)
    and its own Kafka time, in seconds; the latency is their difference. :meth:`rolling` covers
    the last ``window`` predictions, :meth:`overall` all of them. ``label`` is nan when the
    event has none: it counts as a prediction, not in the AUC.
    """

    def __init__(self, window: int = ROLLING, clock: Any = time.monotonic) -> None:
        self.window = window
        self.clock = clock  # wall clock of the live rate
        self.count = 0
        self.model_versions: dict[str, int] = {}
        self._latency: list[float] = []
        self._scores: list[float] = []
        self._labels: list[float] = []
        self._recent_latency: deque[float] = deque(maxlen=window)
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)
        self._arrivals: deque[tuple[float, int]] = deque()
        self._first_in: float | None = None
        self._last_out: float | None = None

    def add(
        self, score: float, label: float, event_time: float | None, out_time: float, model: str = ""
    ) -> None:
        """Record one prediction."""
        self.count += 1
        if model:
            self.model_versions[model] = self.model_versions.get(model, 0) + 1
        first = event_time if event_time is not None else out_time
        if self._first_in is None or first < self._first_in:
            self._first_in = first
        if self._last_out is None or out_time > self._last_out:
            self._last_out = out_time
        if event_time is not None:
            latency = out_time - event_time
            self._latency.append(latency)
            self._recent_latency.append(latency)
        if label == label:  # not nan
            self._scores.append(score)
            self._labels.append(label)
            self._recent.append((score, label))

    def rate(self, over: float = 5.0) -> float:
        """Predictions per second arriving here over the last ``over`` seconds of wall time."""
        now = self.clock()
        arrivals = self._arrivals
        arrivals.append((now, self.count))
        while len(arrivals) > 1 and now - arrivals[0][0] > over:
            arrivals.popleft()
        t0, c0 = arrivals[0]
        return (self.count - c0) / (now - t0) if now > t0 else 0.0

    def mean_rate(self) -> float:
        """Events per second end to end: predictions over the span from the first event's
        Kafka time to the last prediction's (0 until that span is positive)."""
        if self._first_in is None or self._last_out is None or self._last_out <= self._first_in:
            return 0.0
        return self.count / (self._last_out - self._first_in)

    def rolling(self) -> dict[str, float | None]:
        """``{"p50", "p99", "auc"}`` over the last ``window`` predictions (None: too few)."""
        scores = [s for s, _ in self._recent]
        labels = [y for _, y in self._recent]
        return {**_percentiles(list(self._recent_latency)), "auc": _auc(labels, scores)}

    def overall(self) -> dict[str, float | None]:
        """``{"p50", "p99", "auc"}`` over every prediction."""
        return {**_percentiles(self._latency), "auc": _auc(self._labels, self._scores)}

    @property
    def labelled(self) -> int:
        return len(self._labels)


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    import numpy as np

    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


def _auc(labels: Sequence[float], scores: Sequence[float]) -> float | None:
    import numpy as np
    from sketchstream.models.metrics import roc_auc

    y = np.asarray(labels, dtype=np.float64)
    if y.size < 2 or y.min() == y.max():
        return None
    return roc_auc(y, np.asarray(scores, dtype=np.float64))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def status_line(stats: LiveStats, due: int, dlq: int, elapsed: float) -> str:
    """One line of the live summary."""
    r = stats.rolling()
    return (
        f"[{elapsed:5.0f}s] live {stats.count:,}/{due:,} predictions | {stats.rate():,.0f} ev/s"
        f" | latency p50 {_ms(r['p50'])} p99 {_ms(r['p99'])}"
        f" | AUC last {min(stats.labelled, stats.window):,} {_num(r['auc'], 3)} | DLQ {dlq:,}"
    )


def final_table(rows: Sequence[tuple[str, str]]) -> str:
    """Two aligned columns, for the terminal and CI logs alike."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


class Console:
    """Prints steps and the refreshing status line: rewritten in place on a terminal, a new
    line every ``every`` seconds otherwise (CI logs get no cursor control characters)."""

    def __init__(self, tty: bool | None = None, every: float | None = None) -> None:
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.every = every if every is not None else (1.0 if self.tty else 5.0)
        self._last = 0.0
        self._open = False
        self._held = False  # a status line was skipped since the last one shown

    def step(self, text: str) -> None:
        self.end_status()
        typer.echo(f"\n==> {text}")

    def say(self, text: str) -> None:
        self.end_status()
        typer.echo(text)

    def status(self, text: str, force: bool = False) -> None:
        """Show ``text`` unless one was shown less than ``every`` seconds ago; ``force``
        shows it anyway if a line was held back since (the final state, without a repeat)."""
        now = time.monotonic()
        if now - self._last < self.every and not (force and self._held):
            self._held = True
            return
        self._last = now
        self._held = False
        if self.tty:
            sys.stdout.write(f"\r\x1b[K{text}")  # back to the line start, clear it
            sys.stdout.flush()
            self._open = True
        else:
            typer.echo(text)

    def end_status(self) -> None:
        if self._open:
            typer.echo("")
            self._open = False


# --- artifacts -------------------------------------------------------------------------------


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


def refusal(path: Path) -> str | None:
    """Why the worker would refuse the artifact at ``path`` (None: it serves it), by loading it
    the way the worker does."""
    from sketchstream.models.errors import SketchstreamError
    from sketchstream.stream.models_feed import load_serving_model

    try:
        load_serving_model(path)
    except (SketchstreamError, OSError, ValueError) as exc:
        return str(exc)
    return None


# --- processes -------------------------------------------------------------------------------


def _sketchstream() -> list[str]:
    """How to run this installation's ``sketchstream`` command."""
    script = Path(sys.executable).with_name("sketchstream")
    if script.is_file():
        return [str(script)]
    found = shutil.which("sketchstream")
    if found:
        return [found]
    return [sys.executable, "-c", "from sketchstream.tools.cli import main; main()"]


def demo_topics(settings: Settings) -> dict[str, str]:
    """The environment that points commands at the demo's topics."""
    return {
        "SKETCHSTREAM_TOPIC_EVENTS": TOPIC_PREFIX + settings.topic_events,
        "SKETCHSTREAM_TOPIC_PREDICTIONS": TOPIC_PREFIX + settings.topic_predictions,
        "SKETCHSTREAM_TOPIC_DLQ": TOPIC_PREFIX + settings.topic_dlq,
        "SKETCHSTREAM_TOPIC_MODELS": TOPIC_PREFIX + settings.topic_models,
    }


def _shown(argv: Sequence[str]) -> str:
    words = ["sketchstream", *argv]
    return "$ " + " ".join(w if w and " " not in w else repr(w) for w in words)


class Processes:
    """The demo's child processes: run to completion, or started and stopped at the end."""

    def __init__(self, console: Console, env: Mapping[str, str]) -> None:
        self.console = console
        self.env = dict(env)
        self.children: list[tuple[str, subprocess.Popen, Path | None]] = []

    def run(self, argv: Sequence[str], what: str) -> None:
        """Run ``sketchstream argv`` in the foreground (its output goes to ours)."""
        self.console.say(_shown(argv))
        sys.stdout.flush()
        done = subprocess.run([*_sketchstream(), *argv], env=self.env, check=False)
        if done.returncode != 0:
            raise DemoError(
                f"{what} failed (`sketchstream {' '.join(argv)}` exited {done.returncode})"
            )

    def start(self, argv: Sequence[str], log: Path, name: str) -> subprocess.Popen:
        """Start ``sketchstream argv`` in the background, its output into ``log``."""
        self.console.say(f"{_shown(argv)}   (output: {log})")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*_sketchstream(), *argv],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.children.append((name, proc, log))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; the exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.children):
            self.stop(proc, timeout=30.0)


def tail(path: Path | None, lines: int = 25) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns: keep the last state of each line
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def _health(port: int) -> dict | None:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 180.0) -> dict:
    """Wait until the worker's /health says ok; :class:`DemoError` if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise DemoError(f"the worker exited ({proc.returncode}) while starting:\n{tail(log)}")
        health = _health(port)
        if health and health.get("status") == "ok" and health.get("partitions"):
            return health
        if time.monotonic() > deadline:
            raise DemoError(f"the worker was not healthy within {timeout:.0f}s:\n{tail(log)}")
        time.sleep(0.5)


# --- Kafka -----------------------------------------------------------------------------------


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


@dataclass
class Outcome:
    """What the run phase measured."""

    stats: LiveStats
    history_seconds: float | None = None
    dlq: int = 0
    replay_lines: list[str] = field(default_factory=list)


async def watch(
    client_kwargs: Mapping[str, Any],
    topics: Mapping[str, str],
    plan: ReplayPlan,
    procs: Processes,
    worker: subprocess.Popen,
    worker_log: Path,
    data: Path,
    *,
    workdir: Path,
    rate: str,
    console: Console,
    timeout: float,
) -> Outcome:
    """Replay the history (if any) and the live part, and follow the predictions."""
    import orjson
    from aiokafka import AIOKafkaConsumer, TopicPartition

    predictions = topics["SKETCHSTREAM_TOPIC_PREDICTIONS"]
    dlq_topic = topics["SKETCHSTREAM_TOPIC_DLQ"]
    consumer = AIOKafkaConsumer(**client_kwargs, group_id=None, enable_auto_commit=False)
    await consumer.start()
    outcome = Outcome(LiveStats())
    try:
        await consumer._client.force_metadata_update()  # the topics are new: fresh metadata

        def partitions(topic: str) -> list[Any]:
            return [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]

        pred_tps, dlq_tps = partitions(predictions), partitions(dlq_topic)
        if not pred_tps:
            raise DemoError(f"the broker does not know the topic {predictions!r}")
        events_file = str(data / "events.jsonl")

        def check_worker() -> None:
            if worker.poll() is not None:
                raise DemoError(f"the worker exited ({worker.returncode}):\n{tail(worker_log)}")

        # history: at full speed, counted from the end offsets only (no need to read them)
        if plan.n_history:
            argv = ["replay", events_file, "--to", _ts(plan.live_from), "--rate", "max"]
            if plan.history_from is not None:
                argv[2:2] = ["--from", _ts(plan.history_from)]
            log = workdir / "replay-history.log"
            t0 = time.monotonic()
            proc = procs.start(argv, log, "replay-history")
            last, last_change, last_t = 0, t0, t0
            while True:
                check_worker()
                if proc.poll() not in (None, 0):
                    raise DemoError(f"the history replay failed:\n{tail(log)}")
                done = sum((await end_offsets(consumer, pred_tps)).values())
                now = time.monotonic()
                if done != last:
                    speed = (done - last) / max(now - last_t, 1e-9)
                    console.status(
                        f"[{now - t0:5.0f}s] history {done:,}/{plan.n_history:,} events scored"
                        f" | {speed:,.0f} ev/s"
                    )
                    last, last_change, last_t = done, now, now
                if done >= plan.n_history and proc.poll() == 0:
                    break
                if now - last_change > _STALL_S or now - t0 > timeout:
                    raise DemoError(
                        f"{done:,} of {plan.n_history:,} history events scored after "
                        f"{now - t0:.0f}s; worker log:\n{tail(worker_log)}"
                    )
                await asyncio.sleep(0.5)
            outcome.history_seconds = time.monotonic() - t0
            outcome.replay_lines.append(tail(log, 1))
            console.say(
                f"history: {plan.n_history:,} events scored in {outcome.history_seconds:.1f}s "
                f"({plan.n_history / outcome.history_seconds:,.0f} ev/s, the worker's throughput)"
            )

        # live: read every prediction from here on
        console.step(
            f"7/8 live: the test period at {rate if rate == 'max' else rate + ' events/s'}, "
            "predictions followed as they arrive"
        )
        starts = await end_offsets(consumer, pred_tps)
        consumer.assign(pred_tps)
        for tp in pred_tps:
            consumer.seek(tp, starts[tp])
        argv = ["replay", events_file, "--from", _ts(plan.live_from), "--rate", rate]
        if plan.live_to is not None:
            argv += ["--to", _ts(plan.live_to)]
        log = workdir / "replay-live.log"
        stats = outcome.stats
        seen: set[tuple[int, int]] = set()
        labels = plan.labels
        loads = orjson.loads
        t0 = time.monotonic()
        proc = procs.start(argv, log, "replay-live")
        last_change = t0
        while len(seen) < plan.n_live or proc.poll() is None:
            check_worker()
            if proc.poll() not in (None, 0):
                raise DemoError(f"the live replay failed:\n{tail(log)}")
            batches = await consumer.getmany(timeout_ms=250, max_records=20_000)
            for records in batches.values():
                for record in records:
                    p = loads(record.value)
                    ev = p["event"]
                    ref = (ev["partition"], ev["offset"])
                    key = (p["user"], p["item"], p["event_ts"])
                    if ref in seen or key not in labels:
                        continue  # a redelivered duplicate, or not an event of this run
                    seen.add(ref)
                    scores = p["scores"]
                    score = scores.get("like", next(iter(scores.values()), 0.0))
                    out_time = record.timestamp / 1000.0
                    event_time = p.get("kafka_ts") or None
                    stats.add(score, labels[key], event_time, out_time, p.get("model_version", ""))
            now = time.monotonic()
            if batches:
                last_change = now
            if dlq_tps:
                outcome.dlq = sum((await end_offsets(consumer, dlq_tps)).values())
            console.status(status_line(stats, plan.n_live, outcome.dlq, now - t0))
            if now - last_change > _STALL_S or now - t0 > timeout:
                raise DemoError(
                    f"{len(seen):,} of {plan.n_live:,} predictions after {now - t0:.0f}s; "
                    f"worker log:\n{tail(worker_log)}"
                )
        console.status(status_line(stats, plan.n_live, outcome.dlq, time.monotonic() - t0), True)
        console.end_status()
        outcome.replay_lines.append(tail(log, 1))
        return outcome
    finally:
        await consumer.stop()


def _ts(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


# --- the command -----------------------------------------------------------------------------


@contextlib.contextmanager
def _interruptible() -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, so every step ends through the clean-up,
    and are remembered: on a terminal the children get Ctrl-C too and may exit first, and the
    demo should then say it was interrupted, not that they failed."""
    received: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def demo(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            file_okay=False,
            help="A folder with events.jsonl (and items.jsonl). Default: MovieLens-1M in "
            "<data_dir>/ml-1m, fetched when missing.",
        ),
    ] = None,
    events: Annotated[
        int | None,
        typer.Option("--events", min=1, help="Replay only the first N events of the test period."),
    ] = None,
    rate: Annotated[
        str, typer.Option("--rate", help="Events per second of the live replay, or 'max'.")
    ] = "2000",
    history: Annotated[
        str,
        typer.Option(
            "--history",
            help="Events before the test period to replay first, at full speed, so user states "
            "are warm when it arrives: 'all', 'none', or a count (the latest N).",
        ),
    ] = "200000",
    retrain: Annotated[
        bool, typer.Option("--retrain", help="Train even if an artifact for this data exists.")
    ] = False,
    profile: Annotated[
        str,
        typer.Option(
            "--profile",
            help="Training profile when a model is needed: 'demo' (1 epoch, hidden 256, no "
            "baselines: about a minute) or 'full' (sketchstream train's defaults).",
        ),
    ] = "demo",
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Worker state and logs of the demo.")
    ] = Path("var/demo"),
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds each replay phase may take.")
    ] = 1800.0,
    keep_topics: Annotated[
        bool, typer.Option("--keep-topics", help="Leave the demo topics on the broker.")
    ] = False,
    app_id: Annotated[
        str,
        typer.Option(
            "--app-id", help="The worker's consumer group (its changelog topic is named after it)."
        ),
    ] = APP_ID,
) -> None:
    """Run the whole system end to end: broker, topics, MovieLens-1M, a model, a worker, a
    replay of the test period with a live summary, then a clean shutdown."""
    from sketchstream.tools.options import load_settings_or_exit

    if profile not in ("demo", "full"):
        raise typer.BadParameter(f"--profile must be 'demo' or 'full', got {profile!r}")
    if rate != "max":
        try:
            ok = float(rate) > 0
        except ValueError:
            ok = False
        if not ok:
            raise typer.BadParameter(f"--rate must be a positive number or 'max', got {rate!r}")
    history_count = parse_history(history)
    settings = load_settings_or_exit()
    console = Console()
    started = time.monotonic()
    code = 0
    with _interruptible() as interrupted:
        try:
            _run(
                settings,
                console,
                data=data,
                limit=events,
                history=history_count,
                rate=rate,
                retrain=retrain,
                profile=profile,  # type: ignore[arg-type]
                workdir=workdir,
                timeout=timeout,
                keep_topics=keep_topics,
                app_id=app_id,
            )
        except KeyboardInterrupt:
            interrupted.append(signal.SIGINT)
        except DemoError as exc:
            if not interrupted:
                console.say(f"\nerror: {exc}")
                code = 1
        if interrupted:
            console.say("\ninterrupted: cleaned up")
            code = 130
    console.say(f"demo finished in {time.monotonic() - started:.0f}s")
    if code:
        raise typer.Exit(code)


def _run(
    settings: Settings,
    console: Console,
    *,
    data: Path | None,
    limit: int | None,
    rate: str,
    history: int | None,
    retrain: bool,
    profile: Profile,
    workdir: Path,
    timeout: float,
    keep_topics: bool,
    app_id: str,
) -> None:
    from sketchstream.models.errors import SketchstreamError
    from sketchstream.tools.broker import LocalBroker, ensure_broker

    stack = contextlib.ExitStack()
    with stack:
        # 1 broker ------------------------------------------------------------------------
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
        client_kwargs = settings.client_kwargs()
        topics = demo_topics(settings)
        env = {**os.environ, **topics, "PYTHONUNBUFFERED": "1"}
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
        procs = Processes(console, env)

        # 2 topics ------------------------------------------------------------------------
        console.step("2/8 topics")
        names = [*topics.values(), *app_topics(app_id)]
        deleted = asyncio.run(_reset_topics(client_kwargs, names))
        if deleted:
            console.say(f"deleted the topics of an earlier demo run: {', '.join(sorted(deleted))}")
        console.say(
            "the demo's topics: " + ", ".join(topics.values()) + " (SKETCHSTREAM_TOPIC_* set)"
        )
        procs.run(["topics", "create"], "creating the topics")
        if not keep_topics:
            stack.callback(_delete_topics, client_kwargs, names, console)
        stack.callback(procs.stop_all)  # runs first: nothing writes to a topic being deleted

        # 3 data --------------------------------------------------------------------------
        console.step("3/8 data")
        if data is None:
            data = settings.data_dir / "ml-1m"
            procs.run(["data", "movielens-1m", "--out", str(data)], "fetching MovieLens-1M")
        elif not (data / "events.jsonl").is_file():
            raise DemoError(f"{data} has no events.jsonl")
        from sketchstream.models.events import read_events, stream_md5

        table = read_events(data / "events.jsonl")
        plan = plan_replay(table, limit, history)
        md5 = stream_md5(table)
        n_events = len(table)
        del table
        console.say(
            f"{n_events:,} events; the test period starts at ts {_ts(plan.live_from)}; "
            f"replaying {plan.n_history:,} events before it as history, {plan.n_live:,} live"
        )

        # 4 model -------------------------------------------------------------------------
        console.step("4/8 model")
        artifacts = settings.artifact_dir
        version = None
        for candidate in [] if retrain else find_artifact(artifacts, n_events, md5):
            reason = refusal(artifacts / candidate)
            if reason is None:
                version = candidate
                break
            console.say(f"not reusing model {candidate}: {reason}")
        if version is not None:
            console.say(
                f"reusing model {version} from {artifacts}, trained on this data "
                "(--retrain trains a new one)"
            )
        else:
            argv = ["train", "--data", str(data), "--out", str(artifacts)]
            if profile == "demo":
                argv += list(DEMO_TRAIN_ARGS)
                console.say(
                    "training with the demo profile (1 epoch, hidden 256, no baselines). The full "
                    f"profile: `sketchstream train --data {data} --out {artifacts}` "
                    "(or `sketchstream demo --retrain --profile full`)"
                )
            if not console.tty:
                argv.append("--no-progress")
            procs.run(argv, "training")
            found = find_artifact(artifacts, n_events, md5)
            if not found:
                raise DemoError(f"training wrote no artifact for this data into {artifacts}")
            version = found[0]
            reason = refusal(artifacts / version)
            if reason is not None:
                raise DemoError(f"the worker would refuse the new model {version}: {reason}")
        offline = _offline_auc(artifacts / version)
        asyncio.run(
            _announce(client_kwargs, topics["SKETCHSTREAM_TOPIC_MODELS"], artifacts, version)
        )
        console.say(f"announced model {version} on {topics['SKETCHSTREAM_TOPIC_MODELS']}")

        # 5 worker ------------------------------------------------------------------------
        console.step("5/8 worker")
        state = workdir / "state"
        shutil.rmtree(state, ignore_errors=True)
        port = free_port()
        worker_log = workdir / "worker.log"
        worker_argv = [
            "worker", "--app-id", app_id, "--state-dir", str(state), "--artifact-dir",
            str(artifacts), "--web-port", str(port), "--standby-replicas", "0",
            "--loglevel", "warning",
        ]  # fmt: skip
        worker = procs.start(worker_argv, worker_log, "worker")
        health = wait_healthy(worker, port, worker_log)
        console.say(
            f"healthy: http://127.0.0.1:{port}/health serves model {health['model_version']} "
            f"on partitions {health['partitions']}; metrics at http://127.0.0.1:{port}/metrics"
        )

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
                workdir=workdir,
                rate=rate,
                console=console,
                timeout=timeout,
            )
        )

        # 8 shutdown ----------------------------------------------------------------------
        console.step("8/8 shutdown")
        t0 = time.monotonic()
        code = procs.stop(worker)
        console.say(f"worker stopped (exit {code}) in {time.monotonic() - t0:.1f}s")
        stats = outcome.stats
        overall = stats.overall()
        models = ", ".join(sorted(stats.model_versions)) or "-"
        rows = [
            ("data", f"{data} ({n_events:,} events)"),
            ("model", f"{models} (offline test AUC {_num(offline)})"),
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
            ("latency p50", _ms(overall["p50"])),
            ("latency p99", _ms(overall["p99"])),
            ("AUC (like)", f"{_num(overall['auc'])} over {stats.labelled:,} rated events"),
        ]
        console.say("\nsketchstream demo: summary\n" + final_table(rows))
        if code not in (0, None):
            raise DemoError(f"the worker exited {code} on SIGTERM:\n{tail(worker_log)}")
        if stats.count < plan.n_live:
            raise DemoError(f"only {stats.count:,} of {plan.n_live:,} events got a prediction")


def _offline_auc(path: Path) -> float | None:
    import json

    from sketchstream.models.artifacts import MANIFEST

    try:
        metrics = json.loads((path / MANIFEST).read_text()).get("metrics", {})
        return float(metrics["like"]["test"]["auc"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stop_broker(broker: Any, console: Console) -> None:
    if broker.users():
        console.say("left the local broker running: another session uses it")
        return
    broker.stop()
    console.say("stopped the local broker (this demo started it)")


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
