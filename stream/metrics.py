"""The worker's Prometheus metrics, on a registry of its own (never the global one), so two
workers in one process — or one test after another — never share counters.

>>> m = WorkerMetrics()
>>> m.events_in.inc(3)
>>> b"sketchstream_events_in_total 3.0" in m.render()[0]
True

:class:`StageTimes` is where the worker's time goes, stage by stage of a batch
(``sketchstream_stage_seconds_total{stage=...}`` beside ``sketchstream_busy_seconds_total``):
``sketchstream bench stream --profile`` reads it off ``/metrics``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

__all__ = ["STAGES", "BatchHistogram", "LiveQualityMetrics", "StageTimes", "WorkerMetrics"]

_BATCH_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


#: The stages of the worker's wall time while it delivers batches, in the order a batch meets
#: them. The awaited ones (``fetch``, ``send_wait``, ``commit``) include whatever the event loop
#: runs meanwhile: aiokafka's fetcher decoding the next records, faust's timers and heartbeats.
#: What no stage holds (faust's and aiokafka's tasks between fetches) is the busy time's rest.
STAGES: tuple[str, ...] = (
    "fetch",  # waiting for a fetch and taking its records from aiokafka
    "deliver",  # faust's per-record bookkeeping: messages, gaps, tracking, acks, read offsets
    "decode",  # decode + validate (records.decode_events), dead letters' reasons
    "state_read",  # RocksDB multi-get of the batch's users + Aggregator.load
    "fold",  # Aggregator.score_then_fold: user features, CF columns, the fold itself
    "item_features",  # Scorer.inputs: item snapshot features + the MLP's input assembly
    "mlp",  # the MLP's forward pass
    "state_encode",  # Aggregator.dump: one byte string per user
    "predictions_encode",  # prediction records and dead letters as JSON
    "live_quality",  # LiveQuality.observe: the labels the batch brings, per head
    "recommend",  # top-k after events (recommend_on_event): read, model, records
    "send",  # records into per-partition producer batches, handed to aiokafka
    "send_wait",  # waiting for the previous batch's acknowledgements and state writes
    "state_write",  # RocksDB write batches
    "changelog",  # the states' changelog records handed to the producer
    "metrics",  # the worker's own metrics and health bookkeeping
    "commit",  # a commit of the acknowledged offsets started (a task: its flush overlaps)
)


class StageTimes:
    """Nanoseconds spent in each of :data:`STAGES`, and the busy time they are part of.

    Always on: a :meth:`lap` is one ``perf_counter_ns`` call and an addition (~0.2-0.6 µs on
    this project's machine), about 20 per batch, under 0.1 % of a batch of 200 events; so the
    profile a bench reads is the worker's own, not a special build. ``busy_ns`` is the wall
    time of the fetch loop's rounds that delivered records: the stages are parts of it.

    >>> st = StageTimes()
    >>> t = st.lap("decode", time.perf_counter_ns())
    >>> st.ns["decode"] >= 0 and st.ns["mlp"] == 0
    True
    """

    __slots__ = ("busy_ns", "ns")

    def __init__(self) -> None:
        self.ns: dict[str, int] = dict.fromkeys(STAGES, 0)
        self.busy_ns = 0

    def lap(self, stage: str, since: int) -> int:
        """Add the time since ``since`` (a ``perf_counter_ns`` reading) to ``stage``; returns
        now, the start of the next lap."""
        now = time.perf_counter_ns()
        self.ns[stage] += now - since
        return now

    def total_ns(self) -> int:
        """Nanoseconds in all stages so far (see :meth:`lap_outside`)."""
        return sum(self.ns.values())

    def lap_outside(self, stage: str, since: int, total_since: int) -> int:
        """:meth:`lap` for a wait during which other tasks timed stages of their own (a batch
        finishing behind the next one writes its states while the fetch loop waits for it):
        ``stage`` gets the time since ``since`` less what every stage gained meanwhile
        (``total_since``: :meth:`total_ns` at ``since``), so no time is counted twice.

        >>> st = StageTimes()
        >>> t, before = time.perf_counter_ns(), st.total_ns()
        >>> st.ns["state_write"] += 10**12  # timed by another task during the wait
        >>> _ = st.lap_outside("send_wait", t, before)
        >>> st.ns["send_wait"]
        0
        """
        now = time.perf_counter_ns()
        self.ns[stage] += max(0, (now - since) - (self.total_ns() - total_since))
        return now

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The Prometheus view (a custom collector: nothing is built until a scrape)."""
        stages = CounterMetricFamily(
            "sketchstream_stage_seconds",
            "Worker time per stage of a batch (see sketchstream.stream.metrics.STAGES).",
            labels=["stage"],
        )
        for stage, ns in self.ns.items():
            stages.add_metric([stage], ns / 1e9)
        yield stages
        yield CounterMetricFamily(
            "sketchstream_busy_seconds",
            "Wall time of the fetch rounds that delivered records (the stages are parts of it).",
            value=self.busy_ns / 1e9,
        )


class BatchHistogram:
    """A Prometheus histogram observed a batch of values at a time: one ``searchsorted`` and
    ``bincount`` a batch, where ``Histogram.observe`` takes a lock and walks the buckets per
    value (~2 µs each: a worker's whole per-prediction latency bookkeeping, measured).

    >>> h = BatchHistogram("x_seconds", "An example.", (0.1, 1.0))
    >>> h.observe_many([0.05, 0.1, 0.5, 3.0])
    >>> [(s.labels.get("le"), s.value) for s in next(h.collect()).samples]
    [('0.1', 2), ('1.0', 3), ('+Inf', 4), (None, 4), (None, 3.65)]
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)  # upper bounds, ascending
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above them all
        self.total = 0.0

    def observe_many(self, values: Sequence[float] | np.ndarray) -> None:
        """Observe every value of ``values``."""
        x = np.asarray(values, dtype=np.float64)
        if x.size:
            where = np.searchsorted(self.bounds, x, side="left")  # first bound >= x: its "le"
            self.counts += np.bincount(where, minlength=len(self.counts))
            self.total += float(x.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """The Prometheus view: cumulative ``le`` buckets, ``+Inf``, the sum."""
        cumulative = np.cumsum(self.counts).tolist()
        les = [*(repr(float(b)) for b in self.bounds), "+Inf"]
        yield HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(les, cumulative, strict=True)),
            sum_value=self.total,
        )


class LiveQualityMetrics:
    """The worker's live quality (:mod:`sketchstream.models.live_quality`) on ``/metrics``:
    ``source`` (a ``LiveQuality.snapshot``, set by the batch processor) is read at scrape time,
    so a rolling AUC is computed once a scrape, never per batch."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, Any]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self.source is None:
            return
        now = self.source()
        auc = GaugeMetricFamily(
            "sketchstream_live_auc",
            "Rolling ROC AUC per head over its last labelled predictions (NaN: one class).",
            labels=["head"],
        )
        labelled = CounterMetricFamily(
            "sketchstream_live_labelled",
            "Predictions whose label arrived, per head.",
            labels=["head"],
        )
        pending = GaugeMetricFamily(
            "sketchstream_live_pending",
            "Return-head predictions awaiting the user's next event or the horizon.",
            labels=["head"],
        )
        dropped = CounterMetricFamily(
            "sketchstream_live_dropped",
            "Return-head predictions dropped unlabelled (over the pending bound).",
            labels=["head"],
        )
        for head, f in now["heads"].items():
            auc.add_metric([head], f["auc"])
            labelled.add_metric([head], f["labelled"])
            if "pending" in f:
                pending.add_metric([head], f["pending"])
                dropped.add_metric([head], f["dropped"])
        rec = now["recommend"]
        yield from (auc, labelled, pending, dropped)
        yield GaugeMetricFamily(
            "sketchstream_live_hr10",
            "Rolling HR@10 of recommendation answers, by each user's next event (NaN: none).",
            value=rec["hr@10"],
        )
        yield CounterMetricFamily(
            "sketchstream_live_answers_resolved",
            "Recommendation answers judged by their user's next event.",
            value=rec["resolved"],
        )


class WorkerMetrics:
    """Counters, gauges and histograms of one worker; :meth:`render` is the ``/metrics`` body.

    Consumer lag is pulled at scrape time from ``lag_source`` (``{partition: lag}``), so the hot
    path never touches it; so are the ``stages`` (the app's, whose fetch loop times its part).
    """

    def __init__(
        self,
        lag_source: Callable[[], Mapping[str, float]] | None = None,
        stages: StageTimes | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_in = Counter(
            "sketchstream_events_in", "Events consumed from the events topic.", registry=r
        )
        self.predictions_out = Counter(
            "sketchstream_predictions_out", "Predictions published.", registry=r
        )
        self.redelivered = Counter(
            "sketchstream_events_redelivered",
            "Events already folded into their user's state (at-least-once redelivery): "
            "skipped, no prediction.",
            registry=r,
        )
        self.duplicates = Counter(
            "sketchstream_events_duplicate",
            "Events whose event_id is among the last ids folded for their user (a producer's "
            "retry): dropped, no prediction.",
            registry=r,
        )
        self.dlq = Counter(
            "sketchstream_dlq", "Events sent to the dead-letter topic.", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "sketchstream_batch_size", "Events per micro-batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "sketchstream_batch_seconds",
            "Wall time to process one micro-batch (decode, score, fold, publish).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = BatchHistogram(
            "sketchstream_processing_latency_seconds",
            "Per prediction: publish time minus the event's Kafka record time.",
            _LATENCY_BUCKETS,
        )
        r.register(self.latency)
        self.states_rebuilt = Counter(
            "sketchstream_states_rebuilt",
            "User states rebuilt from history because they were built on an older codebook.",
            registry=r,
        )
        self.model_swaps = Counter(
            "sketchstream_model_swaps", "Model versions swapped in while running.", registry=r
        )
        self.models_refused = Counter(
            "sketchstream_models_refused",
            "Published model versions refused (bad checksum, unreadable, incompatible).",
            registry=r,
        )
        self.partition_handovers = Counter(
            "sketchstream_partition_handovers",
            "Events partitions handed to the worker after a rebalance (sought to their "
            "committed offsets and resumed), kept or newly assigned.",
            registry=r,
        )
        self.model = Info("sketchstream_model", "The model version being served.", registry=r)
        self.lag = Gauge(
            "sketchstream_consumer_lag",
            "Records on the events topic not yet processed, per partition.",
            ["partition"],
            registry=r,
        )
        self.stages = stages if stages is not None else StageTimes()
        r.register(self.stages)
        self.live = LiveQualityMetrics()
        r.register(self.live)
        self._lag_source = lag_source

    def watch_mlp_helper(self, helper: Any) -> None:
        """Expose ``helper``'s (a :class:`~sketchstream.stream.mlp_helper.MLPHelper`) state,
        read at scrape time."""
        r = self.registry
        Gauge(
            "sketchstream_mlp_helper_up",
            "1 while the MLP helper process runs the batches' MLP (0: the worker scores them).",
            registry=r,
        ).set_function(lambda: float(helper.serving))
        Gauge(
            "sketchstream_mlp_helper_rows",
            "MLP rows scored by the helper process since the worker started (the others by the "
            "worker's own thread).",
            registry=r,
        ).set_function(lambda: float(helper.rows_helped))
        Gauge(
            "sketchstream_mlp_helper_failures",
            "Times the MLP helper process was given up on (and started again later).",
            registry=r,
        ).set_function(lambda: float(helper.failures))

    def set_model(self, version: str, codebook_version: str) -> None:
        """Record the model and codebook versions now serving."""
        self.model.info({"version": version, "codebook_version": codebook_version})

    def observe_latencies(self, seconds: Sequence[float] | np.ndarray) -> None:
        """Observe a batch of per-prediction latencies."""
        self.latency.observe_many(seconds)

    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the Prometheus text exposition."""
        if self._lag_source is not None:
            lags = self._lag_source()
            self.lag.clear()
            for partition, lag in lags.items():
                self.lag.labels(partition=partition).set(lag)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
