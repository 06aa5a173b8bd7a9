"""`sketchstream bench chaos`: the comparisons it reports, its fuzz, and one small run on a
broker of its own (clean run, then fuzz + SIGKILL + broker stop/start)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest
from sketchstream.tools.bench import app
from sketchstream.tools.chaos_compare import compare_predictions, compare_states, goal_met
from sketchstream.tools.chaos_stream import FUZZ_KINDS, mixed_stream, numbered_events
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "stream"))
from kafka_harness import build_tiny_artifact, synthetic_events

REQUIRED = {
    "events": int,
    "lost": int,
    "changed": int,
    "duplicates_nonidentical": int,
    "states_equal": bool,
    "worker_exits_on_bad_input": int,
}


# --- what the figures mean ---------------------------------------------------------------


def test_lost_changed_and_duplicates_are_counted_per_good_event():
    clean = {"a": [(0.5, 0.1)], "b": [(0.2, 0.3)], "c": [(0.9, 0.9)], "d": [(0.4, 0.4)]}
    chaos = {
        "a": [(0.5, 0.1)],  # same
        "b": [(0.2, 0.3), (0.2, 0.3 + 1e-7)],  # an identical duplicate (float rounding)
        "c": [(0.9, 0.9), (0.9, 0.8)],  # a duplicate scored differently: also changed
        # "d": lost
        "fuzz-null_key-1": [(0.1, 0.1)],  # not a good event: not counted here
    }
    got = compare_predictions(clean, chaos, ["a", "b", "c", "d"])
    assert got["lost"] == 1
    assert got["changed"] == 1
    assert got["duplicates"] == 2
    assert got["duplicates_nonidentical"] == 1
    assert got["clean_lost"] == 0
    assert got["max_abs_diff"] == pytest.approx(0.1)


def test_a_score_is_changed_only_beyond_1e_5():
    clean = {"a": [(0.5,)], "b": [(0.5,)]}
    chaos = {"a": [(0.5 + 0.9e-5,)], "b": [(0.5 + 1.1e-5,)]}
    got = compare_predictions(clean, chaos, ["a", "b"])
    assert got["changed"] == 1 and got["lost"] == 0


def test_an_event_the_clean_run_missed_is_counted_apart_not_as_changed():
    got = compare_predictions({}, {"a": [(0.5,)]}, ["a"])
    assert got["clean_lost"] == 1 and got["changed"] == 0 and got["lost"] == 0


def _fold(agg, events, offsets, partition=0):
    """States ``{user key: bytes}`` after folding ``events`` at ``offsets`` on one partition."""
    from sketchstream.models.batches import EventBatch

    users = list(dict.fromkeys(e["user"] for e in events))
    index = {u: k for k, u in enumerate(users)}
    state = agg.load([None] * len(users))
    actions = {a: k for k, a in enumerate(agg.config.actions)}
    agg.score_then_fold(
        state,
        EventBatch(
            user_index=[index[e["user"]] for e in events],
            item=np.array([e["item"] for e in events], dtype=object),
            action=[actions[e["action"]] for e in events],
            value=[e.get("value", np.nan) for e in events],
            ts=[e["ts"] for e in events],
            partition=[partition] * len(events),
            offset=offsets,
        ),
    )
    return {u.encode(): blob for u, blob in zip(users, agg.dump(state), strict=True)}


@pytest.fixture
def aggregator(tmp_path):
    from sketchstream.models.aggregator import Aggregator
    from sketchstream.models.artifacts import ArtifactStore
    from sketchstream.models.channels import aggregator_config_from_dict

    build_tiny_artifact(tmp_path / "artifacts")
    bundle = ArtifactStore(tmp_path / "artifacts").load()
    return Aggregator(aggregator_config_from_dict(bundle.aggregator_config), bundle.codebooks)


def test_states_are_equal_whatever_offsets_their_events_had(aggregator):
    """Fuzz records shift the good events' offsets: the same events at other offsets (on
    another partition too) make equal states."""
    events = synthetic_events(200, users=12)
    clean = _fold(aggregator, events, list(range(200)))
    chaos = _fold(aggregator, events, [3 * k + 7 for k in range(200)], partition=1)
    got = compare_states(aggregator, clean, chaos)
    assert got == {
        "states_compared": 12,
        "states_differ": 0,
        "states_missing": 0,
        "states_extra": 0,
        "differ_fields": {},
    }


def test_an_event_folded_twice_or_a_missing_user_makes_states_differ(aggregator):
    events = synthetic_events(200, users=12)
    clean = _fold(aggregator, events, list(range(200)))
    twice = [*events, events[-1]]  # a resent event, folded again at a new offset
    chaos = _fold(aggregator, twice, list(range(201)))
    del chaos[next(k for k in sorted(chaos) if k != events[-1]["user"].encode())]
    got = compare_states(aggregator, clean, chaos)
    assert got["states_differ"] == 1
    assert got["differ_fields"]["n_events"] == 1
    assert got["states_missing"] == 1 and got["states_extra"] == 0


def test_the_goal_is_the_issues_goal():
    row = dict(
        lost=0,
        changed=0,
        duplicates_nonidentical=0,
        states_equal=True,
        worker_exits_on_bad_input=0,
        restart_resume_s=9.5,
    )
    assert goal_met(row)
    assert not goal_met(row | {"restart_resume_s": 10.5})
    assert not goal_met(row | {"restart_resume_s": None})  # no prediction after the restart
    assert not goal_met(row | {"states_equal": False})
    assert not goal_met(row | {"worker_exits_on_bad_input": 1})


# --- the fuzz ------------------------------------------------------------------------------


def test_the_fuzz_is_seeded_keyed_like_real_events_and_has_every_kind():
    bare = [{k: v for k, v in e.items() if k != "event_id"} for e in synthetic_events(400)]
    lines = [orjson.dumps(e) for e in bare]
    events = numbered_events(lines)
    assert [e["event_id"] for e in events[:2]] == ["chaos-0", "chaos-1"]
    good, mixed = mixed_stream(events, 4, fuzz_rate=0.1, seed=3)
    again = mixed_stream(events, 4, fuzz_rate=0.1, seed=3)[1]
    assert mixed == again
    assert [r for r in mixed if r.kind == "good"] == good  # good events in their order
    fuzz = [r for r in mixed if r.kind != "good"]
    assert len(fuzz) == 40 and {r.kind for r in fuzz} == set(FUZZ_KINDS)
    home = {r.key: r.partition for r in good}
    for r in fuzz:
        if r.kind == "null_key":
            assert r.key is None and r.partition in home.values()
        elif r.kind not in ("long_id", "wrong_key"):
            assert home[r.key] == r.partition  # lands among its user's events
    deep = next(r for r in fuzz if r.kind == "deep_array")
    assert deep.value.startswith(b"[" * 1000)
    assert all(len(r.value) > 65536 for r in fuzz if r.kind == "oversized")
    resent = next(r for r in fuzz if r.kind == "resent")
    original = next(r for r in good if r.event_id == resent.event_id)
    assert mixed.index(original) < mixed.index(resent) and resent.value == original.value


def test_an_unknown_fuzz_kind_is_refused_by_name(tmp_path):
    result = CliRunner().invoke(app, ["chaos", "--fuzz-kind", "bad_jsn", "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "bad_jsn" in result.output and "bad_json" in result.output


def test_without_a_model_the_bench_says_how_to_train_one(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "events.jsonl").write_bytes(
        b"\n".join(orjson.dumps(e) for e in synthetic_events(20)) + b"\n"
    )
    result = CliRunner().invoke(
        app, ["chaos", "--data", str(data), "--model", str(tmp_path / "nothing")]
    )
    assert result.exit_code == 2
    assert "sketchstream train" in result.output


# --- one run ---------------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
def test_a_small_chaos_run_appends_one_json_line_with_every_figure(tmp_path):
    build_tiny_artifact(tmp_path / "models")
    events = synthetic_events(300, users=25)
    data = tmp_path / "data"
    data.mkdir()
    (data / "events.jsonl").write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
    out = tmp_path / "chaos.jsonl"
    out.write_text('{"earlier": "run"}\n')
    args = ["chaos", "--data", str(data), "--events", "300", "--model", str(tmp_path / "models")]
    args += ["--partitions", "2", "--fuzz-rate", "0.1", "--outage", "1", "--max-restarts", "1"]
    args += ["--stall", "45", "--timeout", "90", "--seed", "5", "--json", str(out)]
    args += ["--workdir", str(tmp_path / "work")]  # kept: a run short of the goal keeps its own
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    earlier, line = out.read_text().splitlines()
    assert json.loads(earlier) == {"earlier": "run"}  # appended, not overwritten
    row = json.loads(line)
    for key, kind in REQUIRED.items():
        assert isinstance(row[key], kind), (key, row[key])
    assert row["restart_resume_s"] is None or row["restart_resume_s"] > 0
    assert row["events"] == 300 and row["clean_lost"] == 0  # the clean run is complete
    assert 0 <= row["lost"] <= 300 and 0 <= row["changed"] <= 300 - row["lost"]
    assert row["chaos_waits"][-1] in ("reached", "timeout", "stalled", "worker gave up")
    if row["chaos_waits"][-1] == "reached":  # the last wait is for every good event
        assert row["lost"] == 0
    assert row["duplicates_nonidentical"] <= row["duplicates"]
    # every user has a state after the clean run: compared, or missing after the chaos run
    assert row["states_compared"] + row["states_missing"] == 25
    assert row["goal_met"] == goal_met(row)
    # the fuzz sent is the seeded fuzz
    numbered = numbered_events([orjson.dumps(e) for e in events])
    _, mixed = mixed_stream(numbered, 2, fuzz_rate=0.1, seed=5)
    assert {k: c["sent"] for k, c in row["fuzz"].items()} == {
        k: sum(r.kind == k for r in mixed) for k in FUZZ_KINDS
    }
    assert row["fuzz_records"] == 30
    for counts in row["fuzz"].values():
        assert counts["dlq"] <= counts["sent"] and counts["predicted"] <= counts["sent"]
    assert "restart resume s" in result.output and "fuzz kind" in result.output  # the tables
