"""`sketchstream worker`: run the streaming worker (validate → score → fold → predict).

Reads ``events``, writes ``predictions`` and ``events.dlq``, keeps user states in RocksDB
under ``--state-dir`` (changelog-backed), serves ``/health`` and ``/metrics`` on ``--web-port``.
Start more workers with the same ``--app-id`` (each with its own state dir and web port) to
spread the partitions; SIGTERM (or Ctrl-C) stops a worker gracefully.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["worker"]

log = logging.getLogger(__name__)


def _reachable(bootstrap: str, timeout: float = 3.0) -> bool:
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout):
                return True
        except (OSError, ValueError):
            continue
    return False


def worker(
    app_id: Annotated[
        str | None,
        typer.Option(
            "--app-id",
            help="Consumer group and changelog prefix: workers with the same id share the work "
            "(default: SKETCHSTREAM_APP_ID or 'sketchstream').",
        ),
    ] = None,
    kafka: Annotated[
        str | None,
        typer.Option(
            "--kafka", help="Bootstrap servers (default: SKETCHSTREAM_KAFKA or the local broker)."
        ),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="RocksDB state directory.")
    ] = None,
    artifact_dir: Annotated[
        Path | None,
        typer.Option(
            "--artifact-dir", help="Model artifacts (used when the models topic has none)."
        ),
    ] = None,
    web_port: Annotated[
        int | None, typer.Option("--web-port", help="Port of /health and /metrics.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="Most events per batch (default: SKETCHSTREAM_BATCH_SIZE or 2048). A batch is"
            " what one fetch brought: no waiting to fill.",
        ),
    ] = None,
    max_event_bytes: Annotated[
        int, typer.Option("--max-event-bytes", min=64, help="Larger events go to the DLQ unparsed.")
    ] = 16384,
    standby_replicas: Annotated[
        int,
        typer.Option("--standby-replicas", min=0, help="Standby copies of each state partition."),
    ] = 1,
    torch_threads: Annotated[
        int | None,
        typer.Option(
            "--torch-threads",
            min=1,
            help="Threads of the MLP (default: SKETCHSTREAM_TORCH_THREADS or 1). One per worker:"
            " scale out with more workers instead.",
        ),
    ] = None,
    loglevel: Annotated[
        str, typer.Option("--loglevel", "-l", help="debug, info, warning, error.")
    ] = "info",
) -> None:
    """Run the streaming worker until SIGTERM or Ctrl-C."""
    import faust
    import torch
    from sketchstream.stream.app import create_app
    from sketchstream.stream.records import EventLimits
    from sketchstream.tools.options import load_settings_or_exit

    settings = load_settings_or_exit(
        kafka=kafka,
        state_dir=state_dir,
        artifact_dir=artifact_dir,
        web_port=web_port,
        app_id=app_id,
        batch_size=batch_size,
        torch_threads=torch_threads,
    )
    torch.set_num_threads(settings.torch_threads)
    if not _reachable(settings.bootstrap_servers):
        hint = (
            "start the local one with `sketchstream kafka start`"
            if settings.uses_local_broker
            else "check SKETCHSTREAM_KAFKA"
        )
        typer.echo(f"no Kafka broker answers at {settings.bootstrap_servers}: {hint}", err=True)
        raise typer.Exit(2)
    app = create_app(
        settings,
        app_id=settings.app_id,
        limits=EventLimits(max_bytes=max_event_bytes),
        standby_replicas=standby_replicas,
    )
    runner = faust.Worker(app, loglevel=loglevel, redirect_stdouts=False)
    if loglevel.lower() != "debug":
        # aiokafka and faust log every produced record at DEBUG; with the root logger left at
        # DEBUG by the worker's setup that is a LogRecord per prediction (a fifth of the time)
        for name in ("aiokafka", "faust", "mode"):
            logging.getLogger(name).setLevel(
                max(logging.INFO, logging.getLevelName(loglevel.upper()))
            )
    try:
        runner.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if code:
            raise typer.Exit(code) from None
