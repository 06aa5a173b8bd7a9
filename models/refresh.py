"""A refreshed model from a window of events, and the gate it must pass to be served.

Pure: an :class:`~sketchstream.models.events.EventTable` window in, a candidate and a verdict
out; the Kafka side (reading the window, publishing, scheduling) is
:mod:`sketchstream.stream.refresh`. The steps, in the order the refresh job runs them::

    window = stream_order(window)                     # (ts, user, item), as the protocol
    candidate = build_candidate(window, items, config)  # Cleora + EMDE + replay + MLP
    serving = score_serving(bundle, window)           # the served model, same holdout
    verdict = gate(candidate.holdout, serving, GateConfig(tolerance=0.002))

The window is split like the evaluation protocol (DESIGN.md, "Data"): the first 80 % trains
(codebooks, aggregator channels and MLP weights), the next 10 % validates early stopping, the
last 10 % — the window's most recent events — is the *holdout* both models are scored on. Each
model replays the whole window through its own aggregator from empty states (score, then
fold), so holdout events see the window's earlier events as features, never as training
labels: nothing from the holdout reaches the candidate's codebooks, channels or weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sketchstream.models.errors import ModelError

__all__ = [
    "Candidate",
    "GateConfig",
    "HeadComparison",
    "Verdict",
    "build_candidate",
    "fit_window_codebooks",
    "gate",
    "holdout_metrics",
    "score_serving",
    "stream_order",
    "train_config_of",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    """When a candidate may replace the serving model; compared per head on the holdout."""

    tolerance: float = 0.002  # AUC the candidate may lose against the serving model
    logloss_tolerance: float = 0.01  # log loss it may gain against the serving model
    hr_tolerance: float = 0.005  # recommendations' HR@10 it may lose (when both have them)

    def __post_init__(self) -> None:
        for name in ("tolerance", "logloss_tolerance", "hr_tolerance"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
                raise ModelError(f"gate {name} must be a finite number >= 0, got {value!r}")


@dataclass
class Candidate:
    """What :func:`build_candidate` returns: the trainer's result and the refresh's figures."""

    result: Any  # trainer.ProtocolResult: model, codebooks, aggregator config, metrics, ...
    holdout: dict[str, dict[str, float]]  # head -> {auc, logloss, ...} on the holdout
    timings: dict[str, float]  # graph_cleora, emde, replay, train, predict (seconds)
    window: dict[str, Any]  # events, first/last event time, holdout_from, items
    item_snapshot: Any = None  # ItemSnapshot of the whole window: what the workers serve with


@dataclass(frozen=True)
class HeadComparison:
    """One head's holdout figures, candidate against serving."""

    head: str
    candidate_auc: float
    candidate_logloss: float
    serving_auc: float | None = None
    serving_logloss: float | None = None

    @property
    def delta_auc(self) -> float | None:
        if self.serving_auc is None:
            return None
        return self.candidate_auc - self.serving_auc

    @property
    def delta_logloss(self) -> float | None:
        if self.serving_logloss is None:
            return None
        return self.candidate_logloss - self.serving_logloss

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": {"auc": self.candidate_auc, "logloss": self.candidate_logloss},
            "serving": None
            if self.serving_auc is None
            else {"auc": self.serving_auc, "logloss": self.serving_logloss},
            "delta_auc": self.delta_auc,
            "delta_logloss": self.delta_logloss,
        }


@dataclass(frozen=True)
class Verdict:
    """The gate's decision: publish or not, and why, in one line."""

    publish: bool
    reason: str
    heads: tuple[HeadComparison, ...] = field(default=())
    recommend: dict[str, Any] | None = None  # {"candidate", "serving"} HR@10, when judged

    def to_dict(self) -> dict[str, Any]:
        out = {
            "publish": self.publish,
            "reason": self.reason,
            "heads": {h.head: h.to_dict() for h in self.heads},
        }
        if self.recommend is not None:
            out["recommend"] = self.recommend
        return out


