"""Command-line options that stand for a :class:`Settings` field.

A flag given on the command line wins; left out, the field's ``SKETCHSTREAM_*`` environment
variable or its default applies, because the command passes the flag to
:func:`~sketchstream.stream.settings.load_settings`, which ignores ``None``::

    def start(port: Annotated[int | None, setting_option("kafka_port", "--port")] = None):
        settings = load_settings(kafka_port=port)

The help text names the variable and the default, so ``--help`` documents both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from sketchstream.stream.settings import ENV_PREFIX, Settings

__all__ = [
    "HEAD_HELP",
    "BaselinesOption",
    "DataOption",
    "HeadOption",
    "ProgressOption",
    "ThreadsOption",
    "env_var",
    "exit_on_error",
    "fail",
    "load_settings_or_exit",
    "setting_option",
]

# options shared by the model commands (train, evaluate, refresh)
DataOption = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Folder with events.jsonl (and optionally items.jsonl).",
        exists=True,
        file_okay=False,
    ),
]
HEAD_HELP = (
    "A prediction target, NAME:ACTION[,ACTION...][>=THRESHOLD][@ACTION,...] "
    "(repeatable; the first is primary). like:rate>=4: rate events, positive when the "
    "value is >= 4; reorder:purchase>=1: purchases with value >= 1; click:click@view,click: "
    "views and clicks labelled, clicks positive. NAME:next<=DURATION is a return head: "
    "return:next<=7d labels every event, positive when the user's next event comes within "
    "7 days (durations in s, m, h, d)."
)
HeadOption = Annotated[
    list[str] | None,
    typer.Option(
        "--head",
        help=HEAD_HELP + " Default: the heads the data folder's MANIFEST.json recommends, "
        "else like:rate>=4, and return:next<=7d.",
        show_default=False,
    ),
]
BaselinesOption = Annotated[bool, typer.Option(help="Run the baselines for the report.")]
ThreadsOption = Annotated[int, typer.Option(min=0, help="torch threads (0: default).")]
ProgressOption = Annotated[bool, typer.Option(help="Show progress bars.")]


def env_var(field: str) -> str:
    """The variable of a Settings field: ``kafka_port`` → ``SKETCHSTREAM_KAFKA_PORT``."""
    if field not in Settings.model_fields:
        raise KeyError(f"{field!r} is not a Settings field")
    return ENV_PREFIX + field.upper()


def setting_option(field: str, *param_decls: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` (for ``Annotated``; default None) overriding Settings ``field``."""
    info = Settings.model_fields[field]
    default = info.get_default(call_default_factory=True, validated_data={})
    help_text = kwargs.pop("help", None) or info.description or field
    return typer.Option(
        *param_decls,
        help=f"{help_text} (env {env_var(field)}, default {default})",
        show_default=False,
        **kwargs,
    )


def load_settings_or_exit(**flags: Any) -> Settings:
    """Settings from the environment and the given flags; a bad value ends the command (exit 2)
    with a message naming the variable or flag and what is expected."""
    from pydantic import ValidationError
    from sketchstream.stream.settings import load_settings

    try:
        return load_settings(**flags)
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            name = env_var(field) if field in Settings.model_fields else field
            typer.echo(f"invalid setting {name}={error.get('input')!r}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


def fail(message: object, code: int = 1) -> NoReturn:
    """End the command with one ``error: ...`` line on stderr and exit status ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def exit_on_error(
    code: int = 1, errors: type[BaseException] | tuple[type[BaseException], ...] | None = None
) -> Iterator[None]:
    """Inside the block, an expected error (default: any
    :class:`~sketchstream.models.errors.SketchstreamError`: bad data, a missing model, an
    unreachable broker) ends the command through :func:`fail`: one line, no traceback."""
    from sketchstream.models.errors import SketchstreamError

    caught = SketchstreamError if errors is None else errors
    try:
        yield
    except caught as exc:
        fail(exc, code)
