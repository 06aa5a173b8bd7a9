"""Replay history through the worker's aggregator, fit codebooks, train and score the MLP.

Pure: no CLI, no printing (progress bars aside). The pieces, in the order ``train`` uses them:

* :func:`fit_codebooks` — Cleora + EMDE on the training period: the ``interactions`` modality
  from user→items hyperedges, the ``metadata`` modality from item→{title tokens, categories,
  tags, year} hyperedges (skipped when no item has metadata).
* :func:`replay` — run an ordered event stream through
  :meth:`~sketchstream.models.state.Aggregator.score_then_fold`, the very call the streaming
  worker makes, micro-batch by micro-batch with every user's state kept in memory: each event
  is scored on the state built from the events before it, then folded in. Optional
  :class:`ItemStats` (online item counts and rates) are computed in the same pass, the same
  way (score, then fold).
* :func:`train_mlp` — Adam on masked binary cross-entropy, one head per engagement type,
  early stopping on the validation period's mean AUC, fixed seeds.
* :func:`run_protocol` — the evaluation protocol of DESIGN.md end to end; :func:`score_events`
  — replay + predict with a loaded model artifact.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from sketchstream.models.errors import ModelError
from sketchstream.models.mlp import EngagementMLP, MLPConfig, MLPInputs, assemble, to_tensors

__all__ = [
    "ItemStats",
    "ProtocolResult",
    "Replayed",
    "TrainConfig",
    "binary_metrics",
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
    item_stats: bool = True  # online item counts and rates as extra dense features
    item_prior: float = 10.0  # pseudo-count shrinking item rates to the global rate
    # --- MLP -----------------------------------------------------------------------------
    hidden: int = 512
    blocks: int = 2
    dropout: float = 0.1
    leaky_slope: float = 0.01
    # --- optimization --------------------------------------------------------------------
    epochs: int = 6  # upper bound; early stopping usually ends sooner
    patience: int = 1  # epochs without validation AUC gain before stopping
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 1024
    evals_per_epoch: int = 2  # validation checks per epoch (early stopping granularity)
    seed: int = 0

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


# --- online item statistics ------------------------------------------------------------------


def _exclusive_group_cumsum(keys: np.ndarray, q: np.ndarray) -> np.ndarray:
    """For each row j: the sum of ``q`` over earlier rows with the same key. ``q (n, k)``."""
    order = np.argsort(keys, kind="stable")
    qs = q[order]
    cs = np.cumsum(qs, axis=0) - qs
    ks = keys[order]
    start = np.ones(len(ks), dtype=bool)
    start[1:] = ks[1:] != ks[:-1]
    group_start = np.maximum.accumulate(np.where(start, np.arange(len(ks)), 0))
    cs = cs - cs[group_start]
    out = np.empty_like(cs)
    out[order] = cs
    return out


class ItemStats:
    """Online per-item counts and rates, score-then-fold, vectorized per micro-batch.

    For each event, features read from the events *before* it (earlier batches and earlier
    rows of the same batch): ``log1p`` of the item's event count; per head, the item's
    positive rate shrunk to the running global rate with ``prior`` pseudo-counts and
    ``log1p`` of its labelled count; the item's mean value (shrunk likewise); ``log1p`` of the
    item's age in days (time since its first event); the running global rate per head.
    """

    def __init__(self, heads: Sequence[str], prior: float = 10.0) -> None:
        self.heads = tuple(heads)
        self.prior = float(prior)
        self._index: dict[Any, int] = {}
        k = len(self.heads)
        # per item: [events, labelled_h..., positive_h..., value_count, value_sum]
        self._width = 1 + 2 * k + 2
        self._totals = np.zeros((0, self._width), dtype=np.float64)
        self._first_ts = np.zeros(0, dtype=np.float64)
        self._global = np.zeros(self._width, dtype=np.float64)

    def config(self) -> dict[str, Any]:
        """JSON-ready constructor arguments (the artifact stores them)."""
        return {"heads": list(self.heads), "prior": self.prior}

    @property
    def feature_names(self) -> list[str]:
        names = ["item_log_events"]
        for h in self.heads:
            names += [f"item_rate_{h}", f"item_log_labelled_{h}"]
        names += ["item_mean_value", "item_log_age_days"]
        names += [f"global_rate_{h}" for h in self.heads]
        return names

    def _rows(self, items: np.ndarray) -> np.ndarray:
        index = self._index
        rows = np.fromiter((index.setdefault(i, len(index)) for i in items), np.int64, len(items))
        grow = len(index) - len(self._totals)
        if grow > 0:
            self._totals = np.vstack([self._totals, np.zeros((grow, self._width))])
            self._first_ts = np.concatenate([self._first_ts, np.full(grow, np.nan)])
        return rows

    def score_then_fold(
        self, items: np.ndarray, ts: np.ndarray, y: np.ndarray, value: np.ndarray
    ) -> np.ndarray:
        """Features ``(n, s)`` float32 for a batch in stream order, then fold the batch in.

        ``items (n,)`` ids, ``ts (n,)`` float64 seconds, ``y (n, heads)`` float labels with nan
        where a head does not apply, ``value (n,)`` float with nan where absent.
        """
        n, k = len(items), len(self.heads)
        rows = self._rows(items)
        q = np.zeros((n, self._width), dtype=np.float64)
        q[:, 0] = 1.0
        labelled = ~np.isnan(y)
        q[:, 1 : 1 + k] = labelled
        q[:, 1 + k : 1 + 2 * k] = np.where(labelled, y, 0.0)
        has_value = ~np.isnan(value)
        q[:, 1 + 2 * k] = has_value
        q[:, 2 + 2 * k] = np.where(has_value, value, 0.0)
        before = self._totals[rows] + _exclusive_group_cumsum(rows, q)
        glob = self._global + np.cumsum(q, axis=0) - q
        # first event time: stored, else the first row of this item in the batch
        first = self._first_ts[rows]
        order = np.argsort(rows, kind="stable")
        rs = rows[order]
        start = np.ones(n, dtype=bool)
        start[1:] = rs[1:] != rs[:-1]
        gs = np.maximum.accumulate(np.where(start, np.arange(n), 0))
        batch_first = np.empty(n)
        batch_first[order] = ts[order][gs]
        first = np.where(np.isnan(first), batch_first, first)

        a = self.prior
        out = [np.log1p(before[:, 0])]
        g_lab = glob[:, 1 : 1 + k]
        g_rate = (glob[:, 1 + k : 1 + 2 * k] + 0.5) / (g_lab + 1.0)
        for h in range(k):
            lab, pos = before[:, 1 + h], before[:, 1 + k + h]
            out += [(pos + a * g_rate[:, h]) / np.maximum(lab + a, 1e-9), np.log1p(lab)]
        g_mean = (glob[:, 2 + 2 * k] + 3.0) / (glob[:, 1 + 2 * k] + 1.0)
        vsum, vcount = before[:, 2 + 2 * k], before[:, 1 + 2 * k]
        out.append((vsum + a * g_mean) / np.maximum(vcount + a, 1e-9) - g_mean)
        out.append(np.log1p(np.maximum(ts - first, 0.0) / 86400.0))
        out += [g_rate[:, h] for h in range(k)]

        np.add.at(self._totals, rows, q)
        self._global += q.sum(axis=0)
        fresh = np.isnan(self._first_ts[rows])
        self._first_ts[rows[fresh]] = batch_first[fresh]
        return np.stack(out, axis=1).astype(np.float32)


# --- replay ----------------------------------------------------------------------------------


@dataclass
class Replayed:
    """What :func:`replay` returns: the aggregator's features and the optional item stats."""

    features: Any  # state.Features over the whole stream, row per event
    item_stats: np.ndarray | None  # (n, s) float32 or None
    seconds: float = 0.0


