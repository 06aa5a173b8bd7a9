"""The item snapshot: totals up to a cut-off, refreshed on a cadence, read by one function."""

from __future__ import annotations

import numpy as np
import pytest
from sketchstream.models.snapshot import (
    ItemSnapshot,
    refresh_windows,
    refreshed_item_features,
)

DAY = 86400.0


def test_features_count_rates_and_age_from_the_totals():
    snap = ItemSnapshot(["like"], prior=0.0, item_age=True)
    items = np.array(["a", "b", "a"], dtype=object)
    snap.fold(items, np.array([0.0, DAY, 2 * DAY]), np.array([[1.0], [0.0], [0.0]]), [5, 1, 2])
    out = snap.features(np.array(["a", "b", "new"], dtype=object), np.full(3, 4 * DAY))
    names = snap.feature_names
    np.testing.assert_allclose(np.expm1(out[:, names.index("item_log_events")]), [2, 1, 0])
    rate = out[:, names.index("item_rate_like")]
    assert rate[0] == pytest.approx(0.5) and rate[1] == pytest.approx(0.0)
    age = np.expm1(out[:, names.index("item_log_age_days")])
    np.testing.assert_allclose(age, [4, 3, 0], atol=1e-5)


def test_reading_features_does_not_change_the_snapshot():
    snap = ItemSnapshot(["like"]).fold(np.array(["a"], dtype=object), [1.0], [[1.0]], [5.0])
    before = snap.copy()
    snap.features(np.array(["a", "zzz"], dtype=object), np.array([2.0, 3.0]))
    assert snap.same_as(before) and len(snap) == 1


def test_the_snapshot_at_a_boundary_holds_exactly_the_events_strictly_before_it(random_ratings):
    events, y = random_ratings(300, users=9, items=15, days=30)
    seen = 0
    for rows, snap in refresh_windows(events, y, ["like"], refresh_s=DAY):
        boundary = np.floor(events.ts[rows[0]] / DAY) * DAY
        assert (np.floor(events.ts[rows] / DAY) * DAY == boundary).all()
        want = ItemSnapshot.from_events(events, y, ["like"], until=boundary)
        assert snap.same_as(want)
        assert snap.global_[0] == (events.ts < boundary).sum()
        seen += len(rows)
    assert seen == len(events)


def test_changing_a_label_changes_no_feature_before_the_next_boundary(random_ratings):
    events, y = random_ratings(300, users=9, items=15, days=30)
    a = refreshed_item_features(events, y, ["like"], refresh_s=DAY)
    for i in (0, 120, 299):
        y2 = y.copy()
        y2[i] = 1.0 - y2[i]
        b = refreshed_item_features(events, y2, ["like"], refresh_s=DAY)
        next_boundary = (np.floor(events.ts[i] / DAY) + 1) * DAY
        early = events.ts < next_boundary
        np.testing.assert_array_equal(a[early], b[early])
        if (~early).any():
            assert np.abs(a[~early] - b[~early]).max() > 0


def test_bytes_round_trip_exactly_and_malformed_bytes_are_refused(random_ratings):
    from sketchstream.models.errors import ArtifactError

    events, y = random_ratings(300, users=9, items=15, days=30)
    snap = ItemSnapshot.from_events(events, y, ["like"], prior=3.0)
    again = ItemSnapshot.from_bytes(snap.to_bytes())
    assert again.same_as(snap)
    probe = np.array(["i3", "nope"], dtype=object), np.array([2e9, 2e9])
    np.testing.assert_array_equal(again.features(*probe), snap.features(*probe))
    assert ItemSnapshot.from_bytes(ItemSnapshot(["like"]).to_bytes()).same_as(
        ItemSnapshot(["like"])
    )
    with pytest.raises(ArtifactError):
        ItemSnapshot.from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
