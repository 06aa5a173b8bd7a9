"""The worker's Prometheus metrics, on a registry of its own (never the global one), so two
workers in one process — or one test after another — never share counters.

>>> m = WorkerMetrics()
>>> m.events_in.inc(3)
>>> b"sketchstream_events_in_total 3.0" in m.render()[0]
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

__all__ = ["WorkerMetrics"]

_BATCH_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    """Counters, gauges and histograms of one worker; :meth:`render` is the ``/metrics`` body.

    Consumer lag is pulled at scrape time from ``lag_source`` (``{partition: lag}``), so the hot
    path never touches it.
    """

    def __init__(self, lag_source: Callable[[], Mapping[str, float]] | None = None) -> None:
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
        self.latency = Histogram(
            "sketchstream_processing_latency_seconds",
            "Per prediction: publish time minus the event's Kafka record time.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
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
        self._lag_source = lag_source

    def set_model(self, version: str, codebook_version: str) -> None:
        """Record the model and codebook versions now serving."""
        self.model.info({"version": version, "codebook_version": codebook_version})

    def observe_latencies(self, seconds: list[float]) -> None:
        """Observe a batch of per-prediction latencies."""
        observe = self.latency.observe
        for s in seconds:
            observe(s)

    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` of the Prometheus text exposition."""
        if self._lag_source is not None:
            lags = self._lag_source()
            self.lag.clear()
            for partition, lag in lags.items():
                self.lag.labels(partition=partition).set(lag)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