def _concat_features(parts: list[Any]) -> Any:
    """Concatenate ``Features`` row-wise (array fields concatenated, the rest taken once)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    kwargs = {}
    for f in fields(first):
        v = getattr(first, f.name)
        if isinstance(v, np.ndarray):
            kwargs[f.name] = np.concatenate([getattr(p, f.name) for p in parts], axis=0)
        else:
            kwargs[f.name] = v
    return type(first)(**kwargs)


def replay(
    events: Any,
    aggregator: Any,
    *,
    labels: np.ndarray | None = None,
    item_stats: ItemStats | None = None,
    batch_size: int = 4096,
    progress: bool = True,
) -> Replayed:
    """Score-then-fold an ordered stream through ``aggregator``; features row per event.

    ``events``: an :class:`~sketchstream.models.events.EventTable` in stream order. Every
    user's state lives in memory for the whole replay; each micro-batch of ``batch_size``
    events goes through ``aggregator.score_then_fold`` (the worker's call), so an event's
    features depend only on the events before it. ``labels (n, heads)`` feed ``item_stats``.
    """
    from sketchstream.models.state import EventBatch
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
    stats = []
    offsets = np.arange(n, dtype=np.int64)
    bar = tqdm(total=n, desc="replay", unit="ev", disable=not progress, mininterval=1.0)
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        batch = EventBatch(
            user_index=user_index[rows],
            item=events.item[rows],
            action=action[rows],
            value=events.value[rows],
            ts=events.ts[rows],
            partition=np.zeros(rows.stop - rows.start, dtype=np.int32),
            offset=offsets[rows],
        )
        parts.append(aggregator.score_then_fold(state, batch))
        if item_stats is not None:
            y = labels[rows] if labels is not None else np.full((rows.stop - start, 0), np.nan)
            stats.append(
                item_stats.score_then_fold(
                    events.item[rows], events.ts[rows], y, events.value[rows]
                )
            )
        bar.update(rows.stop - rows.start)
    bar.close()
    features = _concat_features(parts)
    secs = time.perf_counter() - t0
    log.info("replayed %d events of %d users in %.1fs", n, len(users), secs)
    return Replayed(
        features=features,
        item_stats=np.concatenate(stats, axis=0) if stats else None,
        seconds=secs,
    )


# --- metrics ---------------------------------------------------------------------------------


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """:func:`sketchstream.models.metrics.binary_metrics` plus ``n`` and ``positive_rate``
    (rows with nan labels dropped)."""
    from sketchstream.models import metrics as m

    y = np.asarray(y, dtype=np.float64)
    keep = ~np.isnan(y)
    out = {k: float(v) for k, v in m.binary_metrics(y, p).items()}
    out["n"] = int(keep.sum())
    out["positive_rate"] = float(y[keep].mean()) if keep.any() else float("nan")
    return out


def _mean_auc(y: np.ndarray, p: np.ndarray) -> float:
    from sketchstream.models.metrics import roc_auc as roc_auc_score

    aucs = []
    for h in range(y.shape[1]):
        keep = ~np.isnan(y[:, h])
        if keep.any() and 0 < y[keep, h].mean() < 1:
            aucs.append(roc_auc_score(y[keep, h], p[keep, h]))
    return float(np.mean(aucs)) if aucs else float("nan")


# --- training --------------------------------------------------------------------------------


def train_mlp(
    train: MLPInputs,
    y_train: np.ndarray,
    val: MLPInputs,
    y_val: np.ndarray,
    config: MLPConfig,
    *,
    epochs: int = 6,
    patience: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    batch_size: int = 1024,
    evals_per_epoch: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> tuple[EngagementMLP, list[dict[str, float]]]:
    """Train an :class:`EngagementMLP`; return the best model (by validation AUC) and history.

    ``y_* (n, heads)`` float labels, nan where a head does not apply (masked out of the loss).
    Validation runs ``evals_per_epoch`` times per epoch; training stops after ``patience``
    epochs' worth of checks without improvement. Seeds torch and the shuffling generator.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = EngagementMLP(config)
    model.set_normalization(train.dense)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(train)
    steps_per_epoch = max(1, -(-n // batch_size))
    total_steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total_steps, pct_start=0.05, anneal_strategy="cos"
    )
    check_every = max(1, steps_per_epoch // max(1, evals_per_epoch))
    y_t = torch.from_numpy(np.nan_to_num(y_train, nan=0.0).astype(np.float32))
    m_t = torch.from_numpy((~np.isnan(y_train)).astype(np.float32))
    dense_all, codes_all = to_tensors(train)
    best_auc, best_state, bad, history = -np.inf, None, 0, []
    step = 0
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, mininterval=1.0)
    stop = False
    for epoch in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(n))
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            logits = model(dense_all[idx], codes_all[idx])
            mask = m_t[idx]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y_t[idx], weight=mask, reduction="sum"
            ) / mask.sum().clamp(min=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % check_every == 0 or b == steps_per_epoch - 1:
                p_val = model.predict(val)
                auc = _mean_auc(y_val, p_val)
                history.append(
                    {
                        "epoch": epoch + step % steps_per_epoch / steps_per_epoch,
                        "step": step,
                        "loss": loss.item(),
                        "val_auc": auc,
                    }
                )
                bar.set_postfix(val_auc=f"{auc:.4f}")
                log.info("step %d epoch %d: val AUC %.4f", step, epoch, auc)
                if auc > best_auc + 1e-5:
                    best_auc, bad = auc, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad += 1
                    if bad >= patience * max(1, evals_per_epoch):
                        stop = True
                        break
        if stop:
            log.info("early stop at epoch %d (best val AUC %.4f)", epoch, best_auc)
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


# --- the protocol end to end -----------------------------------------------------------------


@dataclass
class ProtocolResult:
    """Everything ``train`` produces: the model and its parts, predictions and figures."""

    model: EngagementMLP
    codebooks: dict[str, Any]
    aggregator_config: dict[str, Any]
    item_stats: dict[str, Any] | None
    train_config: TrainConfig
    heads: tuple[str, ...]
    y: np.ndarray  # (n, heads) labels over the whole stream
    p: np.ndarray  # (n, heads) predictions over the whole stream (train rows in-sample)
    split: tuple[slice, slice, slice]
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, float]]
    timings: dict[str, float] = field(default_factory=dict)


