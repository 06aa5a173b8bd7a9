"""`sketchstream train`: fit codebooks, replay history, train the MLP, write the artifact and the
evaluation report.

Output folder layout (``--out``)::

    <out>/<version>/     the model artifact (manifest.json, weights.safetensors, codebooks)
    <out>/report/        report.json, report.md, roc.png, calibration.png, scores.png

``<out>`` is an artifact store root: ``sketchstream evaluate --model <out>`` takes its latest
version. Heavy imports (torch, numpy) happen inside the command body.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from sketchstream.tools.options import (
    BaselinesOption,
    DataOption,
    HeadOption,
    ProgressOption,
    ThreadsOption,
    exit_on_error,
)

__all__ = [
    "Boost",
    "ItemCodes",
    "Products",
    "RecProducts",
    "load_codebooks",
    "train",
    "train_model",
]


class ItemCodes(StrEnum):
    """``--item-codes``: the values of ``TrainConfig.item_codes``."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Products(StrEnum):
    """``--products``: the values of ``TrainConfig.products``."""

    FIXED16 = "fixed16"
    INT8 = "int8"
    FLOAT32 = "float32"


class Boost(StrEnum):
    """``--boost``: the values of ``TrainConfig.boost``."""

    RETURN = "return"
    ALL = "all"
    OFF = "off"


class RecProducts(StrEnum):
    """``--recommender-products``: the values of ``RecommendConfig.products``."""

    INT8 = "int8"
    FLOAT32 = "float32"


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
    teacher_hidden: Annotated[
        int,
        typer.Option(
            min=0,
            help="Train a teacher MLP this wide first, then the served one (--hidden) on the "
            "labels blended half and half with the teacher's probabilities: a smaller, faster "
            "MLP taught by a larger one (0: none; `train` takes ~1.3x as long on ML-1M). "
            "--hidden 256 --teacher-hidden 512 drains ~25 % more events/s than hidden 512, at "
            "test AUC -0.0004 (ml-1m) to -0.006 (instacart), seed 0 (README, Benchmarks).",
        ),
    ] = 0,
    blocks: Annotated[int, typer.Option(min=0, help="Residual blocks.")] = 2,
    depth: Annotated[int, typer.Option(min=1, help="EMDE codebook depth.")] = 12,
    width: Annotated[int, typer.Option(min=2, help="EMDE codebook width.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of codebooks, init and shuffling.")] = 0,
    item_codes: Annotated[
        ItemCodes,
        typer.Option(
            help="The event item's sketch codes as an MLP input: on, off, or auto (train "
            "both for two epochs, go on with the one ahead on validation AUC: two epochs "
            "more than on or off). Small data sets usually pick off: the codes are an "
            "item-identity input.",
        ),
    ] = ItemCodes.AUTO,
    products: Annotated[
        Products,
        typer.Option(
            help="How the served MLP computes its hidden layers' matrix products: int8 "
            "(inputs as 16-bit fixed point, the inputs' ranges taken from the training rows "
            "after training, one-byte weights, exact integer sums on the CPU's int8 units: "
            "two integer products a layer), fixed16 (two-byte weights, three products; closer "
            "to float32) or float32. The log gives the test figures with float32 products "
            "too. At hidden 512 int8 takes ~10 % off the worker's work per batch against "
            "fixed16; test AUC within 0.0006 of float32 on the MovieLens sets and 0.0022 on "
            "instacart over three seeds; at hidden 256 the drain is faster with float32 "
            "(README, Benchmarks).",
        ),
    ] = Products.INT8,
    boost: Annotated[
        Boost,
        typer.Option(
            help="Gradient-boosted trees (LightGBM, at most 100 of 15 leaves) on the MLP's own "
            "dense inputs, their logit blended with a head's at the weight validation AUC "
            "picks (0 to 1 by 0.1; 0: the MLP alone, no trees kept): on the return heads "
            "(default), all heads, or off. The served model applies them, worker included; "
            "the report gives each head's weight and validation AUC with and without.",
        ),
    ] = Boost.RETURN,
    head: HeadOption = None,
    baselines: BaselinesOption = True,
    threads: ThreadsOption = 0,
    progress: ProgressOption = True,
    recommender: Annotated[
        bool,
        typer.Option(
            help="Also train the top-k recommender (the EMDE next-item model on the same user "
            "state) into the artifact, for the worker's recommend topic; the report gets its "
            "test HR@10, NDCG@10 and MRR. Replays the stream once more and trains a second "
            "model on the whole training period (70-100 more minutes on MovieLens-1M on two "
            "cores, and ~15 GB of temporary files in TMPDIR; --recommender-train-events "
            "bounds both).",
        ),
    ] = False,
    recommender_epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --recommender: upper bound on its epochs (default 8; early stopping on "
            "validation NDCG@10).",
        ),
    ] = None,
    recommender_hidden: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --recommender: width of its hidden layers (default 1024). Smaller is "
            "faster to train and to serve, at some NDCG.",
        ),
    ] = None,
    recommender_train_events: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --recommender: learn from the last N events of the training period "
            "(default: all of it, as the SASRec and item-CF anchors do). Its inputs take "
            "~14 KB an event on MovieLens-1M (11 GB for all 800,167 training events); past "
            "2 GiB they are written to a temporary file (TMPDIR), not held in memory.",
        ),
    ] = None,
    recommender_target_width: Annotated[
        int | None,
        typer.Option(
            min=2,
            max=32767,
            help="With --recommender: buckets per level of the sketch it predicts (default "
            "512). Its own codebooks of the same Cleora embeddings, finer than the state's 64: "
            "wider tells more items apart when decoding (MovieLens-1M validation NDCG@10 "
            "after one epoch: 0.102 with the state's 64, 0.119 with 256, 0.129 with 512) "
            "and makes its output layer larger, to train and to serve.",
        ),
    ] = None,
    recommender_target_depth: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="With --recommender: levels per modality of the sketch it predicts (default "
            "12, as the state's). Each level is a partitioning; decoding adds the item's "
            "log-probability over levels, so serving time grows with them.",
        ),
    ] = None,
    recommender_products: Annotated[
        RecProducts | None,
        typer.Option(
            help="With --recommender: how the served recommender computes its matrix "
            "products (default int8: one-byte weights and 16-bit fixed-point inputs, ranges "
            "taken from training rows after training; its MLP ~2.9x faster at answer batches "
            "of 64, validation NDCG@10 the same to ~1e-4, the log gives both) or float32.",
        ),
    ] = None,
) -> None:
    """Train the engagement MLP on the protocol's training period and write a model artifact.

    The heads (--head) are recorded in the artifact; `evaluate` labels with them."""
    from sketchstream.models.errors import SketchstreamError
    from sketchstream.models.recommend import RecommendConfig
    from sketchstream.models.trainer import TrainConfig
    from sketchstream.tools.evaluate import data_heads, start, summary

    sizing = {
        "epochs": recommender_epochs,
        "hidden": recommender_hidden,
        "train_events": recommender_train_events,
        "target_width": recommender_target_width,
        "target_depth": recommender_target_depth,
        "products": None if recommender_products is None else recommender_products.value,
    }
    sizing = {k: v for k, v in sizing.items() if v is not None}
    if sizing and not recommender:
        flags = ", ".join(f"--recommender-{k.replace('_', '-')}" for k in sizing)
        raise typer.BadParameter(f"{flags} sizes the recommender: add --recommender")
    t_all = start(threads)
    try:
        heads = data_heads(data, head)
    except SketchstreamError as exc:
        raise typer.BadParameter(str(exc), param_hint="--head") from None
    config = TrainConfig(
        epochs=epochs,
        hidden=hidden,
        teacher_hidden=teacher_hidden,
        blocks=blocks,
        depth=depth,
        width=width,
        seed=seed,
        item_codes=item_codes.value,
        products=products.value,
        boost=boost.value,
    )
    with exit_on_error():
        given = load_codebooks(codebooks) if codebooks is not None else None
        version, report = train_model(
            data,
            out,
            config,
            heads=heads,
            codebooks=given,
            baselines=baselines,
            progress=progress,
            t_start=t_all,
            recommender=recommender,
            recommender_config=RecommendConfig(**sizing) if sizing else None,
        )
    specs = " ".join(h.spec for h in heads)
    typer.echo(f"model {version} written to {out / version} (heads {specs})")
    typer.echo(summary(report))
    typer.echo(f"report: {out / 'report' / 'report.md'}")


