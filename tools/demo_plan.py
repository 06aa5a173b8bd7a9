"""What the demo replays: the history and the live part of an events file, and the demo's error.

- :func:`plan_replay`: the :class:`ReplayPlan` of an events table (the test period live, the
  events before it, or the latest ``--history`` of them, as history), with the values of the
  live events (what their engagement labels are read from);
- :func:`parse_history`: the ``--history`` option; :func:`replay_ts`: a time as the replay
  tool's ``--from``/``--to`` takes it;
- :class:`DemoError`: a step of the demo failed (every demo module raises it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import typer
from sketchstream.models.errors import SketchstreamError

__all__ = ["DemoError", "ReplayPlan", "parse_history", "plan_replay", "replay_ts"]


class DemoError(SketchstreamError):
    """A step of the demo failed; the message says which and why."""


@dataclass(frozen=True)
class ReplayPlan:
    """How the events file splits into the history (replayed first, at full speed, to warm the
    user states) and the live part (the test period, or its first ``--events``).

    The bounds are the replay tool's ``--from``/``--to`` (None: from the start, to the end);
    the history is ``[history_from, live_from)``, the live part ``[live_from, live_to)``.
    ``values``: ``{(user, item, ts): value}`` of the live events (nan where absent): a
    prediction names its event's user, item, action and time but not its value, which the
    engagement heads' labels need (``like``: a rating >= 4).
    """

    history_from: float | None
    n_history: int
    live_from: float
    live_to: float | None
    n_live: int
    values: dict[tuple[str, str, float], float] = field(repr=False)


def plan_replay(events: Any, limit: int | None = None, history: int | None = None) -> ReplayPlan:
    """The replay plan for an :class:`~sketchstream.models.events.EventTable` in stream order.

    The live part starts at the time of the test period's first event and holds at most
    ``limit`` events (None: the whole test period); the history is every event before it
    (``history`` None) or the latest ``history`` of them. Selections are by time, like the
    replay tool's, so events sharing a cut-off second fall on the later side.
    """
    import numpy as np
    from sketchstream.models.events import protocol_split

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
    keys = zip(
        events.user[rows].tolist(), events.item[rows].tolist(), ts[rows].tolist(), strict=True
    )
    return ReplayPlan(
        history_from=history_from,
        n_history=n_history,
        live_from=live_from,
        live_to=live_to,
        n_live=len(rows),
        values=dict(zip(keys, events.value[rows].tolist(), strict=True)),
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


def replay_ts(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
