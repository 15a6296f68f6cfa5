"""Faults: Redis stopping flips health; a broker that is down loses nothing."""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, free_port, stop_process_group
from taskservice.core.settings import Settings
from taskservice.server.server import Server, create_server
from tests.conftest import serving, start_worker
from tests.support.client import TERMINAL, error_info, finished, start_request, watch_all
from tests.support.proxies import SlowProxy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def own_redis_server() -> AsyncIterator[tuple[EmbeddedRedis, Server]]:
    """A server on a Redis this test may stop and restart."""
    own = EmbeddedRedis().start()
    settings = Settings(
        redis_url=own.url,
        key_prefix=f"faults-{uuid.uuid4().hex[:6]}",
        health_interval=0.1,
        redis_timeout=0.5,
    )
    running = await create_server(settings, port=0)
    try:
        yield own, running
    finally:
        await running.stop(0)
        own.stop()


async def test_health_flips_when_redis_stops_and_recovers(
    own_redis_server: tuple[EmbeddedRedis, Server],
) -> None:
    own, running = own_redis_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = pb_grpc.TaskServiceStub(channel)
        for service in ("", "taskservice.v1.TaskService"):
            check = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert check.status == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service="taskservice.v1.TaskService"))
        assert (await watch.read()).status == SERVING

        assert own.process is not None
        own.process.terminate()
        own.process.wait()
        assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING

        # Calls answer UNAVAILABLE (retryable), never INTERNAL.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Start(start_request("test.echo", 1, key="k"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetStatus(pb.GetStatusRequest(task_id=str(uuid.uuid4())))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "REDIS_UNAVAILABLE"

        # Same port again: the server recovers by itself.
        restarted = EmbeddedRedis(port=own.port)
        restarted.start()
        own.process = restarted.process
        try:
            assert (await asyncio.wait_for(watch.read(), 15)).status == SERVING
        finally:
            watch.cancel()
            restarted.stop()


