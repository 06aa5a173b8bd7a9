"""`sketchstream demo`: the whole system end to end, from nothing, with a live summary.

Each step runs the real command a user would run, as a subprocess, on the demo's own topics
(``demo.events``, ``demo.predictions``, ``demo.events.dlq``, ``demo.recommend``,
``demo.recommendations``, ``demo.sketchstream.models``, set through the
``SKETCHSTREAM_TOPIC_*`` variables) so it never mixes with other work::

    1 broker    SKETCHSTREAM_KAFKA's, or the local one (started here, and stopped at the end,
                only when it was not running)
    2 topics    the demo topics of an earlier run are deleted; `sketchstream topics create`
    3 data      `sketchstream data movielens-1m` (a no-op when the files are intact)
    4 model     an artifact trained on this very data that the worker accepts is reused from
                the artifact dir (one with a recommender first; with one without, the demo
                says recommendations are off and why), else `sketchstream train` with the demo
                profile (``--recommender``: with a recommender); it is announced on the models
                topic
    5 worker    `sketchstream worker` with its own state dir and web port, until /health is ok
    6 history   `sketchstream replay --from H --to T --rate max`: the latest events before the
                test period (``--history``: 200,000 by default, or all), so the states of the
                users who come back are warm; at full speed, so it shows the worker's throughput
    7 live      `sketchstream replay --from T --rate R`: the test period, while the demo
                consumes the predictions and prints events/s, latency p50/p99 and the rolling
                AUC of every head of the model as its labels arrive (the worker's LiveQuality:
                like = rating >= 4 from the event; return within 7 days from the user's next
                event, or from event time passing the horizon); when the model has a
                recommender, it also asks for the top 10 of the user of every 10th prediction
                on the recommend topic and shows the answers' rolling HR@10 (a hit: the user's
                next event's item is among them), beside the offline HR@10 of the training
                report
    8 shutdown  SIGTERM to the worker, demo topics deleted, broker stopped if started here

T is the time of the first event of the protocol's test period (the last 10 %,
:func:`~sketchstream.models.events.protocol_split`). The replay tool selects by time, so events
sharing that second with the last validation events are replayed live too.

Latency of a prediction: the Kafka time of the prediction record minus the Kafka time of its
event (both set by the producing clients on this machine): queueing in Kafka, the worker's
batching, scoring and publishing.

This module is the command (options, Ctrl-C and SIGTERM, exit status). The rest, one job each:

    demo_stages     the eight stages in order, and their clean-up
    demo_plan       what to replay (history and live part), DemoError
    demo_processes  the child `sketchstream` processes, the worker's /health
    demo_follow     stages 6-7: the replays, and following the predictions
    demo_console    the live figures (LiveStats), the status line and the summary table
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from sketchstream.tools.demo_console import Console
from sketchstream.tools.demo_plan import DemoError, parse_history

__all__ = ["APP_ID", "demo"]

APP_ID = "sketchstream-demo"


@contextlib.contextmanager
def _interruptible() -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, so every step ends through the clean-up,
    and are remembered: on a terminal the children get Ctrl-C too and may exit first, and the
    demo should then say it was interrupted, not that they failed."""
    received: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def demo(
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            file_okay=False,
            help="A folder with events.jsonl (and items.jsonl). Default: MovieLens-1M in "
            "<data_dir>/ml-1m, fetched when missing.",
        ),
    ] = None,
    events: Annotated[
        int | None,
        typer.Option("--events", min=1, help="Replay only the first N events of the test period."),
    ] = None,
    rate: Annotated[
        str, typer.Option("--rate", help="Events per second of the live replay, or 'max'.")
    ] = "2000",
    history: Annotated[
        str,
        typer.Option(
            "--history",
            help="Events before the test period to replay first, at full speed, so user states "
            "are warm when it arrives: 'all', 'none', or a count (the latest N).",
        ),
    ] = "200000",
    retrain: Annotated[
        bool, typer.Option("--retrain", help="Train even if an artifact for this data exists.")
    ] = False,
    recommender: Annotated[
        bool,
        typer.Option(
            "--recommender",
            help="Train the model with a top-k recommender (sketchstream train --recommender; "
            "the demo profile sizes it to one epoch, hidden 256: about 7 more minutes on "
            "MovieLens-1M). Whenever the served model has one, the demo asks it for "
            "recommendations and shows their live HR@10.",
        ),
    ] = False,
    profile: Annotated[
        str,
        typer.Option(
            "--profile",
            help="Training profile when a model is needed: 'demo' (1 epoch, hidden 256, item "
            "codes off, float32 products, no baselines) or 'full' (sketchstream train's "
            "defaults).",
        ),
    ] = "demo",
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Worker state and logs of the demo.")
    ] = Path("var/demo"),
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds each replay phase may take.")
    ] = 1800.0,
    keep_topics: Annotated[
        bool, typer.Option("--keep-topics", help="Leave the demo topics on the broker.")
    ] = False,
    app_id: Annotated[
        str,
        typer.Option(
            "--app-id", help="The worker's consumer group (its changelog topic is named after it)."
        ),
    ] = APP_ID,
) -> None:
    """Run the whole system end to end: broker, topics, MovieLens-1M, a model, a worker, a
    replay of the test period with a live summary, then a clean shutdown."""
    from sketchstream.tools.demo_stages import run
    from sketchstream.tools.options import load_settings_or_exit

    if profile not in ("demo", "full"):
        raise typer.BadParameter(f"--profile must be 'demo' or 'full', got {profile!r}")
    if rate != "max":
        try:
            ok = float(rate) > 0
        except ValueError:
            ok = False
        if not ok:
            raise typer.BadParameter(f"--rate must be a positive number or 'max', got {rate!r}")
    history_count = parse_history(history)
    settings = load_settings_or_exit()
    console = Console()
    started = time.monotonic()
    code = 0
    with _interruptible() as interrupted:
        try:
            run(
                settings,
                console,
                data=data,
                limit=events,
                history=history_count,
                rate=rate,
                retrain=retrain,
                recommender=recommender,
                profile=profile,  # type: ignore[arg-type]
                workdir=workdir,
                timeout=timeout,
                keep_topics=keep_topics,
                app_id=app_id,
            )
        except KeyboardInterrupt:
            interrupted.append(signal.SIGINT)
        except DemoError as exc:
            if not interrupted:
                console.say(f"\nerror: {exc}")
                code = 1
        if interrupted:
            console.say("\ninterrupted: cleaned up")
            code = 130
    console.say(f"demo finished in {time.monotonic() - started:.0f}s")
    if code:
        raise typer.Exit(code)
