"""``sketchstream bench batch``: the worker's per-batch processing alone, without Kafka or
faust (:class:`~sketchstream.stream.worker.BatchProcessor`, states in a dict), in a fresh
process: events/s and µs per event by batch size, in file order and for late events; with
``spec["profile"]``, each row's split by stage (:mod:`~sketchstream.tools.bench_profile`).
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path
from typing import Any

from sketchstream.tools.bench_harness import counts, peak_rss_mb, render, run_isolated

__all__ = ["batch_table", "batch_worker", "run_bench"]


def _ceil_to(n: int, size: int) -> int:
    return -(-n // size) * size


def batch_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the worker's per-batch path (:class:`BatchProcessor`: decode,
    validate, read states, score-then-fold, MLP, encode) on ``spec["path"]``'s events, states
    in a dict; events/s per batch size after a warm-up that gives users states, then (with
    ``spec["late"]``) per batch size for the file's first events sent again as late ones.
    With ``spec["profile"]`` each row has ``"profile"``: its :func:`profile_rows`."""
    import orjson
    from sketchstream.models.errors import ModelError
    from sketchstream.models.mlp import set_threads
    from sketchstream.stream.metrics import WorkerMetrics
    from sketchstream.stream.models_feed import load_serving_model
    from sketchstream.stream.records import RawMessage
    from sketchstream.stream.worker import BatchProcessor
    from sketchstream.tools.bench_profile import profile_rows, snapshot
    from sketchstream.tools.model_choice import resolve_model

    set_threads(spec["torch_threads"])
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

    k = spec.get("recommend_on_event", 0)
    if k and model.recommender is None:
        raise ModelError(
            f"--recommend-on-event {k}: model {model.version} has no recommender; "
            "give one trained with `sketchstream train --recommender`"
        )
    helper = None
    if spec.get("mlp_helper"):
        from sketchstream.stream.mlp_helper import MLPHelper

        helper = MLPHelper(threads=spec["torch_threads"])
        helper.start()
        waited = time.monotonic()
        while not helper.ready:
            if time.monotonic() - waited > helper.timeout:
                raise RuntimeError("bench batch: the MLP helper process did not start")
            time.sleep(0.05)
    metrics = WorkerMetrics()
    if helper is not None:
        metrics.watch_mlp_helper(helper)
    processor = BatchProcessor(
        model, read, metrics=metrics, recommend_on_event=k, mlp_helper=helper
    )
    at = 0

    behind: collections.deque[Any] = collections.deque()

    def process(batch: list[Any] | None) -> None:
        """One batch; as the worker, the predictions of a batch whose MLP runs in the helper
        are made behind the next two (and states written then: here at once, the next
        batches read them as the worker's held ones). None: make all those still behind."""
        if batch is not None:
            result = processor.process(batch)
            for p, key, value in result.table_writes:
                store[(p, key)] = value
            if result.pending is not None:
                behind.append(result.pending)
        while behind and (batch is None or len(behind) > 2):
            behind.popleft().result()

    def run(size: int, n: int) -> tuple[int, float]:
        nonlocal at
        t0, done = time.perf_counter(), 0
        while done < n and at < len(messages):
            process(messages[at : at + size])
            done += min(size, len(messages) - at)
            at += size
        process(None)
        return done, time.perf_counter() - t0

    def run_late(size: int) -> tuple[int, float]:
        """The late events once more, new offsets each time: still older than their users'
        states, so late again."""
        nonlocal late
        t0 = time.perf_counter()
        for lo in range(0, len(late), size):
            process(late[lo : lo + size])
        process(None)
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
        before = snapshot(processor.stages, 0, 0, 0.0)
        helped = helper.rows_helped if helper is not None else 0
        done, secs = run(size, spec["events"]) if order == "in order" else run_late(size)
        after = snapshot(processor.stages, done, -(-done // size), secs)
        if helper is not None:
            before["helper_rows"], after["helper_rows"] = 0.0, float(helper.rows_helped - helped)
        rows.append(
            {
                "batch_size": size,
                "order": order,
                "events": done,
                "seconds": round(secs, 3),
                "events_per_s": round(done / secs, 1) if secs > 0 else None,
                "us_per_event": round(1e6 * secs / done, 1) if done else None,
                "model": model.version,
                "recommend_on_event": k,
                "load_avg": round(os.getloadavg()[0], 2),
            }
        )
        if spec.get("profile"):
            rows[-1]["profile"] = profile_rows(before, after, f"{size} {order}")
    if helper is not None:
        helper.close()
    return {"rows": rows, "peak_rss_mb": round(peak_rss_mb(), 1)}


def run_bench(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`batch_worker` in a fresh process: ``{"rows": one per (batch size, order),
    "peak_rss_mb": ...}``."""
    return run_isolated(spec, batch_worker)


def batch_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`run_bench` as a text table."""
    cols = [
        ("batch_size", "batch size"),
        ("order", "events sent"),
        ("events", "events"),
        ("seconds", "seconds"),
        ("events_per_s", "events/s"),
        ("us_per_event", "µs/event"),
    ]
    return render(rows, cols, counts("events", "events_per_s"))