# --- the window ------------------------------------------------------------------------------


def stream_order(events: Any) -> Any:
    """``events`` sorted stably by ``(ts, user, item)``: the protocol's stream order.

    A window read from several Kafka partitions arrives interleaved by partition; replay needs
    one time-ordered stream.
    """
    from sketchstream.models.events import protocol_order

    if len(events) == 0:
        return events
    order = protocol_order(events.user, events.item, events.ts)
    if np.array_equal(order, np.arange(len(events))):
        return events
    return events[order]


def _window_info(events: Any, split: tuple[slice, slice, slice], items: int) -> dict[str, Any]:
    ts = np.asarray(events.ts)
    hold = split[2]
    return {
        "events": len(events),
        "users": len(np.unique(events.user.astype(str))),
        "items_with_metadata": int(items),
        "first_ts": float(ts[0]),
        "last_ts": float(ts[-1]),
        "train_events": int(split[0].stop - split[0].start),
        "validation_from": float(ts[split[1].start]) if split[1].start < len(ts) else None,
        "holdout_from": float(ts[hold.start]) if hold.start < len(ts) else None,
        "holdout_events": int(hold.stop - hold.start),
    }


# --- the candidate ---------------------------------------------------------------------------


def fit_window_codebooks(
    train_events: Any, items: Sequence[Any] | None, config: Any
) -> tuple[dict[str, Any], dict[str, float]]:
    """``({modality: Codebook}, {"graph_cleora": s, "emde": s})`` on the training part.

    The trainer's codebooks (same graphs, seeds and sizes as
    :func:`~sketchstream.models.trainer.fit_codebooks`), with the two stages timed apart:
    building the graphs and propagating Cleora, then fitting the EMDE partitions.
    ``config``: a :class:`~sketchstream.models.trainer.TrainConfig`.
    """
    from sketchstream.models.cleora import Cleora, Hypergraph
    from sketchstream.models.emde import Codebook
    from sketchstream.models.trainer import metadata_hyperedges

    if len(train_events) == 0:
        raise ModelError("refresh: the window's training part has no events")
    timings = {"graph_cleora": 0.0, "emde": 0.0}
    graphs: list[tuple[str, Any, int]] = []
    t0 = time.perf_counter()
    graphs.append(
        (
            "interactions",
            Hypergraph.from_edges(
                train_events.user, train_events.item, left_type="user", right_type="item"
            ),
            config.seed,
        )
    )
    edges = metadata_hyperedges(items or ()) if config.metadata else []
    if edges:
        graphs.append(
            (
                "metadata",
                Hypergraph.from_hyperedges(edges, left_type="item", right_type="token"),
                config.seed + 1,
            )
        )
    codebooks: dict[str, Any] = {}
    for modality, graph, seed in graphs:
        cleora = Cleora(dim=config.cleora_dim, iterations=config.cleora_iterations, seed=seed)
        ids, vectors = cleora.fit(graph).embeddings_for("item")
        t1 = time.perf_counter()
        timings["graph_cleora"] += t1 - t0
        codebooks[modality] = Codebook(depth=config.depth, width=config.width, seed=seed).fit(
            vectors, ids
        )
        t0 = time.perf_counter()
        timings["emde"] += t0 - t1
        log.info(
            "%s codebook: %d items, graph + Cleora on %s, %.1fs so far",
            modality,
            len(ids),
            cleora.device_,
            timings["graph_cleora"] + timings["emde"],
        )
    return codebooks, timings


