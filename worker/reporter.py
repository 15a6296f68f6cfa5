"""What writes a worker's record transitions: one `Reporter` per tracked app,
shared by the task hooks (taskservice.worker.signals) and the heartbeat."""

from __future__ import annotations

import logging
import time
import traceback
import uuid
from collections.abc import Iterable
from typing import Any, TypeVar

import kombu.exceptions
import redis.exceptions
from celery import Celery
from kombu.utils.json import dumps as json_dumps
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry
from structlog.contextvars import bind_contextvars, bound_contextvars

from taskservice import apps
from taskservice.core import connect, record
from taskservice.core.scripts import (
    Began,
    Call,
    Changed,
    Missing,
    Over,
    Rejected,
    RunningElsewhere,
    Scripts,
    transient,
)
from taskservice.core.settings import Settings
from taskservice.worker import metrics

logger = logging.getLogger(__name__)

TRACKED = "taskservice_tracked"
"""The attribute a tracked app carries; the name cannot clash with a team's own."""
_REPORTER = "taskservice_reporter"

R = TypeVar("R")


class NotReplicated(Exception):
    """Fewer replicas than `redis_min_replicas` confirmed a record write
    within `worker_write_retry`: a failover now could lose it."""


class Reporter:
    """Writes record transitions for one worker (its main process and pool
    children alike: redis-py reconnects after a fork)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.scripts = Scripts(settings.key_prefix, settings.record_ttl)
        self.lease_ms = int(settings.lease * 1000)
        self.heartbeat_interval = settings.heartbeat_interval
        self.max_result_bytes = settings.max_result_bytes
        self._retry_for = settings.worker_write_retry
        self._min_replicas = settings.redis_min_replicas
        self._replicas_ms = max(1, round(settings.redis_min_replicas_timeout * 1000))
        # Through the sentinels when there are: a connection that finds its
        # server demoted (READONLY) drops itself, and the retry in `run`
        # reaches the new master.
        self._client = connect.client(
            settings,
            decode_responses=True,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
        )
        self._loaded: dict[str, Script] = {}
        self.fence_margin = settings.effective_fence_margin
        # The heartbeat's own client: one attempt per call, each bounded well
        # within the fence margin, so a hung Redis never holds a renewal (and
        # the worker's view of its leases) for longer than that.
        self._bounded_timeout = min(settings.redis_timeout, self.fence_margin / 2)
        self._bounded_client: redis.Redis | None = None

    def run(
        self,
        call: Call[R],
        *,
        retry_for: float | None = None,
        replicated: tuple[type, ...] = (),
    ) -> R:
        """Run a script, retrying while Redis is unreachable (for at most
        `retry_for` seconds, by default `worker_write_retry`). `replicated`:
        the replies that mean the script wrote; for those, also retry until
        `redis_min_replicas` replicas have the write, else NotReplicated (the
        write stays on the master)."""
        deadline = time.monotonic() + (self._retry_for if retry_for is None else retry_for)
        delay = 0.05
        while True:
            try:
                script = self._loaded.get(call.script.name)
                if script is None:
                    script = self._client.register_script(call.script.source)
                    self._loaded[call.script.name] = script
                if not (replicated and self._min_replicas):
                    return call.parse(script(keys=call.keys, args=call.args))
                reply, acked = self._run_replicated(script, call)
                if acked >= self._min_replicas or not isinstance(reply, replicated):
                    return reply
                if time.monotonic() + delay > deadline:
                    raise NotReplicated(
                        f"{acked} of {self._min_replicas} Redis replica(s) confirmed the "
                        f"{call.script.name} of a task (TASKSERVICE_REDIS_MIN_REPLICAS)"
                    )
                logger.warning("Redis replicas did not confirm a record write; retrying")
            except redis.exceptions.RedisError as exc:
                if not transient(exc) or time.monotonic() + delay > deadline:
                    raise
                logger.warning("record write failed (%s); retrying in %.2fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def run_bounded(self, call: Call[R]) -> R:
        """Run a script once, failing after `fence_margin` / 2 (at most
        `redis_timeout`) to connect and as much to answer: no retries."""
        script = self._bounded().register_script(call.script.source)
        return call.parse(script(keys=call.keys, args=call.args))

    def reachable(self) -> bool:
        """True if Redis answers a PING within run_bounded's limits."""
        try:
            return bool(self._bounded().ping())
        except redis.exceptions.RedisError:
            return False

    def _bounded(self) -> redis.Redis:
        client = self._bounded_client
        if client is None:
            client = self._bounded_client = connect.client(
                self.settings,
                decode_responses=True,
                socket_timeout=self._bounded_timeout,
                socket_connect_timeout=self._bounded_timeout,
                retry=Retry(NoBackoff(), 0),
            )
        return client

    def _run_replicated(self, script: Script, call: Call[R]) -> tuple[R, int]:
        """The script, then WAIT, on one connection (a pipeline): its reply,
        and how many replicas have every write the connection made. The
        record's EXPIRE in between (a write whenever the record exists) makes
        the WAIT cover the record even when the script wrote nothing because
        an earlier attempt, whose reply was lost, had."""
        pipe = self._client.pipeline(transaction=False)
        script(keys=call.keys, args=call.args, client=pipe)
        pipe.expire(call.keys[0], self.settings.record_ttl)
        pipe.execute_command(  # type: ignore[no-untyped-call]
            "WAIT", self._min_replicas, self._replicas_ms
        )
        reply, _, acked = pipe.execute()
        return call.parse(reply), int(acked)

    def begin(
        self, task_id: str, worker: str, *, claimed: str | None = None, task_name: str = ""
    ) -> int | None:
        """Mark the task STARTED by this execution: its fencing token (0 for a
        task without a key, or not taskservice's); None if it must not run.
        `claimed`: the message's CLAIMED_HEADER (None without), i.e. a Start
        claimed the task, so a missing record was lost, not never made."""
        run = f"{worker}/{uuid.uuid4().hex}"
        call = self.scripts.start(
            task_id, worker=worker, run=run, lease_ms=self.lease_ms, when=time.time()
        )
        match self.run(call, replicated=(Began,)):
            case Over(state):
                logger.info("task %s already ended (%s); not running it", task_id, state)
                return None
            case RunningElsewhere(other):
                logger.warning("task %s is running on %s; not running it twice", task_id, other)
                return None
            case Began(rec):
                if rec.exclusivity_key:
                    bind_contextvars(exclusivity_key=rec.exclusivity_key)
                return rec.fencing_token
            case Missing() if claimed is not None:
                self._refuse_orphan(task_id, task_name, claimed, worker)
                return None
        # Missing and unclaimed: sent to this app by something other than a Start.
        return 0

    def _refuse_orphan(self, task_id: str, task_name: str, key: str, worker: str) -> None:
        """A Start claimed the task, yet it has no record: Redis lost it (a
        failover to a replica that missed it, a restart without persistence).
        Running it would run it unclaimed, maybe beside another task under its
        key: refuse it, say so, and record what is known of it, ended LOST."""
        logger.error(
            "task %s (%s, exclusivity key %r) has no record although a Start claimed it: "
            "Redis lost it (a failover or restart?); not running it",
            task_id,
            task_name,
            key,
        )
        metrics.refused(task_name, "record_lost")
        fields = {
            "id": task_id,
            "name": task_name,
            "state": record.LOST,
            "worker": worker,
            "error_type": record.RECORD_LOST_ERROR,
            "error_message": (
                "Redis lost this task's record after its Start was accepted (a failover "
                "to a replica that missed it, or a restart without persistence); the "
                f"worker {worker} refused to run it. Start it again if it should run"
            ),
        }
        if key:
            fields["key"] = key
        try:
            written = self.run(self.scripts.orphan(task_id, fields))
        except redis.exceptions.RedisError:
            logger.exception("could not record the lost task %s", task_id)
            return
        if isinstance(written, Changed):
            metrics.ended(task_name, record.LOST)

    def transition(
        self,
        task_id: str,
        allowed: Iterable[str],
        new_state: str = "",
        fields: dict[str, str] | None = None,
    ) -> Changed | Rejected | Missing:
        """Apply a change to a task in one of the `allowed` states."""
        return self.run(self.scripts.transition(task_id, allowed, new_state, fields))

    def finish(self, task_id: str, new_state: str, fields: dict[str, str]) -> str:
        """End the task in `new_state` (REVOKED if a cancel was asked for);
        the state it ended in, "" if it had already ended (or is no task of
        taskservice's)."""
        fields = {"finished": repr(time.time()), **fields}
        with bound_contextvars(task_id=task_id):
            call = self.scripts.transition(task_id, record.ACTIVE_STATES, new_state, fields)
            try:
                changed = self.run(call, replicated=(Changed,))
            except NotReplicated as error:
                # Written on the master, which may keep it: nothing to undo.
                logger.warning("the end of task %s may be lost in a failover: %s", task_id, error)
                return new_state
            if not isinstance(changed, Changed):
                logger.debug("task %s already ended; %s not recorded", task_id, new_state)
                return ""
        metrics.ended(changed.record.name, changed.record.state)
        return changed.record.state

    def fail(self, task_id: str, error_type: str, message: str, trace: str = "") -> str:
        # Bounded, like results: every change is published whole to every server.
        """End the task FAILED with this error; the state it ended in."""
        return self.finish(
            task_id,
            record.FAILURE,
            {
                "error_type": record.clip(error_type, 200),
                "error_message": record.clip(message, record.MAX_MESSAGE_CHARS),
                "traceback": record.clip_end(trace, record.MAX_TRACEBACK_CHARS),
            },
        )

    def succeed(self, task_id: str, result: Any) -> str:
        """Record the result, or fail the task if no client could read it:
        whether or not Celery stores results (ignore_result), the record is
        what every caller reads. The state it ended in (see `finish`)."""
        try:
            encoded = json_dumps(result, allow_nan=False)
        except (TypeError, ValueError, kombu.exceptions.EncodeError) as exc:
            if "Out of range float values" in str(exc):
                why = "it holds NaN or Infinity, which JSON and protobuf's Value cannot carry"
                return self.fail(task_id, "ResultNotRepresentable", why)
            return self.fail(task_id, "EncodeError", str(exc), traceback.format_exc())
        if len(encoded) > self.max_result_bytes:
            return self.fail(
                task_id,
                "ResultTooLarge",
                f"the result takes {len(encoded)} bytes as JSON; the limit is "
                f"{self.max_result_bytes} (TASKSERVICE_MAX_RESULT_BYTES): store large "
                "results elsewhere and return a reference",
            )
        problem = record.unrepresentable(result)
        if problem:
            return self.fail(task_id, "ResultNotRepresentable", problem)
        return self.finish(task_id, record.SUCCESS, {"result": encoded})

    def cancel_requested(self, task_id: str) -> bool:
        """True once a Cancel asked the task to stop."""
        key = record.task_key(self.scripts.prefix, task_id)
        return bool(self._client.hexists(key, "cancel"))


def tracked(app: Celery) -> bool:
    """True if taskservice reports the tasks of `app`."""
    return bool(getattr(app, TRACKED, False))


def reporter_of(app: Celery) -> Reporter | None:
    """The reporter of a tracked app (made on first use, and anew when the
    app is given other settings); None for any other app: signals fire for
    every app in the process."""
    if not tracked(app):
        return None
    settings = apps.settings_of(app)
    if settings is None:
        settings = Settings()
        apps.attach(app, settings)
    reporter: Reporter | None = getattr(app, _REPORTER, None)
    if reporter is None or reporter.settings is not settings:
        reporter = Reporter(settings)
        setattr(app, _REPORTER, reporter)
    return reporter
