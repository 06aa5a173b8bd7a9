"""`sketchstream bench cleora`: synthetic data and one tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
from sketchstream.tools.cleora_bench import synthetic_interactions
from sketchstream.tools.cli import app
from typer.testing import CliRunner


def test_synthetic_interactions_are_seeded_in_range_and_skewed():
    users, items = synthetic_interactions(1_000, 300, 50_000, seed=3)
    again_users, again_items = synthetic_interactions(1_000, 300, 50_000, seed=3)

    assert users.dtype == np.int32 and items.dtype == np.int32
    np.testing.assert_array_equal(users, again_users)
    np.testing.assert_array_equal(items, again_items)
    assert users.min() >= 0 and users.max() < 1_000
    assert items.min() >= 0 and items.max() < 300
    counts = np.sort(np.bincount(items, minlength=300))[::-1]
    assert counts[0] > 20 * np.median(counts)  # Zipf: a few items take most interactions


def test_importing_the_bench_module_does_not_import_numeric_libraries():
    code = (
        "import sys, sketchstream.tools.bench; "
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"]


def test_bench_cleora_writes_one_json_line_per_run(tmp_path):
    has_ref = importlib.util.find_spec("pycleora") is not None
    out = tmp_path / "runs.jsonl"

    result = CliRunner().invoke(
        app,
        ["bench", "cleora", "--size", "XS", "--dim", "8", "--iterations", "2", "--json", str(out)],
    )

    assert result.exit_code == 0, result.output
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in runs] == (["pycleora", "ours"] if has_ref else ["ours"])
    for r in runs:
        assert r["size"] == "XS" and r["dim"] == 8
        assert r["total_s"] >= r["propagate_s"] > 0 and r["peak_rss_mb"] > 0
    ours = runs[-1]
    assert ours["emb_shape"][1] == 8
    assert ("ratio_vs_pycleora" in ours) == has_ref


def test_bench_cleora_check_compares_the_torch_path_with_the_host_path(tmp_path):
    out = tmp_path / "runs.jsonl"
    args = ["bench", "cleora", "--size", "XS", "--dim", "16", "--device", "cpu"]

    result = CliRunner().invoke(app, [*args, "--no-pycleora", "--check", "--json", str(out)])

    assert result.exit_code == 0, result.output
    (ours,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert ours["device"] == "cpu" and ours["check_scipy_s"] > 0
    assert 0 <= ours["check_max_abs_diff"] <= 1e-4
    assert 0.9999 <= ours["check_min_row_cos"] <= 1.0 + 1e-6
    assert ours["check_top10_same"] >= 0.9
    assert "max |diff| vs scipy" in result.output


def test_check_against_host_sees_a_changed_row():
    from sketchstream.models.cleora import Cleora, Hypergraph
    from sketchstream.tools.cleora_bench import check_against_host

    users, items = synthetic_interactions(300, 80, 3000, seed=2)
    g = Hypergraph.from_arrays(users, items, 300, 80, left_type="user", right_type="item")
    emb = Cleora(dim=8, iterations=2, seed=0, device="scipy").fit(g).embeddings_.copy()
    same = check_against_host(g, emb, iterations=2)
    row = g.type_slice("item").start + 3
    emb[row] = -emb[row]  # an item turned around: a cosine of -1

    changed = check_against_host(g, emb, iterations=2)

    assert same["check_max_abs_diff"] == 0.0 and same["check_top10_same"] == 1.0
    assert changed["check_min_row_cos"] <= -0.999
    assert changed["check_max_abs_diff"] == float(2 * abs(emb[row]).max())
