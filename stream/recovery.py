"""faust's table recovery, with the hand-over of the stream partitions made atomic.

After every rebalance faust's :class:`~faust.tables.recovery.Recovery` restores the tables, then
(``on_recovery_completed``) gives the stream partitions back to the agents: it resumes them,
seeks them to their committed offsets and resumes flow control. But by then the consumer's flow
is already running (faust resumed it to read the changelogs and the standby partitions), so in
faust-streaming 0.15.3 the sequence loses records:

1. ``consumer.resume_partitions(streams)``: the fetcher at once delivers what aiokafka has
   prefetched for those partitions (aiokafka keeps fetching them while faust "pauses" them in
   its own bookkeeping only) into the agents' queues, and moves the consumer's read offsets on;
2. ``consumer.perform_seek()``: aiokafka goes back to the committed offsets, and the read
   offsets are reset to them, while the fetcher may go on delivering records it fetched before
   the seek; a record past the reset read offset is taken for a gap in the partition, and gaps
   count as acknowledged when offsets are committed;
3. ``app.flow_control.resume()`` clears every channel queue (they are ``clear_on_resume``),
   dropping whatever step 1 or 2 delivered and the agent had not taken yet;
4. the records fetched again from the committed offsets are below the read offsets, so the
   fetcher drops them as already read: the records cleared in step 3 are never processed, and
   the "gap" lets the committed offset pass them.

The hole is as wide as the queue was long at step 3 (39 and 94 records per partition in the
failures seen here), only on a partition that has records waiting when it is handed over, and
only when the fetcher runs during the seek's round trips to the broker: likelier under CPU
load. The same clear also drops standby changelog records queued for recovery. faust fixed
this ordering for apps without tables (faust-streaming issue #216, pull request #217,
``Recovery._resume_streams``), where the flow is still stopped at that point; the path with
tables kept it. The symptom looks like issue #629 (partitions that get no fetch after a
rebalance), but here the partitions are fetched and their records dropped.

:class:`HandoverRecovery` replaces that one method, and :class:`HandoverTableManager` makes the
app use it (``faust.App(..., TableManager=HandoverTableManager)``, a documented setting). The
hand-over becomes:

1. stop the consumer's flow: the fetcher delivers nothing more and abandons the batch it was
   delivering (its records are fetched again below);
2. seek all partitions to their committed offsets (the stream partitions are still paused),
   which also resets the consumer's read offsets;
3. resume flow control, clearing the queues while nothing of the stream partitions is in them;
4. seek the standby changelog partitions back to the last record recovery took from them, so
   whatever step 1 abandoned or step 3 cleared is read again (recovery skips records it has
   seen);
5. only then resume the stream partitions and the flow.

No record of a stream partition reaches an agent between the seek and the resume, so nothing
fetched before the seek is delivered after it, and nothing delivered is cleared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery

__all__ = ["HandoverHook", "HandoverRecovery", "HandoverTableManager"]

#: ``on_handover({tp: committed offset or None})``: called once per rebalance, when the stream
#: partitions have been sought to their committed offsets, just before they resume.
HandoverHook = Callable[[Mapping[Any, int | None]], None]


class HandoverRecovery(Recovery):
    """faust's ``Recovery`` whose ``on_recovery_completed`` hands the stream partitions over
    without losing records (see the module docstring)."""

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        """The tables are restored: finish them, then hand the stream partitions over."""
        self.log.info("tables restored")
        await self.app.on_rebalance_complete.send()
        self._set_recovery_ended()
        await self._tables_recovery_completed()
        if self.app.consumer_generation_id != generation_id:
            self.log.warning(
                "a newer rebalance (generation %s, recovery was for %s): no hand-over now",
                self.app.consumer_generation_id,
                generation_id,
            )
            return
        await self._hand_over_streams()
        self.tables.on_actives_ready()
        if not self.app.assignor.assigned_standbys():
            self.tables.on_standbys_ready()
        self.app.on_rebalance_end()
        self.log.info("Worker ready")  # faust's own readiness line, kept for operators

    async def _tables_recovery_completed(self) -> None:
        callbacks = [
            asyncio.ensure_future(
                table.on_recovery_completed(
                    self.actives_for_table[table], self.standbys_for_table[table]
                )
            )
            for table in self.tables.values()
        ]
        if callbacks:
            await asyncio.wait(callbacks)

    async def _hand_over_streams(self) -> None:
        """Seek, clear, re-read the standbys, and only then resume the stream partitions."""
        app, consumer = self.app, self.app.consumer
        assignment = consumer.assignment()
        streams = {tp for tp in assignment if not self._is_changelog_tp(tp)}
        consumer.stop_flow()
        if assignment:  # also resets the read offsets of the changelog partitions
            self.log.info("seeking the assigned partitions to their committed offsets")
            await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
        self.completed.set()
        app.flow_control.resume()  # clears the queues: nothing of the streams is in them yet
        if self.standby_tps:
            await self._wait(
                self._seek_offsets(consumer, self.standby_tps, self.standby_offsets, "standby"),
                timeout=app.conf.broker_request_timeout,
            )
        on_handover = getattr(self.tables, "on_handover", None)
        if on_handover is not None:
            on_handover({tp: consumer._committed_offset.get(tp) for tp in streams})
        consumer.resume_partitions(streams)
        consumer.resume_flow()
        await app._fetcher.maybe_start()


class HandoverTableManager(TableManager):
    """faust's ``TableManager`` with :class:`HandoverRecovery` as its recovery service;
    ``on_handover`` (a :data:`HandoverHook`), when set, hears of every hand-over."""

    on_handover: HandoverHook | None = None

    @property
    def recovery(self) -> Recovery:
        """Recovery service used by this table manager."""
        if self._recovery is None:
            self._recovery = HandoverRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