def aggregator_config_to_dict(config: Any) -> dict[str, Any]:
    """JSON form of an ``AggregatorConfig`` (its own ``to_dict`` when it has one)."""
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return _jsonable(asdict(config))


def aggregator_config_from_dict(d: Mapping[str, Any]) -> Any:
    """Inverse of :func:`aggregator_config_to_dict`."""
    from sketchstream.models import state

    if hasattr(state.AggregatorConfig, "from_dict"):
        return state.AggregatorConfig.from_dict(d)
    d = _unjson(dict(d))
    channels = []
    for c in d.pop("channels", ()):
        c = dict(c)
        if c.get("actions") is not None:
            c["actions"] = frozenset(c["actions"])
        channels.append(state.Channel(**c))
    return state.AggregatorConfig(channels=tuple(channels), **d)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, frozenset | set):
        return sorted(_jsonable(v) for v in obj)
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)  # "inf": JSON has no infinity
    return obj


def _unjson(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _unjson(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_unjson(v) for v in obj)
    if obj in ("inf", "-inf", "nan"):
        return float(obj)
    return obj


def _head_metrics(
    y: np.ndarray, p: np.ndarray, split: tuple[slice, slice, slice], heads: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    out = {}
    for h, name in enumerate(heads):
        out[name] = {
            "val": binary_metrics(y[split[1], h], p[split[1], h]),
            "test": binary_metrics(y[split[2], h], p[split[2], h]),
        }
    return out


def build_inputs(
    events: Any,
    aggregator: Any,
    y: np.ndarray,
    *,
    item_stats: ItemStats | None,
    batch_size: int,
    progress: bool,
) -> tuple[MLPInputs, np.ndarray, Replayed]:
    """Replay and assemble: ``(inputs for every event, valid (n,) bool, the replay)``."""
    rep = replay(
        events,
        aggregator,
        labels=y,
        item_stats=item_stats,
        batch_size=batch_size,
        progress=progress,
    )
    inputs = assemble(rep.features, rep.item_stats)
    valid = np.asarray(getattr(rep.features, "valid", np.ones(len(events), bool)), dtype=bool)
    return inputs, valid, rep


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
    from sketchstream.models import state
    from sketchstream.models.events import DEFAULT_HEADS, labels, protocol_split

    config = config or TrainConfig()
    heads = tuple(heads or DEFAULT_HEADS)
    head_names = tuple(h.name for h in heads)
    timings: dict[str, float] = {}
    split = protocol_split(len(events))
    y = labels(events, heads)

    t0 = time.perf_counter()
    if codebooks is None:
        codebooks = fit_codebooks(
            events[split[0]],
            items,
            dim=config.cleora_dim,
            iterations=config.cleora_iterations,
            depth=config.depth,
            width=config.width,
            metadata=config.metadata,
            seed=config.seed,
        )
    codebooks = dict(codebooks)
    timings["codebooks"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    agg_config = aggregator_config or training_aggregator_config(
        events[split[0]], heads, metadata="metadata" in codebooks
    )
    aggregator = state.Aggregator(agg_config, codebooks)
    stats = ItemStats(head_names, prior=config.item_prior) if config.item_stats else None
    inputs, valid, rep = build_inputs(
        events, aggregator, y, item_stats=stats, batch_size=config.replay_batch, progress=progress
    )
    timings["replay"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    names = list(getattr(rep.features, "names", ()) or ())
    if stats is not None:
        names += stats.feature_names
    mlp_config = MLPConfig(
        n_dense=inputs.dense.shape[1],
        modalities=inputs.codes.shape[1],
        depth=inputs.codes.shape[2],
        width=next(iter(codebooks.values())).width,
        hidden=config.hidden,
        blocks=config.blocks,
        dropout=config.dropout,
        leaky_slope=config.leaky_slope,
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
    model, history = train_mlp(
        inputs.take(train_rows),
        y[train_rows],
        inputs.take(val_rows),
        y[val_rows],
        mlp_config,
        epochs=config.epochs,
        patience=config.patience,
        lr=config.lr,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        evals_per_epoch=config.evals_per_epoch,
        seed=config.seed,
        progress=progress,
    )
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    p = model.predict(inputs)
    timings["predict"] = time.perf_counter() - t0
    metrics = _head_metrics(y, p, split, head_names)
    return ProtocolResult(
        model=model,
        codebooks=codebooks,
        aggregator_config=aggregator_config_to_dict(agg_config),
        item_stats=stats.config() if stats is not None else None,
        train_config=config,
        heads=head_names,
        y=y,
        p=p,
        split=split,
        metrics=metrics,
        history=history,
        timings=timings,
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

    The state keeps updating through validation and test; the weights are the artifact's.
    """
    from sketchstream.models import state
    from sketchstream.models.events import DEFAULT_HEADS, Head, labels, protocol_split

    heads_by_name = {h.name: h for h in DEFAULT_HEADS}
    head_defs = bundle.manifest.get("config", {}).get("head_defs")
    if head_defs:
        heads = [
            Head(
                h["name"],
                tuple(h["actions"]),
                h.get("threshold"),
                tuple(h["applies_to"]) if h.get("applies_to") else None,
            )
            for h in head_defs
        ]
    else:
        heads = [heads_by_name[name] for name in bundle.heads]
    timings: dict[str, float] = {}
    split = protocol_split(len(events))
    y = labels(events, heads)
    t0 = time.perf_counter()
    aggregator = state.Aggregator(
        aggregator_config_from_dict(bundle.aggregator_config), bundle.codebooks
    )
    stats = ItemStats(**bundle.item_stats) if bundle.item_stats else None
    inputs, _, _ = build_inputs(
        events, aggregator, y, item_stats=stats, batch_size=batch_size, progress=progress
    )
    timings["replay"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = bundle.model.predict(inputs)
    timings["predict"] = time.perf_counter() - t0
    return Scored(
        y=y, p=p, split=split, metrics=_head_metrics(y, p, split, bundle.heads), timings=timings
    )


def head_defs(heads: Sequence[Any]) -> list[dict[str, Any]]:
    """JSON form of label heads, for the artifact (so ``evaluate`` labels the same way)."""
    return [
        {
            "name": h.name,
            "actions": list(h.actions),
            "threshold": h.threshold,
            "applies_to": list(h.applies_to) if h.applies_to else None,
        }
        for h in heads
    ]


def training_aggregator_config(
    events: Any,
    heads: Sequence[Any] | None = None,
    *,
    metadata: bool = True,
    recent_half_life_days: float = 7.0,
    history_size: int = 128,
) -> Any:
    """The aggregator channels ``train`` uses, derived from the data and the first head.

    Not tied to a data set: the actions are those of ``events``; for a head with a value
    threshold ``t`` (``like``: rating >= 4) the interactions modality gets positive (>= t) and
    negative (< t) channels, undecayed and with a ``recent_half_life_days`` half-life, plus —
    when the head's values take several levels — a "top" channel (the highest level) and a
    "bottom" one (below the level just under ``t``), which give the user's value histogram and
    finer density features. The metadata modality (when ``metadata``) gets undecayed positive
    and negative channels. A head without a threshold: one channel per action it counts as
    positive and one for the rest of the actions it applies to.
    """
    from sketchstream.models.events import DEFAULT_HEADS
    from sketchstream.models.state import DAY, AggregatorConfig, Channel

    heads = tuple(heads or DEFAULT_HEADS)
    head = heads[0]
    actions = tuple(sorted(set(np.unique(events.action.astype(str)).tolist())))
    recent = recent_half_life_days * DAY
    mods = ["interactions"] + (["metadata"] if metadata else [])
    channels: list[Any] = []
    if head.threshold is not None:
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
    else:
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
    return AggregatorConfig(channels=tuple(channels), actions=actions, history_size=history_size)
