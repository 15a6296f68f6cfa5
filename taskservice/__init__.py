"""taskservice: a gRPC front door for Celery.

What users import, from one place. Calling taskservice::

    from taskservice import Client

    with Client("127.0.0.1:50051") as client:
        task = client.start("reports.build", kwargs={"month": "2026-11"})

Writing tasks on taskservice's own Celery app::

    from taskservice import TrackedTask, app, expose

    @expose(exclusivity_key="reports")
    @app.task(bind=True, base=TrackedTask, name="reports.build")
    def build(self: TrackedTask, month: str) -> dict[str, int]: ...

On your existing app (TASKSERVICE_CELERY_APP=proj.celery:app), keep your
app and base class and only add `expose`; `self.report_progress(...)` and
`self.cancel_requested()` are then available on the task too::

    from taskservice import expose

    @expose()
    @proj_app.task(bind=True, name="reports.build")
    def build(self, month: str) -> dict[str, int]: ...

The errors and enums are plain Python; the rest is imported when first used,
so a client does not load Celery and a worker does not load gRPC. The installed
package adds this one top-level name: the server is `taskservice.server`, the
Celery side `taskservice.worker`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from taskservice.core.errors import (
    AlreadyExists,
    ArgsTooLarge,
    BrokerMisconfigured,
    BrokerUnavailable,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KeyLineFull,
    KeyNotFound,
    KeyQuiet,
    Misconfigured,
    NotFound,
    PermissionDenied,
    PublishBacklog,
    RedisBusy,
    RedisMisconfigured,
    RedisNotReplicated,
    RedisOutOfMemory,
    RedisPoolExhausted,
    RedisReadOnly,
    RedisUnavailable,
    ResourceExhausted,
    ShuttingDown,
    TaskAlreadyRunning,
    TaskFinished,
    TaskNotFound,
    TaskServiceError,
    TaskTypeNotFound,
    Unauthenticated,
    Unavailable,
)
from taskservice.core.states import CancelMode, ConflictPolicy, TaskState

if TYPE_CHECKING:
    from taskservice.client import AsyncClient, Client, RetryPolicy, Task, TaskType
    from taskservice.worker.app import app, expose
    from taskservice.worker.signals import Tracked, TrackedTask

_HOMES = {
    "Client": "taskservice.client",
    "AsyncClient": "taskservice.client",
    "RetryPolicy": "taskservice.client",
    "Task": "taskservice.client",
    "TaskType": "taskservice.client",
    "app": "taskservice.worker.app",
    "expose": "taskservice.worker.app",
    "Tracked": "taskservice.worker.signals",
    "TrackedTask": "taskservice.worker.signals",
}

__all__ = [  # noqa: RUF022 (grouped for readers, not sorted)
    # Calling taskservice
    "AsyncClient",
    "CancelMode",
    "Client",
    "ConflictPolicy",
    "RetryPolicy",
    "Task",
    "TaskState",
    "TaskType",
    # Writing tasks
    "Tracked",
    "TrackedTask",
    "app",
    "expose",
    # Errors: what the server raises and the client raises again
    # (taskservice.core.errors documents the hierarchy)
    "AlreadyExists",
    "ArgsTooLarge",
    "BrokerMisconfigured",
    "BrokerUnavailable",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "KeyLineFull",
    "KeyNotFound",
    "KeyQuiet",
    "Misconfigured",
    "NotFound",
    "PermissionDenied",
    "PublishBacklog",
    "RedisBusy",
    "RedisMisconfigured",
    "RedisNotReplicated",
    "RedisOutOfMemory",
    "RedisPoolExhausted",
    "RedisReadOnly",
    "RedisUnavailable",
    "ResourceExhausted",
    "ShuttingDown",
    "TaskAlreadyRunning",
    "TaskFinished",
    "TaskNotFound",
    "TaskServiceError",
    "TaskTypeNotFound",
    "Unauthenticated",
    "Unavailable",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'taskservice' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
