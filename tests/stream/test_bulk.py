"""BulkConsumer's delivery logic on fetched records, without a broker (the worker's Kafka tests
cover it end to end: no skew, crash, takeover, poison events)."""

from __future__ import annotations

import asyncio
import inspect
from collections import namedtuple
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP
from sketchstream.stream.bulk import FINISHING_BEHIND, BulkApp, _Abandoned, _Failed

Record = namedtuple(
    "Record",
    "topic partition offset timestamp timestamp_type headers key value checksum "
    "serialized_key_size serialized_value_size",
)


def records(topic: str, partition: int, offsets: list[int]) -> list[Record]:
    return [Record(topic, partition, o, 1_000, 0, [], b"u", b"{}", None, 1, 2) for o in offsets]


class Harness:
    """A BulkApp (never started: no broker) whose handler and callback record what they get.
    Made inside the test's event loop: faust's services bind to the loop they are made in."""

    def __init__(self, size: int, on_batch: Any = None, finishing: Any = None) -> None:
        self.app = BulkApp(
            "bulk-test",
            broker="kafka://127.0.0.1:1",
            autodiscover=False,
            store="memory://",
            web_enabled=False,
        )
        self.batches: list[list[tuple[int, int]]] = []
        self.others: list[tuple[str, int, int]] = []

        async def handler(messages: list[Any]) -> Any:
            self.batches.append([(m.partition, m.offset) for m in messages])
            if on_batch is not None and inspect.isawaitable(got := on_batch(self)):
                await got
            return None if finishing is None else finishing(messages)

        events = self.app.topic("events", key_type=bytes, value_type=bytes)
        self.app.bulk(events, handler, size=size)
        self.app.topic("changelog", key_type=bytes, value_type=bytes, acks=False)
        self.consumer = self.app.consumer

        async def callback(message: Any) -> None:
            self.others.append((message.topic, message.partition, message.offset))

        self.consumer.callback = callback

    async def deliver(self, fetched: dict[TP, list[Record]]) -> None:
        await self.app.topics._update_indices()  # what subscribing does: acks for "events"
        await self.consumer._deliver(fetched, None)


async def test_a_fetch_becomes_batches_of_at_most_size_in_offset_order_per_partition():
    h = Harness(size=3)
    p0, p1 = TP("events", 0), TP("events", 1)
    await h.deliver({p0: records("events", 0, [0, 1, 2, 3, 4]), p1: records("events", 1, [0, 1])})
    assert [len(b) for b in h.batches] == [3, 3, 1]
    flat = [ref for b in h.batches for ref in b]
    assert sorted(flat) == [(0, o) for o in range(5)] + [(1, 0), (1, 1)]
    for p in (0, 1):
        offsets = [o for q, o in flat if q == p]
        assert offsets == sorted(offsets)
    assert h.consumer._read_offset[p0] == 4 and h.consumer._read_offset[p1] == 1


async def test_every_delivered_message_is_acknowledged_so_the_commit_passes_it():
    h = Harness(size=2)
    p0 = TP("events", 0)
    await h.deliver({p0: records("events", 0, [0, 1, 2])})
    assert not h.consumer.unacked
    assert h.consumer._new_offset(p0) == 3  # the offset to commit: all three processed


async def test_records_read_before_are_skipped_and_holes_are_gaps():
    h = Harness(size=10)
    p0 = TP("events", 0)
    h.consumer._read_offset[p0] = 5  # e.g. after a seek: the next offset to read is 5
    await h.deliver({p0: records("events", 0, [3, 4, 5, 6, 9])})
    assert h.batches == [[(0, 5), (0, 6), (0, 9)]]
    assert sorted((iv.begin, iv.end) for iv in h.consumer._gap[p0]) == [(7, 9)]  # 7 and 8
    assert h.consumer._new_offset(p0) == 10


