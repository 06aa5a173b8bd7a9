"""`sketchstream worker`: run the streaming worker (validate → score → fold → predict).

Reads ``events``, writes ``predictions`` and ``events.dlq``, keeps user states in RocksDB
under ``--state-dir`` (changelog-backed), serves ``/health`` and ``/metrics`` on ``--web-port``.
Start more workers with the same ``--app-id`` (each with its own state dir and web port) to
spread the partitions. SIGTERM (or Ctrl-C) stops a worker: it commits what it processed and
exits 0; a stop that takes longer than ``stop_timeout`` (stuck joining its group, or a broker
that does not answer) is cut short: exit 3, nothing more committed, so the rest is read again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from sketchstream.tools.kafka_io import kafka_answers
from sketchstream.tools.options import setting_option

__all__ = ["EXIT_STOP_TIMEOUT", "worker", "worker_argv"]

log = logging.getLogger(__name__)

#: Exit status of a stop cut short after ``stop_timeout`` (offsets not committed).
EXIT_STOP_TIMEOUT = 3

_CHILD = "import typer; from sketchstream.tools.worker import worker; typer.run(worker)"


def worker_argv(*args: str) -> list[str]:
    """The command line of ``sketchstream worker args...`` as a child of this interpreter
    (the benches' workers: no console script needed)."""
    return [sys.executable, "-c", _CHILD, *args]


def _bounded_worker(app: Any, stop_timeout: float, loglevel: str) -> Any:
    """A ``faust.Worker`` whose stop on a signal lasts at most ``stop_timeout`` seconds.

    faust stops its consumer thread by stopping the aiokafka consumer, which first waits for
    its group coordination task: while the worker is joining, that task waits for the broker
    to answer the JoinGroup request, which comes only when the rebalance completes (up to the
    rebalance timeout, per try). Past ``stop_timeout`` the process ends with
    :data:`EXIT_STOP_TIMEOUT` from a timer thread, committing nothing: delivery is
    at-least-once and states remember the last offset folded, so what follows is read again
    and not counted twice."""
    import faust

    class BoundedWorker(faust.Worker):
        _stop_timer: threading.Timer | None = None

        def _arm(self, cause: str) -> None:
            """Start the stop's deadline, once, whatever started the stop."""
            if self._stop_timer is None:
                self._stop_timer = threading.Timer(stop_timeout, _give_up, args=(cause,))
                self._stop_timer.daemon = True
                self._stop_timer.start()

        def _schedule_shutdown(self, signum: signal.Signals) -> None:
            self._arm(signum.name)
            super()._schedule_shutdown(signum)

        async def stop(self) -> None:
            # also a stop no signal started: a failed batch (BulkApp.fail), a crash
            self._arm("a failure")
            await super().stop()

    def _give_up(cause: str) -> None:
        sys.stderr.write(
            f"worker: stop after {cause} took over {stop_timeout:g} s (stop_timeout): "
            f"exiting {EXIT_STOP_TIMEOUT} without committing; what was not committed is read "
            "again on the next start\n"
        )
        sys.stderr.flush()
        os._exit(EXIT_STOP_TIMEOUT)

    return BoundedWorker(app, loglevel=loglevel, redirect_stdouts=False)


def worker(
    app_id: Annotated[str | None, setting_option("app_id", "--app-id")] = None,
    kafka: Annotated[str | None, setting_option("kafka", "--kafka")] = None,
    state_dir: Annotated[Path | None, setting_option("state_dir", "--state-dir")] = None,
    artifact_dir: Annotated[
        Path | None,
        setting_option(
            "artifact_dir",
            "--artifact-dir",
            help="Model artifacts (used when the models topic has none).",
        ),
    ] = None,
    web_port: Annotated[int | None, setting_option("web_port", "--web-port")] = None,
    batch_size: Annotated[int | None, setting_option("batch_size", "--batch-size")] = None,
    max_event_bytes: Annotated[
        int | None, setting_option("max_event_bytes", "--max-event-bytes")
    ] = None,
    on_error: Annotated[str | None, setting_option("on_error", "--on-error")] = None,
    standby_replicas: Annotated[
        int | None, setting_option("standby_replicas", "--standby-replicas")
    ] = None,
    group_instance_id: Annotated[
        str | None, setting_option("group_instance_id", "--group-instance-id")
    ] = None,
    torch_threads: Annotated[int | None, setting_option("torch_threads", "--torch-threads")] = None,
    mlp_helper: Annotated[
        bool | None, setting_option("mlp_helper", "--mlp-helper/--no-mlp-helper")
    ] = None,
    recommend_on_event: Annotated[
        int | None, setting_option("recommend_on_event", "--recommend-on-event", metavar="K")
    ] = None,
    recommend_keep_seen: Annotated[
        bool | None,
        setting_option("recommend_keep_seen", "--recommend-keep-seen/--recommend-exclude-seen"),
    ] = None,
    loglevel: Annotated[
        str, typer.Option("--loglevel", "-l", help="debug, info, warning, error.")
    ] = "info",
) -> None:
    """Run the streaming worker until SIGTERM or Ctrl-C."""
    from sketchstream.models.mlp import set_threads
    from sketchstream.stream.app import create_app
    from sketchstream.stream.errors import ConfigError
    from sketchstream.tools.options import load_settings_or_exit

    settings = load_settings_or_exit(
        kafka=kafka,
        state_dir=state_dir,
        artifact_dir=artifact_dir,
        web_port=web_port,
        app_id=app_id,
        batch_size=batch_size,
        max_event_bytes=max_event_bytes,
        on_error=on_error,
        standby_replicas=standby_replicas,
        group_instance_id=group_instance_id,
        torch_threads=torch_threads,
        mlp_helper=mlp_helper,
        recommend_on_event=recommend_on_event,
        recommend_keep_seen=recommend_keep_seen,
    )
    set_threads(settings.torch_threads)
    if not kafka_answers(settings.client_kwargs(), timeout=3.0):
        hint = (
            "start the local one with `sketchstream kafka start`"
            if settings.uses_local_broker
            else "check SKETCHSTREAM_KAFKA"
        )
        typer.echo(f"no Kafka broker answers at {settings.bootstrap_servers}: {hint}", err=True)
        raise typer.Exit(2)
    try:
        app = create_app(settings)
    except ConfigError as exc:  # a setting this machine cannot serve (a missing codec)
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    runner = _bounded_worker(app, settings.stop_timeout, loglevel)
    if loglevel.lower() != "debug":
        # aiokafka and faust log every produced record at DEBUG; with the root logger left at
        # DEBUG by the worker's setup that is a LogRecord per prediction (a fifth of the time)
        for name in ("aiokafka", "faust", "mode"):
            logging.getLogger(name).setLevel(
                max(logging.INFO, logging.getLevelName(loglevel.upper()))
            )
    log.info("static group member %s of group %s", settings.member_id, settings.app_id)
    try:
        runner.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if code:
            raise typer.Exit(code) from None
