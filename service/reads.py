"""GetStatus and ListTasks: a task by id or by exclusivity key, and pages of
tasks newest first. A read also ends a task whose lease lapsed (the read
script checks the lease), so nobody reads a task as running after its worker
is gone."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from structlog.contextvars import bind_contextvars

from taskservice.core import record
from taskservice.core.errors import InvalidArgument, KeyNotFound, TaskNotFound
from taskservice.core.record import TaskRecord
from taskservice.core.scripts import ListPage
from taskservice.server import page_tokens
from taskservice.server.records import Records, check_exclusivity_key, parse_task_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
LIST_BUDGET = 1000
"""Index entries one ListTasks page looks at, at most (at least MAX_PAGE_SIZE,
so a full page is always possible): a page's cost is bounded however many
tasks exist or how few match its filters."""


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """What ListTasks returns: tasks in one of `states` (record states; empty
    for any), of `task_name` and under `exclusivity_key` (empty for any)."""

    states: frozenset[str] = frozenset()
    task_name: str = ""
    exclusivity_key: str = ""

    def fingerprint(self) -> str:
        """A short digest of the filter, carried in page tokens."""
        text = "\n".join([",".join(sorted(self.states)), self.task_name, self.exclusivity_key])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of ListTasks: its tasks, newest first, and the token of the
    next page ("" after the last)."""

    tasks: list[TaskRecord]
    next_token: str


class Reads:
    """Reading tasks: one record, or a page of them."""

    def __init__(self, records: Records) -> None:
        self._records = records

    async def get(self, task_id: str) -> TaskRecord:
        """The task's record; a task whose lease lapsed is ended LOST first."""
        task_id = parse_task_id(task_id)
        bind_contextvars(task_id=task_id)
        rec = await self._records.run(self._records.scripts.read(task_id))
        if rec is None:
            raise TaskNotFound(
                f"no task {task_id}: it was never started here, or its record expired",
                task_id=task_id,
            )
        return rec

    async def resolve_key(self, key: str) -> str:
        """The id of the current (else the latest) task under `key`."""
        check_exclusivity_key(key)
        bind_contextvars(exclusivity_key=key)
        holder = record.holder_key(self._records.prefix, key)
        task_id = await self._records.link.execute("GET", holder)
        if not task_id:
            raise KeyNotFound(
                f"no task has run under exclusivity key {key!r} (or its record expired)",
                exclusivity_key=key,
            )
        return str(task_id)

    async def list_tasks(
        self,
        wanted: TaskFilter,
        *,
        page_size: int,
        page_token: str,
        size_of: Callable[[TaskRecord], int],
        max_bytes: int,
    ) -> Page:
        """A page of the tasks `wanted` selects, newest first, whose sizes
        (`size_of`, as the response will carry them) add up to at most
        `max_bytes` (always at least one task)."""
        size = checked_page_size(page_size, default=DEFAULT_PAGE_SIZE)
        if wanted.exclusivity_key:
            check_exclusivity_key(wanted.exclusivity_key)
        after = _cursor(page_token, wanted) if page_token else None
        found = await self.scan(wanted, size=size, after=after)
        tasks: list[TaskRecord] = []
        total = 0
        kept = ""
        for entry_score, rec in found.entries:
            total += size_of(rec)
            if tasks and total > max_bytes:
                # The response would be too large: the next page starts here.
                return Page(tasks, _token(kept, tasks[-1].id, wanted))
            tasks.append(rec)
            kept = entry_score
        token = _token(found.score, found.last_id, wanted) if found.more else ""
        return Page(tasks, token)

    async def scan(
        self, wanted: TaskFilter, *, size: int, after: tuple[str, str] | None
    ) -> ListPage:
        """Up to `size` tasks `wanted` selects, newest first, after the
        cursor `after` (score, id), looking at no more than LIST_BUDGET
        index entries; where the scan stopped, for the next page's token."""
        # The narrowest index that holds every wanted task; the script checks
        # the rest of the filter on each record it reads.
        index = record.index_key(
            self._records.prefix,
            key=wanted.exclusivity_key,
            name=wanted.task_name,
            active=bool(wanted.states) and wanted.states <= record.ACTIVE_STATES,
        )
        return await self._records.run(
            self._records.scripts.list_page(
                index,
                after=after,
                size=size,
                budget=LIST_BUDGET,
                states=wanted.states,
                name=wanted.task_name,
                exclusivity_key=wanted.exclusivity_key,
            )
        )


def checked_page_size(page_size: int, *, default: int) -> int:
    """The page size a request asks for: 0 is `default`, above MAX_PAGE_SIZE
    is MAX_PAGE_SIZE; InvalidArgument on `page_size` if negative."""
    if page_size < 0:
        raise InvalidArgument(
            f"page_size must not be negative (0 means the default, {default})",
            violations=[("page_size", "must not be negative")],
        )
    return min(page_size or default, MAX_PAGE_SIZE)


def _token(score: str, task_id: str, wanted: TaskFilter) -> str:
    """An opaque page token: where the page ended, and for which filter."""
    return page_tokens.encode(score, task_id, wanted.fingerprint())


def _cursor(token: str, wanted: TaskFilter) -> tuple[str, str]:
    return page_tokens.decode(token, wanted.fingerprint())
