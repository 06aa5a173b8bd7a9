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

The file is long (~1,000 lines) for one thing: the pure parts (:func:`mixed_stream`,
:func:`compare_predictions`, :func:`compare_states`) are what tests pin down; the rest is the
run itself (a producer, a prediction reader, a supervised worker process, the faults).
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

from sketchstream.tools.kafka_io import BenchTopics, create_bench_topics, free_port
from sketchstream.tools.worker import worker_argv

__all__ = [
    "FUZZ_KINDS",
    "ChaosConfig",
    "Record",
    "compare_predictions",
    "compare_states",
    "goal_met",
    "mixed_stream",
    "numbered_events",
    "run_bench",
    "summary_table",
]

log = logging.getLogger(__name__)

FUZZ_KINDS = (
    "bad_json",  # a real event's JSON cut short
    "not_utf8",  # random bytes, invalid UTF-8
    "empty",  # a zero-byte value
    "tombstone",  # no value at all
    "deep_array",  # an array nested 1,000 deep at the top level (2 KB)
    "deep_context",  # a real event whose context is an array nested 1,000 deep
    "deep_user",  # a real event whose user is an array nested 1,000 deep
    "wrong_types",  # a real event with one field of the wrong type (or an infinite value)
    "missing_field",  # a real event without one of user, item, action, ts
    "unknown_action",  # an action the model does not know
    "bad_timestamp",  # milliseconds, negative, or past year 2100
    "oversized",  # a real event padded to 64 KiB
    "long_id",  # a real event whose item id is 4,096 characters
    "null_key",  # a valid event of a real user, sent without a key (to the user's partition)
    "wrong_key",  # a valid event of one user keyed by another
    "resent",  # a good event sent again (a producer retry): same event_id, later offset
)
"""What the fuzz mixes into the good events; each is one kind of record the worker must
dead-letter (``resent``: must not fold twice or score differently)."""

TOL = 1e-5
OUTAGE_GRACE_S = 30.0
DEEP = 1000
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


@dataclass(frozen=True)
class Record:
    """One record to produce: ``kind`` is ``"good"`` or one of :data:`FUZZ_KINDS`;
    ``event_id`` the good event it is (good and resent records), else None."""

    key: bytes | None
    value: bytes | None
    partition: int
    kind: str
    event_id: str | None = None


# --- the streams -----------------------------------------------------------------------------


def numbered_events(lines: Sequence[bytes]) -> list[dict[str, Any]]:
    """The events of ``lines`` (canonical JSON), each given ``event_id`` ``chaos-<k>`` (an id
    the data may carry is replaced: the bench matches predictions by it)."""
    import orjson

    return [{**orjson.loads(line), "event_id": f"chaos-{k}"} for k, line in enumerate(lines)]


