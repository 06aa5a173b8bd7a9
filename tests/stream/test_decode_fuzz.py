"""Property: whatever arrives on the events topic, the worker's per-batch path answers every
message with exactly one prediction or one dead letter (or, read again, nothing new), and never
raises. Arbitrary bytes, arbitrary JSON (nested past any limit, huge numbers, long strings,
unicode), every field of a valid event replaced by anything, and valid events with bytes flipped,
cut or inserted, as values and as keys, through ``decode_events`` and ``BatchProcessor``;
recommendation requests likewise, through ``decode_requests`` and ``BatchProcessor.answer``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka_harness import build_tiny_artifact
from sketchstream.stream.models_feed import load_serving_model
from sketchstream.stream.records import REJECT_REASONS, RawMessage, decode_events, decode_requests
from sketchstream.stream.worker import BatchProcessor

# derandomized and without a database: the same examples on every run, a few seconds in all
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

USERS = ["u1", "u2", "ü3", "u" * 512]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return load_serving_model(root / build_tiny_artifact(root))


# --- values ------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.text(min_size=500, max_size=700)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def deep(draw) -> bytes:
    """Arrays or objects nested up to past orjson's own limit of 1024 levels."""
    depth = draw(st.sampled_from([1, 31, 32, 33, 500, 1000, 1023, 1024, 1025, 1100]))
    if draw(st.booleans()):
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


@st.composite
def valid_event(draw) -> dict:
    event = {
        "user": draw(st.sampled_from(USERS)),
        "item": draw(st.sampled_from(["i1", "i2", "i7", "unknown-item", "Toy Story (1995)"])),
        "action": draw(st.sampled_from(["view", "like", "rate"])),
        "ts": draw(st.floats(min_value=1e9, max_value=2e9)),
    }
    if draw(st.booleans()):
        event["value"] = draw(st.integers(1, 5))
    if draw(st.booleans()):
        event["event_id"] = draw(st.text(min_size=1, max_size=12))
    if draw(st.booleans()):
        event["context"] = {"hour": draw(st.integers(0, 23))}
    return event


def dumps(value) -> bytes:
    """JSON of any value: stdlib json writes what orjson refuses (ints past 64 bits, NaN)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def wrong_field(draw) -> bytes:
    """A valid event with one field replaced by anything, or spliced with deep nesting."""
    event = draw(valid_event())
    name = draw(st.sampled_from(["user", "item", "action", "ts", "value", "event_id", "context"]))
    if draw(st.booleans()):
        event[name] = draw(json_values)
        return dumps(event)
    event.pop(name, None)
    return orjson.dumps(event)[:-1] + f',"{name}":'.encode() + draw(deep()) + b"}"


@st.composite
def mutated(draw) -> bytes:
    raw = bytearray(orjson.dumps(draw(valid_event())))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(raw) - 1))
        what = draw(st.sampled_from(["flip", "cut", "insert"]))
        if what == "flip":
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif what == "cut":
            del raw[at]
        else:
            raw[at:at] = draw(st.binary(min_size=1, max_size=3))
        if not raw:
            break
    return bytes(raw)


# each kind about equally often (a plain one_of would favour the simplest: empty payloads)
payloads = st.sampled_from(
    [
        valid_event().map(orjson.dumps),
        valid_event().map(orjson.dumps),
        wrong_field(),
        mutated(),
        deep(),
        json_values.map(dumps),
        st.binary(max_size=64),
        st.none(),
    ]
).flatmap(lambda kind: kind)


@st.composite
def batches(draw) -> list[RawMessage]:
    messages = []
    for offset in range(draw(st.integers(1, 12))):
        value = draw(payloads)
        key_kind = draw(st.sampled_from(["user", "user", "none", "bytes"]))
        key: bytes | None = None
        if key_kind == "bytes":
            key = draw(st.binary(max_size=20))
        elif key_kind == "user":
            try:
                key = orjson.loads(value)["user"].encode()
            except Exception:  # not an event with a str user: any key will do
                key = b"u1"
        messages.append(RawMessage("events", draw(st.integers(0, 3)), offset, key, value, 1.0e9))
    return messages


# --- the properties --------------------------------------------------------------------------


@contextmanager
def worker_stack(headroom: int = 900) -> Iterator[None]:
    """The stack a worker has: Python's default limit of 1,000 frames, ~100 of them used by
    faust and asyncio. Hypothesis raises the recursion limit while a test runs, which would hide
    exactly the failures these tests are for (``repr`` of an array nested 1,000 deep)."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + headroom)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


@FUZZ
@given(batch=batches())
def test_decode_refuses_or_accepts_each_message_exactly_once(model, batch):
    with worker_stack():
        decoded, rejects = decode_events(batch, model.actions)
    refused = [r.index for r in rejects]
    assert sorted(refused + decoded.source.tolist()) == list(range(len(batch)))
    assert all(r.reason in REJECT_REASONS and len(r.message) < 1000 for r in rejects)


