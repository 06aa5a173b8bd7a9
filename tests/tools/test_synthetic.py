"""Synthetic rating data and state-size figures for the benchmarks (tools/synthetic.py)."""

from __future__ import annotations

import numpy as np
from sketchstream.tools.synthetic import state_size_report, synthetic_ratings


def test_state_size_report_and_synthetic_stream_shape() -> None:
    data = synthetic_ratings(n_users=200, n_items=500, seed=1)
    per_user = np.bincount(data["user"])
    assert 60 < np.median(per_user) < 140 and per_user.min() >= 20
    assert np.all(np.diff(data["ts"]) >= 0)
    report = state_size_report([b"x" * 10, b"x" * 20, b"x" * 30])
    assert report["median"] == 20 and report["max"] == 30 and report["n"] == 3
