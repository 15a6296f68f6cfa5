"""A typed Python client of taskservice.v1.TaskService, sync and asyncio.

    from taskservice.client import Client

    with Client("127.0.0.1:50051") as client:
        task = client.start("demo.dummy", kwargs={"seconds": 1})
        for change in client.watch(task.id):
            print(change.state, change.progress)

`AsyncClient` has the same methods, awaitable (`watch` and `list_tasks` are
async iterators). A failed call raises a `TaskServiceError` subclass carrying
the gRPC code, the ErrorInfo reason and metadata (`task_id` where the error
is about a task), and BadRequest's field violations.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc

TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "LOST"})
CANCEL_MODES = ("GRACEFUL", "TERMINATE", "KILL")


# -- Errors -------------------------------------------------------------------


class TaskServiceError(Exception):
    """A call failed. `code` is the gRPC status code, `reason` the ErrorInfo
    reason (e.g. "TASK_ALREADY_RUNNING"), `metadata` its metadata."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations)

    @property
    def task_id(self) -> str:
        """The task the error is about ("" if none): for ALREADY_EXISTS, the
        task that holds the exclusivity key."""
        return self.metadata.get("task_id", "")

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(TaskServiceError):
    """INVALID_ARGUMENT: fix the request; `violations` names each field."""


class NotFound(TaskServiceError):
    """NOT_FOUND: no such task (never started here, or its record expired)."""


class AlreadyRunning(TaskServiceError):
    """ALREADY_EXISTS: a task holds the exclusivity key; `task_id` is it."""


class FailedPrecondition(TaskServiceError):
    """FAILED_PRECONDITION: not possible in the task's state (e.g. cancelling
    a finished task), or the deployment is misconfigured."""


class Unavailable(TaskServiceError):
    """UNAVAILABLE or RESOURCE_EXHAUSTED: retry with backoff (a Start that
    failed this way left nothing running)."""


class AccessDenied(TaskServiceError):
    """UNAUTHENTICATED or PERMISSION_DENIED: check the token."""


_ERRORS: dict[grpc.StatusCode, type[TaskServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyRunning,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: AccessDenied,
    grpc.StatusCode.PERMISSION_DENIED: AccessDenied,
}


def error_from(rpc_error: grpc.RpcError) -> TaskServiceError:
    """The typed error of a failed call, with its rich status details."""
    call: Any = rpc_error  # a grpc.Call (sync) or grpc.aio.AioRpcError
    code: grpc.StatusCode = call.code()
    message: str = call.details() or code.name
    reason, metadata, violations = "", {}, []
    for key, value in call.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(bad):
                violations = [(v.field, v.description) for v in bad.field_violations]
    kind = _ERRORS.get(code, TaskServiceError)
    return kind(code, message, reason=reason, metadata=metadata, violations=violations)


# -- What calls return ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskError:
    """Why a task failed: the exception's type, message and traceback."""

    type: str
    message: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class Progress:
    current: float
    total: float
    message: str


@dataclass(frozen=True, slots=True)
class Task:
    """A task as the server last reported it. `state` is the TaskState name
    without its prefix: QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, LOST."""

    id: str
    task_name: str
    state: str
    sequence: int
    result: Any = None
    error: TaskError | None = None
    progress: Progress | None = None
    exclusivity_key: str = ""
    worker: str = ""
    queue: str = ""
    cancel_mode: str = ""
    create_time: datetime.datetime | None = None
    start_time: datetime.datetime | None = None
    end_time: datetime.datetime | None = None
    scheduled_time: datetime.datetime | None = None
    already_existed: bool = False
    """True when Start returned a task already running under the key."""
    message: pb.Task = field(default_factory=pb.Task, repr=False, compare=False)
    """The message as received."""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_message(cls, message: pb.Task, *, already_existed: bool = False) -> Task:
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
            state=pb.TaskState.Name(message.state).removeprefix("TASK_STATE_"),
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
                pb.CancelMode.Name(message.cancel_mode).removeprefix("CANCEL_MODE_")
                if message.cancel_mode
                else ""
            ),
            create_time=when("create_time"),
            start_time=when("start_time"),
            end_time=when("end_time"),
            scheduled_time=when("scheduled_time"),
            already_existed=already_existed,
            message=message,
        )


