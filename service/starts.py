"""Start: claim the exclusivity key and hand the task to the broker, so that
two tasks under one key never run at once and an accepted task is never lost.

The claim is one script (taskservice.core.scripts): it answers ALREADY_EXISTS
while the key's holder is unfinished, else writes the record and makes the new
task the holder. When the broker is the records' Redis and the message can go
exactly where kombu would put it, the same script pushes the message: one
round trip. Otherwise the claim carries a short provisional lease, the
publisher hands the message to the broker, and a confirm script drops the
lease; a failed publish gives the key back (abandon). A Start with a
request_id that was answered before answers the same again.

A key has slots (the task type's, else TASKSERVICE_KEY_SLOTS, else one).
When none is free, the conflict policy decides, in the same script: refuse,
answer the holder, or accept the task as *deferred*: it waits in the key's
line (QUEUE; QUEUE_LATEST and REPLACE supersede the tasks waiting there, and
REPLACE asks the oldest holder to stop), and the script that ends a holder
sends the head of the line on its way (taskservice/core/lua/prelude.lua).
A task with a countdown or start_time is deferred too: its record (and its
slot, if it has a key) waits in Redis, and the dispatcher of whichever
server looks first sends it when it is due (taskservice.server.dispatcher).
A deferred task's Start publishes nothing itself.

With `redis_min_replicas`, a write counts once that many replicas have it
(Redis's WAIT): the claim never pushes, since a worker could run a task
whose claim a failover then loses. The claim (provisional) waits for the
replicas; only then is the message pushed (in the confirm script) or
published, and the confirm waits for them too before the Start answers OK.
Replicas that do not confirm in time make the Start give its task up
(NotReplicated: UNAVAILABLE, the key back, a message already out refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis.exceptions
from structlog.contextvars import bind_contextvars

from taskservice.core import record
from taskservice.core.errors import (
    ArgsTooLarge,
    BrokerUnavailable,
    InvalidArgument,
    KeyLineFull,
    KeyQuiet,
    RedisNotReplicated,
    RedisUnavailable,
    TaskAlreadyRunning,
    TaskNotFound,
    TaskTypeNotFound,
    cut,
)
from taskservice.core.record import TaskRecord
from taskservice.core.registry import (
    EXCLUSIVITY_KEY_PATTERN,
    ArgumentsInvalid,
    TaskType,
    signature_text,
)
from taskservice.core.scripts import (
    Claimed,
    Confirmed,
    Deferred,
    Held,
    LineFull,
    Missing,
    Moved,
    Quiet,
    Repeat,
    Request,
    Reused,
)
from taskservice.core.states import CancelMode, ConflictPolicy
from taskservice.server.cancels import SIGNALS
from taskservice.server.publisher import Delivery, Publisher, Ticket
from taskservice.server.reads import Reads
from taskservice.server.records import (
    NotReplicated,
    Records,
    check_exclusivity_key,
    never_enqueued,
    shielded,
)
from taskservice.server.requests import fingerprint, remembered, reused
from taskservice.server.tracing import OFF, Tracing

logger = logging.getLogger(__name__)

QUEUE_PATTERN = EXCLUSIVITY_KEY_PATTERN
KOMBU_KEYS = ("unacked", "_kombu")
"""kombu's own Redis keys: never a queue, whatever TASKSERVICE_QUEUES says."""


NOT_PART_OF_THE_REQUEST = {"request": False}
"""Field metadata of a StartCommand field that a request's fingerprint leaves
out: how the call was made, not what it asks."""


