"""Canonical event/item files, the protocol split and label heads; check figures on ML-1M."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from sketchstream.models.errors import SketchstreamError
from sketchstream.models.events import (
    DEFAULT_HEADS,
    EventError,
    EventTable,
    Head,
    Item,
    check_event,
    labels,
    protocol_order,
    protocol_split,
    read_events,
    read_items,
    stream_md5,
    write_events,
    write_items,
)

RECORDS = [
    {"user": "u1", "item": "a", "action": "rate", "ts": 10, "value": 5},
    {"user": "u2", "item": "b", "action": "view", "ts": 11.5},
    {"user": "u1", "item": "b", "action": "rate", "ts": 12, "value": 2},
    {"user": "u3", "item": "a", "action": "buy", "ts": 13, "value": 9.99, "event_id": "e4"},
    {"user": "u2", "item": "c", "action": "rate", "ts": 14, "value": 4, "context": {"hour": 3}},
]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _error_reading_after_a_good_line(tmp_path: Path, line: str) -> EventError:
    """The error ``read_events`` raises on a file of one good line and then ``line``."""
    path = _write_lines(tmp_path / "e.jsonl", [orjson.dumps(RECORDS[0]).decode(), line])
    with pytest.raises(EventError) as error:
        read_events(path)
    return error.value


def test_events_round_trip_through_a_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    assert write_events(path, RECORDS) == 5
    events = read_events(path)
    assert len(events) == 5
    assert events.user.tolist() == ["u1", "u2", "u1", "u3", "u2"]
    assert events.ts.dtype == np.float64 and events.value.dtype == np.float32
    assert math.isnan(events.value[1])
    assert events.event_id.tolist() == [None, None, None, "e4", None]
    assert events.context["hour"][4] == 3 and np.isnan(events.context["hour"][0])
    assert list(events.records()) == RECORDS
    write_events(tmp_path / "again.jsonl", events)
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def test_integral_numbers_are_written_as_integers(tmp_path: Path) -> None:
    write_events(tmp_path / "e.jsonl", RECORDS[:1])
    assert b'"ts":10,"value":5}' in (tmp_path / "e.jsonl").read_bytes()


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path: Path) -> None:
    good = orjson.dumps(RECORDS[0]).decode()
    path = _write_lines(tmp_path / "e.jsonl", [good, "", good, "  ", '{"user": "u"}'])
    with pytest.raises(EventError, match=r"line 5: missing required field 'item'"):
        read_events(path)


_EVENT = '{"user":"u","item":"i","action":"rate"'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (_EVENT + ',"ts":"abc"}', "line 2: 'ts' must be a number, got 'abc'"),
        (_EVENT + "}", "line 2: missing required field 'ts'"),
        ('{"user":7,"item":"i","action":"r","ts":1}', "'user' must be a non-empty string, got 7"),
        ('{"user":"u","item":"","action":"r","ts":1}', "2: 'item' must be a non-empty string"),
        (_EVENT + ',"ts":true}', "line 2: 'ts' must be a number, got True"),
        (_EVENT + ',"ts":1,"value":"5"}', "line 2: 'value' must be a number or absent"),
        (_EVENT + ',"ts":1,"context":{"h":"x"}}', "line 2: 'context.h' must be a number"),
        (_EVENT + ',"ts":1,"event_id":3}', "line 2: 'event_id' must be a string"),
        ('{"user":"u","item":"i",', "line 2: not valid JSON"),
        ("[1, 2]", "line 2: an event must be a JSON object"),
    ],
)  # fmt: skip
def test_a_bad_line_is_reported_by_number_and_field(
    tmp_path: Path, line: str, message: str
) -> None:
    error = _error_reading_after_a_good_line(tmp_path, line)
    assert message in str(error)
    assert isinstance(error, SketchstreamError) and isinstance(error, ValueError)


def test_a_bad_line_deep_in_a_large_file_is_found(tmp_path: Path) -> None:
    good = orjson.dumps(RECORDS[0]).decode()
    lines = [good] * 70_000
    lines[66_000] = good.replace('"ts":10', '"ts":"x"')
    path = _write_lines(tmp_path / "e.jsonl", lines)
    with pytest.raises(EventError, match="line 66001: 'ts'"):
        read_events(path)


def test_check_event_accepts_a_valid_event_and_names_the_place() -> None:
    check_event(RECORDS[4])
    with pytest.raises(EventError, match=r"^event at 3: missing required field 'user'"):
        check_event({"item": "i"}, "event at 3")


def test_event_table_selects_rows_and_checks_column_lengths() -> None:
    events = EventTable.from_records(RECORDS)
    assert events[1:3].item.tolist() == ["b", "b"]
    assert events[np.array([True, False, False, True, False])].user.tolist() == ["u1", "u3"]
    with pytest.raises(EventError, match="column 'ts' has 1 rows"):
        EventTable(events.user, events.item, events.action, events.ts[:1], events.value)


def test_items_round_trip_and_metadata_is_optional(tmp_path: Path) -> None:
    items = [
        Item("Toy Story (1995)", title="Toy Story", categories=("Animation", "Comedy"), year=1995),
        Item("bare"),
        Item("tagged", tags=("space", "robots")),
    ]
    path = tmp_path / "items.jsonl"
    assert write_items(path, items) == 3
    assert read_items(path) == items
    assert path.read_text().splitlines()[1] == '{"item":"bare"}'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"title": "x"}', "line 1: missing required field 'item'"),
        ('{"item": "x", "year": "1995"}', "line 1: 'year' must be an integer"),
        ('{"item": "x", "categories": "Drama"}', "line 1: 'categories' must be a list of strings"),
    ],
)
def test_bad_item_lines_are_reported(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(EventError, match=message):
        read_items(_write_lines(tmp_path / "items.jsonl", [line]))


def test_a_repeated_item_is_an_error(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "items.jsonl", ['{"item": "x"}', '{"item": "x"}'])
    with pytest.raises(EventError, match="line 2: item 'x' already defined on line 1"):
        read_items(path)


# --- hostile values: limits first, messages safe on anything ---------------------------------

DEEP = "[" * 1000 + "]" * 1000  # 2 KB of JSON that orjson parses and repr() cannot print


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (DEEP, "line 2: an event must be a JSON object, got [[[["),
        (
            '{"user": ' + DEEP + ', "item": "i", "action": "a", "ts": 1}',
            "line 2: 'user' makes the event 1001 levels deep",
        ),
        (
            '{"user": "u", "item": "i", "action": "a", "ts": 1, "context": ' + DEEP + "}",
            "line 2: 'context' makes the event 1001 levels deep",
        ),
        (
            '{"user": "u", "item": "i", "action": "a", "ts": 1, "trace": ' + DEEP + "}",
            "line 2: 'trace' makes the event 1001 levels deep",
        ),
        (
            '{"user": "u", "item": "' + "i" * 513 + '", "action": "a", "ts": 1}',
            "line 2: 'item' is 513 characters long: over the limit of 512",
        ),
        ("[" * 1100 + "]" * 1100, "line 2: not valid JSON (depth limit exceeded"),
    ],
)
def test_a_hostile_line_in_an_events_file_is_a_clear_error(
    tmp_path: Path, line: str, message: str
) -> None:
    error = _error_reading_after_a_good_line(tmp_path, line)
    assert message in str(error)
    assert len(str(error)) < 300


@pytest.mark.parametrize(
    "line",
    [DEEP, '{"item": "x", "title": ' + DEEP + "}", '{"item": "x", "tags": ' + DEEP + "}"],
)
def test_a_hostile_line_in_an_items_file_is_a_clear_error(tmp_path: Path, line: str) -> None:
    with pytest.raises(EventError, match=r"line 1: .* got [\[]{10}"):
        read_items(_write_lines(tmp_path / "items.jsonl", [line]))


@pytest.mark.parametrize(
    "value",
    [_nested(5000), {"a": _nested(5000)}, [1] * 10**6, "x" * 10**6, 10**5000, object()],
    ids=["deep list", "deep dict", "long list", "long string", "huge int", "object"],
)
def test_check_event_refuses_any_value_with_a_short_message(value: object) -> None:
    for record in (value, {"user": value, "item": "i", "action": "a", "ts": 1}):
        with pytest.raises(EventError) as error:
            check_event(record)
        assert len(str(error.value)) < 200


def test_the_limits_are_parameters_of_check_event() -> None:
    record = {"user": "u", "item": "item-9", "action": "a", "ts": 1, "trace": [[1]]}
    check_event(record)
    with pytest.raises(EventError, match=r"'trace' makes the event 3 levels deep.* limit of 2"):
        check_event(record, max_depth=2)
    with pytest.raises(EventError, match="'item' is 6 characters long: over the limit of 5"):
        check_event(record, max_id_chars=5)


def test_an_event_table_refuses_overlong_ids_as_the_stream_does() -> None:
    with pytest.raises(EventError, match="record 2: 'user' is 600 characters long"):
        EventTable.from_records([RECORDS[0], {**RECORDS[1], "user": "u" * 600}])


def test_protocol_split_boundaries() -> None:
    assert protocol_split(1_000_209) == (
        slice(0, 800_167),
        slice(800_167, 900_188),
        slice(900_188, 1_000_209),
    )
    assert protocol_split(10) == (slice(0, 8), slice(8, 9), slice(9, 10))
    for n in range(0, 200):
        train, val, test = protocol_split(n)
        assert train.stop == val.start and val.stop == test.start and test.stop == n
        assert train.stop == math.floor(0.8 * n + 1e-9) and val.stop == math.floor(0.9 * n + 1e-9)


def test_protocol_order_sorts_by_time_then_ids_as_strings_stably() -> None:
    user = np.array(["9", "10", "10", "2", "10"], dtype=object)
    item = np.array(["b", "a", "a", "z", "a"], dtype=object)
    ts = np.array([5.0, 5.0, 5.0, 1.0, 4.0])
    assert protocol_order(user, item, ts).tolist() == [3, 4, 1, 2, 0]


def test_stream_md5_hashes_user_tab_item_lines() -> None:
    events = EventTable.from_records(RECORDS[:2])
    assert stream_md5(events) == hashlib.md5(b"u1\ta\nu2\tb\n").hexdigest()


def test_like_head_labels_ratings_of_four_and_up() -> None:
    y = labels(EventTable.from_records(RECORDS))
    assert y.shape == (5, 1) and y.dtype == np.float32
    np.testing.assert_array_equal(y[:, 0], [1, np.nan, 0, np.nan, 1])


def test_heads_without_threshold_and_with_wider_scope() -> None:
    events = EventTable.from_records(RECORDS)
    heads = [Head("bought", actions=("buy",), applies_to=("view", "buy")), *DEFAULT_HEADS]
    y = labels(events, heads)
    np.testing.assert_array_equal(y[:, 0], [np.nan, 0, np.nan, 1, np.nan])
    with pytest.raises(SketchstreamError, match="head names must be unique"):
        labels(events, [DEFAULT_HEADS[0], DEFAULT_HEADS[0]])
    with pytest.raises(SketchstreamError, match="'actions' must be a non-empty tuple"):
        Head("x", actions="rate")  # type: ignore[arg-type]


# --- check figures on the real data set -------------------------------------------------------


@pytest.mark.slow
def test_movielens_check_figures(movielens: Path) -> None:
    events = read_events(movielens / "events.jsonl")
    assert len(events) == 1_000_209
    _, _, test = protocol_split(len(events))
    assert (test.start, test.stop) == (900_188, 1_000_209)
    y = labels(events)[test, 0]
    assert round(float(y.mean()), 4) == 0.5444
    assert stream_md5(events) == "49b1222f67be297b7a4de1cb63da8501"
    assert np.all(np.diff(events.ts) >= 0)


def test_a_value_beyond_float32_range_is_refused_not_read_as_infinity(tmp_path: Path) -> None:
    line = '{"user": "u", "item": "i", "action": "rate", "ts": 1, "value": 1e39}'
    path = _write_lines(tmp_path / "e.jsonl", [orjson.dumps(RECORDS[0]).decode(), line])
    with pytest.raises(
        EventError,
        match=r"line 2: 'value' must be a number or absent \(a float32: within ±3.4e38\)",
    ):
        read_events(path)


# --- heads from the command line, and protocol order -----------------------------------------


@pytest.mark.parametrize(
    ("spec", "head"),
    [
        ("like:rate>=4", Head("like", ("rate",), 4.0)),
        ("reorder:purchase>=1", Head("reorder", ("purchase",), 1.0)),
        ("click:click@view,click", Head("click", ("click",), None, ("view", "click"))),
        ("play:play,replay>=0.5", Head("play", ("play", "replay"), 0.5)),
        ("return:next<=7d", Head("return", (), horizon=7 * 86400.0)),
        ("back:next<=36h@rate,view", Head("back", (), None, ("rate", "view"), 36 * 3600.0)),
        ("soon:next<=90m", Head("soon", (), horizon=5400.0)),
        ("blink:next<=45s", Head("blink", (), horizon=45.0)),
    ],
)
def test_a_head_spec_parses_and_prints_back(spec: str, head: Head) -> None:
    from sketchstream.models.events import parse_head

    assert parse_head(spec) == head
    assert head.spec == spec


def test_the_default_head_is_like_rate_at_least_4() -> None:
    from sketchstream.models.events import parse_head

    assert (parse_head("like:rate>=4"),) == DEFAULT_HEADS


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("rate>=4", "no NAME: before the actions"),
        ("like:", "an empty action name"),
        ("like:rate>=four", "threshold 'four' is not a number"),
        ("like:rate>=inf", "is not finite"),
        ("click:click@view>=1", "the threshold goes before @"),
        ("click:click@", "an empty action name after @"),
        ("top:rate>>5", "action 'rate>>5' has '>' in it"),
        ("top:rate>5", "the only comparison is >="),
        ("top:rate<=2", "action 'rate<=2' has '<=' in it"),
        ("return:next<=", "duration '': expected a number with s, m, h or d"),
        ("return:next<=7w", "duration '7w'"),
        ("return:next<=-1d", "must be positive"),
        ("return:next<=7d>=1", "duration '7d>=1'"),
        ("return:next<=7d@", "an empty action name after @"),
    ],
)
def test_a_bad_head_spec_names_the_part_and_the_syntax(spec: str, why: str) -> None:
    from sketchstream.models.events import parse_head

    with pytest.raises(SketchstreamError, match=why) as info:
        parse_head(spec)
    assert "NAME:ACTION" in str(info.value) and repr(spec) in str(info.value)


def test_the_default_return_head_is_return_within_7_days() -> None:
    from sketchstream.models.events import RETURN_HEAD, parse_head

    assert parse_head("return:next<=7d") == RETURN_HEAD and RETURN_HEAD.is_return
    assert not DEFAULT_HEADS[0].is_return


def test_a_return_head_refuses_actions_and_an_engagement_head_needs_them() -> None:
    with pytest.raises(SketchstreamError, match="a return head takes a positive horizon"):
        Head("return", ("rate",), horizon=60.0)
    with pytest.raises(SketchstreamError, match="non-empty tuple"):
        Head("like", ())


def test_return_labels_look_ahead_and_leave_censored_rows_unlabelled() -> None:
    from sketchstream.models.events import labels, protocol_known

    # a: back after 100 s, then after 900 s; b: never back; c: back at 1500
    rows = [(0, "a", "x"), (10, "b", "x"), (100, "a", "y"), (1000, "a", "y"), (1100, "c", "x")]
    rows += [(1500, "c", "z"), (2000, "d", "z")]
    events = _table(rows)
    head = Head("return", (), horizon=500.0)
    y = labels(events, (head,))[:, 0]
    # a row is labelled when its horizon ends by the last event's time (2000): 1500 is
    np.testing.assert_array_equal(y, [1, 0, 0, 0, 1, 0, np.nan])
    # a row may know only part of the stream: row 0 up to row 2 (t = 100 < 0 + 500)
    known = np.array([3, 3, 7, 7, 7, 7, 7])
    partial = labels(events, (head,), known)[:, 0]
    np.testing.assert_array_equal(partial, [np.nan, np.nan, *y[2:]])
    # protocol bounds: training rows read the training period only
    split = (slice(0, 4), slice(4, 6), slice(6, 7))
    np.testing.assert_array_equal(protocol_known(split), [4, 4, 4, 4, 6, 6, 7])


def test_return_labels_may_apply_to_some_actions_only() -> None:
    from sketchstream.models.events import labels

    events = _table([(0, "a", "x"), (10, "a", "y"), (20, "a", "z"), (1000, "b", "x")])
    events.action[1] = "view"
    y = labels(events, (Head("back", (), None, ("rate",), horizon=50.0),))[:, 0]
    # the view is not labelled, but it counts as the next event of the first rate
    np.testing.assert_array_equal(y, [1, np.nan, 0, np.nan])


def _table(rows: list[tuple[float, str, str]]) -> EventTable:
    ts, user, item = zip(*rows, strict=True) if rows else ((), (), ())
    return EventTable(
        user=np.array(user, dtype=object),
        item=np.array(item, dtype=object),
        action=np.full(len(rows), "rate", dtype=object),
        ts=np.array(ts, dtype=np.float64),
        value=np.full(len(rows), np.nan, dtype=np.float32),
    )


def test_protocol_order_holds_for_a_sorted_table_with_ties() -> None:
    from sketchstream.models.events import first_out_of_order

    rows = [(1, "10", "b"), (1, "9", "a"), (1, "9", "a"), (2, "1", "z")]  # "10" < "9"
    assert first_out_of_order(_table(rows)) is None
    assert first_out_of_order(_table([])) is None


@pytest.mark.parametrize(
    ("rows", "first"),
    [
        ([(1, "a", "x"), (3, "a", "x"), (2, "a", "x"), (0, "a", "x")], 2),  # ts goes back
        ([(1, "a", "x"), (2, "9", "x"), (2, "10", "x")], 2),  # ids are strings: "10" < "9"
        ([(1, "a", "y"), (1, "a", "x"), (0, "b", "x")], 1),  # the tie's item decides
    ],
)
def test_the_first_event_out_of_protocol_order_is_found(rows: list, first: int) -> None:
    from sketchstream.models.events import first_out_of_order

    assert first_out_of_order(_table(rows)) == first
    order = protocol_order(_table(rows).user, _table(rows).item, _table(rows).ts)
    assert first_out_of_order(_table(rows)[order]) is None
