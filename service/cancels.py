"""Cancel: a queued task never runs; a running one is asked to stop
(GRACEFUL: the task checks `cancel_requested`; TERMINATE and KILL: its worker
gets a revoke with that signal) and the answer waits, up to
TASKSERVICE_CANCEL_WAIT, for the worker to confirm the end.

CancelTasks: the same for every active task ListTasks' filters select, a
page at a time (the page's scan is ListTasks'), without waiting for the
running ones to end."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from structlog.contextvars import bind_contextvars

from taskservice.core import record
from taskservice.core.errors import (
    BrokerUnavailable,
    InvalidArgument,
    TaskFinished,
    TaskNotFound,
)
from taskservice.core.record import TaskRecord
from taskservice.core.scripts import CancelledQueued, CancelRequested, Finished, Missing
from taskservice.core.states import CancelMode, state_name
from taskservice.server import page_tokens
from taskservice.server.hub import Mailbox, Marker
from taskservice.server.publisher import Publisher
from taskservice.server.reads import Reads, TaskFilter, checked_page_size
from taskservice.server.records import Records, check_exclusivity_key, parse_task_id, shielded
from taskservice.server.requests import earlier_answer, fingerprint, remembered
from taskservice.server.watches import Watches

logger = logging.getLogger(__name__)

SIGNALS = {"TERMINATE": "SIGTERM", "KILL": "SIGKILL"}

DEFAULT_CANCEL_PAGE = 100
"""Tasks one CancelTasks call cancels when its page_size is 0."""


@dataclasses.dataclass(frozen=True, slots=True)
class CancelPage:
    """What one CancelTasks call did: the tasks it ended (queued ones), the
    running ones it asked to stop, both by id in the order met (newest
    first), and the token that continues after them ("" after the last)."""

    ended: list[str]
    requested: list[str]
    task_ids: list[str]
    next_token: str


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
            answer = await self._apply(task_id, mode)
            if isinstance(answer, Missing):
                raise TaskNotFound(f"no task {task_id}: its record expired", task_id=task_id)
            rec = answer.record
            if rec.exclusivity_key:
                bind_contextvars(exclusivity_key=rec.exclusivity_key)
            if isinstance(answer, CancelledQueued):
                logger.info("task cancelled (%s) while queued: it will not run", mode)
                self._forget([task_id])
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
            await self._publisher.revoke([task_id], signal=SIGNALS[rec.cancel])
            return await self._await_end(task_id, rec, events)

    async def cancel_many(
        self, wanted: TaskFilter, cancel_mode: CancelMode, *, page_size: int, page_token: str
    ) -> CancelPage:
        """Cancel, with `cancel_mode` (UNSPECIFIED: KILL), up to `page_size`
        (0: 100; at most 500) of the active tasks `wanted` selects (no
        states: QUEUED and RUNNING), newest first, continuing after
        `page_token`. Queued ones end at once; running ones are asked to stop
        and not waited for. Each call looks at a bounded part of the index,
        so a page may cancel fewer (even none) while its token is set."""
        if not wanted.states <= record.ACTIVE_STATES:
            raise InvalidArgument(
                "states: only QUEUED and RUNNING tasks can be cancelled",
                violations=[("states", "a terminal state: such tasks have nothing to cancel")],
            )
        size = checked_page_size(page_size, default=DEFAULT_CANCEL_PAGE)
        if wanted.exclusivity_key:
            check_exclusivity_key(wanted.exclusivity_key)
            bind_contextvars(exclusivity_key=wanted.exclusivity_key)
        mode = cancel_mode.recorded
        fingerprint = _fingerprint(wanted, mode)
        after = (
            page_tokens.decode(
                page_token,
                fingerprint,
                rpc="CancelTasks",
                bound_to="states, task_name, exclusivity_key and mode",
            )
            if page_token
            else None
        )
        active = TaskFilter(
            wanted.states or record.ACTIVE_STATES, wanted.task_name, wanted.exclusivity_key
        )
        found = await self._reads.scan(active, size=size, after=after)
        task_ids = [rec.id for _, rec in found.entries]
        # Like Cancel: a recorded cancel request is always followed by its revoke.
        page = await shielded(self._cancel_each(task_ids, mode))
        token = page_tokens.encode(found.score, found.last_id, fingerprint) if found.more else ""
        logger.info(
            "cancelled many (%s): %d ended, %d running asked to stop, of %d found%s",
            mode,
            len(page.ended),
            len(page.requested),
            len(task_ids),
            "; more to come" if token else "",
        )
        return dataclasses.replace(page, next_token=token)

    async def _cancel_each(self, task_ids: list[str], mode: str) -> CancelPage:
        """Cancel each task (in one pipelined round), then send the revokes:
        one for the queued ones, one per signal for the running ones."""
        answers = await asyncio.gather(
            *(self._apply(task_id, mode) for task_id in task_ids), return_exceptions=True
        )
        ended: list[str] = []
        requested: list[str] = []
        signalled: dict[str, list[str]] = {}
        failure: BaseException | None = None
        for task_id, answer in zip(task_ids, answers, strict=True):
            if isinstance(answer, BaseException):
                failure = failure or answer
            elif isinstance(answer, CancelledQueued):
                ended.append(task_id)
            elif isinstance(answer, CancelRequested):
                requested.append(task_id)
                # The record's mode: a stronger one asked for earlier stays.
                signal = SIGNALS.get(answer.record.cancel)
                if signal is not None:
                    signalled.setdefault(signal, []).append(task_id)
            # Finished or Missing: it ended after the scan read it.
        if ended:
            self._forget(ended)
        revoked = await asyncio.gather(
            *(self._publisher.revoke(ids, signal=signal) for signal, ids in signalled.items()),
            return_exceptions=True,
        )
        failure = failure or next((e for e in revoked if isinstance(e, BaseException)), None)
        if failure is not None:
            # The cancels made stand; the same token again redoes the rest
            # (cancelling again what was cancelled changes nothing).
            raise failure
        counted = set(ended) | set(requested)
        return CancelPage(ended, requested, [t for t in task_ids if t in counted], "")

    async def _apply(
        self, task_id: str, mode: str
    ) -> CancelledQueued | CancelRequested | Finished | Missing:
        """Run the cancel script on one task; an end it made is counted."""
        call = self._records.scripts.cancel(task_id, mode, when=time.time())
        answer = await self._records.run(call)
        if isinstance(answer, CancelledQueued):
            self._records.ended(answer.record.name, answer.record.state)
        return answer

    def _forget(self, task_ids: list[str]) -> None:
        """Tell the workers to drop these cancelled queued tasks. The record
        already forbids running them (the worker checks); the broadcast only
        spares a worker holding one some work, so nobody waits for the broker."""
        self._in_background(self._broadcast_revoke(task_ids))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _broadcast_revoke(self, task_ids: list[str]) -> None:
        try:
            await self._publisher.revoke(task_ids)
        except BrokerUnavailable as exc:
            which = task_ids[0] if len(task_ids) == 1 else f"{len(task_ids)} tasks"
            logger.warning(
                "revoke broadcast for %s failed (%s); the record still forbids running it",
                which,
                exc,
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


def _fingerprint(wanted: TaskFilter, mode: str) -> str:
    """The digest a CancelTasks token carries: its filters and its mode (a
    ListTasks token, which carries the filters alone, is refused too)."""
    text = f"CancelTasks\n{mode}\n{wanted.fingerprint()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
