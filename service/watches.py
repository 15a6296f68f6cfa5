"""WatchStatus: a task's current record (or every change after a sequence
number), then every change in order, ending after a terminal one.

Changes come from the process's one subscription (taskservice.server.hub),
each stream with its own bounded mailbox; what a stream missed is replayed
from the task's short change log in Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from structlog.contextvars import bind_contextvars

from taskservice.core import record
from taskservice.core.errors import ShuttingDown
from taskservice.core.record import TaskRecord
from taskservice.server.hub import EventHub, Marker
from taskservice.server.reads import Reads
from taskservice.server.records import Records, parse_task_id


class Watches:
    """Following tasks as they change."""

    def __init__(self, records: Records, reads: Reads, hub: EventHub) -> None:
        self._records = records
        self._reads = reads
        self.hub = hub

    async def watch(self, task_id: str, after: int = 0) -> AsyncIterator[TaskRecord]:
        """The current record (or, with `after`, every change after that
        sequence number), then every change, ending after a terminal one."""
        task_id = parse_task_id(task_id)
        bind_contextvars(task_id=task_id)
        # Subscribe before reading: a change made meanwhile waits in the
        # mailbox, never lost; what was already sent is skipped by sequence.
        async with self.hub.watch(task_id) as events:
            rec = await self._reads.get(task_id)
            last = after
            if after == 0:
                yield rec
                last = rec.sequence
            elif after < rec.sequence:
                for change in await self._changes(task_id, after, rec.sequence):
                    yield change
                    last = change.sequence
                if last < rec.sequence:  # those changes are no longer kept
                    yield rec
                    last = rec.sequence
            while not (rec.terminal and last >= rec.sequence):
                event = await events.get()
                if event is Marker.SHUTDOWN:
                    raise ShuttingDown("the server is shutting down; watch again to resume")
                newer = await self.newer(task_id, rec, event)
                if newer is not None:
                    rec = newer
                    if rec.sequence > last:
                        yield rec
                        last = rec.sequence

    async def newer(
        self, task_id: str, rec: TaskRecord, event: TaskRecord | Marker
    ) -> TaskRecord | None:
        """The record an event brings if it is newer than `rec`; on RESYNC
        (changes may have been missed) the record as Redis has it now."""
        if event is Marker.RESYNC:
            event = await self._reads.get(task_id)
        if isinstance(event, TaskRecord) and event.sequence > rec.sequence:
            return event
        return None

    async def _changes(self, task_id: str, after: int, upto: int) -> list[TaskRecord]:
        """The task's changes after sequence `after` up to `upto`, in order,
        from its log; [] if the log no longer has them all."""
        log = record.log_key(self._records.prefix, task_id)
        entries = await self._records.link.execute("LRANGE", log, 0, -1)
        changes = [TaskRecord.from_json(entry) for entry in entries]
        wanted = [c for c in changes if after < c.sequence <= upto]
        if not wanted or wanted[0].sequence != after + 1:
            return []
        return wanted