async def test_other_topics_go_one_by_one_through_fausts_callback():
    h = Harness(size=10)
    await h.deliver(
        {
            TP("changelog", 0): records("changelog", 0, [0, 1]),
            TP("events", 0): records("events", 0, [0]),
        }
    )
    assert h.others == [("changelog", 0, 0), ("changelog", 0, 1)]
    assert h.batches == [[(0, 0)]]


async def test_a_flow_stop_abandons_the_rest_of_the_fetch_unacknowledged():
    h = Harness(size=2, on_batch=lambda h: h.consumer.stop_flow())  # a rebalance begins
    p0 = TP("events", 0)
    with pytest.raises(_Abandoned):
        await h.deliver({p0: records("events", 0, [0, 1, 2, 3])})
    assert h.batches == [[(0, 0), (0, 1)]]  # the batch under way finished, no further one
    assert h.consumer._read_offset[p0] == 1  # 2 and 3 will be read again
    assert h.consumer._new_offset(p0) == 2


async def test_a_fetch_asks_for_the_partitions_active_when_it_began():
    """faust keeps one live set of active partitions and pauses partitions in it while a fetch
    waits in the consumer thread; aiokafka reads an empty set as *every* partition. A fetch
    asks for a copy, so pausing everything meanwhile (recovery, before the hand-over) does
    not make it take the paused stream partitions' records (issue 12's stall)."""
    h = Harness(size=10)
    changelog, events = TP("changelog", 0), TP("events", 0)
    h.consumer.resume_partitions({changelog})
    h.consumer.pause_partitions({events})
    asked: list[set] = []

    async def getmany(active_partitions: Any, timeout: float) -> dict:
        h.consumer.pause_partitions({changelog})  # recovery is done meanwhile
        await asyncio.sleep(0)
        asked.append(set(active_partitions))
        return {}

    h.consumer._thread.getmany = getmany
    await h.consumer._getmany(h.consumer._get_active_partitions(), 1.0)
    assert asked == [{changelog}]
    assert await h.consumer._getmany(h.consumer._get_active_partitions(), 1.0) == {}
    assert len(asked) == 1  # nothing active: nothing asked, not everything


async def test_records_of_a_partition_paused_during_the_fetch_are_read_again():
    """aiokafka's position is past what a fetch returned: records of a partition paused while
    the fetch was under way are not delivered, and the partition is sought back to the first
    of them, so they are read when it is resumed."""
    h = Harness(size=10)
    p0, p1 = TP("events", 0), TP("events", 1)
    sought: list[dict] = []

    async def seek_wait(partitions: Any) -> None:
        sought.append(dict(partitions))

    h.consumer.seek_wait = seek_wait
    await h.app.topics._update_indices()
    await h.consumer._deliver(
        {p0: records("events", 0, [5, 6]), p1: records("events", 1, [0, 1])}, {p1}
    )
    assert h.batches == [[(1, 0), (1, 1)]]
    assert sought == [{p0: 5}]


class SlowBatch:
    """An ``on_batch`` that holds the first batch until released (a batch under way)."""

    def __init__(self) -> None:
        self.started, self.release, self.finished = asyncio.Event(), asyncio.Event(), 0

    async def __call__(self, h: Harness) -> None:
        self.started.set()
        await self.release.wait()
        self.finished += 1


def fetch_once(h: Harness, fetched: dict[TP, list[Record]]) -> None:
    """The consumer's next fetch brings ``fetched``, then nothing ever again."""
    todo = [fetched]

    async def next_records(timeout: float) -> tuple[dict, None]:
        if todo:
            return todo.pop(), None
        await asyncio.sleep(timeout)
        return {}, None

    h.consumer.next_records = next_records


