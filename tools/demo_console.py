"""The demo's console: the live figures of the predictions and how they are printed.

- :class:`LiveStats`: counts, throughput and latency percentiles of the predictions seen so
  far, overall and over a rolling window, the AUC of every head of the model and the HR@10 of
  the recommendation answers through
  :class:`~sketchstream.models.live_quality.LiveQuality`, the worker's own live quality (so the
  demo and the worker's ``/metrics`` agree on what a label is and when it arrives);
- :func:`status_line` (the refreshing line during the live replay), :func:`final_table` (the
  summary), :func:`head_figures` / :func:`hit_figures`, :func:`fmt_ms` / :func:`fmt_num`;
- :class:`Console`: steps and the status line, rewritten in place on a terminal, plain lines
  every few seconds in CI logs.

The demo's stages are :mod:`sketchstream.tools.demo_stages`; the command is
:mod:`sketchstream.tools.demo`.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from sketchstream.models.events import Head

__all__ = [
    "ROLLING",
    "Console",
    "LiveStats",
    "final_table",
    "fmt_ms",
    "fmt_num",
    "head_figures",
    "hit_figures",
    "status_line",
]

ROLLING = 10_000  # predictions in the rolling latency window, labels in the rolling AUC


class LiveStats:
    """Figures of the predictions seen so far: counts, throughput, latency, AUC per head, and
    of the recommendation answers: their count and HR@10.

    Fed a batch of decoded prediction records at a time (:meth:`add`), in arrival order, with
    their events' values (nan where absent: the record does not carry it) and the records' own
    Kafka times in seconds; a record's latency is its Kafka time minus its event's
    (``kafka_ts``, when known). :meth:`rolling` covers the last ``window`` predictions (and
    labels, per head), :meth:`overall` all of them, up to ``total`` labels a head. Labels
    follow :class:`~sketchstream.models.live_quality.LiveQuality`: engagement heads from the
    event itself, return heads from the user's next prediction or the partition's event time;
    an answer (:meth:`answered`) is a hit when the user's next prediction's item is among its
    first ten, so answers and predictions are to be fed in the order the worker made them.
    """

    def __init__(
        self,
        heads: Sequence[Head],
        window: int = ROLLING,
        total: int = 1_000_000,
        clock: Any = time.monotonic,
    ) -> None:
        from sketchstream.models.live_quality import LiveQuality

        self.heads = tuple(heads)
        self.window = window
        self.clock = clock  # wall clock of the live rate
        self.count = 0
        self.answers = 0
        self.model_versions: dict[str, int] = {}
        self._recent_quality = LiveQuality(self.heads, window=window)
        self._quality = LiveQuality(self.heads, window=max(total, 1))
        self._latency: list[float] = []
        self._recent_latency: deque[float] = deque(maxlen=window)
        self._arrivals: deque[tuple[float, int]] = deque()
        self._first_in: float | None = None
        self._last_out: float | None = None

    def add(
        self,
        predictions: Sequence[Mapping[str, Any]],
        values: Sequence[float],
        out_times: Sequence[float],
    ) -> None:
        """Record a batch of prediction records (as the worker writes them)."""
        import numpy as np

        if not predictions:
            return
        for p, out_time in zip(predictions, out_times, strict=True):
            self._timing(p.get("kafka_ts") or None, out_time, p.get("model_version", ""))
        names = [h.name for h in self.heads]
        scores = np.array([[p["scores"].get(n, math.nan) for n in names] for p in predictions])
        columns = (
            [p["user"] for p in predictions],
            [p["item"] for p in predictions],
            [p["action"] for p in predictions],
            values,
            [p["event_ts"] for p in predictions],
            scores,
            [p["event"]["partition"] for p in predictions],
        )
        self._recent_quality.observe(*columns)
        self._quality.observe(*columns)

    def answered(self, answers: Sequence[Mapping[str, Any]]) -> None:
        """Record a batch of recommendation answers (as the worker writes them)."""
        users = [a["user"] for a in answers]
        ranked = [a["items"] for a in answers]
        self.answers += len(answers)
        self._recent_quality.answered(users, ranked)
        self._quality.answered(users, ranked)

    def _timing(self, event_time: float | None, out_time: float, model: str) -> None:
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

    def rolling(self) -> dict[str, Any]:
        """``{"p50", "p99"}`` over the last ``window`` predictions (None: too few), and
        :meth:`LiveQuality.snapshot`'s ``"heads"`` (per head) and ``"recommend"`` over the last
        ``window`` labels."""
        return {**_percentiles(list(self._recent_latency)), **self._recent_quality.snapshot()}

    def overall(self) -> dict[str, Any]:
        """``{"p50", "p99", "heads", "recommend"}`` over every prediction and answer (see
        :meth:`rolling`)."""
        return {**_percentiles(self._latency), **self._quality.snapshot()}


def _percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    import numpy as np

    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


def head_figures(figures: Mapping[str, Any]) -> str:
    """One head's live AUC and what it rests on, from a snapshot's per-head figures:
    ``0.7812 over 9,876 labels`` (return heads: ``, 1,234 awaiting their horizon``)."""
    text = f"{fmt_num(_finite(figures['auc']))} over {figures['labelled']:,} labels"
    if "pending" in figures:
        text += f", {figures['pending']:,} awaiting their horizon"
    return text


def hit_figures(figures: Mapping[str, Any]) -> str:
    """The answers' live HR@10 and what it rests on, from a snapshot's ``"recommend"``:
    ``0.0812 over 1,234 answers judged, 56 awaiting the user's next event``."""
    from sketchstream.models.live_quality import HIT_AT

    text = (
        f"{fmt_num(_finite(figures[f'hr@{HIT_AT}']))} over {figures['resolved']:,} answers judged"
    )
    if figures["pending"]:
        text += f", {figures['pending']:,} awaiting the user's next event"
    return text


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def fmt_num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def status_line(
    stats: LiveStats, due: int, dlq: int, elapsed: float, requests: int | None = None
) -> str:
    """One line of the live summary: the AUC of each head over its last labels and, when
    ``requests`` were sent (None: recommendations off), the answers' HR@10 over the last
    answers judged (up to the window; the count in brackets) and answers / requests."""
    r = stats.rolling()
    aucs = " ".join(
        f"{name} {fmt_num(_finite(h['auc']), 3)} ({h['n']:,})" for name, h in r["heads"].items()
    )
    hits = ""
    if requests is not None:
        from sketchstream.models.live_quality import HIT_AT

        rec = r["recommend"]
        hits = (
            f" | HR@{HIT_AT} {fmt_num(_finite(rec[f'hr@{HIT_AT}']), 3)} ({rec['n']:,}),"
            f" answers {stats.answers:,}/{requests:,}"
        )
    return (
        f"[{elapsed:5.0f}s] live {stats.count:,}/{due:,} predictions | {stats.rate():,.0f} ev/s"
        f" | latency p50 {fmt_ms(r['p50'])} p99 {fmt_ms(r['p99'])}"
        f" | AUC {aucs}{hits} | DLQ {dlq:,}"
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
