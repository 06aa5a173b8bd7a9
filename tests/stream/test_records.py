"""Event validation: every kind of bad input is refused with a reason naming the field and the
source record; good events come out as columns in input order."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from sketchstream.stream.records import (
    EventLimits,
    RawMessage,
    RequestLimits,
    decode_events,
    decode_requests,
    dlq_record,
    prediction_records,
    recommendation_record,
)

ACTIONS = ("view", "like", "rate")


def message(value: object, *, offset: int = 0, key: bytes | None = b"u1", partition: int = 2):
    raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return RawMessage("events", partition, offset, key, raw, 1700000000.0)


def event(**fields: object) -> dict:
    base = {"user": "u1", "item": "i1", "action": "view", "ts": 1000.0}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def refuse(value: object, **kw: object) -> tuple[str, str]:
    decoded, rejects = decode_events([message(value, offset=17, **kw)], ACTIONS)
    assert len(decoded) == 0
    assert len(rejects) == 1
    return rejects[0].reason, rejects[0].message


def test_good_events_become_columns_in_input_order():
    msgs = [
        message(event(user="a", item="x", action="rate", value=4, ts=5), key=b"a", offset=3),
        message(event(user="b", event_id="e-9", context={"hour": 3}), key=b"b", offset=4),
    ]
    decoded, rejects = decode_events(msgs, ACTIONS)
    assert rejects == []
    assert decoded.user.tolist() == ["a", "b"]
    assert decoded.item.tolist() == ["x", "i1"]
    assert decoded.action.tolist() == [2, 0]
    assert decoded.value[0] == 4 and math.isnan(decoded.value[1])
    assert decoded.ts.dtype == np.float64 and decoded.ts.tolist() == [5.0, 1000.0]
    assert decoded.offset.tolist() == [3, 4] and decoded.partition.tolist() == [2, 2]
    assert decoded.event_id == [None, "e-9"]
    assert decoded.context == [None, {"hour": 3}]
    assert decoded.source.tolist() == [0, 1]


def test_unknown_action_names_the_action_the_record_and_the_choices():
    reason, text = refuse(event(action="lik"))
    assert reason == "unknown_action"
    assert text == "unknown action 'lik' in event at events[2]@17: expected one of like, rate, view"


def test_bad_json_is_refused():
    reason, text = refuse(b'{"user": "u1", ')
    assert reason == "bad_json"
    assert "events[2]@17" in text


@pytest.mark.parametrize("name", ["user", "item", "action", "ts"])
def test_missing_field_is_named(name):
    reason, text = refuse(event(**{name: ...}))
    assert reason == "missing_field"
    assert repr(name) in text and "events[2]@17" in text


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"user": 7}, "user"),
        ({"item": ""}, "item"),
        ({"ts": "yesterday"}, "ts"),
        ({"ts": True}, "ts"),
        ({"value": "5"}, "value"),
        ({"event_id": 3}, "event_id"),
        ({"context": [1, 2]}, "context"),
        ({"context": {"hour": "3"}}, "context.hour"),
    ],
)
def test_ill_typed_field_is_named(fields, name):
    reason, text = refuse(event(**fields))
    assert reason == "bad_field"
    assert repr(name) in text


def test_non_object_payload_is_refused():
    reason, _ = refuse([1, 2, 3])
    assert reason == "bad_field"


@pytest.mark.parametrize("ts", [-5.0, 1.7e12, 1e300])
def test_absurd_timestamps_are_refused(ts):
    reason, text = refuse(event(ts=ts))
    assert reason == "bad_timestamp"
    assert "events[2]@17" in text


def test_millisecond_timestamps_get_a_hint():
    _, text = refuse(event(ts=1.7e12))
    assert "milliseconds" in text


def test_oversized_payload_is_refused_unparsed():
    big = event(item="x" * 5000)
    decoded, rejects = decode_events([message(big)], ACTIONS, EventLimits(max_bytes=1024))
    assert len(decoded) == 0
    assert rejects[0].reason == "too_large"
    assert "over the limit of 1024" in rejects[0].message


def test_empty_payload_is_refused():
    assert refuse(None)[0] == "empty"


def test_key_other_than_user_is_refused():
    reason, text = refuse(event(user="u1"), key=b"u2")
    assert reason == "bad_key"
    assert "'u1'" in text


def test_bad_events_do_not_disturb_the_good_ones_around_them():
    msgs = [
        message(event(), offset=0),
        message(b"garbage", offset=1),
        message(event(action="nope"), offset=2),
        message(event(item="i2"), offset=3),
    ]
    decoded, rejects = decode_events(msgs, ACTIONS)
    assert decoded.offset.tolist() == [0, 3]
    assert decoded.source.tolist() == [0, 3]
    assert [(r.index, r.reason) for r in rejects] == [(1, "bad_json"), (2, "unknown_action")]


def test_dead_letter_carries_reason_source_and_payload():
    msg = message(b"garbage", offset=17)
    record = orjson.loads(dlq_record(msg, "bad_json", "event at events[2]@17: not JSON", now=5.0))
    assert record["reason"] == "bad_json"
    assert record["source"] == {
        "topic": "events",
        "partition": 2,
        "offset": 17,
        "timestamp": 1700000000.0,
    }
    assert record["payload"] == "garbage" and record["truncated"] is False
    assert record["error"].startswith("event at events[2]@17")


def test_dead_letter_truncates_huge_payloads():
    msg = message(b"x" * 100_000)
    record = orjson.loads(dlq_record(msg, "too_large", "too big", now=5.0))
    assert record["truncated"] is True
    assert record["payload_bytes"] == 100_000
    assert len(record["payload"]) < 10_000


def test_prediction_record_carries_reference_scores_versions_and_times():
    msgs = [message(event(user="u1", item="i9", event_id="e1", ts=42.5), offset=8)]
    decoded, _ = decode_events(msgs, ACTIONS)
    [(key, value)] = prediction_records(
        decoded,
        np.array([0]),
        np.array([[0.25, 0.5]], dtype=np.float32),
        topic="events",
        actions=ACTIONS,
        heads=("like", "click"),
        model_version="m1",
        codebook_version="interactions:c1",
        kafka_ts=[1700000000.0],
        received=1.0,
        published=2.0,
    )
    assert key == b"u1"
    record = orjson.loads(value)
    assert record["event"] == {"topic": "events", "partition": 2, "offset": 8, "event_id": "e1"}
    assert record["user"] == "u1" and record["item"] == "i9" and record["action"] == "view"
    assert record["scores"] == {"like": 0.25, "click": 0.5}
    assert record["model_version"] == "m1" and record["codebook_version"] == "interactions:c1"
    assert record["event_ts"] == 42.5
    assert (record["received_ts"], record["published_ts"]) == (1.0, 2.0)


def test_prediction_records_are_whole_json_objects_whatever_the_ids_hold():
    """Records are joined from a batch's shared bytes and each record's own: ids with quotes,
    backslashes, braces and non-ASCII text still make one valid object each, every field once."""
    odd = ['q"uote', "back\\slash", "}{,:", "ünï ☃", "tab\there"]
    msgs = [
        message(event(user=u, item=f"i{k}", event_id=f"e{u}"), offset=k, key=u.encode())
        for k, u in enumerate(odd)
    ]
    decoded, rejects = decode_events(msgs, ACTIONS)
    assert not rejects
    records = prediction_records(
        decoded,
        np.arange(len(odd)),
        np.full((len(odd), 1), 0.75, dtype=np.float32),
        topic="events",
        actions=ACTIONS,
        heads=("like",),
        model_version="m1",
        codebook_version="c1",
        kafka_ts=[None] * len(odd),
        received=1.0,
        published=2.0,
    )
    fields = ["event", "user", "item", "action", "scores", "event_ts", "kafka_ts"]
    fields += ["model_version", "codebook_version", "received_ts", "published_ts"]
    for k, (key, value) in enumerate(records):
        record = orjson.loads(value)
        assert list(record) == fields
        assert key == odd[k].encode() and record["user"] == odd[k]
        assert record["event"]["event_id"] == f"e{odd[k]}" and record["event"]["offset"] == k
        assert record["scores"] == {"like": 0.75} and record["kafka_ts"] is None


@pytest.mark.parametrize("seed", range(3))
def test_prediction_records_are_the_bytes_of_a_whole_object_dumps(seed: int):
    """Joined from pieces, each record is byte for byte ``orjson.dumps`` of the whole object:
    odd ids, no event id, no Kafka time, scores at the float32 extremes and not finite,
    several heads, a subset of the batch's rows."""
    rng = np.random.default_rng(seed)
    odd = ['q"uote', "back\\slash", "}{,:", "ünï ☃", "tab\there", "1,2", "u"]
    msgs = []
    for k in range(40):
        user = odd[k % len(odd)] + str(k % 5)
        fields = {"user": user, "item": rng.choice(odd) + "i", "action": ACTIONS[k % 3]}
        fields["ts"] = float(rng.choice([0.0, 1.5, 1.7e9 + k / 7, 123456789.123456789]))
        if k % 4:
            fields["event_id"] = f"e,{k}" + odd[k % len(odd)]
        msgs.append(message(event(**fields), offset=k * 1000, key=user.encode(), partition=k % 3))
    decoded, rejects = decode_events(msgs, ACTIONS)
    assert not rejects
    rows = np.sort(rng.choice(len(msgs), 25, replace=False))
    heads = ("like", "click", 'q"h')
    scores = rng.random((len(rows), len(heads))).astype(np.float32)
    scores[0] = [0.0, 1.0, np.float32(1e-30)]
    scores[1] = [np.nan, np.inf, -np.inf]
    kafka_ts = [None if j % 3 == 0 else 1.7e9 + j / 3 for j in range(len(rows))]
    records = prediction_records(
        decoded,
        rows,
        scores,
        topic='ev"ents',
        actions=ACTIONS,
        heads=heads,
        model_version="m1",
        codebook_version="c,1",
        kafka_ts=kafka_ts,
        received=1.25,
        published=2.5,
    )
    assert len(records) == len(rows)
    for j, (key, value) in enumerate(records):
        r = int(rows[j])
        whole = {
            "event": {
                "topic": 'ev"ents',
                "partition": int(decoded.partition[r]),
                "offset": int(decoded.offset[r]),
                "event_id": decoded.event_id[r],
            },
            "user": decoded.user[r],
            "item": decoded.item[r],
            "action": ACTIONS[int(decoded.action[r])],
            "scores": dict(zip(heads, scores[j].astype(np.float64).tolist(), strict=True)),
            "event_ts": float(decoded.ts[r]),
            "kafka_ts": kafka_ts[j],
            "model_version": "m1",
            "codebook_version": "c,1",
            "received_ts": 1.25,
            "published_ts": 2.5,
        }
        assert key == decoded.user[r].encode()
        assert value == orjson.dumps(whole)


