"""A time window of the events topic, read into columns: located with offsets-for-times,
streamed partition batch by partition batch, memory-bounded.

Window bounds are Kafka record times (when an event was produced), so ``--window 30d`` means
"what arrived in the last 30 days" whatever the events' own ``ts`` say; inside the window the
refresh job orders events by their ``ts`` (:func:`sketchstream.models.refresh.stream_order`).

>>> parse_duration("30d"), parse_duration("1h30m"), parse_duration("90")
(2592000.0, 5400.0, 90.0)
>>> parse_time("2024-05-01T00:00:00Z")
1714521600.0
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sketchstream.stream.errors import ConfigError

__all__ = [
    "TimeWindow",
    "WindowRead",
    "concat_events",
    "decode_event_values",
    "parse_duration",
    "parse_time",
    "read_window",
    "resolve_window",
]

log = logging.getLogger(__name__)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


def parse_duration(text: str) -> float:
    """Seconds in ``"30d"``, ``"12h"``, ``"5m"``, ``"45s"``, ``"2w"``, ``"1h30m"`` or a plain
    number of seconds; :class:`ConfigError` names the bad text."""
    raw = str(text).strip().lower()
    try:
        seconds = float(raw)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _DURATION.finditer(raw):
            if raw[pos : match.start()].strip():
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        else:
            if pos and not raw[pos:].strip():
                return _positive(seconds, text)
        raise ConfigError(
            f"bad duration {text!r}: expected a number with a unit, e.g. 30d, 12h, 5m, 45s, "
            "1h30m (s, m, h, d, w), or plain seconds"
        ) from None
    return _positive(seconds, text)


def _positive(seconds: float, text: str) -> float:
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"bad duration {text!r}: must be a finite number of seconds >= 0")
    return float(seconds)


def parse_time(text: str, *, now: float | None = None) -> float:
    """Epoch seconds of an ISO 8601 time (``2024-05-01``, ``2024-05-01T12:00:00+02:00``,
    ``...Z``; no offset means UTC), a number of epoch seconds, ``now``, or ``now-12h``."""
    raw = str(text).strip()
    current = time.time() if now is None else now
    low = raw.lower()
    if low == "now":
        return current
    if low.startswith("now-"):
        return current - parse_duration(low[4:])
    try:
        value = float(raw)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ConfigError(f"bad time {text!r}: not a finite number")
        return value
    try:
        parsed = datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError:
        raise ConfigError(
            f"bad time {text!r}: expected ISO 8601 (2024-05-01, 2024-05-01T12:00:00Z), epoch "
            "seconds, 'now' or 'now-12h'"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


@dataclass(frozen=True)
class TimeWindow:
    """``[since, until)`` in epoch seconds; None: open on that side."""

    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ConfigError(
                f"empty window: since {_iso(self.since)} is not before until {_iso(self.until)}"
            )

    def describe(self) -> str:
        start = _iso(self.since) if self.since is not None else "the beginning"
        end = _iso(self.until) if self.until is not None else "now"
        return f"[{start}, {end})"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def resolve_window(
    window: str | None = None,
    since: str | None = None,
    until: str | None = None,
    *,
    now: float | None = None,
    anchor: float | None = None,
) -> TimeWindow:
    """The window of ``--window`` or ``--since``/``--until`` (not both ``--window`` and
    ``--since``). ``--window D`` ends at ``--until``, else at ``anchor`` (default: now).
    Nothing given: everything (an open window)."""
    if window is not None and since is not None:
        raise ConfigError("give --window or --since, not both")
    end = parse_time(until, now=now) if until is not None else None
    if window is not None:
        stop = end if end is not None else (anchor if anchor is not None else _now(now))
        return TimeWindow(stop - parse_duration(window), end)
    start = parse_time(since, now=now) if since is not None else None
    return TimeWindow(start, end)


def _now(now: float | None) -> float:
    return time.time() if now is None else now


# --- decoding --------------------------------------------------------------------------------


def decode_event_values(values: Iterable[bytes | None]) -> tuple[Any, int]:
    """``(EventTable, skipped)`` of raw record values: valid canonical events become rows
    (user, item, action, ts, value); anything else is skipped and counted (the worker has
    sent it to the dead-letter topic already)."""
    import orjson
    from sketchstream.models.events import EventError, EventTable, check_event

    records = []
    skipped = 0
    for raw in values:
        try:
            record = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    try:
        table = EventTable.from_records(records)
    except EventError:
        good = []
        for record in records:
            try:
                check_event(record)
            except EventError:
                continue
            good.append(record)
        skipped += len(records) - len(good)
        table = EventTable.from_records(good)
    # the window keeps the columns the trainer uses; ids and contexts stay on the topic
    return EventTable(table.user, table.item, table.action, table.ts, table.value), skipped


def concat_events(parts: list[Any]) -> Any:
    """One EventTable from several (user, item, action, ts, value columns)."""
    from sketchstream.models.events import EventTable

    parts = [p for p in parts if len(p)]
    if not parts:
        empty = np.empty(0, dtype=object)
        return EventTable(empty, empty.copy(), empty.copy(), np.empty(0), np.empty(0, np.float32))
    if len(parts) == 1:
        return parts[0]
    return EventTable(
        user=np.concatenate([p.user for p in parts]),
        item=np.concatenate([p.item for p in parts]),
        action=np.concatenate([p.action for p in parts]),
        ts=np.concatenate([p.ts for p in parts]),
        value=np.concatenate([p.value for p in parts]),
    )


# --- reading from Kafka ----------------------------------------------------------------------


@dataclass
class WindowRead:
    """What :func:`read_window` returns."""

    events: Any  # EventTable, partitions concatenated (not yet in stream order)
    skipped: int  # records that were not valid events
    offsets: dict[int, tuple[int, int]]  # partition -> [start, end) read
    dropped: int = 0  # older records left out to stay under max_events
    seconds: float = 0.0
    kafka_ts: tuple[float, float] | None = None  # first and last record time read
    by_partition: dict[int, int] = field(default_factory=dict)


def _plan_offsets(
    start: Mapping[int, int], end: Mapping[int, int], max_events: int | None
) -> tuple[dict[int, int], int]:
    """Start offsets after dropping the oldest records of each partition so that at most
    ``max_events`` remain (shares proportional to each partition's count); and how many."""
    counts = {p: max(end[p] - start[p], 0) for p in start}
    total = sum(counts.values())
    if max_events is None or total <= max_events:
        return dict(start), 0
    keep = {p: int(max_events * c // total) for p, c in counts.items()}
    return {p: end[p] - keep[p] for p in start}, total - sum(keep.values())


async def read_window(
    settings: Any,
    window: TimeWindow,
    *,
    topic: str | None = None,
    max_events: int | None = None,
    chunk: int = 50_000,
    progress_every: float = 5.0,
) -> WindowRead:
    """The events of ``topic`` (default ``settings.topic_events``) whose record time lies in
    ``window``, decoded into columns ``chunk`` records at a time.

    Start offsets come from offsets-for-times on ``window.since``; each partition is read up
    to the first record at or after ``window.until`` or, when the window is open-ended, to
    its end offset at the start of the read (later arrivals are the next refresh's). Only the
    decoded columns are kept (about 100 bytes an event). ``max_events`` caps them: the oldest
    records of each partition are left out, proportionally, and counted.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError
    from sketchstream.stream.errors import KafkaUnavailable, StreamError

    topic = topic or settings.topic_events
    t_start = time.perf_counter()
    consumer = AIOKafkaConsumer(
        **settings.client_kwargs(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 << 20,
        fetch_max_bytes=32 << 20,
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        raise KafkaUnavailable(
            f"cannot read {topic!r} from {settings.bootstrap_servers}: {exc}"
        ) from exc
    try:
        # aiokafka has no public "partitions of a topic I am not subscribed to": ask for fresh
        # cluster metadata (as the model feed does)
        from sketchstream.stream.faust_compat import fetch_all_metadata

        cluster = await fetch_all_metadata(consumer)
        parts = sorted(cluster.partitions_for_topic(topic) or ())
        if not parts:
            raise StreamError(
                f"topic {topic!r} does not exist at {settings.bootstrap_servers}: create it "
                "(sketchstream topics create) or set SKETCHSTREAM_TOPIC_EVENTS"
            )
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
        start = {tp.partition: begins[tp] for tp in tps}
        end = {tp.partition: ends[tp] for tp in tps}
        for bound, target in ((window.since, start), (window.until, end)):
            if bound is None:
                continue
            found = await consumer.offsets_for_times({tp: int(bound * 1000) for tp in tps})
            for tp in tps:
                hit = found.get(tp)
                # no record at or after the bound: the window starts (or ends) at the end
                target[tp.partition] = hit.offset if hit is not None else ends[tp]
        start, dropped = _plan_offsets(start, end, max_events)
        if dropped:
            log.warning(
                "window holds %d events more than --max-events %d: the oldest are left out",
                dropped,
                max_events,
            )
        todo = [tp for tp in tps if start[tp.partition] < end[tp.partition]]
        total = sum(end[tp.partition] - start[tp.partition] for tp in todo)
        log.info(
            "reading %s of %r: %d records in %d partitions",
            window.describe(),
            topic,
            total,
            len(todo),
        )
        parts_out: list[Any] = []
        pending: list[bytes | None] = []
        skipped = read = 0
        by_partition = {tp.partition: 0 for tp in tps}
        first_ts = last_ts = None
        if todo:
            consumer.assign(todo)
            for tp in todo:
                consumer.seek(tp, start[tp.partition])
        active = set(todo)
        last_log = time.monotonic()
        while active:
            batches = await consumer.getmany(*active, timeout_ms=1000, max_records=chunk)
            for tp, records in batches.items():
                stop = end[tp.partition]
                for record in records:
                    if record.offset >= stop:
                        break
                    pending.append(record.value)
                    ts = record.timestamp / 1000.0
                    first_ts = ts if first_ts is None else min(first_ts, ts)
                    last_ts = ts if last_ts is None else max(last_ts, ts)
                    by_partition[tp.partition] += 1
            for tp in list(active):
                if await consumer.position(tp) >= end[tp.partition]:
                    active.discard(tp)
                    consumer.pause(tp)
            if len(pending) >= chunk or (not active and pending):
                table, bad = decode_event_values(pending)
                parts_out.append(table)
                skipped += bad
                read += len(pending)
                pending = []
            if progress_every and time.monotonic() - last_log >= progress_every:
                last_log = time.monotonic()
                done = read + len(pending)
                log.info("read %d/%d records (%.0f%%)", done, total, 100.0 * done / max(total, 1))
        events = concat_events(parts_out)
        seconds = time.perf_counter() - t_start
        log.info(
            "read %d events (%d skipped) from %r in %.1fs", len(events), skipped, topic, seconds
        )
        return WindowRead(
            events=events,
            skipped=skipped,
            offsets={p: (start[p], end[p]) for p in start},
            dropped=dropped,
            seconds=seconds,
            kafka_ts=(first_ts, last_ts) if first_ts is not None else None,
            by_partition=by_partition,
        )
    finally:
        await consumer.stop()
