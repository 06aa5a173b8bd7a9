"""`sketchstream evaluate`: score a data set with a model artifact under the fixed protocol and
write the report (report.json, report.md, plots), baselines side by side.

Protocol (DESIGN.md, "Data"): the events file's order; 80 % train, 10 % validation, 10 % test;
every event is scored on the state built from the events before it (score, then fold), the
state keeps updating through validation and test, the weights stay the artifact's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from sketchstream.tools.model_choice import resolve_model
from sketchstream.tools.options import (
    BaselinesOption,
    DataOption,
    ProgressOption,
    ThreadsOption,
    exit_on_error,
)

__all__ = [
    "Evaluation",
    "data_heads",
    "evaluate",
    "evaluate_model",
    "read_data",
    "report_for",
    "start",
    "summary",
]


def start(threads: int) -> float:
    """The start of a model command: the MLP's threads set (torch and BLAS; 0: their
    defaults); returns the ``time.perf_counter()`` the report's total time counts from."""
    import time

    from sketchstream.models.mlp import set_threads

    if threads:
        set_threads(threads)
    return time.perf_counter()


def read_data(data: Path) -> tuple[Any, list, float]:
    """``(events, items, seconds)``: the :class:`EventTable` of ``data/events.jsonl``, the items
    of ``data/items.jsonl`` (``[]`` when absent) and how long reading them took.

    Refuses, before any work, a folder without an events file and a file not in protocol
    order (:class:`~sketchstream.models.events.EventError` naming the first line out of order
    and the command that sorts it).
    """
    import time

    from sketchstream.models.events import (
        EventError,
        first_out_of_order,
        iter_event_lines,
        read_events,
        read_items,
    )

    t0 = time.perf_counter()
    path = data / "events.jsonl"
    if not path.is_file():
        raise EventError(
            f"{data}: no events.jsonl in this folder (make one from your events with "
            f"`sketchstream data import EVENTS_FILE {data}`, or fetch a set with "
            "`sketchstream data list`)"
        )
    events = read_events(path)
    bad = first_out_of_order(events)
    if bad is not None:
        line = next(n for k, (n, _) in enumerate(iter_event_lines(path)) if k == bad)
        raise EventError(
            f"{path}: line {line} comes before the line above it in protocol order (stable by "
            f"ts, then user, then item, ids compared as strings): ts {events.ts[bad]:g} user "
            f"{events.user[bad]!r} item {events.item[bad]!r} after ts {events.ts[bad - 1]:g} "
            f"user {events.user[bad - 1]!r} item {events.item[bad - 1]!r}. Sort it with "
            f"`sketchstream data import {path} OUT_FOLDER` and use OUT_FOLDER"
        )
    items = read_items(data / "items.jsonl") if (data / "items.jsonl").is_file() else []
    return events, items, time.perf_counter() - t0