# --- limits: checked before anything recursive looks at a value ----------------------------

DEEP = b"[" * 1000 + b"]" * 1000  # parses (orjson stops at 1024 levels); repr() would not


def spliced(name: str, raw: bytes, **fields: object) -> bytes:
    """An event's JSON with ``raw`` as the value of ``name`` (orjson won't write it itself)."""
    base = {k: v for k, v in event(**fields).items() if k != name}
    return orjson.dumps(base)[:-1] + f',"{name}":'.encode() + raw + b"}"


def test_an_array_nested_1000_deep_as_the_event_is_refused_as_bad_field():
    reason, text = refuse(DEEP)
    assert reason == "bad_field"
    assert "an event must be a JSON object, got [[[[" in text
    assert "nested over 32 levels deep" in text


@pytest.mark.parametrize("name", ["user", "context", "item", "tags"])
def test_an_array_nested_1000_deep_in_a_field_is_refused_naming_the_field(name):
    reason, text = refuse(spliced(name, DEEP))
    assert reason == "bad_field"
    assert f"'{name}' makes the event 1001 levels deep" in text
    assert "over the limit of 32" in text
    assert "events[2]@17" in text


def test_nesting_beyond_what_orjson_parses_is_bad_json():
    reason, text = refuse(b"[" * 1100 + b"]" * 1100)
    assert reason == "bad_json"
    assert "depth limit exceeded" in text