@FUZZ
@given(batch=batches())
@pytest.mark.filterwarnings("ignore")
def test_every_message_gets_one_prediction_or_one_dead_letter_and_nothing_raises(model, batch):
    store: dict = {}

    def read(partitions, keys):
        return [store.get((p, k)) for p, k in zip(partitions, keys, strict=True)]

    processor = BatchProcessor(model, read)
    with worker_stack():
        result = processor.process(batch)
    scored = [
        (p["event"]["partition"], p["event"]["offset"])
        for p in (orjson.loads(v) for _, v in result.predictions)
    ]
    dead = [
        (d["source"]["partition"], d["source"]["offset"])
        for d in (orjson.loads(v) for _, v in result.dlq)
    ]
    every = [(m.partition, m.offset) for m in batch]
    assert len(set(scored + dead)) == len(scored) + len(dead), "never both, never twice"
    assert set(scored + dead) <= set(every)
    # neither: only a retry (an event_id its user sent before in the batch), folded once
    seen: set = set()
    for m in batch:
        event = orjson.loads(m.value) if (m.partition, m.offset) in scored else None
        ref = event and (event["user"], event.get("event_id"))
        if ref and ref[1] is not None:
            seen.add(ref)
        if (m.partition, m.offset) not in scored and (m.partition, m.offset) not in dead:
            retry = orjson.loads(m.value)
            assert (retry["user"], retry.get("event_id")) in seen, f"{m} got no answer"
    assert {orjson.loads(v)["reason"] for _, v in result.dlq} <= set(REJECT_REASONS)
    for p, key, blob in result.table_writes:
        store[(p, key)] = blob

    # read again (a redelivery after a restart): the same dead letters, no new prediction
    with worker_stack():
        again = processor.process(batch)
    assert again.predictions == []
    assert [orjson.loads(v)["reason"] for _, v in again.dlq] == [
        orjson.loads(v)["reason"] for _, v in result.dlq
    ]


# --- recommendation requests: the other path that takes outside bytes ------------------------


@pytest.fixture(scope="module")
def recommending(tmp_path_factory):
    root = tmp_path_factory.mktemp("recommending")
    return load_serving_model(root / build_tiny_artifact(root, recommender=True))


@st.composite
def valid_request(draw) -> dict:
    request = {"user": draw(st.sampled_from(USERS)), "request_id": draw(st.text(max_size=12))}
    if draw(st.booleans()):
        request["k"] = draw(st.integers(-2, 1002))
    if draw(st.booleans()):
        request["exclude_seen"] = draw(st.booleans())
    if draw(st.booleans()):
        request["categories"] = draw(st.lists(st.sampled_from(["a", "b", "Comedy"]), max_size=3))
    if draw(st.booleans()):
        request["ts"] = draw(st.floats(min_value=1e9, max_value=2e9))
    return request


@st.composite
def wrong_request_field(draw) -> bytes:
    request = draw(valid_request())
    name = draw(
        st.sampled_from(["user", "request_id", "k", "exclude_seen", "categories", "ts", "extra"])
    )
    if draw(st.booleans()):
        request[name] = draw(json_values)
        return dumps(request)
    request.pop(name, None)
    return orjson.dumps(request)[:-1] + f',"{name}":'.encode() + draw(deep()) + b"}"


request_payloads = st.sampled_from(
    [
        valid_request().map(orjson.dumps),
        valid_request().map(orjson.dumps),
        wrong_request_field(),
        deep(),
        json_values.map(dumps),
        st.binary(max_size=64),
        st.none(),
    ]
).flatmap(lambda kind: kind)


@st.composite
def request_batches(draw) -> list[RawMessage]:
    messages = []
    for offset in range(draw(st.integers(1, 12))):
        value = draw(request_payloads)
        key: bytes | None = draw(st.sampled_from([None, b"u1", b"\xff", "ü3".encode()]))
        try:
            if draw(st.booleans()):
                key = orjson.loads(value)["user"].encode()
        except Exception:  # not a request with a str user: keep the drawn key
            pass
        messages.append(RawMessage("recommend", draw(st.integers(0, 3)), offset, key, value, 1.5e9))
    return messages


@FUZZ
@given(batch=request_batches())
@pytest.mark.filterwarnings("ignore")
def test_every_request_gets_one_answer_or_one_dead_letter_and_nothing_raises(recommending, batch):
    def read(partitions, keys):  # no stored states: every user is a cold start
        return [None] * len(keys)

    with worker_stack():
        requests, rejects = decode_requests(batch)
    refused = [r.index for r in rejects]
    assert sorted(refused + [q.source for q in requests]) == list(range(len(batch)))

    with worker_stack():
        result = BatchProcessor(recommending, read).answer(batch)
    answered = [
        (a["request"]["partition"], a["request"]["offset"])
        for a in (orjson.loads(v) for _, v in result.answers)
    ]
    dead = [
        (d["source"]["partition"], d["source"]["offset"])
        for d in (orjson.loads(v) for _, v in result.dlq)
    ]
    assert sorted(answered + dead) == sorted((m.partition, m.offset) for m in batch)
    assert {orjson.loads(v)["reason"] for _, v in result.dlq} <= set(REJECT_REASONS)
