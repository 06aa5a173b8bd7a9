"""The worker's per-batch logic, free of Kafka: validate → score → fold → records out.

:class:`BatchProcessor` takes one micro-batch of raw messages (in consumption order, so every
partition's records are in offset order) and returns what the worker must do with it: the
prediction records, the dead letters, and the user-state table writes. It makes exactly one
state read (all the batch's users at once), one aggregator call, one MLP call. The batch handler
in :mod:`sketchstream.stream.app` only moves these bytes; tests drive this class directly.

The model being served is a :class:`ServingModel`; :meth:`BatchProcessor.swap` replaces it
between batches (the model feed hands over a new version; nothing pauses).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
from sketchstream.stream.metrics import WorkerMetrics
from sketchstream.stream.records import (
    DecodedEvents,
    EventLimits,
    decode_events,
    dlq_record,
    prediction_records,
)

__all__ = [
    "BatchProcessor",
    "BatchResult",
    "OnError",
    "ServingModel",
    "StateReader",
    "serving_model",
]

log = logging.getLogger(__name__)

#: ``read(partitions, keys) -> values``: the stored state of each key (None when new),
#: ``partitions (k,)`` and ``keys (k,)`` aligned; one call per batch.
StateReader = Callable[[Sequence[int], Sequence[bytes]], list[bytes | None]]

#: What :meth:`BatchProcessor.process` does with an event whose handling raises (processing-error
#: policy, as Kafka Streams' processing exception handler): ``"dead_letter"`` isolates it and
#: dead-letters it as ``processing_error`` while the rest of the batch goes on; ``"fail"`` lets
#: the exception leave ``process`` (the worker stops without committing and re-reads the batch).
OnError = Literal["dead_letter", "fail"]


@dataclass(frozen=True, eq=False)
class ServingModel:
    """One loaded model version, as the worker uses it; built by :func:`serving_model`.

    ``aggregator``: a :class:`sketchstream.models.state.Aggregator` on the artifact's codebooks;
    ``scorer``: the artifact's :class:`~sketchstream.models.scorer.Scorer` (MLP + the item
    snapshot shipped in the artifact, frozen until a refreshed artifact is swapped in). The
    worker keeps no item state of its own: its features are the trainer's.
    """

    version: str
    codebook_version: str
    actions: tuple[str, ...]
    heads: tuple[str, ...]
    aggregator: Any
    scorer: Any
    path: str = ""

    @property
    def mlp(self) -> Any:
        """The artifact's :class:`~sketchstream.models.mlp.EngagementMLP`."""
        return self.scorer.mlp

    @property
    def item_similarity(self) -> Any:
        """The artifact's frozen item-item similarity (None: a model without CF features)."""
        return getattr(self.scorer, "item_similarity", None)

    def predict(self, features: Any, events: DecodedEvents, rows: np.ndarray) -> np.ndarray:
        """Scores ``(k, n_heads)`` float32 for ``rows (k,)`` of ``events``, from their
        ``features`` (the aggregator's ``Features`` restricted to those rows)."""
        return self.scorer.score(features, events.item[rows], events.ts[rows])


def serving_model(bundle: Any) -> ServingModel:
    """A :class:`ServingModel` from a verified :class:`~sketchstream.models.artifacts.ModelBundle`:
    the trainer's scoring path (aggregator features + item snapshot → ``Scorer``)."""
    from sketchstream.models.scorer import Scorer
    from sketchstream.models.state import Aggregator
    from sketchstream.models.trainer import aggregator_config_from_dict

    config = aggregator_config_from_dict(bundle.aggregator_config)
    aggregator = Aggregator(config, bundle.codebooks)
    return ServingModel(
        version=bundle.version,
        codebook_version=str(aggregator.codebook_version),
        actions=tuple(config.actions),
        heads=tuple(bundle.heads),
        aggregator=aggregator,
        scorer=Scorer.from_bundle(bundle),
        path=str(bundle.path),
    )


class BatchResult(NamedTuple):
    """What one batch produced. Keys and values are bytes, ready to send."""

    predictions: list[tuple[bytes, bytes]]  # (user, prediction JSON) for the predictions topic
    dlq: list[tuple[bytes | None, bytes]]  # (source key, dead letter JSON) for the DLQ topic
    table_writes: list[tuple[int, bytes, bytes]]  # (partition, user, state) for the table
    kafka_ts: list[float | None]  # Kafka time of each prediction's event (latency metric)