def test_nesting_within_the_limit_in_an_extra_field_is_accepted():
    decoded, rejects = decode_events([message(spliced("trace", b"[" * 31 + b"]" * 31))], ACTIONS)
    assert rejects == [] and len(decoded) == 1


@pytest.mark.parametrize("name", ["user", "item", "action", "event_id"])
def test_an_overlong_id_is_refused_naming_the_field_the_limit_and_its_length(name):
    long_id = "x" * 513
    key = long_id.encode() if name == "user" else b"u1"
    reason, text = refuse(event(**{name: long_id}), key=key)
    assert reason == "bad_field"
    assert f"'{name}' is 513 characters long: over the limit of 512" in text


def test_an_overlong_context_name_is_refused():
    reason, text = refuse(event(context={"h" * 600: 1}))
    assert reason == "bad_field"
    assert "a 'context' name is 600 characters long: over the limit of 512" in text


def test_an_id_of_exactly_the_limit_is_accepted():
    decoded, rejects = decode_events([message(event(item="x" * 512))], ACTIONS)
    assert rejects == [] and decoded.item.tolist() == ["x" * 512]


def test_the_limits_are_settings():
    limits = EventLimits(max_depth=3, max_id_chars=8)
    msgs = [
        message(event(item="123456789"), offset=0),
        message(event(context={"a": 1}, trace=[[[1]]]), offset=1),  # 4 levels
        message(event(trace=[[1]]), offset=2),  # 3 levels
    ]
    decoded, rejects = decode_events(msgs, ACTIONS, limits)
    assert [(r.index, r.reason) for r in rejects] == [(0, "bad_field"), (1, "bad_field")]
    assert "over the limit of 8" in rejects[0].message
    assert "over the limit of 3" in rejects[1].message
    assert decoded.source.tolist() == [2]


def test_an_event_without_a_key_is_refused_as_bad_key():
    reason, text = refuse(event(user="u7"), key=None)
    assert reason == "bad_key"
    assert "events[2]@17 has no key (user 'u7')" in text


