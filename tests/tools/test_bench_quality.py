"""`sketchstream bench quality`: one data set end to end on a tiny generated set, the paired
user bootstrap, and the command's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sketchstream.tools.bench_quality import HELD_OUT, quality_table, run_dataset, train_config
from sketchstream.tools.cli import app
from sketchstream.tools.datasets import CATALOGUE
from sketchstream.tools.report import paired_user_bootstrap
from typer.testing import CliRunner

torch.set_num_threads(1)

KEYS = {
    "dataset",
    "events",
    "auc",
    "rce",
    "best_baseline",
    "best_baseline_auc",
    "best_baseline_rce",
    "auc_diff_ci95",
}


_TINY = {"epochs": 2, "hidden": 16, "depth": 4, "width": 8}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """1,500 ratings, 40 users who like one parity of 40 items."""
    from sketchstream.models.events import EventTable, Item, write_events, write_items

    rng = np.random.default_rng(0)
    user, item = rng.integers(0, 40, 1500), rng.integers(0, 40, 1500)
    liked = (user % 2 == item % 2) ^ (rng.random(1500) < 0.2)
    data = tmp_path_factory.mktemp("data")
    write_events(
        data / "events.jsonl",
        EventTable(
            user=np.array([f"u{u}" for u in user], dtype=object),
            item=np.array([f"i{i}" for i in item], dtype=object),
            action=np.full(1500, "rate", dtype=object),
            ts=np.arange(1500, dtype=np.float64) * 6 * 3600,  # gaps of days: returns both ways
            value=np.where(liked, 5, 2).astype(np.float32),
        ),
    )
    write_items(data / "items.jsonl", [Item(f"i{i}", categories=(f"g{i % 2}",)) for i in range(40)])
    return data


@pytest.fixture(scope="module")
def row(tiny_data, tmp_path_factory):
    """One tiny run for the module."""
    config = train_config(_TINY)
    return run_dataset("tiny", tiny_data, tmp_path_factory.mktemp("bench"), config, draws=60)


def test_a_row_has_the_figures_the_issue_asks_for(row) -> None:
    assert set(row) >= KEYS
    assert row["dataset"] == "tiny" and row["events"] == 1500 and not row["held_out"]
    assert row["best_baseline"] in row["baselines"]
    # the best baseline of the primary head (like); the return head is compared apart
    like = [b["auc"] for name, b in row["baselines"].items() if name.endswith("/like")]
    assert row["best_baseline_auc"] == max(like)
    assert row["heads"] == ["like:rate>=4", "return:next<=7d"]
    assert row["config"]["item_codes"] == "auto" and row["item_codes"] in ("on", "off")
    assert set(row["return"]) == {
        *("head", "auc", "rce", "recency_gbdt_auc", "recency_gbdt_rce"),
        *("auc_diff", "auc_diff_ci95", "boost"),
    }
    # the trees train tried on the return head (the default boost), and the weight it chose
    assert set(row["return"]["boost"]) == {"weight", "rounds", "val_auc_mlp", "val_auc"}
    json.dumps(row)  # one JSON line


def test_a_run_evaluates_the_model_it_trained_when_its_version_is_already_stored(
    tiny_data, tmp_path
) -> None:
    """The same seed trains the same version again; the store's newest is then another seed's
    model, and the figures must still be this run's (they once were the newest's)."""
    runs = [
        run_dataset("tiny", tiny_data, tmp_path, train_config({**_TINY, "seed": s}), draws=20)
        for s in (0, 1, 0)
    ]
    assert runs[0]["model"] == runs[2]["model"] != runs[1]["model"]
    assert runs[2]["auc"] == runs[0]["auc"] != runs[1]["auc"]


def test_the_interval_brackets_the_difference_of_the_reported_aucs(row) -> None:
    low, high = row["auc_diff_ci95"]
    assert row["auc_diff"] == pytest.approx(row["auc"] - row["best_baseline_auc"], abs=1e-9)
    assert low < row["auc_diff"] < high
    assert high - low < 0.5
    ret = row["return"]  # the return head against its recency GBDT, the same way
    low, high = ret["auc_diff_ci95"]
    assert ret["auc_diff"] == pytest.approx(ret["auc"] - ret["recency_gbdt_auc"], abs=1e-9)
    assert low <= ret["auc_diff"] <= high


def test_the_table_marks_the_held_out_set() -> None:
    base = {"events": 10, "auc": 0.8, "rce": 20.0, "best_baseline": "counts_gbdt"}
    base |= {"best_baseline_auc": 0.79, "best_baseline_rce": 19.0, "auc_diff": 0.01}
    rows = [
        {**base, "dataset": "ml-100k", "held_out": False, "auc_diff_ci95": [0.001, 0.02]},
        {**base, "dataset": HELD_OUT, "held_out": True, "auc_diff_ci95": [-0.01, 0.03]},
    ]
    rows[1]["return"] = {"auc": 0.81, "recency_gbdt_auc": 0.8, "auc_diff_ci95": [-0.02, 0.04]}
    lines = quality_table(rows).splitlines()
    assert lines[-1].split()[:3] == [HELD_OUT, "(held", "out)"]
    assert lines[-1].endswith("0.8100 / 0.8000 [-0.0200, +0.0400]") and lines[2].endswith("-")
    assert "+0.0100 [+0.0010, +0.0200]" in lines[2]
    assert HELD_OUT in CATALOGUE


def test_bootstrap_of_identical_scores_is_zero() -> None:
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 300).astype(float), rng.random(300)
    assert paired_user_bootstrap(y, p, p, rng.integers(0, 30, 300), draws=20) == (0.0, 0.0, 0.0)


def test_bootstrap_resamples_whole_users() -> None:
    """A better score on every user: the interval is above zero. Resampling users, not events,
    widens it when one user carries the whole gain."""
    rng = np.random.default_rng(2)
    n = 2000
    y = rng.integers(0, 2, n).astype(float)
    users = np.arange(n) % 40
    noise = rng.random(n)
    good = 0.6 * y + noise
    diff, low, high = paired_user_bootstrap(y, good, noise, users, draws=100)
    assert 0 < low < diff < high
    one_user = np.where(users == 0, y + noise, noise)  # only user 0's events are well ranked
    _, low_u, high_u = paired_user_bootstrap(y, one_user, noise, users, draws=100)
    _, low_e, high_e = paired_user_bootstrap(y, one_user, noise, np.arange(n), draws=100)
    assert high_u - low_u > high_e - low_e


def test_bootstrap_drops_unlabelled_rows() -> None:
    y = np.array([1.0, 0.0, np.nan, 1.0, 0.0])
    p = np.array([0.9, 0.1, 0.5, 0.8, 0.2])
    assert paired_user_bootstrap(y, p, 1 - p, np.arange(5), draws=10)[0] == 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--datasets", "ml-10m"], "unknown data set"),
        (["--config", "nope=1"], "KEY one of"),
        (["--config", "lr=fast"], "'fast' is not a float"),
    ],
)
def test_the_command_refuses_bad_options_in_one_line(tmp_path, args, message) -> None:
    result = CliRunner().invoke(
        app, ["bench", "quality", "--out", str(tmp_path), *args], env={"COLUMNS": "400"}
    )
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
