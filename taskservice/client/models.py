"""What the client's calls return: tasks, task types and what CancelTasks did
as frozen dataclasses, and google.protobuf.Value <-> Python."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice.core.record import Progress
from taskservice.core.states import CancelMode, TaskState


@dataclass(frozen=True, slots=True)
class TaskError:
    """Why a task failed: the exception's type, message and traceback."""

    type: str
    message: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class Task:
    """A task as the server last reported it. `state` is a TaskState (a str
    enum: QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, LOST; UNSPECIFIED for
    a state this client does not know)."""

    id: str
    task_name: str
    state: TaskState
    sequence: int
    result: Any = None
    error: TaskError | None = None
    progress: Progress | None = None
    exclusivity_key: str = ""
    worker: str = ""
    queue: str = ""
    cancel_mode: CancelMode | None = None
    """How a Cancel asked the task to stop; None if nobody cancelled it."""
    create_time: datetime.datetime | None = None
    start_time: datetime.datetime | None = None
    end_time: datetime.datetime | None = None
    scheduled_time: datetime.datetime | None = None
    already_existed: bool = False
    """True when Start returned a task already running under the key."""
    fencing_token: int = 0
    """Larger than the token of every task started under its exclusivity key
    before it (the task's body has it as `self.fencing_token`); 0 without a key
    and while the task waits for its key."""
    waiting_for: str = ""
    """While the task waits for its exclusivity key (ConflictPolicy REPLACE,
    QUEUE_LATEST, QUEUE): the id of the task it waits to end; "" once it holds
    the key, and for every other task."""
    message: pb.Task = field(default_factory=pb.Task, repr=False, compare=False)
    """The message as received."""

    @property
    def terminal(self) -> bool:
        """True once the task has ended: it will not change again."""
        return self.state.terminal

    @property
    def waiting(self) -> bool:
        """True while the task waits for its exclusivity key (`waiting_for`)."""
        return bool(self.waiting_for)

    @classmethod
    def from_message(cls, message: pb.Task, *, already_existed: bool = False) -> Task:
        """The task a taskservice.v1.Task message describes."""

        def when(name: str) -> datetime.datetime | None:
            if not message.HasField(name):  # type: ignore[arg-type]
                return None
            stamp = getattr(message, name)
            return stamp.ToDatetime(tzinfo=datetime.UTC)  # type: ignore[no-any-return]

        outcome = message.WhichOneof("outcome")
        error = message.error if outcome == "error" else None
        progress = message.progress if message.HasField("progress") else None
        return cls(
            id=message.id,
            task_name=message.task_name,
            state=_enum(TaskState, pb.TaskState, message.state, "TASK_STATE_"),
            sequence=message.sequence,
            result=from_value(message.result) if outcome == "result" else None,
            error=TaskError(error.type, error.message, error.traceback) if error else None,
            progress=(
                Progress(progress.current, progress.total, progress.message) if progress else None
            ),
            exclusivity_key=message.exclusivity_key,
            worker=message.worker,
            queue=message.queue,
            cancel_mode=(
                _enum(CancelMode, pb.CancelMode, message.cancel_mode, "CANCEL_MODE_")
                if message.cancel_mode
                else None
            ),
            create_time=when("create_time"),
            start_time=when("start_time"),
            end_time=when("end_time"),
            scheduled_time=when("scheduled_time"),
            already_existed=already_existed,
            fencing_token=message.fencing_token,
            waiting_for=message.waiting_for,
            message=message,
        )


@dataclass(frozen=True, slots=True)
class CancelledTasks:
    """What CancelTasks did: `ended` tasks it ended CANCELLED (queued ones),
    `requested` running ones it asked to stop (each ends CANCELLED once its
    worker stops it), the ids of both, newest first, and the token that
    continues with the tasks it did not reach ("" when none are left)."""

    ended: int
    requested: int
    task_ids: list[str]
    next_page_token: str = ""

    @property
    def done(self) -> bool:
        """True when no matching task is left beyond these."""
        return not self.next_page_token

    @classmethod
    def from_message(cls, message: pb.CancelTasksResponse) -> CancelledTasks:
        """What a taskservice.v1.CancelTasksResponse says."""
        return cls(
            ended=message.ended_count,
            requested=message.requested_count,
            task_ids=list(message.task_ids),
            next_page_token=message.next_page_token,
        )

    def then(self, later: CancelledTasks) -> CancelledTasks:
        """This call's counts and ids followed by a later call's, with the
        later call's token."""
        return CancelledTasks(
            ended=self.ended + later.ended,
            requested=self.requested + later.requested,
            task_ids=self.task_ids + later.task_ids,
            next_page_token=later.next_page_token,
        )


