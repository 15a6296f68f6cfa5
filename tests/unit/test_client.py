"""The sync client against grpcio-testing's channel: this test plays the server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from taskservice import (
    Client,
    ConflictPolicy,
    InvalidArgument,
    NotFound,
    TaskAlreadyRunning,
    TaskNotFound,
    TaskServiceError,
    TaskState,
)
from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice.client import Task, channel_target
from taskservice.client.models import to_value

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
    with pytest.raises(TaskAlreadyRunning) as raised:
        future.result(5)
    assert raised.value.task_id == TASK_ID
    assert raised.value.reason == "TASK_ALREADY_RUNNING"
    assert raised.value.code == "ALREADY_EXISTS"


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
    with pytest.raises(ValueError, match="state 'done' is none of QUEUED, RUNNING"):
        list(client.list_tasks(states=["done"]))


def test_each_error_is_the_class_the_server_raised_else_its_codes_base(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    cases = [
        ("TASK_NOT_FOUND", grpc.StatusCode.NOT_FOUND, TaskNotFound),
        ("SOMETHING_NEWER", grpc.StatusCode.NOT_FOUND, NotFound),  # a newer server's reason
        ("TASK_ALREADY_RUNNING", grpc.StatusCode.NOT_FOUND, NotFound),  # reason of another code
    ]
    for reason, code, expected in cases:
        future = call(client.get, TASK_ID)
        _, _, rpc = channel.take_unary_unary(method("GetStatus"))
        info = error_details_pb2.ErrorInfo(reason=reason, domain="taskservice.dev")
        rpc.terminate(None, details(info), code, "gone")
        with pytest.raises(TaskServiceError) as raised:
            future.result(5)
        assert type(raised.value) is expected, reason
        assert (raised.value.code, raised.value.reason) == ("NOT_FOUND", reason)
    future = call(client.get, TASK_ID)
    _, _, rpc = channel.take_unary_unary(method("GetStatus"))
    rpc.terminate(None, (), grpc.StatusCode.DATA_LOSS, "lost")
    with pytest.raises(TaskServiceError) as raised:
        future.result(5)
    assert type(raised.value) is TaskServiceError and raised.value.code == "DATA_LOSS"


def test_policy_and_states_are_enums_end_to_end(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(client.start, "demo.dummy", conflict_policy=ConflictPolicy.RETURN_EXISTING)
    _, request, rpc = channel.take_unary_unary(method("Start"))
    assert request.conflict_policy == pb.CONFLICT_POLICY_RETURN_EXISTING
    answer = pb.Task(id=TASK_ID, state=pb.TASK_STATE_RUNNING, cancel_mode=pb.CANCEL_MODE_GRACEFUL)
    rpc.terminate(pb.StartResponse(task=answer, already_existed=True), (), grpc.StatusCode.OK, "")
    task = future.result(5)
    assert task.state is TaskState.RUNNING and task.already_existed
    assert task.cancel_mode == "GRACEFUL" and not task.terminal
    unknown = Task.from_message(pb.Task(id=TASK_ID, state=99))  # a newer server's state
    assert unknown.state is TaskState.UNSPECIFIED
    with pytest.raises(ValueError, match="conflict_policy 'sometimes' is none of REJECT"):
        client.start("demo.dummy", conflict_policy="sometimes")


# -- Several servers: the gRPC target a client builds ---------------------------


def round_robin(options: list[tuple[str, str | int]]) -> dict[str, Any]:
    """The service config among `options` (asserting it is the only one)."""
    configs = [json.loads(str(value)) for name, value in options if name == "grpc.service_config"]
    assert len(configs) == 1
    assert ("grpc.service_config_disable_resolution", 1) in options
    return configs[0]  # type: ignore[no-any-return]


def test_several_addresses_become_one_round_robin_target_that_checks_health() -> None:
    target, options = channel_target(" 127.0.0.1:50051, 10.0.0.2:50052,")
    assert target == "ipv4:127.0.0.1:50051,10.0.0.2:50052"
    assert round_robin(options) == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "taskservice.v1.TaskService"},
    }
    # TLS checks the certificate against the first address as written.
    assert ("grpc.default_authority", "127.0.0.1:50051") in options
    # A list says the same.
    assert channel_target(["127.0.0.1:50051", "10.0.0.2:50052"]) == (target, options)


def test_ipv6_among_the_addresses_makes_an_ipv6_target_with_ipv4_mapped() -> None:
    target, options = channel_target("[::1]:7001,127.0.0.1:7002,[2001:db8::5]:7003")
    assert target == "ipv6:[::1]:7001,[::ffff:127.0.0.1]:7002,[2001:db8::5]:7003"
    assert round_robin(options)["loadBalancingConfig"] == [{"round_robin": {}}]


def test_host_names_in_a_list_are_resolved_once_and_duplicates_dropped() -> None:
    target, options = channel_target("localhost:7001,127.0.0.1:7001,127.0.0.1:7002")
    assert target.count("127.0.0.1:7001") == 1 and "127.0.0.1:7002" in target
    assert "localhost" not in target
    assert ("grpc.default_authority", "localhost:7001") in options


def test_one_address_or_another_kind_of_target_is_left_to_grpc() -> None:
    assert channel_target("127.0.0.1:50051") == ("127.0.0.1:50051", [])
    assert channel_target(["tasks.internal:50051"]) == ("tasks.internal:50051", [])
    assert channel_target("unix:/run/taskservice.sock") == ("unix:/run/taskservice.sock", [])
    # A DNS name gRPC re-resolves, or an explicit address list: round robin.
    for given in ("dns:///tasks.internal:50051", "ipv4:127.0.0.1:1,127.0.0.1:2"):
        target, options = channel_target(given)
        assert target == given
        assert round_robin(options)["healthCheckConfig"]["serviceName"]


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1:1,tasks", "expected host:port"),
        ("127.0.0.1:1,::1:2", "expected host:port"),  # IPv6 needs brackets
        ("127.0.0.1:1,h:0", "expected host:port"),
        ("127.0.0.1:1,h:70000", "expected host:port"),
        ("127.0.0.1:1,nothing.invalid:2", "cannot resolve nothing.invalid"),
        (" , ", "no server address"),
    ],
)
def test_a_bad_address_in_a_list_is_refused_saying_which(address: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        channel_target(address)
