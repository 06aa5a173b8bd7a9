"""UserStates without a broker: states held until written are what the next batch reads."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from rocksdict import Options, Rdict
from sketchstream.stream import tables
from sketchstream.stream.tables import UserStates


@pytest.fixture
def states(tmp_path, monkeypatch) -> UserStates:
    """A UserStates over two real RocksDB partitions; the changelog records are only counted."""
    dbs = {p: Rdict(str(tmp_path / f"p{p}"), options=Options(raw_mode=True)) for p in (0, 1)}
    table = SimpleNamespace(
        data=SimpleNamespace(_db_for_partition=dbs.__getitem__),
        changelog_topic=SimpleNamespace(get_topic_name=lambda: "users-changelog"),
        app=SimpleNamespace(producer=None),
    )
    sent: list[Any] = []

    async def publish_to(producer: Any, topic: str, writes: Any) -> list[Any]:
        sent.extend(writes)
        return []

    monkeypatch.setattr(tables, "publish_to", publish_to)
    s = UserStates(table)
    s.sent = sent  # type: ignore[attr-defined]
    yield s
    for db in dbs.values():
        db.close()


async def test_held_states_are_read_first_and_let_go_once_written(states):
    await states.write([(0, b"a", b"a1"), (1, b"b", b"b1")])
    first = [(0, b"a", b"a2"), (1, b"c", b"c1")]
    states.hold(first)  # a batch whose predictions are not acknowledged yet
    assert states.read([0, 1, 1, 0], [b"a", b"b", b"c", b"c"]) == [b"a2", b"b1", b"c1", None]
    second = [(0, b"a", b"a3")]
    states.hold(second)  # the next batch, handled meanwhile, changed the same user again
    assert states.read([0], [b"a"]) == [b"a3"]
    await states.write(first)  # the first batch finishes: stored, but a3 stays held
    assert states.held == {(0, b"a"): b"a3"}
    assert states.read([0, 1], [b"a", b"c"]) == [b"a3", b"c1"]
    await states.write(second)
    assert states.held == {}
    assert states.read([0, 1, 1], [b"a", b"b", b"c"]) == [b"a3", b"b1", b"c1"]
    assert len(states.sent) == 5  # every write went to the changelog too
