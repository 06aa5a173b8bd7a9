"""Fixtures of the model tests.

- ``random_ratings`` (function): ``random_ratings(n, users=, items=, days=, seed=0) ->
  (events, y)``: a small random rating stream for the item snapshot and the CF similarity.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sketchstream.models.events import EventTable

DAY = 86400.0


def _random_ratings(
    n: int, *, users: int, items: int, days: float, seed: int = 0
) -> tuple[EventTable, np.ndarray]:
    rng = np.random.default_rng(seed)
    value = rng.integers(1, 6, n).astype(np.float32)
    events = EventTable(
        user=np.array([f"u{u}" for u in rng.integers(0, users, n)], dtype=object),
        item=np.array([f"i{i}" for i in rng.integers(0, items, n)], dtype=object),
        action=np.array(["rate"] * n, dtype=object),
        ts=1e9 + np.sort(rng.uniform(0, days * DAY, n)),
        value=value,
    )
    return events, (value >= 4).astype(np.float32)[:, None]


@pytest.fixture
def random_ratings() -> Callable[..., tuple[EventTable, np.ndarray]]:
    """Factory: ``n`` ratings 1-5 of ``u0 .. u{users-1}`` on ``i0 .. i{items-1}`` in time
    order, spread uniformly over ``days`` days from ts 1e9; ``y (n, 1)`` float32 is 1 where
    the rating is >= 4 (one ``like`` head). Same ``seed``, same stream."""
    return _random_ratings