async def test_broker_down_answers_unavailable_and_leaves_no_phantom_task(
    settings: Settings,
    stub: pb_grpc.TaskServiceStub,
    worker_process: subprocess.Popen[bytes],
    key: str,
) -> None:
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    async with serving(settings.model_copy(update={"broker_url": dead_broker})) as broken_stub:
        request = start_request("test.echo", 1, key=key)
        request.options.queue = f"q-{key}"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await broken_stub.Start(request)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "BROKER_UNAVAILABLE"
    # Its record is terminal (a message that got through would be refused).
    client = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        states = [
            await client.hget(name, "state")
            async for name in client.scan_iter(f"{settings.key_prefix}:task:*")
            if await client.hget(name, "queue") == f"q-{key}"
        ]
    finally:
        await client.aclose()
    assert states == ["REVOKED"]
    # No task was recorded under the key, and the key is free.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetStatus(pb.GetStatusRequest(exclusivity_key=key))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    task = (await stub.Start(start_request("test.echo", 2, key=key))).task
    assert (await finished(stub, task.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_shutdown_ends_watch_streams_with_unavailable(
    settings: Settings, stub: pb_grpc.TaskServiceStub
) -> None:
    request = start_request("test.echo", 1)
    request.options.queue = "nobody-listens"  # stays QUEUED: its watch would never end
    task = (await stub.Start(request)).task
    running = await create_server(settings, port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        health_watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await health_watch.read()).status == SERVING
        call = pb_grpc.TaskServiceStub(channel).WatchStatus(pb.WatchStatusRequest(task_id=task.id))
        assert (await call.read()).task.state == pb.TASK_STATE_QUEUED
        stopping = asyncio.create_task(running.stop(5))
        # Health watchers hear it first, then the stream ends: watch again elsewhere.
        assert (await asyncio.wait_for(health_watch.read(), 5)).status == NOT_SERVING
        health_watch.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "SHUTTING_DOWN"
        await asyncio.wait_for(stopping, 10)
    await stub.Cancel(pb.CancelRequest(task_id=task.id))


async def test_every_health_watcher_hears_not_serving_then_its_stream_ends_unavailable(
    settings: Settings,
) -> None:
    running = await create_server(settings, port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="taskservice.v1.TaskService")
        watches = [health.Watch(request) for _ in range(3)]
        for watch in watches:
            assert (await watch.read()).status == SERVING
        # One watcher leaves (grpc_health's own servicer then forgets the
        # others: they would never hear NOT_SERVING).
        watches.pop(0).cancel()
        assert (await health.Check(request)).status == SERVING
        stopping = asyncio.create_task(running.stop(5))
        for watch in watches:
            assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        # Then, as the port closes, the streams end: watch another server.
        for watch in watches:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await asyncio.wait_for(watch.read(), 5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "SHUTTING_DOWN"
        await asyncio.wait_for(stopping, 10)


async def test_a_start_whose_caller_goes_away_still_completes_and_holds_its_key(
    settings: Settings,
    stub: pb_grpc.TaskServiceStub,
    redis_server: EmbeddedRedis,
    worker_process: subprocess.Popen[bytes],
    key: str,
) -> None:
    async with (
        SlowProxy(redis_server.port, delay=0.2) as proxy,
        serving(settings.model_copy(update={"broker_url": proxy.url})) as slow_stub,
    ):
        call = slow_stub.Start(start_request("test.sleep", key=key, seconds=1))
        await asyncio.sleep(0.1)  # claimed, publishing through the slow broker
        call.cancel()
        # The Start went on without its caller: the task is recorded as
        # the key's holder, so exclusivity holds and nothing runs untracked.
        for _ in range(100):
            try:
                holder = (await stub.GetStatus(pb.GetStatusRequest(exclusivity_key=key))).task
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the abandoned Start never recorded its task")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Start(start_request("test.echo", key=key))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert error_info(caught.value).metadata["task_id"] == holder.id
        assert (await finished(stub, holder.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_a_start_answers_unavailable_before_its_deadline_and_holds_nothing(
    settings: Settings,
    stub: pb_grpc.TaskServiceStub,
    redis_server: EmbeddedRedis,
    key: str,
) -> None:
    async with (
        SlowProxy(redis_server.port, delay=0.5) as proxy,
        serving(settings.model_copy(update={"broker_url": proxy.url})) as slow_stub,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await slow_stub.Start(start_request("test.sleep", key=key, seconds=1), timeout=0.3)
        # Told in time that nothing started, so retrying is safe:
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == "BROKER_UNAVAILABLE"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetStatus(pb.GetStatusRequest(exclusivity_key=key))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # ...and the message that reaches the broker late is refused.
        await asyncio.sleep(1.5)
        given_up = await records_under(settings, key)
        assert [(r["state"], r["error_type"], "started" in r) for r in given_up] == [
            ("REVOKED", "NotEnqueued", False)
        ]
        task = (await stub.Start(start_request("test.echo", 1, key=key))).task
        assert (await finished(stub, task.id)).state == pb.TASK_STATE_SUCCEEDED


async def records_under(settings: Settings, key: str) -> list[dict[str, str]]:
    """Every task record under an exclusivity key, read straight from Redis."""
    client = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        found = []
        async for name in client.scan_iter(f"{settings.key_prefix}:task:*"):
            fields: dict[str, str] = await client.hgetall(name)  # type: ignore[misc]
            if fields.get("key") == key:
                found.append(fields)
        return found
    finally:
        await client.aclose()


async def test_a_redis_restart_under_load_leaves_no_task_unfinished_and_no_key_held(
    tmp_path: Path,
) -> None:
    own = EmbeddedRedis(args=("--appendonly", "yes", "--appendfsync", "always")).start()
    lease = 8.0
    settings = Settings(
        redis_url=own.url,
        key_prefix=f"restart-{uuid.uuid4().hex[:6]}",
        lease=lease,
        heartbeat_interval=1,
        sweep_interval=0.25,
        redis_timeout=0.5,
        health_interval=0.2,
        queues="only*",
    )
    env = {
        "TASKSERVICE_REDIS_URL": own.url,
        "TASKSERVICE_KEY_PREFIX": settings.key_prefix,
        "TASKSERVICE_LEASE": str(lease),
        "TASKSERVICE_HEARTBEAT_INTERVAL": "1",
        "TASKSERVICE_REDIS_TIMEOUT": "0.5",
    }
    workers = [
        await asyncio.to_thread(
            start_worker,
            tmp_path / f"worker{n}.log",
            concurrency=2,
            queues=f"celery,only{n}",
            env=env,
        )
        for n in (0, 1)
    ]
    running = await create_server(settings, port=0)
    rng = random.Random(5)
    keys = [f"restart-{n}" for n in range(6)]
    accepted: list[str] = []
    streams: list[asyncio.Task[list[pb.Task]]] = []
    refusals: Counter[str] = Counter()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            stop = asyncio.Event()

            async def client() -> None:
                while not stop.is_set():
                    request = start_request(
                        "test.sleep", rng.choice([0.1, 0.4, 1.0]), key=rng.choice(keys)
                    )
                    try:
                        task = (await stub.Start(request, timeout=5)).task
                    except grpc.aio.AioRpcError as error:
                        refusals[error.code().name] += 1
                    else:
                        accepted.append(task.id)
                        streams.append(asyncio.create_task(watch_to_end(stub, task.id)))
                    await asyncio.sleep(0.05)

            clients = [asyncio.create_task(client()) for _ in range(6)]
            await asyncio.sleep(3)
            own.crash()  # kill -9: AOF with fsync always keeps every write
            await asyncio.sleep(2)
            await asyncio.to_thread(own.start)
            await asyncio.sleep(3)
            stop.set()
            await asyncio.gather(*clients)

            # Every accepted task ends, every watcher is told, within the lease.
            ends = await asyncio.wait_for(asyncio.gather(*streams), lease + 15)
            assert len(ends) == len(accepted) >= 10
            assert all(end.state in TERMINAL for end in ends)
            for key in keys:
                with contextlib.suppress(grpc.aio.AioRpcError):  # never used
                    holder = (await stub.GetStatus(pb.GetStatusRequest(exclusivity_key=key))).task
                    assert holder.state in TERMINAL, holder
            # Nothing answered anything but "already running" or "retry".
            assert set(refusals) <= {"ALREADY_EXISTS", "UNAVAILABLE"}, refusals
            # Both workers survived and still consume.
            assert [w.poll() for w in workers] == [None, None]
            for n in (0, 1):
                request = start_request("test.echo", n)
                request.options.queue = f"only{n}"
                task = (await stub.Start(request)).task
                assert (await finished(stub, task.id)).state == pb.TASK_STATE_SUCCEEDED
    finally:
        await running.stop(0)
        for worker in workers:
            stop_process_group(worker)
        own.stop()


async def watch_to_end(stub: pb_grpc.TaskServiceStub, task_id: str) -> pb.Task:
    """Watch a task to its end as a client should: watch again after UNAVAILABLE."""
    while True:
        try:
            return (await watch_all(stub, task_id, 60))[-1]
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            await asyncio.sleep(0.2)
