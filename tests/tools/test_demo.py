"""`sketchstream demo`: what it replays, how it sums up, and one real run on a tiny data set."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import typer
from sketchstream.models.events import EventTable, Head
from sketchstream.tools.demo_console import Console, LiveStats, status_line
from sketchstream.tools.demo_follow import Outcome
from sketchstream.tools.demo_plan import parse_history, plan_replay
from sketchstream.tools.demo_stages import (
    DemoModel,
    app_topics,
    demo_topics,
    find_artifact,
    has_recommender,
    recommend_summary,
    reusable,
)


def _table(ts, values=None, users=None) -> EventTable:
    n = len(ts)
    return EventTable(
        user=np.array(users or [f"u{i % 7}" for i in range(n)], dtype=object),
        item=np.array([f"i{i}" for i in range(n)], dtype=object),
        action=np.array(["rate"] * n, dtype=object),
        ts=np.asarray(ts, dtype=np.float64),
        value=np.asarray(values if values is not None else [5.0] * n, dtype=np.float32),
    )


LIKE = Head("like", ("rate",), threshold=4.0)
RETURN = Head("return", (), horizon=100.0)


def prediction(user="u", ts=1.0, scores=None, event_time=None, model="", item="i"):
    """A prediction record as the worker writes it (the fields the demo reads)."""
    return {
        "event": {"topic": "events", "partition": 0, "offset": 0, "event_id": None},
        "user": user,
        "item": item,
        "action": "rate",
        "scores": scores or {"like": 0.5},
        "event_ts": ts,
        "kafka_ts": event_time,
        "model_version": model,
    }


def add_one(stats, score, value, event_time, out_time, model=""):
    """One rated event's prediction of the ``like`` head."""
    stats.add(
        [prediction(scores={"like": score}, event_time=event_time, model=model)],
        [value],
        [out_time],
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the replay plan -------------------------------------------------------------------------


def test_the_live_part_starts_at_the_test_periods_first_second():
    plan = plan_replay(_table(np.arange(100) * 10.0))
    assert plan.live_from == 900.0  # row 90: the protocol's test period
    assert (plan.n_history, plan.n_live, plan.history_from, plan.live_to) == (90, 10, None, None)


def test_events_sharing_the_cut_off_second_are_replayed_live():
    ts = np.arange(100) * 10.0
    ts[88:92] = 885.0  # rows 88-91 share the second of the test period's first event
    plan = plan_replay(_table(ts))
    assert plan.live_from == 885.0
    assert (plan.n_history, plan.n_live) == (88, 12)
    assert plan.n_history + plan.n_live == 100


def test_events_limits_the_live_part_at_a_second_boundary():
    ts = np.arange(100) * 10.0
    ts[94:97] = 940.0
    plan = plan_replay(_table(ts), limit=5)
    assert plan.live_to == 940.0  # the 5th live event shares its second with the 6th and 7th
    assert plan.n_live == 4
    assert plan_replay(_table(np.arange(100) * 10.0), limit=500).live_to is None


def test_history_keeps_the_latest_events_before_the_test_period():
    events = _table(np.arange(100) * 10.0)
    plan = plan_replay(events, history=30)
    assert (plan.history_from, plan.n_history) == (600.0, 30)
    assert plan_replay(events, history=0).n_history == 0
    assert plan_replay(events, history=10_000).history_from is None


def test_the_plan_keeps_the_value_of_each_live_event():
    events = _table(np.arange(20) * 1.0, values=[5] * 18 + [3, np.nan])
    values = plan_replay(events).values
    assert list(values) == [("u4", "i18", 18.0), ("u5", "i19", 19.0)]
    assert values[("u4", "i18", 18.0)] == 3.0 and math.isnan(values[("u5", "i19", 19.0)])


def test_history_option_reads_all_none_or_a_count():
    assert parse_history("all") is None
    assert parse_history("none") == 0
    assert parse_history("200_000") == 200_000
    with pytest.raises(typer.BadParameter, match="--history"):
        parse_history("lots")


# --- the live summary ------------------------------------------------------------------------


def test_rolling_auc_covers_only_the_last_window():
    stats = LiveStats([LIKE], window=4, clock=FakeClock())
    for score, value in [(0.9, 1.0), (0.1, 5.0), (0.8, 2.0), (0.2, 4.0)]:
        add_one(stats, score, value, 1.0, 1.01)  # perfectly wrong
    for score, value in [(0.9, 5.0), (0.1, 1.0), (0.8, 4.0), (0.2, 3.0)]:
        add_one(stats, score, value, 1.0, 1.01)  # perfectly right
    assert stats.rolling()["heads"]["like"]["auc"] == 1.0
    assert stats.overall()["heads"]["like"]["auc"] == pytest.approx(0.5)


def test_unlabelled_predictions_count_but_stay_out_of_the_auc():
    stats = LiveStats([LIKE], clock=FakeClock())
    add_one(stats, 0.7, math.nan, None, 5.0, model="m1")
    overall = stats.overall()
    assert stats.count == 1 and overall["heads"]["like"]["labelled"] == 0
    assert (overall["p50"], overall["p99"]) == (None, None)
    assert math.isnan(overall["heads"]["like"]["auc"])
    assert stats.model_versions == {"m1": 1}


def test_a_return_head_is_labelled_by_the_users_next_prediction():
    stats = LiveStats([LIKE, RETURN], clock=FakeClock())
    batch = [
        prediction("a", 0.0, {"like": 0.5, "return": 0.9}),
        prediction("b", 1.0, {"like": 0.5, "return": 0.2}),
        prediction("a", 50.0, {"like": 0.5, "return": 0.5}),  # a came back: a's first is 1
        prediction("c", 200.0, {"like": 0.5, "return": 0.5}),  # closes b and a at 50: 0s
    ]
    stats.add(batch, [5.0] * 4, [1.0] * 4)
    ret = stats.overall()["heads"]["return"]
    assert (ret["auc"], ret["labelled"], ret["positives"], ret["pending"]) == (1.0, 3, 1, 1)
    line = status_line(stats, 4, 0, 1.0)
    assert "AUC like - (4) return 1.000 (3)" in line  # like: all positive, no AUC yet


def test_an_answer_is_a_hit_when_the_users_next_event_is_among_its_first_ten():
    stats = LiveStats([LIKE], clock=FakeClock())
    top = [f"i{k}" for k in range(12)]
    stats.answered([{"user": "a", "items": top}, {"user": "b", "items": top}])
    stats.answered([{"user": "c", "items": top}])
    events = [("a", "i3"), ("b", "i11"), ("a", "i4")]  # a: hit; b: 11th, a miss; a's 2nd: none
    stats.add([prediction(u, item=i) for u, i in events], [5.0] * 3, [1.0] * 3)
    rec = stats.overall()["recommend"]
    assert (stats.answers, rec["hr@10"], rec["resolved"], rec["pending"]) == (3, 0.5, 2, 1)
    line = status_line(stats, 3, 0, 1.0, requests=4)
    assert "HR@10 0.500 (2), answers 3/4" in line
    assert "HR@10" not in status_line(stats, 3, 0, 1.0)  # recommendations off


def test_latency_percentiles_are_over_the_predictions():
    stats = LiveStats([LIKE], clock=FakeClock())
    for ms in range(1, 101):
        add_one(stats, 0.5, 5.0, 10.0, 10.0 + ms / 1000)
    overall = stats.overall()
    assert overall["p50"] == pytest.approx(0.0505)
    assert overall["p99"] == pytest.approx(0.09901)


def test_the_live_rate_counts_arrivals_on_the_wall_clock():
    clock = FakeClock()
    stats = LiveStats([LIKE], clock=clock)
    assert stats.rate() == 0.0
    for _ in range(50):
        add_one(stats, 0.5, 5.0, 1.0, 1.1)
        clock.now += 0.01
    clock.now += 0.01
    assert stats.rate(over=5.0) == pytest.approx(50 / 0.51)


def test_the_mean_rate_spans_first_event_in_to_last_prediction_out():
    stats = LiveStats([LIKE], clock=FakeClock())
    for k in range(100):  # one event every 10 ms, each answered 50 ms later
        add_one(stats, 0.5, 5.0, 1000.0 + k / 100, 1000.05 + k / 100)
    assert stats.mean_rate() == pytest.approx(100 / 1.04)


def test_console_writes_plain_throttled_lines_when_not_a_terminal(capsys):
    console = Console(tty=False, every=60.0)
    console.status("first")
    console.status("too soon")
    console.status("last", force=True)
    console.status("last again", force=True)  # nothing held back since "last"
    out = capsys.readouterr().out
    assert out == "first\nlast\n"


def test_console_rewrites_one_line_on_a_terminal(capsys):
    console = Console(tty=True, every=0.0)
    console.status("a")
    console.status("b")
    console.say("done")
    assert capsys.readouterr().out == "\r\x1b[Ka\r\x1b[Kb\ndone\n"


# --- topics and artifacts --------------------------------------------------------------------


def test_demo_topics_are_prefixed_settings_topics():
    from sketchstream.stream.settings import Settings

    env = demo_topics(Settings(topic_events="ev"))
    assert env["SKETCHSTREAM_TOPIC_EVENTS"] == "demo.ev"
    assert env["SKETCHSTREAM_TOPIC_MODELS"] == "demo.sketchstream.models"
    assert env["SKETCHSTREAM_TOPIC_RECOMMEND"] == "demo.recommend"
    assert env["SKETCHSTREAM_TOPIC_RECOMMENDATIONS"] == "demo.recommendations"
    assert app_topics("a") == ["a-users-changelog", "a-__assignor-__leader"]


def manifest(root, version, created="2026-01-01", events=10, md5="abc", recommend=None):
    """A model artifact's manifest.json (the fields the demo reads) under ``root/version``."""
    (root / version).mkdir()
    config = {"data": {"events": events, "stream_md5": md5}}
    if recommend is not None:
        config["recommend"] = recommend
    text = json.dumps({"created": created, "config": config})
    (root / version / "manifest.json").write_text(text)


def test_find_artifact_picks_the_newest_trained_on_the_same_events(tmp_path):
    manifest(tmp_path, "old", "2026-01-01", 10, "abc")
    manifest(tmp_path, "new", "2026-02-01", 10, "abc")
    manifest(tmp_path, "other", "2026-03-01", 10, "def")
    assert find_artifact(tmp_path, 10, "abc") == ["new", "old"]
    assert find_artifact(tmp_path, 11, "abc") == []
    assert find_artifact(tmp_path / "missing", 10, "abc") == []


def test_a_cached_model_with_a_recommender_is_reused_before_a_newer_one_without(
    tmp_path, monkeypatch
):
    refused = {"broken"}
    monkeypatch.setattr(
        "sketchstream.tools.demo_stages.refusal",
        lambda path: "unreadable" if path.name in refused else None,
    )
    manifest(tmp_path, "plain")
    manifest(tmp_path, "broken", recommend={"items": 80})
    manifest(tmp_path, "with", recommend={"items": 80})
    assert [has_recommender(tmp_path / v) for v in ("plain", "with")] == [False, True]
    console = Console(tty=False)
    assert reusable(tmp_path, ["plain", "broken", "with"], console) == "with"
    # only models without one: the newest served one, recommendations off
    assert reusable(tmp_path, ["broken", "plain"], console) == "plain"
    assert reusable(tmp_path, ["broken"], console) is None


def test_the_summary_says_why_recommendations_are_off():
    off = DemoModel("v1", [LIKE], {}, None, "model v1 has no recommender")
    stats = LiveStats([LIKE], clock=FakeClock())
    figures = stats.overall()["recommend"]
    rows = recommend_summary(Outcome(stats), figures, off)
    assert rows == [("recommendations", "off: model v1 has no recommender")]
    on = DemoModel("v2", [LIKE], {}, 0.25, None)
    stats.answered([{"user": "a", "items": ["i"]}])
    rows = recommend_summary(Outcome(stats, requests=2), stats.overall()["recommend"], on)
    assert rows[0][1].startswith("1 answers to 2 requests")
    assert rows[1] == (
        "HR@10",
        "- over 0 answers judged, 1 awaiting the user's next event; offline test 0.2500",
    )


# --- a real run --------------------------------------------------------------------------------


def summary_rows(out: str) -> dict[str, str]:
    """The rows of the demo's summary table in its output: ``{name: value}``."""
    assert "sketchstream demo: summary\n" in out, out
    table = out.split("sketchstream demo: summary\n")[1]
    rows = itertools.takewhile(lambda line: line.startswith("  "), table.splitlines())
    return dict(re.split(r" {2,}", line.strip(), maxsplit=1) for line in rows)


@pytest.fixture
def tiny_data(make_ratings) -> Path:
    """3,000 ratings of 60 users on 80 items in two taste groups, one every minute."""
    return make_ratings(3000, users=60, items=80, every_s=60)


@pytest.mark.kafka
@pytest.mark.slow
def test_demo_runs_end_to_end_and_cleans_up(tmp_path, tiny_data, kafka_settings):
    """Train, serve, replay and sum up on a tiny data set against the real broker; the demo's
    topics are gone afterwards and its output carries no terminal control characters."""
    suffix = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "SKETCHSTREAM_KAFKA": kafka_settings.bootstrap_servers,
        "SKETCHSTREAM_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "SKETCHSTREAM_PARTITIONS": "2",
        **{
            f"SKETCHSTREAM_TOPIC_{name}": f"{default}-{suffix}"
            for name, default in [
                ("EVENTS", "events"),
                ("PREDICTIONS", "predictions"),
                ("DLQ", "events.dlq"),
                ("RECOMMEND", "recommend"),
                ("RECOMMENDATIONS", "recommendations"),
                ("MODELS", "models"),
            ]
        },
        "OMP_NUM_THREADS": "1",
    }
    app_id = f"demo-test-{suffix}"
    argv = [
        *[sys.executable, "-c", "from sketchstream.tools.cli import main; main()"],
        # paced (a user's live events come 1.2 s apart): at full speed every event is in
        # before the first answer, and no answer has a next event to be judged by
        *["demo", "--data", str(tiny_data), "--history", "all", "--rate", "50", "--recommender"],
        *["--workdir", str(tmp_path / "work"), "--app-id", app_id, "--timeout", "120"],
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    summary = summary_rows(out)
    assert summary["predictions"] == "300"  # the test period: the last 10 % of 3,000
    assert summary["history"].startswith("2,700 events")
    assert " over 300 labels; offline test " in summary["AUC (like)"]
    # every live event but each user's last comes back within the horizon (one a minute)
    assert summary["AUC (return)"].startswith("- over 240 labels, 60 awaiting their horizon;")
    # the user of every 10th prediction asked for a top 10, each request answered, and the
    # answers judged by those users' next events (a hit rate, not "-")
    assert summary["recommendations"].startswith("30 answers to 30 requests"), out
    hits = re.fullmatch(
        r"(\d\.\d{4}) over (\d+) answers judged.*; offline test \d\.\d{4}", summary["HR@10"]
    )
    assert hits is not None and 0 < int(hits[2]) <= 30, summary["HR@10"]
    assert "\x1b" not in done.stdout and "\r" not in done.stdout
    assert (tmp_path / "work" / "worker.log").is_file()

    async def topics_left() -> list[str]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**kafka_settings.client_kwargs())
        await admin.start()
        try:
            return [t for t in await admin.list_topics() if suffix in t]
        finally:
            await admin.close()

    assert asyncio.run(topics_left()) == []


def test_the_offline_hr10_comes_from_the_model_itself_else_from_its_report(tmp_path):
    from sketchstream.tools.demo_stages import _offline_hr10

    def block(hr):
        return {"test": {"sketchstream": {"hr@10": hr, "ndcg@10": 0.0, "mrr": 0.0}}}

    for version, config in (("own", {"recommend_figures": block(0.25)}), ("old", {})):
        (tmp_path / version).mkdir()
        (tmp_path / version / "manifest.json").write_text(json.dumps({"config": config}))
    (tmp_path / "report").mkdir()
    report = {"model": {"version": "old"}, "recommend": block(0.125)}
    (tmp_path / "report" / "report.json").write_text(json.dumps(report))
    assert _offline_hr10(tmp_path, "own") == 0.25  # its manifest, not the report of another
    assert _offline_hr10(tmp_path, "old") == 0.125  # an older artifact: its report
    report["model"]["version"] = "newer"
    (tmp_path / "report" / "report.json").write_text(json.dumps(report))
    assert _offline_hr10(tmp_path, "old") is None  # the report is another model's
