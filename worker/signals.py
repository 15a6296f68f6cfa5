"""The hooks that report a task's life back to its taskservice record.

`Tracked` (the base class of every task on taskservice's app, and mixed into
each exposed task of another app by `track_task`) marks the record STARTED
before the task body runs and records its outcome when the body returns or
raises. It refuses to run a task whose record is already
terminal (cancelled while queued, lost, finished: a redelivered message) or
that another execution is running under a live lease, so a task id runs its
body at most once. It also gives task code `report_progress`,
`cancel_requested` and `fencing_token`.

Ends that happen outside the task body are reported from Celery's signals in
the worker's main process: a pool process that died (LOST), a hard time
limit, a revoke with terminate, an internal error, a task type the worker
does not know. `taskservice.worker.heartbeat` renews the leases of the tasks a worker
holds, and stops those it cannot vouch for; whatever cannot be written ends
LOST when the lease lapses.

Every write retries with backoff for up to `worker_write_retry` seconds, so a
Redis restart or failover does not lose it.

Around each task run, the logging context carries task_id and task_name (and
exclusivity_key once the record says it), so every line logged meanwhile,
Celery's own included, says which task it is about (taskservice.core.logs). Each end
written and each body's run time is counted in taskservice.worker.metrics. With
tracing on, each run is a span of its Start's trace (taskservice.worker.tracing).
"""

from __future__ import annotations

import logging
import signal
import time
import traceback
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry
from celery.local import maybe_evaluate
from celery.signals import (
    task_failure,
    task_internal_error,
    task_postrun,
    task_prerun,
    task_revoked,
    task_unknown,
)
from kombu.utils.json import dumps as json_dumps
from structlog.contextvars import bind_contextvars, clear_contextvars

from taskservice.core import record
from taskservice.worker import metrics, tracing
from taskservice.worker.heartbeat import Heartbeat, fenced
from taskservice.worker.reporter import TRACKED, reporter_of, tracked

logger = logging.getLogger(__name__)


def track(app: Celery) -> None:
    """Report the tasks of `app` to their records: its workers run the
    heartbeat, and the signal hooks write for it, with the settings the app
    was given (taskservice.apps), else TASKSERVICE_* read when first needed
    (a worker started as `celery -A proj worker` gets there by importing the
    modules that expose its tasks). Changes nothing else of the app."""
    if getattr(app, TRACKED, False):
        return
    setattr(app, TRACKED, True)
    app.steps["worker"].add(Heartbeat)
    app.steps["worker"].add(metrics.MetricsEndpoint)
    _connect_signals()


def track_task(task: Task) -> Task:  # type: ignore[type-arg]
    """`task`, keeping its record current: a task whose class is not already
    `Tracked` gets a subclass of its own class with `Tracked` mixed in, so
    its base class, options and app stay as its author wrote them."""
    task = maybe_evaluate(task)  # app.task may hand out a lazy proxy
    track(task.app)
    cls = type(task)
    if not issubclass(cls, Tracked):
        # Celery made `cls` for this one task (app.task does), so changing the
        # instance's class touches nothing else. Tracked comes first: its
        # __call__ wraps the task's own (Celery's tracer calls a task whose
        # class defines __call__ through it).
        name = cls.__qualname__
        task.__class__ = type(name, (Tracked, cls), {"__module__": cls.__module__})
    return task


_FENCING_TOKEN = "taskservice_fencing_token"