def _partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2) gives ``key``."""
    from aiokafka.partitioner import DefaultPartitioner

    every = list(range(partitions))
    return DefaultPartitioner()(key, every, every)


def mixed_stream(
    events: Sequence[Mapping[str, Any]],
    partitions: int,
    *,
    fuzz_rate: float,
    kinds: Sequence[str] = FUZZ_KINDS,
    seed: int = 0,
) -> tuple[list[Record], list[Record]]:
    """``(good, mixed)``: the good events as records keyed by user, and the same records with
    ``round(fuzz_rate * len(events))`` fuzz records inserted after seeded random good events,
    the kinds taken in turn (each cycle shuffled), so every kind appears once there are as
    many fuzz records as kinds."""
    import numpy as np
    import orjson

    unknown = sorted(set(kinds) - set(FUZZ_KINDS))
    if unknown:
        raise ValueError(f"unknown fuzz kinds {unknown}: expected some of {', '.join(FUZZ_KINDS)}")
    rng = np.random.default_rng(seed)
    part: dict[str, int] = {}
    good = []
    for e in events:
        user = str(e["user"])
        if user not in part:
            part[user] = _partition_of(user.encode(), partitions)
        good.append(Record(user.encode(), orjson.dumps(e), part[user], "good", e["event_id"]))
    n_fuzz = round(fuzz_rate * len(events)) if kinds else 0
    after = np.sort(rng.integers(0, len(events), n_fuzz)) if len(events) else []
    order: list[str] = []
    while len(order) < n_fuzz:
        order += [kinds[i] for i in rng.permutation(len(kinds))]
    users = list(part)
    mixed: list[Record] = []
    at = 0
    for k, (i, kind) in enumerate(zip(list(after), order, strict=False)):
        i = int(i)
        mixed.extend(good[at : i + 1])
        at = i + 1
        mixed.append(_fuzz(kind, k, i, events, good, users, part, partitions, rng))
    mixed.extend(good[at:])
    return good, mixed


def _fuzz(
    kind: str,
    k: int,
    i: int,
    events: Sequence[Mapping[str, Any]],
    good: Sequence[Record],
    users: Sequence[str],
    part: Mapping[str, int],
    partitions: int,
    rng: Any,
) -> Record:
    """Fuzz record number ``k``, following good event ``i``, keyed like it."""
    import orjson

    near = dict(events[i])
    key, p = good[i].key, good[i].partition
    fid = f"fuzz-{kind}-{k}"
    near["event_id"] = fid
    user = near["user"]
    dumps = orjson.dumps
    value: bytes | None
    if kind == "bad_json":
        text = dumps(near)
        value = text[: int(rng.integers(1, len(text) - 1))]
    elif kind == "not_utf8":
        value = b"\xff\xfe" + rng.integers(0, 256, 64, dtype="uint8").tobytes()
    elif kind == "empty":
        value = b""
    elif kind == "tombstone":
        value = None
    elif kind == "deep_array":
        value = b"[" * DEEP + b"]" * DEEP
    elif kind == "deep_context":
        value = dumps(near)[:-1] + b',"context":' + b"[" * DEEP + b"]" * DEEP + b"}"
    elif kind == "deep_user":
        rest = {f: v for f, v in near.items() if f != "user"}
        value = b'{"user":' + b"[" * DEEP + b"]" * DEEP + b"," + dumps(rest)[1:]
    elif kind == "wrong_types":
        variant = int(rng.integers(0, 7))
        if variant == 6:  # a number JSON allows but no double holds
            value = dumps({**near, "value": 1})[:-1] + b',"value":1e999}'
        else:
            name, bad = [
                ("ts", str(near["ts"])),
                ("user", 12345),
                ("item", [near["item"]]),
                ("value", "five"),
                ("action", 3),
                ("context", ["x", 1]),
            ][variant]
            value = dumps({**near, name: bad})
    elif kind == "missing_field":
        drop = ("user", "item", "action", "ts")[int(rng.integers(0, 4))]
        value = dumps({f: v for f, v in near.items() if f != drop})
    elif kind == "unknown_action":
        value = dumps({**near, "action": ("lik", "purchase", "RATE")[int(rng.integers(0, 3))]})
    elif kind == "bad_timestamp":
        ts = float(near["ts"])
        value = dumps({**near, "ts": (ts * 1000.0, -ts, 1e13)[int(rng.integers(0, 3))]})
    elif kind == "oversized":
        value = dumps({**near, "pad": "x" * 65536})
    elif kind == "long_id":
        value = dumps({**near, "item": "i" * 4096})
    elif kind == "null_key":
        value, key = dumps(near), None
    elif kind == "wrong_key":
        others = [u for u in users if u != user]
        if others:
            other = others[int(rng.integers(0, len(others)))]
            key, p = other.encode(), part[other]
        else:  # one user only: a key no user has
            key = f"{user}-not-the-user".encode()
            p = _partition_of(key, partitions)
        value = dumps(near)
    elif kind == "resent":
        j = int(rng.integers(max(0, i - 50), i + 1))
        return Record(good[j].key, good[j].value, good[j].partition, kind, good[j].event_id)
    else:  # pragma: no cover (mixed_stream checks the kinds)
        raise ValueError(kind)
    return Record(key, value, p, kind, None)


def _parts(mixed: Sequence[Record], n_good: int) -> list[list[Record]]:
    """``mixed`` cut into three parts after the n/3-th and 2n/3-th good events."""
    cuts = [n_good // 3, 2 * n_good // 3]
    out: list[list[Record]] = [[], [], []]
    seen = 0
    for r in mixed:
        which = sum(seen >= c for c in cuts)
        out[which].append(r)
        seen += r.kind == "good"
    return out


# --- the comparisons -------------------------------------------------------------------------


def compare_predictions(
    clean: Mapping[str, Sequence[Sequence[float]]],
    chaos: Mapping[str, Sequence[Sequence[float]]],
    event_ids: Sequence[str],
    tol: float = TOL,
) -> dict[str, Any]:
    """Predictions of the good events ``event_ids``: ``{event_id: [scores (n_heads,), ...]}``
    of each run. Returns ``lost``, ``changed``, ``duplicates``, ``duplicates_nonidentical``,
    ``clean_lost`` (no clean prediction to compare with) and ``max_abs_diff``."""
    import numpy as np

    out = dict(lost=0, changed=0, duplicates=0, duplicates_nonidentical=0, clean_lost=0)
    worst = 0.0
    for eid in event_ids:
        got = chaos.get(eid) or []
        want = clean.get(eid) or []
        out["lost"] += not got
        out["clean_lost"] += not want
        if not got:
            continue
        scores = np.asarray(got, dtype=np.float64)
        if len(got) > 1:
            out["duplicates"] += 1
            spread = float((scores.max(axis=0) - scores.min(axis=0)).max())
            out["duplicates_nonidentical"] += spread > tol
        if want:
            diff = float(np.abs(scores - np.asarray(want[0], dtype=np.float64)).max())
            worst = max(worst, diff)
            out["changed"] += diff > tol
    out["max_abs_diff"] = worst
    return out


def compare_states(
    aggregator: Any,
    clean: Mapping[bytes, bytes],
    chaos: Mapping[bytes, bytes],
    chunk: int = 2048,
) -> dict[str, Any]:
    """The final user states of the two runs, decoded with ``aggregator``, compared on all
    that offsets do not change (see the module docstring). Returns ``states_compared``,
    ``states_differ``, ``states_missing`` (clean users without a chaos state),
    ``states_extra`` (the reverse) and ``differ_fields`` (field → users)."""
    import numpy as np

    both = sorted(set(clean) & set(chaos))
    fields: Counter[str] = Counter()
    differ = np.zeros(len(both), dtype=bool)
    for lo in range(0, len(both), chunk):
        keys = both[lo : lo + chunk]
        want = aggregator.load([clean[k] for k in keys])
        got = aggregator.load([chaos[k] for k in keys])
        rows = slice(lo, lo + len(keys))
        if got.codebook_version != want.codebook_version:
            differ[rows] = True
            fields["codebook_version"] += len(keys)
        for name, a in want._arrays().items():
            if name in ("partitions", "offsets"):
                continue
            b = getattr(got, name)
            if a.shape != b.shape:
                bad = np.ones(len(keys), dtype=bool)
            elif a.dtype.kind == "f":
                rtol = 2e-5 if a.dtype.itemsize <= 4 else 0.0
                close = np.isclose(b, a, rtol=rtol, atol=1e-6, equal_nan=True)
                bad = ~close.reshape(len(keys), -1).all(axis=1)
            else:
                bad = (a != b).reshape(len(keys), -1).any(axis=1)
            if bad.any():
                fields[name] += int(bad.sum())
                differ[rows] |= bad
    return {
        "states_compared": len(both),
        "states_differ": int(differ.sum()),
        "states_missing": len(set(clean) - set(chaos)),
        "states_extra": len(set(chaos) - set(clean)),
        "differ_fields": dict(fields),
    }


def _final_states(records: Sequence[Any], home: Mapping[bytes, int]) -> tuple[dict, int]:
    """The changelog's last state per user, read on the user's own partition (``home``; a
    user the good events do not know is taken wherever it is), and how many users also have
    a state written on another partition."""
    latest: dict[tuple[int, bytes], bytes | None] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        latest[(r.partition, r.key)] = r.value
    states: dict[bytes, bytes] = {}
    strays: set[bytes] = set()
    for (p, key), value in latest.items():
        own = home.get(key)
        if own is not None and p != own:
            strays.add(key)
        elif value is not None:
            states[key] = value
    return states, len(strays)


def goal_met(row: Mapping[str, Any]) -> bool:
    """The issue's goal: nothing lost or changed, identical duplicates only, equal states, no
    exit on bad input, a restart that resumes within 10 s."""
    resume = row.get("restart_resume_s")
    return (
        row.get("lost") == 0
        and row.get("changed") == 0
        and row.get("duplicates_nonidentical") == 0
        and row.get("states_equal") is True
        and row.get("worker_exits_on_bad_input") == 0
        and resume is not None
        and resume <= 10.0
    )


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
        parts = _parts(records, self.n_good)
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
    clean_states, clean_strays = _final_states(clean.changelog, home)
    chaos_states, strays = _final_states(chaos.changelog, home)
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