@dataclass(frozen=True, slots=True)
class Parameter:
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


# -- Requests (shared by both clients) -----------------------------------------


def start_request(
    task_name: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    *,
    key: str,
    return_existing: bool,
    countdown: float | None,
    queue: str,
    time_limit: float | None,
    soft_time_limit: float | None,
    request_id: str,
) -> pb.StartRequest:
    request = pb.StartRequest(
        task_name=task_name,
        exclusivity_key=key,
        conflict_policy=(
            pb.CONFLICT_POLICY_RETURN_EXISTING if return_existing else pb.CONFLICT_POLICY_REJECT
        ),
        request_id=request_id,
    )
    request.args.CopyFrom(to_value(list(args)).list_value)
    request.kwargs.CopyFrom(to_value(dict(kwargs or {})).struct_value)
    options = request.options
    options.queue = queue
    for name, seconds in (
        ("countdown", countdown),
        ("time_limit", time_limit),
        ("soft_time_limit", soft_time_limit),
    ):
        if seconds is not None:
            getattr(options, name).FromNanoseconds(round(seconds * 1e9))
    return request


def cancel_request(task_id: str, mode: str, request_id: str) -> pb.CancelRequest:
    if mode.upper() not in CANCEL_MODES:
        raise ValueError(f"cancel mode {mode!r} is none of {', '.join(CANCEL_MODES)}")
    return pb.CancelRequest(
        task_id=task_id,
        mode=pb.CancelMode.Value("CANCEL_MODE_" + mode.upper()),
        request_id=request_id,
    )


def list_request(
    states: Sequence[str], task_name: str, key: str, page_size: int, page_token: str
) -> pb.ListTasksRequest:
    try:
        numbers = [pb.TaskState.Value("TASK_STATE_" + s.upper()) for s in states]
    except ValueError:
        raise ValueError(
            f"unknown state in {list(states)}; states are QUEUED, RUNNING, SUCCEEDED, "
            "FAILED, CANCELLED, LOST"
        ) from None
    return pb.ListTasksRequest(
        states=numbers,
        task_name=task_name,
        exclusivity_key=key,
        page_size=page_size,
        page_token=page_token,
    )


def select(task_id: str, key: str) -> dict[str, str]:
    if bool(task_id) == bool(key):
        raise ValueError("give a task id or an exclusivity key (one of them)")
    return {"task_id": task_id} if task_id else {"exclusivity_key": key}


def _credentials_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def default_target() -> str:
    """TASKSERVICE_ADDRESS, else 127.0.0.1 and TASKSERVICE_PORT (50051)."""
    return os.environ.get("TASKSERVICE_ADDRESS") or (
        f"127.0.0.1:{os.environ.get('TASKSERVICE_PORT') or 50051}"
    )


def channel_credentials(
    ca_file: str = "", cert_file: str = "", key_file: str = ""
) -> grpc.ChannelCredentials:
    """TLS credentials: the server's CA (system roots if none) and, for
    mutual TLS, this client's certificate and key."""

    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as file:
            return file.read()

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


# -- The clients -----------------------------------------------------------------


