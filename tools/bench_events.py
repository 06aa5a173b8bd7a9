"""The events a bench sends: lines of a canonical events file (or a synthetic MovieLens-1M-shaped
stream when there is none), checked before a run, and moved later in time when a run needs more
than the file holds. Used by ``bench stream`` and ``bench chaos``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sketchstream.models.errors import SketchstreamError

__all__ = [
    "BadEventLine",
    "check_events",
    "event_lines",
    "later_copies",
    "synthetic_lines",
    "user_keys",
]


def event_lines(path: Path | None, n: int, seed: int = 0) -> tuple[list[bytes], str]:
    """Up to ``n`` canonical event lines from ``path`` in file order, else (no file) ``n``
    synthetic MovieLens-shaped ones. Returns ``(lines, source description)``."""
    if path is not None and path.is_file():
        lines: list[bytes] = []
        with path.open("rb") as f:
            for line in f:
                line = line.strip()
                if line:
                    lines.append(line)
                    if len(lines) >= n:
                        break
        return lines, f"{path} (first {len(lines):,} events)"
    return synthetic_lines(n, seed), f"synthetic MovieLens-1M-shaped stream ({n:,} events)"


def synthetic_lines(n: int, seed: int = 0) -> list[bytes]:
    """``n`` rating events shaped like MovieLens-1M (:func:`synthetic_ratings`) as JSON lines."""
    import numpy as np
    import orjson
    from sketchstream.tools.synthetic import synthetic_ratings

    data = synthetic_ratings(seed=seed)
    m = min(n, len(data["ts"]))
    users = data["user"][:m].tolist()
    items = data["item"][:m].tolist()
    ts = data["ts"][:m].astype(np.int64).tolist()
    values = data["value"][:m].astype(np.int64).tolist()
    return [
        orjson.dumps({"user": f"u{u}", "item": i, "action": "rate", "ts": t, "value": v})
        for u, i, t, v in zip(users, items, ts, values, strict=True)
    ]


class BadEventLine(SketchstreamError, ValueError):
    """A line of the events file that the bench cannot key by user and move in time."""


def check_events(lines: Sequence[bytes], start: int = 0) -> None:
    """Raise :class:`BadEventLine` for the first of ``lines`` (events ``start + 1`` on, in
    file order) that is not a JSON object with a string ``user`` and a numeric ``ts``."""
    import orjson

    for k, line in enumerate(lines, start + 1):
        try:
            event = orjson.loads(line)
            user, ts = event["user"], event["ts"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BadEventLine(f"event {k}: not a JSON event with 'user' and 'ts': {exc}") from None
        if not isinstance(user, str) or isinstance(ts, bool) or not isinstance(ts, int | float):
            raise BadEventLine(f"event {k}: 'user' must be a string and 'ts' a number")


def later_copies(lines: Sequence[bytes], n: int) -> list[bytes]:
    """``n`` events to follow ``lines``: ``lines`` again from the start, each pass moved later
    by the span of their times plus a second, so every user's events stay in time order.

    Sending the same events again unshifted makes them late for users who already have
    later events, and late events take the aggregator's slower path: a latency run that
    outgrew its events would measure that instead of the stream it means to.
    """
    import orjson

    if n <= 0 or not lines:
        return []
    events = [orjson.loads(line) for line in lines]
    times = [float(e["ts"]) for e in events]
    span = max(times) - min(times) + 1.0
    out: list[bytes] = []
    shift = 0.0
    while len(out) < n:
        shift += span
        for e, t in zip(events[: n - len(out)], times, strict=False):
            out.append(orjson.dumps({**e, "ts": t + shift}))
    return out


def user_keys(lines: Sequence[bytes]) -> list[bytes]:
    """The ``user`` of each event line, as a Kafka key."""
    import orjson

    return [orjson.loads(line)["user"].encode() for line in lines]
