"""`sketchstream bench stream`: one small end-to-end run of all three systems on the broker."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sketchstream.tools.cli import app
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "stream"))
from kafka_harness import build_tiny_artifact


def test_the_broker_cpu_is_read_from_the_local_broker_only(tmp_path: Path) -> None:
    """The broker's CPU time is read off /proc for the local broker's JVM (its pid file);
    another broker's address, or a pid that is gone, gives None, never a made-up figure."""
    import os

    from sketchstream.stream.settings import load_settings
    from sketchstream.tools.stream_bench import local_broker_pid, pid_cpu_seconds

    assert pid_cpu_seconds(os.getpid()) > 0
    assert pid_cpu_seconds(None) is None
    assert pid_cpu_seconds(2**22 + 1) is None  # above Linux's largest pid
    elsewhere = load_settings(kafka="broker.invalid:9092", home=str(tmp_path))
    assert local_broker_pid(elsewhere) is None
    local = load_settings(home=str(tmp_path))  # the local broker's address, never started
    assert local_broker_pid(local) is None


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
        # None when the drain ended before the bench's first look (0.2 s), or took under ten
        # clock ticks of CPU (a figure of whole 10 ms ticks): 2,000 events may
        assert r["cpu_us_per_event"] is None or r["cpu_us_per_event"] > 0
        # the local broker's, timed as the system's is (None on another broker)
        assert r["broker_cpu_us_per_event"] is None or r["broker_cpu_us_per_event"] >= 0
    worker = rows[-1]
    assert worker["state_bytes_per_user"] > 0 and worker["users"] > 0
    assert worker["ratio_vs_raw"] == pytest.approx(
        worker["events_per_s"] / rows[0]["events_per_s"], rel=1e-2
    )
    if "cpu_ratio_vs_raw" in worker:
        assert worker["cpu_ratio_vs_raw"] == pytest.approx(
            rows[0]["cpu_us_per_event"] / worker["cpu_us_per_event"], rel=1e-2
        )
    assert "system" in result.output  # the table


def bench_on_tiny_model(
    tmp_path: Path, kafka: str, *args: str, models: int = 1
) -> tuple[Any, list[dict]]:
    """``sketchstream bench stream ARGS`` on the synthetic stream, serving a tiny artifact
    (``models`` of them, seeds 0, 1, ..., each in its own store, one ``--model`` each): the
    CLI's result (exit code 0 checked) and its JSON lines."""
    given = []
    for seed in range(models):
        build_tiny_artifact(tmp_path / f"models{seed}", seed)
        given += ["--model", str(tmp_path / f"models{seed}")]
    out = tmp_path / "stream.jsonl"
    result = CliRunner().invoke(
        app,
        [
            *["bench", "stream", *args, "--data", str(tmp_path), *given],
            *["--kafka", kafka, "--timeout", "60", "--json", str(out)],
        ],
    )
    assert result.exit_code == 0, result.output
    return result, [json.loads(line) for line in out.read_text().splitlines()]


def test_rounds_summary_gives_every_rounds_figures_then_the_median():
    from sketchstream.tools.stream_bench import rounds_summary, stream_table

    rows = [
        {"system": "raw", "round": 1, "events_per_s": 100_000.0},
        {"system": "worker", "round": 1, "events_per_s": 40_000.0, "ratio_vs_raw": 0.4},
        {"system": "raw", "round": 2, "events_per_s": 80_000.0},
        {"system": "worker", "round": 2, "events_per_s": 44_000.0, "ratio_vs_raw": 0.55},
        {"system": "raw", "round": 3, "events_per_s": 90_000.0},
        {"system": "worker", "round": 3, "events_per_s": 45_000.0, "ratio_vs_raw": 0.5},
    ]
    assert rounds_summary(rows).splitlines() == [
        "raw: events/s 100,000 / 80,000 / 90,000 (median 90,000)",
        "worker: events/s 40,000 / 44,000 / 45,000 (median 44,000); "
        "x raw 0.400 / 0.550 / 0.500 (median 0.500)",
    ]
    assert stream_table(rows).split()[0] == "round"  # a round column when there are several
    assert stream_table(rows[:2]).split()[0] == "system"


@pytest.mark.slow
@pytest.mark.kafka
def test_bench_stream_rounds_alternate_the_systems_and_models_each_against_its_own_raw(
    kafka_bootstrap: str, tmp_path: Path
):
    """Two rounds of raw and a worker for each of two models: every worker run's ratio is
    against its own round's raw run; the summary has a line a model."""
    result, rows = bench_on_tiny_model(
        tmp_path,
        kafka_bootstrap,
        *["--system", "raw", "--system", "worker", "--rounds", "2"],
        # batches of 100: a drain of several sends, never one (which leaves no span to time)
        *["--events", "1000", "--batch-size", "100", "--latency-seconds", "0"],
        models=2,
    )
    a, b = rows[1]["model"], rows[2]["model"]
    assert a != b
    assert [(r["system"], r["round"], r.get("model")) for r in rows] == [
        ("raw", 1, None),
        ("worker", 1, a),
        ("worker", 1, b),
        ("raw", 2, None),
        ("worker", 2, a),
        ("worker", 2, b),
    ]
    for raw, *workers in (rows[:3], rows[3:]):
        for worker in workers:
            assert worker["ratio_vs_raw"] == pytest.approx(
                worker["events_per_s"] / raw["events_per_s"], rel=1e-2
            )
    assert "over the rounds:" in result.output
    assert f"worker {a}: events/s" in result.output and f"worker {b}: events/s" in result.output


