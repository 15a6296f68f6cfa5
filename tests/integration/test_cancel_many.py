"""CancelTasks: every active task ListTasks' filters select, a bounded page
per call, resumable with a token; queued ones never run, running ones stop."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import hypothesis
import pytest
from google.protobuf import duration_pb2
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from pydantic import SecretStr

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.core.settings import Settings
from taskservice.server.server import Server, create_server
from tests.support.client import (
    error_info,
    finished,
    running,
    start,
    start_request,
    violations,
)


def parked_queue() -> str:
    """A queue no worker consumes: its tasks stay QUEUED."""
    return f"parked-{uuid.uuid4().hex[:12]}"


async def park(
    stub: pb_grpc.TaskServiceStub, queue: str, task_name: str, count: int, **kwargs: object
) -> list[str]:
    """Start `count` tasks on `queue`; their ids, oldest first."""
    ids = []
    for _ in range(count):
        request = start_request(task_name, **kwargs)
        request.options.queue = queue
        ids.append((await stub.Start(request)).task.id)
    return ids


async def status(stub: pb_grpc.TaskServiceStub, task_id: str) -> pb.Task:
    return (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task


async def cancel_all(
    stub: pb_grpc.TaskServiceStub, *, calls_of: dict[int, int] | None = None, **request: object
) -> list[pb.CancelTasksResponse]:
    """Every CancelTasks answer, following the tokens to the end. `calls_of`
    maps a call's index to its page_size (the request's page_size otherwise)."""
    answers: list[pb.CancelTasksResponse] = []
    token = ""
    while True:
        size = (calls_of or {}).get(len(answers), request.get("page_size", 0))
        answer = await stub.CancelTasks(
            pb.CancelTasksRequest(page_token=token, **{**request, "page_size": size})  # type: ignore[arg-type]
        )
        answers.append(answer)
        token = answer.next_page_token
        if not token:
            return answers
        assert len(answers) < 50


def ended_cancelled(server: Server, task_name: str) -> float:
    """The server's count of tasks of `task_name` it ended CANCELLED."""
    (metric,) = server.operations.records.metrics.tasks_ended.collect()
    return sum(
        sample.value
        for sample in metric.samples
        if sample.name.endswith("_total")
        and sample.labels == {"task_name": task_name, "state": "cancelled"}
    )


