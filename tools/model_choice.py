"""Which model artifact a command uses, and whether the worker would serve it.

- :func:`resolve_model`: a path that is a model artifact, or the newest version in an artifact
  store root (``evaluate --model``, ``bench batch``, ``bench chaos``);
- :func:`refusal`: why the worker would refuse an artifact (None: it serves it), found by
  loading it the way the worker does (``demo`` before reusing one, the stream bench's cached
  model).
"""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["refusal", "resolve_model"]


def resolve_model(
    path: Path, *, how_to_make: str | None = None, param_hint: str | None = None
) -> Path:
    """``path`` when it is a model artifact, else the newest version in the artifact store at
    ``path``; ``typer.BadParameter`` when neither (``how_to_make``: a hint added to the message,
    ``param_hint``: the option named in it)."""
    from sketchstream.models.artifacts import MANIFEST, ArtifactStore

    if (path / MANIFEST).is_file():
        return path
    latest = ArtifactStore(path).latest() if path.is_dir() else None
    if latest is None:
        message = (
            f"{path}: no model artifact there; {how_to_make}"
            if how_to_make
            else f"{path}: neither a model artifact nor a folder of them"
        )
        raise typer.BadParameter(message, param_hint=param_hint)
    return path / str(latest)


def refusal(path: Path) -> str | None:
    """Why the worker would refuse the artifact at ``path`` (None: it serves it), by loading it
    the way the worker does; an artifact older than the code is refused, not a crash."""
    from sketchstream.models.errors import SketchstreamError
    from sketchstream.stream.models_feed import load_serving_model

    try:
        load_serving_model(path)
    except (SketchstreamError, OSError, KeyError, TypeError, ValueError) as exc:
        return str(exc)
    return None