class Tracked(Task):  # type: ignore[type-arg]
    """Keeps the task's record current (see the module)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        reporter = reporter_of(self.app)
        task_id: str | None = request.id
        if not task_id or request.called_directly or reporter is None:
            return super().__call__(*args, **kwargs)
        claimed = request.get(record.CLAIMED_HEADER)
        token = reporter.begin(
            task_id, request.hostname or "", claimed=claimed, task_name=self.name
        )
        if token is None:
            raise Ignore()
        # On the request (Celery's per-call context), not the task object,
        # which the calls of a thread pool share.
        setattr(request, _FENCING_TOKEN, token)
        began = time.perf_counter()
        try:
            result = super().__call__(*args, **kwargs)
        except Retry:
            metrics.ran(self.name, "retried", time.perf_counter() - began)
            raise  # apply_async already sent it back to the queue
        except (Ignore, Reject) as exc:
            took = time.perf_counter() - began
            state = reporter.fail(
                task_id, type(exc).__name__, f"the task ended itself with {exc!r}; no outcome"
            )
            metrics.ran(self.name, state or record.FAILURE, took)
            raise
        except Exception as exc:
            took = time.perf_counter() - began
            state = reporter.fail(task_id, type(exc).__name__, str(exc), traceback.format_exc())
            metrics.ran(self.name, state or record.FAILURE, took)
            raise
        except SystemExit as exc:
            # The pool process is being stopped (billiard turns SIGTERM into
            # SystemExit), after the body's own cleanup ran. A TERMINATE
            # cancel ends here, and only now: see _on_revoked. Any other stop
            # is a lost worker, as the lease will say.
            if reporter.cancel_requested(task_id):
                took = time.perf_counter() - began
                state = reporter.fail(
                    task_id,
                    "Terminated",
                    f"stopped by a TERMINATE cancel ({exc!r})",
                    traceback.format_exc(),
                )
                metrics.ran(self.name, state or record.REVOKED, took)
            raise
        took = time.perf_counter() - began
        state = reporter.succeed(task_id, result)
        metrics.ran(self.name, state or record.SUCCESS, took)
        return result

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        *rest: Any,
        **options: Any,
    ) -> Any:
        """Celery's apply_async; a retry of a tracked task goes back to QUEUED first."""
        request = self.request
        reporter = reporter_of(self.app)
        retrying = (
            reporter is not None
            and task_id is not None
            and not request.called_directly
            and task_id == request.id
        )
        if not retrying or reporter is None or task_id is None:
            return super().apply_async(args, kwargs, task_id, *rest, **options)
        # A retry: back to QUEUED *before* the new message exists, so its next
        # run can never be moved back by this one. The lease stays until the
        # message is out, so a worker dying in between still frees the key.
        reporter.transition(task_id, {record.STARTED}, record.PENDING)
        claimed = request.get(record.CLAIMED_HEADER)
        if claimed is not None:  # Celery does not carry custom headers over
            options["headers"] = {**(options.get("headers") or {}), record.CLAIMED_HEADER: claimed}
        result = super().apply_async(args, kwargs, task_id, *rest, **options)
        reporter.run(reporter.scripts.release([task_id]))
        return result

    def update_state(
        self,
        task_id: str | None = None,
        state: str | None = None,
        meta: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Celery's update_state; a PROGRESS update is written to the record."""
        if not self.ignore_result:
            super().update_state(task_id, state, meta, **kwargs)
        task_id = task_id or self.request.id
        reporter = reporter_of(self.app)
        if state == "PROGRESS" and task_id and reporter is not None:
            meta = meta or {}
            progress = {
                "current": float(meta.get("current", 0)),
                "total": float(meta.get("total", 0)),
                "message": record.clip(str(meta.get("message", "")), record.MAX_MESSAGE_CHARS),
            }
            reporter.transition(task_id, {record.STARTED}, "", {"progress": json_dumps(progress)})

    def report_progress(self, current: float, total: float = 0, message: str = "") -> None:
        """Report progress: `current` of `total` units done (total 0: unknown)."""
        self.update_state(
            state="PROGRESS", meta={"current": current, "total": total, "message": message}
        )

    @property
    def fencing_token(self) -> int:
        """The running task's fencing token: larger than that of every task
        started under its exclusivity key before (0 without a key). A store
        the task writes to can keep the largest token it has seen and refuse
        writes with a smaller one: a previous holder that still runs (its
        worker frozen or cut off past its lease) is then refused."""
        return int(getattr(self.request, _FENCING_TOKEN, 0))

    def cancel_requested(self) -> bool:
        """True once Cancel was called for this task. A task may poll this to
        stop early after a graceful cancel (raising any exception ends it
        CANCELLED)."""
        task_id: str | None = self.request.id
        reporter = reporter_of(self.app)
        if not task_id or reporter is None:
            return False
        return reporter.cancel_requested(task_id)


class TrackedTask(Tracked):
    """Base class of the tasks on taskservice's own app."""

    # The record carries the outcome; storing it in Celery's result backend
    # too would encode and write every result twice. A task that AsyncResult
    # callers read sets ignore_result=False. (Another app's tasks keep their
    # own setting: only `Tracked` is mixed into them.)
    ignore_result = True


# -- Ends outside the task body (main process) ------------------------------


def _on_failure(
    sender: Task,  # type: ignore[type-arg]
    task_id: str | None = None,
    exception: BaseException | None = None,
    einfo: Any = None,
    **_: Any,
) -> None:
    # Body exceptions were recorded by TrackedTask (this then changes
    # nothing); what arrives here first is a pool process that died or a
    # hard time limit.
    reporter = reporter_of(sender.app)
    if not task_id or exception is None or reporter is None or _fenced(task_id):
        return
    fields = {
        "error_type": type(exception).__name__,
        "error_message": str(exception),
        "traceback": _traceback(einfo),
    }
    state = record.LOST if isinstance(exception, WorkerLostError) else record.FAILURE
    reporter.finish(task_id, state, fields)


def _on_revoked(
    sender: Task,  # type: ignore[type-arg]
    request: Any = None,
    terminated: bool = False,
    signum: Any = None,
    **_: Any,
) -> None:
    task_id = getattr(request, "id", None)
    reporter = reporter_of(sender.app)
    if not task_id or reporter is None or _fenced(task_id):
        return
    if terminated and str(signum) in _SOFT_SIGNALS:
        # Celery says "revoked" as soon as it sent SIGTERM, while the task's
        # cleanup (finally:, __exit__) still runs: the task records its own
        # end when it is done (Tracked.__call__). Should it never, its lease
        # lapses (Celery no longer counts it as active) and it ends then.
        return
    reporter.finish(task_id, record.REVOKED, {})


def _fenced(task_id: str) -> bool:
    # This worker stopped (or dropped) the task because it could not vouch
    # for it: its lease lapses, or has lapsed, and ends it LOST. A write from
    # here would be late (and is bounded only by worker_write_retry).
    reason = fenced(task_id)
    if reason:
        logger.warning("task %s stopped by this worker: %s; it ends LOST", task_id, reason)
    return bool(reason)


_SOFT_SIGNALS = frozenset({str(int(signal.SIGTERM)), "SIGTERM", "TERM"})


def _on_internal_error(
    sender: Task,  # type: ignore[type-arg]
    task_id: str | None = None,
    exception: BaseException | None = None,
    einfo: Any = None,
    **_: Any,
) -> None:
    # Celery itself failed around the task (e.g. storing its result while
    # Redis restarts): the body's outcome, if it got that far, is already
    # recorded, and this changes nothing.
    reporter = reporter_of(sender.app)
    if task_id and exception is not None and reporter is not None:
        message = f"Celery failed around the task: {exception}"
        reporter.fail(task_id, type(exception).__name__, message, _traceback(einfo))


def _traceback(einfo: Any) -> str:
    return str(getattr(einfo, "traceback", "") or "")


def _on_unknown(sender: Any, name: str = "", id: str = "", **_: Any) -> None:
    app = getattr(sender, "app", None)
    reporter = reporter_of(app) if app is not None else None
    if id and reporter is not None:
        reporter.fail(
            id,
            "NotRegistered",
            f"worker {getattr(sender, 'hostname', '')} does not know task type {name!r}: "
            "do the server and the workers list the same TASKSERVICE_TASKS?",
        )


def _on_prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    # In the process that runs the task, before Celery's tracer logs about it.
    app = getattr(sender, "app", None)
    if task_id and app is not None and tracked(app):
        clear_contextvars()
        bind_contextvars(task_id=task_id, task_name=getattr(sender, "name", ""))


def _on_postrun(sender: Any = None, **_: Any) -> None:
    # After Celery's own line on the outcome: the next task starts clean.
    app = getattr(sender, "app", None)
    if app is not None and tracked(app):
        clear_contextvars()


def _connect_signals() -> None:
    # Celery signals are global (connecting twice is a no-op); the receivers
    # find the app, and whether it is tracked, through `sender`.
    task_prerun.connect(_on_prerun, weak=False)
    task_postrun.connect(_on_postrun, weak=False)
    task_failure.connect(_on_failure, weak=False)
    task_revoked.connect(_on_revoked, weak=False)
    task_internal_error.connect(_on_internal_error, weak=False)
    task_unknown.connect(_on_unknown, weak=False)
    tracing.connect()  # only if the OTEL_* variables ask for traces