async def test_a_stop_lets_the_batch_under_way_finish_and_acknowledges_it():
    """faust's stop cancels the fetch loop before it waits for the streams' acknowledgements,
    and here the handler runs inside that loop: cut short, a batch whose predictions are out
    would be read and published again after the restart. The batch under way finishes and is
    acknowledged (the stop commits it); the fetch's next batch is not delivered."""
    slow = SlowBatch()
    h = Harness(size=2, on_batch=slow)
    p0 = TP("events", 0)
    await h.app.topics._update_indices()
    fetch_once(h, {p0: records("events", 0, [0, 1, 2, 3])})
    fetcher = SimpleNamespace(should_stop=False)
    loop = asyncio.ensure_future(h.consumer.fetch_loop(fetcher))
    await asyncio.wait_for(slow.started.wait(), 5)
    # faust's stop: the app stopping, the flow stopped, the fetcher stopping and its task cancelled
    h.app._stopped.set()
    h.consumer.stop_flow()
    fetcher.should_stop = True
    loop.cancel()
    await asyncio.sleep(0.05)
    assert not loop.done()  # the batch under way holds the stop
    loop.cancel()  # faust's Fetcher cancels again each second it waits
    await asyncio.sleep(0.05)
    slow.release.set()
    await asyncio.wait_for(loop, 5)  # ends without raising: a clean stop
    assert slow.finished == 1 and h.batches == [[(0, 0), (0, 1)]]
    assert not h.consumer.unacked
    assert h.consumer._new_offset(p0) == 2


async def test_a_cancel_that_is_not_a_stop_cuts_the_batch_unacknowledged():
    """A rebalance restarts the fetcher by cancelling it: the batch under way is cut and read
    again from the commit, nothing of it acknowledged."""
    slow = SlowBatch()
    h = Harness(size=2, on_batch=slow)
    p0 = TP("events", 0)
    await h.app.topics._update_indices()
    fetch_once(h, {p0: records("events", 0, [0, 1])})
    loop = asyncio.ensure_future(h.consumer.fetch_loop(SimpleNamespace(should_stop=False)))
    await asyncio.wait_for(slow.started.wait(), 5)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(loop, 5)
    assert slow.finished == 0
    assert h.consumer._new_offset(p0) is None


def under_a_worker(h: Harness) -> tuple[Any, list[str]]:
    """``h``'s app under a mode ``Worker`` whose stops are only recorded (the stop itself is
    the Kafka tests'; no broker here): ``(worker, stops)``."""
    import mode

    worker = mode.Worker(loglevel="info", redirect_stdouts=False)
    h.app.beacon.reattach(worker.beacon)
    stops: list[str] = []

    async def stop() -> None:
        stops.append("stop")

    worker.stop = stop
    return worker, stops


async def test_a_failing_handler_stops_the_worker_with_its_error_and_acknowledges_nothing():
    """A batch handler that raises (a worker fault, not bad input) ends the fetch loop and
    stops the worker as a signal does, its error the reason it exits non-zero. Nothing of the
    batch is acknowledged, and nothing is crashed: a crash would also end the consumer thread
    the stop still commits through (issue 12's stall)."""

    def boom(h: Harness) -> None:
        if len(h.batches) == 2:
            raise OSError("disk full")

    h = Harness(size=2, on_batch=boom)
    worker, stops = under_a_worker(h)
    p0 = TP("events", 0)
    with pytest.raises(_Failed):
        await h.deliver({p0: records("events", 0, [0, 1, 2, 3, 4, 5])})
    assert h.batches == [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]  # no batch after the failed one
    await worker._signal_stop_future
    assert stops == ["stop"]
    assert isinstance(worker.crash_reason, OSError)  # mode's Worker re-raises it: exit 1
    assert h.consumer._new_offset(p0) == 2  # the stop commits the first batch, not the failed
    assert not h.consumer.unacked  # untracked: the stop does not wait for it
    assert not h.app.crashed and not h.consumer._thread.crashed