async def test_cancelling_by_key_ends_the_queued_task_at_once_and_it_never_runs(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    out = tmp_path / "queued"
    request = start_request("test.write_after", key=key, path=str(out), seconds=0)
    request.options.countdown.CopyFrom(duration_pb2.Duration(seconds=1))
    queued = (await stub.Start(request)).task
    other = tmp_path / "other"
    bystander = await start(stub, "test.write_after", key=key + "-b", path=str(other), seconds=0.5)

    answer = await stub.CancelTasks(pb.CancelTasksRequest(exclusivity_key=key))
    assert (answer.ended_count, answer.requested_count) == (1, 0)
    assert list(answer.task_ids) == [queued.id]
    assert answer.next_page_token == ""
    cancelled = await status(stub, queued.id)
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    assert cancelled.cancel_mode == pb.CANCEL_MODE_KILL  # UNSPECIFIED means KILL
    # The key is free at once.
    follow_up = await start(stub, "test.echo", "next", key=key)
    assert (await finished(stub, follow_up.id)).state == pb.TASK_STATE_SUCCEEDED
    # Another key's task was not touched.
    assert (await finished(stub, bystander.id)).state == pb.TASK_STATE_SUCCEEDED
    await asyncio.sleep(1.5)  # past the countdown: it must still not have run
    assert not out.exists() and not Path(str(out) + ".pid").exists()
    assert not (await status(stub, queued.id)).HasField("start_time")
    # Nothing active is left under the key: a second call cancels nothing.
    again = await stub.CancelTasks(pb.CancelTasksRequest(exclusivity_key=key))
    assert (again.ended_count, again.requested_count, list(again.task_ids)) == (0, 0, [])


async def test_a_running_task_cancelled_with_kill_is_asked_to_stop_and_ends_cancelled(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    task = await start(stub, "test.write_after", key=key, path=str(out), seconds=1.5)
    await running(stub, task.id, Path(str(out) + ".pid"))
    answer = await stub.CancelTasks(
        pb.CancelTasksRequest(exclusivity_key=key, mode=pb.CANCEL_MODE_KILL)
    )
    # Not waited for: counted as asked to stop, not as ended.
    assert (answer.ended_count, answer.requested_count) == (0, 1)
    assert list(answer.task_ids) == [task.id]
    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_CANCELLED
    assert done.cancel_mode == pb.CANCEL_MODE_KILL
    assert not done.HasField("result")
    follow_up = await start(stub, "test.echo", "next", key=key)
    await finished(stub, follow_up.id)
    await asyncio.sleep(2)
    assert not out.exists(), "the cancelled task's side effect happened"


async def test_cancelling_by_name_and_state_cancels_only_what_matches(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    queue = parked_queue()
    queued = await park(stub, queue, "test.write_after", 2, path=str(tmp_path / "q"), seconds=0)
    (echo,) = await park(stub, queue, "test.echo", 1)
    out = tmp_path / "running"
    runs = await start(stub, "test.write_after", key=key, path=str(out), seconds=30)
    await running(stub, runs.id, Path(str(out) + ".pid"))

    answer = await stub.CancelTasks(
        pb.CancelTasksRequest(task_name="test.write_after", states=[pb.TASK_STATE_QUEUED])
    )
    assert set(queued) <= set(answer.task_ids)
    assert runs.id not in answer.task_ids and echo not in answer.task_ids
    assert answer.requested_count == 0
    assert answer.ended_count == len(answer.task_ids)
    for task_id in answer.task_ids:
        task = await status(stub, task_id)
        assert (task.task_name, task.state) == ("test.write_after", pb.TASK_STATE_CANCELLED)
    assert (await status(stub, runs.id)).state == pb.TASK_STATE_RUNNING
    assert (await status(stub, echo)).state == pb.TASK_STATE_QUEUED

    answer = await stub.CancelTasks(
        pb.CancelTasksRequest(
            task_name="test.write_after",
            states=[pb.TASK_STATE_RUNNING],
            mode=pb.CANCEL_MODE_TERMINATE,
        )
    )
    assert runs.id in answer.task_ids and answer.ended_count == 0
    assert answer.requested_count == len(answer.task_ids)
    done = await finished(stub, runs.id)
    assert done.state == pb.TASK_STATE_CANCELLED
    assert done.cancel_mode == pb.CANCEL_MODE_TERMINATE
    assert (await status(stub, echo)).state == pb.TASK_STATE_QUEUED
    await stub.Cancel(pb.CancelRequest(task_id=echo))


async def test_a_bounded_call_resumed_with_its_token_cancels_the_rest_exactly_once(
    stub: pb_grpc.TaskServiceStub, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    mine = await park(stub, parked_queue(), "test.echo", 5)
    before = ended_cancelled(server, "test.echo")
    with caplog.at_level(logging.INFO, logger="taskservice.server.cancels"):
        # Tests before this one in the process may have left parked tasks of
        # the same name: two calls of 2, then the rest in pages of 500.
        answers = await cancel_all(
            stub, task_name="test.echo", page_size=500, calls_of={0: 2, 1: 2}
        )
    # Newest first, at most page_size per call: the two newest, then the next two.
    first, second = answers[0], answers[1]
    assert first.ended_count == 2 and set(first.task_ids) == set(mine[3:])
    assert second.ended_count == 2 and set(second.task_ids) == set(mine[1:3])
    assert mine[0] in answers[2].task_ids
    every = [task_id for answer in answers for task_id in answer.task_ids]
    assert len(every) == len(set(every)), "a task was cancelled twice"
    assert set(mine) <= set(every)
    for task_id in mine:
        assert (await status(stub, task_id)).state == pb.TASK_STATE_CANCELLED
    # Counted as single cancels count: one end each.
    ended = sum(answer.ended_count for answer in answers)
    assert ended_cancelled(server, "test.echo") - before == ended
    # One log line per call, with its counts.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cancelled many")]
    assert len(lines) == len(answers)
    assert (
        lines[0]
        == "cancelled many (KILL): 2 ended, 0 running asked to stop, of 2 found; more to come"
    )


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"states": [pb.TASK_STATE_SUCCEEDED]}, "states"),
        ({"states": [pb.TASK_STATE_QUEUED, pb.TASK_STATE_CANCELLED]}, "states"),
        ({"states": [pb.TASK_STATE_UNSPECIFIED]}, "states"),
        ({"mode": 99}, "mode"),
        ({"exclusivity_key": "no spaces"}, "exclusivity_key"),
        ({"page_token": "not-a-token"}, "page_token"),
    ],
)
async def test_bad_requests_are_invalid_and_name_the_field(
    stub: pb_grpc.TaskServiceStub, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.CancelTasks(pb.CancelTasksRequest(**request_fields))  # type: ignore[arg-type]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(error.value)


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    states=st.lists(st.integers(min_value=-1, max_value=8), max_size=3),
    name=st.text(max_size=40),
    key=st.text(max_size=140),
    mode=st.integers(min_value=-1, max_value=5),
    page_size=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    token=st.text(max_size=300) | st.text("ABCDEFabcdef0123456789-_", max_size=300),
)
async def test_no_request_gets_internal(
    stub: pb_grpc.TaskServiceStub,
    states: list[int],
    name: str,
    key: str,
    mode: int,
    page_size: int,
    token: str,
) -> None:
    # No task has such a name: whatever else the request says, nothing is cancelled.
    request = pb.CancelTasksRequest(
        states=states,  # type: ignore[arg-type]
        task_name="fuzz-no-such-type." + name,
        exclusivity_key=key,
        mode=mode,  # type: ignore[arg-type]
        page_size=page_size,
        page_token=token,
    )
    try:
        answer = await stub.CancelTasks(request)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert violations(error), error.details()
    else:
        assert list(answer.task_ids) == []


