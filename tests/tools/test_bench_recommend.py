"""`sketchstream bench recommend`: the worker's answer path to top-k requests, timed on a tiny
real artifact with a recommender."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
from sketchstream.tools.cli import app
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stream"))
from kafka_harness import build_tiny_artifact, synthetic_events

KEYS = {"catalogue", "items", "k", "batch", "requests_per_s", "p50_ms", "p99_ms", "threads"}


@pytest.fixture
def setup(tmp_path):
    """A tiny model with a recommender (60 items) and 240 events of 30 users."""
    root = tmp_path / "artifacts"
    root.mkdir()
    version = build_tiny_artifact(root, recommender=True)
    events = synthetic_events(240, users=30)
    per_user = Counter(e["user"] for e in events)
    assert max(per_user.values()) <= 16, "every item within the states' bounded history"
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in events))
    return root, version, path, events


def test_bench_recommend_writes_a_row_per_catalogue_batch_and_exclude_seen(setup, tmp_path):
    root, version, events_path, _ = setup
    out = tmp_path / "recommend.jsonl"

    result = CliRunner().invoke(
        app,
        ["bench", "recommend", "--model", str(root), "--events-file", str(events_path),
         "--items", "500", "--batch", "16", "--requests", "100", "--warm", "240",
         "--json", str(out)],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["catalogue"], r["items"], r["exclude_seen"]) for r in rows] == [
        ("own", 60, False), ("own", 60, True), ("synthetic", 500, False), ("synthetic", 500, True),
    ]  # fmt: skip
    for r in rows:
        assert set(r) >= KEYS
        assert (r["k"], r["batch"], r["threads"], r["model"]) == (10, 16, 1, version)
        assert r["requests"] == 112  # 100 rounded up to whole batches of 16
        assert r["requests_per_s"] > 0 and r["requests_per_cpu_s"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert "requests/s" in result.stdout


def test_answers_are_k_distinct_catalogue_items_best_first_and_leave_seen_items_out(setup):
    from sketchstream.tools.recommend_bench import recommend_worker

    root, _, events_path, events = setup
    seen: dict[str, set[str]] = {}
    for e in events:
        seen.setdefault(e["user"], set()).add(e["item"])
    own = {f"i{j}" for j in range(60)}
    synthetic = own | {f"synthetic-{j}" for j in range(2000 - 60)}

    got = recommend_worker(
        {"model": str(root), "events_path": str(events_path), "warm": 240, "k": 10,
         "catalogues": [["own", 0], ["synthetic", 2000]], "batches": [32], "requests": 64,
         "threads": 1, "seed": 0}
    )  # fmt: skip

    assert len(got["answers"]) == len(got["rows"]) == 4
    for row, answers in zip(got["rows"], got["answers"], strict=True):
        catalogue = own if row["catalogue"] == "own" else synthetic
        assert len(answers) == 32
        for a in answers:
            assert len(a["items"]) == len(set(a["items"])) == 10
            assert set(a["items"]) <= catalogue
            assert a["scores"] == sorted(a["scores"], reverse=True)
            assert a["exclude_seen"] is row["exclude_seen"]
            if row["exclude_seen"]:
                assert not set(a["items"]) & seen[a["user"]]
    assert any(set(a["items"]) & seen[a["user"]] for a in got["answers"][0])  # not vacuous


def test_a_model_without_a_recommender_is_a_one_line_error(setup, tmp_path):
    _, _, events_path, _ = setup
    root = tmp_path / "plain"
    root.mkdir()
    build_tiny_artifact(root)

    result = CliRunner().invoke(
        app, ["bench", "recommend", "--model", str(root), "--events-file", str(events_path)]
    )

    assert result.exit_code == 1
    assert "has no recommender" in result.output and "--recommender" in result.output
