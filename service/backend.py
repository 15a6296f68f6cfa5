"""What the servicer calls: exclusive start, status, cancel and watch, over
taskservice's Redis records and Celery.

Blocking Celery/kombu calls (publish, revoke) run in a small thread pool;
Redis is used through redis.asyncio. Keys and the record format are in
worker.record.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import kombu.exceptions
import redis.asyncio as aioredis
import redis.exceptions
from celery import Celery
from redis.asyncio.lock import Lock
from redis.typing import EncodableT, FieldT

from service.config import Settings
from service.errors import (
    ArgsTooLarge,
    BrokerUnavailable,
    InvalidArgument,
    KeyNotFound,
    LockTimeout,
    ShuttingDown,
    TaskAlreadyRunning,
    TaskFinished,
    TaskNotFound,
    TaskTypeNotFound,
    Unavailable,
)
from service.hub import EventHub, Marker
from worker import record
from worker.record import TaskRecord
from worker.registry import EXCLUSIVITY_KEY_PATTERN, TaskRegistry, TaskType

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_COUNTDOWN = 3600.0
QUEUE_PATTERN = EXCLUSIVITY_KEY_PATTERN
SIGNALS = {"TERMINATE": "SIGTERM", "KILL": "SIGKILL"}


@dataclass(frozen=True, slots=True)
class StartCommand:
    """A validated-shape Start; `Backend.start` checks the values."""

    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    args_size: int
    exclusivity_key: str = ""
    return_existing: bool = False
    countdown: float | None = None
    queue: str = ""
    time_limit: float | None = None
    soft_time_limit: float | None = None


@dataclass(frozen=True, slots=True)
class Started:
    record: TaskRecord
    already_existed: bool


def parse_task_id(task_id: str) -> str:
    """The canonical form of a task id; InvalidArgument if it is no UUID."""
    if not task_id:
        raise InvalidArgument("task_id is required")
    try:
        return str(uuid.UUID(task_id))
    except ValueError:
        raise InvalidArgument(f"task_id {task_id[:80]!r} is not a UUID") from None


def check_exclusivity_key(key: str) -> str:
    if not EXCLUSIVITY_KEY_PATTERN.fullmatch(key):
        raise InvalidArgument(
            f"exclusivity_key {key[:80]!r} must be 1-128 characters of [A-Za-z0-9._:@/-]"
        )
    return key


class Backend:
    """Task operations over Redis and Celery; one per server process."""

    def __init__(
        self,
        settings: Settings,
        registry: TaskRegistry,
        publisher: Celery,
        client: aioredis.Redis,
        hub: EventHub,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._publisher = publisher
        self._redis = client
        self._hub = hub
        self._prefix = settings.key_prefix
        self._channel = record.events_channel(settings.key_prefix)
        self._transition = client.register_script(record.TRANSITION_LUA)
        # Publishing holds a broker connection per thread; a few threads keep
        # a slow broker from stalling every Start behind one call.
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="celery-call")

    @property
    def hub(self) -> EventHub:
        return self._hub

    async def close(self) -> None:
        await self._hub.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self._redis.aclose()

    async def ping(self) -> bool:
        """True if Redis answers and the event subscription is up."""
        try:
            return bool(await self._redis.ping()) and self._hub.connected
        except (redis.exceptions.RedisError, OSError):
            return False

    def task_types(self) -> list[TaskType]:
        return self._registry.types()

    # -- Start ---------------------------------------------------------------

    async def start(self, cmd: StartCommand) -> Started:
        task_type = self._check_start(cmd)
        # Once started, a Start runs to its end even if the caller goes away
        # (deadline, disconnect): stopping after claiming the key but before
        # publishing (or undoing the claim) would leave the key held by a
        # task that never runs.
        return await _shielded(self._start(cmd, task_type))

    async def _start(self, cmd: StartCommand, task_type: TaskType) -> Started:
        key = cmd.exclusivity_key or task_type.default_exclusivity_key
        if not key:
            return Started(await self._enqueue(cmd, ""), already_existed=False)
        lock = Lock(
            self._redis,
            record.lock_key(self._prefix, key),
            timeout=self._settings.lock_expiry,
            blocking_timeout=self._settings.lock_wait,
            sleep=0.01,
        )
        if not await lock.acquire():
            raise LockTimeout(
                f"exclusivity key {key!r} is busy: its lock was not free within "
                f"{self._settings.lock_wait:g}s; retry"
            )
        try:
            slot = record.slot_key(self._prefix, key)
            found = await self._redis.get(slot)
            previous = str(found) if found else None
            holder = await self._active(previous) if previous else None
            if holder is not None:
                if cmd.return_existing:
                    return Started(holder, already_existed=True)
                raise TaskAlreadyRunning(
                    f"task {holder.id} ({holder.name}) is already running under exclusivity "
                    f"key {key!r}; cancel it, wait for it, or start with RETURN_EXISTING",
                    task_id=holder.id,
                    exclusivity_key=key,
                )
            rec = await self._enqueue(cmd, key, previous=previous)
            return Started(rec, already_existed=False)
        finally:
            try:
                await lock.release()
            except redis.exceptions.LockError:
                logger.warning("lock of key %r expired before Start released it", key)

    def _check_start(self, cmd: StartCommand) -> TaskType:
        if not cmd.task_name:
            raise InvalidArgument("task_name is required")
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
            task_type.bind(cmd.args, cmd.kwargs)
        except TypeError as exc:
            raise InvalidArgument(
                f"arguments do not fit {task_type.name}{task_type.signature}: {exc}"
            ) from None
        if cmd.exclusivity_key:
            check_exclusivity_key(cmd.exclusivity_key)
        if cmd.queue and not QUEUE_PATTERN.fullmatch(cmd.queue):
            raise InvalidArgument(
                f"queue {cmd.queue[:80]!r} must be 1-128 characters of [A-Za-z0-9._:@/-]"
            )
        if cmd.countdown is not None and not 0 <= cmd.countdown <= MAX_COUNTDOWN:
            raise InvalidArgument(
                f"countdown must be between 0 and {MAX_COUNTDOWN:g}s, not {cmd.countdown:g}s"
            )
        for name, limit in (
            ("time_limit", cmd.time_limit),
            ("soft_time_limit", cmd.soft_time_limit),
        ):
            if limit is not None and limit <= 0:
                raise InvalidArgument(f"{name} must be positive, not {limit:g}s")
        if (
            cmd.time_limit is not None
            and cmd.soft_time_limit is not None
            and cmd.soft_time_limit >= cmd.time_limit
        ):
            raise InvalidArgument("soft_time_limit must be below time_limit")
        return task_type

    async def _active(self, task_id: str) -> TaskRecord | None:
        """The task's record if it is unfinished (its key is then held)."""
        fields = await self._hgetall(record.task_key(self._prefix, task_id))
        if not fields or fields.get("state") not in record.ACTIVE_STATES:
            return None
        return TaskRecord.from_fields(fields)

    async def _enqueue(
        self, cmd: StartCommand, key: str, *, previous: str | None = None
    ) -> TaskRecord:
        """Record, claim `key` (if any), then publish. Every Redis write comes
        before the publish, so a task in the broker is always recorded and
        holds its key; if publishing fails, the record is marked cancelled
        (a message that got through anyway is then refused by the worker) and
        the key goes back to `previous`."""
        task_id = str(uuid.uuid4())
        queue = cmd.queue or str(self._publisher.conf.task_default_queue)
        scheduled = time.time() + cmd.countdown if cmd.countdown else None
        fields = record.new_record_fields(
            task_id, cmd.task_name, exclusivity_key=key, queue=queue, scheduled=scheduled
        )
        rkey = record.task_key(self._prefix, task_id)
        slot = record.slot_key(self._prefix, key)
        ttl = self._settings.record_ttl
        mapping: dict[FieldT, EncodableT] = {k: v for k, v in fields.items()}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(rkey, mapping=mapping)
            pipe.expire(rkey, ttl)
            await pipe.execute()
        if key:
            await self._redis.set(slot, task_id, ex=ttl)
        try:
            await self._call_celery(
                lambda: self._publisher.send_task(
                    cmd.task_name,
                    args=cmd.args,
                    kwargs=cmd.kwargs,
                    task_id=task_id,
                    countdown=cmd.countdown,
                    queue=queue,
                    # Celery takes float seconds here; its stubs say int.
                    time_limit=cmd.time_limit,  # type: ignore[arg-type]
                    soft_time_limit=cmd.soft_time_limit,  # type: ignore[arg-type]
                )
            )
        except BaseException as exc:
            with contextlib.suppress(redis.exceptions.RedisError, OSError, TaskNotFound):
                await self._change(
                    task_id,
                    {record.PENDING},
                    record.REVOKED,
                    {
                        "finished": repr(time.time()),
                        "error_type": type(exc).__name__,
                        "error_message": f"never enqueued: {exc}",
                    },
                )
                if key:
                    if previous:
                        await self._redis.set(slot, previous, ex=ttl)
                    else:
                        await self._redis.delete(slot)
            raise
        return TaskRecord.from_fields(fields)

    async def _hgetall(self, key: str) -> dict[str, str]:
        # The client decodes responses, so keys and values are str.
        fields: dict[str, str] = await self._redis.hgetall(key)  # type: ignore[assignment]
        return fields

    async def _call_celery(self, call: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, call)
        except (kombu.exceptions.OperationalError, ConnectionError, TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"the Celery broker is unreachable: {exc}; retry") from exc

    # -- GetStatus -----------------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord:
        task_id = parse_task_id(task_id)
        fields = await self._hgetall(record.task_key(self._prefix, task_id))
        if not fields:
            raise TaskNotFound(
                f"no task {task_id}: it was never started here, or its record expired",
                task_id=task_id,
            )
        return TaskRecord.from_fields(fields)

    async def resolve_key(self, key: str) -> str:
        """The id of the current (else the latest) task under `key`."""
        check_exclusivity_key(key)
        task_id = await self._redis.get(record.slot_key(self._prefix, key))
        if not task_id:
            raise KeyNotFound(
                f"no task has run under exclusivity key {key!r} (or its record expired)",
                exclusivity_key=key,
            )
        return str(task_id)

    # -- Cancel --------------------------------------------------------------

    async def cancel(self, task_id: str, mode: str) -> TaskRecord:
        """Cancel; `mode` is GRACEFUL, TERMINATE or KILL."""
        # Like Start: a recorded cancel request is always followed by its revoke.
        return await _shielded(self._cancel(task_id, mode))

    async def _cancel(self, task_id: str, mode: str) -> TaskRecord:
        rec = await self.get(task_id)
        for _ in range(5):  # each retry follows a state change we raced with
            if rec.state == record.REVOKED:
                return rec
            if rec.terminal:
                raise TaskFinished(
                    f"task {rec.id} already finished ({rec.state}); nothing to cancel",
                    task_id=rec.id,
                )
            if rec.state == record.PENDING:
                changed = await self._change(
                    rec.id,
                    {record.PENDING},
                    record.REVOKED,
                    {"cancel": mode, "finished": repr(time.time())},
                )
                if changed is not None:
                    # The record already forbids running it (TrackedTask checks);
                    # the broadcast also drops it from a worker holding it.
                    await self._broadcast_revoke(rec.id)
                    return changed
            elif mode == "GRACEFUL":
                changed = await self._change(rec.id, {record.STARTED}, "", {"cancel": mode})
                if changed is not None:
                    return changed
            else:
                async with self._hub.watch(rec.id) as events:
                    changed = await self._change(rec.id, {record.STARTED}, "", {"cancel": mode})
                    if changed is not None:
                        await self._revoke(rec.id, signal=SIGNALS[mode])
                        return await self._await_end(rec.id, changed, events)
            rec = await self.get(rec.id)
        raise Unavailable(f"task {rec.id} kept changing state during the cancel; retry")

    async def _change(
        self, task_id: str, allowed: set[str], new_state: str, fields: dict[str, str]
    ) -> TaskRecord | None:
        """Apply a transition; None if the record is not in an allowed state."""
        args = record.transition_args(
            self._channel, self._settings.record_ttl, frozenset(allowed), new_state, fields
        )
        status, detail = await self._transition(
            keys=[record.task_key(self._prefix, task_id)], args=args
        )
        if status == "missing":
            raise TaskNotFound(f"no task {task_id}: its record expired", task_id=task_id)
        if status != "ok":
            return None
        return TaskRecord.from_fields(_loads(detail))

    async def _revoke(self, task_id: str, *, signal: str | None = None) -> None:
        """Broadcast Celery's revoke; with `signal`, also terminate the
        process running the task with it."""
        revoke = self._publisher.control.revoke
        if signal is None:
            await self._call_celery(functools.partial(revoke, task_id))
        else:
            await self._call_celery(
                functools.partial(revoke, task_id, terminate=True, signal=signal)
            )

    async def _broadcast_revoke(self, task_id: str) -> None:
        try:
            await self._revoke(task_id)
        except BrokerUnavailable as exc:
            logger.warning(
                "revoke broadcast for %s failed (%s); the record still forbids it", task_id, exc
            )

    async def _await_end(
        self, task_id: str, rec: TaskRecord, events: asyncio.Queue[TaskRecord | Marker]
    ) -> TaskRecord:
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

    async def watch(self, task_id: str) -> AsyncIterator[TaskRecord]:
        """The current record, then every change, ending after a terminal one."""
        task_id = parse_task_id(task_id)
        # Subscribe before reading the snapshot: a change between the two is
        # then queued, never lost; changes the snapshot already shows are
        # skipped by sequence number.
        async with self._hub.watch(task_id) as events:
            rec = await self.get(task_id)
            yield rec
            while not rec.terminal:
                event = await events.get()
                if event is Marker.SHUTDOWN:
                    raise ShuttingDown("the server is shutting down; watch again to resume")
                newer = await self._newer(task_id, rec, event)
                if newer is not None:
                    rec = newer
                    yield rec


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


def _loads(payload: str) -> dict[str, str]:
    data: dict[str, str] = json.loads(payload)
    return data
