"""Start, results and failures, end to end through a real worker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
import redis.asyncio
from google.protobuf import duration_pb2

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.core import record
from taskservice.core.scripts import Scripts
from taskservice.core.settings import Settings
from taskservice.server.publisher import Delivery
from taskservice.server.server import Server
from tests.support.client import error_info, finished, start, start_request, value, watch_all


async def test_start_runs_the_task_and_returns_its_result(
    stub: pb_grpc.TaskServiceStub, key: str
) -> None:
    task = await start(stub, "demo.dummy", key=key, name="Alice", seconds=0.1)
    assert task.state == pb.TASK_STATE_QUEUED
    assert task.task_name == "demo.dummy"
    assert task.exclusivity_key == key
    assert task.sequence == 1
    assert task.HasField("create_time")

    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_SUCCEEDED
    assert done.result == value("Hello Alice!")
    assert done.worker.startswith("test-")
    assert done.start_time.ToNanoseconds() >= done.create_time.ToNanoseconds()
    assert done.end_time.ToNanoseconds() >= done.start_time.ToNanoseconds()
    assert not done.HasField("error")


async def test_seed_behaviour_second_dummy_is_rejected_with_the_first_id(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    # Zero options, as the seed did: demo.dummy's default key is "demo".
    first = (await stub.Start(pb.StartRequest(task_name="demo.dummy", kwargs=None))).task
    try:
        assert first.exclusivity_key == "demo"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Start(pb.StartRequest(task_name="demo.dummy"))
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert first.id in (caught.value.details() or "")
        # It names the policy as the API spells it.
        assert "conflict_policy CONFLICT_POLICY_RETURN_EXISTING" in (caught.value.details() or "")
        info = error_info(caught.value)
        assert info.reason == "TASK_ALREADY_RUNNING"
        assert info.metadata["task_id"] == first.id
    finally:
        await stub.Cancel(pb.CancelRequest(task_id=first.id))
    # Cancelled: the key is free again.
    again = (await stub.Start(start_request("demo.dummy", seconds=0))).task
    assert again.id != first.id
    assert (await finished(stub, again.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_return_existing_answers_ok_with_the_running_task(
    stub: pb_grpc.TaskServiceStub, key: str
) -> None:
    first = await start(stub, "test.sleep", key=key, seconds=2)
    request = start_request("demo.dummy", key=key, seconds=0)
    request.conflict_policy = pb.CONFLICT_POLICY_RETURN_EXISTING
    response = await stub.Start(request)
    assert response.already_existed
    assert response.task.id == first.id
    await stub.Cancel(pb.CancelRequest(task_id=first.id))


async def test_a_finished_task_frees_its_key(stub: pb_grpc.TaskServiceStub, key: str) -> None:
    first = await start(stub, "test.echo", 1, key=key)
    await finished(stub, first.id)
    second = await start(stub, "test.echo", 2, key=key)
    assert second.id != first.id
    assert (await finished(stub, second.id)).result == value(2)


async def test_results_are_typed(stub: pb_grpc.TaskServiceStub) -> None:
    payload = {"a": [1, 2.5, None, True], "b": {"c": "d"}}
    task = await start(stub, "test.echo", payload)
    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_SUCCEEDED
    assert done.result == value(payload)
    assert (
        done.result.struct_value.fields["a"].list_value.values[2].WhichOneof("kind") == "null_value"
    )


async def test_whole_numbers_arrive_as_int_and_null_result_is_set(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    # demo.progress does range(steps): a float would raise TypeError.
    task = await start(stub, "demo.progress", steps=1, seconds_per_step=0)
    assert (await finished(stub, task.id)).result == value({"steps": 1})
    none = await finished(stub, (await start(stub, "test.echo")).id)
    assert none.state == pb.TASK_STATE_SUCCEEDED
    assert none.HasField("result")
    assert none.result.WhichOneof("kind") == "null_value"


async def test_failure_carries_type_message_and_traceback(stub: pb_grpc.TaskServiceStub) -> None:
    task = await start(stub, "demo.fail", "boom")
    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_FAILED
    assert done.error.type == "ValueError"
    assert done.error.message == "boom"
    assert "Traceback (most recent call last)" in done.error.traceback
    assert "raise ValueError(message)" in done.error.traceback
    assert not done.HasField("result")


async def test_a_result_json_cannot_encode_fails_with_encode_error(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    done = await finished(stub, (await start(stub, "test.non_json")).id)
    assert done.state == pb.TASK_STATE_FAILED
    assert done.error.type == "EncodeError"
    assert "object" in done.error.message


async def test_a_result_json_cannot_encode_fails_even_when_celery_stores_no_result(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    done = await finished(stub, (await start(stub, "test.non_json_ignored")).id)
    assert done.state == pb.TASK_STATE_FAILED
    assert done.error.type == "EncodeError"


async def test_time_limit_fails_the_task(stub: pb_grpc.TaskServiceStub, tmp_path) -> None:  # type: ignore[no-untyped-def]
    request = start_request("test.write_after", path=str(tmp_path / "out"), seconds=5)
    request.options.time_limit.CopyFrom(duration_pb2.Duration(seconds=1))
    task = (await stub.Start(request)).task
    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_FAILED
    assert done.error.type == "TimeLimitExceeded"
    assert not (tmp_path / "out").exists()


async def test_countdown_delays_the_task(stub: pb_grpc.TaskServiceStub) -> None:
    request = start_request("test.echo", "later")
    request.options.countdown.CopyFrom(duration_pb2.Duration(seconds=1))
    task = (await stub.Start(request)).task
    assert task.HasField("scheduled_time")
    assert task.scheduled_time.ToNanoseconds() - task.create_time.ToNanoseconds() >= 0.9e9
    await asyncio.sleep(0.5)
    status = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert status.state == pb.TASK_STATE_QUEUED
    done = await finished(stub, task.id)
    assert done.state == pb.TASK_STATE_SUCCEEDED
    assert done.start_time.ToNanoseconds() >= task.scheduled_time.ToNanoseconds() - 50_000_000


async def test_a_task_on_a_queue_no_worker_consumes_stays_queued(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    request = start_request("test.echo", 1)
    request.options.queue = "nobody-listens"
    task = (await stub.Start(request)).task
    assert task.queue == "nobody-listens"
    await asyncio.sleep(0.5)
    assert (
        await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))
    ).task.state == pb.TASK_STATE_QUEUED
    cancelled = (await stub.Cancel(pb.CancelRequest(task_id=task.id))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED


async def test_get_status_by_key_gives_the_current_else_latest_task(
    stub: pb_grpc.TaskServiceStub, key: str
) -> None:
    first = await start(stub, "test.echo", "one", key=key)
    await finished(stub, first.id)
    by_key = (await stub.GetStatus(pb.GetStatusRequest(exclusivity_key=key))).task
    assert by_key.id == first.id and by_key.state == pb.TASK_STATE_SUCCEEDED
    second = await start(stub, "test.echo", "two", key=key)
    by_key = (await stub.GetStatus(pb.GetStatusRequest(exclusivity_key=key))).task
    assert by_key.id == second.id
    await finished(stub, second.id)


async def test_list_task_types_lists_exposed_tasks_only(stub: pb_grpc.TaskServiceStub) -> None:
    types = {t.name: t for t in (await stub.ListTaskTypes(pb.ListTaskTypesRequest())).task_types}
    assert {"demo.dummy", "demo.fail", "demo.progress", "test.echo"} <= set(types)
    assert not [name for name in types if name.startswith("celery.")]
    dummy = types["demo.dummy"]
    assert dummy.default_exclusivity_key == "demo"
    assert "greet" in dummy.description
    params = {p.name: p for p in dummy.parameters}
    assert list(params) == ["name", "seconds"]
    assert params["name"].default_value == value("Bob")
    assert not params["name"].required
    assert params["name"].annotation == "str"
    assert params["name"].kind == pb.PARAMETER_KIND_POSITIONAL_OR_KEYWORD
    assert [p.required for p in types["test.write_after"].parameters] == [True, True, False]
    # As written in the source, never quoted (test.typed's module has
    # `from __future__ import annotations`).
    assert [p.annotation for p in types["test.typed"].parameters] == [
        "int",
        "float",
        "list[str] | None",
    ]


@pytest.mark.parametrize(
    ("kind", "size", "error_type"),
    [
        ("text", 2 * 1024 * 1024, "ResultTooLarge"),
        ("text", 40 * 1024 * 1024, "ResultTooLarge"),
        ("nested", 60, "ResultNotRepresentable"),
        ("digits", 400, "ResultNotRepresentable"),
        ("nan", 0, "ResultNotRepresentable"),
    ],
)
async def test_a_result_no_client_could_read_fails_the_task_readably(
    stub: pb_grpc.TaskServiceStub, kind: str, size: int, error_type: str
) -> None:
    task = await start(stub, "test.make", kind, size)
    done = await finished(stub, task.id)
    assert (done.state, done.error.type) == (pb.TASK_STATE_FAILED, error_type)
    status = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert status.error.type == error_type
    # The event subscription survived: a later task is still watched to its end.
    after = await start(stub, "test.echo", "after")
    assert (await finished(stub, after.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_a_stored_result_no_client_could_read_is_reported_not_internal(
    stub: pb_grpc.TaskServiceStub, settings: Settings
) -> None:
    task = await start(stub, "test.echo", "x")
    await finished(stub, task.id)
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        # As a worker of another version might have stored it.
        deep = "[" * 60 + "]" * 60
        change = Scripts(settings.key_prefix, settings.record_ttl).transition(
            task.id, {record.SUCCESS}, "", {"result": deep}
        )
        await client.register_script(change.script.source)(keys=change.keys, args=change.args)
    finally:
        await client.aclose()
    status = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert status.error.type == "ResultNotRepresentable"
    messages = await watch_all(stub, task.id)
    assert messages[-1].error.type == "ResultNotRepresentable"


async def test_a_message_pushed_with_its_claim_is_the_one_kombu_would_send(
    settings: Settings, server: Server
) -> None:
    from taskservice.server.publisher import create_publisher
    from taskservice.worker.app import app

    publisher = server.operations.publisher
    assert publisher.direct  # the tests' broker is the records' Redis
    options: dict[str, Any] = {
        "args": [1, "two"],
        "kwargs": {"three": [3.5, None]},
        "queue": "q-kombu",
        "countdown": 5.0,
        "time_limit": 9.0,
        "soft_time_limit": 7.0,
    }
    push = publisher.push(Delivery("test.echo", "id-ours", **options))
    assert push is not None
    assert push[0] == "q-kombu"
    ours = json.loads(push[1])
    # A Start marks its message as claimed, through kombu too (Publisher.send).
    claimed = {record.CLAIMED_HEADER: ""}
    create_publisher(settings, app).send_task(
        "test.echo", task_id="id-kombu", headers=claimed, **options
    )
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        theirs = json.loads((await client.lrange("q-kombu", 0, -1))[0])
        await client.delete("q-kombu")
    finally:
        await client.aclose()
    for message in (ours, theirs):
        message["properties"].pop("delivery_tag")
        message["properties"].pop("reply_to")  # the sending app's id
        message["properties"]["correlation_id"] = "id"
        for header in ("id", "root_id", "eta", "origin"):
            message["headers"].pop(header)
    assert ours == theirs