@dataclass(frozen=True, slots=True)
class StartCommand:
    """A validated-shape Start; `Backend.start` checks the values. Every field
    is part of what the request asks (its fingerprint, see `fingerprint`)
    unless its metadata says NOT_PART_OF_THE_REQUEST."""

    task_name: str
    args: list[Any]
    kwargs: dict[str, Any]
    args_size: int = field(metadata=NOT_PART_OF_THE_REQUEST)
    """The size of args and kwargs as received (derived from them)."""
    exclusivity_key: str = ""
    conflict_policy: ConflictPolicy = ConflictPolicy.REJECT
    countdown: float | None = None
    start_time: float | None = None
    """When the task may run, in seconds since the epoch (not with countdown)."""
    queue: str = ""
    time_limit: float | None = None
    soft_time_limit: float | None = None
    time_remaining: float | None = field(default=None, metadata=NOT_PART_OF_THE_REQUEST)
    """Seconds until the caller's deadline, if it has one."""
    request_id: str = field(default="", metadata=NOT_PART_OF_THE_REQUEST)
    replace_mode: CancelMode = CancelMode.UNSPECIFIED
    """How REPLACE stops a running holder; UNSPECIFIED: the task type's."""

    def __post_init__(self) -> None:
        if self.conflict_policy is ConflictPolicy.UNSPECIFIED:
            # The proto's default means REJECT: the same request either way.
            object.__setattr__(self, "conflict_policy", ConflictPolicy.REJECT)

    def fingerprint(self) -> str:
        """A digest of what this Start asks: a repeat with the same request_id
        must ask exactly this, or it is refused."""
        asked = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("request", True)
        }
        return fingerprint("Start", asked)


@dataclass(frozen=True, slots=True)
class Started:
    """What a Start answers: the task, and whether it was already running (RETURN_EXISTING)."""

    record: TaskRecord
    already_existed: bool


