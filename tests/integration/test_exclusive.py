"""Exclusive start across server processes, and the lock's bounds."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis

from service._proto.taskservice.v1 import task_service_pb2 as pb
from service._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from service.config import Settings
from service.embedded import free_port, stop_process_group
from service.server import create_server
from tests.conftest import ROOT
from tests.support.client import error_info, finished, start_request
from worker import record


@pytest.fixture
async def second_server(
    worker_process: subprocess.Popen[bytes],
) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    """Another server *process* on the same Redis (`python -m service serve`)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve"],
        cwd=ROOT,
        env={**os.environ, "TASKSERVICE_PORT": str(port), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            yield pb_grpc.TaskServiceStub(channel)
    finally:
        stop_process_group(process)


async def test_concurrent_starts_on_one_key_from_two_processes_accept_exactly_one(
    stub: pb_grpc.TaskServiceStub, second_server: pb_grpc.TaskServiceStub, key: str
) -> None:
    request = start_request("test.sleep", key=key, seconds=2)

    async def attempt(target: pb_grpc.TaskServiceStub) -> pb.Task | grpc.aio.AioRpcError:
        try:
            return (await target.Start(request)).task
        except grpc.aio.AioRpcError as error:
            return error

    outcomes = await asyncio.gather(*(attempt(stub if i % 2 else second_server) for i in range(60)))
    accepted = [o for o in outcomes if isinstance(o, pb.Task)]
    rejected = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(accepted) == 1, [o.code() for o in rejected]
    winner = accepted[0]
    assert {e.code() for e in rejected} == {grpc.StatusCode.ALREADY_EXISTS}
    assert {error_info(e).metadata["task_id"] for e in rejected} == {winner.id}
    # Both processes agree on what runs under the key.
    for target in (stub, second_server):
        current = (await target.GetStatus(pb.GetStatusRequest(exclusivity_key=key))).task
        assert current.id == winner.id
    await second_server.Cancel(pb.CancelRequest(task_id=winner.id))
    assert (await finished(stub, winner.id)).state == pb.TASK_STATE_CANCELLED


async def test_a_lock_left_by_a_crashed_server_expires(
    settings: Settings, worker_process: subprocess.Popen[bytes], key: str
) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    # A server that crashed mid-Start left the key's lock behind (expiring in 1 s).
    await client.set(record.lock_key(settings.key_prefix, key), b"crashed-holder", px=1000)
    running = await create_server(settings, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            task = (await stub.Start(start_request("test.echo", 1, key=key))).task
            assert (await finished(stub, task.id)).state == pb.TASK_STATE_SUCCEEDED
    finally:
        await running.stop(0)
        await client.aclose()


async def test_waiting_for_a_busy_lock_is_bounded_and_unavailable(
    settings: Settings, worker_process: subprocess.Popen[bytes], key: str
) -> None:
    client = aioredis.Redis.from_url(settings.redis_url)
    lock = record.lock_key(settings.key_prefix, key)
    await client.set(lock, b"someone-else", px=30_000)
    running = await create_server(settings.model_copy(update={"lock_wait": 0.3}), port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Start(start_request("test.echo", 1, key=key))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "LOCK_TIMEOUT"
            assert loop.time() - began < 5
            # Once the lock is gone, the key works (nothing was wedged).
            await client.delete(lock)
            task = (await stub.Start(start_request("test.echo", 1, key=key))).task
            await finished(stub, task.id)
    finally:
        await running.stop(0)
        await client.aclose()
