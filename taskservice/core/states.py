"""The one map: Celery state (as kept in a task's record) -> TaskState, and the
enums of the API (TaskState, ConflictPolicy, CancelMode) as Python enums.

| record state           | TaskState   | note                                        |
|------------------------|-------------|---------------------------------------------|
| PENDING                | QUEUED      | our record: Celery says PENDING for any id  |
| STARTED                | RUNNING     | progress is a field, not a state            |
| SUCCESS                | SUCCEEDED   |                                             |
| FAILURE                | FAILED      | LOST if the error is WorkerLostError        |
| REVOKED                | CANCELLED   |                                             |
| LOST (ours, not Celery)| LOST        | its worker died or stopped heartbeating     |

A record holds only these six states (taskservice.core.record): Celery's
RECEIVED, RETRY and PROGRESS never reach it (a retry goes back to PENDING,
progress is a field).

Each enum here has the names of the proto enum it stands for, without the
prefix (`TASK_STATE_QUEUED` is `TaskState.QUEUED`, whose value is "QUEUED"):
the server and the client convert by name, and the rest of the code never
sees a proto enum. tests/unit/test_translation.py checks that the two keep
the same names. As strings, `task.state == "SUCCEEDED"` holds too.
"""

from __future__ import annotations

import enum

from taskservice.core.record import WORKER_LOST_ERROR, TaskRecord


class TaskState(enum.StrEnum):
    """The state of a task as callers see it (taskservice.v1.TaskState)."""

    UNSPECIFIED = "UNSPECIFIED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    LOST = "LOST"

    @property
    def terminal(self) -> bool:
        """True once the task has ended (it will not change again)."""
        return self in _TERMINAL


class ConflictPolicy(enum.StrEnum):
    """What a Start does when its exclusivity key is held
    (taskservice.v1.ConflictPolicy); UNSPECIFIED means REJECT."""

    UNSPECIFIED = "UNSPECIFIED"
    REJECT = "REJECT"
    RETURN_EXISTING = "RETURN_EXISTING"
    REPLACE = "REPLACE"
    QUEUE_LATEST = "QUEUE_LATEST"
    QUEUE = "QUEUE"

    @property
    def waits(self) -> bool:
        """True for the policies under which a Start may wait for its key."""
        return self in (ConflictPolicy.REPLACE, ConflictPolicy.QUEUE_LATEST, ConflictPolicy.QUEUE)


class CancelMode(enum.StrEnum):
    """How Cancel stops a running task (taskservice.v1.CancelMode);
    UNSPECIFIED means KILL (the behaviour taskservice replaced)."""

    UNSPECIFIED = "UNSPECIFIED"
    GRACEFUL = "GRACEFUL"
    TERMINATE = "TERMINATE"
    KILL = "KILL"

    @property
    def recorded(self) -> str:
        """The mode as a task's record keeps it ("GRACEFUL", "TERMINATE", "KILL")."""
        return "KILL" if self is CancelMode.UNSPECIFIED else self.name


_TERMINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.LOST})

_STATES: dict[str, TaskState] = {
    "PENDING": TaskState.QUEUED,
    "STARTED": TaskState.RUNNING,
    "SUCCESS": TaskState.SUCCEEDED,
    "FAILURE": TaskState.FAILED,
    "REVOKED": TaskState.CANCELLED,
    "LOST": TaskState.LOST,
}


def task_state(rec: TaskRecord) -> TaskState:
    """The TaskState callers see for a record."""
    # Records written before LOST was a state of its own say it this way.
    if rec.state == "FAILURE" and rec.error is not None and rec.error.type == WORKER_LOST_ERROR:
        return TaskState.LOST
    return _STATES.get(rec.state, TaskState.UNSPECIFIED)


def state_name(rec: TaskRecord) -> str:
    """The TaskState callers see for a record, by its proto name (e.g.
    "TASK_STATE_SUCCEEDED"), for messages: a caller never sees Celery's
    state names."""
    return f"TASK_STATE_{task_state(rec)}"


RECORD_STATES: dict[TaskState, str] = {
    TaskState.QUEUED: "PENDING",
    TaskState.RUNNING: "STARTED",
    TaskState.SUCCEEDED: "SUCCESS",
    TaskState.FAILED: "FAILURE",
    TaskState.CANCELLED: "REVOKED",
    TaskState.LOST: "LOST",
}
"""The record state of each TaskState a caller may ask for (ListTasks)."""


STATE_LABELS: dict[str, str] = {state: value.name.lower() for state, value in _STATES.items()}
"""Each record state as its TaskState in lower case (SUCCESS: "succeeded"):
the `state` label of the metrics (taskservice.core.metrics)."""
