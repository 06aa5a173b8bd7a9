"""`sketchstream bench replay`: all four variants on a tiny canonical data folder."""

from __future__ import annotations

import json

from sketchstream.tools.cli import app
from typer.testing import CliRunner

VARIANTS = ["aggregator", "snapshot", "snapshot+cf", "refresh-only"]
GIVEN = VARIANTS[::-1]


def _table(lines: list[str]) -> list[dict[str, str]]:
    """Rows of a printed table as {header: cell}, columns cut where the dashes line has runs."""
    spans, at = [], 0
    for dashes in lines[1].split("  "):
        spans.append((at, at + len(dashes)))
        at += len(dashes) + 2
    cells = [[line[a:b].strip() for a, b in spans] for line in lines]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]


def test_bench_replay_runs_every_variant_and_writes_json_lines(tmp_path, make_ratings):
    # 2,000 ratings, one every 15 minutes; the first 1,500 span about 16 daily refresh windows
    data = make_ratings(2000, users=30, items=40, every_s=900, with_metadata=20, years=True)
    out = tmp_path / "bench" / "replay.jsonl"

    picked = [a for v in GIVEN for a in ("--variant", v)]
    result = CliRunner().invoke(
        app,
        ["bench", "replay", "--data", str(data), "--events", "1500", "--batch-size", "256",
         *picked, "--json", str(out)],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    top = next(k for k, line in enumerate(lines) if line.split()[:1] == ["variant"])
    rows = _table(lines[top:])
    assert [r["variant"] for r in rows] == GIVEN
    for r in rows:
        assert r["events"] == "1,500"
        assert float(r["events/s"].replace(",", "")) > 0 and float(r["peak RSS MB"]) > 0

    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["variant"] for r in runs] == GIVEN
    for r in runs:
        assert r["events"] == 1500 and r["batch_size"] == 256
        assert r["seconds"] > 0 and r["events_per_s"] > 0
        assert r["peak_rss_mb"] >= r["setup_rss_mb"] > 0
        assert r["cpus"] >= 1 and r["load_avg"] >= 0
        assert r["load_s"] >= 0 and r["codebooks_s"] > 0
        assert r["data"] == str(data)
        assert r["ratio_vs_aggregator"] > 0
    by = {r["variant"]: r for r in runs}
    assert by["aggregator"]["ratio_vs_aggregator"] == 1.0
    assert by["aggregator"]["windows"] is None
    assert by["snapshot"]["windows"] == by["snapshot+cf"]["windows"] > 1
    assert by["refresh-only"]["windows"] == by["snapshot+cf"]["windows"]
    assert by["snapshot"]["similarity_builds"] is None
    assert by["snapshot+cf"]["similarity_builds"] >= 0
