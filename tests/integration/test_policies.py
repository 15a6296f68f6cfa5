"""Conflict policies beyond reject: REPLACE, QUEUE_LATEST, QUEUE, slots per
key, the quiet period and delayed starts, against a real Redis, worker and
server. Order is judged by the bodies' own timestamps (test.span)."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from tests.support.client import error_info, finished, start_request

QUEUED = pb.TASK_STATE_QUEUED


def spans(path: Path) -> dict[str, tuple[float, float | None]]:
    """Each body's (start, end) as it wrote them; end None if it never ended."""
    begun: dict[str, float] = {}
    ended: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            task_id, what, when = line.split()
            (begun if what == "start" else ended)[task_id] = float(when)
    return {task_id: (at, ended.get(task_id)) for task_id, at in begun.items()}


def policy_request(
    path: Path, key: str, policy: int, seconds: float = 0, **extra: object
) -> pb.StartRequest:
    request = start_request("test.span", key=key, path=str(path), seconds=seconds)
    request.conflict_policy = policy  # type: ignore[assignment]
    for name, value in extra.items():
        setattr(request, name, value)
    return request


async def test_queue_latest_runs_the_newest_waiting_input_after_the_holder(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    holder = (await stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_REJECT, 1.0))).task
    waiting = []
    for _ in range(3):
        answer = await stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_QUEUE_LATEST))
        assert answer.task.state == QUEUED
        assert answer.task.waiting_for == holder.id
        waiting.append(answer.task)
    superseded, latest = waiting[:-1], waiting[-1]
    for task, newer in zip(superseded, waiting[1:], strict=True):
        ended = await finished(stub, task.id)
        assert ended.state == pb.TASK_STATE_CANCELLED
        assert ended.error.type == "Superseded"
        assert newer.id in ended.error.message
        assert not ended.HasField("start_time")
    done = await finished(stub, latest.id)
    assert done.state == pb.TASK_STATE_SUCCEEDED
    assert done.waiting_for == ""
    assert done.fencing_token > (await finished(stub, holder.id)).fencing_token
    ran = spans(log)
    assert set(ran) == {holder.id, latest.id}, "a superseded task ran"
    holder_end = ran[holder.id][1]
    assert holder_end is not None and ran[latest.id][0] >= holder_end


async def test_queue_runs_every_waiting_task_in_order_one_at_a_time_and_bounds_the_line(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    first = (await stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_QUEUE, 0.3))).task
    assert first.waiting_for == ""
    line = []
    for _ in range(3):
        task = (await stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_QUEUE, 0.1))).task
        line.append(task)
    assert [t.waiting_for for t in line] == [first.id, line[0].id, line[1].id]
    for task in [first, *line]:
        assert (await finished(stub, task.id)).state == pb.TASK_STATE_SUCCEEDED
    ran = spans(log)
    order = [first.id] + [t.id for t in line]
    for earlier, later in itertools.pairwise(order):
        end = ran[earlier][1]
        assert end is not None and ran[later][0] >= end, f"{later} began before {earlier} ended"


async def test_a_full_line_answers_resource_exhausted_naming_the_key(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    # test.span has no line limit of its own: the server's default (100).
    holder = (await stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_QUEUE, 30))).task
    queued = await asyncio.gather(
        *(stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_QUEUE)) for _ in range(100))
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_QUEUE))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(refused.value)
    assert info.reason == "KEY_LINE_FULL"
    assert info.metadata["exclusivity_key"] == key and info.metadata["limit"] == "100"
    for answer in queued:
        await stub.Cancel(pb.CancelRequest(task_id=answer.task.id))
    await stub.Cancel(pb.CancelRequest(task_id=holder.id))
    assert not spans(log).keys() - {holder.id}


async def test_replace_stops_the_running_task_and_runs_the_new_one_after_it(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    old = (await stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_REJECT, 30))).task
    await _until_running(stub, old.id)
    new = (
        await stub.Start(
            policy_request(log, key, pb.CONFLICT_POLICY_REPLACE, replace_mode=pb.CANCEL_MODE_KILL)
        )
    ).task
    assert new.state == QUEUED and new.waiting_for == old.id
    ended = await finished(stub, old.id)
    assert ended.state == pb.TASK_STATE_CANCELLED and ended.cancel_mode == pb.CANCEL_MODE_KILL
    done = await finished(stub, new.id)
    assert done.state == pb.TASK_STATE_SUCCEEDED
    assert done.start_time.ToNanoseconds() >= ended.end_time.ToNanoseconds()
    assert spans(log)[new.id][0] >= ended.end_time.ToNanoseconds() / 1e9


