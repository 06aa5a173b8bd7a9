"""How every ``sketchstream bench`` measures and reports: one fresh process per measured run
(so its peak RSS is its own), the peak RSS itself, a right-aligned text table, JSON lines.
"""

from __future__ import annotations

import json
import resource
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

__all__ = ["append_jsonl", "counts", "peak_rss_mb", "render", "run_isolated"]


def peak_rss_mb() -> float:
    """Peak resident set of this process, MB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_isolated(spec: dict[str, Any], worker: Callable[[dict[str, Any]], Any]) -> Any:
    """``worker(spec)`` in a fresh spawned process (``worker`` a module-level function)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(worker, spec).result()


def render(
    rows: list[dict[str, Any]],
    cols: list[tuple[str, str]],
    cell: Callable[[str, Any], str] = lambda _key, value: str(value),
) -> str:
    """Rows as a right-aligned text table: ``cols`` are (row key, header); ``cell(key, value)``
    formats a present value, a missing one is blank."""
    cells = [[h for _, h in cols]]
    for r in rows:
        cells.append(["" if r.get(k) is None else cell(k, r[k]) for k, _ in cols])
    widths = [max(len(row[c]) for row in cells) for c in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def counts(*keys: str) -> Callable[[str, Any], str]:
    """A ``cell`` for :func:`render`: ``keys`` as whole numbers with thousands separators."""
    return lambda key, value: f"{value:,.0f}" if key in keys else str(value)


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append one JSON line per row to ``path``, creating its folder: runs accumulate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
