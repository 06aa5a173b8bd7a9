"""`sketchstream bench`: speed and peak memory of the numeric core, one command per component.

Each measured run happens in a fresh spawned process, so its peak RSS (``ru_maxrss``) is its
own. Results come as a table, and with ``--json FILE`` as JSON lines (one per run) appended to
FILE. Heavy imports (numpy, torch, pycleora) happen inside command bodies and workers, so
``--help`` is instant. New benchmarks are new ``@app.command`` functions here.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from enum import StrEnum
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from sketchstream.tools.options import load_settings_or_exit

if TYPE_CHECKING:
    import numpy as np

__all__ = ["app", "synthetic_interactions"]

logger = logging.getLogger(__name__)

app = typer.Typer(
    help="Benchmarks: wall time and peak memory of the numeric core, as a table.",
    no_args_is_help=True,
)


class CleoraSize(StrEnum):
    """Synthetic graph sizes: users x items x interactions (XS is a smoke test)."""

    XS = "XS"
    S = "S"
    M = "M"


CLEORA_SIZES: dict[str, tuple[int, int, int]] = {
    "XS": (2_000, 500, 20_000),
    "S": (100_000, 20_000, 1_000_000),
    "M": (1_000_000, 200_000, 10_000_000),
}
ZIPF_EXPONENT = 1.1
DEFAULT_DIMS = [128, 1024]


def synthetic_interactions(
    n_users: int, n_items: int, n_interactions: int, seed: int = 0, zipf: float = ZIPF_EXPONENT
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded synthetic user -> item interactions, vectorized.

    Users are uniform; item popularity follows Zipf(``zipf``) over popularity ranks, and ranks
    are shuffled onto item ids so that popular items are not the low ids.

    Returns:
        users (n_interactions,) int32 in [0, n_users), items (n_interactions,) int32 in
        [0, n_items).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, n_items + 1, dtype=np.float64) ** zipf)
    cdf /= cdf[-1]
    rank_to_item = rng.permutation(n_items).astype(np.int32)
    items = rank_to_item[np.minimum(np.searchsorted(cdf, rng.random(n_interactions)), n_items - 1)]
    users = rng.integers(0, n_users, n_interactions, dtype=np.int32)
    return users, items


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _write_tsv(path: Path, users: np.ndarray, items: np.ndarray) -> None:
    """pycleora's input: one ``u<user>\\ti<item>`` line per interaction (prefixes keep the two
    id spaces apart: pycleora does not namespace columns)."""
    import numpy as np

    step = 1_000_000
    with path.open("w", encoding="ascii") as fh:
        for a in range(0, users.shape[0], step):
            u = np.strings.add("u", users[a : a + step].astype(str))
            i = np.strings.add("\ti", items[a : a + step].astype(str))
            fh.write("\n".join(np.strings.add(u, i).tolist()))
            fh.write("\n")


def _cleora_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured run in a fresh process: build the graph, propagate, report."""
    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    impl, size, dim, iterations = spec["impl"], spec["size"], spec["dim"], spec["iterations"]
    n_users, n_items, n_inter = CLEORA_SIZES[size]
    result: dict[str, Any] = {"impl": impl, "size": size, "dim": dim}
    if impl == "pycleora":
        import pycleora

        t0 = time.perf_counter()
        graph = pycleora.SparseMatrix.from_files([spec["tsv"]], "user item")
        t1 = time.perf_counter()
        # whiten=False with the default l2 normalization is pycleora's plain propagation
        # (embed_fast): the same algorithm as ours.
        emb = pycleora.embed(
            graph, feature_dim=dim, num_iterations=iterations, propagation="left", whiten=False
        )
        t2 = time.perf_counter()
        n_nodes = graph.num_entities
    else:
        import torch  # noqa: F401  (import cost is not propagation cost)
        from sketchstream.models.cleora import Cleora, Hypergraph

        users, items = synthetic_interactions(n_users, n_items, n_inter, seed=spec["seed"])
        t0 = time.perf_counter()
        graph = Hypergraph.from_arrays(
            users, items, n_users, n_items, left_type="user", right_type="item"
        )
        del users, items
        t1 = time.perf_counter()
        model = Cleora(dim=dim, iterations=iterations, seed=0, device=spec["device"]).fit(graph)
        t2 = time.perf_counter()
        emb = model.embeddings_
        n_nodes = graph.n_nodes
        result["device"] = model.device_
    result.update(
        build_s=round(t1 - t0, 3),
        propagate_s=round(t2 - t1, 3),
        total_s=round(t2 - t0, 3),
        peak_rss_mb=round(_peak_rss_mb(), 1),
        n_nodes=int(n_nodes),
        emb_shape=list(emb.shape),
    )
    return result


