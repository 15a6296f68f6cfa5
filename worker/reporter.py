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
import redis
import redis.exceptions
from celery import Celery
from kombu.utils.json import dumps as json_dumps
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry
from structlog.contextvars import bind_contextvars, bound_contextvars

from taskservice import apps
from taskservice.core import record
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
        self._client = redis.Redis.from_url(
            settings.redis_url,
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

    def run(self, call: Call[R], *, retry_for: float | None = None) -> R:
        """Run a script, retrying while Redis is unreachable (for at most
        `retry_for` seconds, by default `worker_write_retry`)."""
        deadline = time.monotonic() + (self._retry_for if retry_for is None else retry_for)
        delay = 0.05
        while True:
            try:
                script = self._loaded.get(call.script.name)
                if script is None:
                    script = self._client.register_script(call.script.source)
                    self._loaded[call.script.name] = script
                return call.parse(script(keys=call.keys, args=call.args))
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
            client = self._bounded_client = redis.Redis.from_url(
                self.settings.redis_url,
                decode_responses=True,
                socket_timeout=self._bounded_timeout,
                socket_connect_timeout=self._bounded_timeout,
                retry=Retry(NoBackoff(), 0),
            )
        return client

    def begin(self, task_id: str, worker: str) -> int | None:
        """Mark the task STARTED by this execution: its fencing token (0 for
        a task without a key, or not taskservice's); None if it must not run."""
        run = f"{worker}/{uuid.uuid4().hex}"
        call = self.scripts.start(
            task_id, worker=worker, run=run, lease_ms=self.lease_ms, when=time.time()
        )
        match self.run(call):
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
        # Missing: sent to this app by something other than taskservice.
        return 0

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
            changed = self.run(call)
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
