"""``sketchstream bench recommend``: the worker's answer to top-k recommendation requests,
alone, without Kafka or faust, in a fresh process: requests/s and latency per batch, on the
model's own catalogue and on synthetic catalogues of any size.

What is timed is :meth:`~sketchstream.stream.worker.BatchProcessor.answer` on a batch of
encoded request messages, as the worker calls it on what one fetch brought: decode and
validate the requests, read the users' stored states (real state blobs: the events file's
first events folded by :meth:`BatchProcessor.process`, the worker's own path, kept in a
dict), the recommender's inputs and MLP, the catalogue top-k, the answer records. A synthetic
catalogue is the model's items followed by made-up ones with random buckets, so seen items
are still found and excluded. Threads are pinned (``threads``: torch, OpenMP and BLAS pools
alike) before numpy and torch load, so one thread is one core's figure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sketchstream.tools.bench_events import BadEventLine
from sketchstream.tools.bench_harness import counts, peak_rss_mb, render, run_isolated

__all__ = ["recommend_table", "recommend_worker", "run_bench"]

# The thread pools numpy, scipy and torch may start, by the variables each reads at load time.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Events per batch while folding the warm-up events, as `bench batch` warms up.
_WARM_BATCH = 2048


def recommend_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: fold ``spec["warm"]`` events of ``spec["events_path"]`` into states,
    then per catalogue (``spec["catalogues"]``: ``[name, items]``, items 0 for the model's
    own), per batch size and with and without ``exclude_seen``, time ``spec["requests"]``
    requests (users drawn from the states, ``spec["k"]`` items each) in batches through
    ``BatchProcessor.answer``. Returns ``{"rows": [...], "answers": [the answer records of
    each row's first timed batch], "recommender": its shape in words, "peak_rss_mb": ...}``;
    raises when a request is not answered."""
    import torch

    torch.set_num_threads(spec["threads"])
    model = _load_model(spec["model"])
    store, users, last_ts = _warm_states(model, Path(spec["events_path"]), spec["warm"])
    rows: list[dict[str, Any]] = []
    answers: list[list[dict[str, Any]]] = []
    for name, size in spec["catalogues"]:
        served = _with_catalogue(model, size, spec["seed"])
        n_items = len(served.recommender.catalogue)
        for batch in spec["batches"]:
            for exclude_seen in (False, True):
                messages = _requests(users, spec, batch, exclude_seen, last_ts + 3600.0)
                row, first = _time_answers(served, store, messages, batch)
                answers.append(first)
                rows.append(
                    {
                        "catalogue": name,
                        "items": n_items,
                        "k": spec["k"],
                        "batch": batch,
                        "exclude_seen": exclude_seen,
                        **row,
                        "threads": spec["threads"],
                        "model": model.version,
                        "load_avg": round(os.getloadavg()[0], 2),
                    }
                )
    return {
        "rows": rows,
        "answers": answers,
        "recommender": _describe(model.recommender),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def run_bench(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`recommend_worker` in a fresh process whose thread pools are pinned to
    ``spec["threads"]`` from its start (the variables are read when numpy and torch load)."""
    with _thread_variables(spec["threads"]):
        return run_isolated(spec, recommend_worker)


def recommend_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`run_bench` as a text table."""
    cols = [
        ("catalogue", "catalogue"),
        ("items", "items"),
        ("batch", "batch"),
        ("exclude_seen", "exclude seen"),
        ("requests", "requests"),
        ("requests_per_s", "requests/s"),
        ("requests_per_cpu_s", "per CPU-s"),
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("threads", "threads"),
    ]
    return render(rows, cols, counts("items", "requests", "requests_per_s", "requests_per_cpu_s"))


@contextmanager
def _thread_variables(threads: int) -> Iterator[None]:
    """The thread-count variables set for the processes started inside the block."""
    before = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _load_model(path: str) -> Any:
    from sketchstream.models.errors import ModelError
    from sketchstream.stream.models_feed import load_serving_model
    from sketchstream.tools.model_choice import resolve_model

    model = load_serving_model(resolve_model(Path(path)))
    if model.recommender is None:
        raise ModelError(
            f"model {model.version} at {model.path} has no recommender: train one with "
            "`sketchstream train --recommender`"
        )
    return model


def _describe(rec: Any) -> str:
    """The recommender's shape, what its cost per request depends on besides the catalogue."""
    config, catalogue = rec.parts.config, rec.catalogue
    return (
        f"{rec.spec.n_features:,} inputs, hidden {config.hidden} x {config.blocks} blocks, "
        f"{catalogue.levels.shape[1]} levels x {catalogue.width} buckets"
    )


def _warm_states(
    model: Any, path: Path, n_events: int
) -> tuple[dict[tuple[int, bytes], bytes], list[str], float]:
    """The states the worker would hold after the file's first ``n_events`` events (all on
    partition 0): ``(store, users with a state, the last event time)``."""
    import orjson
    from sketchstream.stream.records import RawMessage
    from sketchstream.stream.worker import BatchProcessor
    from sketchstream.tools.bench_events import check_events, event_lines

    lines, _ = event_lines(path, n_events)
    check_events(lines)  # every line keyed by a user, or a clear error
    events = [orjson.loads(line) for line in lines]
    messages = [
        RawMessage("events", 0, j, e["user"].encode(), line, 1.0)
        for j, (e, line) in enumerate(zip(events, lines, strict=True))
    ]
    store: dict[tuple[int, bytes], bytes] = {}
    processor = BatchProcessor(model, _reader(store))
    for a in range(0, len(messages), _WARM_BATCH):
        for p, key, value in processor.process(messages[a : a + _WARM_BATCH]).table_writes:
            store[(p, key)] = value
    if not store:
        raise BadEventLine(f"{path}: no state from its first {n_events:,} events")
    return store, sorted(key.decode() for _, key in store), max(e["ts"] for e in events)


def _reader(store: dict[tuple[int, bytes], bytes]) -> Any:
    def read(partitions: Any, keys: Any) -> list[bytes | None]:
        return [store.get((p, k)) for p, k in zip(partitions, keys, strict=True)]

    return read


def _with_catalogue(model: Any, size: int, seed: int) -> Any:
    """``model`` recommending from a catalogue of ``size`` items (0: its own): its own items
    first (cut to ``size`` when fewer), then made-up ones with uniformly random buckets."""
    import dataclasses

    import numpy as np
    from sketchstream.models.catalogue import Catalogue
    from sketchstream.models.scorer import Recommender

    rec = model.recommender
    own = rec.catalogue
    if size == 0:
        return model
    n_levels = own.levels.shape[1]
    extra = max(0, size - len(own))
    rng = np.random.default_rng(seed)
    made_up = rng.integers(0, own.width, (extra, n_levels)) + np.arange(n_levels) * own.width
    catalogue = Catalogue(
        [*own.ids[:size], *(f"synthetic-{j}" for j in range(extra))],
        np.concatenate([own.levels[:size], made_up]),
        own.width,
    )
    parts = dataclasses.replace(rec.parts, catalogue=catalogue)
    return dataclasses.replace(model, recommender=Recommender(parts, rec.aggregator))


def _requests(
    users: list[str], spec: dict[str, Any], batch: int, exclude_seen: bool, ts: float
) -> list[Any]:
    """``spec["requests"]`` (rounded up to whole batches) encoded requests of users drawn
    with replacement, read at ``ts``: what the recommend topic would deliver."""
    import numpy as np
    import orjson
    from sketchstream.stream.records import RawMessage

    n = -(-spec["requests"] // batch) * batch
    drawn = np.random.default_rng(spec["seed"]).choice(len(users), n)
    k, out = spec["k"], []
    for j, u in enumerate(drawn):
        user = users[u]
        value = {"user": user, "request_id": f"r{j}", "k": k, "exclude_seen": exclude_seen}
        value["ts"] = ts
        out.append(RawMessage("recommend", 0, j, user.encode(), orjson.dumps(value), ts))
    return out


def _time_answers(
    model: Any, store: dict[tuple[int, bytes], bytes], messages: list[Any], batch: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer ``messages`` ``batch`` at a time after one untimed batch: the row's figures (a
    request's latency is its batch's time) and the first timed batch's answers. Besides wall
    time, the process's CPU time: on a loaded machine requests per CPU second is the figure
    of a core of one's own (the wall figures say how long requests waited)."""
    import numpy as np
    import orjson
    from sketchstream.models.errors import ModelError
    from sketchstream.stream.worker import BatchProcessor

    processor = BatchProcessor(model, _reader(store))
    processor.answer(messages[:batch])  # warm-up: first-call allocations, lazy imports
    times, first = [], None
    cpu = time.process_time()
    for a in range(0, len(messages), batch):
        part = messages[a : a + batch]
        t0 = time.perf_counter()
        result = processor.answer(part)
        times.append(time.perf_counter() - t0)
        if result.dlq or len(result.answers) != len(part):
            reason = orjson.loads(result.dlq[0][1]) if result.dlq else "an answer missing"
            raise ModelError(f"bench recommend: a request was not answered: {reason}")
        if first is None:
            first = [orjson.loads(value) for _, value in result.answers]
    cpu = time.process_time() - cpu
    per_batch = np.asarray(times) * 1e3
    seconds = float(per_batch.sum()) / 1e3
    figures = {
        "requests": len(messages),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(messages) / seconds, 1),
        "requests_per_cpu_s": round(len(messages) / cpu, 1) if cpu > 0 else None,
        "p50_ms": round(float(np.percentile(per_batch, 50)), 3),
        "p99_ms": round(float(np.percentile(per_batch, 99)), 3),
    }
    return figures, first or []