def _run_isolated(spec: dict[str, Any], worker: Any = None) -> dict[str, Any]:
    """``worker(spec)`` (default: the cleora worker) in a fresh spawned process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(worker or _cleora_worker, spec).result()


def _render(
    rows: list[dict[str, Any]],
    cols: list[tuple[str, str]],
    cell: Callable[[str, Any], str] = lambda _key, value: str(value),
) -> str:
    """Rows as a right-aligned text table: ``cols`` are (row key, header); ``cell(key, value)``
    formats a present value, a missing one is blank."""
    cells = [[h for _, h in cols]]
    for r in rows:
        cells.append(["" if r.get(k) is None else cell(k, r[k]) for k, _ in cols])
    widths = [max(len(row[c]) for row in cells) for c in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _counts(*keys: str) -> Callable[[str, Any], str]:
    """A ``cell`` for :func:`_render`: ``keys`` as whole numbers with thousands separators."""
    return lambda key, value: f"{value:,.0f}" if key in keys else str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("impl", "impl"),
        ("size", "size"),
        ("dim", "dim"),
        ("build_s", "build s"),
        ("propagate_s", "propagate s"),
        ("total_s", "total s"),
        ("peak_rss_mb", "peak RSS MB"),
        ("ratio_vs_pycleora", "time ours/pyc"),
        ("rss_ratio_vs_pycleora", "RSS ours/pyc"),
    ]
    return _render(rows, cols)


def _append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append one JSON line per row to ``path``, creating its folder: runs accumulate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


@app.command("cleora")
def cleora(
    size: Annotated[
        CleoraSize,
        typer.Option(help="S = 100k users x 20k items x 1M interactions; M = 1M x 200k x 10M."),
    ] = CleoraSize.S,
    dims: Annotated[
        list[int], typer.Option("--dim", help="Embedding widths (repeatable).")
    ] = DEFAULT_DIMS,
    iterations: Annotated[int, typer.Option(min=1, help="Propagation steps.")] = 4,
    device: Annotated[str, typer.Option(help="Ours: auto, scipy, cpu or cuda.")] = "auto",
    reference: Annotated[
        bool, typer.Option("--pycleora/--no-pycleora", help="Also run pycleora 3.x if installed.")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic graph.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Append one JSON line per run to this file.")
    ] = None,
) -> None:
    """Cleora graph build + propagation, ours vs pycleora, on a synthetic Zipf(1.1) graph.

    Each (implementation, dim) runs in its own fresh process. Ours gets integer arrays
    (Hypergraph.from_arrays); pycleora reads a TSV file written beforehand (writing it is input
    preparation, reported but not counted). Build = graph + CSR construction; propagate =
    initialization + iterations.
    """
    import importlib.util

    size_key = size.value
    n_users, n_items, n_inter = CLEORA_SIZES[size_key]
    has_ref = reference and importlib.util.find_spec("pycleora") is not None
    typer.echo(
        f"cleora bench, size {size_key}: {n_users:,} users x {n_items:,} items x "
        f"{n_inter:,} interactions (Zipf {ZIPF_EXPONENT}), {iterations} iterations, "
        f"dims {dims}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        err=True,
    )
    if reference and not has_ref:
        typer.echo("pycleora is not installed: running ours alone.", err=True)

    rows: list[dict[str, Any]] = []
    prep_s = 0.0
    with tempfile.TemporaryDirectory(prefix="sketchstream-bench-") as tmp:
        tsv = Path(tmp) / f"interactions-{size_key}.tsv"
        if has_ref:
            t0 = time.perf_counter()
            users, items = synthetic_interactions(n_users, n_items, n_inter, seed=seed)
            _write_tsv(tsv, users, items)
            del users, items
            prep_s = time.perf_counter() - t0
            typer.echo(
                f"pycleora input prep (TSV, {tsv.stat().st_size / 2**20:.0f} MiB): "
                f"{prep_s:.1f} s, not counted",
                err=True,
            )
        runs = [(impl, d) for d in dims for impl in (("pycleora",) if has_ref else ()) + ("ours",)]
        for k, (impl, d) in enumerate(runs, 1):
            typer.echo(f"[{k}/{len(runs)}] {impl}, dim {d} ...", err=True)
            spec = {
                "impl": impl,
                "size": size_key,
                "dim": d,
                "iterations": iterations,
                "seed": seed,
                "device": device,
                "tsv": str(tsv),
            }
            res = _run_isolated(spec)
            if impl == "pycleora":
                res["prep_s"] = round(prep_s, 3)
            typer.echo(
                f"    total {res['total_s']:.2f} s, peak RSS {res['peak_rss_mb']:.0f} MB", err=True
            )
            rows.append(res)

    for r in rows:
        ref = next((x for x in rows if x["impl"] == "pycleora" and x["dim"] == r["dim"]), None)
        if r["impl"] == "ours" and ref is not None:
            r["ratio_vs_pycleora"] = round(r["total_s"] / ref["total_s"], 3)
            r["rss_ratio_vs_pycleora"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 3)
    typer.echo(_table(rows))
    if json_path is not None:
        _append_jsonl(json_path, rows)
        typer.echo(f"wrote {len(rows)} JSON lines to {json_path}", err=True)


def _ceil_to(n: int, size: int) -> int:
    return -(-n // size) * size


def _batch_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the worker's per-batch path (:class:`BatchProcessor`: decode,
    validate, read states, score-then-fold, MLP, encode) on ``spec["path"]``'s events, states
    in a dict; events/s per batch size after a warm-up that gives users states, then (with
    ``spec["late"]``) per batch size for the file's first events sent again as late ones."""
    import orjson
    import torch
    from sketchstream.stream.metrics import WorkerMetrics
    from sketchstream.stream.models_feed import load_serving_model
    from sketchstream.stream.records import RawMessage
    from sketchstream.stream.worker import BatchProcessor
    from sketchstream.tools.evaluate import resolve_model

    torch.set_num_threads(spec["torch_threads"])
    model = load_serving_model(resolve_model(Path(spec["model"])))
    warm_size = max(1, min(2048, spec["warm"]))
    need = _ceil_to(spec["warm"], warm_size)
    need += sum(_ceil_to(spec["events"], z) for z in spec["sizes"])
    lines: list[bytes] = []
    with Path(spec["path"]).open("rb") as fh:
        for line in fh:
            if line.strip():
                lines.append(line.rstrip(b"\n"))
            if len(lines) >= need:
                break

    def key(line: bytes) -> bytes:
        """The user as the Kafka key; a line that is not an event object gets an empty key
        and goes where the worker sends it (the dead-letter list), as on the topic."""
        try:
            return str(orjson.loads(line).get("user", "")).encode()
        except (orjson.JSONDecodeError, AttributeError):
            return b""

    messages = [RawMessage("events", 0, k, key(v), v, 1.0) for k, v in enumerate(lines)]
    late = [
        RawMessage("events", 0, len(lines) + k, m.key, m.value, 1.0)
        for k, m in enumerate(messages[: spec["late"]])
    ]
    store: dict[tuple[int, bytes], bytes] = {}

    def read(partitions: Any, keys: Any) -> list[bytes | None]:
        return [store.get((p, k)) for p, k in zip(partitions, keys, strict=True)]

    processor = BatchProcessor(model, read, metrics=WorkerMetrics())
    at = 0

    def process(batch: list[Any]) -> None:
        result = processor.process(batch)
        for p, key, value in result.table_writes:
            store[(p, key)] = value

    def run(size: int, n: int) -> tuple[int, float]:
        nonlocal at
        t0, done = time.perf_counter(), 0
        while done < n and at < len(messages):
            process(messages[at : at + size])
            done += min(size, len(messages) - at)
            at += size
        return done, time.perf_counter() - t0

    def run_late(size: int) -> tuple[int, float]:
        """The late events once more, new offsets each time: still older than their users'
        states, so late again."""
        nonlocal late
        t0 = time.perf_counter()
        for lo in range(0, len(late), size):
            process(late[lo : lo + size])
        secs = time.perf_counter() - t0
        shift = len(late)
        late = [RawMessage("events", 0, m.offset + shift, m.key, m.value, 1.0) for m in late]
        return len(late), secs

    if spec["warm"]:
        run(warm_size, spec["warm"])
    rows = []
    timed = [(size, "in order") for size in spec["sizes"]]
    timed += [(size, "late") for size in spec["sizes"] if late]
    for size, order in timed:
        done, secs = run(size, spec["events"]) if order == "in order" else run_late(size)
        rows.append(
            {
                "batch_size": size,
                "order": order,
                "events": done,
                "seconds": round(secs, 3),
                "events_per_s": round(done / secs, 1) if secs > 0 else None,
                "us_per_event": round(1e6 * secs / done, 1) if done else None,
                "model": model.version,
                "load_avg": round(os.getloadavg()[0], 2),
            }
        )
    return {"rows": rows, "peak_rss_mb": round(_peak_rss_mb(), 1)}