class Finishes:
    """A handler's ``finishing``: each batch hands back a finish that waits until the test
    releases that batch (its acknowledgements in flight), and records the order they ran in."""

    def __init__(self, fail_at: int | None = None, done_at: int | None = None) -> None:
        self.release: list[asyncio.Event] = []
        self.finished: list[int] = []
        self.fail_at = fail_at
        self.done_at = done_at  # the batch whose handler finishes it at once (returns None)

    def __call__(self, messages: list[Any]) -> Any:
        number = len(self.release)
        self.release.append(asyncio.Event())
        if number == self.done_at:
            return None

        async def finish() -> None:
            await self.release[number].wait()
            if number == self.fail_at:
                raise OSError("broker gone")
            self.finished.append(number)

        return finish


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def kept_tokens(h: Harness) -> list[Any]:
    """Every batch token the consumer tracks, kept alive here: faust's set of messages under
    way is weak, so a token nobody holds would leave it whether untracked or not."""
    tokens: list[Any] = []
    track = h.consumer.track_batch

    def tracking(first: Any) -> Any:
        tokens.append(track(first))
        return tokens[-1]

    h.consumer.track_batch = tracking
    return tokens


async def test_a_batch_handed_back_unfinished_is_acknowledged_when_it_finishes_behind_the_next():
    """The worker hands back the rest of a batch (its predictions' acknowledgements, then its
    states) to run while the fetch loop goes on: the batch is acknowledged only once that has
    finished, finishes run in batch order, and a batch is handed over only once the one
    FINISHING_BEHIND before it has finished (that many at most finish behind the fetch loop)."""
    assert FINISHING_BEHIND == 3
    finishes = Finishes()
    h = Harness(size=2, finishing=finishes)
    p0 = TP("events", 0)
    await h.app.topics._update_indices()
    delivery = asyncio.ensure_future(
        h.consumer._deliver({p0: records("events", 0, [0, 1, 2, 3, 4, 5, 6, 7])}, None)
    )
    await settle()
    # batches 0, 1 and 2 handed back unfinished; batch 3 waits for batch 0 to finish
    assert h.batches == [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4), (0, 5)]]
    assert not delivery.done()
    assert h.consumer._new_offset(p0) is None and len(h.consumer.unacked) == 3
    finishes.release[2].set()  # later batches' acknowledgements come first
    finishes.release[1].set()
    await settle()
    assert finishes.finished == [] and h.consumer._new_offset(p0) is None
    assert len(h.batches) == 3
    finishes.release[0].set()
    await asyncio.wait_for(delivery, 5)
    await settle()
    assert finishes.finished == [0, 1, 2]  # in batch order
    assert len(h.batches) == 4 and h.consumer._new_offset(p0) == 6
    finishes.release[3].set()
    await settle()
    assert finishes.finished == [0, 1, 2, 3]
    assert h.consumer._new_offset(p0) == 8 and not h.consumer.unacked


async def test_a_batch_left_finishing_when_the_fetches_stop_is_still_acknowledged():
    """The last batch of a run finishes on its own, not when a next batch comes: until then its
    token stays among the messages under way, which a stop's or a rebalance's ``wait_empty``
    waits to see empty."""
    finishes = Finishes()
    h = Harness(size=2, finishing=finishes)
    tokens = kept_tokens(h)
    p0 = TP("events", 0)
    await h.deliver({p0: records("events", 0, [0, 1])})
    assert h.consumer._new_offset(p0) is None and set(h.consumer.unacked) == set(tokens)
    finishes.release[0].set()
    await settle()
    assert finishes.finished == [0]
    assert h.consumer._new_offset(p0) == 2 and not h.consumer.unacked


