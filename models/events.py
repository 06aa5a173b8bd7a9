"""Canonical event and item files, the evaluation protocol's split, and label heads.

Everything that reads history — the trainer, the evaluator, the replay tool, tests — goes
through this module, so all of them agree on one schema and one split.

Events file (``events.jsonl``): JSON lines, one event per line, in stream order::

    {"user": "1m_1", "item": "Toy Story (1995)", "action": "rate", "ts": 978300760, "value": 5}

=============  ========  =========================================================
field          type      meaning
=============  ========  =========================================================
``user``       str       user id (non-empty); the Kafka key
``item``       str       item id (non-empty)
``action``     str       what the user did: ``rate``, ``view``, ``click``, ...
``ts``         number    event time, seconds since the Unix epoch
``value``      number    optional: rating, dwell time, amount (absent = missing)
``context``    object    optional: numeric features of the request, name -> number
``event_id``   str       optional: a producer-assigned id, for deduplication
=============  ========  =========================================================

Items file (``items.jsonl``): JSON lines, one item per line; every field but ``item`` is
optional, and items without any metadata (or without an items file at all) are fine::

    {"item": "Toy Story (1995)", "title": "Toy Story", "year": 1995,
     "categories": ["Animation", "Children's", "Comedy"]}

``item`` (str), ``title`` (str), ``categories`` (list of str: genres, sections), ``year``
(int), ``tags`` (list of str: free-form tokens).

Fields not listed above are ignored on read, so producers may carry extra information.

Limits (:data:`MAX_DEPTH`, :data:`MAX_ID_CHARS`): an event nests objects and arrays at most 32
levels deep (the event object itself is level 1, ``context`` level 2), and each id (``user``,
``item``, ``action``, ``event_id``, a ``context`` name) is at most 512 characters long. They are
checked before anything else looks into a value, so a hostile record (an array nested 1,000
deep, a megabyte-long id) is refused with a one-line message instead of exhausting the stack.

Evaluation protocol (DESIGN.md, "Data"): the stream is the events in file order (converters
write them sorted stably by ``(ts, user, item)``, ids compared as strings); the first 80 %
train, the next 10 % validation, the last 10 % test (:func:`protocol_split`). Labels come from
*heads* (:class:`Head`): the default head ``like`` is "a ``rate`` event with value >= 4".

Over 600 lines because it is the one contract every reader of history shares: the schema, its
bounded validation, the fast column reader that names the first bad line, the writers, the
protocol split and the heads must agree, so they live together.
"""

from __future__ import annotations

import gc
import hashlib
import math
import numbers
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter, methodcaller
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import orjson
from sketchstream.models.errors import ModelError

__all__ = [
    "DEFAULT_HEADS",
    "HEAD_SYNTAX",
    "MAX_DEPTH",
    "MAX_ID_CHARS",
    "RETURN_HEAD",
    "EventError",
    "EventTable",
    "Head",
    "Item",
    "check_event",
    "engagement_heads",
    "first_out_of_order",
    "iter_event_lines",
    "labels",
    "parse_duration",
    "parse_head",
    "protocol_known",
    "protocol_order",
    "protocol_split",
    "read_events",
    "read_items",
    "stream_md5",
    "write_events",
    "write_items",
]


class EventError(ModelError):
    """An event or item record (or file) does not follow the canonical schema."""


_NUMBER = (int, float)

#: Default limits (the stream's ``EventLimits`` starts from these). Depth: the canonical event
#: needs 2 levels (event, context); 32 leaves producers room for nested extra fields while a
#: value nested hundreds deep, which would exhaust Python's recursion limit in any recursive
#: consumer (``repr``, ``copy.deepcopy``, ``json``), is refused. Ids: MovieLens titles are under
#: 200 characters, UUIDs 36, URLs a few hundred; 512 allows all of them and refuses payloads
#: posing as ids (a user id is a RocksDB key and a Kafka key; an item id is kept in histories).
MAX_DEPTH = 32
MAX_ID_CHARS = 512

_ID_FIELDS = ("user", "item", "action")
_SHOW_CHARS = 60
_END = object()