async def test_a_token_only_continues_its_own_filters_and_mode(
    stub: pb_grpc.TaskServiceStub, tmp_path: Path
) -> None:
    queue = parked_queue()
    mine = await park(stub, queue, "test.write_after", 3, path=str(tmp_path / "x"), seconds=0)
    wanted = {"task_name": "test.write_after", "states": [pb.TASK_STATE_QUEUED]}
    first = await stub.CancelTasks(
        pb.CancelTasksRequest(page_size=1, mode=pb.CANCEL_MODE_GRACEFUL, **wanted)  # type: ignore[arg-type]
    )
    assert list(first.task_ids) == [mine[-1]] and first.next_page_token
    listed = await stub.ListTasks(pb.ListTasksRequest(page_size=1, **wanted))  # type: ignore[arg-type]
    assert listed.next_page_token
    for label, request in {
        "another mode": pb.CancelTasksRequest(
            page_token=first.next_page_token, mode=pb.CANCEL_MODE_KILL, **wanted
        ),
        "another filter": pb.CancelTasksRequest(
            page_token=first.next_page_token,
            mode=pb.CANCEL_MODE_GRACEFUL,
            task_name="test.write_after",
        ),
        "a ListTasks token": pb.CancelTasksRequest(
            page_token=listed.next_page_token, mode=pb.CANCEL_MODE_GRACEFUL, **wanted
        ),
    }.items():
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.CancelTasks(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        assert "page_token" in violations(error.value), label
    # The same filters and mode continue where the first call stopped.
    rest = await cancel_all(stub, mode=pb.CANCEL_MODE_GRACEFUL, **wanted)
    every = [task_id for answer in rest for task_id in answer.task_ids]
    assert set(mine[:2]) <= set(every) and mine[-1] not in every
    for task_id in mine:
        assert (await status(stub, task_id)).state == pb.TASK_STATE_CANCELLED


TOKENS = "admin s3cret-admin; starter s3cret-starter read,start"


@pytest.fixture
async def tokened(
    settings: Settings, worker_process: subprocess.Popen[bytes]
) -> AsyncIterator[Server]:
    running = await create_server(settings.model_copy(update={"tokens": SecretStr(TOKENS)}), port=0)
    yield running
    await running.stop(0)


async def test_cancelling_many_needs_the_cancel_permission(tokened: Server, key: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tokened.port}") as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        admin = (("authorization", "Bearer s3cret-admin"),)
        starter = (("authorization", "Bearer s3cret-starter"),)
        request = start_request("test.write_after", key=key, path="unused", seconds=0)
        request.options.queue = parked_queue()
        task = (await stub.Start(request, metadata=starter)).task
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CancelTasks(pb.CancelTasksRequest(exclusivity_key=key), metadata=starter)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).metadata["permission"] == "cancel"
        assert (
            await stub.GetStatus(pb.GetStatusRequest(task_id=task.id), metadata=admin)
        ).task.state == pb.TASK_STATE_QUEUED
        answer = await stub.CancelTasks(pb.CancelTasksRequest(exclusivity_key=key), metadata=admin)
        assert list(answer.task_ids) == [task.id] and answer.ended_count == 1
