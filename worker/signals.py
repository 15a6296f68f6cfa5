"""The hooks that report a task's life back to its taskservice record.

`TrackedTask` (the base class of every task on taskservice's app) marks the
record STARTED before the task body runs, and refuses to run a task whose
record was already cancelled (a cancel recorded while the task sat in the
broker wins even if the worker never got Celery's revoke broadcast). It also
gives task code `report_progress` and `cancel_requested`.

Celery's signals report the end: success, failure (including time limits,
unencodable results and lost worker processes), revocation and retries.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Ignore
from celery.signals import task_failure, task_retry, task_revoked, task_success
from kombu.utils.json import dumps as json_dumps

from service.config import Settings
from worker import record

logger = logging.getLogger(__name__)


class Reporter:
    """Writes record transitions for one worker process (and its pool children;
    redis-py reconnects after a fork)."""

    def __init__(self, settings: Settings) -> None:
        self._prefix = settings.key_prefix
        self._ttl = settings.record_ttl
        self._channel = record.events_channel(settings.key_prefix)
        self._client = redis.Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=settings.redis_timeout,
            socket_connect_timeout=settings.redis_timeout,
            retry_on_timeout=True,
        )
        self._transition = self._client.register_script(record.TRANSITION_LUA)

    def transition(
        self,
        task_id: str,
        allowed: frozenset[str],
        new_state: str = "",
        fields: dict[str, str] | None = None,
    ) -> tuple[str, str]:
        """Apply a change; returns ("ok", record JSON), ("missing", "") or
        ("rejected", current state)."""
        args = record.transition_args(self._channel, self._ttl, allowed, new_state, fields or {})
        status, detail = self._transition(keys=[record.task_key(self._prefix, task_id)], args=args)
        return str(status), str(detail)

    def finish(self, task_id: str, new_state: str, fields: dict[str, str]) -> None:
        fields = {"finished": repr(time.time()), **fields}
        status, detail = self.transition(task_id, record.ACTIVE_STATES, new_state, fields)
        if status == "rejected":
            logger.debug("task %s already ended as %s; %s not recorded", task_id, detail, new_state)

    def cancel_requested(self, task_id: str) -> bool:
        key = record.task_key(self._prefix, task_id)
        return bool(self._client.hexists(key, "cancel"))


class TaskServiceCelery(Celery):
    """The Celery app, carrying the reporter its tasks and hooks write with."""

    reporter: Reporter


def _reporter(app: Celery) -> Reporter:
    reporter = _maybe_reporter(app)
    if reporter is None:
        raise RuntimeError("TrackedTask used on an app without worker.signals.connect()")
    return reporter


def _maybe_reporter(app: Celery) -> Reporter | None:
    # Signals fire for every app in the process; only ours has a reporter.
    reporter: Reporter | None = getattr(app, "reporter", None)
    return reporter


class TrackedTask(Task):  # type: ignore[type-arg]
    """Base class of taskservice tasks: keeps the task's record current."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task_id = self.request.id
        if task_id and not self.request.called_directly:
            status, detail = _reporter(self.app).transition(
                task_id,
                frozenset({record.PENDING}),
                record.STARTED,
                {"started": repr(time.time()), "worker": self.request.hostname or ""},
            )
            if status == "rejected" and detail == record.REVOKED:
                logger.info("task %s was cancelled before it started; not running it", task_id)
                raise Ignore()
        return super().__call__(*args, **kwargs)

    def update_state(
        self,
        task_id: str | None = None,
        state: str | None = None,
        meta: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().update_state(task_id, state, meta, **kwargs)
        task_id = task_id or self.request.id
        if state == "PROGRESS" and task_id:
            meta = meta or {}
            progress = {
                "current": float(meta.get("current", 0)),
                "total": float(meta.get("total", 0)),
                "message": str(meta.get("message", "")),
            }
            _reporter(self.app).transition(
                task_id, frozenset({record.STARTED}), "", {"progress": json_dumps(progress)}
            )

    def report_progress(self, current: float, total: float = 0, message: str = "") -> None:
        """Report progress: `current` of `total` units done (total 0: unknown)."""
        self.update_state(
            state="PROGRESS", meta={"current": current, "total": total, "message": message}
        )

    def cancel_requested(self) -> bool:
        """True once Cancel was called for this task. A task may poll this to
        stop early after a graceful cancel (raising any exception ends it
        CANCELLED)."""
        task_id: str | None = self.request.id
        if not task_id:
            return False
        return _reporter(self.app).cancel_requested(task_id)


def _on_success(sender: Task, result: Any, **_: Any) -> None:  # type: ignore[type-arg]
    task_id = sender.request.id
    reporter = _maybe_reporter(sender.app)
    if task_id and reporter:
        # Celery already stored this result with the same JSON encoder, so
        # encoding cannot fail here (it raised EncodeError before this signal).
        reporter.finish(task_id, record.SUCCESS, {"result": json_dumps(result)})


def _on_failure(
    sender: Task,  # type: ignore[type-arg]
    task_id: str | None = None,
    exception: BaseException | None = None,
    einfo: Any = None,
    **_: Any,
) -> None:
    reporter = _maybe_reporter(sender.app)
    if not task_id or exception is None or reporter is None:
        return
    traceback = str(getattr(einfo, "traceback", "") or "")
    reporter.finish(
        task_id,
        record.FAILURE,
        {
            "error_type": type(exception).__name__,
            "error_message": str(exception),
            "traceback": traceback,
        },
    )


def _on_revoked(sender: Task, request: Any = None, **_: Any) -> None:  # type: ignore[type-arg]
    task_id = getattr(request, "id", None)
    reporter = _maybe_reporter(sender.app)
    if task_id and reporter:
        reporter.finish(task_id, record.REVOKED, {})


def _on_retry(sender: Task, request: Any = None, **_: Any) -> None:  # type: ignore[type-arg]
    task_id = getattr(request, "id", None)
    reporter = _maybe_reporter(sender.app)
    if task_id and reporter:
        # Back to the queue: the retry's __call__ marks it STARTED again.
        reporter.transition(task_id, frozenset({record.STARTED}), record.PENDING)


def connect(app: TaskServiceCelery, settings: Settings) -> None:
    """Give `app` its reporter and report its tasks' ends to their records."""
    app.reporter = Reporter(settings)
    # Celery signals are global; the receivers find the app through `sender`.
    task_success.connect(_on_success, weak=False)
    task_failure.connect(_on_failure, weak=False)
    task_revoked.connect(_on_revoked, weak=False)
    task_retry.connect(_on_retry, weak=False)
