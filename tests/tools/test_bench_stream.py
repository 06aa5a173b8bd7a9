"""`sketchstream bench stream`: one small end-to-end run of all three systems on the broker."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sketchstream.tools.cli import app
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "stream"))
from kafka_harness import build_tiny_artifact


@pytest.mark.slow
@pytest.mark.kafka
def test_bench_stream_writes_one_json_line_per_system(kafka_bootstrap: str, tmp_path: Path):
    models = tmp_path / "models"
    build_tiny_artifact(models)
    out = tmp_path / "stream.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "stream",
            "--events",
            "2000",
            "--latency-seconds",
            "1",
            "--data",
            str(tmp_path),  # no events.jsonl there: the synthetic stream
            "--model",
            str(models),
            "--kafka",
            kafka_bootstrap,
            "--json",
            str(out),
            "--timeout",
            "60",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["system"] for r in rows] == ["raw", "faust", "worker"]
    for r in rows:
        assert r["events_per_s"] > 0 and r["rss_mb"] > 0
        assert 0 <= r["p50_ms"] <= r["p99_ms"]
    worker = rows[-1]
    assert worker["state_bytes_per_user"] > 0 and worker["users"] > 0
    assert worker["ratio_vs_raw"] == pytest.approx(
        worker["events_per_s"] / rows[0]["events_per_s"], rel=1e-2
    )
    assert "system" in result.output  # the table
