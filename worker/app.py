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
from taskservice.core.registry import EXPOSED, KeyRules, check_default_key
from taskservice.core.settings import Settings
from taskservice.core.states import CancelMode
from taskservice.worker import signals

T = TypeVar("T", bound=Task)  # type: ignore[type-arg]


def expose(
    *,
    exclusivity_key: str = "",
    key_slots: int = 0,
    key_line_limit: int = 0,
    quiet_period: float = 0.0,
    quiet_after_success: bool = False,
    replace_mode: CancelMode | str = CancelMode.TERMINATE,
) -> Callable[[T], T]:
    """Mark a Celery task as startable over gRPC, and keep its record current.

    `exclusivity_key` is the key a Start uses when the caller gives none:
    tasks sharing it run one at a time. Empty means no exclusivity unless
    the caller asks for it. For any key the task runs under:
    `key_slots`: how many may run at once under one key (0: the server's
    TASKSERVICE_KEY_SLOTS, else 1); `key_line_limit`: the longest line of
    Starts waiting for the key (CONFLICT_POLICY_QUEUE; 0: the server's
    TASKSERVICE_KEY_LINE_LIMIT); `quiet_period`: seconds the key refuses
    Starts after a task of this type ended (`quiet_after_success`: only
    after one that succeeded); `replace_mode`: how CONFLICT_POLICY_REPLACE
    stops a running task of this type (GRACEFUL, TERMINATE or KILL).
    """
    check_default_key(exclusivity_key)
    rules = KeyRules(
        slots=key_slots,
        line_limit=key_line_limit,
        quiet_period=quiet_period,
        quiet_after_success=quiet_after_success,
        replace_mode=CancelMode(replace_mode),
    )

    def register(task: T) -> T:
        EXPOSED.add(signals.track_task(task), exclusivity_key=exclusivity_key, key_rules=rules)
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
