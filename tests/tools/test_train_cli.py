"""`sketchstream train` and `sketchstream evaluate` end to end on a tiny synthetic data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from sketchstream.tools import evaluate, train
from typer.testing import CliRunner

torch.set_num_threads(1)


@pytest.fixture
def data_dir(make_ratings):
    """600 ratings of 30 users on 40 items in 2 taste groups; items 0-19 carry metadata."""
    return make_ratings(600, users=30, items=40, every_s=3600, with_metadata=20, years=True)


def _app():
    app = typer.Typer()
    app.command("train")(train.train)
    app.command("evaluate")(evaluate.evaluate)
    return app


SMALL = [
    "--epochs",
    "2",
    "--hidden",
    "16",
    "--depth",
    "4",
    "--width",
    "8",
    "--no-baselines",
    "--no-progress",
    "--threads",
    "1",
]


def _evaluate_args(data: Path, model: Path, out: Path) -> list[str]:
    """``sketchstream evaluate`` on one thread, without baselines or progress."""
    return [
        "evaluate",
        *("--data", str(data), "--model", str(model), "--out", str(out)),
        *("--no-baselines", "--no-progress", "--threads", "1"),
    ]


def test_train_then_evaluate_writes_artifact_and_reports(tmp_path, data_dir):
    runner = CliRunner()
    out = tmp_path / "model"
    result = runner.invoke(_app(), ["train", "--data", str(data_dir), "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    versions = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    assert len(versions) == 1
    manifest = json.loads((versions[0] / "manifest.json").read_text())
    assert set(manifest["codebooks"]) == {"interactions", "metadata"}
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["test"]) >= {"auc", "ap", "logloss", "rce"}
    for name in ("report.md", "roc.png", "calibration.png", "scores.png"):
        assert (out / "report" / name).is_file()

    ev_out = tmp_path / "eval"
    result = runner.invoke(_app(), _evaluate_args(data_dir, out, ev_out))
    assert result.exit_code == 0, result.output
    again = json.loads((ev_out / "report.json").read_text())
    # evaluate replays with the artifact's codebooks and weights: the same figures as train's
    assert again["test"]["auc"] == pytest.approx(report["test"]["auc"], abs=1e-6)
    assert again["val"]["logloss"] == pytest.approx(report["val"]["logloss"], abs=1e-6)

    # a tampered artifact is refused with a message naming the file
    weights = versions[0] / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    result = runner.invoke(_app(), _evaluate_args(data_dir, versions[0], tmp_path / "e"))
    assert result.exit_code == 1
    assert "weights.safetensors" in result.output and "checksum" in result.output


def test_train_works_without_item_metadata(tmp_path, data_dir):
    (data_dir / "items.jsonl").unlink()
    out = tmp_path / "model"
    result = CliRunner().invoke(
        _app(), ["train", "--data", str(data_dir), "--out", str(out), *SMALL]
    )
    assert result.exit_code == 0, result.output
    (version,) = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    assert set(json.loads((version / "manifest.json").read_text())["codebooks"]) == {"interactions"}


def test_a_teacher_trains_first_and_the_served_mlp_has_the_hidden_width(tmp_path, data_dir):
    """``--teacher-hidden``: the artifact holds the ``--hidden`` MLP, taught by the wider one
    whose validation checks come first in the history; evaluate reproduces train's figures."""
    out = tmp_path / "model"
    args = ["train", "--data", str(data_dir), "--out", str(out), *SMALL, "--teacher-hidden", "32"]
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    (version,) = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    config = json.loads((version / "manifest.json").read_text())["config"]
    assert config["mlp"]["hidden"] == 16
    assert config["train"]["teacher_hidden"] == 32 and config["train"]["distill_weight"] == 0.5
    teacher = [h.get("teacher", False) for h in config["history"]]
    assert teacher[0] and not teacher[-1] and teacher == sorted(teacher, reverse=True)
    report = json.loads((out / "report" / "report.json").read_text())
    result = CliRunner().invoke(_app(), _evaluate_args(data_dir, out, tmp_path / "eval"))
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert again["test"]["auc"] == pytest.approx(report["test"]["auc"], abs=1e-6)


def _as_purchases(data_dir):
    """The fixture's ratings as implicit "purchase" events, value 1 for a rating >= 4."""
    import numpy as np
    from sketchstream.models.events import EventTable, read_events, write_events

    events = read_events(data_dir / "events.jsonl")
    write_events(
        data_dir / "events.jsonl",
        EventTable(
            user=events.user,
            item=events.item,
            action=np.full(len(events), "purchase", dtype=object),
            ts=events.ts,
            value=(events.value >= 4).astype(np.float32),
        ),
    )
    return data_dir


