"""What the servicer calls: exclusive start, status, cancel and watch, over
taskservice's Redis records and Celery.

Every record change is one Lua script (taskservice.core.scripts), so each decision
(is the key free? may this task be cancelled? has its lease lapsed?) and its
write happen in one atomic step. Redis is used through redis.asyncio; Celery's
blocking calls go through taskservice.server.publisher.

Each operation binds what it knows about its task (task_id, exclusivity_key,
request_id) to the logging context as soon as it knows it, so every line
logged on its behalf carries them (taskservice.core.logs); ends it makes, Starts and
conflicts are counted in taskservice.core.metrics.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.exceptions
from structlog.contextvars import bind_contextvars, bound_contextvars

from taskservice.apps import MAX_COUNTDOWN
from taskservice.core import record
from taskservice.core.errors import (
    ArgsTooLarge,
    BrokerUnavailable,
    InvalidArgument,
    KeyNotFound,
    RedisUnavailable,
    ShuttingDown,
    TaskAlreadyRunning,
    TaskFinished,
    TaskNotFound,
    TaskTypeNotFound,
    cut,
)
from taskservice.core.metrics import ServerMetrics
from taskservice.core.record import TaskRecord
from taskservice.core.registry import (
    EXCLUSIVITY_KEY_PATTERN,
    ArgumentsInvalid,
    TaskRegistry,
    TaskType,
    signature_text,
)
from taskservice.core.scripts import Call, Request, Scripts, transient
from taskservice.core.settings import Settings
from taskservice.core.states import STATE_LABELS, CancelMode, ConflictPolicy, state_name
from taskservice.server.hub import EventHub, Mailbox, Marker
from taskservice.server.publisher import Delivery, Publisher, Ticket
from taskservice.server.redis_link import RedisLink

logger = logging.getLogger(__name__)

T = TypeVar("T")

QUEUE_PATTERN = EXCLUSIVITY_KEY_PATTERN
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
KOMBU_KEYS = ("unacked", "_kombu")
"""kombu's own Redis keys: never a queue, whatever TASKSERVICE_QUEUES says."""
SIGNALS = {"TERMINATE": "SIGTERM", "KILL": "SIGKILL"}

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
        text = "\n".join([",".join(sorted(self.states)), self.task_name, self.exclusivity_key])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of ListTasks: its tasks, newest first, and the token of the
    next page ("" after the last)."""

    tasks: list[TaskRecord]
    next_token: str


@dataclass(frozen=True, slots=True)
class StartCommand:
    """A validated-shape Start; `Backend.start` checks the values."""

    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    args_size: int
    exclusivity_key: str = ""
    conflict_policy: ConflictPolicy = ConflictPolicy.REJECT
    countdown: float | None = None
    queue: str = ""
    time_limit: float | None = None
    soft_time_limit: float | None = None
    time_remaining: float | None = None
    """Seconds until the caller's deadline, if it has one."""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Started:
    record: TaskRecord
    already_existed: bool


@dataclass(frozen=True, slots=True)
class Expired:
    """A task the sweeper ended because its lease lapsed."""

    task_id: str
    task_name: str
    exclusivity_key: str
    state: str
    """Its record state now: LOST, or REVOKED (its Start never confirmed that
    the broker had it, or a cancel had been asked for)."""
    error_type: str


def parse_task_id(task_id: str) -> str:
    """The canonical form of a task id; InvalidArgument if it is no UUID."""
    if not task_id:
        raise InvalidArgument.of("task_id", "task_id is required")
    try:
        return str(uuid.UUID(task_id))
    except ValueError:
        raise InvalidArgument.of("task_id", f"task_id {task_id[:80]!r} is not a UUID") from None


def check_exclusivity_key(key: str) -> str:
    if not EXCLUSIVITY_KEY_PATTERN.fullmatch(key):
        raise InvalidArgument.of(
            "exclusivity_key",
            f"exclusivity_key {key[:80]!r} must be 1-128 characters of [A-Za-z0-9._:@/-]",
        )
    return key


