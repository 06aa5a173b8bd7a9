"""The demo's console: the live figures of the predictions and how they are printed.

- :class:`LiveStats`: counts, throughput, latency percentiles and AUC of the predictions seen
  so far, overall and over a rolling window;
- :func:`status_line` (the refreshing line during the live replay), :func:`final_table` (the
  summary), :func:`fmt_ms` / :func:`fmt_num`;
- :class:`Console`: steps and the status line, rewritten in place on a terminal, plain lines
  every few seconds in CI logs.

The demo's stages are :mod:`sketchstream.tools.demo_stages`; the command is
:mod:`sketchstream.tools.demo`.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import typer

__all__ = ["ROLLING", "Console", "LiveStats", "final_table", "fmt_ms", "fmt_num", "status_line"]

ROLLING = 10_000  # predictions in the rolling AUC and latency window


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


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def fmt_num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def status_line(stats: LiveStats, due: int, dlq: int, elapsed: float) -> str:
    """One line of the live summary."""
    r = stats.rolling()
    return (
        f"[{elapsed:5.0f}s] live {stats.count:,}/{due:,} predictions | {stats.rate():,.0f} ev/s"
        f" | latency p50 {fmt_ms(r['p50'])} p99 {fmt_ms(r['p99'])}"
        f" | AUC last {min(stats.labelled, stats.window):,} {fmt_num(r['auc'], 3)} | DLQ {dlq:,}"
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
