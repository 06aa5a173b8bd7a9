"""The worker's per-batch logic, free of Kafka: validate → score → fold → records out.

:class:`BatchProcessor` takes one micro-batch of raw messages (in consumption order, so every
partition's records are in offset order) and returns what the worker must do with it: the
prediction records, the dead letters, and the user-state table writes. It makes exactly one
state read (all the batch's users at once), one aggregator call, one MLP call; only a batch in
which an event's processing raised is run again in parts, to isolate that event (the
processing-error policy, :data:`OnError`). The batch handler in :mod:`sketchstream.stream.app`
only moves these bytes; tests drive this class directly.

The model being served is a :class:`ServingModel`; :meth:`BatchProcessor.swap` replaces it
between batches (the model feed hands over a new version; nothing pauses).

:meth:`BatchProcessor.answer` takes a micro-batch of recommendation requests instead: one state
read, one recommender call, one answer per valid request and a dead letter per refused one. It
reads states and never writes them: a request changes nothing. The engagement path pays
nothing for it (requests come in batches of their own).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from sketchstream.models.live_quality import LiveQuality
from sketchstream.stream.metrics import StageTimes, WorkerMetrics
from sketchstream.stream.records import (
    DecodedEvents,
    EventLimits,
    Rejected,
    RequestLimits,
    decode_events,
    decode_requests,
    dlq_record,
    event_recommendation_record,
    prediction_records,
    recommendation_record,
    where,
)

if TYPE_CHECKING:  # the models (numpy, torch) load when a model does: serving_model
    from sketchstream.models.aggregator import Aggregator
    from sketchstream.models.batches import Features
    from sketchstream.models.events import Head
    from sketchstream.models.scorer import Recommender, Scorer
    from sketchstream.stream.mlp_helper import MLPHelper, PendingScores

__all__ = [
    "AnswerResult",
    "BatchProcessor",
    "BatchResult",
    "OnError",
    "ServingModel",
    "StateReader",
    "is_fault",
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

    ``aggregator``: a :class:`~sketchstream.models.aggregator.Aggregator` on the artifact's
    codebooks;
    ``scorer``: the artifact's :class:`~sketchstream.models.scorer.Scorer` (MLP + the item
    snapshot shipped in the artifact, frozen until a refreshed artifact is swapped in). The
    worker keeps no item state of its own: its features are the trainer's.
    ``recommender``: the artifact's :class:`~sketchstream.models.scorer.Recommender` on the
    same aggregator, or None when the artifact carries none.
    """

    version: str
    codebook_version: str
    actions: tuple[str, ...]
    heads: tuple[str, ...]
    aggregator: Aggregator
    scorer: Scorer
    path: str = ""
    recommender: Recommender | None = None
    head_defs: tuple[Head, ...] = ()  # the heads' definitions, in the scores' column order

    @property
    def mlp(self) -> Any:
        """The artifact's :class:`~sketchstream.models.mlp.EngagementMLP`."""
        return self.scorer.mlp

    @property
    def item_similarity(self) -> Any:
        """The artifact's frozen item-item similarity (None: a model without CF features)."""
        return getattr(self.scorer, "item_similarity", None)

    def predict(
        self,
        features: Features,
        events: DecodedEvents,
        rows: np.ndarray,
        stages: StageTimes,
        helper: MLPHelper | None = None,
    ) -> np.ndarray | PendingScores:
        """Scores ``(k, n_heads)`` float32 for ``rows (k,)`` of ``events``, from their
        ``features`` (the aggregator's ``Features`` restricted to those rows); or, when
        ``helper`` takes the batch's MLP, its :class:`~.mlp_helper.PendingScores`.

        ``Scorer.score``'s two steps, called one by one so that ``stages`` times the item
        features and the MLP apart."""
        scorer = self.scorer
        t = time.perf_counter_ns()
        inputs = scorer.inputs(features, events.item[rows], events.ts[rows])
        t = stages.lap("item_features", t)
        pending = helper.submit(scorer.mlp, inputs) if helper is not None else None
        scores = pending if pending is not None else scorer.mlp.predict(inputs)
        stages.lap("mlp", t)
        return scores


