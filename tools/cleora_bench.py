"""``sketchstream bench cleora``: Cleora graph build + propagation, ours vs pycleora, on a
seeded synthetic Zipf graph, each (implementation, dim) in a fresh process.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sketchstream.tools.bench_harness import peak_rss_mb, render, run_isolated

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CLEORA_SIZES",
    "DEFAULT_DIMS",
    "CleoraSize",
    "cleora_table",
    "run_bench",
    "synthetic_interactions",
]


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


def cleora_worker(spec: dict[str, Any]) -> dict[str, Any]:
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
        peak_rss_mb=round(peak_rss_mb(), 1),  # before the check's own buffers
        n_nodes=int(n_nodes),
        emb_shape=list(emb.shape),
    )
    if impl == "ours" and spec.get("check"):
        result.update(check_against_host(graph, emb, iterations))
    return result


def check_against_host(graph: Any, emb: np.ndarray, iterations: int) -> dict[str, Any]:
    """Ours again on the host path (``device="scipy"``, same graph and seed) against ``emb``:
    the largest absolute difference, the smallest cosine of a row with its host twin, and the
    mean share of the 10 nearest items (by cosine, on the GPU where torch sees one) that agree
    for up to 500 sampled items. Meant for ``--device cuda`` or ``cpu``."""
    import numpy as np
    import torch
    from sketchstream.models.cleora import Cleora

    t0 = time.perf_counter()
    ref = Cleora(dim=emb.shape[1], iterations=iterations, seed=0, device="scipy").fit(graph)
    host = ref.embeddings_
    check_s = time.perf_counter() - t0
    max_diff, min_cos = 0.0, 1.0
    step = 1 << 16  # row chunks: no third full-size buffer
    for a in range(0, host.shape[0], step):
        h, e = host[a : a + step], emb[a : a + step]
        max_diff = max(max_diff, float(np.abs(h - e).max()))
        live = np.linalg.norm(h, axis=1) > 0
        if live.any():
            min_cos = min(min_cos, float(np.einsum("ij,ij->i", h[live], e[live]).min()))
    items = graph.type_slice("item")
    n_items = items.stop - items.start
    k = min(10, n_items - 1)
    rng = np.random.default_rng(1)
    queries = torch.from_numpy(rng.choice(n_items, min(500, n_items), replace=False))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tops = []
    for x in (host, emb):
        block = torch.from_numpy(np.ascontiguousarray(x[items])).to(dev)
        q = queries.to(dev)
        sims = block[q] @ block.T
        sims[torch.arange(len(q), device=dev), q] = -2.0  # an item is not its own neighbour
        tops.append(sims.topk(k, dim=1).indices.cpu().numpy())
    same = np.mean([len(set(a) & set(b)) / k for a, b in zip(*tops, strict=True)])
    return {
        "check_scipy_s": round(check_s, 3),
        "check_max_abs_diff": max_diff,
        "check_min_row_cos": min_cos,
        "check_top10_same": round(float(same), 4),
    }


def run_bench(
    size_key: str,
    dims: Sequence[int],
    *,
    iterations: int,
    device: str,
    reference: bool,
    seed: int,
    say: Callable[[str], None],
    check: bool = False,
) -> list[dict[str, Any]]:
    """One row per (implementation, dim): ours, and pycleora when ``reference`` and installed
    (with ``ratio_vs_pycleora`` / ``rss_ratio_vs_pycleora`` on ours; with ``check``, the
    ``check_*`` keys of :func:`check_against_host`). Progress goes to ``say``."""
    import importlib.util

    n_users, n_items, n_inter = CLEORA_SIZES[size_key]
    has_ref = reference and importlib.util.find_spec("pycleora") is not None
    say(
        f"cleora bench, size {size_key}: {n_users:,} users x {n_items:,} items x "
        f"{n_inter:,} interactions (Zipf {ZIPF_EXPONENT}), {iterations} iterations, "
        f"dims {dims}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    if reference and not has_ref:
        say("pycleora is not installed: running ours alone.")

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
            say(
                f"pycleora input prep (TSV, {tsv.stat().st_size / 2**20:.0f} MiB): "
                f"{prep_s:.1f} s, not counted"
            )
        runs = [(impl, d) for d in dims for impl in (("pycleora",) if has_ref else ()) + ("ours",)]
        for k, (impl, d) in enumerate(runs, 1):
            say(f"[{k}/{len(runs)}] {impl}, dim {d} ...")
            spec = {
                "impl": impl,
                "size": size_key,
                "dim": d,
                "iterations": iterations,
                "seed": seed,
                "device": device,
                "check": check,
                "tsv": str(tsv),
            }
            res = run_isolated(spec, cleora_worker)
            if impl == "pycleora":
                res["prep_s"] = round(prep_s, 3)
            say(f"    total {res['total_s']:.2f} s, peak RSS {res['peak_rss_mb']:.0f} MB")
            rows.append(res)

    for r in rows:
        ref = next((x for x in rows if x["impl"] == "pycleora" and x["dim"] == r["dim"]), None)
        if r["impl"] == "ours" and ref is not None:
            r["ratio_vs_pycleora"] = round(r["total_s"] / ref["total_s"], 3)
            r["rss_ratio_vs_pycleora"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 3)
    return rows


def cleora_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`run_bench` as a text table."""
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
        ("check_max_abs_diff", "max |diff| vs scipy"),
        ("check_top10_same", "top-10 same"),
    ]
    return render(rows, cols)