@app.command("batch")
def batch(
    model: Annotated[
        Path, typer.Option(help="A model artifact, or a folder of them (its latest version).")
    ],
    path: Annotated[
        Path, typer.Option("--events-file", help="Canonical events, scored in file order.")
    ] = Path("data/ml-1m/events.jsonl"),
    sizes: Annotated[
        list[int], typer.Option("--size", min=1, help="Batch sizes to time (repeatable).")
    ] = [50, 200, 500, 2048],  # noqa: B006 (typer needs a list default)
    events: Annotated[int, typer.Option(min=1, help="Events timed per batch size.")] = 10_240,
    warm: Annotated[
        int, typer.Option(min=0, help="Events folded first, untimed, so users have states.")
    ] = 20_000,
    torch_threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
    late: Annotated[
        int,
        typer.Option(
            min=0,
            help="Then, per batch size, the file's first LATE events sent again with new "
            "offsets: late events for users whose states are newer (0: none).",
        ),
    ] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Append one JSON line per batch size.")
    ] = None,
) -> None:
    """The worker's per-batch processing alone, without Kafka or faust: events/s and µs per
    event by batch size.

    What `sketchstream worker` does to each micro-batch (decode, validate, read the users'
    states, score then fold, the MLP, encode predictions and states), with the states in a dict.
    Set against `bench stream`, it tells how much of the worker's time is its own and how
    much a small batch (a worker at low load) costs per event.
    """
    spec = {
        "model": str(model),
        "path": str(path),
        "sizes": list(sizes),
        "events": events,
        "warm": warm,
        "torch_threads": torch_threads,
        "late": late,
    }
    typer.echo(
        f"batch bench: {path}, {warm:,} warm-up events, then {events:,} per batch size"
        + (f" in file order and {late:,} late ones" if late else "")
        + ", "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        err=True,
    )
    got = _run_isolated(spec, worker=_batch_worker)
    rows = got["rows"]
    cols = [
        ("batch_size", "batch size"),
        ("order", "events sent"),
        ("events", "events"),
        ("seconds", "seconds"),
        ("events_per_s", "events/s"),
        ("us_per_event", "µs/event"),
    ]
    typer.echo(_render(rows, cols, _counts("events", "events_per_s")))
    typer.echo(
        f"model {rows[0]['model'] if rows else '?'}, peak RSS {got['peak_rss_mb']:.0f} MB", err=True
    )
    if json_path is not None:
        _append_jsonl(json_path, rows)
        typer.echo(f"wrote {len(rows)} JSON lines to {json_path}", err=True)


