"""No key stays held by a dead worker, a dead server or a hung broker.

Real faults: whole workers and servers killed with SIGKILL, a broker proxy
that never answers or answers slowly. Leases are short in tests (conftest).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, stop_process_group
from taskservice.core.settings import Settings
from tests.conftest import log_shows, serving, start_server_process, start_worker
from tests.support.client import (
    error_info,
    finished,
    running,
    start,
    start_request,
    wait_until,
    watch_all,
)
from tests.support.proxies import BlackholeProxy, SlowProxy


def on_queue(request: pb.StartRequest, queue: str) -> pb.StartRequest:
    request.options.queue = queue
    return request


async def free_within(stub: pb_grpc.TaskServiceStub, key: str, seconds: float) -> pb.Task:
    """Start test.echo under `key` as soon as the key is free (within `seconds`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            return (await stub.Start(start_request("test.echo", "free", key=key))).task
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error.details()
            if loop.time() > deadline:
                raise AssertionError(f"key {key!r} still held after {seconds}s") from error
            await asyncio.sleep(0.1)


async def test_a_whole_worker_killed_mid_task_ends_lost_and_frees_its_key(
    stub: pb_grpc.TaskServiceStub, settings: Settings, key: str, tmp_path: Path
) -> None:
    queue = f"doomed-{uuid.uuid4().hex[:8]}"
    worker = await asyncio.to_thread(
        start_worker, tmp_path / "worker.log", concurrency=1, queues=queue
    )
    try:
        out = tmp_path / "out"
        request = start_request("test.write_after", key=key, path=str(out), seconds=60)
        task = (await stub.Start(on_queue(request, queue))).task
        await running(stub, task.id, Path(str(out) + ".pid"))
        watcher = asyncio.create_task(watch_all(stub, task.id, timeout=30))
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        os.killpg(worker.pid, signal.SIGKILL)  # OOM killer, eviction, compose down
        messages = await watcher
        took = loop.time() - killed_at
    finally:
        stop_process_group(worker)
    lost = messages[-1]
    assert lost.state == pb.TASK_STATE_LOST
    assert lost.error.type == "WorkerLostError"
    assert "stopped heartbeating" in lost.error.message
    assert took < settings.lease + settings.sweep_interval + 2, took
    await free_within(stub, key, 1)


@pytest.mark.parametrize("mode", [pb.CANCEL_MODE_KILL, pb.CANCEL_MODE_GRACEFUL])
async def test_a_cancel_of_a_task_whose_worker_is_gone_ends_it_and_frees_the_key(
    stub: pb_grpc.TaskServiceStub,
    settings: Settings,
    key: str,
    tmp_path: Path,
    mode: pb.CancelMode.ValueType,
) -> None:
    queue = f"doomed-{uuid.uuid4().hex[:8]}"
    worker = await asyncio.to_thread(
        start_worker, tmp_path / "worker.log", concurrency=1, queues=queue
    )
    try:
        task = (await stub.Start(on_queue(start_request("test.sleep", 60, key=key), queue))).task
        await _until_running(stub, task.id)
        os.killpg(worker.pid, signal.SIGKILL)
    finally:
        stop_process_group(worker)
    # Nobody confirms the cancel; the lapsed lease ends the task anyway.
    loop = asyncio.get_running_loop()
    began = loop.time()
    answer = (await stub.Cancel(pb.CancelRequest(task_id=task.id, mode=mode))).task
    if answer.state != pb.TASK_STATE_CANCELLED:  # a graceful Cancel does not wait
        answer = await finished(stub, task.id)
    assert answer.state == pb.TASK_STATE_CANCELLED
    assert loop.time() - began < settings.lease + settings.sweep_interval + 2
    await free_within(stub, key, 0)


async def test_a_long_task_on_a_live_worker_is_never_declared_lost(
    stub: pb_grpc.TaskServiceStub, settings: Settings, key: str
) -> None:
    seconds = settings.lease * 2.5
    task = await start(stub, "test.sleep", seconds, key=key)
    done = await finished(stub, task.id, timeout=seconds + 10)
    assert done.state == pb.TASK_STATE_SUCCEEDED


async def test_a_message_delivered_again_never_runs_the_body_twice(
    stub: pb_grpc.TaskServiceStub, settings: Settings, tmp_path: Path
) -> None:
    from taskservice.server.publisher import create_publisher
    from taskservice.worker.app import app

    queue = f"again-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    worker = await asyncio.to_thread(start_worker, log, concurrency=2, queues=queue)
    publisher = create_publisher(settings, app)
    runs = tmp_path / "runs"
    try:
        request = start_request("test.log_run", path=str(runs), seconds=1)
        task = (await stub.Start(on_queue(request, queue))).task
        await asyncio.sleep(0.5)  # running now
        # As kombu redelivers: the same message again, while it runs, then after.
        again = {"kwargs": {"path": str(runs), "seconds": 1}, "task_id": task.id, "queue": queue}
        publisher.send_task("test.log_run", **again)
        done = await finished(stub, task.id)
        publisher.send_task("test.log_run", **again)
        await log_shows(log, f"task {task.id} is running on", worker, timeout=10)
        await log_shows(log, f"task {task.id} already ended", worker, timeout=10)
    finally:
        stop_process_group(worker)
    assert runs.read_text().splitlines() == [task.id]
    assert done.state == pb.TASK_STATE_SUCCEEDED
    status = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert status.sequence == done.sequence  # the refused copies changed nothing


async def test_a_server_killed_before_publishing_frees_the_key_after_its_provisional_lease(
    stub: pb_grpc.TaskServiceStub, settings: Settings, key: str, tmp_path: Path
) -> None:
    async with BlackholeProxy() as broker:
        env = {
            "TASKSERVICE_BROKER_URL": broker.url,
            "TASKSERVICE_PUBLISH_TIMEOUT": "1",
        }
        doomed, port = await asyncio.to_thread(start_server_process, tmp_path / "server.log", env)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.TaskServiceStub(channel).Start(
                    start_request("test.echo", "lost", key=key)
                )
                # Claimed and waiting for the hung broker:
                holder = await until_held(stub, key)
                os.killpg(doomed.pid, signal.SIGKILL)
                with pytest.raises(grpc.aio.AioRpcError):
                    await call
        finally:
            stop_process_group(doomed)
    assert holder.state == pb.TASK_STATE_QUEUED
    provisional = 1 + settings.lease
    await free_within(stub, key, provisional + settings.sweep_interval + 2)
    given_up = (await stub.GetStatus(pb.GetStatusRequest(task_id=holder.id))).task
    assert given_up.state == pb.TASK_STATE_CANCELLED
    assert given_up.error.type == "NotEnqueued"


async def test_a_server_killed_mid_publish_leaves_the_key_usable_and_never_two_runs(
    stub: pb_grpc.TaskServiceStub,
    settings: Settings,
    redis_server: EmbeddedRedis,
    worker_process: subprocess.Popen[bytes],
    key: str,
    tmp_path: Path,
) -> None:
    runs = tmp_path / "runs"
    async with SlowProxy(redis_server.port, delay=0.3) as broker:
        env = {"TASKSERVICE_BROKER_URL": broker.url}
        doomed, port = await asyncio.to_thread(start_server_process, tmp_path / "server.log", env)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.TaskServiceStub(channel).Start(
                    start_request("test.log_run", path=str(runs), key=key)
                )
                holder = await until_held(stub, key)
                await asyncio.sleep(0.5)  # the message is on its way through the proxy
                os.killpg(doomed.pid, signal.SIGKILL)
                with pytest.raises(grpc.aio.AioRpcError):
                    await call
            # Whether the message made it or not, the key is usable again
            # within the provisional lease, and the task ran at most once.
            provisional = settings.publish_timeout + settings.lease
            follow_up = await free_within(stub, key, provisional + settings.sweep_interval + 3)
        finally:
            stop_process_group(doomed)
    ended = await finished(stub, holder.id)
    assert ended.state in (pb.TASK_STATE_SUCCEEDED, pb.TASK_STATE_CANCELLED)
    if ended.state == pb.TASK_STATE_CANCELLED:
        assert ended.error.type == "NotEnqueued"
    await asyncio.sleep(1)  # a late copy of the message would run by now
    ran = runs.read_text().splitlines() if runs.exists() else []
    assert ran == ([holder.id] if ended.state == pb.TASK_STATE_SUCCEEDED else [])
    assert (await finished(stub, follow_up.id)).state == pb.TASK_STATE_SUCCEEDED


async def until_held(stub: pb_grpc.TaskServiceStub, key: str) -> pb.Task:
    for _ in range(200):
        try:
            return (await stub.GetStatus(pb.GetStatusRequest(exclusivity_key=key))).task
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing ever held {key!r}")


async def test_a_broker_that_never_answers_fails_starts_in_time_and_bounds_the_backlog(
    stub: pb_grpc.TaskServiceStub, settings: Settings
) -> None:
    keys = [f"hung-{uuid.uuid4().hex[:8]}" for _ in range(6)]
    async with BlackholeProxy() as broker:
        hung = settings.model_copy(
            update={"broker_url": broker.url, "max_pending_publishes": 2, "publish_timeout": 1.5}
        )
        async with serving(hung) as hung_stub:
            loop = asyncio.get_running_loop()
            began = loop.time()

            async def attempt(key: str) -> tuple[str, str, float]:
                try:
                    await hung_stub.Start(start_request("test.echo", key=key), timeout=5)
                except grpc.aio.AioRpcError as error:
                    return error.code().name, error_info(error).reason, loop.time() - began
                return "OK", "", loop.time() - began

            outcomes = await asyncio.gather(*(attempt(k) for k in keys))
    # Two Starts waited for the broker and gave up within the publish
    # timeout; the others were refused at once instead of piling up.
    assert Counter((code, reason) for code, reason, _ in outcomes) == {
        ("UNAVAILABLE", "BROKER_UNAVAILABLE"): 2,
        ("RESOURCE_EXHAUSTED", "PUBLISH_BACKLOG"): 4,
    }
    assert all(took < 1 for code, _, took in outcomes if code == "RESOURCE_EXHAUSTED")
    assert all(took < 4 for _, _, took in outcomes)
    # Nothing holds any of the keys.
    for key in keys:
        await free_within(stub, key, 0)


async def test_tasks_a_killed_worker_held_unstarted_end_lost_and_every_watcher_is_told(
    stub: pb_grpc.TaskServiceStub, settings: Settings, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    queue = f"doomed-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    worker = await asyncio.to_thread(start_worker, log, concurrency=1, queues=queue)
    try:
        # One process: it holds a task for its retry's countdown, runs one
        # and has prefetched the next.
        later = on_queue(start_request("test.retry_later", str(tmp_path / "m"), 30), queue)
        scheduled = (await stub.Start(later)).task
        await wait_until(
            stub, scheduled.id, lambda t: t.state == pb.TASK_STATE_QUEUED and t.sequence > 2
        )
        busy = (await stub.Start(on_queue(start_request("test.sleep", 60), queue))).task
        await _until_running(stub, busy.id)
        prefetched = (await stub.Start(on_queue(start_request("test.sleep", 60), queue))).task
        await log_shows(log, prefetched.id, worker, timeout=10)
        tasks = [busy, prefetched, scheduled]
        watchers = [
            asyncio.create_task(watch_all(stub, t.id, timeout=30)) for t in tasks for _ in range(3)
        ]
        # Leased, every one: a task its worker never leased would not lapse
        # (the sweep would put its message back instead, test below).
        leases = redis.Redis(port=redis_server.port)
        try:
            for _ in range(200):
                held = [leases.zscore(f"{settings.key_prefix}:leases", t.id) for t in tasks]
                if None not in held:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"the worker did not lease them all within 10 s: {held}")
        finally:
            leases.close()
        os.killpg(worker.pid, signal.SIGKILL)
        streams = await asyncio.gather(*watchers)
    finally:
        stop_process_group(worker)
    ends = {s[-1].id: s[-1] for s in streams}
    assert {t.state for t in ends.values()} == {pb.TASK_STATE_LOST}
    assert all(s[0].sequence <= s[-1].sequence for s in streams)
    assert "before starting it" in ends[prefetched.id].error.message
    assert "before starting it" in ends[scheduled.id].error.message


SHORT = {"lease": 1.0, "heartbeat_interval": 0.25, "sweep_interval": 0.1}
"""A server's settings for the tests that wait out a lease: shorter still."""
SHORT_ENV = {"TASKSERVICE_LEASE": "1", "TASKSERVICE_HEARTBEAT_INTERVAL": "0.25"}
"""The same for their workers."""


async def test_a_task_received_just_before_its_worker_is_killed_runs_elsewhere_and_frees_its_key(
    settings: Settings, redis_server: EmbeddedRedis, key: str, tmp_path: Path
) -> None:
    queue = f"doomed-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    name = f"next-{uuid.uuid4().hex[:6]}"
    # The next worker starts beside the doomed one, on a queue of its own; it
    # takes the doomed one's queue over once that one is dead.
    async with workers(
        dict(log=log, concurrency=1, queues=queue, env=SHORT_ENV),
        dict(log=tmp_path / "next.log", concurrency=1, queues=f"parked-{name}", env=SHORT_ENV,
             name=name),
    ) as (doomed, _), serving(settings.model_copy(update=SHORT)) as stub:  # fmt: skip
        busy = (await stub.Start(on_queue(start_request("test.sleep", 60), queue))).task
        await _until_running(stub, busy.id)
        request = on_queue(start_request("test.echo", "ran", key=key), queue)
        prefetched = (await stub.Start(request)).task
        # Killed before the heartbeat's first renewal of it (RECEIVE_DELAY later).
        await log_shows(log, f"{prefetched.id}] received", doomed, timeout=10)
        os.killpg(doomed.pid, signal.SIGKILL)
        leases = redis.Redis(port=redis_server.port)
        assert leases.zscore(f"{settings.key_prefix}:leases", prefetched.id) is None, (
            "the worker leased the task before it was killed: the kill came too late"
        )
        # No lease to lapse: its message waits in kombu's unacked hash until
        # a sweep finds it older than the lease and puts it back in its queue.
        await consume(settings, name, queue)
        done = await finished(stub, prefetched.id, timeout=10)
        assert done.state == pb.TASK_STATE_SUCCEEDED
        assert done.worker == f"{name}@{socket.gethostname()}"
        assert done.result.string_value == "ran"
        await free_within(stub, key, 0)  # its end freed the key
        lost = await finished(stub, busy.id)
        assert lost.state == pb.TASK_STATE_LOST


async def test_messages_a_live_worker_holds_past_the_lease_stay_with_it(
    settings: Settings, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    from taskservice.server.publisher import create_publisher
    from taskservice.worker.app import app

    queue = f"again-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    short = settings.model_copy(update=SHORT)
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    async with workers(dict(log=log, concurrency=1, queues=queue, env=SHORT_ENV)) as (worker,):
        async with serving(short) as stub:
            busy = (await stub.Start(on_queue(start_request("test.sleep", 60), queue))).task
            await _until_running(stub, busy.id)
            # A plain send_task (no record, no lease), held for its countdown
            # (Celery then takes one more message than its prefetch count)...
            plain = str(uuid.uuid4())
            create_publisher(settings, app).send_task(
                "test.echo", args=["plain"], task_id=plain, queue=queue, countdown=60
            )
            await log_shows(log, f"{plain}] received", worker, timeout=10)
            # ...and a task prefetched behind the busy one, leased by the heartbeat.
            held = (await stub.Start(on_queue(start_request("test.echo", "held"), queue))).task
            await log_shows(log, f"{held.id}] received", worker, timeout=10)
            # Older than the lease, and swept many times over.
            await asyncio.sleep(short.lease + 8 * short.sweep_interval)
            messages = client.hvals("unacked")
            unacked = {json.loads(message)[0]["headers"]["id"] for message in messages}
            assert {held.id, plain} <= unacked
            assert client.llen(queue) == 0  # neither was put back in the queue
            status = (await stub.GetStatus(pb.GetStatusRequest(task_id=held.id))).task
            assert status.state == pb.TASK_STATE_QUEUED
            await stub.Cancel(pb.CancelRequest(task_id=busy.id))
            done = await finished(stub, held.id)
    client.close()
    assert done.state == pb.TASK_STATE_SUCCEEDED
    assert done.sequence == status.sequence + 2  # started and ended, once


@contextlib.asynccontextmanager
async def workers(*options: dict[str, Any]) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """Workers started side by side (start_worker's arguments each), stopped on exit."""
    started = await asyncio.gather(
        *(asyncio.to_thread(start_worker, **each) for each in options), return_exceptions=True
    )
    processes = [p for p in started if isinstance(p, subprocess.Popen)]
    try:
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome
        yield processes
    finally:
        for process in processes:
            stop_process_group(process)


async def consume(settings: Settings, name: str, queue: str) -> None:
    """Have worker `name` consume `queue` too (Celery's add_consumer)."""
    from taskservice.server.publisher import create_publisher
    from taskservice.worker.app import app

    control = create_publisher(settings, app).control
    destination = [f"{name}@{socket.gethostname()}"]
    replies = await asyncio.to_thread(
        control.add_consumer, queue, destination=destination, reply=True, timeout=5
    )
    assert replies and all("ok" in reply[destination[0]] for reply in replies), replies


async def _until_running(stub: pb_grpc.TaskServiceStub, task_id: str) -> None:
    for _ in range(200):
        status = (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task
        if status.state == pb.TASK_STATE_RUNNING:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} never ran")
