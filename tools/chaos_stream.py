"""The streams of ``bench chaos``: the good events numbered, and the fuzz mixed in between.

- :data:`FUZZ_KINDS`: each kind of bad record the worker must dead-letter;
- :func:`numbered_events`: the good events, each given ``event_id`` ``chaos-<k>``;
- :func:`mixed_stream`: the :class:`Record` list to produce (good events, fuzz records keyed
  like the good event they follow, on the partition Kafka's partitioner gives that key),
  seeded: the same seed makes the same stream;
- :func:`split_parts`: the mixed stream cut in three parts for the chaos run's faults.

Pure (no Kafka I/O): what the tests pin down. The run is :mod:`sketchstream.tools.chaos`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FUZZ_KINDS", "Record", "mixed_stream", "numbered_events", "split_parts"]

FUZZ_KINDS = (
    "bad_json",  # a real event's JSON cut short
    "not_utf8",  # random bytes, invalid UTF-8
    "empty",  # a zero-byte value
    "tombstone",  # no value at all
    "deep_array",  # an array nested 1,000 deep at the top level (2 KB)
    "deep_context",  # a real event whose context is an array nested 1,000 deep
    "deep_user",  # a real event whose user is an array nested 1,000 deep
    "wrong_types",  # a real event with one field of the wrong type (or an infinite value)
    "missing_field",  # a real event without one of user, item, action, ts
    "unknown_action",  # an action the model does not know
    "bad_timestamp",  # milliseconds, negative, or past year 2100
    "oversized",  # a real event padded to 64 KiB
    "long_id",  # a real event whose item id is 4,096 characters
    "null_key",  # a valid event of a real user, sent without a key (to the user's partition)
    "wrong_key",  # a valid event of one user keyed by another
    "resent",  # a good event sent again (a producer retry): same event_id, later offset
)
"""What the fuzz mixes into the good events; each is one kind of record the worker must
dead-letter (``resent``: must not fold twice or score differently)."""

DEEP = 1000  # nesting of the deep_* fuzz kinds


@dataclass(frozen=True)
class Record:
    """One record to produce: ``kind`` is ``"good"`` or one of :data:`FUZZ_KINDS`;
    ``event_id`` the good event it is (good and resent records), else None."""

    key: bytes | None
    value: bytes | None
    partition: int
    kind: str
    event_id: str | None = None


def numbered_events(lines: Sequence[bytes]) -> list[dict[str, Any]]:
    """The events of ``lines`` (canonical JSON), each given ``event_id`` ``chaos-<k>`` (an id
    the data may carry is replaced: the bench matches predictions by it)."""
    import orjson

    return [{**orjson.loads(line), "event_id": f"chaos-{k}"} for k, line in enumerate(lines)]


def _partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2) gives ``key``."""
    from aiokafka.partitioner import DefaultPartitioner

    every = list(range(partitions))
    return DefaultPartitioner()(key, every, every)


def mixed_stream(
    events: Sequence[Mapping[str, Any]],
    partitions: int,
    *,
    fuzz_rate: float,
    kinds: Sequence[str] = FUZZ_KINDS,
    seed: int = 0,
) -> tuple[list[Record], list[Record]]:
    """``(good, mixed)``: the good events as records keyed by user, and the same records with
    ``round(fuzz_rate * len(events))`` fuzz records inserted after seeded random good events,
    the kinds taken in turn (each cycle shuffled), so every kind appears once there are as
    many fuzz records as kinds."""
    import numpy as np
    import orjson

    unknown = sorted(set(kinds) - set(FUZZ_KINDS))
    if unknown:
        raise ValueError(f"unknown fuzz kinds {unknown}: expected some of {', '.join(FUZZ_KINDS)}")
    rng = np.random.default_rng(seed)
    part: dict[str, int] = {}
    good = []
    for e in events:
        user = str(e["user"])
        if user not in part:
            part[user] = _partition_of(user.encode(), partitions)
        good.append(Record(user.encode(), orjson.dumps(e), part[user], "good", e["event_id"]))
    n_fuzz = round(fuzz_rate * len(events)) if kinds else 0
    after = np.sort(rng.integers(0, len(events), n_fuzz)) if len(events) else []
    order: list[str] = []
    while len(order) < n_fuzz:
        order += [kinds[i] for i in rng.permutation(len(kinds))]
    users = list(part)
    mixed: list[Record] = []
    at = 0
    for k, (i, kind) in enumerate(zip(list(after), order, strict=False)):
        i = int(i)
        mixed.extend(good[at : i + 1])
        at = i + 1
        mixed.append(_fuzz(kind, k, i, events, good, users, part, partitions, rng))
    mixed.extend(good[at:])
    return good, mixed