def data_heads(data: Path, specs: list[str] | None) -> tuple:
    """The label heads of a run: ``specs`` parsed (``--head``), else the engagement heads
    that ``data/MANIFEST.json`` recommends (else ``DEFAULT_HEADS``, like = rate >= 4) and the
    return-propensity head ``RETURN_HEAD`` (return:next<=7d): one user state, both tasks.

    Raises :class:`~sketchstream.models.errors.ModelError` naming a bad spec.
    """
    import orjson
    from sketchstream.models.events import DEFAULT_HEADS, RETURN_HEAD, parse_head

    if specs:
        return tuple(parse_head(spec) for spec in specs)
    try:
        recommended = orjson.loads((data / "MANIFEST.json").read_bytes()).get("heads")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        recommended = None
    heads = tuple(parse_head(spec) for spec in recommended) if recommended else DEFAULT_HEADS
    if any(h.is_return or h.name == RETURN_HEAD.name for h in heads):
        return heads
    return (*heads, RETURN_HEAD)


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
    label_heads: Any = None,
    baseline_scores: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Run the baselines (when asked and available) and write the report into ``out``.

    ``label_heads``: the :class:`Head` objects the model was trained on (default
    ``DEFAULT_HEADS``), so the baselines predict the same labels. ``baseline_scores``: a dict
    that receives each baseline's predictions (see ``run_baselines``). ``extra``: more
    top-level blocks of ``report.json`` (``recommend``).
    """
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

            base = run_baselines(
                events,
                heads=label_heads or DEFAULT_HEADS,
                split=split,
                items=items or None,
                scores=baseline_scores,
            )
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
        extra=extra,
    )


def recommend_methods(option: str | None) -> tuple[str, ...]:
    """The methods of ``evaluate --recommend``: None -> none, ``all`` -> every one."""
    from sketchstream.models.ranking import METHODS

    if option is None:
        return ()
    if option.strip() == "all":
        return METHODS
    methods = tuple(m.strip() for m in option.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise typer.BadParameter(
            f"unknown method(s) {unknown}: 'all' or some of {','.join(METHODS)}",
            param_hint="--recommend",
        )
    return methods


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
    recommend: Annotated[
        str | None,
        typer.Option(
            help="Also compare next-item recommendations on the test period (report.json "
            "'recommend': HR@10, NDCG@10, MRR, seen items excluded and not): 'all' or some of "
            "sketchstream,popularity,item_cf,sasrec. Off by default: it trains a recommender "
            "and SASRec (tens of minutes on MovieLens-1M).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Score every event prequentially with a trained model and report val/test metrics.

    Labels come from the heads recorded in the model artifact (``train --head``), for the
    model and the baselines alike."""
    methods = recommend_methods(recommend)
    t_all = start(threads)
    with exit_on_error():
        done = evaluate_model(
            data,
            resolve_model(model),
            out,
            baselines=baselines,
            progress=progress,
            t_start=t_all,
            recommend=methods,
        )
    specs = " ".join(h.spec for h in done.heads)
    typer.echo(f"model {done.report['model']['version']} on {data} (heads {specs})")
    typer.echo(summary(done.report))
    typer.echo(f"report: {out / 'report.md'}")


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_model` computed: the written report, the events, the label heads,
    and the model's labels and scores ``y``, ``p`` (``(n, heads)``) with the protocol split."""

    report: dict
    events: Any
    items: list
    heads: tuple
    y: Any
    p: Any
    split: tuple[slice, slice, slice]
    baseline_p: dict = field(default_factory=dict)  # name -> (n,) predictions


def evaluate_model(
    data: Path,
    model: Path,
    out: Path,
    *,
    baselines: bool = True,
    progress: bool = True,
    t_start: float | None = None,
    recommend: Sequence[str] = (),
) -> Evaluation:
    """The work of ``sketchstream evaluate`` with the artifact folder ``model`` (one version):
    read ``data`` (refusing bad input before any work), score it prequentially, run the
    baselines on the artifact's heads and write the report into ``out``.

    Raises :class:`~sketchstream.models.errors.SketchstreamError` on bad data or artifact.
    """
    import time

    from sketchstream.models.artifacts import load_model_artifact
    from sketchstream.models.trainer import bundle_heads, score_events

    t_start = time.perf_counter() if t_start is None else t_start
    bundle = load_model_artifact(model)
    heads = tuple(bundle_heads(bundle))
    events, items, t_load = read_data(data)
    scored = score_events(bundle, events, progress=progress)
    baseline_p: dict = {}
    extra, timings = {}, {"load": t_load, **scored.timings}
    if recommend:
        from sketchstream.models.channels import aggregator_config_from_dict
        from sketchstream.models.ranking import recommend_report
        from sketchstream.models.trainer import TrainConfig

        t0 = time.perf_counter()
        # the recommender's own codebooks embed the items as the state's did
        train = {**TrainConfig().to_dict(), **(bundle.manifest["config"].get("train") or {})}
        cleora = {"dim": train["cleora_dim"], "iterations": train["cleora_iterations"]}
        ranked = recommend_report(
            events,
            bundle.codebooks,
            aggregator_config_from_dict(bundle.aggregator_config),
            items or None,
            methods=tuple(recommend),
            cleora=cleora,
            progress=progress,
        )
        extra["recommend"] = ranked.report
        timings["recommend"] = time.perf_counter() - t0
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
        timings=timings,
        baselines=baselines,
        t_start=t_start,
        items=items,
        label_heads=heads,
        baseline_scores=baseline_p,
        extra=extra,
    )
    return Evaluation(report, events, items, heads, scored.y, scored.p, scored.split, baseline_p)
