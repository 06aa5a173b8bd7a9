"""What ``bench chaos`` compares between its clean and its chaos run, and its goal.

- :func:`compare_predictions`: lost, changed and non-identical duplicate predictions of the
  good events, by ``event_id`` (:data:`TOL`: 1e-5, max over heads);
- :func:`final_states`: the changelog's last state per user on the user's own partition;
- :func:`compare_states`: states decoded with the model's aggregator and compared field by
  field, without their offsets (see :mod:`sketchstream.tools.chaos` for why);
- :func:`goal_met`: the issue's goal on a result row.

Pure (no Kafka I/O): what the tests pin down.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TOL", "compare_predictions", "compare_states", "final_states", "goal_met"]

TOL = 1e-5


def compare_predictions(
    clean: Mapping[str, Sequence[Sequence[float]]],
    chaos: Mapping[str, Sequence[Sequence[float]]],
    event_ids: Sequence[str],
    tol: float = TOL,
) -> dict[str, Any]:
    """Predictions of the good events ``event_ids``: ``{event_id: [scores (n_heads,), ...]}``
    of each run. Returns ``lost``, ``changed``, ``duplicates``, ``duplicates_nonidentical``,
    ``clean_lost`` (no clean prediction to compare with) and ``max_abs_diff``."""
    import numpy as np

    out = dict(lost=0, changed=0, duplicates=0, duplicates_nonidentical=0, clean_lost=0)
    worst = 0.0
    for eid in event_ids:
        got = chaos.get(eid) or []
        want = clean.get(eid) or []
        out["lost"] += not got
        out["clean_lost"] += not want
        if not got:
            continue
        scores = np.asarray(got, dtype=np.float64)
        if len(got) > 1:
            out["duplicates"] += 1
            spread = float((scores.max(axis=0) - scores.min(axis=0)).max())
            out["duplicates_nonidentical"] += spread > tol
        if want:
            diff = float(np.abs(scores - np.asarray(want[0], dtype=np.float64)).max())
            worst = max(worst, diff)
            out["changed"] += diff > tol
    out["max_abs_diff"] = worst
    return out


def compare_states(
    aggregator: Any,
    clean: Mapping[bytes, bytes],
    chaos: Mapping[bytes, bytes],
    chunk: int = 2048,
) -> dict[str, Any]:
    """The final user states of the two runs, decoded with ``aggregator``, compared on all
    that offsets do not change (see the module docstring). Returns ``states_compared``,
    ``states_differ``, ``states_missing`` (clean users without a chaos state),
    ``states_extra`` (the reverse) and ``differ_fields`` (field → users)."""
    import numpy as np

    both = sorted(set(clean) & set(chaos))
    fields: Counter[str] = Counter()
    differ = np.zeros(len(both), dtype=bool)
    for lo in range(0, len(both), chunk):
        keys = both[lo : lo + chunk]
        want = aggregator.load([clean[k] for k in keys])
        got = aggregator.load([chaos[k] for k in keys])
        rows = slice(lo, lo + len(keys))
        if got.codebook_version != want.codebook_version:
            differ[rows] = True
            fields["codebook_version"] += len(keys)
        for name, a in want._arrays().items():
            if name in ("partitions", "offsets"):
                continue
            b = getattr(got, name)
            if a.shape != b.shape:
                bad = np.ones(len(keys), dtype=bool)
            elif a.dtype.kind == "f":
                rtol = 2e-5 if a.dtype.itemsize <= 4 else 0.0
                close = np.isclose(b, a, rtol=rtol, atol=1e-6, equal_nan=True)
                bad = ~close.reshape(len(keys), -1).all(axis=1)
            else:
                bad = (a != b).reshape(len(keys), -1).any(axis=1)
            if bad.any():
                fields[name] += int(bad.sum())
                differ[rows] |= bad
    return {
        "states_compared": len(both),
        "states_differ": int(differ.sum()),
        "states_missing": len(set(clean) - set(chaos)),
        "states_extra": len(set(chaos) - set(clean)),
        "differ_fields": dict(fields),
    }


def final_states(records: Sequence[Any], home: Mapping[bytes, int]) -> tuple[dict, int]:
    """The changelog's last state per user, read on the user's own partition (``home``; a
    user the good events do not know is taken wherever it is), and how many users also have
    a state written on another partition."""
    latest: dict[tuple[int, bytes], bytes | None] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        latest[(r.partition, r.key)] = r.value
    states: dict[bytes, bytes] = {}
    strays: set[bytes] = set()
    for (p, key), value in latest.items():
        own = home.get(key)
        if own is not None and p != own:
            strays.add(key)
        elif value is not None:
            states[key] = value
    return states, len(strays)


def goal_met(row: Mapping[str, Any]) -> bool:
    """The issue's goal: nothing lost or changed, identical duplicates only, equal states, no
    exit on bad input, a restart that resumes within 10 s."""
    resume = row.get("restart_resume_s")
    return (
        row.get("lost") == 0
        and row.get("changed") == 0
        and row.get("duplicates_nonidentical") == 0
        and row.get("states_equal") is True
        and row.get("worker_exits_on_bad_input") == 0
        and resume is not None
        and resume <= 10.0
    )
