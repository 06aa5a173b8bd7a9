"""`sketchstream train`: fit codebooks, replay history, train the MLP, write the artifact and the
evaluation report.

Output folder layout (``--out``)::

    <out>/<version>/     the model artifact (manifest.json, weights.safetensors, codebooks)
    <out>/report/        report.json, report.md, roc.png, calibration.png, scores.png

``<out>`` is an artifact store root: ``sketchstream evaluate --model <out>`` takes its latest
version. Heavy imports (torch, numpy) happen inside the command body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sketchstream.tools.options import (
    BaselinesOption,
    DataOption,
    ProgressOption,
    ThreadsOption,
)

__all__ = ["load_codebooks", "train"]


def load_codebooks(path: Path) -> dict:
    """Codebooks from a model artifact directory or a folder of ``codebook-<modality>.bin``."""
    from sketchstream.models.artifacts import MANIFEST, load_model_artifact
    from sketchstream.models.emde import Codebook

    if (path / MANIFEST).is_file():
        return dict(load_model_artifact(path).codebooks)
    files = sorted(path.glob("codebook-*.bin")) if path.is_dir() else [path]
    if not files:
        raise typer.BadParameter(f"{path}: no model artifact and no codebook-*.bin files")
    return {f.stem.removeprefix("codebook-"): Codebook.from_bytes(f.read_bytes()) for f in files}


def train(
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", help="Where the model artifact and report go.")],
    codebooks: Annotated[
        Path | None,
        typer.Option(
            "--codebooks",
            exists=True,
            help="Reuse these codebooks (a model artifact or codebook-*.bin files) instead of "
            "fitting Cleora + EMDE on the training period.",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Upper bound on epochs.")] = 6,
    hidden: Annotated[int, typer.Option(min=1, help="Width of the residual blocks.")] = 512,
    blocks: Annotated[int, typer.Option(min=0, help="Residual blocks.")] = 2,
    depth: Annotated[int, typer.Option(min=1, help="EMDE codebook depth.")] = 12,
    width: Annotated[int, typer.Option(min=2, help="EMDE codebook width.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of codebooks, init and shuffling.")] = 0,
    baselines: BaselinesOption = True,
    threads: ThreadsOption = 0,
    progress: ProgressOption = True,
) -> None:
    """Train the engagement MLP on the protocol's training period and write a model artifact."""
    from sketchstream.models.artifacts import save_model_artifact
    from sketchstream.models.errors import SketchstreamError
    from sketchstream.models.events import DEFAULT_HEADS, stream_md5
    from sketchstream.models.trainer import TrainConfig, head_defs, run_protocol
    from sketchstream.tools.evaluate import read_data, report_for, start, summary

    t_all = start(threads)
    try:
        events, items, t_load = read_data(data)
        given = load_codebooks(codebooks) if codebooks is not None else None
        config = TrainConfig(
            epochs=epochs, hidden=hidden, blocks=blocks, depth=depth, width=width, seed=seed
        )
        result = run_protocol(
            events, items, config, codebooks=given, heads=DEFAULT_HEADS, progress=progress
        )
        metrics = {
            name: {split: {k: v for k, v in m.items()} for split, m in fig.items()}
            for name, fig in result.metrics.items()
        }
        version = save_model_artifact(
            out,
            model=result.model,
            codebooks=result.codebooks,
            aggregator_config=result.aggregator_config,
            item_snapshot=result.item_snapshot,
            metrics=metrics,
            extra={
                "train": config.to_dict(),
                "head_defs": head_defs(DEFAULT_HEADS),
                "data": {"events": len(events), "stream_md5": stream_md5(events)},
                "codebooks_given": given is not None,
                "history": result.history,
            },
        )
    except SketchstreamError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    timings = {"load": t_load, **result.timings}
    report = report_for(
        out / "report",
        events=events,
        data_path=data,
        y=result.y,
        p=result.p,
        split=result.split,
        heads=result.metrics,
        version=version,
        codebooks=result.codebooks,
        timings=timings,
        baselines=baselines,
        t_start=t_all,
        items=items,
    )
    typer.echo(f"model {version} written to {out / version}")
    typer.echo(summary(report))
    typer.echo(f"report: {out / 'report' / 'report.md'}")