def _fuzz(
    kind: str,
    k: int,
    i: int,
    events: Sequence[Mapping[str, Any]],
    good: Sequence[Record],
    users: Sequence[str],
    part: Mapping[str, int],
    partitions: int,
    rng: Any,
) -> Record:
    """Fuzz record number ``k``, following good event ``i``, keyed like it."""
    import orjson

    near = dict(events[i])
    key, p = good[i].key, good[i].partition
    fid = f"fuzz-{kind}-{k}"
    near["event_id"] = fid
    user = near["user"]
    dumps = orjson.dumps
    value: bytes | None
    if kind == "bad_json":
        text = dumps(near)
        value = text[: int(rng.integers(1, len(text) - 1))]
    elif kind == "not_utf8":
        value = b"\xff\xfe" + rng.integers(0, 256, 64, dtype="uint8").tobytes()
    elif kind == "empty":
        value = b""
    elif kind == "tombstone":
        value = None
    elif kind == "deep_array":
        value = b"[" * DEEP + b"]" * DEEP
    elif kind == "deep_context":
        value = dumps(near)[:-1] + b',"context":' + b"[" * DEEP + b"]" * DEEP + b"}"
    elif kind == "deep_user":
        rest = {f: v for f, v in near.items() if f != "user"}
        value = b'{"user":' + b"[" * DEEP + b"]" * DEEP + b"," + dumps(rest)[1:]
    elif kind == "wrong_types":
        variant = int(rng.integers(0, 7))
        if variant == 6:  # a number JSON allows but no double holds
            value = dumps({**near, "value": 1})[:-1] + b',"value":1e999}'
        else:
            name, bad = [
                ("ts", str(near["ts"])),
                ("user", 12345),
                ("item", [near["item"]]),
                ("value", "five"),
                ("action", 3),
                ("context", ["x", 1]),
            ][variant]
            value = dumps({**near, name: bad})
    elif kind == "missing_field":
        drop = ("user", "item", "action", "ts")[int(rng.integers(0, 4))]
        value = dumps({f: v for f, v in near.items() if f != drop})
    elif kind == "unknown_action":
        value = dumps({**near, "action": ("lik", "purchase", "RATE")[int(rng.integers(0, 3))]})
    elif kind == "bad_timestamp":
        ts = float(near["ts"])
        value = dumps({**near, "ts": (ts * 1000.0, -ts, 1e13)[int(rng.integers(0, 3))]})
    elif kind == "oversized":
        value = dumps({**near, "pad": "x" * 65536})
    elif kind == "long_id":
        value = dumps({**near, "item": "i" * 4096})
    elif kind == "null_key":
        value, key = dumps(near), None
    elif kind == "wrong_key":
        others = [u for u in users if u != user]
        if others:
            other = others[int(rng.integers(0, len(others)))]
            key, p = other.encode(), part[other]
        else:  # one user only: a key no user has
            key = f"{user}-not-the-user".encode()
            p = _partition_of(key, partitions)
        value = dumps(near)
    elif kind == "resent":
        j = int(rng.integers(max(0, i - 50), i + 1))
        return Record(good[j].key, good[j].value, good[j].partition, kind, good[j].event_id)
    else:  # pragma: no cover (mixed_stream checks the kinds)
        raise ValueError(kind)
    return Record(key, value, p, kind, None)


def split_parts(mixed: Sequence[Record], n_good: int) -> list[list[Record]]:
    """``mixed`` cut into three parts after the n/3-th and 2n/3-th good events."""
    cuts = [n_good // 3, 2 * n_good // 3]
    out: list[list[Record]] = [[], [], []]
    seen = 0
    for r in mixed:
        which = sum(seen >= c for c in cuts)
        out[which].append(r)
        seen += r.kind == "good"
    return out
