"""The server under real traffic: bursts, shutdown, taken ports, undecodable requests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, stop_process_group
from taskservice.server.server import Server
from tests.conftest import ROOT, start_server_process
from tests.support.client import error_info, finished, start, start_request

METHODS = ("Start", "GetStatus", "Cancel", "WatchStatus", "ListTaskTypes")


async def test_starts_in_flight_at_sigterm_answer_ok_or_retry_never_cancelled(
    tmp_path: Path,
) -> None:
    process, port = await asyncio.to_thread(start_server_process, tmp_path / "server.log")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            await stub.ListTaskTypes(pb.ListTaskTypesRequest())  # connected

            async def attempt(n: int) -> str:
                try:
                    request = start_request("test.echo", n, key=f"sigterm-{uuid.uuid4().hex}")
                    await stub.Start(request, timeout=10)
                except grpc.aio.AioRpcError as error:
                    return error.code().name
                return "OK"

            calls = [asyncio.create_task(attempt(n)) for n in range(500)]
            await asyncio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            codes = Counter(await asyncio.gather(*calls))
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        stop_process_group(process)
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"] > 0  # the burst did meet the shutdown


async def test_clients_retrying_in_a_loop_through_a_sigterm_are_never_answered_cancelled(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """20 clients Start in a loop on one server (no health checking): after
    SHUTTING_DOWN they call again at once, after any other UNAVAILABLE 50 ms
    later. gRPC's own stop would cancel the calls in flight when it closes
    the port (19 of 20 clients met CANCELLED before the drain held them)."""
    process, port = await asyncio.to_thread(start_server_process, tmp_path / "server.log")
    codes: Counter[str] = Counter()
    exited = asyncio.Event()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TaskServiceStub(channel)

            async def client() -> None:
                while not exited.is_set():
                    request = start_request("test.echo", 1, key=f"loop-{uuid.uuid4().hex}")
                    request.options.queue = "nobody-listens"
                    try:
                        await stub.Start(request, timeout=10)
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as error:
                        codes[error.code().name] += 1
                        if error.code() == grpc.StatusCode.UNAVAILABLE and (
                            "shutting down" in (error.details() or "")
                        ):
                            assert error_info(error).reason == "SHUTTING_DOWN"
                            codes["SHUTTING_DOWN"] += 1
                            continue
                        await asyncio.sleep(0.05)

            clients = [asyncio.create_task(client()) for _ in range(20)]
            for _ in range(1000):  # under way
                if codes["OK"] >= 100:
                    break
                await asyncio.sleep(0.01)
            assert codes["OK"] >= 100, codes
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 20) == 0
            exited.set()
            await asyncio.wait_for(asyncio.gather(*clients), 15)
    finally:
        stop_process_group(process)
    assert codes["CANCELLED"] == 0, codes
    assert set(codes) <= {"OK", "UNAVAILABLE", "SHUTTING_DOWN"}, codes
    assert codes["SHUTTING_DOWN"] > 0  # the loops did meet the drain


async def test_a_burst_of_two_thousand_reads_is_all_answered(stub: pb_grpc.TaskServiceStub) -> None:
    task = (await stub.Start(start_request("test.echo", 1))).task
    answers = await asyncio.gather(
        *(stub.GetStatus(pb.GetStatusRequest(task_id=task.id)) for _ in range(2_000))
    )
    assert {a.task.id for a in answers} == {task.id}


def test_serve_on_a_taken_port_exits_at_once_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in ("serve", "dev"):
            done = subprocess.run(
                [sys.executable, "-m", "taskservice", command],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT), "TASKSERVICE_PORT": str(port)},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 1, done.stderr
            assert f"cannot listen on 127.0.0.1:{port}: the port is taken" in done.stderr
            assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("method", "payload", "reason"),
    [
        *((method, b"\xff\xff\xff", "not a valid protobuf message") for method in METHODS),
        # Field 1 is a string in every request but ListTaskTypes' (empty).
        *((method, b"\x0a\x02\xff\xfe", "not valid UTF-8") for method in METHODS[:-1]),
    ],
)
async def test_a_request_that_does_not_decode_is_invalid_argument(
    server: Server, method: str, payload: bytes, reason: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        path = f"/taskservice.v1.TaskService/{method}"
        if method == "WatchStatus":
            call = channel.unary_stream(path)(payload)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(path)(payload)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert reason in (caught.value.details() or "")
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"


async def test_json_nested_too_deep_is_invalid_argument_saying_so(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    deep: object = None
    for _ in range(40):
        deep = {"a": deep}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Start(start_request("test.echo", deep))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nested too deeply" in (caught.value.details() or "")


async def test_a_request_over_the_size_limit_is_resource_exhausted(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Start(start_request("test.echo", "x" * (5 * 1024 * 1024)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_a_watch_that_is_never_read_keeps_the_server_small(
    stub: pb_grpc.TaskServiceStub, tmp_path: Path
) -> None:
    process, port = await asyncio.to_thread(start_server_process, tmp_path / "server.log")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            lazy = pb_grpc.TaskServiceStub(channel)
            warm = await start(stub, "test.flood", 50, size=10_000)
            await finished(lazy, warm.id)
            before = rss_mib(process.pid)
            task = await start(stub, "test.flood", 20_000, size=10_000)
            call = lazy.WatchStatus(pb.WatchStatusRequest(task_id=task.id))
            await call.initial_metadata()  # open, and never read while it floods
            await finished(stub, task.id, timeout=120)
            grown = rss_mib(process.pid) - before
            # Read at last: the backlog collapsed into the latest state.
            messages = [m.task async for m in call]
    finally:
        stop_process_group(process)
    print(f"server RSS grew by {grown:.1f} MiB over 20,000 unread updates of 10 KB")
    assert grown < 64, f"the server grew by {grown:.0f} MiB"
    assert messages[-1].state == pb.TASK_STATE_SUCCEEDED
    # Not 20,000: what gRPC's flow-control windows held, then the latest.
    assert len(messages) < 2_000
    sequences = [m.sequence for m in messages]
    assert sequences == sorted(set(sequences))


async def test_ten_thousand_watches_opened_at_once_are_all_served(
    stub: pb_grpc.TaskServiceStub, tmp_path: Path
) -> None:
    process, port = await asyncio.to_thread(start_server_process, tmp_path / "server.log")
    request = start_request("test.echo", 1)
    request.options.queue = "nobody-listens"  # stays QUEUED until cancelled
    task = (await stub.Start(request)).task
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(10)]
    try:
        stubs = [pb_grpc.TaskServiceStub(c) for c in channels]
        calls = [
            stubs[n % len(stubs)].WatchStatus(pb.WatchStatusRequest(task_id=task.id))
            for n in range(10_000)
        ]
        firsts = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)), 120)
        assert {m.task.state for m in firsts} == {pb.TASK_STATE_QUEUED}
        await stub.Cancel(pb.CancelRequest(task_id=task.id))
        lasts = await asyncio.wait_for(asyncio.gather(*(c.read() for c in calls)), 120)
        assert {m.task.state for m in lasts} == {pb.TASK_STATE_CANCELLED}
    finally:
        for channel in channels:
            await channel.close()
        stop_process_group(process)
