"""The hand-over of the stream partitions after a rebalance, against a recording fake consumer:
no stream partition is resumed before it is sought and the queues are cleared (the order that
loses records in faust's own ``Recovery.on_recovery_completed``; see ``stream/faust_compat.py``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from faust.types import TP
from sketchstream.stream.faust_compat import HandoverRecovery, HandoverTableManager

EVENTS = [TP("events", 0), TP("events", 1)]
CHANGELOG = [TP("app-users-changelog", 0), TP("app-users-changelog", 1)]


class RecordingConsumer:
    """The consumer calls the hand-over makes, in order, in ``calls``."""

    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls
        self._committed_offset = {EVENTS[0]: 41, EVENTS[1]: None}

    def assignment(self) -> set[TP]:
        return {*EVENTS, *CHANGELOG}

    def stop_flow(self) -> None:
        self.calls.append("stop_flow")

    async def perform_seek(self) -> None:
        self.calls.append("seek_to_committed")

    async def seek_wait(self, offsets: dict[TP, int]) -> None:
        self.calls.append(("seek_standbys", dict(offsets)))

    def resume_partitions(self, tps: set[TP]) -> None:
        self.calls.append(("resume_partitions", frozenset(tps)))

    def resume_flow(self) -> None:
        self.calls.append("resume_flow")


def recovery(calls: list[Any]) -> HandoverRecovery:
    async def maybe_start() -> None:
        calls.append("fetcher_started")

    app = SimpleNamespace(
        conf=SimpleNamespace(stream_recovery_delay=0.0, broker_request_timeout=5.0),
        consumer=RecordingConsumer(calls),
        flow_control=SimpleNamespace(resume=lambda: calls.append("clear_queues")),
        _fetcher=SimpleNamespace(maybe_start=maybe_start),
    )
    tables = SimpleNamespace(
        changelog_topics={CHANGELOG[0].topic},
        on_handover=lambda offsets: calls.append(("handover", dict(offsets))),
    )
    rec = HandoverRecovery(app, tables)
    rec.standby_tps = {CHANGELOG[1]}
    rec.standby_offsets[CHANGELOG[1]] = 7
    return rec


async def test_streams_resume_only_after_the_seek_and_the_queue_clear():
    calls: list[Any] = []
    await recovery(calls)._hand_over_streams()
    assert calls == [
        "stop_flow",
        "seek_to_committed",
        "clear_queues",
        ("seek_standbys", {CHANGELOG[1]: 7}),
        ("handover", {EVENTS[0]: 41, EVENTS[1]: None}),
        ("resume_partitions", frozenset(EVENTS)),
        "resume_flow",
        "fetcher_started",
    ]


def test_the_app_uses_the_handover_recovery(tmp_path):
    from sketchstream.stream.app import create_app
    from sketchstream.stream.settings import Settings

    app = create_app(Settings(state_dir=tmp_path / "state", artifact_dir=tmp_path / "artifacts"))
    assert isinstance(app.tables, HandoverTableManager)
    assert isinstance(app.tables.recovery, HandoverRecovery)
    assert app.tables.on_handover is not None
