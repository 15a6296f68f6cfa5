"""Small helpers over the generated stub, so tests read as what a client does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc

TERMINAL = {
    pb.TASK_STATE_SUCCEEDED,
    pb.TASK_STATE_FAILED,
    pb.TASK_STATE_CANCELLED,
    pb.TASK_STATE_LOST,
}


def start_request(task_name: str, /, *args: Any, key: str = "", **kwargs: Any) -> pb.StartRequest:
    request = pb.StartRequest(task_name=task_name, exclusivity_key=key)
    request.args.extend(list(args))
    request.kwargs.update(kwargs)
    return request


async def start(
    stub: pb_grpc.TaskServiceStub, task_name: str, /, *args: Any, key: str = "", **kwargs: Any
) -> pb.Task:
    response = await stub.Start(start_request(task_name, *args, key=key, **kwargs))
    return response.task


async def watch_all(
    stub: pb_grpc.TaskServiceStub, task_id: str, timeout: float = 30
) -> list[pb.Task]:
    """Every message of a WatchStatus stream, until the server ends it."""

    async def collect() -> list[pb.Task]:
        return [m.task async for m in stub.WatchStatus(pb.WatchStatusRequest(task_id=task_id))]

    return await asyncio.wait_for(collect(), timeout)


async def wait_until(
    stub: pb_grpc.TaskServiceStub,
    task_id: str,
    predicate: Callable[[pb.Task], bool],
    timeout: float = 30,
) -> pb.Task:
    """The first state of the task (from a watch) that satisfies `predicate`."""

    async def watch() -> pb.Task:
        async for message in stub.WatchStatus(pb.WatchStatusRequest(task_id=task_id)):
            if predicate(message.task):
                return message.task
        raise AssertionError(f"task {task_id} ended without reaching the expected state")

    return await asyncio.wait_for(watch(), timeout)


async def running(stub: pb_grpc.TaskServiceStub, task_id: str, pid_file: Path) -> None:
    """Wait until the task body runs (it published its pid file)."""
    await wait_until(stub, task_id, lambda t: t.state == pb.TASK_STATE_RUNNING)
    for _ in range(500):
        if pid_file.exists():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("task body never started")


async def finished(stub: pb_grpc.TaskServiceStub, task_id: str, timeout: float = 30) -> pb.Task:
    return await wait_until(stub, task_id, lambda t: t.state in TERMINAL, timeout)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status in {error!r}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status in {error!r}"
    found: dict[str, str] = {}
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.update((v.field, v.description) for v in bad.field_violations)
    return found


def value(data: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(data, out)
    return out
