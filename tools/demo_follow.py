"""Stages 6 and 7 of the demo: replay the history and the live part, follow the predictions
and the recommendations.

:func:`watch` starts ``sketchstream replay`` twice (the history at full speed, counted from the
predictions topic's end offsets; then the live part at ``--rate``) and reads every prediction of
the live part into :class:`~sketchstream.tools.demo_console.LiveStats`, with the value of its
event from the replayed file (engagement labels) and in arrival order (return labels: the
user's next prediction; predictions are keyed by user like the events, so a user's arrive in
order), printing the status line as they arrive.

When the model has a recommender, the :class:`Asker` sends a recommendation request for the
user of every :data:`REQUEST_EVERY`-th live prediction as it arrives, and the answers are read
into the same :class:`LiveStats`: each is a hit when the user's next prediction's item is among
its first ten. The worker decides that in the order it handles requests and events; here the
two topics are merged by their records' Kafka times (set by the worker's producer) within each
poll, so a figure can differ from the worker's ``sketchstream_live_hr10`` by the few answers
whose next event lands in the same poll out of order.

It gives up (:class:`~sketchstream.tools.demo_plan.DemoError`) when the worker or a replay
exits, or no new prediction or answer arrives for ``_STALL_S`` seconds while some are due.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sketchstream.models.live_quality import HIT_AT
from sketchstream.tools.demo_console import Console, LiveStats, status_line
from sketchstream.tools.demo_plan import DemoError, ReplayPlan, replay_ts
from sketchstream.tools.demo_processes import Processes, tail
from sketchstream.tools.kafka_io import end_offsets

if TYPE_CHECKING:
    from sketchstream.models.events import Head

__all__ = ["REQUEST_EVERY", "Asker", "Outcome", "watch"]

_STALL_S = 120.0  # no new prediction or answer for this long while some are due: give up
_ANSWERS = "SKETCHSTREAM_TOPIC_RECOMMENDATIONS"

REQUEST_EVERY = 10
"""A recommendation request for the user of every 10th live prediction: on MovieLens-1M at the
default 2,000 events/s, 200 requests/s, a load the worker answers beside the events."""


@dataclass
class Outcome:
    """What the run phase measured."""

    stats: LiveStats
    history_seconds: float | None = None
    dlq: int = 0
    requests: int | None = None  # recommendation requests sent (None: recommendations off)
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
    heads: Sequence[Head],
    recommend: bool,
    workdir: Path,
    rate: str,
    console: Console,
    timeout: float,
) -> Outcome:
    """Replay the history (if any) and the live part, and follow the predictions of the
    model's ``heads`` (and, with ``recommend``, ask for recommendations and follow them)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    predictions = topics["SKETCHSTREAM_TOPIC_PREDICTIONS"]
    dlq_topic = topics["SKETCHSTREAM_TOPIC_DLQ"]
    consumer = AIOKafkaConsumer(**client_kwargs, group_id=None, enable_auto_commit=False)
    await consumer.start()
    outcome = Outcome(LiveStats(heads, total=plan.n_live))
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
            argv = ["replay", events_file, "--to", replay_ts(plan.live_from), "--rate", "max"]
            if plan.history_from is not None:
                argv[2:2] = ["--from", replay_ts(plan.history_from)]
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

        # live: read every prediction (and answer) from here on
        console.step(
            f"7/8 live: the test period at {rate if rate == 'max' else rate + ' events/s'}, "
            "predictions followed as they arrive"
            + (
                f", a recommendation request for the user of every {REQUEST_EVERY}th prediction"
                if recommend
                else ""
            )
        )
        answer_tps = partitions(topics[_ANSWERS]) if recommend else []
        if recommend and not answer_tps:
            raise DemoError(f"the broker does not know the topic {topics[_ANSWERS]!r}")
        followed = pred_tps + answer_tps
        starts = await end_offsets(consumer, followed)
        consumer.assign(followed)
        for tp in followed:
            consumer.seek(tp, starts[tp])
        asker = None
        if recommend:
            asker = Asker(client_kwargs, topics["SKETCHSTREAM_TOPIC_RECOMMEND"])
            await asker.start()
        try:
            await _follow_live(
                consumer, plan, procs, events_file, workdir / "replay-live.log", outcome,
                asker=asker, answers_topic=topics[_ANSWERS], dlq_tps=dlq_tps, rate=rate,
                check_worker=check_worker, worker_log=worker_log, timeout=timeout,
            )  # fmt: skip
        finally:
            if asker is not None:
                await asker.stop()
        return outcome
    finally:
        await consumer.stop()