def serving_model(bundle: Any) -> ServingModel:
    """A :class:`ServingModel` from a verified :class:`~sketchstream.models.artifacts.ModelBundle`:
    the trainer's scoring path (aggregator features + item snapshot → ``Scorer``). Its
    compiled kernels are loaded (or compiled, the first time on a machine) here, where a model
    is loaded — at start or in the background before a swap — not inside its first batch."""
    from sketchstream.models.aggregator import Aggregator
    from sketchstream.models.channels import aggregator_config_from_dict
    from sketchstream.models.scorer import Recommender, Scorer
    from sketchstream.models.trainer import bundle_heads

    config = aggregator_config_from_dict(bundle.aggregator_config)
    aggregator = Aggregator(config, bundle.codebooks)
    parts = getattr(bundle, "recommender", None)
    # its own aggregator: a request's throw-away fold must not touch the events' counters
    recommender = (
        None if parts is None else Recommender(parts, Aggregator(config, bundle.codebooks))
    )
    scorer = Scorer.from_bundle(bundle)
    aggregator.warm_up(scorer.item_similarity)
    scorer.mlp.warm_up()
    if parts is not None:
        parts.model.warm_up()
    return ServingModel(
        version=bundle.version,
        codebook_version=str(aggregator.codebook_version),
        actions=tuple(config.actions),
        heads=tuple(bundle.heads),
        aggregator=aggregator,
        scorer=scorer,
        path=str(bundle.path),
        recommender=recommender,
        head_defs=tuple(bundle_heads(bundle)),
    )


#: What a :class:`PendingPredictions` makes: ``(predictions, dead letters, kafka_ts)``
Made = tuple[list[tuple[bytes, bytes]], list[tuple[bytes | None, bytes]], list[float | None]]


class PendingPredictions:
    """A batch's predictions waiting for its MLP scores, which the helper process computes
    while the worker goes on (:class:`~.mlp_helper.PendingScores`).

    :meth:`wait` (in the worker's event loop) or :meth:`result` makes them: ``(predictions,
    dead letters, kafka_ts)``, the records as :meth:`BatchProcessor.process` would have made
    them, the dead letters of events whose MLP row raised (only when the worker scored the
    batch itself, the helper having failed it), and the Kafka times of the predicted events.
    The batch's live quality is updated then, in batch order."""

    def __init__(
        self,
        scores: PendingScores,
        finish: Callable[..., Any],
        in_order: Callable[[Callable[[], None], list[Any]], None],
        slot: list[Any],
    ) -> None:
        self.scores = scores
        self._finish = finish
        self._in_order = in_order  # BatchProcessor._live_in_order
        self._slot = slot  # its place in the processor's live-quality backlog
        self._done: Made | None = None

    def result(self) -> Made:
        """The predictions, waiting (blocking) for the scores."""
        if self._done is None:
            try:
                got: Any = self.scores.result()
            except Exception as exc:
                got = exc
            self._complete(got)
        return self._done

    async def wait(self) -> Made:
        """:meth:`result`, awaiting the scores."""
        if self._done is None:
            try:
                got: Any = await self.scores.wait()
            except Exception as exc:
                got = exc
            self._complete(got)
        return self._done

    def _complete(self, got: Any) -> None:
        predictions, letters, times, observe = self._finish(got, self)
        self._done = (predictions, letters, times)
        self._in_order(observe, self._slot)


class BatchResult(NamedTuple):
    """What one batch produced. Keys and values are bytes, ready to send."""

    predictions: list[tuple[bytes, bytes]]  # (user, prediction JSON) for the predictions topic
    dlq: list[tuple[bytes | None, bytes]]  # (source key, dead letter JSON) for the DLQ topic
    table_writes: list[tuple[int, bytes, bytes]]  # (partition, user, state) for the table
    kafka_ts: list[float | None]  # Kafka time of each prediction's event (latency metric)
    # (user, answer JSON) for the recommendations topic: with recommend_on_event only
    recommendations: list[tuple[bytes, bytes]]
    # the predictions (and dead letters) of a batch whose MLP runs in the helper process, made
    # when its scores are back: ``predictions`` is empty then (BatchProcessor.mlp_helper)
    pending: PendingPredictions | None = None


class AnswerResult(NamedTuple):
    """What one batch of recommendation requests produced: no table writes, ever."""

    answers: list[tuple[bytes, bytes]]  # (user, answer JSON) for the recommendations topic
    dlq: list[tuple[bytes | None, bytes]]  # (source key, dead letter JSON) for the DLQ topic