@app.command("stream")
def stream(
    events: Annotated[
        int, typer.Option("--events", min=100, help="Events drained at full speed per system.")
    ] = 200_000,
    systems: Annotated[
        list[str], typer.Option("--system", help="raw, faust, worker (repeatable; default all).")
    ] = ["raw", "faust", "worker"],  # noqa: B006 (typer needs a list default)
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of the events topic.")] = 4,
    batch_size: Annotated[int, typer.Option(min=1, help="Events per micro-batch.")] = 2048,
    batch_within: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds the passthroughs' micro-batches wait to fill (the worker does not wait:"
            " a batch is what one fetch brought).",
        ),
    ] = 0.05,
    latency_seconds: Annotated[
        float, typer.Option(min=0.0, help="Seconds of the half-rate latency run (0: none).")
    ] = 10.0,
    latency_rate: Annotated[
        float | None,
        typer.Option(
            min=1.0,
            help="Events/s of the latency run instead of half the measured rate (to compare"
            " systems at one rate).",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Folder with events.jsonl (default: <data dir>/ml-1m; synthetic if absent)."
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="Artifact store to serve (default: the artifact dir, else a bench model)."
        ),
    ] = None,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden width of a bench-built model.")] = 512,
    train_events: Annotated[
        int, typer.Option(min=1000, help="First events a bench-built model is trained on.")
    ] = 200_000,
    blocks: Annotated[int, typer.Option(min=0, help="Residual blocks of a bench-built model.")] = 2,
    timeout: Annotated[
        float, typer.Option(min=1.0, help="Seconds a system may take to drain.")
    ] = 600.0,
    kafka: Annotated[str | None, typer.Option("--kafka", help="Bootstrap servers.")] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Append one JSON line per system to this file.")
    ] = None,
) -> None:
    """One worker on the real broker vs a raw aiokafka passthrough and a faust no-op agent.

    Each system gets fresh topics and drains EVENTS events produced beforehand at full speed
    (events/s from its outputs' Kafka timestamps), then serves events at half that rate for
    LATENCY_SECONDS (p50/p99 from event to output record time). Also: peak RSS of the
    system's process; median bytes of a user state (worker, from its changelog).
    """
    from sketchstream.tools import stream_bench as sb

    unknown = sorted(set(systems) - set(sb.SYSTEMS))
    if unknown:
        raise typer.BadParameter(f"unknown systems {unknown}: expected some of {sb.SYSTEMS}")
    settings = load_settings_or_exit(kafka=kafka)

    def say(text: str) -> None:
        typer.echo(text, err=True)

    try:
        runs = sb.run_bench(
            settings,
            events=events,
            systems=systems,
            partitions=partitions,
            batch_size=batch_size,
            batch_within=batch_within,
            latency_seconds=latency_seconds,
            latency_rate=latency_rate,
            data=data,
            model=model,
            hidden=hidden,
            train_events=train_events,
            blocks=blocks,
            timeout=timeout,
            say=say,
        )
    except sb.StreamBenchError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(_stream_table(runs))
    if json_path is not None:
        _append_jsonl(json_path, runs)
        say(f"wrote {len(runs)} JSON lines to {json_path}")