async def test_a_batch_done_at_once_is_acknowledged_behind_the_batches_still_finishing():
    """A handler may finish a batch at once (the recommendation requests do) while an events
    batch before it still finishes: acknowledged behind it, so a failure there leaves both
    to be read again."""
    for fail in (False, True):
        finishes = Finishes(done_at=1, fail_at=0 if fail else None)
        h = Harness(size=2, finishing=finishes)
        h.app.fail = _no_fail  # a failure's stop is the other tests'
        tokens = kept_tokens(h)
        p0 = TP("events", 0)
        await h.deliver({p0: records("events", 0, [0, 1, 2, 3])})
        assert len(h.batches) == 2 and h.consumer._new_offset(p0) is None
        finishes.release[0].set()
        await settle()
        if fail:
            assert h.consumer._new_offset(p0) is None and not set(tokens) & set(h.consumer.unacked)
        else:
            assert h.consumer._new_offset(p0) == 4 and not h.consumer.unacked


async def _no_fail(exc: BaseException) -> None:
    return None


async def test_a_batch_failing_to_finish_stops_the_worker_and_nothing_behind_it_is_acknowledged():
    """A finish that raises (the predictions not acknowledged) is a failure of the worker, as a
    handler that raises: the worker stops with its error, the batch and the ones handled behind
    it are never acknowledged (read again after the restart, at-least-once), the fetch ends."""

    finishes = Finishes(fail_at=1)
    h = Harness(size=2, finishing=finishes)
    worker, stops = under_a_worker(h)
    tokens = kept_tokens(h)
    p0 = TP("events", 0)
    await h.app.topics._update_indices()
    delivery = asyncio.ensure_future(
        h.consumer._deliver({p0: records("events", 0, list(range(10)))}, None)
    )
    await settle()
    finishes.release[0].set()
    await settle()
    assert len(h.batches) == FINISHING_BEHIND + 1  # batch 3 handled while 1 and 2 finish
    finishes.release[1].set()
    with pytest.raises(_Failed):
        await asyncio.wait_for(delivery, 5)
    await worker._signal_stop_future
    assert stops == ["stop"] and isinstance(worker.crash_reason, OSError)
    finishes.release[2].set()
    finishes.release[3].set()
    await settle()
    assert len(h.batches) == 4 and finishes.finished == [0]
    assert h.consumer._new_offset(p0) == 2  # batch 0 only
    assert len(tokens) == 4 and not h.consumer.unacked  # untracked: no stop waits for them
    assert h.consumer._finish_failed


async def test_the_batch_size_must_be_positive():
    app = BulkApp("bulk-test-size", broker="kafka://127.0.0.1:1", autodiscover=False)
    with pytest.raises(ValueError, match="at least 1"):
        app.bulk(app.topic("events"), lambda messages: asyncio.sleep(0), size=0)


def test_a_faust_without_the_consumer_internals_fails_at_import_with_the_pin_named():
    """The bulk consumer overrides faust-streaming 0.15.3's private fetch loop: another faust
    must fail on import with what to install, not deep in a fetch."""
    import subprocess
    import sys

    code = (
        "import faust.transport.drivers.aiokafka as a; "
        "owner = next(k for k in a.Consumer.__mro__ if '_add_gap' in vars(k)); "
        "delattr(owner, '_add_gap'); import sketchstream.stream.bulk"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode != 0
    assert "Consumer._add_gap" in run.stderr and "faust-streaming==0.15.3" in run.stderr


@pytest.mark.parametrize(
    ("module", "owner", "name"),
    [
        ("mode", "Worker", "_starting_fut"),
        ("aiokafka.client", "AIOKafkaClient", "_metadata_update"),
    ],
)
def test_a_mode_or_aiokafka_without_a_private_name_used_fails_at_import_naming_it(
    module, owner, name
):
    """One check at import covers every private name of faust, mode and aiokafka the worker
    uses (``stream/faust_compat.py``), not only faust's consumer."""
    import subprocess
    import sys

    code = (
        f"import {module} as m; k = next(c for c in m.{owner}.__mro__ if {name!r} in vars(c)); "
        f"delattr(k, {name!r}); import sketchstream.stream.bulk"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode != 0
    assert f"{owner}.{name}" in run.stderr and "faust-streaming==0.15.3" in run.stderr
