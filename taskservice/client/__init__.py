"""A typed Python client of taskservice.v1.TaskService, blocking and asyncio.

    from taskservice import Client

    with Client("127.0.0.1:50051") as client:
        task = client.start("demo.dummy", kwargs={"seconds": 1})
        for change in client.watch(task.id):
            print(change.state, change.progress)

`AsyncClient` has the same methods, awaitable (`watch` and `list_tasks` are
async iterators). A failed call raises the error class the server raised
(taskservice.core.errors, also importable from `taskservice`): e.g.
`TaskAlreadyRunning` with `task_id`, `InvalidArgument` with `violations`,
`Unavailable` for anything worth retrying with backoff.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.client.base import (
    BaseClient,
    channel_credentials,
    channel_target,
    default_target,
    error_from,
)
from taskservice.client.models import Parameter, Task, TaskError, TaskType
from taskservice.core.record import Progress
from taskservice.core.states import CancelMode, ConflictPolicy, TaskState

__all__ = [
    "AsyncClient",
    "CancelMode",
    "Client",
    "ConflictPolicy",
    "Parameter",
    "Progress",
    "Task",
    "TaskError",
    "TaskState",
    "TaskType",
    "channel_credentials",
    "channel_target",
    "default_target",
]


class Client(BaseClient):
    """A blocking client. Give a target ("host:port", or several: "host1:50051,
    host2:50051" or a list, or "dns:///name:port", spread round robin over the
    servers that report SERVING, see `channel_target`; default:
    TASKSERVICE_ADDRESS, else 127.0.0.1:TASKSERVICE_PORT) or a channel;
    `credentials` for TLS, `token` for a bearer token, `timeout` (seconds) for
    each unary call."""

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        super().__init__(token=token, timeout=timeout)
        if channel is None:
            name, options = channel_target(target or default_target())
            channel = (
                grpc.secure_channel(name, credentials, options=options)
                if credentials is not None
                else grpc.insecure_channel(name, options=options)
            )
        self._channel = channel
        self._stub = pb_grpc.TaskServiceStub(channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (also when the client was given one)."""
        self._channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from(error) from None

    def start(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        key: str = "",
        conflict_policy: ConflictPolicy | str = ConflictPolicy.REJECT,
        countdown: float | None = None,
        queue: str = "",
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        request_id: str = "",
    ) -> Task:
        """Start a task of type `task_name`. Under a held exclusivity `key`
        (or the type's default key), REJECT raises TaskAlreadyRunning (its
        `task_id` is the holder); RETURN_EXISTING returns the holder, with
        `already_existed` set. A `request_id` makes a retry return the first
        call's task instead of starting another."""
        request = self._start_request(
            task_name,
            args,
            kwargs,
            key=key,
            conflict_policy=conflict_policy,
            countdown=countdown,
            queue=queue,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            request_id=request_id,
        )
        return self._started(self._call(self._stub.Start, request))

    def get(self, task_id: str = "", *, key: str = "") -> Task:
        """A task by id, or the current (else latest) task under `key`."""
        return self._task(self._call(self._stub.GetStatus, self._get_request(task_id, key)))

    def cancel(
        self, task_id: str, mode: CancelMode | str = CancelMode.KILL, *, request_id: str = ""
    ) -> Task:
        """Cancel a task: GRACEFUL (it may stop itself), TERMINATE (SIGTERM) or
        KILL (SIGKILL). A queued task never runs; a finished one raises
        TaskFinished."""
        request = self._cancel_request(task_id, mode, request_id)
        return self._task(self._call(self._stub.Cancel, request))

    def watch(self, task_id: str = "", *, key: str = "", after_sequence: int = 0) -> Iterator[Task]:
        """The task now (or every change after `after_sequence`), then each
        change, ending with its terminal state."""
        request = self._watch_request(task_id, key, after_sequence)
        stream = self._stub.WatchStatus(request, metadata=self._metadata)
        try:
            for response in stream:
                yield self._task(response)
        except grpc.RpcError as error:
            raise error_from(error) from None
        finally:
            stream.cancel()

    def list_tasks(
        self,
        *,
        states: Sequence[TaskState | str] = (),
        task_name: str = "",
        key: str = "",
        page_size: int = 0,
    ) -> Iterator[Task]:
        """Tasks newest first, filtered, following the pages to the end."""
        token = ""
        while True:
            request = self._list_request(states, task_name, key, page_size, token)
            response = self._call(self._stub.ListTasks, request)
            for message in response.tasks:
                yield Task.from_message(message)
            token = response.next_page_token
            if not token:
                return

    def task_types(self) -> list[TaskType]:
        """The task types Start accepts, with their parameters."""
        return self._task_types(self._call(self._stub.ListTaskTypes, pb.ListTaskTypesRequest()))

    def healthy(self) -> bool:
        """True if the server reports SERVING."""
        stub: Any = health_pb2_grpc.HealthStub(self._channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


class AsyncClient(BaseClient):
    """An asyncio client (grpc.aio) with Client's methods and arguments,
    awaitable. Host names in a list of several addresses are resolved when
    the client is made, blocking for that moment."""

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        super().__init__(token=token, timeout=timeout)
        if channel is None:
            name, options = channel_target(target or default_target())
            channel = (
                grpc.aio.secure_channel(name, credentials, options=options)
                if credentials is not None
                else grpc.aio.insecure_channel(name, options=options)
            )
        self._channel = channel
        self._stub = pb_grpc.TaskServiceStub(channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (also when the client was given one)."""
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
        conflict_policy: ConflictPolicy | str = ConflictPolicy.REJECT,
        countdown: float | None = None,
        queue: str = "",
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        request_id: str = "",
    ) -> Task:
        """See Client.start."""
        request = self._start_request(
            task_name,
            args,
            kwargs,
            key=key,
            conflict_policy=conflict_policy,
            countdown=countdown,
            queue=queue,
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            request_id=request_id,
        )
        return self._started(await self._call(self._stub.Start, request))

    async def get(self, task_id: str = "", *, key: str = "") -> Task:
        """See Client.get."""
        request = self._get_request(task_id, key)
        return self._task(await self._call(self._stub.GetStatus, request))

    async def cancel(
        self, task_id: str, mode: CancelMode | str = CancelMode.KILL, *, request_id: str = ""
    ) -> Task:
        """See Client.cancel."""
        request = self._cancel_request(task_id, mode, request_id)
        return self._task(await self._call(self._stub.Cancel, request))

    async def watch(
        self, task_id: str = "", *, key: str = "", after_sequence: int = 0
    ) -> AsyncIterator[Task]:
        """See Client.watch."""
        request = self._watch_request(task_id, key, after_sequence)
        stream = self._stub.WatchStatus(request, metadata=self._metadata)
        try:
            async for response in stream:
                yield self._task(response)
        except grpc.RpcError as error:
            raise error_from(error) from None
        finally:
            stream.cancel()

    async def list_tasks(
        self,
        *,
        states: Sequence[TaskState | str] = (),
        task_name: str = "",
        key: str = "",
        page_size: int = 0,
    ) -> AsyncIterator[Task]:
        """See Client.list_tasks."""
        token = ""
        while True:
            request = self._list_request(states, task_name, key, page_size, token)
            response = await self._call(self._stub.ListTasks, request)
            for message in response.tasks:
                yield Task.from_message(message)
            token = response.next_page_token
            if not token:
                return

    async def task_types(self) -> list[TaskType]:
        """See Client.task_types."""
        response = await self._call(self._stub.ListTaskTypes, pb.ListTaskTypesRequest())
        return self._task_types(response)

    async def healthy(self) -> bool:
        """See Client.healthy."""
        stub: Any = health_pb2_grpc.HealthStub(self._channel)
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
