"""Cancel: a queued task never runs; a running one is asked to stop
(GRACEFUL: the task checks `cancel_requested`; TERMINATE and KILL: its worker
gets a revoke with that signal) and the answer waits, up to
TASKSERVICE_CANCEL_WAIT, for the worker to confirm the end."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from structlog.contextvars import bind_contextvars

from taskservice.core import record
from taskservice.core.errors import BrokerUnavailable, TaskFinished, TaskNotFound
from taskservice.core.record import TaskRecord
from taskservice.core.scripts import CancelledQueued, Finished, Missing
from taskservice.core.states import CancelMode, state_name
from taskservice.server.hub import Mailbox, Marker
from taskservice.server.publisher import Publisher
from taskservice.server.reads import Reads
from taskservice.server.records import Records, parse_task_id, shielded
from taskservice.server.requests import earlier_answer, fingerprint, remembered
from taskservice.server.watches import Watches

logger = logging.getLogger(__name__)

SIGNALS = {"TERMINATE": "SIGTERM", "KILL": "SIGKILL"}


class Cancels:
    """Cancelling tasks."""

    def __init__(
        self, records: Records, reads: Reads, watches: Watches, publisher: Publisher
    ) -> None:
        self._records = records
        self._reads = reads
        self._watches = watches
        self._publisher = publisher
        self._background: set[asyncio.Future[None]] = set()

    def close(self) -> None:
        """Stop the revoke broadcasts still under way."""
        for task in self._background:
            task.cancel()

    async def cancel(
        self, task_id: str, cancel_mode: CancelMode, *, request_id: str = ""
    ) -> TaskRecord:
        """Cancel with `cancel_mode` (UNSPECIFIED: KILL). With a request id, a
        repeated Cancel answers as the first did."""
        mode = cancel_mode.recorded
        task_id = parse_task_id(task_id)
        bind_contextvars(task_id=task_id)
        request = remembered(
            request_id, lambda: fingerprint("Cancel", task_id, mode), self._records.settings
        )
        if request is not None:
            bind_contextvars(request_id=request.id)
            answered = await earlier_answer(self._records, request)
            if answered is not None:
                return TaskRecord.from_json(answered)
        # Like Start: a recorded cancel request is always followed by its revoke.
        rec = await shielded(self._cancel(task_id, mode))
        if request is not None:
            await self._records.run(self._records.scripts.remember(request, rec.to_json()))
        return rec

    async def _cancel(self, task_id: str, mode: str) -> TaskRecord:
        # Watch before changing, so the worker's confirmation cannot slip by.
        async with self._watches.hub.watch(task_id) as events:
            call = self._records.scripts.cancel(task_id, mode, when=time.time())
            answer = await self._records.run(call)
            if isinstance(answer, Missing):
                raise TaskNotFound(f"no task {task_id}: its record expired", task_id=task_id)
            rec = answer.record
            if rec.exclusivity_key:
                bind_contextvars(exclusivity_key=rec.exclusivity_key)
            if isinstance(answer, CancelledQueued):
                self._records.ended(rec.name, rec.state)
                logger.info("task cancelled (%s) while queued: it will not run", mode)
                # The record already forbids running it (the worker checks);
                # the broadcast only spares a worker holding it some work, so
                # the answer does not wait for the broker.
                self._in_background(self._broadcast_revoke(task_id))
                return rec
            if isinstance(answer, Finished):
                if rec.state == record.REVOKED:
                    return rec
                raise TaskFinished(
                    f"task {rec.id} already finished ({state_name(rec)}); nothing to cancel",
                    task_id=rec.id,
                )
            logger.info("cancel (%s) of the running task asked of its worker", rec.cancel)
            if rec.cancel == "GRACEFUL":
                return rec
            # Sent again on a repeated Cancel: the first broadcast may have
            # reached no worker.
            await self._publisher.revoke(task_id, signal=SIGNALS[rec.cancel])
            return await self._await_end(task_id, rec, events)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _broadcast_revoke(self, task_id: str) -> None:
        try:
            await self._publisher.revoke(task_id)
        except BrokerUnavailable as exc:
            logger.warning(
                "revoke broadcast for %s failed (%s); the record still forbids it", task_id, exc
            )

    async def _await_end(self, task_id: str, rec: TaskRecord, events: Mailbox) -> TaskRecord:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._records.settings.cancel_wait
        while not rec.terminal:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                event = await asyncio.wait_for(events.get(), remaining)
            except TimeoutError:
                break
            if event is Marker.SHUTDOWN:
                break
            rec = await self._watches.newer(task_id, rec, event) or rec
        if not rec.terminal:
            # No confirmation: if the worker is gone (its lease lapsed), this
            # read ends the task now, and the key is free.
            rec = await self._reads.get(task_id)
        return rec
