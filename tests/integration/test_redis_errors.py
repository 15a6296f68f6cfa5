"""Every way a real Redis refuses work answers with a code a caller can act on."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import redis.asyncio
import redis.exceptions

from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, free_port
from taskservice.core.settings import Settings
from taskservice.server.server import Server, create_server
from tests.support.client import error_info, start_request

Serve = Callable[..., Awaitable[tuple[pb_grpc.TaskServiceStub, EmbeddedRedis]]]


@pytest.fixture
async def serve_on() -> AsyncIterator[Serve]:
    """Start a server on a Redis of its own, run with extra redis-server options."""
    opened: list[tuple[EmbeddedRedis, Server, grpc.aio.Channel]] = []

    async def serve(*args: str) -> tuple[pb_grpc.TaskServiceStub, EmbeddedRedis]:
        own = EmbeddedRedis(args=args).start()
        settings = Settings(
            redis_url=own.url, key_prefix=f"errors-{uuid.uuid4().hex[:6]}", redis_timeout=0.5
        )
        server = await create_server(settings, port=0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        opened.append((own, server, channel))
        return pb_grpc.TaskServiceStub(channel), own

    yield serve
    for own, server, channel in opened:
        await channel.close()
        await server.stop(0)
        own.stop()


async def refused(stub: pb_grpc.TaskServiceStub) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Start(start_request("test.echo", 1, key="k"))
    error = caught.value
    return error.code(), error_info(error).reason, error.details() or ""


async def test_a_read_only_replica_answers_unavailable(serve_on: Serve) -> None:
    stub, _ = await serve_on("--replicaof", "127.0.0.1", str(free_port()))
    code, reason, details = await refused(stub)
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REDIS_READ_ONLY")
    assert "retry" in details


async def test_a_redis_out_of_memory_answers_resource_exhausted(serve_on: Serve) -> None:
    stub, _ = await serve_on("--maxmemory", "1")
    code, reason, _ = await refused(stub)
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "REDIS_OUT_OF_MEMORY")


async def test_wrong_credentials_answer_failed_precondition_not_retry(serve_on: Serve) -> None:
    stub, _ = await serve_on("--requirepass", "secret")
    code, reason, details = await refused(stub)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "REDIS_MISCONFIGURED")
    assert "operator" in details


async def test_a_redis_busy_with_a_long_script_answers_unavailable(serve_on: Serve) -> None:
    stub, own = await serve_on("--lua-time-limit", "50")
    async with long_script(own.port):
        code, reason, _ = await refused(stub)
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "REDIS_BUSY")


@contextlib.asynccontextmanager
async def long_script(port: int) -> AsyncIterator[None]:
    """A Lua script keeping Redis busy until the block ends (SCRIPT KILL)."""
    runner = redis.asyncio.Redis(port=port)
    probe = redis.asyncio.Redis(port=port)
    running = asyncio.create_task(runner.eval("while true do redis.call('TIME') end", 0))
    try:
        for _ in range(100):
            try:
                await probe.ping()
            except redis.exceptions.ResponseError as error:
                if str(error).startswith("BUSY"):
                    break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the script never made Redis busy")
        yield
    finally:
        with contextlib.suppress(redis.exceptions.ResponseError):
            await probe.script_kill()
        with contextlib.suppress(redis.exceptions.ResponseError):
            await running
        await probe.aclose()
        await runner.aclose()
