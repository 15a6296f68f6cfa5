"""The sync client against grpcio-testing's channel: this test plays the server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice.client import AlreadyRunning, Client, InvalidArgument, NotFound, Task, to_value

SERVICE = pb.DESCRIPTOR.services_by_name["TaskService"]
TASK_ID = "2b1f4bf4-0c39-4e8c-9d59-7d4d4e0c7d11"


@pytest.fixture
def channel() -> Any:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


@pytest.fixture
def client(channel: Any) -> Iterator[Client]:
    yield Client(channel=channel, token="s3cret", timeout=5)


@pytest.fixture
def call() -> Iterator[Callable[..., Future[Any]]]:
    with ThreadPoolExecutor(1) as pool:
        yield lambda function, *args, **kwargs: pool.submit(function, *args, **kwargs)


def method(name: str) -> Any:
    return SERVICE.methods_by_name[name]


def details(*messages: Any) -> tuple[tuple[str, bytes], ...]:
    status = status_pb2.Status(code=6, message="x")
    for message in messages:
        packed = any_pb2.Any()
        packed.Pack(message)
        status.details.append(packed)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def test_start_sends_arguments_options_and_token_and_decodes_the_task(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(
        client.start,
        "demo.dummy",
        ["Ann"],
        {"seconds": 1.5, "tags": ["a", None]},
        key="k1",
        countdown=2.5,
        request_id="r-1",
    )
    metadata, request, rpc = channel.take_unary_unary(method("Start"))
    assert ("authorization", "Bearer s3cret") in metadata
    assert request.task_name == "demo.dummy" and request.exclusivity_key == "k1"
    assert request.args.values[0].string_value == "Ann"
    assert request.kwargs.fields["tags"].list_value.values[1].HasField("null_value")
    assert request.options.countdown.ToNanoseconds() == 2_500_000_000
    assert request.request_id == "r-1"
    answer = pb.Task(id=TASK_ID, task_name="demo.dummy", state=pb.TASK_STATE_SUCCEEDED, sequence=3)
    answer.result.CopyFrom(to_value({"n": 2.0, "f": 0.5, "items": [1.0]}))
    answer.create_time.FromSeconds(1_700_000_000)
    rpc.terminate(pb.StartResponse(task=answer), (), grpc.StatusCode.OK, "")
    task: Task = future.result(5)
    assert (task.id, task.state, task.sequence) == (TASK_ID, "SUCCEEDED", 3)
    assert task.result == {"n": 2, "f": 0.5, "items": [1]}  # whole numbers as int
    assert task.terminal and task.create_time is not None
    assert task.create_time.timestamp() == 1_700_000_000


def test_already_exists_raises_with_the_holders_task_id(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(client.start, "demo.dummy")
    _, _, rpc = channel.take_unary_unary(method("Start"))
    info = error_details_pb2.ErrorInfo(
        reason="TASK_ALREADY_RUNNING", domain="taskservice", metadata={"task_id": TASK_ID}
    )
    rpc.terminate(None, details(info), grpc.StatusCode.ALREADY_EXISTS, "key demo is held")
    with pytest.raises(AlreadyRunning) as raised:
        future.result(5)
    assert raised.value.task_id == TASK_ID
    assert raised.value.reason == "TASK_ALREADY_RUNNING"
    assert raised.value.code == grpc.StatusCode.ALREADY_EXISTS


def test_invalid_argument_carries_the_field_violations(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(client.start, "demo.dummy", [], {"seconds": "soon"})
    _, _, rpc = channel.take_unary_unary(method("Start"))
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="kwargs.seconds", description="not a number"
            )
        ]
    )
    rpc.terminate(None, details(bad), grpc.StatusCode.INVALID_ARGUMENT, "bad arguments")
    with pytest.raises(InvalidArgument) as raised:
        future.result(5)
    assert raised.value.violations == [("kwargs.seconds", "not a number")]


def test_watch_yields_each_change_until_the_stream_ends(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(lambda: [t.state for t in client.watch(key="k1", after_sequence=2)])
    _, request, rpc = channel.take_unary_stream(method("WatchStatus"))
    assert request.exclusivity_key == "k1" and request.after_sequence == 2
    for sequence, state in ((3, pb.TASK_STATE_RUNNING), (4, pb.TASK_STATE_FAILED)):
        task = pb.Task(id=TASK_ID, state=state, sequence=sequence)
        rpc.send_response(pb.WatchStatusResponse(task=task))
    rpc.terminate((), grpc.StatusCode.OK, "")
    assert future.result(5) == ["RUNNING", "FAILED"]


def test_list_tasks_follows_page_tokens_with_the_same_filter(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(lambda: [t.id for t in client.list_tasks(states=["running"], page_size=1)])
    for token, (task_id, next_token) in zip(["", "t1"], [("a", "t1"), ("b", "")], strict=True):
        _, request, rpc = channel.take_unary_unary(method("ListTasks"))
        assert request.page_token == token
        assert list(request.states) == [pb.TASK_STATE_RUNNING] and request.page_size == 1
        response = pb.ListTasksResponse(next_page_token=next_token)
        response.tasks.add(id=task_id, state=pb.TASK_STATE_RUNNING)
        rpc.terminate(response, (), grpc.StatusCode.OK, "")
    assert future.result(5) == ["a", "b"]


def test_not_found_and_client_side_refusals(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(client.get, TASK_ID)
    _, request, rpc = channel.take_unary_unary(method("GetStatus"))
    assert request.task_id == TASK_ID
    rpc.terminate(None, (), grpc.StatusCode.NOT_FOUND, "no task")
    with pytest.raises(NotFound):
        future.result(5)
    with pytest.raises(ValueError, match="cancel mode"):
        client.cancel(TASK_ID, "softly")
    with pytest.raises(ValueError, match="one of them"):
        client.get()
    with pytest.raises(ValueError, match="unknown state"):
        list(client.list_tasks(states=["done"]))
