"""The model a bench's worker serves: the one given, else the newest in the artifact dir, else
one trained here by the trainer's protocol on the bench's events (cached, rebuilt when the code
no longer loads it). Used by ``bench stream``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from sketchstream.tools.model_choice import refusal

__all__ = ["bench_model"]

log = logging.getLogger(__name__)


def bench_model(
    model_dir: Path | None,
    artifact_dir: Path,
    cache_dir: Path,
    training_lines: Callable[[], Sequence[bytes]],
    *,
    items_path: Path | None,
    hidden: int,
    blocks: int,
    say: Callable[[str], None],
) -> tuple[Path, str, str]:
    """The artifact store the worker serves from: ``model_dir`` when given, else
    ``artifact_dir`` when it holds a model, else a model built here (and cached under
    ``cache_dir``) by the trainer's protocol on ``training_lines()`` (codebooks on the first
    80 %, one epoch; item metadata from ``items_path`` when present).

    Returns ``(store root, version, how it was chosen)``.
    """
    from sketchstream.models.artifacts import ArtifactStore

    for root, how in ((model_dir, "given"), (artifact_dir, "newest in the artifact dir")):
        if root is not None and ArtifactStore(root).latest() is not None:
            return root, str(ArtifactStore(root).latest()), how
        if root is model_dir and model_dir is not None:
            raise FileNotFoundError(f"{model_dir}: no model artifact there")
    lines = training_lines()
    root = cache_dir / f"h{hidden}-b{blocks}-n{len(lines)}"
    version = ArtifactStore(root).latest()
    if version is not None:
        reason = refusal(root / str(version))
        if reason is None:
            return root, str(version), f"built earlier for the bench ({root})"
        log.info("bench model %s: %s", root / str(version), reason)
        say(f"the cached bench model {root / str(version)} no longer loads: rebuilding it")
        shutil.rmtree(root)
    say(f"building a bench model (hidden {hidden}, {blocks} blocks) on {len(lines):,} events ...")
    version = _train_model(root, lines, items_path, hidden=hidden, blocks=blocks)
    return root, version, f"built now for the bench ({root})"


def _train_model(
    root: Path, lines: Sequence[bytes], items_path: Path | None, *, hidden: int, blocks: int
) -> str:
    import numpy as np
    import orjson
    from sketchstream.models.artifacts import save_trained_artifact
    from sketchstream.models.events import DEFAULT_HEADS, EventTable, read_items
    from sketchstream.models.trainer import TrainConfig, head_defs, run_protocol

    recs = [orjson.loads(line) for line in lines]
    events = EventTable(
        user=np.array([r["user"] for r in recs], dtype=object),
        item=np.array([r["item"] for r in recs], dtype=object),
        action=np.array([r["action"] for r in recs], dtype=object),
        ts=np.array([float(r["ts"]) for r in recs]),
        value=np.array([r.get("value", np.nan) for r in recs], np.float32),
    )
    items = read_items(items_path) if items_path is not None and items_path.is_file() else None
    config = TrainConfig(epochs=1, hidden=hidden, blocks=blocks)
    result = run_protocol(events, items, config, heads=DEFAULT_HEADS, progress=False)
    extra = {"train": config.to_dict(), "head_defs": head_defs(DEFAULT_HEADS), "bench": True}
    return save_trained_artifact(root, result, extra=extra)