class Starts:
    """Starting tasks."""

    def __init__(
        self, records: Records, reads: Reads, publisher: Publisher, tracing: Tracing = OFF
    ) -> None:
        self._records = records
        self._reads = reads
        self._publisher = publisher
        self._tracing = tracing
        self._revokes: set[asyncio.Future[None]] = set()

    def close(self) -> None:
        """Stop the revokes of replaced tasks still under way."""
        for revoke in self._revokes:
            revoke.cancel()

    async def start(self, cmd: StartCommand) -> Started:
        """Start a task as `cmd` asks (see the module); TaskAlreadyRunning under a held key unless
        RETURN_EXISTING."""
        request = remembered(cmd.request_id, cmd.fingerprint, self._records.settings)
        if request is not None:  # a valid one: no caller's junk in the logs
            bind_contextvars(request_id=request.id)
        task_type, cmd = self._check_start(cmd)
        answer_by = None
        if cmd.time_remaining is not None:
            answer_by = asyncio.get_running_loop().time() + cmd.time_remaining
        pushes = self._publisher.pushes(cmd.task_name, cmd.queue, task_type.task.priority)
        if pushes and not self._records.min_replicas:
            # One script, claim and message together: it ran or it did not,
            # so there is nothing to finish if the caller goes away.
            return await self._start(cmd, task_type, answer_by, request)
        # A Start that publishes runs to its end even if the caller goes
        # away: its claim is either confirmed (the broker has the message) or
        # abandoned (the key goes back), never left to its provisional lease.
        return await shielded(self._start(cmd, task_type, answer_by, request))

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
        now = time.time()
        delay = cmd.countdown or 0.0
        if cmd.start_time is not None:
            delay = max(0.0, cmd.start_time - now)
        fields = record.new_record_fields(
            task_id,
            cmd.task_name,
            exclusivity_key=key,
            queue=queue,
            scheduled=now + delay if delay > 0 else None,
        )
        rules = task_type.key_rules
        settings = self._records.settings
        slots = (rules.slots or settings.slots_for(key)) if key else 1
        if key:
            fields["slots"] = str(slots)
            if rules.quiet_period:
                fields["quiet"] = str(max(1, round(rules.quiet_period * 1000)))
                if rules.quiet_after_success:
                    fields["quiet_after"] = record.SUCCESS
        provisional_ms = int(settings.provisional_lease * 1000)
        delivery = Delivery(
            cmd.task_name,
            task_id,
            args=cmd.args,
            kwargs=cmd.kwargs,
            queue=queue,
            # A delayed task reaches the broker when it is due: no eta.
            countdown=None,
            time_limit=cmd.time_limit,
            soft_time_limit=cmd.soft_time_limit,
            priority=task_type.task.priority,
            exclusivity_key=key,
            trace_context=self._tracing.context(),
        )
        push = self._publisher.push(delivery)
        replicated = bool(self._records.min_replicas)
        may_defer = delay > 0 or (bool(key) and cmd.conflict_policy.waits)
        replace_mode = cmd.replace_mode
        if replace_mode is CancelMode.UNSPECIFIED:
            replace_mode = rules.replace_mode
        claim = self._records.scripts.claim(
            fields,
            exclusivity_key=key,
            provisional_ms=provisional_ms,
            request=request,
            # A claim that must reach replicas first pushes only once they have it.
            push=None if replicated else push,
            policy=cmd.conflict_policy.name,
            slots=slots,
            line_limit=rules.line_limit or settings.key_line_limit,
            replace_mode=replace_mode.recorded,
            delivery=delivery.to_json() if may_defer and (push is None or replicated) else "",
            delay_ms=round(delay * 1000),
        )
        try:
            with self._tracing.claim(task_id):
                if replicated:
                    claimed = await self._records.run_replicated(claim)
                else:
                    claimed = await self._records.run(claim)
        except (redis.exceptions.RedisError, OSError, NotReplicated) as error:
            # The claim may have been written before the connection failed:
            # give the key back now rather than after the provisional lease,
            # or the caller's retry would meet its own ghost.
            if isinstance(error, NotReplicated) and not isinstance(error.reply, Claimed):
                claimed = error.reply  # it wrote nothing: nothing to wait for
            else:
                why = "its Redis replicas did not confirm it" if replicated else "Redis failed"
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    await self._records.run(
                        self._records.scripts.abandon(task_id, f"never enqueued: {why}")
                    )
                if isinstance(error, NotReplicated):
                    raise _not_replicated(error) from None
                raise
        if isinstance(claimed, Repeat):
            earlier = await self._settled(claimed.task_id)
            if earlier is None:  # that Start failed after all: this one runs anew
                return await self._start(cmd, task_type, answer_by, request)
            if earlier.waiting_for and cmd.conflict_policy is ConflictPolicy.REPLACE:
                # That Start's server may have stopped before its revoke went out.
                with contextlib.suppress(TaskNotFound):  # expired: nothing to stop
                    replaced = await self._reads.get(earlier.waiting_for)
                    if not replaced.terminal:
                        self._stop_replaced(replaced.id, replaced.cancel)
            return Started(earlier, already_existed=False)
        if isinstance(claimed, Reused):
            raise reused(request)
        if isinstance(claimed, Held):
            holder = claimed.holder
            if cmd.conflict_policy is ConflictPolicy.RETURN_EXISTING:
                self._records.metrics.conflicts.labels(cmd.task_name, "return_existing").inc()
                return Started(holder, already_existed=True)
            self._records.metrics.conflicts.labels(cmd.task_name, "fail").inc()
            raise TaskAlreadyRunning(
                f"task {holder.id} ({holder.name}) is already running under exclusivity "
                f"key {key!r}; cancel it, wait for it, or start with conflict_policy "
                "CONFLICT_POLICY_RETURN_EXISTING, REPLACE, QUEUE_LATEST or QUEUE",
                task_id=holder.id,
                exclusivity_key=key,
            )
        if isinstance(claimed, Quiet):
            return self._quiet(cmd, key, claimed)
        if isinstance(claimed, LineFull):
            self._records.metrics.conflicts.labels(cmd.task_name, "line_full").inc()
            raise KeyLineFull(
                f"{claimed.limit} tasks already wait for exclusivity key {key!r}, its line's "
                "limit; retry once the line has moved, or cancel some of them",
                exclusivity_key=key,
                limit=str(claimed.limit),
            )
        self._count_policy(cmd, claimed)
        if isinstance(claimed, Deferred):
            if claimed.fencing_token:
                fields["fence"] = str(claimed.fencing_token)
            if claimed.waiting_for:
                fields["waiting_for"] = claimed.waiting_for
            if claimed.revoke:
                self._stop_replaced(claimed.revoke, claimed.revoke_mode)
            self._records.metrics.tasks_started.labels(cmd.task_name).inc()
            accepted = claimed.record or TaskRecord.from_fields(fields)
            return Started(accepted, already_existed=False)
        if claimed.fencing_token:
            fields["fence"] = str(claimed.fencing_token)
        accepted = TaskRecord.from_fields(fields)
        if push is not None and not replicated:
            self._records.metrics.tasks_started.labels(cmd.task_name).inc()
            return Started(accepted, already_existed=False)  # enqueued with its claim
        if push is not None:
            confirmed = await self._confirm_replicated(task_id, push)
        else:
            try:
                with (
                    self._tracing.publish(task_id, queue),
                    self._publisher.admit() as ticket,
                ):
                    await self._publish(ticket, delivery, answer_by)
            except (Exception, asyncio.CancelledError) as exc:
                if await self._abandon(task_id, exc) or isinstance(exc, asyncio.CancelledError):
                    raise
                self._records.metrics.tasks_started.labels(cmd.task_name).inc()
                return Started(accepted, already_existed=False)
            if replicated:
                confirmed = await self._confirm_replicated(task_id, None)
            else:
                # The broker has the message: a worker may run it any moment,
                # so this Start must not answer an error because Redis blinked now.
                confirmed = await self._records.persist(self._records.scripts.confirm(task_id))
        if isinstance(confirmed, Missing):
            raise RedisUnavailable(f"the record of task {task_id} vanished: did Redis lose data?")
        if isinstance(confirmed, Moved) and never_enqueued(confirmed.record):
            raise BrokerUnavailable(
                f"the broker took task {task_id} too late: it was given up and will not run; retry"
            )
        self._records.metrics.tasks_started.labels(cmd.task_name).inc()
        return Started(accepted, already_existed=False)

    def _quiet(self, cmd: StartCommand, key: str, quiet: Quiet) -> Started:
        """A Start under a key in its quiet period: the task that ended, with
        RETURN_EXISTING; else KeyQuiet."""
        if cmd.conflict_policy is ConflictPolicy.RETURN_EXISTING and quiet.last is not None:
            self._records.metrics.conflicts.labels(cmd.task_name, "return_existing").inc()
            return Started(quiet.last, already_existed=True)
        self._records.metrics.conflicts.labels(cmd.task_name, "quiet").inc()
        free = datetime.fromtimestamp(time.time() + quiet.free_in, UTC)
        last = f"task {quiet.last.id} ended" if quiet.last else "a task ended"
        raise KeyQuiet(
            f"exclusivity key {key!r} is in its quiet period ({last}); it takes Starts again "
            f"in {quiet.free_in:.1f}s, at {free.isoformat(timespec='milliseconds')}",
            task_id=quiet.last.id if quiet.last else "",
            free_time=free.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            exclusivity_key=key,
        )

    def _count_policy(self, cmd: StartCommand, claimed: Claimed | Deferred) -> None:
        metrics = self._records.metrics
        if claimed.superseded:
            metrics.superseded.labels(cmd.task_name).inc(len(claimed.superseded))
        if isinstance(claimed, Deferred) and claimed.waiting_for:
            metrics.waits.labels(cmd.task_name, cmd.conflict_policy.name.lower()).inc()

    def _stop_replaced(self, task_id: str, mode: str) -> None:
        """REPLACE asked a running task to stop: signal its worker, as Cancel
        does (GRACEFUL: the task sees `cancel_requested`), in the background:
        the record already says so, the Start's answer need not wait for the
        broker, and a caller that goes away does not stop the revoke. A failed
        broadcast only delays the hand-over to the task's own end (a repeated
        REPLACE sends it again)."""
        if mode not in SIGNALS:
            return
        revoke = asyncio.ensure_future(self._revoke(task_id, SIGNALS[mode]))
        self._revokes.add(revoke)
        revoke.add_done_callback(self._revokes.discard)

    async def _revoke(self, task_id: str, signal: str) -> None:
        try:
            await self._publisher.revoke([task_id], signal=signal)
        except BrokerUnavailable as exc:
            logger.warning("revoke of replaced task %s failed (%s); it ends itself", task_id, exc)

    async def _confirm_replicated(
        self, task_id: str, push: tuple[str, str] | None
    ) -> Confirmed | Moved | Missing:
        """Confirm a replicated claim (pushing its message now, with `push`)
        and wait for the replicas; if they do not confirm, or Redis fails
        meanwhile, withdraw the task (NotReplicated or the Redis error) unless
        a worker already started it."""
        call = self._records.scripts.confirm(task_id, push=push)
        try:
            return await self._records.run_replicated(call)
        except NotReplicated as error:
            if not isinstance(error.reply, Confirmed):
                answer: Moved | Missing = error.reply  # it wrote nothing: it stands
                return answer
            failure: Exception = _not_replicated(error)
        except (redis.exceptions.RedisError, OSError) as error:
            failure = error
        # The message may be in the broker: end the task unless it runs
        # already, so that a worker refuses it; retried through a failover.
        why = "never enqueued: its Redis replicas did not confirm it"
        try:
            withdrawn = await self._records.persist(
                self._records.scripts.abandon(task_id, why, withdraw=True)
            )
        except (redis.exceptions.RedisError, OSError):
            logger.warning("could not withdraw task %s after %s", task_id, failure)
            raise failure from None
        if isinstance(withdrawn, Moved) and withdrawn.record.started is not None:
            # A worker began it: its own start waited for the replicas.
            logger.info("task %s started although its replicas did not confirm it", task_id)
            return Confirmed()
        logger.warning("Start gave its task up: %s", failure)
        raise failure

    async def _settled(self, task_id: str) -> TaskRecord | None:
        """The task an earlier Start with the same request id made, once that
        Start has settled; None if it failed (its task was never enqueued)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._records.settings.provisional_lease
        while True:
            try:
                rec = await self._reads.get(task_id)
            except TaskNotFound:
                return None
            if never_enqueued(rec):
                return None
            if not rec.publishing or loop.time() > give_up:
                return rec
            await asyncio.sleep(0.02)

    async def _publish(self, ticket: Ticket, delivery: Delivery, answer_by: float | None) -> None:
        wait = self._records.settings.publish_timeout
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
            abandoned = await self._records.persist(self._records.scripts.abandon(task_id, message))
        except (redis.exceptions.RedisError, OSError):
            logger.warning("could not abandon task %s; its provisional lease will", task_id)
            return True
        if isinstance(abandoned, Moved) and not never_enqueued(abandoned.record):
            if abandoned.record.terminal:  # a Cancel or a REPLACE ended it meanwhile
                logger.info("task %s ended while it was being published", task_id)
            else:
                logger.info(
                    "task %s reached a worker although its publish reported %r", task_id, error
                )
            return False
        logger.warning("Start gave its task up: %s", message)
        return True

    def _check_start(self, cmd: StartCommand) -> tuple[TaskType, StartCommand]:
        """The task type, and the command with its arguments converted to the
        task's annotations; InvalidArgument (naming the field) if anything is off."""
        if not cmd.task_name:
            raise InvalidArgument.of("task_name", "task_name is required")
        task_type = self._records.registry.get(cmd.task_name)
        if task_type is None:
            raise TaskTypeNotFound(
                f"unknown task type {cmd.task_name[:200]!r}; ListTaskTypes lists the ones "
                "that can be started",
                task_name=cmd.task_name[:200],
            )
        if cmd.args_size > self._records.settings.max_args_bytes:
            raise ArgsTooLarge(
                f"args and kwargs take {cmd.args_size} bytes; the limit is "
                f"{self._records.settings.max_args_bytes}"
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
        longest = self._records.settings.record_ttl
        if cmd.countdown is not None and not 0 <= cmd.countdown <= longest:
            raise InvalidArgument.of(
                "options.countdown",
                f"countdown must be between 0 and {longest}s (TASKSERVICE_RECORD_TTL), "
                f"not {cmd.countdown:g}s",
            )
        if cmd.start_time is not None:
            if cmd.countdown is not None:
                raise InvalidArgument.of(
                    "options.start_time", "give start_time or countdown, not both"
                )
            if cmd.start_time - time.time() > longest:
                raise InvalidArgument.of(
                    "options.start_time",
                    f"start_time must be at most {longest}s (TASKSERVICE_RECORD_TTL) ahead",
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
        declared = self._records.settings.queue_names
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


def _not_replicated(error: NotReplicated) -> RedisNotReplicated:
    return RedisNotReplicated(
        f"Redis replicas did not confirm the Start in time ({error}; "
        "TASKSERVICE_REDIS_MIN_REPLICAS): it was given up and will not run; retry"
    )
