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
`Unavailable` for anything worth retrying with backoff, which the clients
do by themselves (`RetryPolicy`; `retry=None` turns it off) before raising.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.client.base import (
    DEFAULT_RETRY,
    BaseClient,
    channel_credentials,
    channel_target,
    default_target,
    error_from,
)
from taskservice.client.models import CancelledTasks, Parameter, Task, TaskError, TaskType
from taskservice.client.retry import RetryPolicy
from taskservice.core.record import Progress
from taskservice.core.states import CancelMode, ConflictPolicy, TaskState

__all__ = [
    "AsyncClient",
    "CancelMode",
    "CancelledTasks",
    "Client",
    "ConflictPolicy",
    "Parameter",
    "Progress",
    "RetryPolicy",
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
    each unary call; `retry` says how a call that failed UNAVAILABLE (or with
    a backlog) is retried, and a dropped watch re-opened, before the error is
    raised (RetryPolicy; None: never). Start and Cancel send a request_id
    (a new UUID unless given), the same in each attempt, so that a retry never
    acts twice."""

    def __init__(
        self,
        target: str | Sequence[str] | None = None,
        *,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = DEFAULT_RETRY,
    ) -> None:
        super().__init__(token=token, timeout=timeout, retry=retry)
        # Whether calls go over TLS: unknown for a channel given.
        self._tls = None if channel is not None else credentials is not None
        if channel is None:
            name, options = channel_target(target or default_target())
            options = self._channel_options(options)
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

    def _call(self, method: Any, request: Any, *, once: bool = False) -> Any:
        """`method`'s answer to `request`, retried as the policy says unless
        `once`; else its last error, as a taskservice.core.errors class."""
        attempts = None if once else self._attempts(request)
        while True:
            timeout = self._timeout if attempts is None else attempts.timeout()
            try:
                return method(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                error = error_from(rpc_error, tls=self._tls)
                pause = None if attempts is None else attempts.wait(error)
                if pause is None:
                    raise error from None
            time.sleep(pause)

    def start(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        key: str = "",
        conflict_policy: ConflictPolicy | str = ConflictPolicy.REJECT,
        replace_mode: CancelMode | str | None = None,
        countdown: float | None = None,
        start_at: datetime.datetime | None = None,
        queue: str = "",
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        request_id: str = "",
    ) -> Task:
        """Start a task of type `task_name`. When its exclusivity `key` (or the
        type's default key) is held, `conflict_policy` decides:

        - REJECT (default): raise TaskAlreadyRunning (`task_id` is the holder).
        - RETURN_EXISTING: return the holder, with `already_existed` set.
        - QUEUE: the new task waits in the key's line, first come first
          served (KeyLineFull past the line's limit).
        - QUEUE_LATEST: the new task waits as the key's only waiting task;
          those already waiting end CANCELLED ("Superseded").
        - REPLACE: the holder is cancelled with `replace_mode` (a CancelMode;
          default the type's, else TERMINATE) and the new task runs once it
          has ended.

        A waiting task is QUEUED with `waiting_for` naming the task it waits
        for. During a key's quiet period every policy raises KeyQuiet (metadata
        `free_time`). `countdown` (seconds, any length) or `start_at` (an aware
        datetime), not both, delay the run: the task is QUEUED with
        `scheduled_time` and holds its key meanwhile. A `request_id` (default:
        a new UUID) makes a retry return the first call's task instead of
        starting another: the client's own retries send the same one, and so
        may yours. ValueError, before any call, for a value the client refuses."""
        request = self._start_request(
            task_name,
            args,
            kwargs,
            key=key,
            conflict_policy=conflict_policy,
            replace_mode=replace_mode,
            countdown=countdown,
            start_at=start_at,
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
        TaskFinished. `request_id` as for `start`."""
        request = self._cancel_request(task_id, mode, request_id)
        return self._task(self._call(self._stub.Cancel, request))

    def watch(self, task_id: str = "", *, key: str = "", after_sequence: int = 0) -> Iterator[Task]:
        """The task now (or every change after `after_sequence`), then each
        change, ending with its terminal state. A stream that drops
        (UNAVAILABLE) is re-opened after the last change yielded, as `retry`
        allows: each change comes once, in order."""
        resume = self._watch_attempts(task_id, key, after_sequence)
        while True:
            request = pb.WatchStatusRequest(**resume.opening())
            stream = self._stub.WatchStatus(request, metadata=self._metadata)
            try:
                for response in stream:
                    task = self._task(response)
                    if resume.fresh(task.id, task.sequence):
                        yield task
                return
            except grpc.RpcError as rpc_error:
                error = error_from(rpc_error, tls=self._tls)
                pause = resume.wait(error)
                if pause is None:
                    raise error from None
            finally:
                stream.cancel()
            time.sleep(pause)

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

    def cancel_tasks(
        self,
        *,
        states: Sequence[TaskState | str] = (),
        task_name: str = "",
        key: str = "",
        mode: CancelMode | str = CancelMode.KILL,
        page_size: int = 0,
        page_token: str = "",
    ) -> CancelledTasks:
        """One CancelTasks call: cancel up to `page_size` (0: 100; at most
        500) of the QUEUED and RUNNING tasks matching the filters (`states`
        only QUEUED and/or RUNNING), newest first, after `page_token`. Queued
        ones end at once; running ones are asked to stop (`mode` as for
        `cancel`) and not waited for. Pass `next_page_token` back, with the
        same filters and mode, for the rest. Made once, never retried: a
        repeat after a lost answer would cancel up to a page more than asked."""
        request = self._cancel_tasks_request(states, task_name, key, mode, page_size, page_token)
        return self._cancelled(self._call(self._stub.CancelTasks, request, once=True))

    def cancel_all(
        self,
        *,
        states: Sequence[TaskState | str] = (),
        task_name: str = "",
        key: str = "",
        mode: CancelMode | str = CancelMode.KILL,
        page_size: int = 0,
        limit: int | None = None,
        page_token: str = "",
    ) -> CancelledTasks:
        """`cancel_tasks` call after call until no matching task is left, or
        until `limit` tasks are counted (its `next_page_token` then
        continues); what they did together. Without a `limit`, each call is
        retried as `retry` says: a repeat finds the tasks a lost answer ended
        no longer active and goes on with the rest, so every match still ends
        (the counts then miss what the lost answer did). With one, a repeat
        could go past it, so none is made."""
        done = CancelledTasks(0, 0, [], page_token)
        while True:
            size = self._cancel_page_size(page_size, limit, len(done.task_ids))
            if size is None:
                return done
            request = self._cancel_tasks_request(
                states, task_name, key, mode, size, done.next_page_token
            )
            answer = self._call(self._stub.CancelTasks, request, once=limit is not None)
            done = done.then(self._cancelled(answer))
            if done.done:
                return done

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
        retry: RetryPolicy | None = DEFAULT_RETRY,
    ) -> None:
        super().__init__(token=token, timeout=timeout, retry=retry)
        # Whether calls go over TLS: unknown for a channel given.
        self._tls = None if channel is not None else credentials is not None
        if channel is None:
            name, options = channel_target(target or default_target())
            options = self._channel_options(options)
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

    async def _call(self, method: Any, request: Any, *, once: bool = False) -> Any:
        """`method`'s answer to `request`, retried as the policy says unless
        `once`; else its last error, as a taskservice.core.errors class."""
        attempts = None if once else self._attempts(request)
        while True:
            timeout = self._timeout if attempts is None else attempts.timeout()
            try:
                return await method(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                error = error_from(rpc_error, tls=self._tls)
                pause = None if attempts is None else attempts.wait(error)
                if pause is None:
                    raise error from None
            await asyncio.sleep(pause)

    async def start(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        key: str = "",
        conflict_policy: ConflictPolicy | str = ConflictPolicy.REJECT,
        replace_mode: CancelMode | str | None = None,
        countdown: float | None = None,
        start_at: datetime.datetime | None = None,
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
            replace_mode=replace_mode,
            countdown=countdown,
            start_at=start_at,
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
        resume = self._watch_attempts(task_id, key, after_sequence)
        while True:
            request = pb.WatchStatusRequest(**resume.opening())
            stream = self._stub.WatchStatus(request, metadata=self._metadata)
            try:
                async for response in stream:
                    task = self._task(response)
                    if resume.fresh(task.id, task.sequence):
                        yield task
                return
            except grpc.RpcError as rpc_error:
                error = error_from(rpc_error, tls=self._tls)
                pause = resume.wait(error)
                if pause is None:
                    raise error from None
            finally:
                stream.cancel()
            await asyncio.sleep(pause)

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

    async def cancel_tasks(
        self,
        *,
        states: Sequence[TaskState | str] = (),
        task_name: str = "",
        key: str = "",
        mode: CancelMode | str = CancelMode.KILL,
        page_size: int = 0,
        page_token: str = "",
    ) -> CancelledTasks:
        """See Client.cancel_tasks."""
        request = self._cancel_tasks_request(states, task_name, key, mode, page_size, page_token)
        return self._cancelled(await self._call(self._stub.CancelTasks, request, once=True))

    async def cancel_all(
        self,
        *,
        states: Sequence[TaskState | str] = (),
        task_name: str = "",
        key: str = "",
        mode: CancelMode | str = CancelMode.KILL,
        page_size: int = 0,
        limit: int | None = None,
        page_token: str = "",
    ) -> CancelledTasks:
        """See Client.cancel_all."""
        done = CancelledTasks(0, 0, [], page_token)
        while True:
            size = self._cancel_page_size(page_size, limit, len(done.task_ids))
            if size is None:
                return done
            request = self._cancel_tasks_request(
                states, task_name, key, mode, size, done.next_page_token
            )
            answer = await self._call(self._stub.CancelTasks, request, once=limit is not None)
            done = done.then(self._cancelled(answer))
            if done.done:
                return done

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
