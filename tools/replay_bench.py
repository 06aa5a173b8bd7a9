"""``sketchstream bench replay``: the trainer's replay engine (events/s and peak RSS of
train's history replay), four variants, each in a fresh process after one set-up process that
reads the data and fits the codebooks (not counted).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from sketchstream.tools.bench_harness import counts, peak_rss_mb, render, run_isolated

__all__ = ["ReplayVariant", "replay_table", "run_bench"]


class ReplayVariant(StrEnum):
    """What one measured replay run does (see ``bench replay --help``)."""

    AGGREGATOR = "aggregator"
    SNAPSHOT = "snapshot"
    SNAPSHOT_CF = "snapshot+cf"
    REFRESH_ONLY = "refresh-only"


def replay_setup_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Set-up, in a fresh process of its own: read the data folder, keep its first events,
    fit the codebooks on their training period as ``train`` does, and leave the events
    (canonical JSON lines) and the codebooks (``codebook-<modality>.bin``) in ``spec["tmp"]``."""
    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    from sketchstream.models.events import protocol_split, read_events, read_items, write_events
    from sketchstream.models.trainer import TrainConfig, fit_codebooks_for

    data, tmp = Path(spec["data"]), Path(spec["tmp"])
    t0 = time.perf_counter()
    events = read_events(data / "events.jsonl")
    n_all = len(events)
    if spec["events"] is not None and spec["events"] < n_all:
        events = events[: spec["events"]]
    items = read_items(data / "items.jsonl") if (data / "items.jsonl").is_file() else []
    load_s = time.perf_counter() - t0
    config = TrainConfig()
    t0 = time.perf_counter()
    codebooks = fit_codebooks_for(events[protocol_split(len(events))[0]], items, config)
    codebooks_s = time.perf_counter() - t0
    write_events(tmp / "events.jsonl", events)
    for modality, codebook in codebooks.items():
        (tmp / f"codebook-{modality}.bin").write_bytes(codebook.to_bytes())
    return {
        "events": len(events),
        "events_in_data": n_all,
        "items": len(items),
        "users": len(set(events.user.tolist())),
        "modalities": sorted(codebooks),
        "default_batch_size": config.replay_batch,
        "load_s": round(load_s, 3),
        "codebooks_s": round(codebooks_s, 3),
    }


