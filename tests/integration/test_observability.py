"""What an operator reads: the Prometheus endpoints of a server and of a
prefork worker, and their JSON log lines.

One server process and one worker (concurrency 2) under a key prefix and a
queue of this module's own, so no other test's tasks reach their counters;
each test compares scrapes taken before and after what it does.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, free_port, stop_process_group
from taskservice.core.scripts import Scripts
from taskservice.core.settings import Settings
from tests.conftest import ROOT, start_server_process, start_worker
from tests.support.client import TERMINAL, start_request, watch_all

PREFIX = f"ts-obs-{uuid.uuid4().hex[:8]}"
QUEUE = f"q-obs-{uuid.uuid4().hex[:8]}"  # only this module's worker consumes it
PARKED = "nobody-listens"  # a queue no worker consumes: a task there holds its key

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Stack:
    port: int
    metrics_port: int
    worker_metrics_port: int
    server_log: Path
    worker_log: Path


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("observability")
    metrics_port, worker_metrics_port = free_port(), free_port()
    env = {"TASKSERVICE_KEY_PREFIX": PREFIX, "TASKSERVICE_LOG_FORMAT": "json"}
    worker = start_worker(
        folder / "worker.log",
        concurrency=2,
        queues=QUEUE,
        env={**env, "TASKSERVICE_WORKER_METRICS_PORT": str(worker_metrics_port)},
    )
    server: subprocess.Popen[bytes] | None = None
    try:
        server, port = start_server_process(
            folder / "server.log", env={**env, "TASKSERVICE_METRICS_PORT": str(metrics_port)}
        )
        yield Stack(
            port, metrics_port, worker_metrics_port, folder / "server.log", folder / "worker.log"
        )
    finally:
        if server is not None:
            stop_process_group(server)
        stop_process_group(worker)


@pytest.fixture
async def stub(stack: Stack) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
        yield pb_grpc.TaskServiceStub(channel)


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(port: int) -> Samples:
    return await asyncio.to_thread(_scrape, port)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


async def until_counted(
    port: int, check: Callable[[Samples], bool], timeout: float = 10
) -> Samples:
    """A scrape that satisfies `check`: a process counts an end just after
    writing it, so a client may see the end a moment before the counter."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(port)
        if check(samples) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


def on_queue(request: pb.StartRequest, queue: str) -> pb.StartRequest:
    request.options.queue = queue
    return request


async def rest(call: Any) -> list[pb.TaskState.ValueType]:
    """The states a stream sends until it ends (after a first `read`)."""
    states = []
    while (message := await call.read()) is not grpc.aio.EOF:
        states.append(message.task.state)
    return states


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The log's JSON lines (Celery prints its banner as plain text)."""
    lines = path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


