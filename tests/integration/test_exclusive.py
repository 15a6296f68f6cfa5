"""Exclusive start: one unfinished task per key, however many callers and servers."""

from __future__ import annotations

import asyncio
import itertools
import random
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import stop_process_group
from tests.conftest import start_server_process
from tests.support.client import TERMINAL, error_info, finished, start_request


@pytest.fixture
async def second_server(
    worker_process: subprocess.Popen[bytes], tmp_path: Path
) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    """Another server *process* on the same Redis (`python -m taskservice serve`)."""
    process, port = await asyncio.to_thread(start_server_process, tmp_path / "server.log")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            yield pb_grpc.TaskServiceStub(channel)
    finally:
        stop_process_group(process)


async def attempt(
    target: pb_grpc.TaskServiceStub, request: pb.StartRequest
) -> pb.Task | grpc.aio.AioRpcError:
    try:
        return (await target.Start(request)).task
    except grpc.aio.AioRpcError as error:
        return error


async def test_concurrent_starts_on_one_key_from_two_processes_accept_exactly_one(
    stub: pb_grpc.TaskServiceStub, second_server: pb_grpc.TaskServiceStub, key: str
) -> None:
    request = start_request("test.sleep", key=key, seconds=2)
    outcomes = await asyncio.gather(
        *(attempt(stub if i % 2 else second_server, request) for i in range(200))
    )
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


async def test_a_thousand_concurrent_starts_on_a_held_key_all_answer_already_exists(
    stub: pb_grpc.TaskServiceStub, key: str
) -> None:
    holder = (await stub.Start(start_request("test.sleep", key=key, seconds=30))).task
    try:
        outcomes = await asyncio.gather(
            *(attempt(stub, start_request("test.echo", i, key=key)) for i in range(1000))
        )
        codes = Counter(o.code() if isinstance(o, grpc.aio.AioRpcError) else "OK" for o in outcomes)
        assert codes == {grpc.StatusCode.ALREADY_EXISTS: 1000}
        assert {
            error_info(o).metadata["task_id"]
            for o in outcomes
            if isinstance(o, grpc.aio.AioRpcError)
        } == {holder.id}
    finally:
        await stub.Cancel(pb.CancelRequest(task_id=holder.id))


async def test_start_and_cancel_churn_over_two_servers_never_runs_two_tasks_on_a_key(
    stub: pb_grpc.TaskServiceStub, second_server: pb_grpc.TaskServiceStub, key: str
) -> None:
    rng = random.Random(6)
    accepted: list[str] = []
    loop = asyncio.get_running_loop()
    until = loop.time() + 4

    async def client(number: int) -> None:
        target = stub if number % 2 else second_server
        while loop.time() < until:
            outcome = await attempt(
                target, start_request("test.sleep", key=key, seconds=rng.choice([0, 0.05, 0.2]))
            )
            if isinstance(outcome, pb.Task):
                accepted.append(outcome.id)
                if rng.random() < 0.5:
                    await asyncio.sleep(rng.random() * 0.1)
                    mode = rng.choice(list(pb.CancelMode.values()))
                    try:
                        await target.Cancel(pb.CancelRequest(task_id=outcome.id, mode=mode))
                    except grpc.aio.AioRpcError as error:  # it finished first
                        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            else:
                assert outcome.code() == grpc.StatusCode.ALREADY_EXISTS, outcome.details()
                await asyncio.sleep(rng.random() * 0.05)

    await asyncio.gather(*(client(n) for n in range(8)))
    assert len(accepted) >= 8
    history = [await finished(stub, task_id) for task_id in accepted]
    assert all(t.state in TERMINAL for t in history)
    # The tasks that ran did so one at a time: each started after the one
    # before it had ended (a task cancelled while queued never started).
    spans = sorted(
        (t.start_time.ToNanoseconds(), t.end_time.ToNanoseconds(), t.id)
        for t in history
        if t.HasField("start_time")
    )
    assert len(spans) >= 2
    for (_, end, earlier), (begin, _, later) in itertools.pairwise(spans):
        assert end <= begin, f"{later} started while {earlier} still ran"
