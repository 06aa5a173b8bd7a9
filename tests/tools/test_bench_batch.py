"""`sketchstream bench batch`: the worker's per-batch path alone, on a tiny real artifact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import orjson
import pytest
from sketchstream.tools.cli import app
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stream"))
from kafka_harness import build_tiny_artifact, synthetic_events


def test_bench_batch_times_each_batch_size_and_writes_json_lines(tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    version = build_tiny_artifact(root)
    events = tmp_path / "events.jsonl"
    lines = [orjson.dumps(e) for e in synthetic_events(900, users=20)]
    lines[150:150] = [b"not json", b"[1, 2]"]  # bad lines are refused, not fatal
    events.write_bytes(b"\n".join(lines))
    out = tmp_path / "batch.jsonl"

    result = CliRunner().invoke(
        app,
        ["bench", "batch", "--model", str(root), "--events-file", str(events), "--size", "10",
         "--size", "100", "--events", "300", "--warm", "100", "--late", "120",
         "--json", str(out)],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["batch_size"], r["order"]) for r in rows] == [
        (10, "in order"), (100, "in order"), (10, "late"), (100, "late"),
    ]  # fmt: skip
    for r in rows:
        assert r["events"] == (300 if r["order"] == "in order" else 120)
        assert r["events_per_s"] > 0 and r["model"] == version
    assert "µs/event" in result.stdout


def test_a_missing_events_file_is_a_usage_error_not_a_traceback(tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    build_tiny_artifact(root)
    missing = tmp_path / "nowhere" / "events.jsonl"

    result = CliRunner().invoke(
        app, ["bench", "batch", "--model", str(root), "--events-file", str(missing)]
    )

    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_bench_batch_profile_splits_each_batch_size_by_stage_within_its_wall_time(tmp_path):
    from sketchstream.stream.metrics import STAGES

    root = tmp_path / "artifacts"
    root.mkdir()
    build_tiny_artifact(root)
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(orjson.dumps(e) for e in synthetic_events(400, users=20)))
    out = tmp_path / "batch.jsonl"

    result = CliRunner().invoke(
        app,
        ["bench", "batch", "--model", str(root), "--events-file", str(events), "--size", "50",
         "--events", "200", "--warm", "100", "--profile", "--json", str(out)],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    us = {p["stage"]: p["us_per_event"] for p in row["profile"]}
    assert list(us) == [*STAGES, "rest", "busy (wall)"]
    assert us["busy (wall)"] == pytest.approx(row["us_per_event"], rel=0.01)
    for stage in ("decode", "state_read", "fold", "item_features", "mlp", "state_encode"):
        assert us[stage] > 0, stage
    assert sum(us[s] for s in STAGES) <= us["busy (wall)"]
    assert "50 in order µs/event" in result.stdout