def test_a_head_from_the_command_line_is_recorded_and_used_by_evaluate(tmp_path, data_dir):
    data = _as_purchases(data_dir)
    out, runner = tmp_path / "model", CliRunner()
    result = runner.invoke(
        _app(),
        ["train", "--data", str(data), "--out", str(out), "--head", "buy:purchase>=1", *SMALL],
    )
    assert result.exit_code == 0, result.output
    assert "heads buy:purchase>=1" in result.output
    (version,) = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["config"]["head_defs"] == [
        {"name": "buy", "actions": ["purchase"], "threshold": 1.0, "applies_to": None}
    ]
    result = runner.invoke(
        _app(),
        ["evaluate", "--data", str(data), "--model", str(out), "--out", str(tmp_path / "e"),
         "--no-progress", "--threads", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert list(report["heads"]) == ["buy"]
    assert report["test"]["n"] > 0 and "counts_gbdt" in report["baselines"]


def test_a_return_head_is_trained_served_and_compared_with_its_own_baseline(tmp_path, data_dir):
    out, runner = tmp_path / "model", CliRunner()
    heads = ["--head", "like:rate>=4", "--head", "back:next<=1d"]
    result = runner.invoke(
        _app(), ["train", "--data", str(data_dir), "--out", str(out), *heads, *SMALL]
    )
    assert result.exit_code == 0, result.output
    assert "heads like:rate>=4 back:next<=1d" in result.output
    (version,) = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    config = json.loads((version / "manifest.json").read_text())["config"]
    assert config["head_defs"][1] == {
        "name": "back", "actions": [], "threshold": None, "applies_to": None, "horizon": 86400.0
    }  # fmt: skip
    # a day's activity for the return head; item statistics of the engagement head only
    channels = [c["name"] for c in config["aggregator"]["channels"]]
    assert channels[-1] == "activity_1d"
    assert "global_rate_back" not in json.dumps(config) and "rate_back" not in json.dumps(config)
    # trees tried on the return head (--boost's default), kept only at a weight above 0
    fit = json.loads((out / "report" / "report.json").read_text())["boost"]
    assert list(fit) == ["back"] and 0.0 <= fit["back"]["weight"] <= 1.0
    kept = {"back": {"weight": fit["back"]["weight"], "rounds": fit["back"]["rounds"]}}
    assert config.get("boost") == (kept if fit["back"]["weight"] > 0 else None)
    assert (version / "boost.json").is_file() == (fit["back"]["weight"] > 0)
    with_baselines = [
        a for a in _evaluate_args(data_dir, out, tmp_path / "e") if a != "--no-baselines"
    ]
    result = runner.invoke(_app(), with_baselines)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert list(report["heads"]) == ["like", "back"]
    assert report["heads"]["back"]["test"]["n"] > 0
    assert 0 < report["heads"]["back"]["test"]["auc"] < 1
    # evaluate scores the return head as train did, its trees (if kept) included
    trained = json.loads((out / "report" / "report.json").read_text())["heads"]["back"]
    assert report["heads"]["back"]["test"]["auc"] == pytest.approx(trained["test"]["auc"], abs=1e-6)
    assert {"recency_gbdt/back", "counts_cf_gbdt/like"} <= set(report["baselines"])
    assert "counts_gbdt/back" not in report["baselines"]


def test_the_default_heads_add_return_within_7_days_to_the_data_sets(tmp_path, data_dir):
    from sketchstream.models.events import RETURN_HEAD, parse_head

    like = parse_head("like:rate>=4")
    assert evaluate.data_heads(data_dir, None) == (like, RETURN_HEAD)
    (data_dir / "MANIFEST.json").write_text(json.dumps({"heads": ["buy:purchase>=1"]}))
    assert evaluate.data_heads(data_dir, None)[1:] == (RETURN_HEAD,)
    assert evaluate.data_heads(data_dir, ["like:rate>=4"]) == (like,)


def test_train_takes_the_heads_the_data_manifest_recommends(tmp_path, data_dir):
    data = _as_purchases(data_dir)
    (data / "MANIFEST.json").write_text(json.dumps({"heads": ["buy:purchase>=1"]}))
    out = tmp_path / "model"
    result = CliRunner().invoke(_app(), ["train", "--data", str(data), "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert "heads buy:purchase>=1" in result.output


def test_a_bad_head_is_a_usage_error_naming_the_syntax(tmp_path, data_dir):
    result = CliRunner().invoke(
        _app(),
        ["train", "--data", str(data_dir), "--out", str(tmp_path / "m"), "--head", "like>=4"],
    )
    assert result.exit_code == 2
    assert "NAME:ACTION" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_data_folder_without_events_gets_one_line(tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--model", str(empty)] if command == "evaluate" else []
    result = CliRunner().invoke(
        _app(), [command, "--data", str(empty), "--out", str(tmp_path / "o"), *args]
    )
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    if command == "train":
        assert "no events.jsonl" in result.output and "sketchstream data import" in result.output


def test_events_out_of_protocol_order_are_refused_before_any_work(tmp_path, data_dir):
    lines = (data_dir / "events.jsonl").read_text().splitlines(keepends=True)
    lines[4], lines[5] = lines[5], lines[4]  # ts ascends by an hour per event
    (data_dir / "events.jsonl").write_text("".join(lines))
    out = tmp_path / "model"
    result = CliRunner().invoke(_app(), ["train", "--data", str(data_dir), "--out", str(out)])
    assert result.exit_code == 1
    assert "line 6 comes before the line above it" in result.output
    assert f"sketchstream data import {data_dir / 'events.jsonl'}" in result.output
    assert not out.exists()


def test_evaluate_recommend_adds_the_ranking_block_and_refuses_unknown_methods(
    tmp_path, data_dir
) -> None:
    runner = CliRunner()
    out = tmp_path / "model"
    result = runner.invoke(_app(), ["train", "--data", str(data_dir), "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output

    methods = ("sketchstream", "popularity", "item_cf")
    args = _evaluate_args(data_dir, out, tmp_path / "eval")
    result = runner.invoke(_app(), [*args, "--recommend", ",".join(methods)])
    assert result.exit_code == 0, result.output
    block = json.loads((tmp_path / "eval" / "report.json").read_text())["recommend"]
    for variant in ("test", "test_with_seen"):
        assert set(block[variant]) == set(methods)
        for figures in block[variant].values():
            assert set(figures) >= {"hr@10", "ndcg@10", "mrr"}
            assert 0.0 <= figures["mrr"] <= figures["hr@10"] <= 1.0

    result = runner.invoke(_app(), [*args, "--recommend", "popularity,oracle"])
    assert result.exit_code == 2
    assert "oracle" in result.output


def test_train_recommender_puts_the_recommender_in_the_artifact(tmp_path, data_dir) -> None:
    import torch
    from sketchstream.models.artifacts import load_model_artifact

    out = tmp_path / "model"
    args = ["train", "--data", str(data_dir), "--out", str(out), *SMALL, "--recommender"]
    sizing = ["--recommender-epochs", "1", "--recommender-hidden", "24"]
    sizing += ["--recommender-train-events", "200"]
    result = CliRunner().invoke(_app(), [*args, *sizing])
    assert result.exit_code == 0, result.output
    (version,) = [p for p in out.iterdir() if (p / "manifest.json").is_file()]
    bundle = load_model_artifact(version)
    assert bundle.recommender is not None
    assert len(bundle.recommender.catalogue) > 0
    config = bundle.recommender.config
    assert (config.epochs, config.hidden, config.train_events) == (1, 24, 200)
    linear = [m for m in bundle.recommender.model.modules() if isinstance(m, torch.nn.Linear)]
    widths = {m.out_features for m in linear}
    assert 24 in widths and 1024 not in widths  # the sized model is what was saved
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["recommend"]["test"]) == {"sketchstream"}
    # the model keeps its own figures: a later train --out rewrites the report
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["config"]["recommend_figures"] == report["recommend"]
    assert 0.0 <= report["recommend"]["test"]["sketchstream"]["hr@10"] <= 1.0


def test_recommender_sizing_without_the_recommender_is_refused(tmp_path, data_dir) -> None:
    args = ["train", "--data", str(data_dir), "--out", str(tmp_path / "m"), *SMALL]
    result = CliRunner().invoke(
        _app(), [*args, "--recommender-hidden", "64", "--recommender-train-events", "9"]
    )
    assert result.exit_code == 2
    said = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
    flags = "--recommender-hidden, --recommender-train-events"
    assert f"{flags} sizes the recommender: add --recommender" in said
    assert not (tmp_path / "m").exists()  # refused before any work
