"""Small Kafka chores the tools share: probing a broker, free ports, end offsets, the fresh
topics of one bench run and deleting topics again.

- :func:`kafka_answers`: does a broker answer a metadata request (``broker``, ``kafka status``,
  ``worker``, ``bench stream``)?
- :func:`free_port`: a loopback TCP port nobody listens on (private brokers, worker web ports).
- :func:`partitions_of`, :func:`end_offsets`, :func:`topic_end_offsets`: where topics end;
  :func:`read_topic`: every record of a topic up to its end.
- :class:`BenchTopics`, :func:`create_bench_topics`: the uniquely named topics and app id of
  one bench run (``bench stream``, ``bench chaos``).
- :func:`delete_topics`: delete topics, optionally waiting until the broker no longer lists
  them (the demo's reset and clean-up, the bench's clean-up).

The ``kafka`` command group is :mod:`sketchstream.tools.kafka`; the broker process is
:mod:`sketchstream.tools.broker`. aiokafka is imported inside the functions, so importing this
module stays cheap for ``--help``. Functions take aiokafka client keywords
(``Settings.client_kwargs()``) and log or raise; only commands print.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sketchstream.models.errors import SketchstreamError

__all__ = [
    "BenchTopics",
    "TopicsNotDeleted",
    "create_bench_topics",
    "delete_topics",
    "end_offsets",
    "free_port",
    "kafka_answers",
    "partitions_of",
    "read_topic",
    "topic_end_offsets",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class TopicsNotDeleted(SketchstreamError):
    """The broker still lists topics after the wait for their deletion."""


# --- the broker answers? ---------------------------------------------------------------------


def kafka_answers(client_kwargs: Mapping[str, Any], timeout: float = 5.0) -> bool:
    """True when the servers in ``client_kwargs`` (aiokafka keywords) answer a metadata request."""

    async def probe() -> bool:
        from aiokafka import AIOKafkaClient
        from aiokafka.errors import KafkaError

        client = AIOKafkaClient(**client_kwargs, request_timeout_ms=int(timeout * 1000))
        try:
            await asyncio.wait_for(client.bootstrap(), timeout)
            return bool(client.cluster.brokers())
        except (TimeoutError, KafkaError, OSError):
            return False
        finally:
            await client.close()

    with _quiet("aiokafka"):
        return _run_blocking(probe())


def free_port() -> int:
    """A loopback TCP port free at the time of the call (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a client library's connection errors while probing a broker that may be down."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, also when an event loop is running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coroutine))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="sketchstream-probe")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


# --- offsets ---------------------------------------------------------------------------------


def partitions_of(topic: str, partitions: int) -> list[Any]:
    """``TopicPartition(topic, 0) .. TopicPartition(topic, partitions - 1)``."""
    from aiokafka import TopicPartition

    return [TopicPartition(topic, p) for p in range(partitions)]


async def end_offsets(consumer: Any, tps: Sequence[Any]) -> dict[Any, int]:
    """The end offset of each of ``tps`` (``TopicPartition``) as a started consumer sees it."""
    return dict(await consumer.end_offsets(list(tps)))


async def topic_end_offsets(
    client_kwargs: Mapping[str, Any], topic: str, partitions: int
) -> list[int]:
    """The end offsets of ``topic``'s partitions ``0 .. partitions - 1``, in order (a
    group-less consumer of its own)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**client_kwargs, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = partitions_of(topic, partitions)
        end = await end_offsets(consumer, tps)
        return [end[tp] for tp in tps]
    finally:
        await consumer.stop()


async def read_topic(
    client_kwargs: Mapping[str, Any], topic: str, *, metadata_wait_s: float = 5.0
) -> list[Any]:
    """Every record of ``topic`` up to its current end (group-less consumer); ``[]`` when
    the topic is not in the broker's metadata within ``metadata_wait_s`` (a topic just
    created may take a moment to appear). Done per partition when the read position reaches
    the end offset, not the last record's offset: offsets may have holes."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        **client_kwargs,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=1 << 23,
        fetch_max_bytes=1 << 26,
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + metadata_wait_s
        while not parts and time.monotonic() < deadline:
            await consumer._client.force_metadata_update()  # no public metadata refresh
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                await asyncio.sleep(0.25)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        todo = {tp for tp in tps if end[tp] > 0}
        while todo:
            got = await consumer.getmany(*todo, timeout_ms=1000, max_records=50_000)
            for records in got.values():
                out.extend(records)
            todo = {tp for tp in todo if await consumer.position(tp) < end[tp]}
        return out
    finally:
        await consumer.stop()


# --- topics ----------------------------------------------------------------------------------


@dataclass
class BenchTopics:
    """Fresh topic names and consumer group of one bench run (all carry ``suffix``)."""

    partitions: int
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def app_id(self) -> str:
        return f"bench-{self.suffix}"

    @property
    def events(self) -> str:
        return f"bench-events-{self.suffix}"

    @property
    def outputs(self) -> str:
        return f"bench-out-{self.suffix}"

    @property
    def dlq(self) -> str:
        return f"bench-dlq-{self.suffix}"

    @property
    def models(self) -> str:
        return f"bench-models-{self.suffix}"

    @property
    def changelog(self) -> str:
        return f"{self.app_id}-users-changelog"

    def worker_env(self, bootstrap: str) -> dict[str, str]:
        """The ``SKETCHSTREAM_*`` variables that point a worker at these topics and app id."""
        return {
            "SKETCHSTREAM_KAFKA": bootstrap,
            "SKETCHSTREAM_TOPIC_EVENTS": self.events,
            "SKETCHSTREAM_TOPIC_PREDICTIONS": self.outputs,
            "SKETCHSTREAM_TOPIC_DLQ": self.dlq,
            "SKETCHSTREAM_TOPIC_MODELS": self.models,
            "SKETCHSTREAM_PARTITIONS": str(self.partitions),
            "SKETCHSTREAM_APP_ID": self.app_id,
        }


async def create_bench_topics(client_kwargs: Mapping[str, Any], topics: BenchTopics) -> None:
    """Create the events, predictions and dead-letter topics (``topics.partitions`` each) and
    the compacted one-partition models topic, replication factor 1."""
    from sketchstream.tools.topics import TopicSpec, create_topics

    p = topics.partitions
    specs = [
        TopicSpec(topics.events, p, {}),
        TopicSpec(topics.outputs, p, {}),
        TopicSpec(topics.dlq, p, {}),
        TopicSpec(topics.models, 1, {"cleanup.policy": "compact"}),
    ]
    await create_topics(dict(client_kwargs), specs, 1)


async def delete_topics(
    client_kwargs: Mapping[str, Any],
    doomed: Iterable[str] | Callable[[str], bool],
    *,
    wait_s: float | None = None,
) -> list[str]:
    """Delete the existing topics among ``doomed`` (names, or a test on a name); with
    ``wait_s``, wait until the broker no longer lists them (:class:`TopicsNotDeleted` after
    ``wait_s`` seconds). Returns the names deleted (none that did not exist)."""
    from aiokafka.admin import AIOKafkaAdminClient

    wanted = doomed if callable(doomed) else set(doomed).__contains__
    admin = AIOKafkaAdminClient(**client_kwargs)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if wanted(t)]
        if names:
            await admin.delete_topics(names)
            if wait_s is not None:
                deadline = time.monotonic() + wait_s
                while set(names) & set(await admin.list_topics()):
                    if time.monotonic() > deadline:
                        raise TopicsNotDeleted(
                            f"topics {names} were not deleted within {wait_s:.0f} s"
                        )
                    await asyncio.sleep(0.3)
        return names
    finally:
        await admin.close()
