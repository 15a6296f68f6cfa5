"""request_id (AIP-155): a retried Start or Cancel is answered as the first one."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import free_port
from taskservice.core.settings import Settings
from tests.conftest import serving
from tests.support.client import error_info, finished, running, start_request


def with_request_id(request: pb.StartRequest, request_id: str) -> pb.StartRequest:
    request.request_id = request_id
    return request


async def test_a_start_retried_with_its_request_id_enqueues_once(
    stub: pb_grpc.TaskServiceStub, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    request = with_request_id(start_request("test.log_run", str(runs)), str(uuid.uuid4()))
    first = (await stub.Start(request)).task
    again = await asyncio.gather(*(stub.Start(request) for _ in range(20)))
    assert {r.task.id for r in again} == {first.id}
    assert not any(r.already_existed for r in again)
    await finished(stub, first.id)
    late = (await stub.Start(request)).task  # after it ended, still the same answer
    assert late.id == first.id and late.state == pb.TASK_STATE_SUCCEEDED
    await asyncio.sleep(0.5)
    assert runs.read_text().splitlines() == [first.id]


async def test_concurrent_starts_with_one_request_id_make_one_task(
    stub: pb_grpc.TaskServiceStub, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    request = with_request_id(start_request("test.log_run", str(runs)), str(uuid.uuid4()))
    answers = await asyncio.gather(*(stub.Start(request) for _ in range(30)))
    assert len({a.task.id for a in answers}) == 1
    await finished(stub, answers[0].task.id)
    assert runs.read_text().splitlines() == [answers[0].task.id]


async def test_a_request_id_reused_with_other_parameters_is_invalid(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    request_id = str(uuid.uuid4())
    await stub.Start(with_request_id(start_request("test.echo", 1), request_id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Start(with_request_id(start_request("test.echo", 2), request_id))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in (caught.value.details() or "")
    for bad in ("x" * 129, "not valid!"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Start(with_request_id(start_request("test.echo", 1), bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_start_that_failed_runs_anew_when_retried(
    stub: pb_grpc.TaskServiceStub, settings: Settings, key: str
) -> None:
    request = with_request_id(start_request("test.echo", 1, key=key), str(uuid.uuid4()))
    dead = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    async with serving(dead) as broken:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await broken.Start(request)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    task = (await stub.Start(request)).task  # the retry, on a healthy server
    assert (await finished(stub, task.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_request_ids_are_forgotten_after_their_ttl(
    stub: pb_grpc.TaskServiceStub, settings: Settings
) -> None:
    request = with_request_id(start_request("test.echo", 1), str(uuid.uuid4()))
    async with serving(settings.model_copy(update={"request_id_ttl": 1})) as forgetful:
        first = (await forgetful.Start(request)).task
        await asyncio.sleep(1.5)
        second = (await forgetful.Start(request)).task
    assert second.id != first.id


async def test_a_cancel_retried_with_its_request_id_answers_as_the_first(
    stub: pb_grpc.TaskServiceStub, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    task = (await stub.Start(start_request("test.write_after", path=str(out), seconds=2))).task
    await running(stub, task.id, Path(str(out) + ".pid"))
    cancel = pb.CancelRequest(
        task_id=task.id, mode=pb.CANCEL_MODE_GRACEFUL, request_id=str(uuid.uuid4())
    )
    first = (await stub.Cancel(cancel)).task
    assert first.state == pb.TASK_STATE_RUNNING
    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_CANCELLED
    again = (await stub.Cancel(cancel)).task
    assert again == first  # the first answer, not the task as it is now
    other = (await stub.Start(start_request("test.sleep", 5))).task
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Cancel(
            pb.CancelRequest(task_id=other.id, mode=cancel.mode, request_id=cancel.request_id)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    await stub.Cancel(pb.CancelRequest(task_id=other.id))
