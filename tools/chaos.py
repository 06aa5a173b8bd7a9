"""The chaos benchmark behind ``sketchstream bench chaos``: the same events through one worker
twice, clean and under faults, every prediction and every final state compared.

Everything runs on a broker of the bench's own (:class:`~sketchstream.tools.broker.LocalBroker`
on free ports, its data dir under the work dir, stopped at the end, also on Ctrl-C or failure):
the bench stops and starts that broker, so it never touches the shared one. Each run gets fresh
topics and a fresh app id (consumer group, changelog); the worker is ``sketchstream worker`` in
a subprocess, as an operator runs it.

Runs::

    clean   the N good events, produced at once; one worker; wait for every prediction;
            SIGTERM; the final states are the changelog's last record per user.
    chaos   the same events with fuzz records mixed in (:data:`FUZZ_KINDS`), in three parts:
            part 1 → worker → at 1/6 of the predictions SIGKILL → part 2 → worker restarted on
            the same state dir → at 1/2 the broker stops for OUTAGE seconds while part 3 is
            sent (an idempotent producer retries through it) → broker starts → wait for every
            prediction → SIGTERM → states from the changelog.

A worker that exits on its own (not the bench's SIGKILL or final SIGTERM) is counted and started
again, at most ``max_restarts`` times per run, so the run completes when the worker lets it;
every wait ends at the run's ``timeout`` or after ``stall`` seconds without a new prediction. An
exit while the broker is down, or in the ``OUTAGE_GRACE_S`` after it is back, is counted as an
outage exit; any other as an exit on bad input (the only other fault injected is the fuzz).

Compared (good events by ``event_id``, which the bench gives every event, ``chaos-<k>``):

- ``lost``: good events without a prediction in the chaos run;
- ``changed``: good events with a prediction that differs from the clean run's by more than
  ``tol`` (1e-5, max over heads);
- ``duplicates_nonidentical``: good events with more than one prediction that differ among
  themselves by more than ``tol`` (redelivery after SIGKILL may repeat a prediction; it must
  repeat it identically);
- ``states_equal``: the same users with the same states, and no user state written on a
  partition other than its user's;
- ``restart_resume_s``: from the SIGKILL to the Kafka record time of the first prediction
  stamped after it (made by the new process: the old one is dead), one machine's clock;
- ``fuzz``: per kind, records sent, dead-lettered (at least once) and predicted.

States are compared *without their offsets*. A state remembers, per partition, the offset of
the last event folded in (idempotent folding), and the fuzz records shift every good event's
offset in the chaos run. Giving the clean run the same fuzz records would keep offsets equal but
also hide what the fuzz does to a state (a null-keyed event folded in looks the same in both
runs). So the clean run is truly clean and states are decoded with the model's aggregator and
compared field by field, less ``partitions`` and ``offsets``: sketches and weights within float32
rounding (rtol 2e-5, atol 1e-6: a fold split into other batches sums in another order), float64
fields (clocks, history times) within 1e-6, everything else (counters, history items and
actions, the codebook version) exactly.

Fuzz records are keyed like real ones (the user of the good event they follow), so they land
between good events of the same partitions; a null-keyed record is sent to its user's
partition. The fuzz is seeded: the same seed makes the same stream.

The streams (:mod:`~sketchstream.tools.chaos_stream`) and the comparisons
(:mod:`~sketchstream.tools.chaos_compare`) are pure and live beside this module; this one is the
run itself (a producer, a prediction reader, a supervised worker process, the faults). It is
over 600 lines for that one thing: the two runs share the machinery, and the faults need it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sketchstream.tools.chaos_compare import (
    compare_predictions,
    compare_states,
    final_states,
    goal_met,
)
from sketchstream.tools.chaos_stream import FUZZ_KINDS, Record, mixed_stream, split_parts
from sketchstream.tools.kafka_io import BenchTopics, create_bench_topics, free_port
from sketchstream.tools.worker import worker_argv

__all__ = ["ChaosConfig", "run_bench", "summary_table"]

log = logging.getLogger(__name__)

OUTAGE_GRACE_S = 30.0
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:|$)")


@dataclass(frozen=True)
class ChaosConfig:
    """What one ``bench chaos`` does (see the module docstring)."""

    partitions: int = 4
    fuzz_rate: float = 0.01  # fuzz records per good event
    fuzz_kinds: tuple[str, ...] = FUZZ_KINDS
    outage_s: float = 5.0  # seconds the broker stays down
    max_restarts: int = 5  # restarts of a worker that exited on its own, per run
    stall_s: float = 180.0  # a wait ends after this long without a new prediction
    timeout_s: float = 900.0  # each run's bound
    batch_size: int | None = None  # the worker's --batch-size (None: its default)
    seed: int = 0


# --- Kafka ------------------------------------------------------------------------------------


class _Predictions:
    """Every prediction of a topic as it arrives (a group-less consumer from the beginning)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, good: set[str]) -> None:
        self.bootstrap, self.topic, self.partitions, self.good = bootstrap, topic, partitions, good
        self.by_id: dict[str, list[tuple[float, ...]]] = {}
        self.refs: Counter[tuple[int, int]] = Counter()
        self.stamps: list[int] = []  # Kafka record times, ms
        self.seen_good = 0
        self.last_new = time.monotonic()
        self._consumer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=1 << 22,
        )
        await self._consumer.start()
        self._tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        self._consumer.assign(self._tps)
        await self._consumer.seek_to_beginning(*self._tps)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()

    async def poll(self, timeout_ms: int = 200) -> int:
        """Read what arrived; returns how many records."""
        import orjson
        from aiokafka.errors import KafkaError

        try:
            got = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=20_000)
        except KafkaError as exc:  # the broker is down: read on once it is back
            log.debug("predictions: %s", exc)
            await asyncio.sleep(0.5)
            return 0
        n = 0
        for records in got.values():
            for r in records:
                n += 1
                p = orjson.loads(r.value)
                ev = p["event"]
                eid = ev.get("event_id")
                scores = tuple(p["scores"].values())
                self.refs[(ev["partition"], ev["offset"])] += 1
                self.stamps.append(r.timestamp)
                if eid is not None:
                    seen = self.by_id.setdefault(eid, [])
                    if not seen and eid in self.good:
                        self.seen_good += 1
                        self.last_new = time.monotonic()
                    seen.append(scores)
        return n

    async def drain(self, timeout: float = 60.0) -> None:
        """Read up to the topic's current end."""
        end = await self._consumer.end_offsets(self._tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all([await self._consumer.position(tp) >= end[tp] for tp in self._tps]):
                return
            await self.poll(500)

    def first_after(self, t: float) -> float | None:
        """Seconds from ``t`` (epoch seconds) to the first prediction stamped after it."""
        later = [s for s in self.stamps if s > t * 1000.0]
        return round(min(later) / 1000.0 - t, 3) if later else None


class _Producer:
    """An idempotent producer that retries through a broker outage (batches never expire
    with idempotence on; a send waits up to ``request_timeout_ms`` for buffer room)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.sent: list[tuple[Record, int, int]] = []  # (record, partition, offset)
        self._producer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_batch_size=1 << 20,
            max_request_size=1 << 21,
            request_timeout_ms=180_000,
        )
        await self._producer.start()

    async def send(self, records: Sequence[Record]) -> None:
        futures = [
            await self._producer.send(self.topic, r.value, key=r.key, partition=r.partition)
            for r in records
        ]
        for r, meta in zip(records, await asyncio.gather(*futures), strict=True):
            self.sent.append((r, meta.partition, meta.offset))

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()


# --- the worker -------------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
    """Linux: the worker gets SIGKILL when the bench dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Worker:
    """``sketchstream worker`` in a subprocess, started again with the same configuration
    (topics, app id, state dir, web port) as an operator restarts one."""

    def __init__(self, env: dict[str, str], args: list[str], log_path: Path) -> None:
        # one web port for every start: faust puts the worker's URL in its group metadata, and
        # a static member that comes back under another URL is another configuration
        self.env = {**env, "SKETCHSTREAM_WEB_PORT": str(free_port())}
        self.args, self.log_path = args, log_path
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = self.env
        with self.log_path.open("ab") as out:
            out.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                worker_argv(*self.args),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.starts += 1

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> float:
        """SIGKILL; returns the time it was sent (epoch seconds)."""
        assert self.proc is not None
        t = time.time()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        return t

    def stop(self, timeout: float = 60.0) -> tuple[int | None, float, bool]:
        """SIGTERM, then SIGKILL after ``timeout``: ``(exit code, seconds, killed)``."""
        if self.proc is None or self.proc.poll() is not None:
            return (None if self.proc is None else self.proc.returncode), 0.0, False
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            return self.proc.returncode, time.monotonic() - t0, False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            return self.proc.returncode, time.monotonic() - t0, True

    def last_words(self) -> str:
        """Why the latest start ended: the first exception a traceback of its log ends with
        (later ones are usually the shutdown's), else its last line."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = [x for x in text.rsplit("--- start ", 1)[-1].splitlines() if x.strip()]
        for line in lines:
            if _EXCEPTION_LINE.match(line):
                return line.strip()[:200]
        return lines[-1].strip()[:200] if lines else ""


@dataclass
class _Supervisor:
    """Restarts a worker that exited on its own, counts why (bad input or broker outage)."""

    worker: _Worker
    max_restarts: int
    say: Callable[[str], None]
    outage_since: float | None = None  # monotonic; None: the broker is up
    outage_until: float = 0.0  # monotonic end of the grace after the broker is back
    exits_bad_input: int = 0
    exits_outage: int = 0
    reasons: list[str] = field(default_factory=list)
    restarts: int = 0
    gave_up: bool = False

    def check(self) -> None:
        code = self.worker.exited()
        if code is None or self.gave_up:
            return
        now = time.monotonic()
        outage = self.outage_since is not None or now < self.outage_until
        words = self.worker.last_words()
        if outage:
            self.exits_outage += 1
        else:
            self.exits_bad_input += 1
        self.reasons.append(f"exit {code}{' (broker outage)' if outage else ''}: {words}")
        if self.restarts >= self.max_restarts:
            self.gave_up = True
            self.say(f"the worker exited ({code}): {words}; not restarted again")
            return
        self.restarts += 1
        self.say(f"the worker exited ({code}): {words}; restarting it")
        self.worker.start()


class _Run:
    """One run (clean or chaos) on fresh topics and a fresh app id: its worker, producer and
    prediction reader, the waits and faults, and what it leaves (predictions, states, dead
    letters)."""

    def __init__(
        self,
        name: str,
        n_good: int,
        good_ids: set[str],
        *,
        broker: Any,
        root: Path,
        store: Path,
        config: ChaosConfig,
        say: Callable[[str], None],
    ) -> None:

        self.name, self.n_good, self.broker, self.config = name, n_good, broker, config
        self.say = lambda text: say(f"[{name}] {text}")
        self.bootstrap = broker.bootstrap_servers
        self.topics = topics = BenchTopics(config.partitions)
        run_dir = root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **topics.worker_env(self.bootstrap),
            "SKETCHSTREAM_STATE_DIR": str(run_dir / "state"),
            "SKETCHSTREAM_ARTIFACT_DIR": str(store),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        args = ["--loglevel", "info"]
        if config.batch_size is not None:
            args += ["--batch-size", str(config.batch_size)]
        self.worker = _Worker(env, args, run_dir / "worker.log")
        self.sup = _Supervisor(self.worker, config.max_restarts, self.say)
        self.preds = _Predictions(self.bootstrap, topics.outputs, config.partitions, good_ids)
        self.producer = _Producer(self.bootstrap, topics.events)
        self.waits: list[str] = []  # how each wait ended
        self.started = time.monotonic()
        self.deadline = self.started + config.timeout_s
        self.seconds = 0.0
        self.t_kill: float | None = None  # when the bench's SIGKILL was sent (epoch seconds)
        self.resume_s: float | None = None
        self.broker_down_s: float | None = None
        self.stop_s, self.stop_killed = 0.0, False
        self.changelog: list[Any] = []  # the user table's changelog records, read at the end
        self.dlq: list[dict[str, Any]] = []

    async def open(self) -> None:
        await create_bench_topics({"bootstrap_servers": self.bootstrap}, self.topics)
        await self.producer.start()
        await self.preds.start()

    async def wait(self, target: int) -> None:
        """Until ``target`` good events have a prediction, restarting a worker that exits;
        records how the wait ended: ``reached``, ``timeout``, ``stalled`` or ``worker gave
        up``."""
        preds, sup = self.preds, self.sup
        said = time.monotonic()
        preds.last_new = max(preds.last_new, said)
        ended = "reached"
        while preds.seen_good < target:
            await preds.poll()
            sup.check()
            now = time.monotonic()
            if now - said > 10.0:
                self.say(f"{preds.seen_good:,} good events predicted (waiting for {target:,})")
                said = now
            if sup.gave_up:
                ended = "worker gave up"
            elif now > self.deadline:
                ended = "timeout"
            elif now - preds.last_new > self.config.stall_s:
                ended = "stalled"
            else:
                continue
            break
        self.waits.append(ended)

    async def clean(self, records: Sequence[Record]) -> None:
        self.say(f"producing {len(records):,} events, then one worker drains them")
        await self.producer.send(records)
        self.worker.start()

    async def chaos(self, records: Sequence[Record]) -> None:
        """Part 1, SIGKILL and restart, part 2, broker outage while part 3 is sent."""
        parts = split_parts(records, self.n_good)
        n_fuzz = sum(r.kind != "good" for r in parts[0])
        self.say(f"part 1: {len(parts[0]):,} records ({n_fuzz} fuzz); one worker")
        await self.producer.send(parts[0])
        self.worker.start()
        await self.wait(self.n_good // 6)
        if self.sup.gave_up:
            self.say("no worker to SIGKILL (it gave up): parts 2 and 3 sent, no more faults")
            await self.producer.send([*parts[1], *parts[2]])
            return
        self.say(
            f"SIGKILL the worker at {self.preds.seen_good:,} predictions; part 2: "
            f"{len(parts[1]):,} records; the worker restarted on the same state dir"
        )
        t_kill = self.worker.kill()
        await self.producer.send(parts[1])
        self.worker.start()
        self.t_kill = t_kill
        await self.wait(self.n_good // 2)
        if self.sup.gave_up:
            self.say("the worker gave up: part 3 sent, no broker outage")
            await self.producer.send(parts[2])
            return
        await self.outage(parts[2])

    async def outage(self, records: Sequence[Record]) -> None:
        """Stop the broker, send ``records`` into the outage, start it after ``outage_s``."""
        self.say(
            f"broker stop at {self.preds.seen_good:,} predictions, for {self.config.outage_s:g}s;"
            f" part 3 ({len(records):,} records) sent into the outage"
        )
        sup = self.sup
        sup.outage_since = time.monotonic()
        await asyncio.to_thread(self.broker.stop)
        down = time.monotonic()
        sending = asyncio.create_task(self.producer.send(records))
        while time.monotonic() - down < self.config.outage_s:
            sup.check()
            await asyncio.sleep(0.25)
        await asyncio.to_thread(self.broker.start)
        self.broker_down_s = round(time.monotonic() - down, 2)
        sup.outage_since = None
        sup.outage_until = time.monotonic() + OUTAGE_GRACE_S
        self.say(f"broker back after {self.broker_down_s:.1f}s down (start included)")
        while not sending.done():
            sup.check()
            await self.preds.poll()
        await sending

    async def close(self) -> None:
        """Stop the worker (SIGTERM: it flushes its changelog), read everything left."""
        import orjson
        from sketchstream.tools.kafka_io import read_topic

        self.seconds = time.monotonic() - self.started
        code, self.stop_s, self.stop_killed = self.worker.stop()
        self.say(
            f"{self.preds.seen_good:,} of {self.n_good:,} good events predicted in "
            f"{self.seconds:.0f}s ({', '.join(self.waits)}); worker stopped in {self.stop_s:.1f}s"
            + (" (SIGKILL after SIGTERM timed out)" if self.stop_killed else f", exit {code}")
        )
        await self.preds.drain()
        if self.t_kill is not None:
            self.resume_s = self.preds.first_after(self.t_kill)
        kwargs = {"bootstrap_servers": self.bootstrap}
        self.changelog = await read_topic(kwargs, self.topics.changelog)
        self.dlq = [orjson.loads(r.value) for r in await read_topic(kwargs, self.topics.dlq)]

    async def release(self) -> None:
        if self.worker.exited() is None:
            self.worker.kill()
        with contextlib.suppress(Exception):
            await self.preds.stop()
        with contextlib.suppress(Exception):
            await self.producer.stop()


async def _run(
    name: str, records: Sequence[Record], n_good: int, faults: bool, **kwargs: Any
) -> _Run:
    good_ids = {r.event_id for r in records if r.kind == "good" and r.event_id is not None}
    run = _Run(name, n_good, good_ids, **kwargs)
    try:
        await run.open()
        await (run.chaos(records) if faults else run.clean(records))
        run.say("waiting for every good event's prediction")
        await run.wait(n_good)  # (a no-op after a clean run's own wait for all)
        await run.close()
    finally:
        await run.release()
    return run


def _fuzz_report(result: _Run, kinds: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per fuzz kind: records sent, and of them how many were dead-lettered (at least once) and
    how many got a prediction."""
    by_ref = {(p, o): r for r, p, o in result.producer.sent}
    out = {k: {"sent": 0, "dlq": 0, "predicted": 0} for k in kinds}
    for r, _p, _o in result.producer.sent:
        if r.kind != "good":
            out[r.kind]["sent"] += 1
    for ref in _dead_refs(result.dlq):
        r = by_ref.get(ref)
        if r is not None and r.kind != "good":
            out[r.kind]["dlq"] += 1
    for ref in result.preds.refs:
        r = by_ref.get(ref)
        if r is not None and r.kind != "good":
            out[r.kind]["predicted"] += 1
    return out


def _dead_refs(dlq: Sequence[Mapping[str, Any]]) -> Counter[tuple[int, int]]:
    """Dead letters per source ``(partition, offset)`` (a record read again after a restart
    may be dead-lettered again)."""
    refs: Counter[tuple[int, int]] = Counter()
    for d in dlq:
        src = d.get("source") or {}
        refs[(src.get("partition"), src.get("offset"))] += 1
    return refs


def run_bench(
    events: Sequence[Mapping[str, Any]],
    *,
    store: Path,
    workdir: Path,
    config: ChaosConfig,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The clean run and the chaos run of ``events`` (each with an ``event_id``) against the
    model artifact store ``store``, on a broker of its own under ``workdir``; returns the JSON
    row (see the module docstring). The broker and every worker are stopped on return, also
    on an exception or Ctrl-C."""
    from sketchstream.models.aggregator import Aggregator
    from sketchstream.models.artifacts import ArtifactStore
    from sketchstream.models.trainer import aggregator_config_from_dict
    from sketchstream.stream.settings import load_settings
    from sketchstream.tools.broker import LocalBroker

    good, mixed = mixed_stream(
        events,
        config.partitions,
        fuzz_rate=config.fuzz_rate,
        kinds=config.fuzz_kinds,
        seed=config.seed,
    )
    home = {r.key: r.partition for r in good if r.key is not None}
    ids = [r.event_id for r in good if r.event_id is not None]
    settings = load_settings(kafka_port=free_port(), kafka_controller_port=free_port())
    broker = LocalBroker(settings, data_dir=workdir / "broker")
    say(f"starting the bench's own broker at {broker.bootstrap_servers} (data {broker.data_dir})")
    quiet = {n: logging.getLogger(n).level for n in ("aiokafka", "sketchstream.tools.broker")}
    for n in quiet:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        broker.start()
        common = dict(broker=broker, root=workdir, store=store, config=config, say=say)
        clean = asyncio.run(_run("clean", good, len(good), False, **common))
        chaos = asyncio.run(_run("chaos", mixed, len(good), True, **common))
    finally:
        try:
            broker.stop()
        except Exception as exc:  # report, never hide the figures behind cleanup
            say(f"could not stop the bench's broker {broker}: {exc}")
        for n, level in quiet.items():
            logging.getLogger(n).setLevel(level)

    bundle = ArtifactStore(store).load()
    aggregator = Aggregator(aggregator_config_from_dict(bundle.aggregator_config), bundle.codebooks)
    row: dict[str, Any] = {
        "bench": "chaos",
        "events": len(good),
        "fuzz_records": len(mixed) - len(good),
    }
    row |= compare_predictions(clean.preds.by_id, chaos.preds.by_id, ids)
    clean_states, clean_strays = final_states(clean.changelog, home)
    chaos_states, strays = final_states(chaos.changelog, home)
    states = compare_states(aggregator, clean_states, chaos_states)
    row |= {
        "states_equal": (
            states["states_differ"] == 0
            and states["states_missing"] == 0
            and states["states_extra"] == 0
            and strays == 0
            and clean_strays == 0
            and states["states_compared"] > 0
        ),
        **states,
        "stray_states": strays,
        "worker_exits_on_bad_input": chaos.sup.exits_bad_input,
        "worker_exits_on_outage": chaos.sup.exits_outage,
        "worker_exit_reasons": chaos.sup.reasons,
        "worker_restarts": chaos.sup.restarts,
        "restart_resume_s": chaos.resume_s,
        "broker_down_s": chaos.broker_down_s,
        "fuzz": _fuzz_report(chaos, config.fuzz_kinds),
        "dlq_reasons": dict(Counter(d.get("reason") for d in chaos.dlq)),
        "dlq_repeats": sum(n - 1 for n in _dead_refs(chaos.dlq).values()),
        "clean_worker_exits": clean.sup.exits_bad_input + clean.sup.exits_outage,
        "clean_s": round(clean.seconds, 1),
        "chaos_s": round(chaos.seconds, 1),
        "chaos_waits": chaos.waits,
        "completed": all(e == "reached" for e in clean.waits + chaos.waits),
        "stop_s": round(chaos.stop_s, 1),
        "stop_killed": chaos.stop_killed,
        "partitions": config.partitions,
        "fuzz_rate": config.fuzz_rate,
        "outage_s": config.outage_s,
        "seed": config.seed,
        "model": str(bundle.version),
    }
    row["goal_met"] = goal_met(row)
    return row


def summary_table(row: Mapping[str, Any]) -> str:
    """The figures against the issue's goal, then what became of each fuzz kind."""
    resume = row.get("restart_resume_s")
    goal = [
        ("lost", row["lost"], "0", row["lost"] == 0),
        ("changed (> 1e-5)", row["changed"], "0", row["changed"] == 0),
        (
            "duplicates non-identical",
            f"{row['duplicates_nonidentical']} of {row['duplicates']}",
            "0",
            row["duplicates_nonidentical"] == 0,
        ),
        (
            "states equal",
            f"{row['states_equal']} ({row['states_differ']} differ, {row['states_missing']} "
            f"missing, {row['states_extra']} extra, {row['stray_states']} stray)",
            "True",
            row["states_equal"] is True,
        ),
        (
            "worker exits on bad input",
            row["worker_exits_on_bad_input"],
            "0",
            row["worker_exits_on_bad_input"] == 0,
        ),
        (
            "restart resume s",
            "none" if resume is None else f"{resume:.2f}",
            "<= 10",
            resume is not None and resume <= 10.0,
        ),
    ]
    lines = [f"chaos bench: {row['events']:,} events, {row['fuzz_records']:,} fuzz records"]
    width = max(len(g[0]) for g in goal)
    vwidth = max(len(str(g[1])) for g in goal)
    for name, value, want, ok in goal:
        lines.append(
            f"  {name:<{width}}  {value!s:>{vwidth}}  goal {want:<5}  {'ok' if ok else 'MISSED'}"
        )
    lines.append("")
    lines.append(f"  {'fuzz kind':<16} {'sent':>5} {'dlq':>5} {'predicted':>9}")
    for kind, c in row["fuzz"].items():
        lines.append(f"  {kind:<16} {c['sent']:>5} {c['dlq']:>5} {c['predicted']:>9}")
    return "\n".join(lines)