def _stream_table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("system", "system"),
        ("events_per_s", "events/s"),
        ("ratio_vs_raw", "x raw"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("latency_rate", "at events/s"),
        ("rss_mb", "RSS MB"),
        ("state_bytes_per_user", "bytes/user"),
    ]
    return _render(rows, cols, lambda _k, v: f"{v:,}" if isinstance(v, float) else str(v))


# --- bench replay ------------------------------------------------------------------------------


class ReplayVariant(StrEnum):
    """What one measured replay run does (see ``bench replay --help``)."""

    AGGREGATOR = "aggregator"
    SNAPSHOT = "snapshot"
    SNAPSHOT_CF = "snapshot+cf"
    REFRESH_ONLY = "refresh-only"


def _replay_setup_worker(spec: dict[str, Any]) -> dict[str, Any]:
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


def _replay_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured variant in a fresh process: untimed set-up (the set-up worker's events and
    codebooks, labels, the training aggregator), then the timed run."""
    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    import numpy as np
    from sketchstream.models import state
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
    setup_rss = _peak_rss_mb()

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
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "setup_rss_mb": round(setup_rss, 1),
        "setup_s": round(setup_s, 3),
    }


def _replay_table(rows: list[dict[str, Any]]) -> str:
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
    return _render(rows, cols, _counts("events", "events_per_s"))


@app.command("replay")
def replay_bench(
    data: Annotated[
        Path | None,
        typer.Option(
            help="Canonical data folder with events.jsonl (and optionally items.jsonl); "
            "default: <data dir>/ml-1m (`sketchstream data movielens-1m`).",
            file_okay=False,
        ),
    ] = None,
    events: Annotated[
        int | None,
        typer.Option(
            "--events", min=1, help="Replay the first N events of the stream (default all)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Events per score_then_fold call (default: the trainer's)."),
    ] = None,
    variants: Annotated[
        list[ReplayVariant] | None,
        typer.Option("--variant", help="Variants to run (repeatable; default all four)."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Append one JSON line per variant to this file.")
    ] = None,
) -> None:
    """The trainer's replay engine: events/s and peak RSS of train's history replay.

    Each variant runs in its own fresh process, so its peak RSS is its own:

    aggregator: every event through Aggregator.score_then_fold, no item snapshot
    (the per-user feature extraction core).

    snapshot: the replay window by window with the daily-refreshed item snapshot
    (refresh_windows), its item features read per window; no CF similarity.

    snapshot+cf: the same with the item-item CF similarity rebuilt at refresh
    boundaries: train's default configuration.

    refresh-only: iterating refresh_windows with the similarity, no replay: the
    cost of simulating the refresh job.

    Not counted: reading the data and fitting the codebooks on the training
    period (once, in a set-up process); labels and the aggregator (per run).
    "x aggregator" is a variant's events/s over the aggregator's.
    """

    folder = data if data is not None else load_settings_or_exit().data_dir / "ml-1m"
    if not (folder / "events.jsonl").is_file():
        raise typer.BadParameter(
            f"{folder}: no events.jsonl (make one with `sketchstream data movielens-1m`)",
            param_hint="--data",
        )
    chosen = [ReplayVariant(v) for v in dict.fromkeys(variants or list(ReplayVariant))]
    load1, load5, _ = os.getloadavg()
    typer.echo(
        f"replay bench on {folder}: variants {', '.join(chosen)}; "
        f"{os.cpu_count()} CPUs, load average {load1:.2f}/{load5:.2f}",
        err=True,
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sketchstream-bench-") as tmp:
        typer.echo("set-up (load + codebooks, not counted) ...", err=True)
        setup = _run_isolated(
            {"data": str(folder), "tmp": tmp, "events": events}, _replay_setup_worker
        )
        typer.echo(
            f"    {setup['events']:,} of {setup['events_in_data']:,} events, "
            f"{setup['users']:,} users, {setup['items']:,} items; load {setup['load_s']:.1f} s, "
            f"codebooks ({', '.join(setup['modalities'])}) {setup['codebooks_s']:.1f} s; "
            f"batches of {batch_size or setup['default_batch_size']}",
            err=True,
        )
        for k, variant in enumerate(chosen, 1):
            typer.echo(f"[{k}/{len(chosen)}] {variant} ...", err=True)
            load_before = os.getloadavg()[0]
            res = _run_isolated(
                {"variant": variant.value, "tmp": tmp, "batch_size": batch_size}, _replay_worker
            )
            res.update(
                data=str(folder),
                cpus=os.cpu_count(),
                load_avg=round(load_before, 2),
                load_s=setup["load_s"],
                codebooks_s=setup["codebooks_s"],
            )
            typer.echo(
                f"    {res['seconds']:.2f} s, {res['events_per_s']:,.0f} events/s, "
                f"peak RSS {res['peak_rss_mb']:.0f} MB",
                err=True,
            )
            rows.append(res)
    base = next((r for r in rows if r["variant"] == ReplayVariant.AGGREGATOR), None)
    for r in rows:
        if base is not None and base["events_per_s"] and r["events_per_s"]:
            r["ratio_vs_aggregator"] = round(r["events_per_s"] / base["events_per_s"], 3)
    load1, load5, _ = os.getloadavg()
    typer.echo(f"load average at the end {load1:.2f}/{load5:.2f}", err=True)
    typer.echo(_replay_table(rows))
    if json_path is not None:
        _append_jsonl(json_path, rows)
        typer.echo(f"wrote {len(rows)} JSON lines to {json_path}", err=True)


# --- bench chaos -------------------------------------------------------------------------------


@app.command("chaos")
def chaos(
    data: Annotated[
        Path | None,
        typer.Option(
            help="Canonical events folder (events.jsonl); default: <data dir>/ml-1m, else the "
            "MovieLens-1M cache ~/.sketchstream/cache/ml-1m (`sketchstream data movielens-1m`).",
            file_okay=False,
        ),
    ] = None,
    events: Annotated[
        int, typer.Option("--events", min=10, help="The first N events, each given an event_id.")
    ] = 50_000,
    model: Annotated[
        Path | None,
        typer.Option(
            help="A model artifact, or a folder of them (its newest); default: the artifact dir "
            "(var/artifacts)."
        ),
    ] = None,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions of the events topic.")] = 4,
    fuzz_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fuzz records mixed in per good event.")
    ] = 0.01,
    fuzz_kinds: Annotated[
        list[str] | None,
        typer.Option("--fuzz-kind", help="Fuzz kinds to mix in (repeatable; default all)."),
    ] = None,
    outage: Annotated[
        float, typer.Option(min=0.0, help="Seconds the bench's broker stays down.")
    ] = 5.0,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="The worker's --batch-size (default: its own).")
    ] = None,
    max_restarts: Annotated[
        int, typer.Option(min=0, help="Restarts of a worker that exits on its own, per run.")
    ] = 5,
    stall: Annotated[
        float, typer.Option(min=1.0, help="A wait ends after this many seconds without progress.")
    ] = 180.0,
    timeout: Annotated[float, typer.Option(min=1.0, help="Seconds each run may take.")] = 900.0,
    workdir: Annotated[
        Path | None,
        typer.Option(
            help="Where the broker's data, worker states and logs go (kept); default: a temporary"
            " folder, removed unless the goal was missed.",
            file_okay=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the fuzz.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Append the run's JSON line to this file.")
    ] = None,
) -> None:
    """Issue 12's acceptance run: one worker, the same events clean and under faults.

    Runs on a broker of its OWN (free ports, data under the work dir), never the shared one at
    127.0.0.1:9092: the bench stops and starts its broker. First a clean run; then the same
    events with fuzzed records mixed in (bad JSON, deep nesting, wrong types, null keys,
    oversized, unknown actions, resent events, ...), a SIGKILL of the worker and its restart,
    and a broker stop/start. Every prediction and every final state is compared with the clean
    run. Figures: lost, changed (> 1e-5), duplicates_nonidentical, states_equal,
    worker_exits_on_bad_input, restart_resume_s (SIGKILL to the first new prediction). Goal:
    0, 0, 0, true, 0, <= 10 s.
    """
    import shutil
    import signal

    from sketchstream.tools import chaos as ch
    from sketchstream.tools import stream_bench as sb

    def say(text: str) -> None:
        typer.echo(text, err=True)

    kinds = tuple(dict.fromkeys(fuzz_kinds)) if fuzz_kinds else ch.FUZZ_KINDS
    unknown = sorted(set(kinds) - set(ch.FUZZ_KINDS))
    if unknown:
        raise typer.BadParameter(
            f"unknown fuzz kinds {unknown}: expected some of {', '.join(ch.FUZZ_KINDS)}",
            param_hint="--fuzz-kind",
        )
    settings = load_settings_or_exit()
    if data is None:
        candidates = [settings.data_dir / "ml-1m", settings.home / "cache" / "ml-1m"]
        data = next((c for c in candidates if (c / "events.jsonl").is_file()), candidates[0])
    path = data / "events.jsonl"
    if not path.is_file():
        raise typer.BadParameter(
            f"{data}: no events.jsonl (make one with `sketchstream data movielens-1m`)",
            param_hint="--data",
        )
    lines, _ = sb.event_lines(path, events)
    try:
        sb.check_events(lines)
    except sb.BadEventLine as exc:
        typer.echo(f"{path}: {exc}", err=True)
        raise typer.Exit(2) from None
    if len(lines) < events:
        say(f"{path} holds {len(lines):,} events only: using them all")
    store = _chaos_model(model if model is not None else settings.artifact_dir)

    keep = workdir is not None
    root = workdir or Path(tempfile.mkdtemp(prefix="sketchstream-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    from sketchstream.models.artifacts import ArtifactStore

    run_store = root / "artifacts"
    if ArtifactStore(run_store).latest() is None:
        ArtifactStore(run_store).publish(store)
    config = ch.ChaosConfig(
        partitions=partitions,
        fuzz_rate=fuzz_rate,
        fuzz_kinds=kinds,
        outage_s=outage,
        max_restarts=max_restarts,
        stall_s=stall,
        timeout_s=timeout,
        batch_size=batch_size,
        seed=seed,
    )
    load1, load5, _ = os.getloadavg()
    say(
        f"chaos bench: the first {len(lines):,} events of {path}, model {store.name}, "
        f"{partitions} partitions, fuzz {fuzz_rate:g} per event ({len(kinds)} kinds), outage "
        f"{outage:g}s; {os.cpu_count()} CPUs, load average {load1:.2f}/{load5:.2f}; work dir {root}"
    )
    from sketchstream.tools.broker import BrokerError

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleanup on SIGTERM
    try:
        row = ch.run_bench(
            ch.numbered_events(lines), store=run_store, workdir=root, config=config, say=say
        )
    except BrokerError as exc:  # the bench's own broker, not the worker under test
        typer.echo(f"the bench's broker failed: {exc}\n(work dir kept: {root})", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"interrupted: the bench's broker and worker are stopped (work dir {root})")
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    row |= {
        "data": str(path),
        "code": _code_version(),
        "cpus": os.cpu_count(),
        "load_avg": round(load1, 2),
    }
    typer.echo(ch.summary_table(row))
    if json_path is not None:
        _append_jsonl(json_path, [row])
        say(f"wrote 1 JSON line to {json_path}")
    if keep or not row["goal_met"]:
        say(f"worker logs: {root}/clean/worker.log, {root}/chaos/worker.log")
    else:
        shutil.rmtree(root, ignore_errors=True)


def _chaos_model(path: Path) -> Path:
    """The artifact ``path`` names (itself, or the newest in a folder of them), or a clear
    error that says how to make one."""
    from sketchstream.models.artifacts import MANIFEST, ArtifactStore

    if (path / MANIFEST).is_file():
        return path
    latest = ArtifactStore(path).latest() if path.is_dir() else None
    if latest is None:
        raise typer.BadParameter(
            f"{path}: no model artifact there; train one with `sketchstream train --data "
            f"data/ml-1m --out {path} --epochs 1 --hidden 256 --no-baselines`",
            param_hint="--model",
        )
    return path / str(latest)


def _code_version() -> str | None:
    """``git describe --always --dirty`` of the checkout the bench runs from, when it is one:
    the worker measured is that code, uncommitted changes included."""
    import subprocess

    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None