def _show(value: Any, limit: int = _SHOW_CHARS) -> str:
    """At most ``limit`` characters of ``value`` as Python would write it, for error messages.

    Safe on any value: containers are walked with an explicit stack and the walk stops once
    ``limit`` characters are written, so an array nested 1,000 deep or a list of a million
    items costs a few dozen steps (``repr`` would recurse, and raise ``RecursionError``).
    """
    out: list[str] = []
    size = 0
    stack: list[list[Any]] = []  # [children iterator, closing bracket, is a dict, children seen]
    node, pending = value, True
    while size <= limit:
        if pending:
            pending = False
            if isinstance(node, dict):
                text = "{"
                stack.append([iter(node.items()), "}", True, 0])
            elif isinstance(node, list | tuple):
                text = "[" if isinstance(node, list) else "("
                stack.append([iter(node), "]" if isinstance(node, list) else ")", False, 0])
            else:
                text = _show_scalar(node, limit)
            out.append(text)
            size += len(text)
            continue
        if not stack:
            break
        top = stack[-1]
        child = next(top[0], _END)
        if child is _END:
            stack.pop()
            out.append(top[1])
            size += 1
            continue
        if top[3]:
            out.append(", ")
            size += 2
        top[3] += 1
        if top[2]:
            key, node = child
            text = _show_scalar(key, limit) + ": "
            out.append(text)
            size += len(text)
        else:
            node = child
        pending = True
    text = "".join(out)
    if pending or stack or len(text) > limit:
        return text[: limit - 3] + "..."
    return text


def _show_scalar(value: Any, limit: int) -> str:
    """A non-container value, bounded: strings are cut before ``repr`` (a megabyte id costs
    nothing), huge ints are named by size (``repr`` refuses ints over 4,300 digits)."""
    kind = type(value)
    if kind is str:
        return repr(value[: limit + 1])
    if kind is int and value.bit_length() > 256:
        return f"<an int of {value.bit_length()} bits>"
    if value is None or kind in (bool, int, float, bytes):
        return repr(value if kind is not bytes else value[: limit + 1])
    if isinstance(value, numbers.Number):  # numpy scalars: their repr names their type
        return repr(value)[: limit + 1]
    return f"<{kind.__name__}>"


def _is_number(value: Any) -> bool:
    # bool is an int subclass; True is not a timestamp. An int beyond float range is not a
    # number either (math.isfinite would raise OverflowError on it).
    kind = type(value)
    if kind is float:
        return math.isfinite(value)
    return kind is int and -_FLOAT_MAX < value < _FLOAT_MAX