@dataclass
class BatchProcessor:
    """Validate, score and fold micro-batches against one user-state table.

    ``read_states`` fetches stored states (see :data:`StateReader`); ``topic`` names the events
    topic in prediction records. Not thread-safe: one batch handler, one processor.
    """

    model: ServingModel
    read_states: StateReader
    topic: str = "events"
    limits: EventLimits = field(default_factory=EventLimits)
    metrics: WorkerMetrics | None = None
    clock: Callable[[], float] = time.time
    on_error: OnError = "dead_letter"

    def swap(self, model: ServingModel) -> None:
        """Serve ``model`` from the next batch on."""
        log.info(
            "serving model %s (codebooks %s), was %s",
            model.version,
            model.codebook_version,
            self.model.version,
        )
        self.model = model
        if self.metrics is not None:
            self.metrics.model_swaps.inc()
            self.metrics.set_model(model.version, model.codebook_version)

    def process(self, messages: Sequence[Any]) -> BatchResult:
        """One micro-batch of :class:`~sketchstream.stream.records.RawMessage`-like records, in
        consumption order. Never raises on bad input: bad events become dead letters."""
        received = self.clock()
        model = self.model
        events, rejects = decode_events(messages, model.actions, self.limits)
        dlq = [
            (
                messages[r.index].key,
                dlq_record(messages[r.index], r.reason, r.message, now=received),
            )
            for r in rejects
        ]
        metrics = self.metrics
        if metrics is not None:
            metrics.events_in.inc(len(messages))
            metrics.batch_size.observe(len(messages))
            for r in rejects:
                metrics.dlq.labels(reason=r.reason).inc()
        if len(events) == 0:
            return BatchResult([], dlq, [], [])

        users, user_index = _index_users(events.user)
        keys = [u.encode() for u in users]
        _, first = np.unique(user_index, return_index=True)  # each user's first event
        partitions = events.partition[first].tolist()
        stored = self.read_states(partitions, keys)

        from sketchstream.models.state import EventBatch

        agg = model.aggregator
        state = agg.load(stored)
        batch = EventBatch(
            user_index=user_index,
            item=events.item,
            action=events.action,
            value=events.value,
            ts=events.ts,
            partition=events.partition,
            offset=events.offset,
        )
        features = agg.score_then_fold(state, batch, item_similarity=model.item_similarity)
        valid = np.asarray(features.valid, dtype=bool)
        rows = np.flatnonzero(valid)
        scores = model.predict(_take_rows(features, rows), events, rows) if len(rows) else None
        blobs = agg.dump(state)
        writes = list(zip(partitions, keys, blobs, strict=True))

        kafka_ts = [messages[i].timestamp for i in events.source[rows].tolist()]
        predictions = (
            prediction_records(
                events,
                rows,
                scores,
                topic=self.topic,
                actions=model.actions,
                heads=model.heads,
                model_version=model.version,
                codebook_version=model.codebook_version,
                kafka_ts=kafka_ts,
                received=received,
                published=self.clock(),
            )
            if scores is not None
            else []
        )
        if metrics is not None:
            metrics.redelivered.inc(len(events) - len(rows))
            rebuilt = getattr(state, "rebuilt", 0)
            if rebuilt:
                metrics.states_rebuilt.inc(rebuilt)
        return BatchResult(predictions, dlq, writes, kafka_ts)


def _index_users(user: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Distinct users in order of first appearance, and each event's row among them."""
    index: dict[str, int] = {}
    setdefault = index.setdefault
    rows = [setdefault(u, len(index)) for u in user.tolist()]
    return list(index), np.asarray(rows, dtype=np.int64)


def _take_rows(features: Any, rows: np.ndarray) -> Any:
    """The rows of ``Features`` that get a prediction (all of them, usually: no copy then)."""
    n = len(features.valid)
    if len(rows) == n:
        return features
    take = getattr(features, "take", None)
    if take is not None:
        return take(rows)
    import dataclasses

    return dataclasses.replace(
        features,
        **{
            f.name: getattr(features, f.name)[rows]
            for f in dataclasses.fields(features)
            if isinstance(getattr(features, f.name), np.ndarray)
            and getattr(features, f.name).shape[:1] == (n,)
        },
    )