def test_a_huge_key_is_shown_cut():
    reason, text = refuse(event(), key=b"k" * 100_000)
    assert reason == "bad_key"
    assert len(text) < 300


@pytest.mark.parametrize("value", [1e39, -1e300, 3.5e38])
def test_a_value_beyond_float32_range_is_refused_not_folded_as_infinity(value):
    reason, text = refuse(event(action="rate", value=value))
    assert reason == "bad_field"
    assert "'value' must be finite and within float32 range" in text


# --- recommendation requests ---------------------------------------------------------------


def request_message(value: object, *, key: bytes | None = b"u1", offset: int = 5):
    raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return RawMessage("recommend", 1, offset, key, raw, 1700000000.0)


def refuse_request(value: object, **kw: object) -> tuple[str, str]:
    requests, rejects = decode_requests([request_message(value, **kw)], RequestLimits(max_k=50))
    assert requests == [] and len(rejects) == 1
    return rejects[0].reason, rejects[0].message


def test_a_request_gets_defaults_for_what_it_leaves_out():
    [q], [] = decode_requests([request_message({"user": "u1", "request_id": "r1"})])
    assert (q.user, q.request_id, q.k, q.exclude_seen, q.categories, q.ts) == (
        "u1",
        "r1",
        10,
        True,
        None,
        None,
    )
    assert (q.source, q.partition, q.offset) == (0, 1, 5)


def test_a_full_request_is_read_as_given_and_requests_keep_their_batch_index():
    full = {
        "user": "u1",
        "request_id": "r2",
        "k": 3,
        "exclude_seen": False,
        "categories": ["odd"],
        "ts": 1e9,
    }
    requests, rejects = decode_requests([request_message(b"{"), request_message(full)])
    assert [r.reason for r in rejects] == ["bad_json"]
    [q] = requests
    assert (q.source, q.k, q.exclude_seen, q.categories, q.ts) == (1, 3, False, ("odd",), 1e9)


@pytest.mark.parametrize(
    ("value", "reason", "words"),
    [
        (b"", "empty", "no payload"),
        (b"[1, 2", "bad_json", "not JSON"),
        ([1, 2], "bad_field", "expected a JSON object"),
        ({"request_id": "r"}, "missing_field", "'user'"),
        ({"user": "u1"}, "missing_field", "'request_id'"),
        ({"user": "u1", "request_id": 7}, "bad_field", "'request_id' must be a non-empty string"),
        (
            {"user": "u1", "request_id": "r", "k": 0},
            "bad_field",
            "'k' must be an integer in [1, 50]",
        ),
        ({"user": "u1", "request_id": "r", "k": 51}, "bad_field", "got 51"),
        ({"user": "u1", "request_id": "r", "k": 2.5}, "bad_field", "'k'"),
        ({"user": "u1", "request_id": "r", "k": True}, "bad_field", "'k'"),
        ({"user": "u1", "request_id": "r", "exclude_seen": 1}, "bad_field", "true or false"),
        ({"user": "u1", "request_id": "r", "categories": []}, "bad_field", "'categories'"),
        ({"user": "u1", "request_id": "r", "categories": "odd"}, "bad_field", "'categories'"),
        ({"user": "u1", "request_id": "r", "ts": 1.7e12}, "bad_timestamp", "milliseconds"),
        ({"user": "u1", "request_id": "r", "kk": 3}, "bad_field", "unknown field 'kk'"),
        ({"user": "u2", "request_id": "r"}, "bad_key", "keyed by their user"),
    ],
)
def test_a_bad_request_is_refused_with_its_reason_and_its_source(value, reason, words):
    got, text = refuse_request(value)
    assert got == reason
    assert words in text
    assert "recommend[1]@5" in text


def test_an_unkeyed_or_oversized_request_is_refused():
    assert refuse_request({"user": "u1", "request_id": "r"}, key=None)[0] == "bad_key"
    big = {"user": "u1", "request_id": "r", "categories": ["x" * 200] * 100}
    assert refuse_request(big)[0] == "too_large"


def test_an_answer_names_the_request_the_items_and_the_model():
    [q], _ = decode_requests([request_message({"user": "u1", "request_id": "r1", "k": 2})])
    key, value = recommendation_record(
        q,
        items=["i3", "i1"],
        scores=[-1.5, -2.0],
        cold_start=False,
        as_of=1e9,
        topic="recommend",
        model_version="abc",
        codebook_version="interactions=1",
        received=1.0,
        published=2.0,
    )
    answer = orjson.loads(value)
    assert key == b"u1"
    assert answer["request_id"] == "r1" and answer["items"] == ["i3", "i1"]
    assert answer["scores"] == [-1.5, -2.0] and answer["model_version"] == "abc"
    assert answer["cold_start"] is False and answer["k"] == 2
    assert answer["request"] == {"topic": "recommend", "partition": 1, "offset": 5}