@dataclass
class BatchProcessor:
    """Validate, score and fold micro-batches against one user-state table.

    ``read_states`` fetches stored states (see :data:`StateReader`); ``topic`` names the events
    topic in prediction records. Not thread-safe: one batch handler, one processor.
    ``stages`` times each step of a batch: the ``metrics``' (a :class:`StageTimes` of its own
    without them). ``recommend_on_event``: publish top-k (this ``k``; 0: none) after events
    (see :meth:`process`), less seen items when ``recommend_exclude_seen``.
    """

    model: ServingModel
    read_states: StateReader
    topic: str = "events"
    limits: EventLimits = field(default_factory=EventLimits)
    metrics: WorkerMetrics | None = None
    clock: Callable[[], float] = time.time
    on_error: OnError = "dead_letter"
    request_topic: str = "recommend"
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    recommend_on_event: int = 0
    recommend_exclude_seen: bool = True
    # runs each batch's MLP in a process of its own: process() then leaves the predictions
    # pending (BatchResult.pending), made when the scores are back
    mlp_helper: MLPHelper | None = None
    stages: StageTimes = field(init=False)
    live: LiveQuality = field(init=False)
    _unrecommended: str = field(init=False, default="")  # a model told to have no recommender
    # live-quality updates in batch order: a slot per batch whose scores are not back yet
    _live_backlog: collections.deque[list[Any]] = field(
        init=False, default_factory=collections.deque
    )

    def __post_init__(self) -> None:
        self.stages = self.metrics.stages if self.metrics is not None else StageTimes()
        self._track_quality(self.model)
        if self.mlp_helper is not None:
            self.mlp_helper.offer(self.model.mlp)

    def _track_quality(self, model: ServingModel) -> None:
        """Live quality of ``model``'s heads from now on (/metrics reads it at scrape time)."""
        self.live = LiveQuality(model.head_defs)
        if self.metrics is not None:
            self.metrics.live.source = self.live.snapshot

    def swap(self, model: ServingModel) -> None:
        """Serve ``model`` from the next batch on."""
        log.info(
            "serving model %s (codebooks %s), was %s",
            model.version,
            model.codebook_version,
            self.model.version,
        )
        if model.head_defs != self.model.head_defs:  # other heads: other figures
            self._track_quality(model)
        self.model = model
        if self.mlp_helper is not None:
            self.mlp_helper.offer(model.mlp)
        if self.metrics is not None:
            self.metrics.model_swaps.inc()
            self.metrics.set_model(model.version, model.codebook_version)

    def process(self, messages: Sequence[Any]) -> BatchResult:
        """One micro-batch of :class:`~sketchstream.stream.records.RawMessage`-like records, in
        consumption order. Never raises on bad input: bad events become dead letters.

        Processing-error policy (``on_error``, see :data:`OnError`): with ``"dead_letter"``,
        an event whose scoring or folding raises is found by re-running the batch in halves,
        in order, each part starting from the states the parts before it left (exactly as if
        they were separate batches), down to single events; the one that raises becomes a
        ``processing_error`` dead letter and every other event is scored as it would have been
        without it. A batch that raises nothing pays nothing for this. A worker fault (see
        :func:`is_fault`: an unreadable stored state, a failing state store, no memory, a full
        disk) is not bad input: it leaves ``process`` whatever ``on_error`` says, and so does
        every exception with ``"fail"``; the worker then stops without committing.

        With ``recommend_on_event``, every user with a scored event in the batch also gets
        one top-k answer (:func:`event_recommendation_record`) from the state the batch leaves,
        read at the time of the user's last scored event, which it names: after each event
        whose user has no later one in the batch (their answers would be stale before sent).
        A model without a recommender publishes none (logged once per model).
        """
        received = self.clock()
        stages = self.stages
        t = time.perf_counter_ns()
        model = self.model
        try:
            events, rejects = decode_events(messages, model.actions, self.limits)
        except Exception as exc:  # a decoder bug: isolate the message that trips it
            if self.on_error == "fail" or is_fault(exc):
                raise
            events, rejects = self._decode_one_by_one(messages, model)
        dead = [(r.index, r.reason, r.message) for r in rejects]
        stages.lap("decode", t)
        out = self._score(model, messages, events, received, dead) if len(events) else None
        t = time.perf_counter_ns()
        metrics = self.metrics
        if metrics is not None:
            metrics.events_in.inc(len(messages))
            metrics.batch_size.observe(len(messages))
        t = stages.lap("metrics", t)
        dlq = self._dead_letters(messages, dead, received)
        stages.lap("predictions_encode", t)
        if out is None:
            return BatchResult([], dlq, [], [], [])
        predictions, kafka_ts, writes, scored, pending = out
        recommendations = (
            self._recommend_after(model, events, scored, writes, received)
            if self.recommend_on_event and len(scored)
            else []
        )
        return BatchResult(predictions, dlq, writes, kafka_ts, recommendations, pending)

    def _dead_letters(
        self, messages: Sequence[Any], dead: list[tuple[int, str, str]], received: float
    ) -> list[tuple[bytes | None, bytes]]:
        """The dead-letter records of ``dead`` (``(message index, reason, message)``), counted
        in the ``dlq`` metric by reason."""
        if self.metrics is not None:
            for _, reason, _ in dead:
                self.metrics.dlq.labels(reason=reason).inc()
        return [
            (messages[i].key, dlq_record(messages[i], reason, text, now=received))
            for i, reason, text in dead
        ]

    def _recommend_after(
        self,
        model: ServingModel,
        events: DecodedEvents,
        scored: np.ndarray,
        writes: list[tuple[int, bytes, bytes]],
        received: float,
    ) -> list[tuple[bytes, bytes]]:
        """Top-k of each user with a row in ``scored`` (rows of ``events`` that got a
        prediction) from the state ``writes`` holds for them, at their last such row's time.
        Answers are derived data: a recommender that raises (not a fault) costs this batch its
        answers, logged, never its predictions or states."""
        rec = model.recommender
        if rec is None:
            if self._unrecommended != model.version:
                self._unrecommended = model.version
                log.warning(
                    "recommend_on_event: model %s has no recommender, so no recommendations "
                    "are published after events; serve a model trained with --recommender",
                    model.version,
                )
            return []
        t = time.perf_counter_ns()
        rows = np.sort(scored)
        users = events.user[rows]
        _, from_end = np.unique(users[::-1], return_index=True)
        last = np.sort(rows[len(rows) - 1 - from_end])  # each user's last scored row
        state_of = {key: blob for _, key, blob in writes}
        names = events.user[last].tolist()
        n, k, exclude = len(last), self.recommend_on_event, self.recommend_exclude_seen
        try:
            got = rec.recommend(
                [state_of[u.encode()] for u in names],
                events.ts[last].tolist(),
                k=[k] * n,
                exclude_seen=[exclude] * n,
            )
        except Exception as exc:
            if self.on_error == "fail" or is_fault(exc):
                raise
            log.warning(
                "recommendations after a batch of %d users raised %s: none published for it",
                n,
                _describe(exc),
                exc_info=exc,
            )
            return []
        self._live_in_order(functools.partial(self.live.answered, names, [r.items for r in got]))
        published = self.clock()
        out = [
            event_recommendation_record(
                user,
                items=r.items,
                scores=r.scores,
                k=k,
                exclude_seen=exclude,
                as_of=float(events.ts[row]),
                topic=self.topic,
                partition=int(events.partition[row]),
                offset=int(events.offset[row]),
                model_version=model.version,
                codebook_version=model.codebook_version,
                received=received,
                published=published,
            )
            for user, r, row in zip(names, got, last.tolist(), strict=True)
        ]
        self.stages.lap("recommend", t)
        return out

    def answer(self, messages: Sequence[Any]) -> AnswerResult:
        """One micro-batch of recommendation requests (:class:`RawMessage`-like, keyed by
        user, on partitions co-partitioned with the events): one answer per valid request,
        read off the user's stored state at the request's ``ts`` (default: its Kafka time);
        a user with no state gets the model's answer on an empty state (``cold_start``). Never
        writes a state. Bad requests, and every request to a model without a recommender
        (``no_recommender``), become dead letters; a request whose answering raises is
        dead-lettered as ``processing_error`` under ``on_error="dead_letter"``."""
        received = self.clock()
        model = self.model
        requests, rejects = decode_requests(messages, self.request_limits)
        dead = [(r.index, r.reason, r.message) for r in rejects]
        rec = model.recommender
        ok = []
        for q in requests:
            at = _at(messages[q.source])
            if rec is None:
                dead.append(
                    (
                        q.source,
                        "no_recommender",
                        f"request {q.request_id!r} at {at}: model {model.version} has no "
                        "recommender; serve a model trained with one",
                    )
                )
            elif q.categories is not None and not rec.has_categories:
                dead.append(
                    (
                        q.source,
                        "bad_field",
                        f"request {q.request_id!r} at {at}: 'categories' given but model "
                        f"{model.version}'s catalogue has no item categories; leave it out",
                    )
                )
            else:
                ok.append(q)
        answers: list[tuple[bytes, bytes]] = []
        if ok:
            assert rec is not None
            answers = self._answer(model, rec, messages, ok, received, dead)
        dead.sort()
        return AnswerResult(answers, self._dead_letters(messages, dead, received))

    def refuse(self, messages: Sequence[Any], reason: str, message: str) -> AnswerResult:
        """Dead letters for every request of a batch the worker cannot answer at all
        (``message`` says why and what to do)."""
        dead = [(i, reason, message) for i in range(len(messages))]
        return AnswerResult([], self._dead_letters(messages, dead, self.clock()))

    def _answer(
        self,
        model: ServingModel,
        rec: Recommender,
        messages: Sequence[Any],
        requests: list[Any],
        received: float,
        dead: list[tuple[int, str, str]],
    ) -> list[tuple[bytes, bytes]]:
        """Answers of valid ``requests``: all in one recommender call; if that raises (and
        is not a fault), one by one, dead-lettering those that raise."""
        stored = self.read_states(
            [q.partition for q in requests], [q.user.encode() for q in requests]
        )
        when = [
            q.ts if q.ts is not None else (messages[q.source].timestamp or received)
            for q in requests
        ]

        def run(rows: list[int]) -> list[Any]:
            return rec.recommend(
                [stored[i] for i in rows],
                [when[i] for i in rows],
                k=[requests[i].k for i in rows],
                exclude_seen=[requests[i].exclude_seen for i in rows],
                categories=[requests[i].categories for i in rows],
            )

        rows = list(range(len(requests)))
        try:
            got: list[Any] = run(rows)
        except Exception as exc:
            if self.on_error == "fail" or is_fault(exc):
                raise
            got = []
            for i in rows:
                try:
                    got += run([i])
                except Exception as one:
                    if is_fault(one):
                        raise
                    msg = messages[requests[i].source]
                    text = _processing_error(msg, one).replace("processing event", "answering")
                    dead.append((requests[i].source, "processing_error", text))
                    got.append(None)
        answered = [(q.user, r.items) for q, r in zip(requests, got, strict=True) if r is not None]
        self._live_in_order(
            functools.partial(
                self.live.answered, [u for u, _ in answered], [items for _, items in answered]
            )
        )
        published = self.clock()
        return [
            recommendation_record(
                q,
                items=r.items,
                scores=r.scores,
                cold_start=r.cold_start,
                as_of=float(t),
                topic=self.request_topic,
                model_version=model.version,
                codebook_version=model.codebook_version,
                received=received,
                published=published,
            )
            for q, r, t in zip(requests, got, when, strict=True)
            if r is not None
        ]

    def _score(
        self,
        model: ServingModel,
        messages: Sequence[Any],
        events: DecodedEvents,
        received: float,
        dead: list[tuple[int, str, str]],
    ) -> tuple[
        list[tuple[bytes, bytes]],
        list[float | None],
        list[tuple[int, bytes, bytes]],
        np.ndarray,
        PendingPredictions | None,
    ]:
        """Read the batch's states, score and fold ``events``; ``(predictions, kafka_ts,
        table writes, the rows of events that got a prediction, pending predictions)``. Events
        isolated by the processing-error policy are appended to ``dead`` as ``(message index,
        reason, message)``."""
        t = time.perf_counter_ns()
        users, user_index = _index_users(events.user)
        keys = [u.encode() for u in users]
        _, first = np.unique(user_index, return_index=True)  # each user's first event
        partitions = events.partition[first].tolist()
        stored = self.read_states(partitions, keys)
        agg = model.aggregator
        state = agg.load(stored)  # unreadable bytes raise: a fault, never dead-lettered
        self.stages.lap("state_read", t)
        metrics = self.metrics
        if metrics is not None and getattr(state, "rebuilt", 0):
            metrics.states_rebuilt.inc(state.rebuilt)
        try:
            part = self._score_part(
                model, messages, events, None, user_index, state, received, self.mlp_helper
            )
        except Exception as exc:
            if self.on_error == "fail" or is_fault(exc):
                raise
            log.warning(
                "a batch of %d events raised %s: isolating the events that raise",
                len(events),
                _describe(exc),
            )
            return self._isolate(model, messages, events, user_index, stored, received, dead)
        predictions, kafka_ts, blobs, redelivered, duplicates, scored, pending = part
        if metrics is not None:
            metrics.redelivered.inc(redelivered)
            metrics.duplicates.inc(duplicates)
        writes = list(zip(partitions, keys, blobs, strict=True))
        return predictions, kafka_ts, writes, scored, pending

    def _score_part(
        self,
        model: ServingModel,
        messages: Sequence[Any],
        events: DecodedEvents,
        rows: np.ndarray | None,
        user_index: np.ndarray,
        state: Any,
        received: float,
        helper: MLPHelper | None = None,
    ) -> tuple[
        list[tuple[bytes, bytes]],
        list[float | None],
        list[bytes],
        int,
        int,
        np.ndarray,
        PendingPredictions | None,
    ]:
        """Score and fold ``rows (k,)`` of ``events`` (None: all of them) into ``state``, whose
        users ``user_index (k,)`` points into; ``(predictions, kafka_ts, state blobs,
        redelivered count, duplicate count, the rows of events scored, pending)``: neither a
        redelivered event (an offset already folded) nor a duplicate (an ``event_id`` in its
        user's window) gets a prediction. With a ``helper`` that takes the MLP, the
        predictions are ``pending`` (and the list empty)."""
        from sketchstream.models.batches import EventBatch

        stages = self.stages
        t = time.perf_counter_ns()

        def take(a: np.ndarray) -> np.ndarray:
            return a if rows is None else a[rows]

        agg = model.aggregator
        batch = EventBatch(
            user_index=user_index,
            item=take(events.item),
            action=take(events.action),
            value=take(events.value),
            ts=take(events.ts),
            partition=take(events.partition),
            offset=take(events.offset),
            event_id=take(np.asarray(events.event_id, dtype=object)),
        )
        features = agg.score_then_fold(state, batch, item_similarity=model.item_similarity)
        valid = np.flatnonzero(np.asarray(features.valid, dtype=bool))  # (v,) into the part
        selected = valid if rows is None else rows[valid]  # (v,) into events
        # usually every event gets a prediction: then no copy
        scored = features if len(valid) == len(features.valid) else features.take(valid)
        stages.lap("fold", t)
        scores = model.predict(scored, events, selected, stages, helper) if len(valid) else None
        t = time.perf_counter_ns()
        blobs = agg.dump(state)
        stages.lap("state_encode", t)
        kafka_ts = [messages[i].timestamp for i in events.source[selected].tolist()]
        live = self.live

        def publish(scores: np.ndarray, rows: np.ndarray, times: list[float | None]) -> Any:
            """The prediction records of ``rows`` (of ``events``); their live quality."""
            t = time.perf_counter_ns()
            predictions = prediction_records(
                events,
                rows,
                scores,
                topic=self.topic,
                actions=model.actions,
                heads=model.heads,
                model_version=model.version,
                codebook_version=model.codebook_version,
                kafka_ts=times,
                received=received,
                published=self.clock(),
            )
            t = stages.lap("predictions_encode", t)
            observe = functools.partial(
                live.observe,
                events.user[rows],
                events.item[rows],
                np.asarray(model.actions, dtype=object)[events.action[rows]],
                events.value[rows],
                events.ts[rows],
                scores,
                events.partition[rows],
            )
            return predictions, observe

        pending = None
        predictions: list[tuple[bytes, bytes]] = []
        if isinstance(scores, np.ndarray):
            predictions, observe = publish(scores, selected, kafka_ts)
            # last: a part that raised before it is counted once, re-run
            self._live_in_order(observe)
        elif scores is not None:
            pending = PendingPredictions(
                scores,
                self._finish_pending(messages, events, selected, kafka_ts, received, publish),
                self._live_in_order,
                self._live_slot(),
            )
        duplicates = int(state.duplicates)
        redelivered = len(batch.item) - len(valid) - duplicates
        return predictions, kafka_ts, blobs, redelivered, duplicates, selected, pending

    def _finish_pending(
        self,
        messages: Sequence[Any],
        events: DecodedEvents,
        selected: np.ndarray,
        kafka_ts: list[float | None],
        received: float,
        publish: Callable[[np.ndarray, np.ndarray, list[float | None]], Any],
    ) -> Callable[[Any], Any]:
        """What makes a deferred batch's predictions once its scores are back (or its MLP
        raised in the worker's own thread, the helper having failed): the rows whose scoring
        raises are found as in :meth:`_isolate`, by halves, and dead-lettered; their events
        were folded already (an event's MLP row depends on nothing else in the batch)."""

        def finish(
            got: np.ndarray | Exception, pending: PendingPredictions
        ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes | None, bytes]], list[Any], Any]:
            rows, times, dead = selected, kafka_ts, []
            if isinstance(got, Exception):
                got, bad = self._score_isolating(pending.scores.mlp, pending.scores.inputs, got)
                keep = np.ones(len(rows), dtype=bool)
                for row, exc in bad:
                    keep[row] = False
                    index = int(events.source[rows[row]])
                    msg = messages[index]
                    log.warning(
                        "event at %s raised %s in the MLP: dead-lettered (processing_error)",
                        where(msg.topic, msg.partition, msg.offset),
                        _describe(exc),
                    )
                    dead.append((index, "processing_error", _processing_error(msg, exc)))
                got, rows = got[keep], rows[keep]
                times = [ts for ts, k in zip(times, keep.tolist(), strict=True) if k]
            predictions, observe = publish(got, rows, times)
            return predictions, self._dead_letters(messages, dead, received), times, observe

        return finish

    def _score_isolating(
        self, mlp: Any, inputs: Any, exc: Exception
    ) -> tuple[np.ndarray, list[tuple[int, Exception]]]:
        """``mlp.predict(inputs)``, which raised ``exc``, row range by row range: the scores
        (rows that raise left at 0) and ``(row, exception)`` of each row that raises."""
        if self.on_error == "fail" or is_fault(exc):
            raise exc
        scores = np.zeros((len(inputs), len(mlp.config.heads)), np.float32)
        bad: list[tuple[int, Exception]] = []
        todo = [(0, len(inputs))]
        while todo:
            lo, hi = todo.pop()
            try:
                scores[lo:hi] = mlp.predict(inputs.take(slice(lo, hi)))
            except Exception as err:
                if is_fault(err):
                    raise
                if hi - lo == 1:
                    bad.append((lo, err))
                    continue
                mid = (lo + hi) // 2
                todo += [(mid, hi), (lo, mid)]
        return scores, sorted(bad, key=lambda b: b[0])

    # -- live quality in batch order ----------------------------------------------------------

    def _live_slot(self) -> list[Any]:
        """A place in the live-quality backlog for a batch whose scores are not back yet."""
        slot: list[Any] = [None]
        self._live_backlog.append(slot)
        return slot

    def _live_in_order(self, observe: Callable[[], None], slot: list[Any] | None = None) -> None:
        """Apply ``observe`` to the live quality after every batch handled before it (its
        ``slot``, or now when nothing waits); labels and answers must meet in order."""
        t = time.perf_counter_ns()
        backlog = self._live_backlog
        if slot is None:
            if not backlog:
                observe()
                self.stages.lap("live_quality", t)
                return
            slot = self._live_slot()
        slot[0] = observe
        while backlog and backlog[0][0] is not None:
            backlog.popleft()[0]()
        self.stages.lap("live_quality", t)

    def _isolate(
        self,
        model: ServingModel,
        messages: Sequence[Any],
        events: DecodedEvents,
        user_index: np.ndarray,
        stored: list[bytes | None],
        received: float,
        dead: list[tuple[int, str, str]],
    ) -> tuple[
        list[tuple[bytes, bytes]],
        list[float | None],
        list[tuple[int, bytes, bytes]],
        np.ndarray,
        None,
    ]:
        """The batch again, in halves, in order, down to the single events that raise.

        Users' states travel between parts as the bytes :meth:`Aggregator.dump` wrote, so a
        part that raised leaves no trace and the parts are exactly separate batches.
        """
        agg = model.aggregator
        blobs: list[bytes | None] = list(stored)  # per user of the batch
        done = np.zeros(len(blobs), dtype=bool)  # users with an event that went through
        predictions: list[tuple[bytes, bytes]] = []
        kafka_ts: list[float | None] = []
        redelivered = duplicates = 0
        scored: list[np.ndarray] = []
        todo = [np.arange(len(events) // 2, len(events)), np.arange(len(events) // 2)]
        while todo:  # a stack of parts, the earliest on top
            rows = todo.pop()
            part_users, local = np.unique(user_index[rows], return_inverse=True)
            state = agg.load([blobs[u] for u in part_users.tolist()])
            try:
                part = self._score_part(model, messages, events, rows, local, state, received)
            except Exception as exc:
                if is_fault(exc):
                    raise
                if len(rows) > 1:
                    half = len(rows) // 2
                    todo += [rows[half:], rows[:half]]
                    continue
                index = int(events.source[rows[0]])
                msg = messages[index]
                log.warning(
                    "event at %s raised %s: dead-lettered (processing_error)",
                    where(msg.topic, msg.partition, msg.offset),
                    _describe(exc),
                    exc_info=exc,
                )
                dead.append((index, "processing_error", _processing_error(msg, exc)))
                continue
            part_predictions, part_ts, part_blobs, part_redelivered, part_duplicates, rows, _ = part
            scored.append(rows)
            predictions += part_predictions
            kafka_ts += part_ts
            redelivered += part_redelivered
            duplicates += part_duplicates
            for u, blob in zip(part_users.tolist(), part_blobs, strict=True):
                blobs[u] = blob
            done[part_users] = True
        if self.metrics is not None:
            self.metrics.redelivered.inc(redelivered)
            self.metrics.duplicates.inc(duplicates)
        users = events.user
        _, first = np.unique(user_index, return_index=True)
        writes = [
            (int(events.partition[first[u]]), users[first[u]].encode(), blobs[u])
            for u in np.flatnonzero(done).tolist()
        ]
        dead.sort()
        return (
            predictions,
            kafka_ts,
            writes,
            np.concatenate([np.zeros(0, np.int64), *scored]),
            None,
        )

    def _decode_one_by_one(
        self, messages: Sequence[Any], model: ServingModel
    ) -> tuple[DecodedEvents, list[Rejected]]:
        """:func:`decode_events` message by message, after it raised on the batch: a message
        it raises on is refused as ``processing_error``; the rest decode as one batch."""
        good: list[int] = []
        rejects: list[Rejected] = []
        for index, msg in enumerate(messages):
            try:
                decode_events([msg], model.actions, self.limits)
            except Exception as exc:
                if is_fault(exc):
                    raise
                log.warning("decoding event at %s raised %s", _at(msg), _describe(exc))
                rejects.append(Rejected(index, "processing_error", _processing_error(msg, exc)))
            else:
                good.append(index)
        events, refused = decode_events([messages[i] for i in good], model.actions, self.limits)
        rejects += [r._replace(index=good[r.index]) for r in refused]
        rejects.sort()
        source = np.asarray(good, dtype=np.int64)[events.source]
        return dataclasses.replace(events, source=source), rejects


def is_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is a worker fault rather than bad input: the worker must stop (and
    re-read the batch after a restart) instead of dead-lettering the event that met it.

    Faults: no memory (``MemoryError``, a CUDA out-of-memory error), the operating system
    (``OSError``: a full disk, a lost file), an unreadable artifact or stored state
    (:class:`~sketchstream.models.errors.ArtifactError`, what ``Aggregator.load`` raises on
    bad bytes), and anything that is not an ``Exception`` (``KeyboardInterrupt``,
    cancellation).
    """
    from sketchstream.models.errors import ArtifactError

    if not isinstance(exc, Exception):
        return True
    return isinstance(exc, MemoryError | OSError | SystemError | ArtifactError) or (
        type(exc).__name__ == "OutOfMemoryError"  # torch.cuda.OutOfMemoryError
    )


_ERROR_CHARS = 300  # of an exception's text in a dead letter


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > _ERROR_CHARS:
        text = text[: _ERROR_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _processing_error(msg: Any, exc: BaseException) -> str:
    return (
        f"processing event at {where(msg.topic, msg.partition, msg.offset)} raised "
        f"{_describe(exc)} (isolated from its batch and dead-lettered; "
        "on_error='fail' stops the worker instead)"
    )


def _at(msg: Any) -> str:
    return where(msg.topic, msg.partition, msg.offset)


def _index_users(user: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Distinct users in order of first appearance, and each event's row among them."""
    index: dict[str, int] = {}
    setdefault = index.setdefault
    rows = [setdefault(u, len(index)) for u in user.tolist()]
    return list(index), np.asarray(rows, dtype=np.int64)