def replay_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured variant in a fresh process: untimed set-up (the set-up worker's events and
    codebooks, labels, the training aggregator), then the timed run."""
    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    import numpy as np
    from sketchstream.models import aggregator as state  # state.Aggregator below
    from sketchstream.models.emde import Codebook
    from sketchstream.models.events import DEFAULT_HEADS, labels, protocol_split, read_events
    from sketchstream.models.snapshot import ItemSnapshot, refresh_windows
    from sketchstream.models.trainer import (
        TrainConfig,
        replay,
        snapshot_options,
        training_aggregator_config,
    )

    variant, tmp = spec["variant"], Path(spec["tmp"])
    t0 = time.perf_counter()
    events = read_events(tmp / "events.jsonl")
    codebooks = {
        f.stem.removeprefix("codebook-"): Codebook.from_bytes(f.read_bytes())
        for f in sorted(tmp.glob("codebook-*.bin"))
    }
    config = TrainConfig()
    batch_size = spec["batch_size"] or config.replay_batch
    heads = tuple(DEFAULT_HEADS)
    head_names = tuple(h.name for h in heads)
    y = labels(events, heads)
    agg_config = training_aggregator_config(
        events[protocol_split(len(events))[0]], heads, metadata="metadata" in codebooks
    )
    aggregator = state.Aggregator(agg_config, codebooks)
    opts = snapshot_options(config)  # what train passes to refresh_windows
    opts["similarity"] = variant in (ReplayVariant.SNAPSHOT_CF, ReplayVariant.REFRESH_ONLY)
    setup_s = time.perf_counter() - t0
    setup_rss = peak_rss_mb()

    def windows() -> Any:
        return refresh_windows(
            events,
            y,
            head_names,
            prior=config.item_prior,
            refresh_s=config.item_refresh_s,
            **opts,
        )

    n_windows = 0
    builds = 0
    last_sim: list[Any] = [None]

    def count(snap: Any) -> None:
        nonlocal n_windows, builds
        n_windows += 1
        sim = getattr(snap, "similarity", None)
        if sim is not None and sim is not last_sim[0]:
            builds += last_sim[0] is not None  # the first is the empty one, not a build
            last_sim[0] = sim

    t0 = time.perf_counter()
    if variant == ReplayVariant.AGGREGATOR:
        replay(events, aggregator, batch_size=batch_size, progress=False)
    elif variant == ReplayVariant.REFRESH_ONLY:
        for _rows, snap in windows():
            count(snap)
    else:  # as train's build_inputs: item features read off each window's snapshot
        width = len(
            ItemSnapshot(
                head_names, item_age=opts["item_age"], global_rate=opts["global_rate"]
            ).feature_names
        )
        item_features = np.zeros((len(events), width), np.float32)
        items = np.asarray(events.item, dtype=object)
        ts = np.asarray(events.ts, dtype=np.float64)

        def on_window(rows: np.ndarray, snap: Any, _features: Any) -> None:
            count(snap)
            item_features[rows] = snap.features(items[rows], ts[rows])

        replay(
            events,
            aggregator,
            batch_size=batch_size,
            progress=False,
            windows=windows(),
            on_window=on_window,
        )
    seconds = time.perf_counter() - t0
    n = len(events)
    return {
        "variant": str(variant),
        "events": n,
        "batch_size": batch_size,
        "windows": n_windows or None,
        "similarity_builds": builds if opts["similarity"] else None,
        "seconds": round(seconds, 3),
        "events_per_s": round(n / seconds, 1) if seconds > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "setup_rss_mb": round(setup_rss, 1),
        "setup_s": round(setup_s, 3),
    }


def run_bench(
    folder: Path,
    *,
    events: int | None,
    batch_size: int | None,
    chosen: Sequence[ReplayVariant],
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """One row per variant of ``chosen`` on ``folder``'s first ``events`` events (None: all),
    with ``ratio_vs_aggregator`` beside an aggregator run. Progress goes to ``say``."""
    load1, load5, _ = os.getloadavg()
    say(
        f"replay bench on {folder}: variants {', '.join(chosen)}; "
        f"{os.cpu_count()} CPUs, load average {load1:.2f}/{load5:.2f}"
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sketchstream-bench-") as tmp:
        say("set-up (load + codebooks, not counted) ...")
        setup = run_isolated(
            {"data": str(folder), "tmp": tmp, "events": events}, replay_setup_worker
        )
        say(
            f"    {setup['events']:,} of {setup['events_in_data']:,} events, "
            f"{setup['users']:,} users, {setup['items']:,} items; load {setup['load_s']:.1f} s, "
            f"codebooks ({', '.join(setup['modalities'])}) {setup['codebooks_s']:.1f} s; "
            f"batches of {batch_size or setup['default_batch_size']}"
        )
        for k, variant in enumerate(chosen, 1):
            say(f"[{k}/{len(chosen)}] {variant} ...")
            load_before = os.getloadavg()[0]
            res = run_isolated(
                {"variant": variant.value, "tmp": tmp, "batch_size": batch_size}, replay_worker
            )
            res.update(
                data=str(folder),
                cpus=os.cpu_count(),
                load_avg=round(load_before, 2),
                load_s=setup["load_s"],
                codebooks_s=setup["codebooks_s"],
            )
            say(
                f"    {res['seconds']:.2f} s, {res['events_per_s']:,.0f} events/s, "
                f"peak RSS {res['peak_rss_mb']:.0f} MB"
            )
            rows.append(res)
    base = next((r for r in rows if r["variant"] == ReplayVariant.AGGREGATOR), None)
    for r in rows:
        if base is not None and base["events_per_s"] and r["events_per_s"]:
            r["ratio_vs_aggregator"] = round(r["events_per_s"] / base["events_per_s"], 3)
    return rows


def replay_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`run_bench` as a text table."""
    cols = [
        ("variant", "variant"),
        ("events", "events"),
        ("windows", "windows"),
        ("similarity_builds", "CF builds"),
        ("seconds", "seconds"),
        ("events_per_s", "events/s"),
        ("peak_rss_mb", "peak RSS MB"),
        ("setup_rss_mb", "set-up RSS MB"),
        ("ratio_vs_aggregator", "x aggregator"),
    ]
    return render(rows, cols, counts("events", "events_per_s"))
