"""`sketchstream refresh`: retrain Cleora + EMDE + the MLP on a recent window of events and
publish the new model version if it is not worse than the one being served.

    sketchstream refresh                              # last 30 days of the events topic
    sketchstream refresh --window 12h --items data/ml-1m/items.jsonl
    sketchstream refresh --since 2024-05-01 --until 2024-05-08T12:00Z
    sketchstream refresh --data data/ml-1m --no-announce   # a file, no Kafka at all
    sketchstream refresh --every 1h --jitter 5m       # scheduled (docker-compose's service)

Each run prints a table (stage timings, holdout AUC / log loss of candidate and serving model,
the verdict) or, with ``--json``, one JSON object. Exit status of a single run: 0 published,
3 not published (the gate refused: the reason says why), 1 failed. Scheduled, the command runs
until SIGTERM or Ctrl-C, which it obeys between runs, and exits 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from sketchstream.tools.options import (
    HEAD_HELP,
    ProgressOption,
    ThreadsOption,
    exit_on_error,
    load_settings_or_exit,
    setting_option,
)

__all__ = ["refresh"]

log = logging.getLogger(__name__)


def refresh(
    window: Annotated[
        str | None,
        typer.Option(
            "--window",
            help="How far back to read: 30d, 12h, 90m, 1h30m. Kafka default 30d (record time); "
            "with --data, measured back from the file's last event, default the whole file.",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="Window start: ISO 8601 (2024-05-01T00:00Z), epoch seconds, now-2d."
        ),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Window end (exclusive), as --since.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            exists=True,
            help="Read events.jsonl (and items.jsonl) from this folder instead of Kafka.",
        ),
    ] = None,
    items: Annotated[
        Path | None,
        typer.Option(
            "--items",
            exists=True,
            dir_okay=False,
            help="Item metadata (items.jsonl). Default: <data>/items.jsonl, then items.jsonl "
            "in the data directory setting, when present.",
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="AUC the candidate may lose per head and still ship.")
    ] = 0.002,
    logloss_tolerance: Annotated[
        float, typer.Option(min=0.0, help="Log loss the candidate may gain per head.")
    ] = 0.01,
    hr_tolerance: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="HR@10 the candidate's top-k recommendations may lose on the holdout (judged "
            "when the serving model has a recommender: the candidate gets one too).",
        ),
    ] = 0.005,
    force: Annotated[
        bool, typer.Option("--force", help="Publish even when the gate refuses.")
    ] = False,
    keep: Annotated[
        int,
        typer.Option(min=1, help="Model versions the artifact store keeps (never the served one)."),
    ] = 5,
    announce: Annotated[
        bool,
        typer.Option(
            "--announce/--no-announce",
            help="Announce the new version on the models topic (workers swap it in).",
        ),
    ] = True,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, help="Upper bound on epochs (default: the serving model's config)."),
    ] = None,
    set_options: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Training setting KEY=VALUE (a TrainConfig field: hidden=64, depth=8, "
            "lr=0.003), repeatable; the rest come from the serving model's config, else the "
            "trainer's defaults.",
        ),
    ] = None,
    max_events: Annotated[
        int | None,
        typer.Option(min=10, help="Memory bound: keep at most this many of the newest events."),
    ] = None,
    every: Annotated[
        str | None,
        typer.Option("--every", help="Run on this cadence (1h, 30m) until SIGTERM."),
    ] = None,
    jitter: Annotated[
        str,
        typer.Option("--jitter", help="With --every: random delay added to each start (5m)."),
    ] = "0s",
    kafka: Annotated[str | None, setting_option("kafka", "--kafka")] = None,
    artifact_dir: Annotated[Path | None, setting_option("artifact_dir", "--artifact-dir")] = None,
    threads: ThreadsOption = 0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print each run's summary as one JSON object.")
    ] = False,
    progress: ProgressOption = False,
    head: Annotated[
        list[str] | None,
        typer.Option(
            "--head",
            help=HEAD_HELP + " Default: the serving model's heads (a refresh keeps predicting "
            "what is served); without one, those the --data folder's MANIFEST.json recommends, "
            "else like:rate>=4.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Refresh the model on a recent window of events; publish it if it is not worse."""
    import signal
    import threading

    from sketchstream.stream.refresh import RefreshJob, RefreshOptions, run_every
    from sketchstream.stream.window import parse_duration, resolve_window
    from sketchstream.tools.evaluate import data_heads

    settings = load_settings_or_exit(kafka=kafka, artifact_dir=artifact_dir)
    with exit_on_error(2):
        options = RefreshOptions(
            data=data,
            items=items,
            window=window,
            since=since,
            until=until,
            max_events=max_events,
            tolerance=tolerance,
            logloss_tolerance=logloss_tolerance,
            hr_tolerance=hr_tolerance,
            overrides=_train_overrides(set_options or [], epochs),
            keep=keep,
            announce=announce,
            force=force,
            progress=progress,
            heads=data_heads(data, head) if head else (),
            first_heads=data_heads(data, None) if data is not None else (),
        )
        resolve_window(window, since, until, anchor=0.0 if data else None)  # check them now
        period = parse_duration(every) if every is not None else None
        spread = parse_duration(jitter)
        if period is not None and not period > 0:
            raise typer.BadParameter(f"--every must be > 0, got {every!r}")

    if threads:
        from sketchstream.models.mlp import set_threads

        set_threads(threads)
    if options.uses_kafka:
        from sketchstream.tools.broker import BrokerError, ensure_broker

        with exit_on_error(errors=BrokerError):
            ensure_broker(settings)

    job = RefreshJob(settings, options)

    def report(summary: Any) -> None:
        if json_output:
            import orjson

            typer.echo(orjson.dumps(summary.to_dict(), option=orjson.OPT_SERIALIZE_NUMPY))
        else:
            typer.echo(_table(summary))

    if period is None:
        summary = job.run_once()
        report(summary)
        raise typer.Exit(summary.exit_code)

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():  # a second signal: do not wait for the run to finish
            raise KeyboardInterrupt
        log.info("%s: stopping after the current run", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("refreshing every %s (jitter up to %s) until SIGTERM", every, jitter)
    run_every(job.run_once, period, jitter=spread, stop=stop, on_result=report)
    log.info("refresh schedule stopped")


def _train_overrides(pairs: list[str], epochs: int | None) -> dict[str, Any]:
    """``{field: value}`` from ``KEY=VALUE`` strings, typed like the TrainConfig field."""
    import dataclasses

    from sketchstream.models.trainer import TrainConfig

    types = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise typer.BadParameter(
                f"--set {pair!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(types))}"
            )
        kind = types[key]
        try:
            if kind is bool:
                if raw.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                out[key] = raw.strip().lower() in ("true", "1", "yes")
            else:
                out[key] = kind(raw)
        except ValueError:
            raise typer.BadParameter(f"--set {pair!r}: {key} takes a {kind.__name__}") from None
    if epochs is not None:
        out["epochs"] = epochs
    return out


def _table(summary: Any) -> str:
    """The run as people read it: verdict, per-head holdout figures, stage timings."""
    d = summary.to_dict()
    lines = [f"refresh {d['status']}: {d['reason']}"]
    if d["version"]:
        lines.append(f"candidate {d['version']}, serving {d['serving_version'] or '-'}")
    window = d["window"]
    if window:
        lines.append(
            f"window {window.get('bounds', '')} ({window.get('time', '')}): "
            f"{window.get('events', '?')} events, holdout {window.get('holdout_events', '?')}"
        )
    heads = (d["gate"] or {}).get("heads") or {}
    if heads:
        lines.append(f"{'head':<10} {'AUC cand':>9} {'AUC serv':>9} {'LL cand':>8} {'LL serv':>8}")
        for name, h in heads.items():
            s = h["serving"] or {}

            def f(x: Any, w: int) -> str:
                return f"{x:>{w}.4f}" if isinstance(x, float) else f"{'-':>{w}}"

            lines.append(
                f"{name:<10} {f(h['candidate']['auc'], 9)} {f(s.get('auc'), 9)} "
                f"{f(h['candidate']['logloss'], 8)} {f(s.get('logloss'), 8)}"
            )
    timings = d["timings"]
    stages = ["read", "graph_cleora", "emde", "replay", "train", "evaluate", "publish", "total"]
    lines.append("  ".join(f"{k} {timings[k]:.1f}s" for k in stages if k in timings))
    if d["pruned"]:
        lines.append(f"pruned {', '.join(d['pruned'])}")
    return "\n".join(lines)