class Client:
    """A blocking client. Give a target ("host:port") or a channel."""

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        if channel is None:
            target = target or default_target()
            channel = (
                grpc.secure_channel(target, credentials)
                if credentials is not None
                else grpc.insecure_channel(target)
            )
        self._channel = channel
        self._stub = pb_grpc.TaskServiceStub(channel)
        self._metadata = _credentials_metadata(token)
        self._timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, *, timeout: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout or self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from(error) from None

    def start(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        key: str = "",
        return_existing: bool = False,
        countdown: float | None = None,
        queue: str = "",
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        request_id: str = "",
    ) -> Task:
        """Start a task; AlreadyRunning (with `task_id`) if one holds the key,
        unless `return_existing`."""
        request = start_request(
            task_name,
            args,
            kwargs,
            key=key,
            return_existing=return_existing,
            countdown=countdown,
            queue=queue,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            request_id=request_id,
        )
        response = self._call(self._stub.Start, request)
        return Task.from_message(response.task, already_existed=response.already_existed)

    def get(self, task_id: str = "", *, key: str = "") -> Task:
        """A task by id, or the current (else latest) task under `key`."""
        response = self._call(self._stub.GetStatus, pb.GetStatusRequest(**select(task_id, key)))
        return Task.from_message(response.task)

    def cancel(self, task_id: str, mode: str = "KILL", *, request_id: str = "") -> Task:
        """Cancel a task (GRACEFUL, TERMINATE or KILL)."""
        response = self._call(self._stub.Cancel, cancel_request(task_id, mode, request_id))
        return Task.from_message(response.task)

    def watch(self, task_id: str = "", *, key: str = "", after_sequence: int = 0) -> Iterator[Task]:
        """The task now, then each change, ending with its terminal state."""
        request = pb.WatchStatusRequest(**select(task_id, key), after_sequence=after_sequence)
        stream = self._stub.WatchStatus(request, metadata=self._metadata)
        try:
            for response in stream:
                yield Task.from_message(response.task)
        except grpc.RpcError as error:
            raise error_from(error) from None
        finally:
            stream.cancel()

    def list_tasks(
        self,
        *,
        states: Sequence[str] = (),
        task_name: str = "",
        key: str = "",
        page_size: int = 0,
    ) -> Iterator[Task]:
        """Tasks newest first, following the pages to the end."""
        token = ""
        while True:
            request = list_request(states, task_name, key, page_size, token)
            response = self._call(self._stub.ListTasks, request)
            for message in response.tasks:
                yield Task.from_message(message)
            token = response.next_page_token
            if not token:
                return

    def task_types(self) -> list[TaskType]:
        response = self._call(self._stub.ListTaskTypes, pb.ListTaskTypesRequest())
        return [TaskType.from_message(t) for t in response.task_types]

    def healthy(self) -> bool:
        """True if the server reports SERVING."""
        stub: Any = health_pb2_grpc.HealthStub(self._channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


class AsyncClient:
    """An asyncio client (grpc.aio) with Client's methods, awaitable."""

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        if channel is None:
            target = target or default_target()
            channel = (
                grpc.aio.secure_channel(target, credentials)
                if credentials is not None
                else grpc.aio.insecure_channel(target)
            )
        self._channel = channel
        self._stub = pb_grpc.TaskServiceStub(channel)
        self._metadata = _credentials_metadata(token)
        self._timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from(error) from None

    async def start(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        key: str = "",
        return_existing: bool = False,
        countdown: float | None = None,
        queue: str = "",
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        request_id: str = "",
    ) -> Task:
        request = start_request(
            task_name,
            args,
            kwargs,
            key=key,
            return_existing=return_existing,
            countdown=countdown,
            queue=queue,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            request_id=request_id,
        )
        response = await self._call(self._stub.Start, request)
        return Task.from_message(response.task, already_existed=response.already_existed)

    async def get(self, task_id: str = "", *, key: str = "") -> Task:
        request = pb.GetStatusRequest(**select(task_id, key))
        return Task.from_message((await self._call(self._stub.GetStatus, request)).task)

    async def cancel(self, task_id: str, mode: str = "KILL", *, request_id: str = "") -> Task:
        request = cancel_request(task_id, mode, request_id)
        return Task.from_message((await self._call(self._stub.Cancel, request)).task)

    async def watch(
        self, task_id: str = "", *, key: str = "", after_sequence: int = 0
    ) -> AsyncIterator[Task]:
        request = pb.WatchStatusRequest(**select(task_id, key), after_sequence=after_sequence)
        stream = self._stub.WatchStatus(request, metadata=self._metadata)
        try:
            async for response in stream:
                yield Task.from_message(response.task)
        except grpc.RpcError as error:
            raise error_from(error) from None
        finally:
            stream.cancel()

    async def list_tasks(
        self,
        *,
        states: Sequence[str] = (),
        task_name: str = "",
        key: str = "",
        page_size: int = 0,
    ) -> AsyncIterator[Task]:
        token = ""
        while True:
            request = list_request(states, task_name, key, page_size, token)
            response = await self._call(self._stub.ListTasks, request)
            for message in response.tasks:
                yield Task.from_message(message)
            token = response.next_page_token
            if not token:
                return

    async def task_types(self) -> list[TaskType]:
        response = await self._call(self._stub.ListTaskTypes, pb.ListTaskTypesRequest())
        return [TaskType.from_message(t) for t in response.task_types]

    async def healthy(self) -> bool:
        stub: Any = health_pb2_grpc.HealthStub(self._channel)
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
