"""`sketchstream train` and `sketchstream evaluate` end to end on a tiny synthetic data set."""

from __future__ import annotations

import json

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
    result = runner.invoke(
        _app(),
        [
            "evaluate",
            "--data",
            str(data_dir),
            "--model",
            str(out),
            "--out",
            str(ev_out),
            "--no-baselines",
            "--no-progress",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    again = json.loads((ev_out / "report.json").read_text())
    # evaluate replays with the artifact's codebooks and weights: the same figures as train's
    assert again["test"]["auc"] == pytest.approx(report["test"]["auc"], abs=1e-6)
    assert again["val"]["logloss"] == pytest.approx(report["val"]["logloss"], abs=1e-6)

    # a tampered artifact is refused with a message naming the file
    weights = versions[0] / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    result = runner.invoke(
        _app(),
        [
            "evaluate",
            "--data",
            str(data_dir),
            "--model",
            str(versions[0]),
            "--out",
            str(tmp_path / "e"),
            "--no-baselines",
            "--no-progress",
        ],
    )
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
