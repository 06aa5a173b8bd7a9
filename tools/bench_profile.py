"""Where a worker's time goes, stage by stage: ``bench stream --profile`` and
``bench batch --profile``.

The worker times every stage of a batch itself, always
(:class:`~sketchstream.stream.metrics.StageTimes`, on ``/metrics`` as
``sketchstream_stage_seconds_total{stage}`` beside ``sketchstream_busy_seconds_total``); a bench
reads those counters before and after a phase (:func:`scrape` for a worker process,
:func:`snapshot` for one in this process) and :func:`profile_rows` turns the difference into
µs per event and % of the busy wall time. What no stage holds is the ``rest``: faust's and
aiokafka's own tasks between fetch rounds (their work during an awaited stage is in that stage).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sketchstream.stream.metrics import STAGES, StageTimes
from sketchstream.tools.bench_harness import render

__all__ = ["Counters", "profile_rows", "profile_table", "scrape", "scrape_idle", "snapshot"]

#: ``{stage: seconds, "busy": seconds, "events": events in, "batches": batches}``: the counters
#: at one moment
Counters = dict[str, float]

_REST = "rest"  # busy time outside every stage
_BUSY = "busy (wall)"


def scrape(url: str, timeout: float = 10.0) -> Counters:
    """The stage counters of the worker whose ``/metrics`` is at ``url``."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=timeout) as reply:
        body = reply.read().decode()
    out: Counters = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "sketchstream_stage_seconds_total":
                out[sample.labels["stage"]] = sample.value
            elif sample.name == "sketchstream_busy_seconds_total":
                out["busy"] = sample.value
            elif sample.name == "sketchstream_events_in_total":
                out["events"] = sample.value
            elif sample.name == "sketchstream_batch_size_count":
                out["batches"] = sample.value
            elif sample.name == "sketchstream_mlp_helper_rows":
                out["helper_rows"] = sample.value
    missing = [s for s in (*STAGES, "busy", "events", "batches") if s not in out]
    if missing:
        raise ValueError(f"{url} has no stage counters for {missing}: an older worker?")
    return out


async def scrape_idle(url: str, pause: float = 0.3, tries: int = 20) -> Counters:
    """:func:`scrape` once the worker is between fetch rounds: two readings ``pause`` apart
    with the same busy time (a round's stages count as they pass, its busy time when it ends,
    so a reading in mid-round would show more stage time than busy time)."""
    last = scrape(url)
    for _ in range(tries):
        await asyncio.sleep(pause)
        now = scrape(url)
        if now["busy"] == last["busy"]:
            return now
        last = now
    return last


def snapshot(stages: StageTimes, events: int, batches: int, busy: float) -> Counters:
    """The counters of a :class:`StageTimes` in this process, with ``events`` processed in
    ``batches`` and ``busy`` seconds spent so far by the caller's clock (there is no fetch
    loop to keep it)."""
    spent = {s: ns / 1e9 for s, ns in stages.ns.items()}
    return {**spent, "busy": busy, "events": float(events), "batches": float(batches)}


def profile_rows(before: Counters, after: Counters, phase: str) -> list[dict[str, Any]]:
    """One row per stage, then ``rest`` and the busy wall time, between two readings:
    ``{"phase", "stage", "us_per_event", "pct_of_wall", "events_per_batch",
    "mlp_helper_share"}`` (the share of events whose MLP row the helper process scored; None
    without a helper)."""
    events = after["events"] - before["events"]
    helped = after.get("helper_rows", 0.0) - before.get("helper_rows", 0.0)
    share = round(helped / events, 3) if events and "helper_rows" in after else None
    batches = after["batches"] - before["batches"]
    busy = after["busy"] - before["busy"]
    spent = {s: after[s] - before[s] for s in STAGES}
    spent[_REST] = busy - sum(spent.values())
    spent[_BUSY] = busy
    return [
        {
            "phase": phase,
            "stage": stage,
            "us_per_event": round(1e6 * secs / events, 2) if events else None,
            "pct_of_wall": round(100.0 * secs / busy, 1) if busy > 0 else None,
            "events_per_batch": round(events / batches, 1) if batches else None,
            "mlp_helper_share": share,
        }
        for stage, secs in spent.items()
    ]


def profile_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of :func:`profile_rows` (one or more phases) as one table: a line per stage, a
    column pair (µs/event, % of wall) per phase; the phases' events per batch below it."""
    phases = {r["phase"]: r["events_per_batch"] for r in rows}
    by_stage: dict[str, dict[str, Any]] = {}
    for r in rows:
        line = by_stage.setdefault(r["stage"], {"stage": r["stage"]})
        line[f"{r['phase']}:us"] = r["us_per_event"]
        line[f"{r['phase']}:pct"] = r["pct_of_wall"]
    cols = [("stage", "stage")]
    for p in phases:
        cols += [(f"{p}:us", f"{p} µs/event"), (f"{p}:pct", "% of wall")]
    sizes = ", ".join(f"{p} {n:,.0f}" for p, n in phases.items() if n is not None)
    table = render(list(by_stage.values()), cols, lambda _k, v: str(v))
    helped = {r["phase"]: r.get("mlp_helper_share") for r in rows}
    shares = ", ".join(f"{p} {v:.0%}" for p, v in helped.items() if v is not None)
    return (
        table
        + (f"\nevents per batch: {sizes}" if sizes else "")
        + (f"\nMLP rows scored by the helper process: {shares}" if shares else "")
    )
