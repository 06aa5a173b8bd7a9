"""`sketchstream evaluate`: score a data set with a model artifact under the fixed protocol and
write the report (report.json, report.md, plots), baselines side by side.

Protocol (DESIGN.md, "Data"): the events file's order; 80 % train, 10 % validation, 10 % test;
every event is scored on the state built from the events before it (score, then fold), the
state keeps updating through validation and test, the weights stay the artifact's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from sketchstream.tools.model_choice import resolve_model
from sketchstream.tools.options import (
    BaselinesOption,
    DataOption,
    ProgressOption,
    ThreadsOption,
)

__all__ = ["evaluate", "read_data", "report_for", "start", "summary"]


def start(threads: int) -> float:
    """The start of a model command: torch's threads set (0: its default); returns the
    ``time.perf_counter()`` the report's total time counts from."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    return time.perf_counter()


def read_data(data: Path) -> tuple[Any, list, float]:
    """``(events, items, seconds)``: the :class:`EventTable` of ``data/events.jsonl``, the items
    of ``data/items.jsonl`` (``[]`` when absent) and how long reading them took."""
    import time

    from sketchstream.models.events import read_events, read_items

    t0 = time.perf_counter()
    events = read_events(data / "events.jsonl")
    items = read_items(data / "items.jsonl") if (data / "items.jsonl").is_file() else []
    return events, items, time.perf_counter() - t0


def summary(report: dict) -> str:
    """Validation and test figures of a written report, two lines for the console."""
    return (
        f"val  AUC {report['val']['auc']:.4f}  RCE {report['val']['rce']:.2f}\n"
        f"test AUC {report['test']['auc']:.4f}  RCE {report['test']['rce']:.2f}  "
        f"AP {report['test']['ap']:.4f}  log loss {report['test']['logloss']:.4f}"
    )


def report_for(
    out: Path,
    *,
    events: Any,
    data_path: Path,
    y: Any,
    p: Any,
    split: tuple[slice, slice, slice],
    heads: dict,
    version: str,
    codebooks: dict,
    timings: dict[str, float],
    baselines: bool,
    t_start: float,
    items: Any = None,
) -> dict:
    """Run the baselines (when asked and available) and write the report into ``out``."""
    import logging
    import time

    from sketchstream.models.events import stream_md5
    from sketchstream.tools.report import write_report

    log = logging.getLogger(__name__)
    timings = dict(timings)
    base: dict = {}
    if baselines:
        t0 = time.perf_counter()
        try:
            from sketchstream.models.baselines import run_baselines
        except ImportError:
            log.warning("baselines module not available: report without baselines")
        else:
            from sketchstream.models.events import DEFAULT_HEADS

            base = run_baselines(events, heads=DEFAULT_HEADS, split=split, items=items or None)
        timings["baselines"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    return write_report(
        out,
        heads=heads,
        y_test=y[split[2], 0],
        p_test=p[split[2], 0],
        baselines=base,
        timings=timings,
        model={
            "version": version,
            "codebooks": {m: str(getattr(c, "version", "?")) for m, c in codebooks.items()},
        },
        data={
            "path": str(data_path),
            "events": len(events),
            "train": split[0].stop - split[0].start,
            "val": split[1].stop - split[1].start,
            "test": split[2].stop - split[2].start,
            "stream_md5": stream_md5(events),
        },
    )


def evaluate(
    data: DataOption,
    model: Annotated[
        Path,
        typer.Option(
            "--model",
            exists=True,
            file_okay=False,
            help="A model artifact, or a folder of them (its latest version is used).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Where report.json, report.md, plots go.")],
    baselines: BaselinesOption = True,
    threads: ThreadsOption = 0,
    progress: ProgressOption = True,
) -> None:
    """Score every event prequentially with a trained model and report val/test metrics."""
    from sketchstream.models.artifacts import load_model_artifact
    from sketchstream.models.errors import SketchstreamError
    from sketchstream.models.trainer import score_events

    t_all = start(threads)
    try:
        bundle = load_model_artifact(resolve_model(model))
        events, items, t_load = read_data(data)
        scored = score_events(bundle, events, progress=progress)
    except SketchstreamError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    report = report_for(
        out,
        events=events,
        data_path=data,
        y=scored.y,
        p=scored.p,
        split=scored.split,
        heads=scored.metrics,
        version=bundle.version,
        codebooks=bundle.codebooks,
        timings={"load": t_load, **scored.timings},
        baselines=baselines,
        t_start=t_all,
        items=items,
    )
    typer.echo(f"model {bundle.version} on {data}")
    typer.echo(summary(report))
    typer.echo(f"report: {out / 'report.md'}")
