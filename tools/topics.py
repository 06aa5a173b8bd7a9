"""`sketchstream topics`: create the system's topics, and check a round trip through Kafka.

The topics, named by Settings (``SKETCHSTREAM_TOPIC_*``):

========================  ==========================  =========================================
topic                     partitions                  config
========================  ==========================  =========================================
``events``                ``Settings.partitions``     keyed by user
``predictions``           ``Settings.partitions``
``events.dlq``            ``Settings.partitions``     dead letters
``sketchstream.models``   1                           ``cleanup.policy=compact``: the latest
                                                      version of each model stays forever
========================  ==========================  =========================================

:func:`create_topics` is idempotent and is what tests and other commands call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from sketchstream.tools.options import fail, load_settings_or_exit, setting_option

if TYPE_CHECKING:
    from sketchstream.stream.settings import Settings

__all__ = ["TopicReport", "TopicSpec", "app", "create_topics", "topic_specs"]

app = typer.Typer(help="Kafka topics of the system: create them, check a round trip.")

TopicState = Literal["created", "exists"]


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partition count, topic-level configs."""

    name: str
    partitions: int
    config: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicReport:
    """A topic as the broker has it after :func:`create_topics`."""

    name: str
    state: TopicState
    partitions: int
    cleanup_policy: str


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The system's topics under ``settings``: the data topics, the recommendation requests and
    answers, and the compacted model topic."""
    return [
        TopicSpec(settings.topic_events, settings.partitions),
        TopicSpec(settings.topic_predictions, settings.partitions),
        TopicSpec(settings.topic_dlq, settings.partitions),
        # requests keyed by user: the events' partition count, so each meets its user's state
        TopicSpec(settings.topic_recommend, settings.partitions),
        TopicSpec(settings.topic_recommendations, settings.partitions),
        # One partition: every worker reads all model versions, in publication order.
        TopicSpec(settings.topic_models, 1, {"cleanup.policy": "compact"}),
    ]


async def create_topics(
    client_kwargs: Mapping[str, Any], specs: Sequence[TopicSpec], replication_factor: int = 1
) -> list[TopicReport]:
    """Create the topics that do not exist yet (existing ones are left as they are).

    ``client_kwargs`` are aiokafka keywords (``Settings.client_kwargs()``). Returns what the
    broker then holds for each topic, in the order of ``specs``.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    admin = AIOKafkaAdminClient(**client_kwargs)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        created: set[str] = set()
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(s.name, s.partitions, replication_factor, topic_configs=dict(s.config))
                    for s in missing
                ]
            )
            for name, code, *rest in response.topic_errors:
                if code == 0:
                    created.add(name)
                elif code != TopicAlreadyExistsError.errno:  # created meanwhile: fine
                    message = rest[0] if rest else ""
                    raise for_code(code)(f"cannot create topic {name!r}: {message}")
        names = [s.name for s in specs]
        described = await _wait_for_leaders(admin, names)
        configs = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n, {"cleanup.policy": None}) for n in names]
        )
        policy = {
            resource[3]: entry[1]
            for response in configs
            for resource in response.resources
            for entry in resource[4]
            if entry[0] == "cleanup.policy"
        }
    finally:
        await admin.close()
    return [
        TopicReport(
            name=s.name,
            state="created" if s.name in created else "exists",
            partitions=len(described.get(s.name, {}).get("partitions", [])),
            cleanup_policy=policy.get(s.name, "?"),
        )
        for s in specs
    ]


async def _wait_for_leaders(admin: Any, names: Sequence[str], timeout: float = 30.0) -> dict:
    """Describe ``names`` once every partition has a leader (new topics take a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        described = {t["topic"]: t for t in await admin.describe_topics(list(names))}
        ready = all(
            t["error_code"] == 0
            and t["partitions"]
            and all(p["leader"] >= 0 for p in t["partitions"])
            for t in described.values()
        )
        if (ready and set(described) >= set(names)) or time.monotonic() > deadline:
            return described
        await asyncio.sleep(0.1)


def _connect(settings: Settings) -> None:
    """Start (or reuse) the local broker when no servers are configured; exit 1 on failure."""
    from sketchstream.tools.broker import BrokerError, ensure_broker

    try:
        ensure_broker(settings)
    except BrokerError as exc:
        fail(exc)


@app.command()
def create(
    partitions: Annotated[int | None, setting_option("partitions", "--partitions")] = None,
    replication_factor: Annotated[
        int | None, setting_option("replication_factor", "--replication-factor")
    ] = None,
):
    """Create the system's topics; idempotent (existing topics are left unchanged)."""
    from aiokafka.errors import KafkaError

    settings = load_settings_or_exit(partitions=partitions, replication_factor=replication_factor)
    _connect(settings)
    try:
        reports = asyncio.run(
            create_topics(
                settings.client_kwargs(), topic_specs(settings), settings.replication_factor
            )
        )
    except KafkaError as exc:
        fail(f"{exc} (servers {settings.bootstrap_servers})")
    width = max(len(r.name) for r in reports)
    typer.echo(f"{'topic':<{width}}  partitions  cleanup.policy  state")
    for r in reports:
        typer.echo(f"{r.name:<{width}}  {r.partitions:>10}  {r.cleanup_policy:<14}  {r.state}")


@app.command()
def roundtrip(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the event back.")] = 30.0,
):
    """Produce one event to the events topic and consume it back (creates topics if needed)."""
    from aiokafka.errors import KafkaError

    settings = load_settings_or_exit()
    _connect(settings)
    try:
        asyncio.run(create_topics(settings.client_kwargs(), topic_specs(settings)))
        sent, back, where, seconds = asyncio.run(_roundtrip(settings, timeout))
    except (KafkaError, TimeoutError) as exc:
        fail(f"round trip through {settings.bootstrap_servers} failed: {exc!r}")
    typer.echo(f"produced to {where}: {sent.decode()}")
    typer.echo(f"consumed from {where} after {seconds * 1000:.0f} ms: {back.decode()}")
    if back != sent:
        fail("the event came back changed")
    typer.echo("round trip OK")


async def _roundtrip(settings: Settings, timeout: float) -> tuple[bytes, bytes, str, float]:
    import orjson
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    event = {
        "event_id": f"roundtrip-{uuid.uuid4().hex[:12]}",
        "user": "demo-user",
        "item": "demo-item",
        "action": "view",
        "ts": round(time.time(), 3),
    }
    payload = orjson.dumps(event)
    started = time.perf_counter()
    producer = AIOKafkaProducer(**settings.client_kwargs(), acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            settings.topic_events, payload, key=event["user"].encode()
        )
    finally:
        await producer.stop()
    # No consumer group: read exactly the partition and offset the broker acknowledged.
    consumer = AIOKafkaConsumer(**settings.client_kwargs(), enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(meta.topic, meta.partition)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        record = await asyncio.wait_for(consumer.getone(tp), timeout)
    finally:
        await consumer.stop()
    where = f"{meta.topic}[{meta.partition}]@{meta.offset}"
    return payload, record.value or b"", where, time.perf_counter() - started
