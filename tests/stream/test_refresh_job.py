"""The refresh job without a broker: window parsing, the scheduler, housekeeping, and whole
runs on an events file (``--data``, ``--no-announce``) through the command."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Container

import numpy as np
import orjson
import pytest
import typer
from sketchstream.models.artifacts import ArtifactStore
from sketchstream.stream.errors import ConfigError
from sketchstream.stream.refresh import RefreshJob, RefreshOptions, next_start, run_every
from sketchstream.stream.window import (
    TimeWindow,
    decode_event_values,
    parse_duration,
    parse_time,
    resolve_window,
)
from sketchstream.tools.refresh import refresh
from typer.testing import CliRunner

# --- window parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30d", 30 * 86400),
        ("12h", 12 * 3600),
        ("5m", 300),
        ("45s", 45),
        ("2w", 14 * 86400),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("90", 90),
        (" 7D ", 7 * 86400),
    ],
)
def test_durations_parse_with_units(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "30x", "h12", "1h 30", "-5m", "inf", "3 days"])
def test_bad_durations_name_the_text_and_the_format(text):
    with pytest.raises(ConfigError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        ("2024-05-01", 1714521600.0),
        ("2024-05-01T00:00:00Z", 1714521600.0),
        ("2024-05-01T02:00:00+02:00", 1714521600.0),
        ("2024-05-01 12:30", 1714566600.0),
        ("1714521600", 1714521600.0),
        ("now", 2e9),
        ("now-12h", 2e9 - 43200),
    ],
)
def test_times_parse_from_iso_epoch_and_now(text, epoch):
    assert parse_time(text, now=2e9) == epoch


def test_a_bad_time_says_what_is_expected():
    with pytest.raises(ConfigError, match="ISO 8601"):
        parse_time("yesterday")


def test_window_ends_now_or_at_until_and_reaches_back_by_its_duration():
    assert resolve_window("30d", now=2e9) == TimeWindow(2e9 - 30 * 86400, None)
    assert resolve_window("12h", until="1714521600", now=2e9) == TimeWindow(
        1714521600 - 43200, 1714521600
    )
    assert resolve_window("1d", anchor=1e9) == TimeWindow(1e9 - 86400, None)
    assert resolve_window(since="2024-05-01", until="2024-05-02") == TimeWindow(
        1714521600, 1714608000
    )
    assert resolve_window() == TimeWindow(None, None)


def test_window_and_since_together_are_refused():
    with pytest.raises(ConfigError, match="not both"):
        resolve_window("30d", since="2024-05-01")


def test_an_empty_window_is_refused():
    with pytest.raises(ConfigError, match="empty window"):
        resolve_window(since="2024-05-02", until="2024-05-01")


def test_records_that_are_not_events_are_skipped_and_counted():
    good = orjson.dumps({"user": "u", "item": "i", "action": "rate", "ts": 1.0, "value": 4})
    table, skipped = decode_event_values(
        [good, b"{not json", None, orjson.dumps({"user": "u", "ts": 1.0}), good]
    )
    assert len(table) == 2 and skipped == 3
    assert table.value.tolist() == [4.0, 4.0]


# --- scheduling ------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that a stop event's waits advance (no real sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeStop(threading.Event):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        self.clock.now += timeout or 0.0
        return self.is_set()


class FakeJob:
    """A job on the fake clock: records when each run starts; run ``k`` (from 1) takes
    ``seconds(k)`` and raises when ``k`` is in ``fails``, else returns ``"ok"``."""

    def __init__(
        self, clock: FakeClock, seconds: Callable[[int], float], fails: Container[int] = ()
    ) -> None:
        self.clock, self.seconds, self.fails = clock, seconds, fails
        self.starts: list[float] = []

    def __call__(self) -> str:
        self.starts.append(self.clock.now)
        self.clock.now += self.seconds(len(self.starts))
        if len(self.starts) in self.fails:
            raise RuntimeError("the broker went away")
        return "ok"


def test_the_schedule_goes_on_after_a_failed_run():
    clock = FakeClock()
    job = FakeJob(clock, lambda _run: 10.0, fails={2})
    results: list[str] = []
    runs = run_every(
        job, 60.0, stop=FakeStop(clock), clock=clock, max_runs=4, on_result=results.append
    )
    assert runs == 4
    assert job.starts == [1000.0, 1060.0, 1120.0, 1180.0]  # on the cadence, failure or not
    assert results == ["ok", "ok", "ok"]


def test_runs_never_overlap_and_an_overrun_skips_past_slots():
    clock = FakeClock()
    job = FakeJob(clock, lambda run: 150.0 if run == 1 else 1.0)  # the first overruns 2 slots
    run_every(job, 60.0, stop=FakeStop(clock), clock=clock, max_runs=3)
    assert job.starts == [1000.0, 1180.0, 1240.0]


def test_jittered_starts_stay_within_the_jitter_after_their_slot():
    rng = random.Random(7)
    starts = []
    for _ in range(500):
        slot, start, skipped = next_start(0.0, 3600.0, 300.0, now=10.0, rng=rng)
        assert slot == 3600.0 and skipped == 0
        assert 3600.0 <= start <= 3900.0
        starts.append(start - slot)
    assert max(starts) - min(starts) > 200  # it does spread them


def test_the_first_run_is_jittered_too_and_the_stop_event_ends_the_schedule():
    clock = FakeClock()
    stop = FakeStop(clock)

    def job() -> None:
        stop.set()  # SIGTERM arrives during the run: it finishes, no next one

    runs = run_every(job, 60.0, jitter=30.0, stop=stop, clock=clock, rng=random.Random(1))
    assert runs == 1
    assert 0.0 <= stop.waits[0] <= 30.0


# --- whole runs on a file, through the command ------------------------------------------------


def learnable_events(n: int, *, users: int = 40, items: int = 60, seed: int = 0):
    """Canonical event dicts whose ratings follow item quality and user bias, in time order."""
    rng = np.random.default_rng(seed)
    quality = rng.uniform(1.0, 5.0, items)
    bias = rng.normal(0.0, 0.7, users)
    ts = 1.7e9 + np.cumsum(rng.exponential(300.0, n))
    out = []
    for k in range(n):
        u, i = int(rng.integers(0, users)), int(min(rng.zipf(1.3) - 1, items - 1))
        event = {"user": f"u{u}", "item": f"i{i}", "ts": float(ts[k])}
        if rng.random() < 0.7:
            v = quality[i] + bias[u] + rng.normal(0, 0.6)
            event |= {"action": "rate", "value": int(np.clip(np.round(v), 1, 5))}
        else:
            event["action"] = "view" if rng.random() < 0.5 else "like"
        out.append(event)
    return out


def write_events(folder, events) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "events.jsonl").write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")


def cli(*args: str):
    app = typer.Typer()
    app.command()(refresh)
    result = CliRunner().invoke(app, list(args))
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return result.exit_code, (orjson.loads(lines[-1]) if lines else None), result


TINY_FLAGS = ("--no-announce", "--json", "--epochs", "3", "--set", "hidden=64", "--set", "blocks=1")
TINY_FLAGS += ("--set", "depth=8", "--set", "width=16", "--set", "batch_size=128")
# One MLP fit, with the item codes: the worse-candidate test shuffles the labels the item
# snapshot is built from, so a serving model must know its items by their codes to stay good
TINY_FLAGS += ("--set", "item_codes=on")


def test_a_file_refresh_publishes_then_refuses_a_worse_candidate_and_says_why(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("SKETCHSTREAM_DATA_DIR", str(tmp_path / "nodata"))
    store = tmp_path / "store"
    events = learnable_events(2500)
    write_events(tmp_path / "good", events)

    code, first, result = cli(
        "--data", str(tmp_path / "good"), "--artifact-dir", str(store), *TINY_FLAGS
    )
    assert code == 0, result.output
    assert first["status"] == "published"
    assert "no serving model" in first["reason"]
    assert ArtifactStore(store).versions() == [first["version"]]
    assert set(first["timings"]) >= {"read", "graph_cleora", "emde", "replay", "train"}
    assert set(first["timings"]) >= {"evaluate", "publish", "total"}

    # the same window with every label before the holdout shuffled: a worse model
    hold_start = len(events) * 9 // 10
    rated = [k for k in range(hold_start) if "value" in events[k]]
    shuffled = [dict(e) for e in events]
    for k, src in zip(rated, np.random.default_rng(1).permutation(rated), strict=True):
        shuffled[k]["value"] = events[src]["value"]
    write_events(tmp_path / "noisy", shuffled)

    code, second, result = cli(
        "--data", str(tmp_path / "noisy"), "--artifact-dir", str(store), *TINY_FLAGS
    )
    assert code == 3, result.output
    assert second["status"] == "rejected"
    assert second["serving_version"] == first["version"]
    assert f"worse than serving {first['version']}" in second["reason"]
    assert "head like: AUC" in second["reason"]
    assert ArtifactStore(store).versions() == [first["version"]]  # nothing new in the store


def test_housekeeping_keeps_n_versions_and_never_the_served_one(tmp_path, monkeypatch):
    from kafka_harness import build_tiny_artifact

    monkeypatch.setenv("SKETCHSTREAM_DATA_DIR", str(tmp_path / "nodata"))
    store = ArtifactStore(tmp_path / "store")
    made = []
    for seed in range(4):
        made.append(build_tiny_artifact(store.root, seed=seed))
    served = made[0]  # the oldest: what the workers were told to serve
    write_events(tmp_path / "data", learnable_events(1500))

    from sketchstream.stream.refresh import ServingInfo
    from sketchstream.stream.settings import Settings

    job = RefreshJob(
        Settings(artifact_dir=store.root),
        RefreshOptions(
            data=tmp_path / "data", announce=False, keep=2, overrides={"epochs": 2}, force=True
        ),
    )
    job.serving = lambda: ServingInfo(served, store.root / served, "topic")
    summary = job.run_once()
    assert summary.status == "published", summary.reason
    kept = store.versions()
    assert summary.version in kept and served in kept
    assert len(kept) == 3  # keep 2 (the new one and the newest before it) + the served one
    assert set(summary.pruned) == set(made) - set(kept)


def test_a_second_job_on_the_same_store_skips_its_run(tmp_path):
    from sketchstream.stream.settings import Settings

    job = RefreshJob(Settings(artifact_dir=tmp_path), RefreshOptions(announce=False))
    other = RefreshJob(Settings(artifact_dir=tmp_path), RefreshOptions(announce=False))
    with job._lock() as held:
        assert held
        summary = other.run_once()
    assert summary.status == "skipped" and "one run at a time" in summary.reason


def test_a_refresh_keeps_the_heads_of_the_model_it_serves(tmp_path, monkeypatch):
    monkeypatch.setenv("SKETCHSTREAM_DATA_DIR", str(tmp_path / "nodata"))
    store = tmp_path / "store"
    write_events(tmp_path / "data", learnable_events(2500))
    base = ("--data", str(tmp_path / "data"), "--artifact-dir", str(store), *TINY_FLAGS)

    code, first, result = cli(*base, "--head", "top:rate>=5", "--force")
    assert code == 0, result.output
    served = ArtifactStore(store).path(first["version"])
    assert [
        h["name"]
        for h in orjson.loads((served / "manifest.json").read_bytes())["config"]["head_defs"]
    ] == ["top"]

    # no --head: the candidate predicts what is served, and the gate compares that head
    code, second, result = cli(*base, "--force")
    assert code == 0, result.output
    assert set(second["gate"]["heads"]) == {"top"}

    code, _, result = cli(*base, "--head", "top:rate>>5")
    assert code == 2
    assert "rate>>5" in result.output


def test_a_refresh_over_a_model_with_a_recommender_publishes_one_with_a_recommender(
    tmp_path, monkeypatch
):
    from sketchstream.models.artifacts import load_model_artifact
    from sketchstream.models.events import DEFAULT_HEADS
    from sketchstream.models.recommend import RecommendConfig
    from sketchstream.models.trainer import TrainConfig
    from sketchstream.tools.train import train_model

    monkeypatch.setenv("SKETCHSTREAM_DATA_DIR", str(tmp_path / "nodata"))
    store = tmp_path / "store"
    write_events(tmp_path / "data", learnable_events(2500))
    tiny = TrainConfig(epochs=3, hidden=64, blocks=1, depth=8, width=16, batch_size=128)
    served, _ = train_model(
        tmp_path / "data",
        store,
        tiny,
        heads=DEFAULT_HEADS,
        baselines=False,
        progress=False,
        recommender=True,
        recommender_config=RecommendConfig(epochs=2, hidden=48),
    )
    assert load_model_artifact(store / served).recommender.config.hidden == 48

    code, run, result = cli(
        "--data", str(tmp_path / "data"), "--artifact-dir", str(store), *TINY_FLAGS, "--force"
    )
    assert code == 0, result.output
    assert run["status"] == "published" and run["version"] != served
    assert "recommender" in run["timings"] and "evaluate_recommender" in run["timings"]
    # the gate judged the recommendations too: both HR@10 on the same holdout
    judged = run["gate"]["recommend"]
    assert 0 <= judged["candidate"] <= 1 and 0 <= judged["serving"] <= 1, judged
    assert judged["tolerance"] == 0.005
    refreshed = load_model_artifact(ArtifactStore(store).path(run["version"]))
    assert refreshed.recommender is not None
    assert len(refreshed.recommender.catalogue) > 0
    # retrained in the served recommender's shape, not the defaults
    assert (refreshed.recommender.config.epochs, refreshed.recommender.config.hidden) == (2, 48)