async def _follow_live(
    consumer: Any,
    plan: ReplayPlan,
    procs: Processes,
    events_file: str,
    log: Path,
    outcome: Outcome,
    *,
    asker: Asker | None,
    answers_topic: str,
    dlq_tps: Sequence[Any],
    rate: str,
    check_worker: Callable[[], None],
    worker_log: Path,
    timeout: float,
) -> None:
    """Stage 7: replay the live part and read its predictions (and the answers to the
    ``asker``'s requests) into ``outcome`` until every event has its prediction and every
    request its answer."""
    import orjson

    argv = ["replay", events_file, "--from", replay_ts(plan.live_from), "--rate", rate]
    if plan.live_to is not None:
        argv += ["--to", replay_ts(plan.live_to)]
    stats, console = outcome.stats, procs.console
    seen: set[tuple[int, int]] = set()
    values = plan.values
    loads = orjson.loads

    def status(force: bool = False) -> None:
        requests = None if asker is None else asker.sent
        line = status_line(stats, plan.n_live, outcome.dlq, time.monotonic() - t0, requests)
        console.status(line, force)

    t0 = time.monotonic()
    proc = procs.start(argv, log, "replay-live")
    last_change = t0
    while (
        len(seen) < plan.n_live or proc.poll() is None or (asker is not None and asker.waiting > 0)
    ):
        check_worker()
        if proc.poll() not in (None, 0):
            raise DemoError(f"the live replay failed:\n{tail(log)}")
        batches = await consumer.getmany(timeout_ms=250, max_records=20_000)
        # in the order the worker made them, as far as its records' Kafka times tell
        records = sorted(itertools.chain(*batches.values()), key=lambda r: r.timestamp)
        for is_answer, group in itertools.groupby(records, lambda r: r.topic == answers_topic):
            if is_answer:
                assert asker is not None  # answers are followed only with an asker
                stats.answered(asker.take([loads(r.value) for r in group]))
                continue
            new, new_values, out_times = [], [], []
            for record in group:
                p = loads(record.value)
                ev = p["event"]
                ref = (ev["partition"], ev["offset"])
                key = (p["user"], p["item"], p["event_ts"])
                if ref in seen or key not in values:
                    continue  # a redelivered duplicate, or not an event of this run
                seen.add(ref)
                new.append(p)
                new_values.append(values[key])
                out_times.append(record.timestamp / 1000.0)
            first = stats.count
            stats.add(new, new_values, out_times)
            if asker is not None:
                await asker.ask(new, first)
        now = time.monotonic()
        if batches:
            last_change = now
        if dlq_tps:
            outcome.dlq = sum((await end_offsets(consumer, dlq_tps)).values())
        outcome.requests = None if asker is None else asker.sent
        status()
        if now - last_change > _STALL_S or now - t0 > timeout:
            answers = "" if asker is None else f", {stats.answers:,} of {asker.sent:,} answers"
            raise DemoError(
                f"{len(seen):,} of {plan.n_live:,} predictions{answers} after {now - t0:.0f}s; "
                f"worker log:\n{tail(worker_log)}"
            )
    status(force=True)
    console.end_status()
    outcome.replay_lines.append(tail(log, 1))


class Asker:
    """The live part's recommendation requests and their answers' bookkeeping.

    :meth:`ask` sends ``{"user", "k": 10, "exclude_seen": true, "request_id", "ts"}`` for the
    user of every :data:`REQUEST_EVERY`-th prediction, keyed by user (the worker that holds
    the user's state answers it), right after the prediction arrives: the answer is read off
    the state that holds that event and judged by the user's next one. ``ts`` is the event's
    time: the replay keeps the data's event times, so a state read at the request's Kafka time
    (now) would be decayed by the years in between. :meth:`take` keeps the first answer to each
    request sent.
    """

    def __init__(self, client_kwargs: Mapping[str, Any], topic: str) -> None:
        from aiokafka import AIOKafkaProducer

        self.topic = topic
        self.sent = 0
        self._producer = AIOKafkaProducer(**client_kwargs, acks="all", linger_ms=5)
        self._unanswered: set[str] = set()

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    @property
    def waiting(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._unanswered)

    async def ask(self, predictions: Sequence[Mapping[str, Any]], first: int) -> None:
        """Requests for the users of ``predictions`` (the live part's ``first``-th on, counted
        from 0) that fall on a multiple of :data:`REQUEST_EVERY`; returns once the broker has
        them all."""
        import orjson

        sends = []
        for p in predictions[-first % REQUEST_EVERY :: REQUEST_EVERY]:
            request_id = f"demo-{self.sent}"
            body = {
                "user": p["user"],
                "k": HIT_AT,
                "exclude_seen": True,
                "request_id": request_id,
                "ts": p["event_ts"],
            }
            key = p["user"].encode()
            sends.append(await self._producer.send(self.topic, orjson.dumps(body), key=key))
            self._unanswered.add(request_id)
            self.sent += 1
        if sends:
            try:
                await asyncio.gather(*sends)
            except Exception as exc:
                raise DemoError(
                    f"could not send recommendation requests to {self.topic}: {exc}"
                ) from exc

    def take(self, answers: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The answers to requests sent and not answered yet, in order (others: redelivered
        duplicates)."""
        fresh = []
        for answer in answers:
            if answer["request_id"] in self._unanswered:
                self._unanswered.discard(answer["request_id"])
                fresh.append(answer)
        return fresh
