"""TaskService handlers: translate proto <-> domain, nothing more.

Handlers answering with a task return its serialized response (taskservice.server.guard
sends bytes as they are), so each change is encoded once however many
callers receive it.

Errors are raised as they are; taskservice.server.guard, which every call goes through,
turns each into its gRPC status (taskservice.server.status.to_status)."""

from __future__ import annotations

import collections
import inspect
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.core import errors
from taskservice.core.record import TaskRecord, unrepresentable
from taskservice.core.registry import TaskType, annotation_text
from taskservice.core.states import RECORD_STATES, CancelMode, ConflictPolicy, TaskState, task_state
from taskservice.server.operations import Operations
from taskservice.server.reads import TaskFilter
from taskservice.server.starts import StartCommand

# Doubles carry integers exactly up to 2**53; beyond that a whole-looking
# number is left a float rather than pretending to precision it lost.
_MAX_EXACT_INT = 2.0**53

_PARAMETER_KINDS: dict[Any, pb.ParameterKind.ValueType] = {
    inspect.Parameter.POSITIONAL_ONLY: pb.PARAMETER_KIND_POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: pb.PARAMETER_KIND_POSITIONAL_OR_KEYWORD,
    inspect.Parameter.VAR_POSITIONAL: pb.PARAMETER_KIND_VAR_POSITIONAL,
    inspect.Parameter.KEYWORD_ONLY: pb.PARAMETER_KIND_KEYWORD_ONLY,
    inspect.Parameter.VAR_KEYWORD: pb.PARAMETER_KIND_VAR_KEYWORD,
}


ANSWERS_KEPT = 4096
"""Serialized answers the servicer keeps (the latest changes of busy tasks)."""