_FLOAT_MAX = int(sys.float_info.max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def nesting_depth(value: Any, stop: int | None = None) -> int:
    """How many containers (dicts, lists) deep ``value`` nests: 0 for a scalar, 1 for
    ``[1, 2]``, 2 for ``{"context": {"hour": 3}}``; walked without recursion. With ``stop``,
    returns as soon as the depth exceeds it (the exact depth of a hostile value is not needed
    to refuse it, and the walk stays short)."""
    if not isinstance(value, dict | list):
        return 0
    deepest = 1
    stack = [(value, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        node, depth = pop()
        if depth > deepest:
            deepest = depth
            if stop is not None and depth > stop:
                return depth
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                push((child, depth + 1))
    return deepest


def _check_limits(record: dict, where: str, max_depth: int, max_id_chars: int) -> None:
    """The limits, checked before anything looks into a value (see the module docstring)."""
    for name, value in record.items():
        if isinstance(value, dict | list):
            depth = 1 + nesting_depth(value)
            if depth > max_depth:
                raise EventError(
                    f"{where}: {_show_scalar(name, 40)} makes the event {depth} levels deep "
                    f"(objects and arrays, the event itself is level 1): over the limit of "
                    f"{max_depth}"
                )
    for name in (*_ID_FIELDS, "event_id"):
        value = record.get(name)
        if type(value) is str and len(value) > max_id_chars:
            raise EventError(
                f"{where}: {name!r} is {len(value)} characters long: over the limit of "
                f"{max_id_chars} ({_show(value, 40)})"
            )
    context = record.get("context")
    if isinstance(context, dict):
        for key in context:
            if type(key) is str and len(key) > max_id_chars:
                raise EventError(
                    f"{where}: a 'context' name is {len(key)} characters long: over the limit "
                    f"of {max_id_chars} ({_show(key, 40)})"
                )


def check_event(
    record: Any,
    where: str = "event",
    *,
    max_depth: int = MAX_DEPTH,
    max_id_chars: int = MAX_ID_CHARS,
) -> None:
    """Raise :class:`EventError` unless ``record`` is a valid canonical event.

    ``where`` prefixes the message (``"line 17"``), so file readers and the stream's validator
    report the same wording: ``line 17: 'ts' must be a number, got 'abc'``. ``max_depth`` and
    ``max_id_chars``: the limits (module docstring), checked first. Safe on any value: nothing
    here recurses into it.
    """
    if not isinstance(record, dict):
        depth = nesting_depth(record, stop=max_depth)
        deep = f" (nested over {max_depth} levels deep)" if depth > max_depth else ""
        raise EventError(f"{where}: an event must be a JSON object, got {_show(record)}{deep}")
    _check_limits(record, where, max_depth, max_id_chars)
    for name in _ID_FIELDS:
        if name not in record:
            raise EventError(f"{where}: missing required field {name!r}")
        value = record[name]
        if not isinstance(value, str) or not value:
            raise EventError(f"{where}: {name!r} must be a non-empty string, got {_show(value)}")
    if "ts" not in record:
        raise EventError(f"{where}: missing required field 'ts'")
    if not _is_number(record["ts"]):
        raise EventError(f"{where}: 'ts' must be a number, got {_show(record['ts'])}")
    value = record.get("value")
    if value is not None and not (_is_number(value) and -_FLOAT32_MAX <= value <= _FLOAT32_MAX):
        raise EventError(
            f"{where}: 'value' must be a number or absent (a float32: within ±3.4e38), "
            f"got {_show(value)}"
        )
    event_id = record.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise EventError(f"{where}: 'event_id' must be a string or absent, got {_show(event_id)}")
    context = record.get("context")
    if context is not None:
        if not isinstance(context, dict):
            raise EventError(
                f"{where}: 'context' must be an object of numbers, got {_show(context)}"
            )
        for key, number in context.items():
            if not _is_number(number):
                raise EventError(
                    f"{where}: {_show('context.' + key)} must be a number, got {_show(number)}"
                )


@dataclass(frozen=True, eq=False)
class EventTable:
    """Events as columns, in stream order; ``n`` rows.

    Attributes:
        user: ``(n,)`` object array of str.
        item: ``(n,)`` object array of str.
        action: ``(n,)`` object array of str.
        ts: ``(n,)`` float64, seconds.
        value: ``(n,)`` float32, nan where absent.
        event_id: ``(n,)`` object array of str or None, or None when no event has one.
        context: feature name -> ``(n,)`` float32 (nan where absent), or None when no event
            has a context.
    """

    user: np.ndarray
    item: np.ndarray
    action: np.ndarray
    ts: np.ndarray
    value: np.ndarray
    event_id: np.ndarray | None = None
    context: Mapping[str, np.ndarray] | None = field(default=None)

    def __post_init__(self) -> None:
        n = len(self.user)
        columns = {"item": self.item, "action": self.action, "ts": self.ts, "value": self.value}
        if self.event_id is not None:
            columns["event_id"] = self.event_id
        for name, values in (self.context or {}).items():
            columns[f"context.{name}"] = values
        for name, column in columns.items():
            if len(column) != n:
                raise EventError(f"column {name!r} has {len(column)} rows, 'user' has {n}")

    def __len__(self) -> int:
        return len(self.user)

    def __getitem__(self, rows: slice | np.ndarray) -> EventTable:
        """The rows selected by a slice, an index array or a boolean mask, as a new table."""
        return EventTable(
            user=self.user[rows],
            item=self.item[rows],
            action=self.action[rows],
            ts=self.ts[rows],
            value=self.value[rows],
            event_id=None if self.event_id is None else self.event_id[rows],
            context=None if self.context is None else {k: v[rows] for k, v in self.context.items()},
        )

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> EventTable:
        """A table from event dicts (validated, numbered from 1 in error messages)."""
        builder = _ColumnBuilder("record")
        builder.add([dict(r) for r in records], 0)
        return builder.table()

    def records(self) -> Iterator[dict[str, Any]]:
        """The rows as canonical event dicts (optional fields only where present)."""
        ts = _plain_numbers(self.ts)
        value = _plain_numbers(self.value)
        context = {k: _plain_numbers(v) for k, v in self.context.items()} if self.context else None
        for row, (user, item, action) in enumerate(
            zip(self.user.tolist(), self.item.tolist(), self.action.tolist(), strict=True)
        ):
            record: dict[str, Any] = {"user": user, "item": item, "action": action, "ts": ts[row]}
            if value[row] is not None:
                record["value"] = value[row]
            if context:
                features = {k: c[row] for k, c in context.items() if c[row] is not None}
                if features:
                    record["context"] = features
            if self.event_id is not None and self.event_id[row] is not None:
                record["event_id"] = self.event_id[row]
            yield record


def _plain_numbers(values: np.ndarray) -> list[Any]:
    """Python numbers for JSON, None for nan: ints where the column's values are integral
    (a rating 5, not 5.0), and float32 values by their shortest repr (0.1, not 0.100000001)."""
    finite = np.isfinite(values)
    as_float = values.astype(np.float64)
    kept = np.where(finite, as_float, 0.0)
    if np.all(kept == np.round(kept)) and np.all(np.abs(kept) < 2**53):
        out = kept.astype(np.int64).tolist()
    elif values.dtype == np.float32:
        out = kept.astype(np.float32).astype(str).astype(np.float64).tolist()
    else:
        out = kept.tolist()
    for row in np.flatnonzero(~finite).tolist():
        out[row] = None
    return out


def iter_event_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` for each non-blank line of a JSON-lines file, numbered from 1."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if line:
                yield number, line


def read_events(path: str | os.PathLike[str]) -> EventTable:
    """Read and validate an events file into columns, keeping file order.

    Raises :class:`EventError` naming the first bad line and field. A million lines take
    about 1.5-2 s: lines are decoded with ``orjson`` in chunks that stay in cache, types are
    checked per column and chunk, and only a chunk that fails is rescanned record by record
    to name the culprit.
    """
    lines = Path(path).read_bytes().split(b"\n")
    numbers = None
    if lines and not lines[-1].strip():
        lines.pop()
    if b"" in lines or b"\r" in lines or any(not line.strip() for line in lines if len(line) < 3):
        keep = [k for k, line in enumerate(lines) if line.strip()]
        lines = [lines[k] for k in keep]
        numbers = [k + 1 for k in keep]
    builder = _ColumnBuilder(f"{path}: line", numbers, finite=True)
    loads = orjson.loads
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a million fresh dicts would trigger many useless cyclic collections
    try:
        for start in range(0, len(lines), _CHUNK):
            chunk = lines[start : start + _CHUNK]
            try:
                records = [loads(line) for line in chunk]
            except orjson.JSONDecodeError:
                for k, line in enumerate(chunk, start=start):
                    try:
                        loads(line)
                    except orjson.JSONDecodeError as exc:
                        where = builder.where(k)
                        raise EventError(f"{where}: not valid JSON ({exc})") from None
                raise
            builder.add(records, start, max(map(len, chunk)))
        return builder.table()
    finally:
        if gc_was_enabled:
            gc.enable()


_CHUNK = 1 << 15
_get_user, _get_item, _get_action, _get_ts = map(itemgetter, ("user", "item", "action", "ts"))
_get_value, _get_event_id, _get_context = (
    methodcaller("get", name) for name in ("value", "event_id", "context")
)


class _ColumnBuilder:
    """Accumulates validated columns from chunks of decoded records."""

    def __init__(self, where: str, numbers: list[int] | None = None, finite: bool = False):
        # finite: the records come from JSON, whose numbers orjson guarantees finite
        self._where, self._numbers, self._finite = where, numbers, finite
        self.user: list[str] = []
        self.item: list[str] = []
        self.action: list[str] = []
        self.ts: list[float] = []
        self.value: list[float | None] = []
        self.event_id: list[str | None] = []
        self.context: list[dict | None] = []
        self._rare = 0  # rows before which event_id/context were never seen

    def where(self, k: int) -> str:
        return f"{self._where} {k + 1 if self._numbers is None else self._numbers[k]}"

    def add(self, records: list[Any], start: int, longest: int | None = None) -> None:
        """Append records ``start, start + 1, ...`` (indices into the whole stream);
        ``longest``: the length of the longest JSON line among them, when known."""

        def fail() -> NoReturn:
            for k, record in enumerate(records, start=start):
                check_event(record, self.where(k))
            raise AssertionError("a column failed its check but no record did")

        try:
            user = list(map(_get_user, records))
            item = list(map(_get_item, records))
            action = list(map(_get_action, records))
            ts = list(map(_get_ts, records))
            value = list(map(_get_value, records))
            # event_id and context are rare: count keys before looking for them
            others = sum(map(len, records)) - 4 * len(records) - (len(value) - value.count(None))
        except (KeyError, TypeError):
            fail()
        if set(map(type, user)) | set(map(type, item)) | set(map(type, action)) != {str}:
            fail()
        if "" in user or "" in item or "" in action:
            fail()
        # no id is longer than its line: most chunks skip this
        if (longest is None or longest > MAX_ID_CHARS) and max(
            map(len, user + item + action), default=0
        ) > MAX_ID_CHARS:
            fail()
        if not set(map(type, ts)) <= _NUMBER_TYPES or not set(map(type, value)) <= _VALUE_TYPES:
            fail()
        if not self._finite and (
            not all(map(math.isfinite, ts)) or any(v is not None and math.isinf(v) for v in value)
        ):
            fail()
        if others:
            event_id = list(map(_get_event_id, records))
            context = list(map(_get_context, records))
            if not set(map(type, event_id)) <= {str, type(None)}:
                fail()
            if not set(map(type, context)) <= {dict, type(None)}:
                fail()
            for c in context:
                if c and (
                    not all(_is_number(v) for v in c.values()) or max(map(len, c)) > MAX_ID_CHARS
                ):
                    fail()
            ids = [e for e in event_id if e is not None]
            if ids and max(map(len, ids)) > MAX_ID_CHARS:
                fail()
            # fields this schema does not know (or explicit nulls): only their depth matters
            if others > len(ids) + len(context) - context.count(None):
                for record in records:
                    if (
                        not record.keys() <= _FIELDS
                        and nesting_depth(record, MAX_DEPTH) > MAX_DEPTH
                    ):
                        fail()
            if not self.event_id and not self.context:
                self.event_id = [None] * len(self.user)
                self.context = [None] * len(self.user)
            self.event_id += event_id
            self.context += context
        elif self.event_id:
            self.event_id += [None] * len(records)
            self.context += [None] * len(records)
        self.user += user
        self.item += item
        self.action += action
        self.ts += ts
        self.value += value

    def table(self) -> EventTable:
        has_ids = any(e is not None for e in self.event_id)
        value = np.array(self.value, dtype=np.float64)  # None -> nan
        beyond = np.abs(value) > _FLOAT32_MAX  # the column is float32: they would become inf
        if beyond.any():
            k = int(np.flatnonzero(beyond)[0])
            raise EventError(
                f"{self.where(k)}: 'value' must be a number or absent (a float32: within "
                f"±3.4e38), got {_show(self.value[k])}"
            )
        return EventTable(
            user=_object_array(self.user),
            item=_object_array(self.item),
            action=_object_array(self.action),
            ts=np.array(self.ts, dtype=np.float64),
            value=value.astype(np.float32),
            event_id=_object_array(self.event_id) if has_ids else None,
            context=_context_columns(self.context, len(self.user)),
        )


_NUMBER_TYPES = {int, float}
_FIELDS = {"user", "item", "action", "ts", "value", "event_id", "context"}
_VALUE_TYPES = {int, float, type(None)}


def _context_columns(context: list[dict | None], n: int) -> dict[str, np.ndarray] | None:
    rows = [(k, c) for k, c in enumerate(context) if c]
    if not rows:
        return None
    names = sorted({name for _, c in rows for name in c})
    columns = {name: np.full(n, np.nan, dtype=np.float32) for name in names}
    for k, c in rows:
        for name, number in c.items():
            columns[name][k] = number
    return columns


def _object_array(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _write_atomic(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_events(path: str | os.PathLike[str], events: EventTable | Iterable[Mapping]) -> int:
    """Write events as JSON lines (atomically: a crash leaves the old file); returns the count.

    Integral columns are written as integers (``"ts": 978300760, "value": 5``).
    """
    table = events if isinstance(events, EventTable) else EventTable.from_records(events)
    dumps = orjson.dumps

    def chunks() -> Iterator[bytes]:
        batch: list[bytes] = []
        for record in table.records():
            batch.append(dumps(record))
            if len(batch) == 65536:
                yield b"\n".join(batch) + b"\n"
                batch = []
        if batch:
            yield b"\n".join(batch) + b"\n"

    _write_atomic(path, chunks())
    return len(table)


@dataclass(frozen=True)
class Item:
    """One line of the items file; every field but ``item`` optional."""

    item: str
    title: str | None = None
    categories: tuple[str, ...] = ()
    year: int | None = None
    tags: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """The canonical JSON object (absent fields left out)."""
        record: dict[str, Any] = {"item": self.item}
        if self.title is not None:
            record["title"] = self.title
        if self.categories:
            record["categories"] = list(self.categories)
        if self.year is not None:
            record["year"] = self.year
        if self.tags:
            record["tags"] = list(self.tags)
        return record

    @classmethod
    def from_record(cls, record: Any, where: str = "item") -> Item:
        """Validate a decoded JSON object; errors name ``where`` and the field."""
        if not isinstance(record, dict):
            raise EventError(f"{where}: an item must be a JSON object, got {_show(record)}")
        item = record.get("item")
        if item is None:
            raise EventError(f"{where}: missing required field 'item'")
        if not isinstance(item, str) or not item:
            raise EventError(f"{where}: 'item' must be a non-empty string, got {_show(item)}")
        title = record.get("title")
        if title is not None and not isinstance(title, str):
            raise EventError(f"{where}: 'title' must be a string, got {_show(title)}")
        year = record.get("year")
        if year is not None and type(year) is not int:
            raise EventError(f"{where}: 'year' must be an integer, got {_show(year)}")
        lists = {}
        for name in ("categories", "tags"):
            values = record.get(name) or []
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise EventError(
                    f"{where}: {name!r} must be a list of strings, got {_show(values)}"
                )
            lists[name] = tuple(values)
        return cls(item=item, title=title, year=year, **lists)


def read_items(path: str | os.PathLike[str]) -> list[Item]:
    """Read and validate an items file, in file order; a repeated item id is an error."""
    items: list[Item] = []
    seen: dict[str, int] = {}
    for number, line in iter_event_lines(path):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise EventError(f"{path}: line {number}: not valid JSON ({exc})") from None
        item = Item.from_record(record, f"{path}: line {number}")
        if item.item in seen:
            raise EventError(
                f"{path}: line {number}: item {item.item!r} already defined on line "
                f"{seen[item.item]}"
            )
        seen[item.item] = number
        items.append(item)
    return items


def write_items(path: str | os.PathLike[str], items: Iterable[Item]) -> int:
    """Write items as JSON lines (atomically); returns the count."""
    lines = [orjson.dumps(item.record()) + b"\n" for item in items]
    _write_atomic(path, lines)
    return len(lines)


# --- the evaluation protocol ------------------------------------------------------------------


def protocol_order(user: np.ndarray, item: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """``(n,)`` int64 permutation sorting events stably by ``(ts, user, item)``.

    Ids compare as strings (code point order), whatever they look like: ``"10" < "9"``.
    """
    # lexsort: last key is primary; it is stable, so full ties keep their input order
    keys = (_string_ranks(item), _string_ranks(user), np.asarray(ts, dtype=np.float64))
    return np.lexsort(keys).astype(np.int64)


def first_out_of_order(events: EventTable) -> int | None:
    """The index of the first event that comes before its predecessor in protocol order
    (by ``(ts, user, item)``, ids as strings), or None when the table is in protocol order.

    Equal keys are in order (the sort is stable). Linear: ids are compared only where the
    timestamps tie.
    """
    ts = np.asarray(events.ts, dtype=np.float64)
    if len(ts) < 2:
        return None
    earlier = ts[1:] < ts[:-1]
    tie = np.flatnonzero(ts[1:] == ts[:-1])
    if len(tie):
        users = events.user.tolist()
        items = events.item.tolist()
        for k in tie.tolist():
            if (users[k + 1], items[k + 1]) < (users[k], items[k]):
                earlier[k] = True
                break  # later ties cannot come before this one
    bad = np.flatnonzero(earlier)
    return int(bad[0]) + 1 if len(bad) else None


def _string_ranks(ids: np.ndarray) -> np.ndarray:
    """``(n,)`` int64 rank of each id among the distinct ids, as strings in code point order."""
    values = [str(v) for v in np.asarray(ids).tolist()]
    rank = {v: r for r, v in enumerate(sorted(set(values)))}
    return np.fromiter(map(rank.__getitem__, values), np.int64, len(values))


def protocol_split(n: int) -> tuple[slice, slice, slice]:
    """``(train, val, test)`` row slices of a stream of ``n`` events: 80 % / 10 % / 10 %.

    Boundaries are ``floor(0.8 n)`` and ``floor(0.9 n)`` in exact integer arithmetic, so for
    MovieLens-1M (n = 1,000,209) test is rows ``[900188, 1000209)``.
    """
    if n < 0:
        raise ModelError(f"a stream cannot have {n} events")
    train_end, val_end = n * 8 // 10, n * 9 // 10
    return slice(0, train_end), slice(train_end, val_end), slice(val_end, n)


def stream_md5(events: EventTable) -> str:
    """Hex md5 of the lines ``"user\\titem\\n"`` over the stream in order: a fingerprint of
    the event order that figures are measured on."""
    digest = hashlib.md5()
    users, items = events.user.tolist(), events.item.tolist()
    step = 1 << 16
    for start in range(0, len(users), step):
        pairs = zip(users[start : start + step], items[start : start + step], strict=True)
        digest.update("".join(f"{u}\t{i}\n" for u, i in pairs).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Head:
    """One prediction target ("head"): which events it applies to and which are positive.

    An *engagement* head reads the event itself. An event applies when its action is in
    ``applies_to`` (default: ``actions``). It is positive when its action is in ``actions``
    and, if ``threshold`` is set, its value is >= ``threshold``. With a threshold, an
    applicable event without a value gets no label.

    ``Head("like", actions=("rate",), threshold=4)``: ratings of 4 and 5 are positive, other
    ratings negative, other actions unlabelled. ``Head("click", actions=("click",),
    applies_to=("impression", "click"))``: a click-through rate.

    A *return* head (``horizon`` seconds, no ``actions``) reads the future: an event is
    positive when the same user's next event (any action) comes at most ``horizon`` later.
    Its label is known only ``horizon`` after the event, so :func:`labels` leaves it nan
    where the stream known to that row ends sooner. It applies to every event, or to those
    of ``applies_to``. ``Head("return", (), horizon=7 * 86400)``: return within 7 days.
    """

    name: str
    actions: tuple[str, ...]
    threshold: float | None = None
    applies_to: tuple[str, ...] | None = None
    horizon: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ModelError("a head needs a name")
        if isinstance(self.actions, str) or (self.horizon is None and not self.actions):
            raise ModelError(
                f"head {self.name!r}: 'actions' must be a non-empty tuple of action names, "
                f"got {self.actions!r}"
            )
        if self.horizon is not None and (
            self.actions or self.threshold is not None or not self.horizon > 0
        ):
            raise ModelError(
                f"head {self.name!r}: a return head takes a positive horizon and no actions "
                f"or threshold, got horizon={self.horizon!r} actions={self.actions!r} "
                f"threshold={self.threshold!r}"
            )
        if self.applies_to is not None and isinstance(self.applies_to, str):
            raise ModelError(
                f"head {self.name!r}: 'applies_to' must be a tuple, got {self.applies_to!r}"
            )
        object.__setattr__(self, "actions", tuple(self.actions))
        if self.applies_to is not None:
            object.__setattr__(self, "applies_to", tuple(self.applies_to))
        if self.horizon is not None:
            object.__setattr__(self, "horizon", float(self.horizon))

    @property
    def is_return(self) -> bool:
        """A label from the user's future (:attr:`horizon`), not from the event itself."""
        return self.horizon is not None

    @property
    def spec(self) -> str:
        """The head in :func:`parse_head`'s syntax: ``parse_head(h.spec) == h``."""
        if self.horizon is not None:
            text = f"{self.name}:next<={_duration_text(self.horizon)}"
        else:
            text = f"{self.name}:{','.join(self.actions)}"
        if self.threshold is not None:
            text += f">={self.threshold:g}"
        if self.applies_to is not None:
            text += f"@{','.join(self.applies_to)}"
        return text


HEAD_SYNTAX = (
    "NAME:ACTION[,ACTION...][>=THRESHOLD][@ACTION,...] or NAME:next<=DURATION[@ACTION,...]"
)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration_text(seconds: float) -> str:
    for unit in "dhm":
        if seconds >= _UNITS[unit] and (seconds / _UNITS[unit]).is_integer():
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def parse_duration(text: str) -> float:
    """Seconds from ``7d``, ``36h``, ``90m``, ``600s`` or a plain number of seconds.
    Raises :class:`ModelError` unless it is a positive, finite duration."""
    text = text.strip()
    scale = _UNITS.get(text[-1:].lower())
    try:
        seconds = float(text[:-1] if scale else text) * (scale or 1.0)
    except ValueError:
        why = "expected a number with s, m, h or d, e.g. 7d"
        raise ModelError(f"duration {text!r}: {why}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ModelError(f"duration {text!r}: must be positive and finite")
    return seconds


def parse_head(spec: str) -> Head:
    """A :class:`Head` from its command-line form, ``NAME:ACTIONS[>=THRESHOLD][@APPLIES_TO]``
    or ``NAME:next<=DURATION[@APPLIES_TO]``.

    ``like:rate>=4``: events with action ``rate`` are labelled, positive when value >= 4.
    ``reorder:purchase>=1``: purchases, positive when value >= 1. ``click:click@view,click``:
    views and clicks are labelled, clicks positive. ``ACTIONS`` and ``APPLIES_TO`` are
    comma-separated action names; without ``@``, the head applies to its own actions.
    ``return:next<=7d``: every event, positive when the user's next event comes within 7 days
    (durations in s, m, h or d). Raises :class:`ModelError` naming the bad part and the syntax.
    """

    def bad(why: str) -> ModelError:
        return ModelError(f"head {spec!r}: {why}; expected {HEAD_SYNTAX}, e.g. like:rate>=4")

    name, colon, rest = spec.partition(":")
    name = name.strip()
    if not colon or not name:
        raise bad("no NAME: before the actions")
    rest, at, applies = rest.partition("@")
    if ">=" in applies:
        raise bad("the threshold goes before @")
    applies_to = None
    if at:
        applies_to = tuple(a.strip() for a in applies.split(","))
        if not all(applies_to):
            raise bad("an empty action name after @")
    if rest.strip().startswith("next<="):
        try:
            horizon = parse_duration(rest.strip().removeprefix("next<="))
        except ModelError as exc:
            raise bad(str(exc)) from None
        _check_action_names(applies_to or (), bad)
        return Head(name, (), None, applies_to, horizon=horizon)
    rest, ge, threshold = rest.partition(">=")
    actions = tuple(a.strip() for a in rest.split(","))
    if not all(actions):
        raise bad("an empty action name")
    value = None
    if ge:
        try:
            value = float(threshold)
        except ValueError:
            raise bad(f"threshold {threshold!r} is not a number") from None
        if not math.isfinite(value):
            raise bad(f"threshold {threshold!r} is not finite")
    _check_action_names(actions + (applies_to or ()), bad)
    return Head(name, actions, value, applies_to)


def _check_action_names(actions: Sequence[str], bad: Any) -> None:
    for action in actions:
        odd = sorted(set(action) & set("<>=!:@ \t"))
        if odd:
            raise bad(f"action {action!r} has {''.join(odd)!r} in it (the only comparison is >=)")


DEFAULT_HEADS: tuple[Head, ...] = (Head("like", actions=("rate",), threshold=4.0),)

#: The return-propensity head ``train`` adds to a data set's engagement heads by default:
#: will the user have another event within 7 days.
RETURN_HEAD = Head("return", (), horizon=7 * 86400.0)


def labels(
    events: EventTable, heads: Sequence[Head] = DEFAULT_HEADS, known: np.ndarray | None = None
) -> np.ndarray:
    """``(n, n_heads)`` float32 labels: 1 positive, 0 negative, nan where a head doesn't apply.

    ``known (n,)`` (default: every row knows the whole stream): for each row, the number of
    leading events of ``events`` its label may read. Only return heads read other rows: a
    row's return label is nan unless its horizon ends within what it knows (its time +
    horizon <= the time of its last known event), so a censored row is never labelled
    whichever way it would go (:func:`protocol_known` gives the protocol's bounds).
    """
    names = [h.name for h in heads]
    if len(set(names)) != len(names):
        raise ModelError(f"head names must be unique, got {names}")
    out = np.full((len(events), len(heads)), np.nan, dtype=np.float32)
    action = events.action.astype(str)
    gap = None
    for column, head in enumerate(heads):
        if head.horizon is not None:
            if gap is None:
                gap = _next_gap(events)
            ts = np.asarray(events.ts, dtype=np.float64)
            limit = np.full(len(events), len(events)) if known is None else np.asarray(known)
            last_known = ts[np.clip(limit, 1, None) - 1] if len(ts) else ts
            applies = ts + head.horizon <= last_known
            if head.applies_to is not None:
                applies &= np.isin(action, head.applies_to)
            out[applies, column] = gap[applies] <= head.horizon
            continue
        applies = np.isin(action, head.applies_to or head.actions)
        positive = np.isin(action, head.actions)
        if head.threshold is not None:
            has_value = ~np.isnan(events.value)
            positive &= has_value & (events.value >= head.threshold)
            applies &= has_value | ~np.isin(action, head.actions)
        out[applies, column] = positive[applies]
    return out


def _next_gap(events: EventTable) -> np.ndarray:
    """``(n,)`` seconds from each event to its user's next event in stream order (inf for a
    user's last)."""
    ts = np.asarray(events.ts, dtype=np.float64)
    _, user = np.unique(events.user.astype(str), return_inverse=True)
    order = np.argsort(user, kind="stable")  # each user's rows in stream order
    gap = np.full(len(ts), np.inf)
    same = user[order[1:]] == user[order[:-1]]
    gap[order[:-1][same]] = ts[order[1:][same]] - ts[order[:-1][same]]
    return gap


def protocol_known(split: tuple[slice, slice, slice]) -> np.ndarray:
    """``(n,)`` how many events each row's label may read under the protocol: a training row
    the training period, a validation row up to the end of validation, a test row the whole
    stream (a test label may use events after it; no training label uses validation's)."""
    known = np.empty(split[2].stop, dtype=np.int64)
    for part in split:
        known[part] = part.stop
    return known


def engagement_heads(heads: Sequence[Head]) -> tuple[Head, ...]:
    """The heads that read the event itself (not the future): the ones item statistics,
    channels and like thresholds are built from."""
    return tuple(h for h in heads if h.horizon is None)
