"""Cancel: queued tasks never run; running tasks stop as the mode says."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import stop_process_group
from tests.conftest import start_worker
from tests.support.client import (
    error_info,
    finished,
    running,
    start,
    start_request,
    wait_until,
)


async def test_cancel_of_a_queued_task_means_it_never_runs(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    request = start_request("test.write_after", key=key, path=str(out), seconds=0)
    request.options.countdown.CopyFrom(duration_pb2.Duration(seconds=1))
    task = (await stub.Start(request)).task
    cancelled = (
        await stub.Cancel(pb.CancelRequest(task_id=task.id, mode=pb.CANCEL_MODE_GRACEFUL))
    ).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    assert cancelled.cancel_mode == pb.CANCEL_MODE_GRACEFUL
    assert cancelled.HasField("end_time")
    # The key is free at once.
    follow_up = await start(stub, "test.echo", "next", key=key)
    await finished(stub, follow_up.id)
    await asyncio.sleep(1.5)  # past the countdown: it must still not have run
    assert not out.exists()
    assert not Path(str(out) + ".pid").exists()
    status = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert status.state == pb.TASK_STATE_CANCELLED
    assert not status.HasField("start_time")


@pytest.mark.parametrize(
    "mode", [pb.CANCEL_MODE_KILL, pb.CANCEL_MODE_TERMINATE, pb.CANCEL_MODE_UNSPECIFIED]
)
async def test_cancel_stops_a_running_task_before_its_side_effect(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path, mode: pb.CancelMode.ValueType
) -> None:
    out = tmp_path / "out"
    task = await start(stub, "test.write_after", key=key, path=str(out), seconds=1.5)
    await running(stub, task.id, Path(str(out) + ".pid"))
    cancelled = (await stub.Cancel(pb.CancelRequest(task_id=task.id, mode=mode))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    expected_mode = pb.CANCEL_MODE_KILL if mode == pb.CANCEL_MODE_UNSPECIFIED else mode
    assert cancelled.cancel_mode == expected_mode
    assert not cancelled.HasField("result")
    # The key is free: a new task starts under it at once.
    follow_up = await start(stub, "test.echo", "next", key=key)
    await finished(stub, follow_up.id)
    await asyncio.sleep(2)
    assert not out.exists(), "the cancelled task's side effect happened"


async def test_graceful_cancel_lets_a_running_task_finish_then_ends_cancelled(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    task = await start(stub, "test.write_after", key=key, path=str(out), seconds=2)
    await running(stub, task.id, Path(str(out) + ".pid"))
    response = (
        await stub.Cancel(pb.CancelRequest(task_id=task.id, mode=pb.CANCEL_MODE_GRACEFUL))
    ).task
    assert response.state == pb.TASK_STATE_RUNNING
    assert response.cancel_mode == pb.CANCEL_MODE_GRACEFUL
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # still holds its key
        await start(stub, "test.echo", key=key)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_CANCELLED
    assert out.read_text() == "done"
    assert done.result.string_value == "done"  # it ran to its end: nothing lost


async def test_graceful_cancel_stops_a_task_that_checks_for_it(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    task = await start(stub, "demo.progress", steps=50, seconds_per_step=0.05)
    await wait_until(stub, task.id, lambda t: t.progress.current >= 1)
    await stub.Cancel(pb.CancelRequest(task_id=task.id, mode=pb.CANCEL_MODE_GRACEFUL))
    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_CANCELLED
    assert done.error.type == "InterruptedError"
    assert done.progress.current < 50


async def test_cancel_is_idempotent(stub: pb_grpc.TaskServiceStub, tmp_path: Path) -> None:
    out = tmp_path / "out"
    task = await start(stub, "test.write_after", path=str(out), seconds=1.5)
    await running(stub, task.id, Path(str(out) + ".pid"))
    first = (await stub.Cancel(pb.CancelRequest(task_id=task.id))).task
    second = (await stub.Cancel(pb.CancelRequest(task_id=task.id))).task
    assert first.state == second.state == pb.TASK_STATE_CANCELLED
    assert second.sequence == first.sequence


async def test_cancel_of_a_finished_task_is_a_failed_precondition(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    task = await start(stub, "test.echo", 1)
    await finished(stub, task.id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Cancel(pb.CancelRequest(task_id=task.id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "TASK_FINISHED"
    # The API's state name, not Celery's ("SUCCESS").
    assert "already finished (TASK_STATE_SUCCEEDED)" in (caught.value.details() or "")
    status = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert status.state == pb.TASK_STATE_SUCCEEDED


async def test_a_task_whose_worker_process_dies_ends_lost_and_frees_its_key(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    pid_file = Path(str(out) + ".pid")
    task = await start(stub, "test.write_after", key=key, path=str(out), seconds=3)
    await running(stub, task.id, pid_file)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # as the OOM killer would
    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_LOST
    assert done.error.type == "WorkerLostError"
    follow_up = await start(stub, "test.echo", key=key)
    await finished(stub, follow_up.id)


async def test_a_cancel_made_while_no_worker_listens_still_wins(
    stub: pb_grpc.TaskServiceStub, tmp_path: Path
) -> None:
    # No worker consumes this queue yet, so none hears Celery's revoke
    # broadcast; the worker that comes later must still not run the task.
    queue = f"parked-{tmp_path.name}"[:60]
    out = tmp_path / "out"
    request = start_request("test.write_after", path=str(out), seconds=0)
    request.options.queue = queue
    task = (await stub.Start(request)).task
    assert (
        await stub.Cancel(pb.CancelRequest(task_id=task.id))
    ).task.state == pb.TASK_STATE_CANCELLED
    late = await asyncio.to_thread(
        start_worker, tmp_path / "late-worker.log", concurrency=1, queues=queue
    )
    try:
        # A task queued after it shows the late worker is consuming.
        marker = start_request("test.echo", "after")
        marker.options.queue = queue
        after = (await stub.Start(marker)).task
        assert (await finished(stub, after.id)).state == pb.TASK_STATE_SUCCEEDED
    finally:
        stop_process_group(late)
    assert not out.exists() and not Path(str(out) + ".pid").exists()
    status = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert status.state == pb.TASK_STATE_CANCELLED
    assert "not running it" in (tmp_path / "late-worker.log").read_text()


async def test_terminate_lets_the_task_clean_up_and_kill_does_not(
    stub: pb_grpc.TaskServiceStub, tmp_path: Path
) -> None:
    for mode, cleaned_up in [(pb.CANCEL_MODE_TERMINATE, True), (pb.CANCEL_MODE_KILL, False)]:
        marker = tmp_path / pb.CancelMode.Name(mode)
        task = await start(stub, "test.finally_marker", path=str(marker), seconds=30, cleanup=1.5)
        await running(stub, task.id, Path(str(marker) + ".pid"))
        done = (await stub.Cancel(pb.CancelRequest(task_id=task.id, mode=mode))).task
        # CANCELLED only once the task really stopped: a TERMINATE waits for
        # its 1.5 s of cleanup, which a KILL never lets happen.
        assert done.state == pb.TASK_STATE_CANCELLED
        assert marker.exists() == cleaned_up, pb.CancelMode.Name(mode)
        if cleaned_up:
            assert done.error.type == "Terminated"


async def test_a_cancel_after_a_retry_never_frees_the_key_while_the_retry_runs(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    task = await start(stub, "test.retry_then_sleep", str(marker), 2, key=key)
    # The second run (countdown 0) is under way: the record says so.
    await running(stub, task.id, Path(str(marker) + ".pid"))
    status = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert status.state == pb.TASK_STATE_RUNNING
    cancelled = (
        await stub.Cancel(pb.CancelRequest(task_id=task.id, mode=pb.CANCEL_MODE_GRACEFUL))
    ).task
    assert cancelled.state == pb.TASK_STATE_RUNNING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await start(stub, "test.echo", key=key)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_CANCELLED
    assert done.result.string_value == "second run"