async def test_replace_of_a_queued_task_ends_it_at_once_and_a_second_replace_supersedes(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    later = start_request("test.span", key=key, path=str(log))
    later.options.countdown.CopyFrom(duration_pb2.Duration(seconds=60))
    queued = (await stub.Start(later)).task
    replacing = (await stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_REPLACE, 2))).task
    replaced = await finished(stub, queued.id)
    assert replaced.state == pb.TASK_STATE_CANCELLED and replaced.error.type == "Replaced"
    # It took the key in the same step: not waiting.
    assert replacing.waiting_for == ""
    await _until_running(stub, replacing.id)
    # GRACEFUL: test.span does not stop early, so both wait for its end.
    graceful = {"replace_mode": pb.CANCEL_MODE_GRACEFUL}
    second = (
        await stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_REPLACE, **graceful))
    ).task
    third = (
        await stub.Start(policy_request(log, key, pb.CONFLICT_POLICY_REPLACE, **graceful))
    ).task
    assert second.waiting_for == replacing.id and third.waiting_for == replacing.id
    assert (await finished(stub, second.id)).error.type == "Superseded"
    assert (await finished(stub, third.id)).state == pb.TASK_STATE_SUCCEEDED
    assert set(spans(log)) == {replacing.id, third.id}


async def test_two_slots_let_two_run_at_once_and_no_more(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    request = start_request("test.span_two", key=key, path=str(log), seconds=1)
    outcomes = await asyncio.gather(
        *(stub.Start(request) for _ in range(3)), return_exceptions=True
    )
    accepted = [o.task for o in outcomes if isinstance(o, pb.StartResponse)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(accepted) == 2
    assert [e.code() for e in refused] == [grpc.StatusCode.ALREADY_EXISTS]
    for task in accepted:
        assert (await finished(stub, task.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_the_quiet_period_refuses_starts_after_a_success_and_then_frees(
    stub: pb_grpc.TaskServiceStub, key: str
) -> None:
    failed = (await stub.Start(start_request("test.quiet", key=key, fail=True))).task
    assert (await finished(stub, failed.id)).state == pb.TASK_STATE_FAILED
    ran = (await stub.Start(start_request("test.quiet", key=key))).task  # no quiet after a failure
    assert (await finished(stub, ran.id)).state == pb.TASK_STATE_SUCCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Start(start_request("test.quiet", key=key))
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = error_info(refused.value)
    assert info.reason == "KEY_QUIET" and info.metadata["task_id"] == ran.id
    assert info.metadata["free_time"].endswith("Z")
    returned = start_request("test.quiet", key=key)
    returned.conflict_policy = pb.CONFLICT_POLICY_RETURN_EXISTING
    answer = await stub.Start(returned)
    assert answer.already_existed and answer.task.id == ran.id
    deadline = time.monotonic() + 5
    while True:
        try:
            later = (await stub.Start(start_request("test.quiet", key=key))).task
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS
            assert time.monotonic() < deadline, "the key never freed"
            await asyncio.sleep(0.1)
    assert (await finished(stub, later.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_a_delayed_start_holds_its_key_and_runs_when_due(
    stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    request = start_request("test.span", key=key, path=str(log))
    request.options.countdown.CopyFrom(duration_pb2.Duration(seconds=2 * 24 * 3600))
    far = (await stub.Start(request)).task
    assert far.state == QUEUED
    assert far.scheduled_time.ToSeconds() > time.time() + 24 * 3600
    with pytest.raises(grpc.aio.AioRpcError) as held:
        await stub.Start(start_request("test.span", key=key, path=str(log)))
    assert error_info(held.value).metadata["task_id"] == far.id
    listed = await stub.ListTasks(pb.ListTasksRequest(exclusivity_key=key))
    assert [t.id for t in listed.tasks] == [far.id]
    await stub.Cancel(pb.CancelRequest(task_id=far.id))
    soon = start_request("test.span", key=key, path=str(log))
    soon.options.start_time.FromSeconds(int(time.time()) + 2)
    task = (await stub.Start(soon)).task
    done = await finished(stub, task.id, timeout=15)
    assert done.state == pb.TASK_STATE_SUCCEEDED
    assert spans(log)[task.id][0] >= task.scheduled_time.ToSeconds() - 0.05
    assert far.id not in spans(log)


async def _until_running(stub: pb_grpc.TaskServiceStub, task_id: str) -> None:
    deadline = time.monotonic() + 15
    while (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task.state == QUEUED:
        assert time.monotonic() < deadline, f"{task_id} never started"
        await asyncio.sleep(0.05)
