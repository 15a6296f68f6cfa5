"""What the client's calls return: tasks and task types as frozen dataclasses,
and google.protobuf.Value <-> Python."""

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
    before it (the task's body has it as `self.fencing_token`); 0 without a key."""
    message: pb.Task = field(default_factory=pb.Task, repr=False, compare=False)
    """The message as received."""

    @property
    def terminal(self) -> bool:
        """True once the task has ended: it will not change again."""
        return self.state.terminal

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
            message=message,
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
    """A task type Start accepts."""

    name: str
    description: str
    default_exclusivity_key: str
    parameters: list[Parameter]

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