@pytest.mark.slow
@pytest.mark.kafka
def test_bench_stream_profile_splits_the_workers_wall_time_by_stage(
    kafka_bootstrap: str, tmp_path: Path
):
    """The worker's own stage counters, read off its /metrics: every stage of a batch, in
    both phases, none negative, together within the busy wall time they are parts of."""
    from sketchstream.stream.metrics import STAGES

    result, [worker] = bench_on_tiny_model(
        tmp_path,
        kafka_bootstrap,
        *["--system", "worker", "--events", "2000", "--latency-seconds", "1", "--profile"],
    )
    for phase in ("drain", "paced"):
        spent = {p["stage"]: p for p in worker["profile"] if p["phase"] == phase}
        assert list(spent) == [*STAGES, "rest", "busy (wall)"]
        for stage in ("fetch", "decode", "state_read", "fold", "mlp", "changelog"):
            assert spent[stage]["us_per_event"] > 0, (phase, stage)
        if phase == "paced":  # many batches, each waiting for the one before to finish
            assert spent["send_wait"]["us_per_event"] > 0
        assert all(p["us_per_event"] >= 0 for p in spent.values()), (
            phase,
            {stage: p["us_per_event"] for stage, p in spent.items()},
        )
        assert sum(spent[s]["pct_of_wall"] for s in STAGES) <= 100.0 + 0.1 * len(STAGES)
        assert spent["busy (wall)"]["pct_of_wall"] == 100.0
    assert "drain µs/event" in result.output and "paced µs/event" in result.output
    # the paced run's latency split by part: each within the whole, none below 0 (the record
    # times are whole milliseconds)
    parts = worker["latency_parts"]
    assert list(parts) == ["to_worker", "in_worker", "to_send"]
    for p50, p99 in parts.values():
        assert -1.0 <= p50 <= p99 <= worker["p99_ms"] + 1.0
    assert "where the paced run's latency went" in result.output


def test_latency_parts_are_the_percentiles_of_each_step_between_four_times():
    from sketchstream.tools.stream_bench import latency_parts, latency_parts_table

    # (born, received, published, sent) seconds: 1..100 ms to the worker, 5 ms in it, 0 to send
    rows = [(10.0, 10.0 + k / 1000, 10.005 + k / 1000, 10.005 + k / 1000) for k in range(1, 101)]
    parts = latency_parts(rows)
    assert parts["to_worker"] == [50.5, 99.01]
    assert parts["in_worker"] == pytest.approx([5.0, 5.0], abs=1e-6)
    assert parts["to_send"] == pytest.approx([0.0, 0.0], abs=1e-6)
    text = latency_parts_table([parts, parts])
    assert text.splitlines()[1].split()[:4] == ["to_worker", "50.5", "/", "99.0"]


def test_a_systems_cpu_time_is_read_off_its_process(tmp_path: Path):
    """CPU µs per event comes from the system's own CPU time: a child that spins for 0.3 s
    of CPU and then sleeps reads as about 0.3 s, however long it has lived."""
    from sketchstream.tools.stream_bench import _Process

    spin = "import time; t = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    child = _Process([sys.executable, "-c", spin + "time.sleep(30)"], {}, tmp_path / "child.log")
    try:
        deadline = time.monotonic() + 20
        while child.cpu_seconds() < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # asleep now: its CPU time stays put
        assert 0.3 <= child.cpu_seconds() < 0.3 + 0.25  # interpreter start-up: a few tenths
    finally:
        child.stop()


def test_later_copies_keep_every_users_events_in_time_order():
    """A latency run longer than its events continues with the same events, later in time:
    none is older than an event its user already sent (that would be a late event, which
    the worker reads on its slower path)."""
    from sketchstream.tools.bench_events import later_copies

    lines = [
        json.dumps(
            {"user": f"u{k % 3}", "item": f"i{k}", "action": "rate", "ts": 100 + 7 * k}
        ).encode()
        for k in range(5)
    ]
    more = later_copies(lines, 12)
    events = [json.loads(x) for x in lines + more]
    assert len(more) == 12
    assert [e["item"] for e in events[5:]] == [f"i{k % 5}" for k in range(12)]
    last: dict[str, float] = {}
    for e in events:
        assert e["ts"] > last.get(e["user"], float("-inf"))
        last[e["user"]] = e["ts"]
    assert later_copies(lines, 0) == [] and later_copies([], 3) == []


def test_check_events_names_the_first_line_it_cannot_key_or_time():
    """bench stream keys events by user and moves them in time: a line without either is
    refused up front, by its number, instead of failing inside a run."""
    import pytest
    from sketchstream.tools.bench_events import BadEventLine, check_events

    good = [json.dumps({"user": "u1", "item": "i", "action": "rate", "ts": 5}).encode()] * 2
    check_events(good)
    for bad, why in [
        (b"not json", "not a JSON event"),
        (json.dumps({"user": "u1", "item": "i"}).encode(), "'ts'"),
        (json.dumps({"user": 7, "ts": 5}).encode(), "'user' must be a string"),
        (json.dumps({"user": "u1", "ts": "noon"}).encode(), "'ts' a number"),
        (b"[1, 2]", "not a JSON event"),
    ]:
        with pytest.raises(BadEventLine, match="event 12: ") as got:
            check_events([*good, bad], start=9)
        assert why in str(got.value)


@pytest.mark.kafka
def test_a_model_folder_without_an_artifact_ends_with_a_message_not_a_traceback(
    kafka_bootstrap: str, tmp_path: Path
):
    empty = tmp_path / "no-models"
    empty.mkdir()
    result = CliRunner().invoke(
        app,
        [
            *["bench", "stream", "--system", "worker", "--events", "100"],
            *["--data", str(tmp_path), "--model", str(empty), "--kafka", kafka_bootstrap],
        ],
    )
    assert result.exit_code == 2, result.output
    assert f"--model {empty}: no model artifact there" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
