"""The end-to-end stream benchmark behind ``sketchstream bench stream``: systems, load, figures.

Three systems run the same job on the real broker, one process each, on fresh topics:

- ``raw``: an aiokafka consumer → producer passthrough (``getmany`` up to the batch size, one
  ``send`` per record to the same partition of the output topic, delivery awaited per batch);
- ``faust``: a faust agent on the worker's own app settings (:func:`faust_app`) taking the
  same micro-batches (``take_events``) and sending every event on unchanged: faust's cost;
- ``worker``: ``sketchstream worker`` itself (decode, state read, score, fold, MLP, predictions,
  RocksDB + changelog writes).

Each run: the events are produced into the events topic at full speed before the system starts
(so the producer never limits it), the system drains them, and ``events_per_s`` is the number
of outputs over the span of their Kafka timestamps. Then events are produced at half that rate
for ``latency_seconds`` and each output's latency is its Kafka record time minus its event's
Kafka record time (both set by the producers when the record is created). RSS is the peak
resident set of the system's process (``VmHWM``); bytes per user come from the worker's
changelog (the latest state of every user). CPU µs per event is the process's CPU time
(``/proc/<pid>/stat``) from its first output to its last of the drain, over those outputs: on
a machine shared with other work, the events/s move with the load while this barely does, so
the ratio of two systems' CPU per event says what their events/s would be, each on a core of
its own (none when the drain took under :data:`_MIN_CPU_TICKS` clock ticks of CPU: the
counters move by whole ticks, 10 ms). With ``profile``, the worker's row also gets where
its time went in each phase, stage by stage (:mod:`~sketchstream.tools.bench_profile`, read
off its ``/metrics``).

The events come from :mod:`~sketchstream.tools.bench_events`, the model the worker serves from
:mod:`~sketchstream.tools.bench_model`, topics and offsets from
:mod:`~sketchstream.tools.kafka_io`. What is left (~640 lines) is one thing: the three systems
(the two passthroughs are here, started as ``python -c`` children) and their measured run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sketchstream.models.errors import SketchstreamError
from sketchstream.tools.bench_events import (
    BadEventLine,
    check_events,
    event_lines,
    later_copies,
    user_keys,
)
from sketchstream.tools.bench_harness import render
from sketchstream.tools.bench_model import bench_model
from sketchstream.tools.kafka_io import (
    BenchTopics,
    create_bench_topics,
    delete_topics,
    end_offsets,
    free_port,
    kafka_answers,
    partitions_of,
    read_topic,
    topic_end_offsets,
)
from sketchstream.tools.worker import worker_argv

if TYPE_CHECKING:
    from sketchstream.stream.settings import Settings

__all__ = [
    "SYSTEMS",
    "BenchRun",
    "StreamBenchError",
    "run_bench",
    "run_system",
    "serve_passthrough",
    "stream_table",
]

log = logging.getLogger(__name__)

SYSTEMS = ("raw", "faust", "worker")
_READY_TIMEOUT = 120.0
#: /proc's CPU counters move by whole clock ticks (10 ms): a drain that took fewer than this
#: many ticks of CPU gets no CPU figure (a tiny drain read 0 ticks and reported 0.0)
_MIN_CPU_TICKS = 10


class StreamBenchError(SketchstreamError):
    """``bench stream`` cannot run as asked; the message says why and what to do."""


# --- the bench ------------------------------------------------------------------------------


def run_bench(
    settings: Settings,
    *,
    events: int,
    systems: Sequence[str],
    partitions: int,
    batch_size: int,
    batch_within: float,
    latency_seconds: float,
    latency_rate: float | None,
    data: Path | None,
    model: Sequence[Path] | None,
    hidden: int,
    train_events: int,
    blocks: int,
    timeout: float,
    say: Callable[[str], None],
    profile: bool = False,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """``bench stream``: each of ``systems`` (some of :data:`SYSTEMS`) on the broker of
    ``settings``, one after the other, on the events of ``data`` (default ``<data dir>/ml-1m``;
    synthetic when it has no events.jsonl); all of them again ``rounds`` times in all, so that
    runs of different systems alternate on a machine whose speed drifts. Returns one row per
    system and round (:meth:`BenchRun.row`, plus ``round`` (from 1), ``ratio_vs_raw`` and
    ``cpu_ratio_vs_raw`` (raw's CPU µs per event over the system's) beside the same round's raw
    run and ``model`` for the worker; ``broker_cpu_us_per_event`` when the broker is the local
    one (:func:`local_broker_pid`, else None); with ``profile``, the worker's ``profile``:
    :func:`~sketchstream.tools.bench_profile.profile_rows` of the drain and of the latency run).

    ``model``: the artifact stores to serve (the worker runs once for each, in every round, one
    after the other: two models compared in the same run, each against the same round's raw;
    none: :func:`bench_model`'s default).

    :class:`StreamBenchError` when no broker answers, the events file is empty or ``model``
    holds no artifact,
    :class:`~sketchstream.tools.bench_events.BadEventLine` for a line the bench cannot use;
    progress goes to ``say``.
    """
    client_kwargs = settings.client_kwargs()
    if not kafka_answers(client_kwargs, timeout=10.0):
        raise StreamBenchError(
            f"no Kafka broker answers at {settings.bootstrap_servers}: "
            "start the local one with `sketchstream kafka start`"
        )
    for name in ("aiokafka", "faust", "mode"):  # retries on fresh topics are expected here
        logging.getLogger(name).setLevel(logging.ERROR)

    folder = data or settings.data_dir / "ml-1m"
    path = folder / "events.jsonl"
    pool, _ = event_lines(path, 2 * events)
    origin = str(path) if path.is_file() else "a synthetic MovieLens-1M-shaped stream"
    if not pool:
        raise StreamBenchError(f"no events in {path}")
    try:
        check_events(pool)
    except BadEventLine as exc:
        raise BadEventLine(f"{origin}: {exc}") from None
    lines, keys = pool[:events], user_keys(pool[:events])

    def more(n: int) -> tuple[list[bytes], list[bytes]]:
        """The ``n`` events after the drained ones: the file's next ones, then (when it runs
        out) its events again, later in time (:func:`later_copies`): never events older than
        what their users already sent."""
        nonlocal pool
        if len(pool) < events + n:
            checked = len(pool)
            pool, _ = event_lines(path, events + n)
            check_events(pool[checked:], start=checked)
        after = pool[events : events + n]
        if len(after) < n:
            say(
                f"  (the events run out: the last {n - len(after):,} of the latency run are "
                "the first ones again, moved later in time)"
            )
            after += later_copies(pool, n - len(after))
        return after, user_keys(after)

    served: list[tuple[Path, str, str]] = []  # (store, version, how chosen) a worker run
    if "worker" in systems:
        for one in list(model or ()) or [None]:
            try:
                served.append(
                    bench_model(
                        one,
                        settings.artifact_dir,
                        settings.home / "bench" / "models",
                        lambda: event_lines(folder / "events.jsonl", train_events)[0],
                        items_path=folder / "items.jsonl",
                        hidden=hidden,
                        blocks=blocks,
                        say=say,
                    )
                )
            except FileNotFoundError as exc:  # --model names a folder without an artifact store
                raise StreamBenchError(f"--model {exc}") from None
    load1, load5, _ = os.getloadavg()
    say(
        f"stream bench: {len(lines):,} events drained per system, the ones after them for the "
        f"latency run (from {origin}); {partitions} partitions, batches of up to {batch_size} "
        f"(the passthroughs' within {batch_within}s); {os.cpu_count()} CPUs, "
        f"load average {load1:.2f}/{load5:.2f}"
        + "".join(f"; model {version} ({how})" for _, version, how in served)
    )
    broker_pid = local_broker_pid(settings)
    rows = []
    for k in range(1, rounds + 1):
        runs = []
        plan: list[tuple[str, Path | None, str | None]] = []  # (system, store, version) a run
        for system in systems:
            worker = system == "worker"
            plan += [(system, s, v) for s, v, _ in served] if worker else [(system, None, None)]
        for system, store, version in plan:
            name = system if len(served) < 2 or version is None else f"{system} {version}"
            say(f"[{name}] ..." if rounds == 1 else f"[{name}, round {k} of {rounds}] ...")
            runs.append(
                _bench_one(
                    system,
                    lines,
                    keys,
                    more,
                    origin=origin,
                    client_kwargs=client_kwargs,
                    partitions=partitions,
                    artifact_dir=store,
                    batch_size=batch_size,
                    batch_within=batch_within,
                    latency_seconds=latency_seconds,
                    latency_rate=latency_rate,
                    timeout=timeout,
                    say=say,
                    profile=profile,
                    broker_pid=broker_pid,
                )
            )
            if system == "worker":
                runs[-1]["model"] = version
        raw = next((r for r in runs if r["system"] == "raw"), None)
        for r in runs:
            r["round"] = k
            # a drain too short to time (its outputs within one millisecond) gives no ratio
            rated = raw is not None and all(
                math.isfinite(x["events_per_s"]) and x["events_per_s"] > 0 for x in (r, raw)
            )
            if r["system"] != "raw" and rated:
                r["ratio_vs_raw"] = round(r["events_per_s"] / raw["events_per_s"], 3)
                if raw["cpu_us_per_event"] and r["cpu_us_per_event"]:
                    r["cpu_ratio_vs_raw"] = round(
                        raw["cpu_us_per_event"] / r["cpu_us_per_event"], 3
                    )
        rows += runs
    return rows


def _bench_one(
    system: str, lines: Any, keys: Any, more: Any, *, origin: str, **options: Any
) -> dict[str, Any]:
    """One run of ``system``: its :meth:`BenchRun.row`."""
    try:
        return run_system(system, lines, keys, more, **options).row()
    except BadEventLine as exc:  # met in the events read for a latency run
        raise BadEventLine(f"{origin}: {exc}") from None


def rounds_summary(rows: Sequence[dict[str, Any]]) -> str:
    """Each system's events/s and ratio to raw over the rounds of :func:`run_bench`, one line
    a system (a worker line a model, when it served several): every round's figure in order,
    then the median."""

    def series(values: list[float], spec: str) -> str:
        shown = " / ".join(format(v, spec) for v in values)
        return f"{shown} (median {format(statistics.median(values), spec)})"

    lines = []
    several = len({r.get("model") for r in rows if r["system"] == "worker"}) > 1
    for system, model in dict.fromkeys((r["system"], r.get("model")) for r in rows):
        mine = [r for r in rows if r["system"] == system and r.get("model") == model]
        name = f"{system} {model}" if several and model else system
        text = f"{name}: events/s " + series([r["events_per_s"] for r in mine], ",.0f")
        ratios = [r["ratio_vs_raw"] for r in mine if r.get("ratio_vs_raw") is not None]
        if ratios:
            text += "; x raw " + series(ratios, ".3f")
        lines.append(text)
    return "\n".join(lines)


def stream_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`run_bench` as a text table."""
    cols = [("round", "round")] if any(r.get("round", 1) > 1 for r in rows) else []
    cols += [("system", "system")]
    if len({r.get("model") for r in rows if r["system"] == "worker"}) > 1:
        cols += [("model", "model")]
    cols += [
        ("events_per_s", "events/s"),
        ("ratio_vs_raw", "x raw"),
        ("cpu_us_per_event", "CPU µs/event"),
        ("cpu_ratio_vs_raw", "x raw CPU"),
        ("broker_cpu_us_per_event", "broker CPU µs/event"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("latency_rate", "at events/s"),
        ("rss_mb", "RSS MB"),
        ("state_bytes_per_user", "bytes/user"),
    ]
    return render(rows, cols, lambda _k, v: f"{v:,}" if isinstance(v, float) else str(v))


def latency_parts_table(runs: list[dict[str, list[float]]]) -> str:
    """The worker's ``latency_parts`` of each run as text: one line a part, p50 / p99 ms."""
    lines = ["worker, where the paced run's latency went (p50 / p99 ms, one column a run):"]
    width = max(len(name) for name, _ in LATENCY_PARTS)
    for name, what in LATENCY_PARTS:
        cells = "  ".join(
            f"{r[name][0]:6.1f} / {r[name][1]:6.1f}" if r.get(name) else "     -" for r in runs
        )
        lines.append(f"{name:>{width}}  {cells}   {what}")
    return "\n".join(lines)


async def produce(
    client_kwargs: dict[str, Any],
    topic: str,
    lines: Sequence[bytes],
    keys: Sequence[bytes],
    *,
    rate: float | None = None,
    tick: float = 0.005,
) -> float:
    """Produce ``lines`` keyed by ``keys`` (murmur2 partitioning, like Kafka's Java clients):
    as fast as the broker takes them, or ``rate`` events/s in ``tick``-second slices. Record
    times are set when each record is appended. Returns the seconds it took."""
    from aiokafka import AIOKafkaProducer, TopicPartition
    from aiokafka.partitioner import DefaultPartitioner

    producer = AIOKafkaProducer(
        **client_kwargs,
        linger_ms=1 if rate else 20,
        max_batch_size=1 << 20,
        max_request_size=1 << 23,
        acks=1,
    )
    await producer.start()
    try:
        parts = sorted(await producer.partitions_for(topic))
        # connect to the leaders before the clock starts: record times are set on append, so
        # records appended while the first connection opens would count its set-up as latency
        cluster = producer.client.cluster
        for leader in {cluster.leader_for_partition(TopicPartition(topic, p)) for p in parts}:
            await producer.client.ready(leader)
        partition_of = DefaultPartitioner()
        part = [partition_of(k, parts, parts) for k in keys]
        started = time.perf_counter()  # after the partitioning too: a paced run starts on time
        step = max(1, int(rate * tick)) if rate else 4096
        pending = []
        for lo in range(0, len(lines), step):
            if rate:
                ahead = lo / rate - (time.perf_counter() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            builders: dict[int, Any] = {}
            for j in range(lo, min(lo + step, len(lines))):
                p = part[j]
                b = builders.get(p)
                if b is None:
                    b = builders[p] = producer.create_batch()
                if b.append(key=keys[j], value=lines[j], timestamp=None) is None:
                    pending.append(await producer.send_batch(b, topic, partition=p))
                    b = builders[p] = producer.create_batch()
                    b.append(key=keys[j], value=lines[j], timestamp=None)
            for p, b in builders.items():
                pending.append(await producer.send_batch(b, topic, partition=p))
            if len(pending) > 256:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


# --- systems ---------------------------------------------------------------------------------


def serve_passthrough(spec: dict[str, Any]) -> None:
    """Run a passthrough system (``spec["system"]``: ``raw`` or ``faust``) until SIGTERM.

    Entry point of the passthrough processes (``python -c``), configured by ``spec``:
    ``bootstrap``, ``events``, ``outputs``, ``partitions``, ``app_id``, ``batch_size``,
    ``batch_within``, ``state_dir``.
    """
    logging.basicConfig(level=logging.WARNING)
    if spec["system"] == "raw":
        asyncio.run(_raw_passthrough(spec))
    elif spec["system"] == "faust":
        _faust_passthrough(spec)
    else:
        raise ValueError(f"unknown passthrough {spec['system']!r}: expected raw or faust")


async def _raw_passthrough(spec: dict[str, Any]) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    consumer = AIOKafkaConsumer(
        spec["events"],
        bootstrap_servers=spec["bootstrap"],
        group_id=spec["app_id"],
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        max_partition_fetch_bytes=1 << 20,
    )
    # faust's producer defaults, as in the worker: acks from all replicas, 5 ms linger
    producer = AIOKafkaProducer(
        bootstrap_servers=spec["bootstrap"], acks="all", linger_ms=5, max_batch_size=1 << 20
    )
    await consumer.start()
    await producer.start()
    out, within = spec["outputs"], int(spec["batch_within"] * 1000)
    try:
        while not stop.is_set():
            got = await consumer.getmany(timeout_ms=within, max_records=spec["batch_size"])
            sends = [
                await producer.send(out, r.value, r.key, partition=tp.partition)
                for tp, records in got.items()
                for r in records
            ]
            if sends:
                await asyncio.gather(*sends)
    finally:
        await consumer.stop()
        await producer.stop()


def _faust_passthrough(spec: dict[str, Any]) -> None:
    import faust
    from sketchstream.stream.app import faust_app
    from sketchstream.stream.publish import publish
    from sketchstream.stream.settings import Settings

    settings = Settings(
        kafka=spec["bootstrap"],
        partitions=spec["partitions"],
        state_dir=Path(spec["state_dir"]),
        app_id=spec["app_id"],
        batch_size=spec["batch_size"],
    )
    app = faust_app(settings, web=False)
    events = app.topic(spec["events"], key_type=bytes, value_type=bytes, partitions=None)
    out = spec["outputs"]

    @app.agent(events, name="noop", concurrency=1)
    async def noop(stream: Any) -> None:
        producer = app.producer
        async for batch in stream.take_events(spec["batch_size"], within=spec["batch_within"]):
            records = [(event.message.key, event.message.value) for event in batch]
            sends = await publish(producer, out, records)  # as the worker publishes
            await asyncio.gather(*sends)

    worker = faust.Worker(app, loglevel="warning", redirect_stdouts=False)
    for name in ("aiokafka", "faust", "mode"):  # as the worker does: no record per record
        logging.getLogger(name).setLevel(logging.WARNING)
    worker.execute_from_commandline()


class _Process:
    """A system under test in its own process: started, watched (RSS), stopped."""

    def __init__(
        self, argv: list[str], env: dict[str, str], log_path: Path, metrics_url: str | None = None
    ) -> None:
        self.log_path = log_path
        self.metrics_url = metrics_url  # the worker's /metrics
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.peak_rss_mb = 0.0

    def cpu_seconds(self) -> float:
        """CPU time the process and its children (the worker's MLP helper) have used so far,
        user + system (0.0 when unreadable)."""
        return sum(pid_cpu_seconds(pid) or 0.0 for pid in _process_tree(self.proc.pid))

    def sample(self) -> None:
        """Record the peak RSS so far (VmHWM) of the process and its children, summed; fails if
        the process died."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"exited with {self.proc.returncode}:\n{self.tail()}")
        peak = 0.0
        for pid in _process_tree(self.proc.pid):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak += int(line.split()[1]) / 1024.0
            except OSError:
                pass
        self.peak_rss_mb = max(self.peak_rss_mb, peak)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)
        self._log.close()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


_PASSTHROUGH = (
    "import json, sys; from sketchstream.tools.stream_bench import serve_passthrough; "
    "serve_passthrough(json.loads(sys.argv[1]))"
)


def pid_cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) process ``pid`` has used so far; None when unreadable."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def local_broker_pid(settings: Settings) -> int | None:
    """The JVM of the local broker (``sketchstream kafka start``) when the bench runs on it:
    what it spends on a system's traffic is part of that system's cost on this machine.
    None for any other broker (its process is not ours to read)."""
    from sketchstream.tools.broker import LocalBroker

    broker = LocalBroker(settings)
    if broker.bootstrap_servers != settings.bootstrap_servers:
        return None
    return broker.pid()


def _process_tree(root: int) -> list[int]:
    """``root`` and every live process below it (from ``/proc``'s parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _start(
    system: str,
    topics: BenchTopics,
    *,
    bootstrap: str,
    root: Path,
    artifact_dir: Path | None,
    batch_size: int,
    batch_within: float,
) -> _Process:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    state_dir = root / f"state-{system}"
    log_path = root / f"{system}.log"
    if system == "worker":
        port = free_port()
        env.update(
            {
                **topics.worker_env(bootstrap),
                "SKETCHSTREAM_STATE_DIR": str(state_dir),
                "SKETCHSTREAM_ARTIFACT_DIR": str(artifact_dir),
                "SKETCHSTREAM_WEB_PORT": str(port),
            }
        )
        argv = worker_argv(
            "--batch-size", str(batch_size), "--standby-replicas", "0", "--loglevel", "warning"
        )
        return _Process(argv, env, log_path, f"http://127.0.0.1:{port}/metrics")
    spec = {
        "system": system,
        "bootstrap": bootstrap,
        "events": topics.events,
        "outputs": topics.outputs,
        "partitions": topics.partitions,
        "app_id": topics.app_id,
        "batch_size": batch_size,
        "batch_within": batch_within,
        "state_dir": str(state_dir),
    }
    argv = [sys.executable, "-c", _PASSTHROUGH, json.dumps(spec)]
    return _Process(argv, env, log_path)


# --- one run ---------------------------------------------------------------------------------


@dataclass
class BenchRun:
    """Figures of one system."""

    system: str
    events: int
    events_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    latency_events: int = 0
    latency_rate: float = 0.0
    rss_mb: float = 0.0
    cpu_us_per_event: float | None = None
    broker_cpu_us_per_event: float | None = None  # the local broker's, during the drain
    state_bytes_per_user: float | None = None
    users: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        out = {
            "system": self.system,
            "events": self.events,
            "events_per_s": round(self.events_per_s, 1),
            "p50_ms": None if self.p50_ms is None else round(self.p50_ms, 2),
            "p99_ms": None if self.p99_ms is None else round(self.p99_ms, 2),
            "latency_events": self.latency_events,
            "latency_rate": round(self.latency_rate, 1),
            "rss_mb": round(self.rss_mb, 1),
            "cpu_us_per_event": None
            if self.cpu_us_per_event is None
            else round(self.cpu_us_per_event, 1),
            "broker_cpu_us_per_event": None
            if self.broker_cpu_us_per_event is None
            else round(self.broker_cpu_us_per_event, 1),
        }
        if self.system == "worker":
            out["state_bytes_per_user"] = self.state_bytes_per_user
            out["users"] = self.users
        return out | self.extra


async def _delete_run_topics(client_kwargs: dict[str, Any], topics: BenchTopics) -> None:
    """Delete every topic of the run (also those the systems created: changelog, assignor)."""
    try:
        await delete_topics(client_kwargs, lambda name: topics.suffix in name)
    except Exception as exc:  # cleanup only: never hide the figures behind it
        log.warning("could not delete the bench topics: %s", exc)


async def _wait_outputs(
    client_kwargs: dict[str, Any],
    topics: BenchTopics,
    proc: _Process,
    want: int,
    timeout: float,
    progress: Callable[[int], None] | None = None,
) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**client_kwargs, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while True:
            proc.sample()
            tps = partitions_of(topics.outputs, topics.partitions)
            got = sum((await end_offsets(consumer, tps)).values())
            if progress is not None:
                progress(got)
            if got >= want:
                return
            now = time.monotonic()
            if got != last:
                last, last_change = got, now
            if now > deadline or (got > 0 and now - last_change > 60.0):
                raise RuntimeError(
                    f"{got:,} of {want:,} outputs after {timeout:.0f}s:\n{proc.tail()}"
                )
            await asyncio.sleep(0.2)
    finally:
        await consumer.stop()


def _event_ref(system: str, record: Any) -> tuple[int, int, float | None, float | None]:
    """``(partition, offset, received, published)`` of the event an output record answers;
    the times (seconds) at which the worker took its batch and encoded the prediction, None
    for a passthrough (it keeps partition and order)."""
    if system == "worker":
        import orjson

        value = orjson.loads(record.value)
        ev = value["event"]
        return ev["partition"], ev["offset"], value["received_ts"], value["published_ts"]
    return record.partition, record.offset, None, None


#: ``latency_parts``: where an output's latency went, from its event's record time to its own
LATENCY_PARTS = (
    ("to_worker", "event appended -> its batch taken by the worker (broker, fetch, queue)"),
    ("in_worker", "batch taken -> prediction encoded (processing, MLP, waiting for the loop)"),
    ("to_send", "prediction encoded -> appended to the producer"),
)


def latency_parts(rows: Sequence[tuple[float, float, float, float]]) -> dict[str, list[float]]:
    """``{part: [p50, p99] ms}`` over ``rows`` of ``(born, received, published, sent)``
    seconds (:data:`LATENCY_PARTS`)."""
    import numpy as np

    t = np.asarray(rows, np.float64).reshape(-1, 4)
    out = {}
    for j, (name, _) in enumerate(LATENCY_PARTS):
        ms = 1000.0 * (t[:, j + 1] - t[:, j])
        out[name] = [round(float(np.percentile(ms, q)), 2) for q in (50, 99)] if len(ms) else []
    return out


async def run_one(
    system: str,
    lines: Sequence[bytes],
    keys: Sequence[bytes],
    more: Callable[[int], tuple[list[bytes], list[bytes]]],
    *,
    client_kwargs: dict[str, Any],
    partitions: int,
    artifact_dir: Path | None,
    batch_size: int,
    batch_within: float,
    latency_seconds: float,
    timeout: float,
    say: Callable[[str], None],
    latency_rate: float | None = None,
    profile: bool = False,
    broker_pid: int | None = None,
) -> BenchRun:
    """One system: drain ``lines`` at full speed, then ``more(n)`` events at half that rate
    (or at ``latency_rate`` events/s when given); ``profile``: the worker's stage profile of
    each phase in ``extra["profile"]``; ``broker_pid``: the local broker's JVM, whose CPU
    time per drained event is measured as the system's own is."""
    import numpy as np
    from sketchstream.tools.bench_profile import profile_rows, scrape_idle

    topics = BenchTopics(partitions)
    await create_bench_topics(client_kwargs, topics)
    with tempfile.TemporaryDirectory(prefix=f"sketchstream-bench-{system}-") as tmp:
        root = Path(tmp)
        proc: _Process | None = None
        try:
            await produce(client_kwargs, topics.events, lines, keys)
            ends = await topic_end_offsets(client_kwargs, topics.events, partitions)
            proc = _start(
                system,
                topics,
                bootstrap=client_kwargs["bootstrap_servers"],
                root=root,
                artifact_dir=artifact_dir,
                batch_size=batch_size,
                batch_within=batch_within,
            )
            n = len(lines)
            # (outputs, CPU seconds, the broker's) at the first output
            first: list[tuple[int, float, float | None]] = []

            def started(got: int) -> None:
                if got and not first:
                    first.append((got, proc.cpu_seconds(), pid_cpu_seconds(broker_pid)))

            await _wait_outputs(
                client_kwargs, topics, proc, n, timeout + _READY_TIMEOUT, progress=started
            )
            cpu, broker_cpu = proc.cpu_seconds(), pid_cpu_seconds(broker_pid)
            outs = await read_topic(client_kwargs, topics.outputs)
            stamps = np.array([r.timestamp for r in outs], np.float64) / 1000.0
            span = float(stamps.max() - stamps.min()) if len(outs) > 1 else 0.0
            rate = (len(outs) - 1) / span if span > 0 else float("nan")
            say(f"  {system}: {len(outs):,} outputs in {span:.2f}s: {rate:,.0f} events/s")
            run = BenchRun(system, n, rate)
            ticks = (cpu - first[0][1]) * os.sysconf("SC_CLK_TCK") if first else 0.0
            if first and first[0][0] < n and ticks >= _MIN_CPU_TICKS - 0.5:
                run.cpu_us_per_event = 1e6 * (cpu - first[0][1]) / (n - first[0][0])
                if broker_cpu is not None and first[0][2] is not None:
                    run.broker_cpu_us_per_event = (
                        1e6 * (broker_cpu - first[0][2]) / (n - first[0][0])
                    )
            url = proc.metrics_url if profile else None
            drained = await scrape_idle(url) if url else None
            if drained is not None:
                zero = dict.fromkeys(drained, 0.0)  # a fresh worker: counters from zero
                run.extra["profile"] = profile_rows(zero, drained, "drain")

            paced = latency_rate or rate / 2.0
            m = max(1, int(paced * latency_seconds)) if np.isfinite(paced) else 0
            if m:
                lines2, keys2 = more(m)
                await produce(client_kwargs, topics.events, lines2, keys2, rate=paced)
                await _wait_outputs(client_kwargs, topics, proc, n + m, timeout)
                events = await read_topic(client_kwargs, topics.events)
                born = {(r.partition, r.offset): r.timestamp for r in events}
                outs = await read_topic(client_kwargs, topics.outputs)
                lat = []
                parts = []  # (born, received, published, sent) seconds, the worker's outputs
                for r in outs:
                    p, o, received, published = _event_ref(system, r)
                    if o >= ends[p]:
                        lat.append(r.timestamp - born[(p, o)])
                        if received is not None and published is not None:
                            parts.append(
                                (born[(p, o)] / 1e3, received, published, r.timestamp / 1e3)
                            )
                lat_ms = np.asarray(lat, np.float64)
                run.p50_ms = float(np.percentile(lat_ms, 50))
                run.p99_ms = float(np.percentile(lat_ms, 99))
                run.latency_events, run.latency_rate = len(lat), paced
                say(
                    f"  {system}: {len(lat):,} events at {paced:,.0f}/s: "
                    f"p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms"
                )
                if drained is not None and url is not None:
                    run.extra["profile"] += profile_rows(drained, await scrape_idle(url), "paced")
                if parts and profile:
                    run.extra["latency_parts"] = latency_parts(parts)
            proc.sample()
            run.rss_mb = proc.peak_rss_mb
            if system == "worker":
                from sketchstream.tools.synthetic import state_size_report

                latest: dict[bytes, bytes] = {}
                for r in await read_topic(client_kwargs, topics.changelog):
                    if r.value is not None:
                        latest[r.key] = r.value
                report = state_size_report(latest.values())
                run.state_bytes_per_user = report["median"]
                run.users = report["n"]
                run.extra["state_bytes_p90"] = report["p90"]
            return run
        finally:
            if proc is not None:
                proc.stop()
            await _delete_run_topics(client_kwargs, topics)


def run_system(*args: Any, **kwargs: Any) -> BenchRun:
    """:func:`run_one` on a fresh event loop."""
    return asyncio.run(run_one(*args, **kwargs))