@dataclass(frozen=True, slots=True)
class Parameter:
    """One parameter of a task type: `kind` is the ParameterKind name without
    its prefix (e.g. POSITIONAL_OR_KEYWORD), `annotation` as written."""

    name: str
    kind: str
    required: bool
    default: Any
    annotation: str


@dataclass(frozen=True, slots=True)
class TaskType:
    """A task type Start accepts, with how its exclusivity keys behave."""

    name: str
    description: str
    default_exclusivity_key: str
    parameters: list[Parameter]
    key_slots: int = 0
    """How many of its tasks may run at once under one key; 0: the server's
    TASKSERVICE_KEY_SLOTS for the key (1 unless set)."""
    key_line_limit: int = 0
    """The longest line of tasks waiting for a key (ConflictPolicy.QUEUE); 0:
    the server's TASKSERVICE_KEY_LINE_LIMIT."""
    quiet_period: float | None = None
    """Seconds a key refuses Starts (KeyQuiet) after a task of this type
    ended under it; None: no quiet period."""
    quiet_after_success: bool = False
    """The quiet period follows only a SUCCEEDED task."""
    replace_mode: CancelMode | None = None
    """How ConflictPolicy.REPLACE cancels a running task of this type when the
    Start names no replace_mode (TERMINATE unless the type says); None from a
    server older than this field."""
    message: pb.TaskType = field(default_factory=pb.TaskType, repr=False, compare=False)
    """The message as received."""

    @classmethod
    def from_message(cls, message: pb.TaskType) -> TaskType:
        """The task type a taskservice.v1.TaskType message describes."""
        return cls(
            name=message.name,
            description=message.description,
            default_exclusivity_key=message.default_exclusivity_key,
            parameters=[
                Parameter(
                    name=p.name,
                    kind=pb.ParameterKind.Name(p.kind).removeprefix("PARAMETER_KIND_"),
                    required=p.required,
                    default=from_value(p.default_value) if p.HasField("default_value") else None,
                    annotation=p.annotation,
                )
                for p in message.parameters
            ],
            key_slots=message.key_slots,
            key_line_limit=message.key_line_limit,
            quiet_period=(
                message.quiet_period.ToNanoseconds() / 1e9
                if message.HasField("quiet_period")
                else None
            ),
            quiet_after_success=message.quiet_after_success,
            replace_mode=(
                _enum(CancelMode, pb.CancelMode, message.replace_mode, "CANCEL_MODE_")
                if message.replace_mode
                else None
            ),
            message=message,
        )


def to_value(data: Any) -> struct_pb2.Value:
    """A JSON-like Python value as google.protobuf.Value."""
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def from_value(value: struct_pb2.Value) -> Any:
    """google.protobuf.Value as Python; whole numbers come back as int."""
    return _ints(json_format.MessageToDict(value))


def _ints(data: Any) -> Any:
    if isinstance(data, float) and data.is_integer() and abs(data) <= 2**53:
        return int(data)
    if isinstance(data, list):
        return [_ints(item) for item in data]
    if isinstance(data, dict):
        return {key: _ints(item) for key, item in data.items()}
    return data


E = TypeVar("E", TaskState, CancelMode)


def _enum(domain: type[E], proto: Any, number: int, prefix: str) -> E:
    """The domain enum of a proto enum number; UNSPECIFIED for a number this
    client's protos do not know (a newer server's)."""
    try:
        return domain(proto.Name(number).removeprefix(prefix))
    except ValueError:
        return domain("UNSPECIFIED")
