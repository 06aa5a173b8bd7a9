"""The ``sketchstream`` command: one typer group per module, joined here.

Each command module imports only typer and the standard library at import time; torch, faust
and the numeric code are imported inside command bodies, so ``--help`` stays instant.
"""

from __future__ import annotations

import logging

import typer
from sketchstream.tools import (
    bench,
    data,
    demo,
    evaluate,
    kafka,
    refresh,
    replay,
    topics,
    train,
    worker,
)

__all__ = ["app", "main"]

app = typer.Typer(
    name="sketchstream",
    help=(
        "Near-real-time engagement prediction from Kafka event streams: Cleora graph embeddings "
        "and EMDE sketches per user in RocksDB, scored by a small torch MLP.\n\n"
        "Configuration comes from SKETCHSTREAM_* environment variables; flags override them. "
        "With SKETCHSTREAM_KAFKA unset, commands use the local broker (`sketchstream kafka start`)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(kafka.app, name="kafka")
app.add_typer(topics.app, name="topics")
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")
app.command("train")(train.train)
app.command("evaluate")(evaluate.evaluate)
app.command("worker")(worker.worker)
app.command("replay")(replay.replay)
app.command("demo")(demo.demo)
app.command("refresh")(refresh.refresh)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    """Console-script entry point."""
    app()