def train_model(
    data: Path,
    out: Path,
    config: Any,
    *,
    heads: Sequence[Any],
    codebooks: dict | None = None,
    baselines: bool = True,
    progress: bool = True,
    t_start: float | None = None,
    recommender: bool = False,
    recommender_config: Any = None,
) -> tuple[str, dict]:
    """The work of ``sketchstream train``: read ``data`` (refusing bad input before any work),
    run the protocol with ``config`` (a ``TrainConfig``) and ``heads``, save the artifact under
    ``out`` and the report under ``out/report``; returns ``(version, report)``. With
    ``recommender``, the top-k recommender is trained on the same codebooks and aggregator
    and saved in the artifact (``recommender_config``: its ``RecommendConfig``, None: the
    defaults).

    Raises :class:`~sketchstream.models.errors.SketchstreamError` on bad data.
    """
    import time

    from sketchstream.models.artifacts import save_trained_artifact
    from sketchstream.models.events import stream_md5
    from sketchstream.models.ranking import train_recommender
    from sketchstream.models.trainer import head_defs, run_protocol
    from sketchstream.tools.evaluate import read_data, report_for

    t_start = time.perf_counter() if t_start is None else t_start
    events, items, t_load = read_data(data)
    result = run_protocol(
        events, items, config, codebooks=codebooks, heads=heads, progress=progress
    )
    extra = {
        "train": config.to_dict(),
        "head_defs": head_defs(heads),
        "data": {"events": len(events), "stream_md5": stream_md5(events)},
        "codebooks_given": codebooks is not None,
        "history": result.history,
    }
    timings = {"load": t_load, **result.timings}
    # what --item-codes auto chose (or what was asked), in the manifest and the report
    extra["item_codes"] = "on" if result.model.config.modalities else "off"
    parts, more = None, {"item_codes": extra["item_codes"]}
    if result.boost:  # what the trees on the dense inputs added, head by head (models.boost)
        more["boost"] = result.boost
    if recommender:
        t0 = time.perf_counter()
        parts, more["recommend"] = train_recommender(
            events,
            items,
            result,
            seed=config.seed,
            progress=progress,
            config=recommender_config,
        )
        timings["recommender"] = time.perf_counter() - t0
        extra["recommend_figures"] = more["recommend"]  # the model's own, kept with it
    version = save_trained_artifact(out, result, extra=extra, recommender=parts)
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
        t_start=t_start,
        items=items,
        label_heads=heads,
        extra=more,
    )
    return version, report
