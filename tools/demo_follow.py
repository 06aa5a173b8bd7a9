"""Stages 6 and 7 of the demo: replay the history and the live part, follow the predictions.

:func:`watch` starts ``sketchstream replay`` twice (the history at full speed, counted from the
predictions topic's end offsets; then the live part at ``--rate``) and reads every prediction of
the live part into :class:`~sketchstream.tools.demo_console.LiveStats`, with the value of its
event from the replayed file (engagement labels) and in arrival order (return labels: the
user's next prediction; predictions are keyed by user like the events, so a user's arrive in
order), printing the status line as they arrive. It gives up
(:class:`~sketchstream.tools.demo_plan.DemoError`) when the worker or a replay exits, or no new
prediction arrives for ``_STALL_S`` seconds.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sketchstream.tools.demo_console import Console, LiveStats, status_line
from sketchstream.tools.demo_plan import DemoError, ReplayPlan, replay_ts
from sketchstream.tools.demo_processes import Processes, tail
from sketchstream.tools.kafka_io import end_offsets

if TYPE_CHECKING:
    from sketchstream.models.events import Head

__all__ = ["Outcome", "watch"]

_STALL_S = 120.0  # no new prediction for this long while some are due: give up


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
    heads: Sequence[Head],
    workdir: Path,
    rate: str,
    console: Console,
    timeout: float,
) -> Outcome:
    """Replay the history (if any) and the live part, and follow the predictions of the
    model's ``heads``."""
    import orjson
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

        # live: read every prediction from here on
        console.step(
            f"7/8 live: the test period at {rate if rate == 'max' else rate + ' events/s'}, "
            "predictions followed as they arrive"
        )
        starts = await end_offsets(consumer, pred_tps)
        consumer.assign(pred_tps)
        for tp in pred_tps:
            consumer.seek(tp, starts[tp])
        argv = ["replay", events_file, "--from", replay_ts(plan.live_from), "--rate", rate]
        if plan.live_to is not None:
            argv += ["--to", replay_ts(plan.live_to)]
        log = workdir / "replay-live.log"
        stats = outcome.stats
        seen: set[tuple[int, int]] = set()
        values = plan.values
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
                new, new_values, out_times = [], [], []
                for record in records:
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
                stats.add(new, new_values, out_times)
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