async def test_server_counts_calls_by_method_and_code_and_each_end_once(
    stack: Stack, stub: pb_grpc.TaskServiceStub
) -> None:
    before = await scrape(stack.metrics_port)
    worker_before = await scrape(stack.worker_metrics_port)
    key = f"obs-{uuid.uuid4().hex[:8]}"

    echo = (await stub.Start(on_queue(start_request("test.echo", 1), QUEUE))).task
    assert (await watch_all(stub, echo.id))[-1].state == pb.TASK_STATE_SUCCEEDED
    parked = (await stub.Start(on_queue(start_request("test.sleep", 60, key=key), PARKED))).task
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await stub.Start(on_queue(start_request("test.sleep", 60, key=key), PARKED))
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.Start(start_request("no.such.task"))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetStatus(pb.GetStatusRequest(task_id=str(uuid.uuid4())))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    watch = stub.WatchStatus(pb.WatchStatusRequest(task_id=parked.id))
    assert (await watch.read()).task.state == pb.TASK_STATE_QUEUED
    watching = await scrape(stack.metrics_port)
    assert value(watching, "taskservice_watch_streams") == 1
    cancelled = (await stub.Cancel(pb.CancelRequest(task_id=parked.id))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    assert await rest(watch) == [pb.TASK_STATE_CANCELLED]

    after = await until_counted(
        stack.metrics_port,
        lambda s: (
            value(s, "taskservice_rpc_requests_total", method="WatchStatus", code="OK")
            - value(before, "taskservice_rpc_requests_total", method="WatchStatus", code="OK")
            == 2
        ),
    )

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    calls = "taskservice_rpc_requests_total"
    assert grew(calls, method="Start", code="OK") == 2
    assert grew(calls, method="Start", code="ALREADY_EXISTS") == 1
    assert grew(calls, method="Start", code="INVALID_ARGUMENT") == 1
    assert grew(calls, method="GetStatus", code="NOT_FOUND") == 1
    assert grew(calls, method="Cancel", code="OK") == 1
    assert grew(calls, method="WatchStatus", code="OK") == 2
    timed = "taskservice_rpc_duration_seconds_count"
    assert grew(timed, method="Start") == 4
    assert grew(timed, method="GetStatus") == 1
    assert grew(timed, method="Cancel") == 1
    assert value(after, timed, method="WatchStatus") == 0  # streams are not timed
    assert grew("taskservice_rpc_duration_seconds_sum", method="Start") > 0
    assert value(after, "taskservice_watch_streams") == 0
    assert grew("taskservice_tasks_started_total", task_name="test.echo") == 1
    assert grew("taskservice_tasks_started_total", task_name="test.sleep") == 1
    assert grew("taskservice_conflicts_total", task_name="test.sleep", policy="fail") == 1
    # The server ended the queued task; the worker ended the one it ran.
    ended = "taskservice_tasks_ended_total"
    assert grew(ended, task_name="test.sleep", state="cancelled") == 1
    assert grew(ended, task_name="test.echo", state="succeeded") == 0
    worker_after = await until_counted(
        stack.worker_metrics_port,
        lambda s: (
            value(s, ended, task_name="test.echo", state="succeeded")
            > value(worker_before, ended, task_name="test.echo", state="succeeded")
        ),
    )
    assert (
        value(worker_after, ended, task_name="test.echo", state="succeeded")
        - value(worker_before, ended, task_name="test.echo", state="succeeded")
        == 1
    )
    assert value(worker_after, ended, task_name="test.sleep", state="cancelled") == 0
    assert "process_cpu_seconds_total" in names(after)


def test_a_fresh_worker_lists_its_metrics_before_any_task(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    port = free_port()
    worker = start_worker(
        tmp_path / "worker.log",
        concurrency=1,
        queues=f"q-fresh-{uuid.uuid4().hex[:8]}",  # no task reaches it
        env={"TASKSERVICE_KEY_PREFIX": PREFIX, "TASKSERVICE_WORKER_METRICS_PORT": str(port)},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as got:
                    text = got.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.1)
    finally:
        stop_process_group(worker)
    # A dashboard or an alert on them finds them from the start.
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name, kind in (
        ("taskservice_tasks_ended", "counter"),
        ("taskservice_task_duration_seconds", "histogram"),
        ("taskservice_tasks_refused", "counter"),
    ):
        assert families[name].type == kind, text
        assert families[name].documentation, text
        assert not families[name].samples, text
    assert text.count("# TYPE taskservice_tasks_ended_total counter") == 1, text


async def test_worker_metrics_sum_its_pool_processes(
    stack: Stack, stub: pb_grpc.TaskServiceStub
) -> None:
    before = await scrape(stack.worker_metrics_port)
    # Four at once on two pool processes: both run some.
    ids = [
        (await stub.Start(on_queue(start_request("test.sleep", 0.3), QUEUE))).task.id
        for _ in range(4)
    ]
    ids.append((await stub.Start(on_queue(start_request("test.non_json"), QUEUE))).task.id)
    finals = [(await watch_all(stub, task_id))[-1] for task_id in ids]
    assert [t.state for t in finals] == [pb.TASK_STATE_SUCCEEDED] * 4 + [pb.TASK_STATE_FAILED]
    assert len({t.worker for t in finals}) == 1

    duration = "taskservice_task_duration_seconds"
    after = await until_counted(
        stack.worker_metrics_port,
        lambda s: (
            value(s, f"{duration}_count", task_name="test.non_json", state="failed")
            > value(before, f"{duration}_count", task_name="test.non_json", state="failed")
            and value(s, f"{duration}_count", task_name="test.sleep", state="succeeded")
            - value(before, f"{duration}_count", task_name="test.sleep", state="succeeded")
            >= 4
        ),
    )

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew(f"{duration}_count", task_name="test.sleep", state="succeeded") == 4
    assert grew(f"{duration}_sum", task_name="test.sleep", state="succeeded") >= 4 * 0.3
    assert grew(f"{duration}_bucket", task_name="test.sleep", state="succeeded", le="0.25") == 0
    assert grew(f"{duration}_bucket", task_name="test.sleep", state="succeeded", le="1.0") == 4
    assert grew(f"{duration}_count", task_name="test.non_json", state="failed") == 1
    ended = "taskservice_tasks_ended_total"
    assert grew(ended, task_name="test.sleep", state="succeeded") == 4
    assert grew(ended, task_name="test.non_json", state="failed") == 1

    # Celery's own line on each outcome carries the task's fields.
    lines = json_lines(stack.worker_log)
    for task_id in ids:
        about = [line for line in lines if line.get("task_id") == task_id]
        assert any("succeeded" in line["event"] or "raised" in line["event"] for line in about)
        assert {line["task_name"] for line in about} <= {"test.sleep", "test.non_json"}


async def test_a_lapsed_lease_is_counted_and_logged_with_its_task(
    stack: Stack, stub: pb_grpc.TaskServiceStub, redis_server: EmbeddedRedis
) -> None:
    before = await scrape(stack.metrics_port)
    key = f"obs-{uuid.uuid4().hex[:8]}"
    task = (await stub.Start(on_queue(start_request("test.sleep", 60, key=key), PARKED))).task
    watch = stub.WatchStatus(pb.WatchStatusRequest(task_id=task.id))
    assert (await watch.read()).task.state == pb.TASK_STATE_QUEUED
    # A worker that starts the task and dies at once: only its lease is left,
    # to lapse. (The watch reads nothing meanwhile: a read would end the
    # task itself, uncounted, before the sweeper could.)
    scripts = Scripts(PREFIX, Settings().record_ttl)
    call = scripts.start(
        task.id, worker="ghost@nowhere", run="ghost", lease_ms=200, when=time.time()
    )
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        script = client.register_script(call.script.source)
        assert script(keys=call.keys, args=call.args)[0] == "started"
    finally:
        client.close()
    states = await rest(watch)
    assert states[-1] == pb.TASK_STATE_LOST and set(states) <= {pb.TASK_STATE_RUNNING, *TERMINAL}

    after = await until_counted(
        stack.metrics_port,
        lambda s: (
            value(s, "taskservice_lease_expiries_total")
            > value(before, "taskservice_lease_expiries_total")
        ),
    )
    assert (
        value(after, "taskservice_lease_expiries_total")
        - value(before, "taskservice_lease_expiries_total")
        == 1
    )
    ended = "taskservice_tasks_ended_total"
    assert (
        value(after, ended, task_name="test.sleep", state="lost")
        - value(before, ended, task_name="test.sleep", state="lost")
        == 1
    )
    lines = [line for line in json_lines(stack.server_log) if line.get("task_id") == task.id]
    lapsed = [line for line in lines if "lease lapsed" in line["event"]]
    assert len(lapsed) == 1, lines
    assert lapsed[0]["exclusivity_key"] == key
    assert lapsed[0]["level"] == "info" and lapsed[0]["logger"] == "taskservice.server.sweeper"
    assert "timestamp" in lapsed[0]


async def test_server_log_lines_about_a_call_carry_its_task_and_request_ids(
    stack: Stack, stub: pb_grpc.TaskServiceStub
) -> None:
    key = f"obs-{uuid.uuid4().hex[:8]}"
    start = on_queue(start_request("test.sleep", 60, key=key), PARKED)
    start.request_id = f"start-{uuid.uuid4().hex}"
    task = (await stub.Start(start)).task
    request_id = f"cancel-{uuid.uuid4().hex}"
    await stub.Cancel(pb.CancelRequest(task_id=task.id, request_id=request_id))

    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in json_lines(stack.server_log) if line.get("task_id") == task.id]
        if lines or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert len(lines) == 1, lines
    assert "cancelled" in lines[0]["event"] and "queued" in lines[0]["event"]
    assert lines[0]["exclusivity_key"] == key
    assert lines[0]["request_id"] == request_id
    # Every line of the log is JSON: the server's, grpc's and the libraries'.
    text = stack.server_log.read_text().splitlines()
    assert text and all(line.startswith("{") for line in text), text[:5]


def test_serve_with_several_processes_serves_the_sum_of_their_metrics(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    log, metrics_port, port = tmp_path / "serve.log", free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TASKSERVICE_KEY_PREFIX": PREFIX,
        "TASKSERVICE_PORT": str(port),
        "TASKSERVICE_METRICS_PORT": str(metrics_port),
    }
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "taskservice", "serve", "--processes=2"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("taskservice listening") < 2:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        # Connections of their own (no shared subchannel), which the kernel
        # spreads over both processes.
        for _ in range(8):
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stub = pb_grpc.TaskServiceStub(channel)
                for _ in range(5):
                    with pytest.raises(grpc.RpcError):
                        stub.GetStatus(pb.GetStatusRequest(task_id=str(uuid.uuid4())))
        samples = _scrape(metrics_port)
        calls = "taskservice_rpc_requests_total"
        assert value(samples, calls, method="GetStatus", code="NOT_FOUND") == 40
        assert value(samples, "taskservice_rpc_duration_seconds_count", method="GetStatus") == 40
        assert value(samples, "taskservice_watch_streams") == 0
    finally:
        stop_process_group(server)
    assert server.returncode == 0, log.read_text()