class Backend:
    """Task operations over Redis and Celery; one per server process."""

    def __init__(
        self,
        settings: Settings,
        registry: TaskRegistry,
        publisher: Publisher,
        link: RedisLink,
        hub: EventHub,
        *,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._publisher = publisher
        self._redis = link
        self._hub = hub
        self._prefix = settings.key_prefix
        self._scripts = Scripts(settings.key_prefix, settings.record_ttl)
        self._background: set[asyncio.Future[None]] = set()
        self._metrics = metrics or ServerMetrics()

    @property
    def hub(self) -> EventHub:
        return self._hub

    @property
    def publisher(self) -> Publisher:
        return self._publisher

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await self._hub.close()
        self._publisher.close()
        self._redis.close()

    async def ping(self) -> bool:
        """True if Redis answers and the event subscription is up."""
        try:
            return await self._redis.execute("PING") == "PONG" and self._hub.connected
        except (redis.exceptions.RedisError, OSError):
            return False

    def task_types(self) -> list[TaskType]:
        return self._registry.types()

    async def _run(self, call: Call) -> Any:
        return await self._redis.script(call)

    async def _persist(self, call: Call) -> Any:
        """Run a script, retrying through a Redis restart or failover for up
        to half a lease: long enough to ride out a blip, short enough to end
        well within the provisional lease of a Start."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._settings.lease / 2
        delay = 0.05
        while True:
            try:
                return await self._run(call)
            except redis.exceptions.RedisError as error:
                if not transient(error) or loop.time() + delay > give_up:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- Start ---------------------------------------------------------------

    async def start(self, cmd: StartCommand) -> Started:
        request = self._request(
            cmd.request_id,
            "Start",
            cmd.task_name,
            cmd.args,
            cmd.kwargs,
            cmd.exclusivity_key,
            cmd.conflict_policy.name,
            cmd.countdown,
            cmd.queue,
            cmd.time_limit,
            cmd.soft_time_limit,
        )
        if request is not None:  # a valid one: no caller's junk in the logs
            bind_contextvars(request_id=request.id)
        task_type, cmd = self._check_start(cmd)
        answer_by = None
        if cmd.time_remaining is not None:
            answer_by = asyncio.get_running_loop().time() + cmd.time_remaining
        if self._publisher.pushes(cmd.task_name, cmd.queue, task_type.task.priority):
            # One script, claim and message together: it ran or it did not,
            # so there is nothing to finish if the caller goes away.
            return await self._start(cmd, task_type, answer_by, request)
        # A Start that publishes runs to its end even if the caller goes
        # away: its claim is either confirmed (the broker has the message) or
        # abandoned (the key goes back), never left to its provisional lease.
        return await _shielded(self._start(cmd, task_type, answer_by, request))

    def _request(self, request_id: str, *call: Any) -> Request | None:
        """The request id of a call, with a fingerprint of what it asks."""
        if not request_id:
            return None
        if not REQUEST_ID_PATTERN.fullmatch(request_id):
            raise InvalidArgument(
                f"request_id {cut(request_id, 80)!r} must be 1-128 characters of "
                "[A-Za-z0-9._:-] (a UUID, say)",
                violations=[("request_id", "not 1-128 characters of [A-Za-z0-9._:-]")],
            )
        canonical = json.dumps(call, sort_keys=True, separators=(",", ":"), default=repr)
        fingerprint = hashlib.sha256(canonical.encode()).hexdigest()
        return Request(request_id, fingerprint, self._settings.request_id_ttl)

    async def _start(
        self,
        cmd: StartCommand,
        task_type: TaskType,
        answer_by: float | None,
        request: Request | None,
    ) -> Started:
        key = cmd.exclusivity_key or task_type.default_exclusivity_key
        task_id = str(uuid.uuid4())
        if key:
            bind_contextvars(task_id=task_id, exclusivity_key=key)
        else:
            bind_contextvars(task_id=task_id)
        queue = cmd.queue or self._publisher.queue_for(cmd.task_name)
        scheduled = time.time() + cmd.countdown if cmd.countdown else None
        fields = record.new_record_fields(
            task_id, cmd.task_name, exclusivity_key=key, queue=queue, scheduled=scheduled
        )
        provisional_ms = int(self._settings.provisional_lease * 1000)
        delivery = Delivery(
            cmd.task_name,
            task_id,
            args=cmd.args,
            kwargs=cmd.kwargs,
            queue=queue,
            countdown=cmd.countdown,
            time_limit=cmd.time_limit,
            soft_time_limit=cmd.soft_time_limit,
            priority=task_type.task.priority,
        )
        push = self._publisher.push(delivery)
        claim = self._scripts.claim(
            fields,
            exclusivity_key=key,
            provisional_ms=provisional_ms,
            request=request,
            push=push,
        )
        try:
            status, detail = await self._run(claim)
        except (redis.exceptions.RedisError, OSError):
            # The claim may have been written before the connection failed:
            # give the key back now rather than after the provisional lease,
            # or the caller's retry would meet its own ghost.
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self._run(self._scripts.abandon(task_id, "never enqueued: Redis failed"))
            raise
        if status == "repeat":
            earlier = await self._settled(str(detail))
            if earlier is None:  # that Start failed after all: this one runs anew
                return await self._start(cmd, task_type, answer_by, request)
            return Started(earlier, already_existed=False)
        if status == "reused":
            raise _reused(request)
        if status == "held":
            holder = TaskRecord.from_json(detail)
            if cmd.conflict_policy is ConflictPolicy.RETURN_EXISTING:
                self._metrics.conflicts.labels(cmd.task_name, "return_existing").inc()
                return Started(holder, already_existed=True)
            self._metrics.conflicts.labels(cmd.task_name, "fail").inc()
            raise TaskAlreadyRunning(
                f"task {holder.id} ({holder.name}) is already running under exclusivity "
                f"key {key!r}; cancel it, wait for it, or start with conflict_policy "
                "CONFLICT_POLICY_RETURN_EXISTING",
                task_id=holder.id,
                exclusivity_key=key,
            )
        accepted = TaskRecord.from_fields(fields)
        if push is not None:
            self._metrics.tasks_started.labels(cmd.task_name).inc()
            return Started(accepted, already_existed=False)  # enqueued with its claim
        try:
            with self._publisher.admit() as ticket:
                await self._publish(ticket, delivery, answer_by)
        except (Exception, asyncio.CancelledError) as exc:
            if await self._abandon(task_id, exc) or isinstance(exc, asyncio.CancelledError):
                raise
            self._metrics.tasks_started.labels(cmd.task_name).inc()
            return Started(accepted, already_existed=False)
        # The broker has the message: a worker may run it any moment, so this
        # Start must not answer an error because Redis blinked now.
        status, detail = await self._persist(self._scripts.confirm(task_id))
        if status == "missing":
            raise RedisUnavailable(f"the record of task {task_id} vanished: did Redis lose data?")
        if status == "moved" and _never_enqueued(TaskRecord.from_json(detail)):
            raise BrokerUnavailable(
                f"the broker took task {task_id} too late: it was given up and will not run; retry"
            )
        self._metrics.tasks_started.labels(cmd.task_name).inc()
        return Started(accepted, already_existed=False)

    async def _settled(self, task_id: str) -> TaskRecord | None:
        """The task an earlier Start with the same request id made, once that
        Start has settled; None if it failed (its task was never enqueued)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._settings.provisional_lease
        while True:
            try:
                rec = await self.get(task_id)
            except TaskNotFound:
                return None
            if _never_enqueued(rec):
                return None
            if not rec.publishing or loop.time() > give_up:
                return rec
            await asyncio.sleep(0.02)

    async def _publish(self, ticket: Ticket, delivery: Delivery, answer_by: float | None) -> None:
        wait = self._settings.publish_timeout
        if answer_by is not None:
            left = answer_by - asyncio.get_running_loop().time()
            # Keep a little of the caller's time for the answer itself.
            wait = min(wait, left - min(0.5, max(0.02, left * 0.1)))
            if wait <= 0:
                raise BrokerUnavailable("the caller's deadline left no time to enqueue the task")
        await self._publisher.send(ticket, delivery, wait=wait)

    async def _abandon(self, task_id: str, error: BaseException) -> bool:
        """Give up a Start whose publish failed: end the task and give the key
        back. False if a worker has the task after all (the Start succeeded)."""
        message = f"never enqueued: {str(error)[:200] or type(error).__name__}"
        try:
            status, detail = await self._persist(self._scripts.abandon(task_id, message))
        except (redis.exceptions.RedisError, OSError):
            logger.warning("could not abandon task %s; its provisional lease will", task_id)
            return True
        if status == "moved" and not _never_enqueued(TaskRecord.from_json(detail)):
            logger.info("task %s reached a worker although its publish reported %r", task_id, error)
            return False
        logger.warning("Start gave its task up: %s", message)
        return True

    def _check_start(self, cmd: StartCommand) -> tuple[TaskType, StartCommand]:
        """The task type, and the command with its arguments converted to the
        task's annotations; InvalidArgument (naming the field) if anything is off."""
        if not cmd.task_name:
            raise InvalidArgument.of("task_name", "task_name is required")
        task_type = self._registry.get(cmd.task_name)
        if task_type is None:
            raise TaskTypeNotFound(
                f"unknown task type {cmd.task_name[:200]!r}; ListTaskTypes lists the ones "
                "that can be started",
                task_name=cmd.task_name[:200],
            )
        if cmd.args_size > self._settings.max_args_bytes:
            raise ArgsTooLarge(
                f"args and kwargs take {cmd.args_size} bytes; the limit is "
                f"{self._settings.max_args_bytes}"
            )
        try:
            args, kwargs = task_type.check(cmd.args, cmd.kwargs)
        except ArgumentsInvalid as error:
            raise InvalidArgument(
                f"arguments do not fit {task_type.name}{cut(signature_text(task_type.signature))}: "
                f"{error}",
                violations=error.violations,
            ) from None
        if cmd.exclusivity_key:
            check_exclusivity_key(cmd.exclusivity_key)
        if cmd.queue:
            self._check_queue(cmd.queue, cmd.task_name)
        if cmd.countdown is not None and not 0 <= cmd.countdown <= MAX_COUNTDOWN:
            raise InvalidArgument.of(
                "options.countdown",
                f"countdown must be between 0 and {MAX_COUNTDOWN:g}s, not {cmd.countdown:g}s",
            )
        for name, limit in (
            ("time_limit", cmd.time_limit),
            ("soft_time_limit", cmd.soft_time_limit),
        ):
            if limit is not None and limit <= 0:
                message = f"{name} must be positive, not {limit:g}s"
                raise InvalidArgument.of(f"options.{name}", message)
        if (
            cmd.time_limit is not None
            and cmd.soft_time_limit is not None
            and cmd.soft_time_limit >= cmd.time_limit
        ):
            raise InvalidArgument.of(
                "options.soft_time_limit", "soft_time_limit must be below time_limit"
            )
        return task_type, dataclasses.replace(cmd, args=args, kwargs=kwargs)

    def _check_queue(self, queue: str, task_name: str) -> None:
        if queue in (self._publisher.default_queue, self._publisher.queue_for(task_name)):
            return
        declared = self._settings.queue_names
        allowed = QUEUE_PATTERN.fullmatch(queue) and not queue.startswith(KOMBU_KEYS)
        if allowed and any(
            queue == name or (name.endswith("*") and queue.startswith(name[:-1]))
            for name in declared
        ):
            return
        raise InvalidArgument(
            f"queue {cut(queue, 80)!r} is not one this deployment declares "
            f"(TASKSERVICE_QUEUES: {', '.join(declared) or 'none'}; the default queue "
            f"{self._publisher.default_queue!r} is always allowed)",
            violations=[("options.queue", "not a declared queue")],
        )

    # -- GetStatus -----------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord:
        """The task's record; a task whose lease lapsed is ended LOST first."""
        task_id = parse_task_id(task_id)
        bind_contextvars(task_id=task_id)
        payload = await self._run(self._scripts.read(task_id))
        if payload is None:
            raise TaskNotFound(
                f"no task {task_id}: it was never started here, or its record expired",
                task_id=task_id,
            )
        return TaskRecord.from_json(payload)

    async def resolve_key(self, key: str) -> str:
        """The id of the current (else the latest) task under `key`."""
        check_exclusivity_key(key)
        bind_contextvars(exclusivity_key=key)
        task_id = await self._redis.execute("GET", record.holder_key(self._prefix, key))
        if not task_id:
            raise KeyNotFound(
                f"no task has run under exclusivity key {key!r} (or its record expired)",
                exclusivity_key=key,
            )
        return str(task_id)

    # -- ListTasks -----------------------------------------------------------

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
        if page_size < 0:
            raise InvalidArgument(
                "page_size must not be negative (0 means the default, 50)",
                violations=[("page_size", "must not be negative")],
            )
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if wanted.exclusivity_key:
            check_exclusivity_key(wanted.exclusivity_key)
        after = _cursor(page_token, wanted) if page_token else None
        # The narrowest index that holds every wanted task; the script checks
        # the rest of the filter on each record it reads.
        index = record.index_key(
            self._prefix,
            key=wanted.exclusivity_key,
            name=wanted.task_name,
            active=bool(wanted.states) and wanted.states <= record.ACTIVE_STATES,
        )
        more, score, last, *found = await self._run(
            self._scripts.list_page(
                index,
                after=after,
                size=size,
                budget=LIST_BUDGET,
                states=wanted.states,
                name=wanted.task_name,
                exclusivity_key=wanted.exclusivity_key,
            )
        )
        tasks: list[TaskRecord] = []
        total = 0
        kept = ""
        for entry_score, payload in zip(found[::2], found[1::2], strict=True):
            rec = TaskRecord.from_json(payload)
            total += size_of(rec)
            if tasks and total > max_bytes:
                # The response would be too large: the next page starts here.
                return Page(tasks, _token(kept, tasks[-1].id, wanted))
            tasks.append(rec)
            kept = str(entry_score)
        token = _token(str(score), str(last), wanted) if int(more) else ""
        return Page(tasks, token)

    # -- Cancel --------------------------------------------------------------

    async def cancel(
        self, task_id: str, cancel_mode: CancelMode, *, request_id: str = ""
    ) -> TaskRecord:
        """Cancel with `cancel_mode` (UNSPECIFIED: KILL). With a request id, a
        repeated Cancel answers as the first did."""
        mode = cancel_mode.recorded
        task_id = parse_task_id(task_id)
        bind_contextvars(task_id=task_id)
        request = self._request(request_id, "Cancel", task_id, mode)
        if request is not None:
            bind_contextvars(request_id=request.id)
            key = record.request_key(self._prefix, request.id)
            flat = await self._redis.execute("HGETALL", key)
            seen = dict(zip(flat[::2], flat[1::2], strict=True))
            if seen:
                if seen.get("fingerprint") != request.fingerprint:
                    raise _reused(request)
                return TaskRecord.from_json(seen["response"])
        # Like Start: a recorded cancel request is always followed by its revoke.
        rec = await _shielded(self._cancel(task_id, mode))
        if request is not None:
            await self._run(self._scripts.remember(request, rec.to_json()))
        return rec

    async def _cancel(self, task_id: str, mode: str) -> TaskRecord:
        # Watch before changing, so the worker's confirmation cannot slip by.
        async with self._hub.watch(task_id) as events:
            status, detail = await self._run(self._scripts.cancel(task_id, mode, when=time.time()))
            if status == "missing":
                raise TaskNotFound(f"no task {task_id}: its record expired", task_id=task_id)
            rec = TaskRecord.from_json(detail)
            if rec.exclusivity_key:
                bind_contextvars(exclusivity_key=rec.exclusivity_key)
            if status == "cancelled":
                self._ended(rec.name, rec.state)
                logger.info("task cancelled (%s) while queued: it will not run", mode)
                # The record already forbids running it (the worker checks);
                # the broadcast only spares a worker holding it some work, so
                # the answer does not wait for the broker.
                self._in_background(self._broadcast_revoke(task_id))
                return rec
            if status == "ended":
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
        deadline = asyncio.get_running_loop().time() + self._settings.cancel_wait
        while not rec.terminal:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                event = await asyncio.wait_for(events.get(), remaining)
            except TimeoutError:
                break
            if event is Marker.SHUTDOWN:
                break
            rec = await self._newer(task_id, rec, event) or rec
        if not rec.terminal:
            # No confirmation: if the worker is gone (its lease lapsed), this
            # read ends the task now, and the key is free.
            rec = await self.get(task_id)
        return rec

    async def _newer(
        self, task_id: str, rec: TaskRecord, event: TaskRecord | Marker
    ) -> TaskRecord | None:
        """The record an event brings if it is newer than `rec`; on RESYNC
        (changes may have been missed) the record as Redis has it now."""
        if event is Marker.RESYNC:
            event = await self.get(task_id)
        if isinstance(event, TaskRecord) and event.sequence > rec.sequence:
            return event
        return None

    # -- WatchStatus ---------------------------------------------------------

    async def watch(self, task_id: str, after: int = 0) -> AsyncIterator[TaskRecord]:
        """The current record (or, with `after`, every change after that
        sequence number), then every change, ending after a terminal one."""
        task_id = parse_task_id(task_id)
        bind_contextvars(task_id=task_id)
        # Subscribe before reading: a change made meanwhile waits in the
        # mailbox, never lost; what was already sent is skipped by sequence.
        async with self._hub.watch(task_id) as events:
            rec = await self.get(task_id)
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
                newer = await self._newer(task_id, rec, event)
                if newer is not None:
                    rec = newer
                    if rec.sequence > last:
                        yield rec
                        last = rec.sequence

    async def _changes(self, task_id: str, after: int, upto: int) -> list[TaskRecord]:
        """The task's changes after sequence `after` up to `upto`, in order,
        from its log; [] if the log no longer has them all."""
        log = record.log_key(self._prefix, task_id)
        changes = [
            TaskRecord.from_json(entry) for entry in await self._redis.execute("LRANGE", log, 0, -1)
        ]
        wanted = [c for c in changes if after < c.sequence <= upto]
        if not wanted or wanted[0].sequence != after + 1:
            return []
        return wanted

    # -- Leases --------------------------------------------------------------

    async def sweep(self, batch: int = 100) -> list[Expired]:
        """End every task whose lease lapsed (LOST, or its Start abandoned);
        the tasks ended, each logged and counted."""
        ended: list[Expired] = []
        while True:
            _, seen, *found = await self._run(self._scripts.sweep(batch))
            for n in range(0, len(found), 5):
                expired = Expired(*(str(value) for value in found[n : n + 5]))
                self._expired(expired)
                ended.append(expired)
            if int(seen) < batch:
                return ended

    def _expired(self, expired: Expired) -> None:
        self._metrics.lease_expiries.inc()
        context = {"task_id": expired.task_id}
        if expired.exclusivity_key:
            context["exclusivity_key"] = expired.exclusivity_key
        with bound_contextvars(**context):
            if expired.error_type == record.NOT_ENQUEUED_ERROR:
                # Never counted as started: the server that accepted it
                # stopped before the broker confirmed.
                logger.warning("task given up: its Start never confirmed that the broker had it")
                return
            self._ended(expired.task_name, expired.state)
            logger.info(
                "task ended %s: its lease lapsed (no worker vouched for it)",
                STATE_LABELS.get(expired.state, expired.state),
            )

    def _ended(self, task_name: str, state: str) -> None:
        """Count an end this server made; a task type no longer exposed is
        counted without its name (label values stay bounded)."""
        name = task_name if self._registry.get(task_name) is not None else ""
        self._metrics.tasks_ended.labels(name, STATE_LABELS.get(state, state.lower())).inc()


def _reused(request: Request | None) -> InvalidArgument:
    return InvalidArgument(
        f"request_id {request.id if request else ''!r} was already used for a different "
        "request; use a new one for each distinct call",
        violations=[("request_id", "already used for a different request")],
    )


def _token(score: str, task_id: str, wanted: TaskFilter) -> str:
    """An opaque page token: where the page ended, and for which filter."""
    raw = json.dumps([score, task_id, wanted.fingerprint()], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _cursor(token: str, wanted: TaskFilter) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        score, task_id, fingerprint = json.loads(raw)
        float(score)
        if not all(isinstance(part, str) for part in (score, task_id, fingerprint)):
            raise ValueError(token)
    except (ValueError, TypeError):
        raise InvalidArgument(
            "page_token is not one ListTasks returned; start again with an empty one",
            violations=[("page_token", "not a token ListTasks returned")],
        ) from None
    if fingerprint != wanted.fingerprint():
        raise InvalidArgument(
            "page_token belongs to a listing with other filters; pass the same states, "
            "task_name and exclusivity_key as for the first page",
            violations=[("page_token", "filters differ from the first page's")],
        )
    return score, task_id


def _never_enqueued(rec: TaskRecord) -> bool:
    return rec.error is not None and rec.error.type == record.NOT_ENQUEUED_ERROR


async def _shielded(operation: Coroutine[Any, Any, T]) -> T:
    """Await `operation`, letting it finish even if the awaiting call is cancelled."""
    task = asyncio.ensure_future(operation)
    task.add_done_callback(_log_orphan_failure)
    return await asyncio.shield(task)


def _log_orphan_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Retrieving the exception here keeps asyncio from warning "never
        # retrieved" when the caller left; a caller still waiting raises it.
        logger.debug("operation ended with %r", task.exception())