class TaskServiceServicer(pb_grpc.TaskServiceServicer):
    """The taskservice.v1.TaskService handlers."""

    def __init__(
        self, operations: Operations, *, tracebacks: bool = True, max_response_bytes: int = 4 << 20
    ) -> None:
        self._ops = operations
        self._tracebacks = tracebacks
        self._max_response_bytes = max_response_bytes
        # Serialized answers by (task id, sequence): a change watched by a
        # thousand streams is encoded once, not a thousand times. Each keeps
        # its record: a Redis that lost writes (a failover) may number another
        # record alike, which must not be answered with the old one.
        self._answers: collections.OrderedDict[tuple[str, int], tuple[TaskRecord, bytes]] = (
            collections.OrderedDict()
        )

    async def Start(  # type: ignore[override]  # answers serialized bytes
        self, request: pb.StartRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """Start (see the proto)."""
        policy = _CONFLICT_POLICIES_IN.get(request.conflict_policy)
        if policy is None:
            raise errors.InvalidArgument.of(
                "conflict_policy", f"unknown conflict_policy {request.conflict_policy}"
            )
        replace_mode = _CANCEL_MODES_IN.get(request.replace_mode)
        if replace_mode is None:
            raise errors.InvalidArgument.of(
                "replace_mode", f"unknown replace_mode {request.replace_mode}"
            )
        options = request.options
        started = await self._ops.starts.start(
            StartCommand(
                task_name=request.task_name,
                args=[_from_value(v, f"args[{i}]") for i, v in enumerate(request.args.values)],
                kwargs={
                    k: _from_value(v, f"kwargs.{errors.cut(k, 60)}")
                    for k, v in request.kwargs.fields.items()
                },
                args_size=request.args.ByteSize() + request.kwargs.ByteSize(),
                exclusivity_key=request.exclusivity_key,
                conflict_policy=policy,
                countdown=_seconds(options, "countdown"),
                start_time=_epoch(options),
                queue=options.queue,
                time_limit=_seconds(options, "time_limit"),
                soft_time_limit=_seconds(options, "soft_time_limit"),
                time_remaining=context.time_remaining(),
                request_id=request.request_id,
                replace_mode=replace_mode,
            )
        )
        answer = self._answer(started.record)
        # StartResponse.already_existed is field 2, a bool.
        return answer + b"\x10\x01" if started.already_existed else answer

    async def GetStatus(  # type: ignore[override]  # answers serialized bytes
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """GetStatus (see the proto)."""
        task_id = await self._select(request)
        return self._answer(await self._ops.reads.get(task_id))

    async def Cancel(  # type: ignore[override]  # answers serialized bytes
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """Cancel (see the proto)."""
        mode = _CANCEL_MODES_IN.get(request.mode)
        if mode is None:
            raise errors.InvalidArgument.of("mode", f"unknown cancel mode {request.mode}")
        return self._answer(
            await self._ops.cancels.cancel(request.task_id, mode, request_id=request.request_id)
        )

    async def WatchStatus(  # type: ignore[override]  # answers serialized bytes
        self, request: pb.WatchStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """WatchStatus (see the proto)."""
        task_id = await self._select(request)
        async for rec in self._ops.watches.watch(task_id, request.after_sequence):
            yield self._answer(rec)

    async def ListTaskTypes(
        self, request: pb.ListTaskTypesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTaskTypesResponse:
        """ListTaskTypes (see the proto)."""
        return pb.ListTaskTypesResponse(
            task_types=[task_type_message(t) for t in self._ops.records.registry.types()]
        )

    async def ListTasks(
        self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListTasksResponse:
        """ListTasks (see the proto)."""
        wanted = _task_filter(request)
        # A listing leaves tracebacks out (GetStatus has them): a page is
        # for finding tasks, and stays small.
        messages: dict[str, pb.Task] = {}

        def size_of(rec: TaskRecord) -> int:
            message = messages[rec.id] = task_message(rec, traceback=False)
            return message.ByteSize() + 8

        page = await self._ops.reads.list_tasks(
            wanted,
            page_size=request.page_size,
            page_token=request.page_token,
            size_of=size_of,
            max_bytes=self._max_response_bytes - 1024,
        )
        return pb.ListTasksResponse(
            tasks=[messages[rec.id] for rec in page.tasks], next_page_token=page.next_token
        )

    async def CancelTasks(
        self, request: pb.CancelTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CancelTasksResponse:
        """CancelTasks (see the proto)."""
        mode = _CANCEL_MODES_IN.get(request.mode)
        if mode is None:
            raise errors.InvalidArgument.of("mode", f"unknown cancel mode {request.mode}")
        page = await self._ops.cancels.cancel_many(
            _task_filter(request),
            mode,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.CancelTasksResponse(
            ended_count=len(page.ended),
            requested_count=len(page.requested),
            task_ids=page.task_ids,
            next_page_token=page.next_token,
        )

    def _answer(self, rec: TaskRecord) -> bytes:
        """A response whose field 1 is the task: the encoding GetStatusResponse,
        WatchStatusResponse, CancelResponse and StartResponse share."""
        key = (rec.id, rec.sequence)
        kept = self._answers.get(key)
        # Decoded records are shared by payload (TaskRecord.from_json): the
        # same change is the same object, and `is` settles it.
        if kept is not None and (kept[0] is rec or kept[0].fields == rec.fields):
            return kept[1]
        task = task_message(rec, traceback=self._tracebacks)
        answer = bytes(pb.GetStatusResponse(task=task).SerializeToString())
        self._answers[key] = (rec, answer)
        if len(self._answers) > ANSWERS_KEPT:
            self._answers.popitem(last=False)
        return answer

    async def _select(self, request: pb.GetStatusRequest | pb.WatchStatusRequest) -> str:
        which = request.WhichOneof("selector")
        if which == "task_id":
            return request.task_id
        if which == "exclusivity_key":
            return await self._ops.reads.resolve_key(request.exclusivity_key)
        raise errors.InvalidArgument.of("selector", "give task_id or exclusivity_key")


# The proto enums by the domain's (same names, same numbers): resolved by name
# here, so a proto enum and its Python twin that drift apart fail at import.
_TASK_STATES = {s: pb.TaskState.Value(f"TASK_STATE_{s}") for s in TaskState}
_TASK_STATES_IN = {number: state for state, number in _TASK_STATES.items()}
_CANCEL_MODES = {m: pb.CancelMode.Value(f"CANCEL_MODE_{m}") for m in CancelMode}
_CANCEL_MODES_IN = {number: mode for mode, number in _CANCEL_MODES.items()}
_RECORDED_CANCEL_MODES = {
    mode.recorded: number for mode, number in _CANCEL_MODES.items() if mode != "UNSPECIFIED"
}
_CONFLICT_POLICIES_IN = {pb.ConflictPolicy.Value(f"CONFLICT_POLICY_{p}"): p for p in ConflictPolicy}


def _task_filter(request: pb.ListTasksRequest | pb.CancelTasksRequest) -> TaskFilter:
    """The filters of a ListTasks or CancelTasks request, in record states."""
    states = set()
    for state in request.states:
        record_state = RECORD_STATES.get(_TASK_STATES_IN.get(state, TaskState.UNSPECIFIED))
        if record_state is None:
            raise errors.InvalidArgument(
                f"states: {state} is not a state a task can be in",
                violations=[("states", f"unknown or unspecified state {state}")],
            )
        states.add(record_state)
    return TaskFilter(frozenset(states), request.task_name, request.exclusivity_key)


def task_message(rec: TaskRecord, *, traceback: bool = True) -> pb.Task:
    """The proto Task for a record (without the error's traceback if not
    `traceback`)."""
    task = pb.Task(
        id=rec.id,
        task_name=rec.name,
        state=_TASK_STATES[task_state(rec)],
        worker=rec.worker,
        exclusivity_key=rec.exclusivity_key,
        sequence=rec.sequence,
        cancel_mode=_RECORDED_CANCEL_MODES.get(rec.cancel, pb.CANCEL_MODE_UNSPECIFIED),
        queue=rec.queue,
        fencing_token=rec.fencing_token,
        waiting_for=rec.waiting_for,
    )
    for field, when in (
        (task.create_time, rec.created),
        (task.start_time, rec.started),
        (task.end_time, rec.finished),
        (task.scheduled_time, rec.scheduled),
    ):
        if when is not None:
            _set_time(field, when)
    if rec.has_result:
        # A current worker refuses results no client could decode; one
        # stored otherwise is reported, rather than failing every read.
        problem = unrepresentable(rec.result)
        if not problem:
            try:
                task.result.CopyFrom(_to_value(rec.result))
            except (json_format.ParseError, ValueError, TypeError, OverflowError) as error:
                problem = str(error)[:200]
        if problem:
            task.error.type = "ResultNotRepresentable"
            task.error.message = f"the stored result cannot be sent: {problem}"
    elif rec.error is not None:
        task.error.type = rec.error.type
        task.error.message = rec.error.message
        task.error.traceback = rec.error.traceback if traceback else ""
    if rec.progress is not None:
        task.progress.current = rec.progress.current
        task.progress.total = rec.progress.total
        task.progress.message = rec.progress.message
    return task


def task_type_message(task_type: TaskType) -> pb.TaskType:
    """The proto TaskType of a task type."""
    message = pb.TaskType(
        name=task_type.name,
        description=task_type.description,
        default_exclusivity_key=task_type.default_exclusivity_key,
        key_slots=task_type.key_rules.slots,
        key_line_limit=task_type.key_rules.line_limit,
        quiet_after_success=task_type.key_rules.quiet_after_success,
        replace_mode=_CANCEL_MODES[task_type.key_rules.replace_mode],
    )
    if task_type.key_rules.quiet_period:
        message.quiet_period.FromNanoseconds(round(task_type.key_rules.quiet_period * 1e9))
    for param in task_type.signature.parameters.values():
        entry = message.parameters.add(
            name=param.name,
            kind=_PARAMETER_KINDS[param.kind],
            required=param.default is inspect.Parameter.empty
            and param.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD),
            annotation=annotation_text(param.annotation),
        )
        if param.default is not inspect.Parameter.empty:
            try:
                entry.default_value.CopyFrom(_to_value(param.default))
            except (TypeError, ValueError, json_format.ParseError):
                entry.ClearField("default_value")  # not expressible in JSON
    return message


def _set_time(field: timestamp_pb2.Timestamp, epoch: float) -> None:
    seconds = math.floor(epoch)
    field.seconds = seconds
    field.nanos = int((epoch - seconds) * 1e9)


def _seconds(options: pb.StartOptions, name: str) -> float | None:
    if not options.HasField(name):  # type: ignore[arg-type]
        return None
    duration: duration_pb2.Duration = getattr(options, name)
    if not -315_576_000_000 <= duration.seconds <= 315_576_000_000 or abs(duration.nanos) >= 10**9:
        message = f"options.{name} is not a valid Duration"
        raise errors.InvalidArgument.of(f"options.{name}", message)
    return float(duration.seconds) + duration.nanos / 1e9


def _epoch(options: pb.StartOptions) -> float | None:
    if not options.HasField("start_time"):
        return None
    when = options.start_time
    # Timestamp's own range (years 1 to 9999), as the JSON mapping allows.
    if not -62_135_596_800 <= when.seconds <= 253_402_300_799 or not 0 <= when.nanos < 10**9:
        raise errors.InvalidArgument.of(
            "options.start_time", "options.start_time is not a valid Timestamp"
        )
    return float(when.seconds) + when.nanos / 1e9


def _from_value(value: struct_pb2.Value, where: str) -> Any:
    """A Value as plain Python; whole numbers become int (JSON has one number
    type, but Python task code tells 3 from 3.0). `where` names it in errors."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if number.is_integer() and abs(number) <= _MAX_EXACT_INT:
            return int(number)
        if not math.isfinite(number):
            raise _invalid(where, "numbers must be finite (JSON has no NaN or Infinity)")
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        fields = value.struct_value.fields
        return {k: _from_value(v, f"{where}.{errors.cut(k, 60)}") for k, v in fields.items()}
    if kind == "list_value":
        return [_from_value(v, f"{where}[{i}]") for i, v in enumerate(value.list_value.values)]
    if kind == "null_value":
        return None
    # A Value with nothing set: protobufjs, for one, drops a snake_case
    # `string_value` it does not know; taking it as null would hide that.
    raise _invalid(where, "a google.protobuf.Value with no kind set (use null_value for null)")


def _invalid(where: str, why: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"{where}: {why}", violations=[(where, why)])


def _to_value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value
