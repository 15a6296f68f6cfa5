"""taskservice's own Celery app, and `expose`, which marks a task of any app
as startable over gRPC.

Importing this module reads no settings: taskservice.apps.configure points
the app at a Redis and a broker. When nothing called it, the app configures
itself from TASKSERVICE_* variables the first time Celery reads its
configuration (as `celery -A taskservice.worker.app worker` does).
Task authors import from the `taskservice` package (see it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery, Task

from taskservice import apps
from taskservice.core.registry import EXPOSED, check_default_key
from taskservice.core.settings import Settings
from taskservice.worker import signals

T = TypeVar("T", bound=Task)  # type: ignore[type-arg]


def expose(*, exclusivity_key: str = "") -> Callable[[T], T]:
    """Mark a Celery task as startable over gRPC, and keep its record current.

    `exclusivity_key` is the key a Start uses when the caller gives none:
    tasks sharing it run one at a time. Empty means no exclusivity unless
    the caller asks for it.
    """
    check_default_key(exclusivity_key)

    def register(task: T) -> T:
        EXPOSED.add(signals.track_task(task), exclusivity_key=exclusivity_key)
        return task

    return register


app = Celery("taskservice", task_cls="taskservice.worker.signals:TrackedTask", set_as_current=False)
signals.track(app)


@app.on_configure.connect
def _configure_from_environment(sender: Celery, **_: Any) -> None:
    if apps.settings_of(sender) is None:
        # Celery is reading the configuration right now: hand it the source
        # without forcing a reload.
        apps.configure(sender, Settings(), force=False)
