"""`sketchstream kafka`: start, check, stop and read the local Apache Kafka broker.

The broker itself is :class:`sketchstream.tools.broker.LocalBroker`; these commands print.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from sketchstream.tools.options import fail, load_settings_or_exit, setting_option

if TYPE_CHECKING:
    from sketchstream.tools.broker import LocalBroker

__all__ = ["app"]

app = typer.Typer(
    help=(
        "The local Apache Kafka broker (single-node KRaft, loopback only) for development, CI "
        "and users without Docker. Needs Java 17+; the first start fetches Kafka with Maven."
    ),
    no_args_is_help=True,
)

Port = Annotated[int | None, setting_option("kafka_port", "--port")]
ControllerPort = Annotated[int | None, setting_option("kafka_controller_port", "--controller-port")]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help=(
            "Folder of the broker's data, pid file and log "
            "(default $SKETCHSTREAM_HOME/kafka/data, i.e. ~/.sketchstream/kafka/data)"
        ),
        file_okay=False,
        show_default=False,
    ),
]


def _broker(port: int | None, data_dir: Path | None, controller_port: int | None = None):
    from sketchstream.tools.broker import LocalBroker

    settings = load_settings_or_exit(kafka_port=port, kafka_controller_port=controller_port)
    return LocalBroker(settings, data_dir)


@app.command()
def start(port: Port = None, controller_port: ControllerPort = None, data_dir: DataDir = None):
    """Start the broker in the background and wait until it answers (fetch Kafka on first use)."""
    from sketchstream.tools.broker import KAFKA_VERSION, BrokerError

    broker = _broker(port, data_dir, controller_port)
    if not broker.is_resolved:
        typer.echo(f"Fetching Apache Kafka {KAFKA_VERSION} with Maven into {broker.libs_dir} ...")
    try:
        started = broker.start()
    except BrokerError as exc:
        fail(exc)
    verb = "started" if started else "is already running"
    typer.echo(
        f"Kafka {KAFKA_VERSION} {verb} at {broker.bootstrap_servers} (pid {broker.pid()}); "
        f"data and log in {broker.data_dir}"
    )


@app.command()
def status(port: Port = None, data_dir: DataDir = None):
    """Exit 0 when the broker answers a metadata request, 1 otherwise.

    With SKETCHSTREAM_KAFKA set, checks those servers instead of the local broker.
    """
    from sketchstream.tools.broker import KAFKA_VERSION
    from sketchstream.tools.kafka_io import kafka_answers

    settings = load_settings_or_exit(kafka_port=port)
    if not settings.uses_local_broker:
        answering = kafka_answers(settings.client_kwargs())
        typer.echo(f"{settings.bootstrap_servers}: {'answering' if answering else 'no answer'}")
        raise typer.Exit(0 if answering else 1)
    broker = _broker(port, data_dir)
    state = broker.status()
    where = state.bootstrap_servers
    if state.running and state.answering:
        typer.echo(f"Kafka {KAFKA_VERSION} running (pid {state.pid}), answering at {where}")
    elif state.running:
        typer.echo(
            f"broker process {state.pid} runs but does not answer at {where} "
            "(starting, or stuck: see `sketchstream kafka logs`)"
        )
    elif state.answering:
        typer.echo(f"not started by sketchstream, but a Kafka broker answers at {where}")
    else:
        typer.echo(f"not running (nothing answers at {where})")
    raise typer.Exit(0 if state.answering else 1)


@app.command()
def stop(
    data_dir: DataDir = None,
    if_unused: Annotated[
        bool,
        typer.Option("--if-unused", help="Leave it running while another test session uses it."),
    ] = False,
):
    """Stop the broker: SIGTERM, then SIGKILL if it has not exited after 30 s."""
    from sketchstream.tools.broker import BrokerError

    broker = _broker(None, data_dir)
    users = broker.users()
    if if_unused and users:
        typer.echo(f"left the local broker running: in use by pid {', '.join(map(str, users))}")
        return
    try:
        pids = broker.stop()
    except BrokerError as exc:
        fail(exc)
    if pids:
        typer.echo(f"stopped the local broker (pid {', '.join(map(str, pids))})")
    else:
        typer.echo("the local broker is not running")


@app.command()
def logs(
    data_dir: DataDir = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many last lines.")] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines (Ctrl-C ends).")
    ] = False,
):
    """Print the end of the broker's log (its JVM output)."""
    broker = _broker(None, data_dir)
    if not broker.log_path.exists():
        typer.echo(f"no broker log yet at {broker.log_path}", err=True)
        raise typer.Exit(1)
    for line in broker.logs(lines):
        typer.echo(line)
    if follow:
        _follow(broker)


def _follow(broker: LocalBroker) -> None:
    with broker.log_path.open("rb") as f:
        f.seek(0, 2)
        try:
            while True:
                chunk = f.readline()
                if chunk:
                    typer.echo(chunk.decode("utf-8", "replace").rstrip("\n"))
                else:
                    time.sleep(0.5)
        except KeyboardInterrupt:
            pass
