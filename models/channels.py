"""Channel configuration of a user state: which events feed which decayed sketch.

:class:`Channel` (one decayed sketch per user), :class:`AggregatorConfig` (the channels, the
action vocabulary and the history bound), :func:`default_config` (MovieLens channels), and the
JSON round trip the model artifact stores (:func:`aggregator_config_to_dict`,
:func:`aggregator_config_from_dict`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sketchstream.models.errors import ModelError

__all__ = [
    "DAY",
    "RECENCY",
    "WINDOWS",
    "WINDOW_SPANS",
    "AggregatorConfig",
    "Channel",
    "aggregator_config_from_dict",
    "aggregator_config_to_dict",
    "default_config",
]

DAY = 86_400.0


@dataclass(frozen=True)
class Channel:
    """One decayed sketch per user: which events feed it and how fast it forgets.

    ``modality``: the codebook the items are sketched with (``"interactions"``, ``"metadata"``).
    ``actions``: action names that feed the channel (None: all known actions).
    ``min_value`` (inclusive) / ``max_value`` (exclusive): a filter on the event value; events
    without a value (nan) fail any filter that is set.
    ``half_life_s``: seconds for a contribution to halve (``math.inf``: no decay).
    ``weight``: multiplies every contribution.
    """

    name: str
    modality: str
    actions: frozenset[str] | None = None
    min_value: float | None = None
    max_value: float | None = None
    half_life_s: float = math.inf
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not self.modality:
            raise ModelError(f"Channel needs a name and a modality, got {self!r}")
        if not self.half_life_s > 0:
            raise ModelError(f"Channel {self.name!r}: half_life_s must be > 0 (or inf)")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ModelError(f"Channel {self.name!r}: weight must be finite and > 0")
        lo, hi = self.min_value, self.max_value
        if lo is not None and hi is not None and not lo < hi:
            raise ModelError(f"Channel {self.name!r}: min_value {lo} must be < max_value {hi}")
        if self.actions is not None:
            object.__setattr__(self, "actions", frozenset(self.actions))


#: The recency columns of ``Features.counts`` (with ``AggregatorConfig.recency``): hours
#: between the user's two latest events before this one, hours since the user's first event,
#: and that age over the gaps between the user's events so far (0 where undefined).
RECENCY = ("last_gap_hours", "age_hours", "mean_gap_hours")

#: The window columns of ``Features.counts`` (with ``AggregatorConfig.windows``): the user's
#: earlier events (of known actions) within a day and within a week of the time the event is
#: read at, counted in the state's bounded history and the batch's earlier events, at most
#: ``history_size``: the exact counts while the history holds the window's events.
WINDOWS = ("events_1d", "events_7d")
#: The spans of the :data:`WINDOWS` columns (seconds)
WINDOW_SPANS = (DAY, 7 * DAY)

#: The calendar columns of ``Features.counts`` (with ``AggregatorConfig.calendar``): the
#: event's hour of the day (0-24, fractional) and day of the week (0 = Monday), in UTC, from
#: its own time: what a return head's habits follow (a daily or weekly routine).
CALENDAR = ("hour_of_day", "weekday")


def calendar_columns(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The :data:`CALENDAR` columns of event times ``ts`` (seconds since the epoch, float64):
    ``(hour_of_day, weekday)``, float64."""
    t = np.asarray(ts, np.float64)
    return (t % 86_400.0) / 3600.0, (t // 86_400.0 + 3) % 7  # 1970-01-01 was a Thursday


@dataclass(frozen=True)
class AggregatorConfig:
    """Channels, action vocabulary and history bound of a user state.

    ``actions``: the known action names; events carry an index into this tuple. Keep it
    append-only: serialized histories store action indices.
    ``history_size``: K, the events kept per user to rebuild sketches under a new codebook.
    ``history_half_life_s``: the decay that ranks history entries (top K by decayed weight;
    ties go to the most recent).
    ``recency``: the features add the user's recency columns (``last_gap_hours``,
    ``age_hours``, ``mean_gap_hours``). Every state keeps what they need whatever this says,
    so it is not part of the :meth:`fingerprint`: models with and without them read the same
    states. False in models trained before the columns existed.
    ``windows``: the features add the user's :data:`WINDOWS` columns (events within a day and a
    week, from the bounded history every state keeps: not part of the :meth:`fingerprint`
    either). False in models from before them.
    ``calendar``: the features add the event's :data:`CALENDAR` columns (from its time alone:
    no state; not part of the :meth:`fingerprint` either). False in models from before them.
    """

    channels: tuple[Channel, ...]
    actions: tuple[str, ...]
    history_size: int = 128
    history_half_life_s: float = 30 * DAY
    recency: bool = False
    windows: bool = False
    calendar: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "actions", tuple(self.actions))
        if not self.channels:
            raise ModelError("AggregatorConfig needs at least one channel")
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ModelError(f"AggregatorConfig: channel names must be unique, got {names}")
        if not self.actions or len(set(self.actions)) != len(self.actions):
            raise ModelError(
                f"AggregatorConfig: actions must be unique and non-empty: {self.actions}"
            )
        if len(self.actions) > 255:
            raise ModelError(f"AggregatorConfig: at most 255 actions, got {len(self.actions)}")
        for c in self.channels:
            unknown = sorted((c.actions or frozenset()) - set(self.actions))
            if unknown:
                raise ModelError(
                    f"channel {c.name!r}: unknown actions {unknown}: expected some of "
                    f"{', '.join(self.actions)}"
                )
        if not 0 <= self.history_size <= 65_535:
            raise ModelError(f"history_size must be in [0, 65535], got {self.history_size}")
        if not self.history_half_life_s > 0:
            raise ModelError("history_half_life_s must be > 0 (or inf)")

    @property
    def count_names(self) -> tuple[str, ...]:
        """The names of ``Features.counts``' columns: ``mass/<channel>`` ...,
        ``hours_since_last``, ``events``, then :data:`RECENCY` when ``recency``,
        :data:`WINDOWS` when ``windows``, then :data:`CALENDAR` when ``calendar``."""
        masses = tuple(f"mass/{c.name}" for c in self.channels)
        return (
            *masses,
            "hours_since_last",
            "events",
            *(RECENCY if self.recency else ()),
            *(WINDOWS if self.windows else ()),
            *(CALENDAR if self.calendar else ()),
        )

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities in order of first use by a channel."""
        return tuple(dict.fromkeys(c.modality for c in self.channels))

    def fingerprint(self) -> str:
        """A stable hash of the configuration (part of a serialized state's layout)."""

        def enc(c: Channel) -> dict[str, Any]:
            d = asdict(c)
            d["actions"] = None if c.actions is None else sorted(c.actions)
            return d

        doc = {
            "channels": [enc(c) for c in self.channels],
            "actions": list(self.actions),
            "history_size": self.history_size,
            "history_half_life_s": self.history_half_life_s,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def default_config(actions: Sequence[str] = ("rate",)) -> AggregatorConfig:
    """Channels for a rating data set (MovieLens): liked (value >= 4) and disliked (< 4).

    interactions × {liked, disliked} × {30-day half-life, no decay}, and
    metadata × {liked, disliked} without decay: 6 channels. The decayed metadata channels are
    left out to keep the median MovieLens-1M state under 8 KB (its non-integer values cost 4
    bytes a bucket; the undecayed ones are integer counts, 1 byte). History: 128 events.
    """
    month = 30 * DAY
    liked = {"min_value": 4.0}
    disliked = {"max_value": 4.0}
    return AggregatorConfig(
        channels=(
            Channel("liked", "interactions", **liked),
            Channel("liked_30d", "interactions", half_life_s=month, **liked),
            Channel("disliked", "interactions", **disliked),
            Channel("disliked_30d", "interactions", half_life_s=month, **disliked),
            Channel("meta_liked", "metadata", **liked),
            Channel("meta_disliked", "metadata", **disliked),
        ),
        actions=tuple(actions),
        history_size=128,
    )


def aggregator_config_to_dict(config: AggregatorConfig) -> dict[str, Any]:
    """JSON form of an :class:`AggregatorConfig` (what a model artifact stores): action sets as
    sorted lists, infinite half-lives as ``"inf"``."""
    return _jsonable(asdict(config))


def aggregator_config_from_dict(d: Mapping[str, Any]) -> AggregatorConfig:
    """Inverse of :func:`aggregator_config_to_dict`. A key this version does not know (an
    artifact of a newer sketchstream, whose features this one would compute otherwise) or a
    value of the wrong shape is a :class:`ModelError`, never a silent drop or a ``TypeError``."""
    d = _unjson(dict(d))
    _known_keys("aggregator config", d, AggregatorConfig)
    channels = []
    try:
        for c in d.pop("channels", ()):
            c = dict(c)
            _known_keys(f"aggregator channel {c.get('name')!r}", c, Channel)
            if c.get("actions") is not None:
                c["actions"] = frozenset(c["actions"])
            channels.append(Channel(**c))
        return AggregatorConfig(channels=tuple(channels), **d)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"aggregator config: {exc}") from exc


def _known_keys(what: str, d: Mapping[str, Any], cls: type) -> None:
    unknown = sorted(set(d) - set(cls.__dataclass_fields__))
    if unknown:
        raise ModelError(
            f"{what}: unknown keys {unknown} (written by a newer sketchstream? this one cannot "
            "compute its features)"
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, frozenset | set):
        return sorted(_jsonable(v) for v in obj)
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)  # "inf": JSON has no infinity
    return obj


def _unjson(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _unjson(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_unjson(v) for v in obj)
    if obj in ("inf", "-inf", "nan"):
        return float(obj)
    return obj
