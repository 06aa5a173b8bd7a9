"""Replay history through the worker's aggregator, fit codebooks, train and score the MLP.

Pure: no CLI, no printing (progress bars aside). The pieces, in the order ``train`` uses them:

* :func:`fit_codebooks` — Cleora + EMDE on the training period: the ``interactions`` modality
  from user→items hyperedges, the ``metadata`` modality from item→{title tokens, categories,
  tags, year} hyperedges (skipped when no item has metadata).
* :func:`replay` — run an ordered event stream through
  :meth:`~sketchstream.models.aggregator.Aggregator.score_then_fold`, the very call the streaming
  worker makes, micro-batch by micro-batch with every user's state kept in memory: each event
  is scored on the state built from the events before it, then folded in. Item-side
  features come from an :class:`~sketchstream.models.snapshot.ItemSnapshot` refreshed every
  ``item_refresh_s`` (:func:`~sketchstream.models.snapshot.refreshed_item_features`).
* :func:`~sketchstream.models.fit.train_choosing_codes` — the MLP fitted with early stopping
  on the validation period (:mod:`~sketchstream.models.fit`), with the item's sketch codes as
  an input or without, chosen on validation.
* :func:`run_protocol` — the evaluation protocol of DESIGN.md end to end; :func:`score_events`
  — replay + predict with a loaded model artifact.

Over 600 lines because these pieces are the one training pipeline, each a few dozen lines
used only here; the feature code they drive lives in the aggregator's modules.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from sketchstream.models.aggregator import Aggregator
from sketchstream.models.batches import EventBatch, Features
from sketchstream.models.boost import BOOST_HEADS, boost_heads, fit_boost
from sketchstream.models.channels import (
    DAY,
    AggregatorConfig,
    Channel,
    aggregator_config_from_dict,
    aggregator_config_to_dict,
)
from sketchstream.models.errors import ModelError
from sketchstream.models.fit import ITEM_CODES, train_choosing_codes, train_distilled, train_mlp
from sketchstream.models.mlp import (
    PRODUCTS,
    EngagementMLP,
    MLPConfig,
    MLPInputs,
    assemble,
    counts_columns,
    user_rate_columns,
)

__all__ = [
    "ProtocolResult",
    "Replayed",
    "TrainConfig",
    "fit_codebooks",
    "metadata_hyperedges",
    "replay",
    "run_protocol",
    "score_events",
    "train_mlp",
    "training_aggregator_config",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``sketchstream train`` can tune; saved in the model artifact's manifest."""

    # --- codebooks (Cleora + EMDE on the training period) -------------------------------
    cleora_dim: int = 128  # embedding width per modality
    cleora_iterations: int = 4  # Markov propagation steps
    depth: int = 12  # EMDE depth: independent partitions per codebook
    width: int = 64  # EMDE width: buckets per partition
    metadata: bool = True  # build the metadata modality when items carry metadata
    # --- replay --------------------------------------------------------------------------
    replay_batch: int = 4096  # events per score_then_fold call
    item_snapshot: bool = True  # item counts and rates from a refreshed snapshot, as features
    item_prior: float = 10.0  # pseudo-count shrinking item rates to the global rate
    item_refresh_s: float = 86_400.0  # offline refresh cadence of the snapshot (1 day)
    item_age: bool = False  # item age column (off: costs test AUC on MovieLens-1M)
    item_global_rate: bool = False  # global positive rate column (off: likewise)
    item_similarity: bool = True  # item-item CF columns (needs item_snapshot)
    similarity_top_k: int = 100  # neighbours kept per item
    # "liked" = value >= this, "disliked" = value < this; nan: the first head's value
    # threshold (like = rating >= 4 gives 4; reorder = purchase >= 1 gives 1), else 4
    similarity_like_min: float = math.nan
    # offline: rebuild the similarity at a boundary after this many new likes. On MovieLens-1M
    # (seed 0) 2,000, 5,000 and 20,000 gave test AUC 0.8127, 0.8127, 0.8126 (RCE 24.18, 24.20,
    # 24.18) with 167, 81 and 21 builds; each build costs ~0.15 s of the replay's refresh thread
    similarity_min_new_likes: int = 20_000
    # --- MLP -----------------------------------------------------------------------------
    hidden: int = 512
    blocks: int = 2
    dropout: float = 0.1
    leaky_slope: float = 0.01
    quantiles: int = 64  # dense columns also enter as their training CDF (MLPConfig.quantiles)
    # the counts columns (channel masses, hours since the last event, events) also enter
    # piecewise-linearly over this many quantile bins (MLPConfig.bins; 0: not)
    bins: int = 12
    members: int = 1  # networks averaged (MLPConfig.members)
    # > 0: first train a teacher MLP this wide, then fit the served one (``hidden``) to the
    # labels blended with the teacher's probabilities (``distill_weight`` of the teacher's):
    # a smaller, faster MLP that learns from a larger one (fit.train_distilled). 0: no teacher
    teacher_hidden: int = 0
    distill_weight: float = 0.5
    # the hidden layers' products at inference (MLPConfig.products): "int8", 16-bit fixed
    # point inputs and one-byte weights with exact integer sums (the scales fixed on the
    # training rows after training), "fixed16" (two-byte weights), or "float32"
    products: str = "int8"
    user_rates: bool = True  # the user's like rates off the channel masses (MLPConfig.user_rates)
    # the user's last gap, age and mean gap as inputs (AggregatorConfig.recency)
    recency: bool = True
    # the user's events within a day and a week as inputs (AggregatorConfig.windows); off:
    # return AUC +0.005 on ml-100k over five seeds, but ML-1M's engagement AUC -0.0013 in
    # seed 1 (seed 0 +0.0002) and nothing on its return head, README, Training
    windows: bool = False
    # the event's hour of the day and weekday as inputs (AggregatorConfig.calendar); off: on
    # ML-1M it moved both heads by seed (seed 0 up, seed 1 down 0.0016), README, Training
    calendar: bool = False
    # the event item's sketch codes as an MLP input (MLPConfig.modalities): "on", "off", or
    # "auto": race both for fit.RACE_EPOCHS epochs, go on with the one ahead on validation
    # AUC (fit.train_choosing_codes). The codes are an
    # item-identity input: on small data sets they overfit (validation picks "off"), on
    # large ones they add what the density and CF columns miss
    item_codes: str = "auto"
    # gradient-boosted trees on the dense inputs, their logit blended with these heads' at a
    # weight chosen on validation (models.boost): "return" (the return heads), "all", "off"
    boost: str = "return"
    # --- optimization --------------------------------------------------------------------
    epochs: int = 6  # upper bound; early stopping usually ends sooner
    patience: int = 1  # epochs without validation AUC gain before stopping
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 1024
    evals_per_epoch: int = 2  # validation checks per epoch (early stopping granularity)
    # > 0: validate and keep an exponential moving average of the weights over about this many
    # epochs of steps (0: the raw weights). The raw weights at lr 1e-3 are noisy from step to
    # step; the average is what early stopping judges and what is saved
    ema_epochs: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.products not in PRODUCTS:
            raise ModelError(f"products={self.products!r}: expected one of {', '.join(PRODUCTS)}")
        if self.item_codes not in ITEM_CODES:
            raise ModelError(
                f"item_codes={self.item_codes!r}: expected one of {', '.join(ITEM_CODES)}"
            )
        if self.boost not in BOOST_HEADS:
            raise ModelError(f"boost={self.boost!r}: expected one of {', '.join(BOOST_HEADS)}")
        if self.teacher_hidden < 0:
            raise ModelError(f"teacher_hidden={self.teacher_hidden}: expected 0 (none) or a width")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ModelError(f"distill_weight={self.distill_weight}: expected 0 to 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --- codebooks -------------------------------------------------------------------------------

_TOKEN = re.compile(r"[^\W_]+", re.UNICODE)
_STOPWORDS = frozenset({"a", "an", "and", "de", "in", "of", "on", "the", "to", "la", "le", "el"})


def metadata_hyperedges(items: Iterable[Any]) -> list[tuple[str, list[str]]]:
    """``[(item id, [token, ...]), ...]`` for items with any metadata, none for the others.

    Tokens are typed so that a genre never collides with a title word: ``w:toy``,
    ``c:comedy``, ``t:<tag>``, ``y:1995`` and ``d:1990s``.
    """
    edges = []
    for it in items:
        tokens: list[str] = []
        if getattr(it, "title", None):
            words = _TOKEN.findall(it.title.lower())
            tokens += [f"w:{w}" for w in words if w not in _STOPWORDS and not w.isdigit()]
        tokens += [f"c:{c.strip().lower()}" for c in getattr(it, "categories", ()) or () if c]
        tokens += [f"t:{t.strip().lower()}" for t in getattr(it, "tags", ()) or () if t]
        year = getattr(it, "year", None)
        if year is not None:
            tokens += [f"y:{year}", f"d:{year // 10 * 10}s"]
        tokens = list(dict.fromkeys(tokens))
        if tokens:
            edges.append((it.item, tokens))
    return edges


def fit_codebooks(
    train_events: Any,
    items: Sequence[Any] | None = None,
    *,
    dim: int = 128,
    iterations: int = 4,
    depth: int = 12,
    width: int = 64,
    metadata: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """``{modality: Codebook}`` fitted on the training period only.

    ``interactions``: Cleora on user→{items the user touched} hyperedges, EMDE on the item
    embeddings. ``metadata``: Cleora on item→{tokens} hyperedges (:func:`metadata_hyperedges`),
    present only when ``metadata`` and some item has metadata.
    """
    from sketchstream.models.cleora import Cleora, Hypergraph
    from sketchstream.models.emde import Codebook

    if len(train_events) == 0:
        raise ModelError("fit_codebooks: the training period has no events")
    codebooks: dict[str, Any] = {}
    t0 = time.perf_counter()
    graph = Hypergraph.from_edges(
        train_events.user, train_events.item, left_type="user", right_type="item"
    )
    cleora = Cleora(dim=dim, iterations=iterations, seed=seed).fit(graph)
    ids, vectors = cleora.embeddings_for("item")
    codebooks["interactions"] = Codebook(depth=depth, width=width, seed=seed).fit(vectors, ids)
    log.info("interactions codebook: %d items in %.1fs", len(ids), time.perf_counter() - t0)
    edges = metadata_hyperedges(items or ()) if metadata else []
    if edges:
        t0 = time.perf_counter()
        graph = Hypergraph.from_hyperedges(edges, left_type="item", right_type="token")
        cleora = Cleora(dim=dim, iterations=iterations, seed=seed + 1).fit(graph)
        ids, vectors = cleora.embeddings_for("item")
        codebooks["metadata"] = Codebook(depth=depth, width=width, seed=seed + 1).fit(vectors, ids)
        log.info("metadata codebook: %d items in %.1fs", len(ids), time.perf_counter() - t0)
    else:
        log.info("no item metadata: interactions modality only")
    return codebooks


def fit_codebooks_for(
    train_events: Any, items: Sequence[Any] | None, config: TrainConfig
) -> dict[str, Any]:
    """:func:`fit_codebooks` with a training configuration's codebook settings."""
    return fit_codebooks(
        train_events,
        items,
        dim=config.cleora_dim,
        iterations=config.cleora_iterations,
        depth=config.depth,
        width=config.width,
        metadata=config.metadata,
        seed=config.seed,
    )


# --- replay ----------------------------------------------------------------------------------


@dataclass
class Replayed:
    """What :func:`replay` returns: the aggregator's features over the whole stream."""

    features: Features  # over the whole stream, row per event
    seconds: float = 0.0


def replay(
    events: Any,
    aggregator: Aggregator,
    *,
    batch_size: int = 4096,
    progress: bool = True,
    windows: Iterable[tuple[np.ndarray, Any]] | None = None,
    on_window: Callable[[np.ndarray, Any, Any], None] | None = None,
) -> Replayed:
    """Score-then-fold an ordered stream through ``aggregator``; features row per event.

    ``events``: an :class:`~sketchstream.models.events.EventTable` in stream order. Every
    user's state lives in memory for the whole replay; each micro-batch of ``batch_size``
    events goes through ``aggregator.score_then_fold`` (the worker's call), so an event's
    features depend only on the events before it.

    ``windows``: refresh windows ``(rows, snapshot)`` in stream order
    (:func:`~sketchstream.models.snapshot.refresh_windows`; the stream must be in time order
    so each window is a run of consecutive rows). Batches then never cross a window, and each
    passes its window's ``snapshot.similarity`` (when set) as ``item_similarity``: the CF
    features read the similarity the refresh job had published at the event's time.
    ``on_window(rows, snapshot, features)`` is called per window while its snapshot is current.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    n = len(events)
    users, user_index = np.unique(events.user.astype(str), return_inverse=True)
    actions = list(aggregator.config.actions)
    action_of = {a: k for k, a in enumerate(actions)}
    raw_actions = events.action.astype(str)
    unknown = sorted(set(np.unique(raw_actions).tolist()) - set(action_of))
    if unknown:
        log.warning(
            "actions %s are not in the aggregator config; their events fold nothing", unknown
        )
    action = np.array([action_of.get(a, -1) for a in raw_actions.tolist()], dtype=np.int64)
    # every user starts empty: new_batch is load([None] * n_users) without the decoding
    state = aggregator.new_batch(len(users))
    parts = []
    bar = tqdm(total=n, desc="replay", unit="ev", disable=not progress, mininterval=1.0)

    def run(lo: int, hi: int, sim: Any) -> list[Features]:
        out = []
        for start in range(lo, hi, batch_size):
            rows = slice(start, min(start + batch_size, hi))
            # the table's event ids come along: duplicates dropped as the worker drops them
            batch = EventBatch.from_table(events, rows, user_index=user_index, action=action)
            out.append(aggregator.score_then_fold(state, batch, item_similarity=sim))
            bar.update(rows.stop - rows.start)
        return out

    if windows is None:
        parts = run(0, n, None)
    else:
        from sketchstream.models.snapshot import windows_ahead

        done = 0
        for rows, snapshot in windows_ahead(iter(windows)):
            rows = np.asarray(rows)
            if len(rows) == 0:
                continue
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            if lo != done or hi - lo != len(rows):
                raise ModelError(
                    "replay: refresh windows need the stream in time order (window rows "
                    f"{lo}..{hi - 1} after row {done - 1})"
                )
            got = run(lo, hi, getattr(snapshot, "similarity", None))
            if on_window is not None:
                on_window(rows, snapshot, Features.concat(got))
            parts += got
            done = hi
        if done != n:
            raise ModelError(f"replay: windows cover {done} of {n} events")
    bar.close()
    features = Features.concat(parts)
    secs = time.perf_counter() - t0
    log.info("replayed %d events of %d users in %.1fs", n, len(users), secs)
    return Replayed(features=features, seconds=secs)


# --- metrics ---------------------------------------------------------------------------------


def _split_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """:func:`sketchstream.models.metrics.binary_metrics` plus ``n`` and ``positive_rate``
    (rows with nan labels dropped): one head on one period of the protocol. nan figures when
    the period labels no event for the head (a return head whose horizon is longer than what
    follows the period), all but the log loss when it labels one class only."""
    from sketchstream.models.metrics import METRICS, binary_metrics, log_loss

    y = np.asarray(y, dtype=np.float64)
    keep = ~np.isnan(y)
    out = dict.fromkeys(METRICS, math.nan)
    if keep.any() and 0 < y[keep].mean() < 1:
        out = {k: float(v) for k, v in binary_metrics(y, p).items()}
    elif keep.any():
        out["logloss"] = float(log_loss(y[keep], np.asarray(p, dtype=np.float64)[keep]))
    out["n"] = int(keep.sum())
    out["positive_rate"] = float(y[keep].mean()) if keep.any() else float("nan")
    return out


# --- the protocol end to end -----------------------------------------------------------------


@dataclass
class ProtocolResult:
    """Everything ``train`` produces: the model and its parts, predictions and figures."""

    model: EngagementMLP
    codebooks: dict[str, Any]
    aggregator_config: dict[str, Any]
    item_snapshot: Any  # ItemSnapshot of the training period, or None (no item features)
    train_config: TrainConfig
    heads: tuple[str, ...]
    y: np.ndarray  # (n, heads) labels over the whole stream
    p: np.ndarray  # (n, heads) predictions over the whole stream (train rows in-sample)
    split: tuple[slice, slice, slice]
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, float]]
    timings: dict[str, float] = field(default_factory=dict)
    # per boosted head, what models.boost.fit_boost chose: weight, trees, validation AUCs
    boost: dict[str, dict[str, Any]] = field(default_factory=dict)


def _head_metrics(
    y: np.ndarray, p: np.ndarray, split: tuple[slice, slice, slice], heads: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for h, name in enumerate(heads):
        out[name] = {
            "val": _split_metrics(y[split[1], h], p[split[1], h]),
            "test": _split_metrics(y[split[2], h], p[split[2], h]),
        }
    return out


def build_inputs(
    events: Any,
    aggregator: Any,
    y: np.ndarray,
    *,
    heads: Sequence[str],
    item_snapshot: bool,
    prior: float = 10.0,
    refresh_s: float = 86_400.0,
    batch_size: int = 4096,
    progress: bool = True,
    snapshot_options: Mapping[str, Any] | None = None,
    user_rates: bool = False,
) -> tuple[MLPInputs, np.ndarray, Replayed]:
    """Replay and assemble: ``(inputs for every event, valid (n,) bool, the replay)``.
    ``user_rates``: :func:`~sketchstream.models.mlp.assemble`'s option.

    With ``item_snapshot``, item features are read off a snapshot refreshed every
    ``refresh_s`` from the events before each refresh boundary, as the refresh job serves them;
    ``snapshot_options`` (keyword arguments of
    :func:`~sketchstream.models.snapshot.refresh_windows`: ``item_age``, ``similarity``, ...)
    shape it. With a similarity, the replay runs window by window and the aggregator adds
    the CF columns from each window's similarity.
    """
    from sketchstream.models.snapshot import ItemSnapshot, refresh_windows

    if not item_snapshot:
        rep = replay(events, aggregator, batch_size=batch_size, progress=progress)
        item_features = None
    else:
        opts = dict(snapshot_options or {})
        t0 = time.perf_counter()
        probe = ItemSnapshot(
            heads, item_age=opts.get("item_age", False), global_rate=opts.get("global_rate", False)
        )
        item_features = np.zeros((len(events), len(probe.feature_names)), np.float32)
        items = np.asarray(events.item, dtype=object)
        ts = np.asarray(events.ts, dtype=np.float64)

        def on_window(rows: np.ndarray, snap: Any, _feats: Any) -> None:
            item_features[rows] = snap.features(items[rows], ts[rows])

        windows = refresh_windows(events, y, heads, prior=prior, refresh_s=refresh_s, **opts)
        rep = replay(
            events,
            aggregator,
            batch_size=batch_size,
            progress=progress,
            windows=windows,
            on_window=on_window,
        )
        log.info("replay with refreshed item snapshots in %.1fs", time.perf_counter() - t0)
    inputs = assemble(rep.features, item_features, user_rates=user_rates)
    valid = np.asarray(getattr(rep.features, "valid", np.ones(len(events), bool)), dtype=bool)
    return inputs, valid, rep


def snapshot_options(config: TrainConfig, heads: Sequence[Any] = ()) -> dict[str, Any]:
    """Keyword arguments of :func:`~sketchstream.models.snapshot.refresh_windows` that a
    training configuration asks for; ``heads`` (label heads, the first engagement head
    counts) settle an unset ``similarity_like_min``."""
    like_min = config.similarity_like_min
    if like_min is None or math.isnan(like_min):  # None: a manifest (JSON has no nan)
        from sketchstream.models.events import engagement_heads

        engaged = engagement_heads(heads)
        threshold = engaged[0].threshold if engaged else None
        like_min = 4.0 if threshold is None else float(threshold)
    return {
        "item_age": config.item_age,
        "global_rate": config.item_global_rate,
        "similarity": config.item_similarity,
        "similarity_top_k": config.similarity_top_k,
        "like_min": like_min,
        "similarity_min_new_likes": config.similarity_min_new_likes,
    }


def run_protocol(
    events: Any,
    items: Sequence[Any] | None = None,
    config: TrainConfig | None = None,
    *,
    codebooks: Mapping[str, Any] | None = None,
    heads: Sequence[Any] | None = None,
    aggregator_config: Any = None,
    progress: bool = True,
) -> ProtocolResult:
    """Fit codebooks (unless given) on the training period, replay the whole stream, train the
    MLP on the training period with early stopping on validation, score every event.

    ``events``: an :class:`~sketchstream.models.events.EventTable` in stream order.
    """
    from sketchstream.models.events import DEFAULT_HEADS, labels, protocol_known, protocol_split

    config = config or TrainConfig()
    heads = tuple(heads or DEFAULT_HEADS)
    head_names = tuple(h.name for h in heads)
    timings: dict[str, float] = {}
    split = protocol_split(len(events))
    y = labels(events, heads, protocol_known(split))
    item_heads, item_y = item_statistics_heads(heads, y)

    t0 = time.perf_counter()
    if codebooks is None:
        codebooks = fit_codebooks_for(events[split[0]], items, config)
    codebooks = dict(codebooks)
    timings["codebooks"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    agg_config = aggregator_config or training_aggregator_config(
        events[split[0]],
        heads,
        metadata="metadata" in codebooks,
        recency=config.recency,
        windows=config.windows,
        calendar=config.calendar,
    )
    aggregator = Aggregator(agg_config, codebooks)
    snap_opts = snapshot_options(config, heads)
    inputs, valid, rep = build_inputs(
        events,
        aggregator,
        item_y,
        heads=item_heads,
        item_snapshot=config.item_snapshot,
        prior=config.item_prior,
        refresh_s=config.item_refresh_s,
        batch_size=config.replay_batch,
        progress=progress,
        snapshot_options=snap_opts,
        user_rates=config.user_rates,
    )
    snapshot = None
    if config.item_snapshot:
        from sketchstream.models.snapshot import ItemSnapshot

        # the artifact's snapshot: as of the end of the training window
        snapshot = ItemSnapshot.from_events(
            events[split[0]],
            item_y[split[0]],
            item_heads,
            prior=config.item_prior,
            item_age=snap_opts["item_age"],
            global_rate=snap_opts["global_rate"],
            similarity=snap_opts["similarity"],
            similarity_top_k=snap_opts["similarity_top_k"],
            like_min=snap_opts["like_min"],
        )
    timings["replay"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    names = list(getattr(rep.features, "names", ()) or ())
    if config.user_rates:
        names += user_rate_columns(rep.features.take(slice(0, 0)))[1]
    names += list(getattr(rep.features, "cf_names", ()) or ())
    if snapshot is not None:
        names += snapshot.feature_names
    mlp_config = MLPConfig(
        n_dense=inputs.dense.shape[1],
        modalities=inputs.codes.shape[1],
        depth=inputs.codes.shape[2],
        width=next(iter(codebooks.values())).width,
        hidden=config.hidden,
        blocks=config.blocks,
        dropout=config.dropout,
        leaky_slope=config.leaky_slope,
        quantiles=config.quantiles,
        bins=config.bins if config.quantiles else 0,
        binned=counts_columns(rep.features) if config.bins and config.quantiles else (),
        members=config.members,
        products=config.products,
        user_rates=config.user_rates,
        heads=head_names,
        dense_names=tuple(names) if len(names) == inputs.dense.shape[1] else (),
    )
    labelled = ~np.isnan(y).all(axis=1)
    rows = np.arange(len(events))
    train_rows = rows[split[0]][(valid & labelled)[split[0]]]
    val_rows = rows[split[1]][(valid & labelled)[split[1]]]
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ModelError(
            f"nothing to train on: {len(train_rows)} labelled training events, "
            f"{len(val_rows)} validation events"
        )
    fit = {
        "epochs": config.epochs,
        "patience": config.patience,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "batch_size": config.batch_size,
        "evals_per_epoch": config.evals_per_epoch,
        "seed": config.seed,
        "progress": progress,
        "ema_epochs": config.ema_epochs,
    }
    train_in, val_in = inputs.take(train_rows), inputs.take(val_rows)
    first = (
        replace(mlp_config, hidden=config.teacher_hidden) if config.teacher_hidden else mlp_config
    )
    model, history = train_choosing_codes(
        train_in, y[train_rows], val_in, y[val_rows], first, config.item_codes, fit
    )
    if config.teacher_hidden:
        model, history = train_distilled(
            model,
            history,
            train_in,
            y[train_rows],
            val_in,
            y[val_rows],
            mlp_config,
            config.distill_weight,
            fit,
        )
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    p = model.predict(inputs)
    timings["predict"] = time.perf_counter() - t0
    metrics = _head_metrics(y, p, split, head_names)
    if config.products != "float32":
        t0 = time.perf_counter()
        model.calibrate_products(train_in)
        p_float = p
        p = model.predict(inputs)
        timings["calibrate"] = time.perf_counter() - t0
        float_metrics = metrics
        metrics = _head_metrics(y, p, split, head_names)
        for name in head_names:
            log.info(
                "%s products, %s: test AUC %.4f RCE %.2f (float32 products: %.4f, %.2f; "
                "largest probability difference %.1e)",
                config.products,
                name,
                metrics[name]["test"]["auc"],
                metrics[name]["test"]["rce"],
                float_metrics[name]["test"]["auc"],
                float_metrics[name]["test"]["rce"],
                float(np.nanmax(np.abs(p - p_float))),
            )
    boosted, boost_report = boost_heads(config.boost, heads), {}
    if boosted:
        import torch
        from scipy.special import logit

        t0 = time.perf_counter()
        # the MLP's own validation logits, from its float32 probabilities (clipped off 0 and 1)
        z_val = logit(np.clip(p[val_rows].astype(np.float64), 1e-30, 1.0 - 2.0**-24))
        model.boost, boost_report = fit_boost(
            boosted,
            head_names,
            (train_in.dense, y[train_rows]),
            (val_in.dense, y[val_rows], z_val),
            seed=config.seed,
            threads=torch.get_num_threads(),
        )
        if model.boost is not None:
            p = model.predict(inputs)
            metrics = _head_metrics(y, p, split, head_names)
        timings["boost"] = time.perf_counter() - t0
    return ProtocolResult(
        model=model,
        codebooks=codebooks,
        aggregator_config=aggregator_config_to_dict(agg_config),
        item_snapshot=snapshot,
        train_config=config,
        heads=head_names,
        y=y,
        p=p,
        split=split,
        metrics=metrics,
        history=history,
        timings=timings,
        boost=boost_report,
    )


@dataclass
class Scored:
    """What :func:`score_events` returns."""

    y: np.ndarray  # (n, heads) labels, nan where a head does not apply
    p: np.ndarray  # (n, heads) predictions
    split: tuple[slice, slice, slice]
    metrics: dict[str, dict[str, dict[str, float]]]
    timings: dict[str, float]


def score_events(
    bundle: Any, events: Any, *, batch_size: int = 4096, progress: bool = True
) -> Scored:
    """Replay ``events`` through a loaded model artifact's aggregator and score every event.

    The user state keeps updating through validation and test; the weights are the
    artifact's. Item features: a snapshot refreshed every ``item_refresh_s`` (the artifact's
    training setting) from the scored events before each boundary, as the refresh job would
    publish it; each window is scored through :class:`~sketchstream.models.scorer.Scorer`, the
    worker's scoring path.
    """
    from sketchstream.models.events import labels, protocol_known, protocol_split
    from sketchstream.models.scorer import Scorer
    from sketchstream.models.snapshot import DEFAULT_REFRESH_S, refresh_windows

    heads = bundle_heads(bundle)
    timings: dict[str, float] = {}
    split = protocol_split(len(events))
    y = labels(events, heads, protocol_known(split))
    t0 = time.perf_counter()
    aggregator = Aggregator(aggregator_config_from_dict(bundle.aggregator_config), bundle.codebooks)
    scorer = Scorer.from_bundle(bundle)
    items = np.asarray(events.item, dtype=object)
    ts = np.asarray(events.ts, dtype=np.float64)
    p = np.zeros((len(events), len(bundle.heads)), np.float32)
    snap = scorer.snapshot
    if snap is None:
        rep = replay(events, aggregator, batch_size=batch_size, progress=progress)
        timings["replay"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        p[:] = scorer.score(rep.features, items, ts)
        timings["predict"] = time.perf_counter() - t0
    else:
        train = bundle.manifest.get("config", {}).get("train", {})
        refresh_s = float(train.get("item_refresh_s") or DEFAULT_REFRESH_S)
        sim = scorer.item_similarity
        windows = refresh_windows(
            events,
            label_columns(y, bundle.heads, snap.heads),
            snap.heads,
            prior=snap.prior,
            refresh_s=refresh_s,
            item_age=snap.item_age,
            global_rate=snap.global_rate,
            similarity=sim is not None,
            similarity_top_k=sim.top_k if sim is not None else 100,
            like_min=sim.like_min if sim is not None else 4.0,
            similarity_min_new_likes=int(train.get("similarity_min_new_likes") or 2000),
        )

        spent = [0.0]

        def on_window(rows: np.ndarray, snapshot: Any, feats: Any) -> None:
            t = time.perf_counter()
            p[rows] = scorer.score(feats, items[rows], ts[rows], snapshot=snapshot)
            spent[0] += time.perf_counter() - t

        replay(
            events,
            aggregator,
            batch_size=batch_size,
            progress=progress,
            windows=windows,
            on_window=on_window,
        )
        # scoring ran window by window inside the replay: count it as predict, not replay
        timings["replay"] = time.perf_counter() - t0 - spent[0]
        timings["predict"] = spent[0]
    return Scored(
        y=y, p=p, split=split, metrics=_head_metrics(y, p, split, bundle.heads), timings=timings
    )


def item_statistics_heads(
    heads: Sequence[Any], y: np.ndarray
) -> tuple[tuple[str, ...], np.ndarray]:
    """The heads an item snapshot keeps rates of, and their label columns of ``y``: the
    engagement heads. A return head's label at an event is known only a horizon later, so a
    snapshot refreshed at ``T`` would read labels that depend on events after ``T``."""
    from sketchstream.models.events import engagement_heads

    names = tuple(h.name for h in engagement_heads(heads))
    return names, label_columns(y, [h.name for h in heads], names)


def label_columns(y: np.ndarray, heads: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
    """The columns of labels ``y (n, len(heads))`` of the heads named ``wanted``, in that order
    (an item snapshot's heads out of a model's)."""
    return y[:, [list(heads).index(h) for h in wanted]]


def bundle_heads(bundle: Any) -> list[Any]:
    """The label heads of a loaded model artifact (its ``head_defs``, else by name)."""
    from sketchstream.models.events import DEFAULT_HEADS, Head

    head_defs = bundle.manifest.get("config", {}).get("head_defs")
    if head_defs:
        return [
            Head(
                h["name"],
                tuple(h["actions"]),
                h.get("threshold"),
                tuple(h["applies_to"]) if h.get("applies_to") else None,
                horizon=h.get("horizon"),
            )
            for h in head_defs
        ]
    known = {h.name: h for h in DEFAULT_HEADS}
    return [known[name] for name in bundle.heads]


def head_defs(heads: Sequence[Any]) -> list[dict[str, Any]]:
    """JSON form of label heads, for the artifact (so ``evaluate`` labels the same way)."""
    defs = [
        {
            "name": h.name,
            "actions": list(h.actions),
            "threshold": h.threshold,
            "applies_to": list(h.applies_to) if h.applies_to else None,
        }
        for h in heads
    ]
    for d, h in zip(defs, heads, strict=True):
        if getattr(h, "horizon", None) is not None:
            d["horizon"] = h.horizon  # a return head; engagement heads keep the older form
    return defs


def training_aggregator_config(
    events: Any,
    heads: Sequence[Any] | None = None,
    *,
    metadata: bool = True,
    recent_half_life_days: float = 7.0,
    history_size: int = 128,
    recency: bool = True,
    windows: bool = False,
    calendar: bool = False,
) -> AggregatorConfig:
    """The aggregator channels ``train`` uses, derived from the data and the first
    engagement head (a return head's label is not known when an event is folded).

    Not tied to a data set: the actions are those of ``events``; for a head with a value
    threshold ``t`` (``like``: rating >= 4) the interactions modality gets positive (>= t) and
    negative (< t) channels, undecayed and with a ``recent_half_life_days`` half-life, plus —
    when the head's values take several levels — a "top" channel (the highest level) and a
    "bottom" one (below the level just under ``t``), which give the user's value histogram and
    finer density features. The metadata modality (when ``metadata``) gets undecayed positive
    and negative channels. A head without a threshold: one channel per action it counts as
    positive and one for the rest of the actions it applies to. A return head adds a channel
    of the user's activity with a one-day half-life. ``recency``, ``windows``, ``calendar``:
    the features' :data:`~sketchstream.models.channels.RECENCY`,
    :data:`~sketchstream.models.channels.WINDOWS` and
    :data:`~sketchstream.models.channels.CALENDAR` columns.
    """
    from sketchstream.models.events import DEFAULT_HEADS, engagement_heads

    engaged = engagement_heads(tuple(heads or DEFAULT_HEADS))
    actions = tuple(sorted(set(np.unique(events.action.astype(str)).tolist())))
    recent = recent_half_life_days * DAY
    mods = ["interactions"] + (["metadata"] if metadata else [])
    channels: list[Channel] = []
    head = engaged[0] if engaged else None  # none: one channel of everything (below)
    if head is not None and head.threshold is not None:
        acts = frozenset(a for a in head.actions if a in actions) or None
        t = float(head.threshold)
        on = np.isin(events.action.astype(str), list(head.actions))
        levels = np.unique(events.value[on & ~np.isnan(events.value)])
        pos, neg = {"min_value": t}, {"max_value": t}
        channels += [
            Channel("pos", "interactions", acts, **pos),
            Channel("neg", "interactions", acts, **neg),
            Channel("pos_recent", "interactions", acts, half_life_s=recent, **pos),
            Channel("neg_recent", "interactions", acts, half_life_s=recent, **neg),
        ]
        above, below = levels[levels >= t], levels[levels < t]
        if 0 < len(levels) <= 20 and len(above) >= 2:
            channels.append(Channel("top", "interactions", acts, min_value=float(above.max())))
        if 0 < len(levels) <= 20 and len(below) >= 2:
            channels.append(Channel("bottom", "interactions", acts, max_value=float(below.max())))
        if metadata:
            channels += [
                Channel("meta_pos", "metadata", acts, **pos),
                Channel("meta_neg", "metadata", acts, **neg),
            ]
    elif head is not None:
        positive = frozenset(a for a in head.actions if a in actions)
        rest = frozenset(set(head.applies_to or actions) - positive) & set(actions)
        for mod in mods:
            prefix = "" if mod == "interactions" else "meta_"
            if positive:
                channels.append(Channel(f"{prefix}pos", mod, positive))
            if rest:
                channels.append(Channel(f"{prefix}other", mod, frozenset(rest)))
            if mod == "interactions" and positive:
                channels.append(Channel("pos_recent", mod, positive, half_life_s=recent))
    if not channels:
        channels = [Channel("all", "interactions")]
    if any(h.is_return for h in heads or ()):  # the user's activity of the day
        channels.append(Channel("activity_1d", "interactions", half_life_s=DAY))
    return AggregatorConfig(
        channels=tuple(channels),
        actions=actions,
        history_size=history_size,
        recency=recency,
        windows=windows,
        calendar=calendar,
    )
