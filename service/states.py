"""The one map: Celery state (as kept in a task's record) -> taskservice.v1.TaskState.

| Celery state           | TaskState   | note                                        |
|------------------------|-------------|---------------------------------------------|
| PENDING (and RECEIVED) | QUEUED      | our record: Celery says PENDING for any id  |
| STARTED (and PROGRESS) | RUNNING     | progress is a field, not a state            |
| SUCCESS                | SUCCEEDED   |                                             |
| FAILURE                | FAILED      | LOST if the error is WorkerLostError        |
| REVOKED                | CANCELLED   |                                             |
| LOST (ours, not Celery)| LOST        | its worker died or stopped heartbeating     |
"""

from __future__ import annotations

from service._proto.taskservice.v1 import task_service_pb2 as pb
from worker.record import WORKER_LOST_ERROR, TaskRecord

_STATES: dict[str, pb.TaskState.ValueType] = {
    "PENDING": pb.TASK_STATE_QUEUED,
    "RECEIVED": pb.TASK_STATE_QUEUED,
    "RETRY": pb.TASK_STATE_QUEUED,
    "STARTED": pb.TASK_STATE_RUNNING,
    "PROGRESS": pb.TASK_STATE_RUNNING,
    "SUCCESS": pb.TASK_STATE_SUCCEEDED,
    "FAILURE": pb.TASK_STATE_FAILED,
    "REVOKED": pb.TASK_STATE_CANCELLED,
    "LOST": pb.TASK_STATE_LOST,
}


def task_state(rec: TaskRecord) -> pb.TaskState.ValueType:
    """The TaskState callers see for a record."""
    # Records written before LOST was a state of its own say it this way.
    if rec.state == "FAILURE" and rec.error is not None and rec.error.type == WORKER_LOST_ERROR:
        return pb.TASK_STATE_LOST
    return _STATES.get(rec.state, pb.TASK_STATE_UNSPECIFIED)


def state_name(rec: TaskRecord) -> str:
    """The TaskState callers see for a record, by name (e.g. "TASK_STATE_SUCCEEDED"),
    for messages: a caller never sees Celery's state names."""
    return pb.TaskState.Name(task_state(rec))


CANCEL_MODES: dict[pb.CancelMode.ValueType, str] = {
    pb.CANCEL_MODE_UNSPECIFIED: "KILL",
    pb.CANCEL_MODE_GRACEFUL: "GRACEFUL",
    pb.CANCEL_MODE_TERMINATE: "TERMINATE",
    pb.CANCEL_MODE_KILL: "KILL",
}
"""Cancel modes as recorded; UNSPECIFIED means KILL (the seed's behaviour)."""

RECORDED_CANCEL_MODES: dict[str, pb.CancelMode.ValueType] = {
    "GRACEFUL": pb.CANCEL_MODE_GRACEFUL,
    "TERMINATE": pb.CANCEL_MODE_TERMINATE,
    "KILL": pb.CANCEL_MODE_KILL,
}


RECORD_STATES: dict[pb.TaskState.ValueType, str] = {
    pb.TASK_STATE_QUEUED: "PENDING",
    pb.TASK_STATE_RUNNING: "STARTED",
    pb.TASK_STATE_SUCCEEDED: "SUCCESS",
    pb.TASK_STATE_FAILED: "FAILURE",
    pb.TASK_STATE_CANCELLED: "REVOKED",
    pb.TASK_STATE_LOST: "LOST",
}
"""The record state of each TaskState a caller may ask for (ListTasks)."""


STATE_LABELS: dict[str, str] = {
    state: pb.TaskState.Name(value).removeprefix("TASK_STATE_").lower()
    for state, value in _STATES.items()
}
"""Each record state as its TaskState in lower case (SUCCESS: "succeeded"):
the `state` label of the metrics (service.metrics)."""