def holdout_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{head: {auc, logloss, ...}}``: the ``test`` split of the trainer's per-head metrics
    (the window's holdout)."""
    return {head: dict(fig["test"]) for head, fig in metrics.items()}


def build_candidate(
    window: Any,
    items: Sequence[Any] | None = None,
    config: Any = None,
    *,
    heads: Sequence[Any] | None = None,
    progress: bool = False,
) -> Candidate:
    """Codebooks, aggregator channels and MLP trained on ``window`` less its holdout.

    ``window``: an EventTable in stream order (:func:`stream_order`). ``config``: a
    :class:`~sketchstream.models.trainer.TrainConfig` (default: the trainer's). The training
    itself is the trainer's :func:`~sketchstream.models.trainer.run_protocol` with the
    codebooks of :func:`fit_window_codebooks`, so a refreshed model is trained exactly as
    ``sketchstream train`` trains one.
    """
    from sketchstream.models.events import DEFAULT_HEADS, protocol_split
    from sketchstream.models.trainer import TrainConfig, label_columns, run_protocol

    config = config or TrainConfig()
    heads = tuple(heads or DEFAULT_HEADS)
    n = len(window)
    split = protocol_split(n)
    if split[1].stop - split[1].start < 1 or split[2].stop - split[2].start < 1:
        raise ModelError(
            f"refresh: a window of {n} events is too small to train, validate and hold out; "
            "widen it (--window) or lower the cadence"
        )
    codebooks, timings = fit_window_codebooks(window[split[0]], items, config)
    result = run_protocol(
        window, items, config, codebooks=codebooks, heads=heads, progress=progress
    )
    for name, seconds in result.timings.items():
        if name != "codebooks":
            timings[name] = seconds
    snapshot = None
    if getattr(result, "item_snapshot", None) is not None:
        from sketchstream.models.snapshot import ItemSnapshot

        # trained and gated with snapshots of the past; served with the freshest one: every
        # event of the window (labels are item statistics here, not training targets)
        trained = result.item_snapshot
        sim = trained.similarity
        snapshot = ItemSnapshot.from_events(
            window,
            label_columns(result.y, result.heads, trained.heads),
            trained.heads,
            prior=trained.prior,
            item_age=trained.item_age,
            global_rate=trained.global_rate,
            similarity=sim is not None,
            similarity_top_k=sim.top_k if sim is not None else 100,
            like_min=sim.like_min if sim is not None else 4.0,
        )
    return Candidate(
        result=result,
        holdout=holdout_metrics(result.metrics),
        timings=timings,
        window=_window_info(window, split, len(items or ())),
        item_snapshot=snapshot,
    )


def train_config_of(bundle: Any) -> Any:
    """The :class:`~sketchstream.models.trainer.TrainConfig` a model artifact was trained with
    (its manifest's ``config.train``), or None when it does not say."""
    from sketchstream.models.trainer import TrainConfig

    stored = (getattr(bundle, "manifest", None) or {}).get("config", {}).get("train")
    return TrainConfig.from_dict(stored) if isinstance(stored, Mapping) else None


# --- the serving model on the same holdout ---------------------------------------------------


def score_serving(
    bundle: Any, window: Any, *, batch_size: int = 4096, progress: bool = False
) -> dict[str, dict[str, float]]:
    """``{head: {auc, logloss, ...}}`` of a loaded model artifact on the window's holdout.

    The serving model replays the window (an EventTable in stream order) through *its*
    aggregator and codebooks, score then fold, exactly as :func:`build_candidate`'s candidate.
    """
    from sketchstream.models.trainer import score_events

    scored = score_events(bundle, window, batch_size=batch_size, progress=progress)
    return holdout_metrics(scored.metrics)


# --- the gate --------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def gate(
    candidate: Mapping[str, Mapping[str, Any]],
    serving: Mapping[str, Mapping[str, Any]] | None,
    config: GateConfig | None = None,
    *,
    recommend: tuple[Mapping[str, Any], Mapping[str, Any] | None] | None = None,
) -> Verdict:
    """Publish the candidate unless it is worse than the serving model beyond the tolerances.

    ``candidate``, ``serving``: ``{head: {"auc": ..., "logloss": ...}}`` on the same holdout
    (``serving`` None: nothing is served yet, so any usable candidate is published). Refused
    when a head of the serving model is missing from the candidate, when the candidate has no
    finite AUC or log loss on a head, or when on any head its AUC is lower by more than
    ``tolerance`` or its log loss higher by more than ``logloss_tolerance``. Heads the serving
    model cannot be measured on (one class only in the holdout) are compared on log loss alone.
    A head the holdout labels no event of (``"n": 0``: a return head whose horizon outruns the
    window) cannot be judged: it is compared with nothing and named in the verdict.
    ``recommend``: ``(candidate, serving)`` ``{"hr@10", ...}`` of the top-k recommenders on
    the same holdout (serving None: it has none); refused when the candidate's HR@10 is not
    finite or lower than the serving one's by more than ``hr_tolerance``.
    """
    config = config or GateConfig()
    comparisons: list[HeadComparison] = []
    problems: list[str] = []
    if serving is not None:
        missing = sorted(set(serving) - set(candidate))
        if missing:
            problems.append(f"the candidate has no head {', '.join(missing)}")
    unjudged = sorted(h for h in candidate if candidate[h].get("n") == 0)
    for head in sorted(set(candidate) - set(unjudged)):
        c_auc = _finite(candidate[head].get("auc"))
        c_ll = _finite(candidate[head].get("logloss"))
        s = serving.get(head) if serving is not None else None
        s_auc = _finite(s.get("auc")) if s is not None else None
        s_ll = _finite(s.get("logloss")) if s is not None else None
        comparisons.append(
            HeadComparison(
                head,
                c_auc if c_auc is not None else math.nan,
                c_ll if c_ll is not None else math.nan,
                s_auc,
                s_ll,
            )
        )
        if c_ll is None or (c_auc is None and s_auc is not None):
            problems.append(
                f"head {head}: the candidate has no finite AUC/log loss on the holdout "
                "(one class only, or too few labelled events)"
            )
            continue
        if s_auc is not None and c_auc is not None and c_auc < s_auc - config.tolerance:
            problems.append(
                f"head {head}: AUC {c_auc:.4f} vs serving {s_auc:.4f} "
                f"({c_auc - s_auc:+.4f}, tolerance {config.tolerance})"
            )
        if s_ll is not None and c_ll > s_ll + config.logloss_tolerance:
            problems.append(
                f"head {head}: log loss {c_ll:.4f} vs serving {s_ll:.4f} "
                f"({c_ll - s_ll:+.4f}, tolerance {config.logloss_tolerance})"
            )
    if not comparisons:
        problems.append("the candidate has no heads" + " judged" * bool(unjudged))
    judged = None
    if recommend is not None:
        c_hr = _finite(recommend[0].get("hr@10"))
        s_hr = _finite(recommend[1].get("hr@10")) if recommend[1] is not None else None
        judged = {"candidate": c_hr, "serving": s_hr, "tolerance": config.hr_tolerance}
        if c_hr is None:
            problems.append("recommend: the candidate has no finite HR@10 on the holdout")
        elif s_hr is not None and c_hr < s_hr - config.hr_tolerance:
            problems.append(
                f"recommend: HR@10 {c_hr:.4f} vs serving {s_hr:.4f} "
                f"({c_hr - s_hr:+.4f}, tolerance {config.hr_tolerance})"
            )
    # said in every verdict, so a refusal or a publication names them too
    note = f"; not judged (no labelled holdout event): {', '.join(unjudged)}" if unjudged else ""
    if problems:
        return Verdict(False, "; ".join(problems) + note, tuple(comparisons), judged)
    if serving is None:
        return Verdict(True, "no serving model to compare with" + note, tuple(comparisons), judged)
    summary = ", ".join(
        f"{c.head} AUC {c.candidate_auc:.4f} vs {c.serving_auc:.4f}"
        if c.serving_auc is not None
        else f"{c.head} log loss {c.candidate_logloss:.4f}"
        for c in comparisons
    )
    if judged is not None and judged["serving"] is not None:
        summary += f", recommend HR@10 {judged['candidate']:.4f} vs {judged['serving']:.4f}"
    verdict = f"not worse than serving within tolerance: {summary}{note}"
    return Verdict(True, verdict, tuple(comparisons), judged)
