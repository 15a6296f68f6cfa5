"""The sync client against grpcio-testing's channel: this test plays the server."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from taskservice import (
    CancelMode,
    Client,
    ConflictPolicy,
    InvalidArgument,
    KeyLineFull,
    KeyQuiet,
    NotFound,
    TaskAlreadyRunning,
    TaskNotFound,
    TaskServiceError,
    TaskState,
)
from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice.client import CancelledTasks, Task, TaskType, channel_target
from taskservice.client.models import to_value
from tests.support.testing_channel import method

TASK_ID = "2b1f4bf4-0c39-4e8c-9d59-7d4d4e0c7d11"


@pytest.fixture
def client(channel: Any) -> Iterator[Client]:
    yield Client(channel=channel, token="s3cret", timeout=5)


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


def test_cancel_tasks_sends_the_filters_and_mode_and_decodes_what_it_did(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(
        client.cancel_tasks,
        states=["queued", TaskState.RUNNING],
        task_name="demo.dummy",
        key="k1",
        mode="terminate",
        page_size=10,
        page_token="t0",
    )
    metadata, request, rpc = channel.take_unary_unary(method("CancelTasks"))
    assert ("authorization", "Bearer s3cret") in metadata
    assert list(request.states) == [pb.TASK_STATE_QUEUED, pb.TASK_STATE_RUNNING]
    assert (request.task_name, request.exclusivity_key) == ("demo.dummy", "k1")
    assert request.mode == pb.CANCEL_MODE_TERMINATE
    assert (request.page_size, request.page_token) == (10, "t0")
    response = pb.CancelTasksResponse(
        ended_count=1, requested_count=1, task_ids=["a", "b"], next_page_token="t1"
    )
    rpc.terminate(response, (), grpc.StatusCode.OK, "")
    done = future.result(5)
    assert done == CancelledTasks(ended=1, requested=1, task_ids=["a", "b"], next_page_token="t1")
    assert not done.done
    with pytest.raises(ValueError, match="cancel mode 'softly'"):
        client.cancel_tasks(mode="softly")


def test_cancel_all_follows_the_tokens_until_done_or_its_limit(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    def answer(expected: tuple[int, str], response: pb.CancelTasksResponse) -> None:
        _, request, rpc = channel.take_unary_unary(method("CancelTasks"))
        assert (request.page_size, request.page_token) == expected
        assert request.exclusivity_key == "k1" and request.mode == pb.CANCEL_MODE_KILL
        rpc.terminate(response, (), grpc.StatusCode.OK, "")

    # With a limit: pages no larger than what is left of it, and a token to go on.
    future = call(client.cancel_all, key="k1", limit=3)
    answer(
        (3, ""), pb.CancelTasksResponse(ended_count=2, task_ids=["a", "b"], next_page_token="t1")
    )
    answer(
        (1, "t1"), pb.CancelTasksResponse(requested_count=1, task_ids=["c"], next_page_token="t2")
    )
    assert future.result(5) == CancelledTasks(2, 1, ["a", "b", "c"], "t2")
    # Without: on to the last page (a page may count none while more may match).
    future = call(client.cancel_all, key="k1", page_token="t2")
    answer((0, "t2"), pb.CancelTasksResponse(next_page_token="t3"))
    answer((0, "t3"), pb.CancelTasksResponse(ended_count=1, task_ids=["d"]))
    done = future.result(5)
    assert done == CancelledTasks(1, 0, ["d"], "") and done.done
    with pytest.raises(ValueError, match="limit must be positive"):
        client.cancel_all(limit=0)


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


# -- Issue 15: waiting policies, replace mode, delayed starts, key behaviour -----


@pytest.mark.parametrize(
    ("policy", "number"),
    [
        (ConflictPolicy.REPLACE, pb.CONFLICT_POLICY_REPLACE),
        ("queue-latest", pb.CONFLICT_POLICY_QUEUE_LATEST),
        ("QUEUE", pb.CONFLICT_POLICY_QUEUE),
        ("return_existing", pb.CONFLICT_POLICY_RETURN_EXISTING),
    ],
)
def test_every_conflict_policy_reaches_the_request(
    client: Client, channel: Any, call: Callable[..., Future[Any]], policy: str, number: int
) -> None:
    future = call(client.start, "demo.dummy", key="k1", conflict_policy=policy)
    _, request, rpc = channel.take_unary_unary(method("Start"))
    assert request.conflict_policy == number
    assert request.replace_mode == pb.CANCEL_MODE_UNSPECIFIED  # the task type's
    rpc.terminate(pb.StartResponse(task=pb.Task(id=TASK_ID)), (), grpc.StatusCode.OK, "")
    future.result(5)


def test_replace_mode_and_a_countdown_of_days_are_sent_as_given(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(
        client.start,
        "demo.dummy",
        key="k1",
        conflict_policy=ConflictPolicy.REPLACE,
        replace_mode="graceful",
        countdown=3 * 86400 + 0.5,  # no client-side cap: the server keeps it
    )
    _, request, rpc = channel.take_unary_unary(method("Start"))
    assert request.conflict_policy == pb.CONFLICT_POLICY_REPLACE
    assert request.replace_mode == pb.CANCEL_MODE_GRACEFUL
    assert request.options.countdown.ToNanoseconds() == 259_200_500_000_000
    assert not request.options.HasField("start_time")
    rpc.terminate(pb.StartResponse(task=pb.Task(id=TASK_ID)), (), grpc.StatusCode.OK, "")
    future.result(5)
    with pytest.raises(ValueError, match="replace_mode 'softly' is none of GRACEFUL"):
        client.start("demo.dummy", conflict_policy="replace", replace_mode="softly")


def test_start_at_is_sent_as_start_time_in_utc(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    at = datetime.datetime(2031, 7, 1, 9, 30, 15, 250_000, tzinfo=plus_two)
    future = call(client.start, "demo.dummy", start_at=at, replace_mode=CancelMode.KILL)
    _, request, rpc = channel.take_unary_unary(method("Start"))
    assert request.options.start_time.ToJsonString() == "2031-07-01T07:30:15.250Z"
    assert not request.options.HasField("countdown")
    assert request.replace_mode == pb.CANCEL_MODE_KILL
    answer = pb.Task(id=TASK_ID, state=pb.TASK_STATE_QUEUED)
    answer.scheduled_time.FromDatetime(at)
    rpc.terminate(pb.StartResponse(task=answer), (), grpc.StatusCode.OK, "")
    task = future.result(5)
    assert task.scheduled_time == at and task.scheduled_time.tzinfo is not None
    assert not task.waiting and task.waiting_for == ""


def test_countdown_with_start_at_or_a_naive_start_at_is_refused_before_any_call(
    client: Client,
) -> None:
    # Refused at once: a call would block on this channel until its deadline.
    aware = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    with pytest.raises(ValueError, match="give countdown or start_at, not both"):
        client.start("demo.dummy", countdown=60, start_at=aware)
    with pytest.raises(ValueError, match="has no time zone: give an aware datetime"):
        client.start("demo.dummy", start_at=datetime.datetime(2031, 7, 1, 9, 30))
    with pytest.raises(TypeError, match="start_at must be a datetime, not str"):
        client.start("demo.dummy", start_at="2031-07-01T09:30:00Z")  # type: ignore[arg-type]


def test_a_waiting_task_names_the_task_it_waits_for(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(client.start, "demo.dummy", key="k1", conflict_policy="queue")
    _, _, rpc = channel.take_unary_unary(method("Start"))
    holder = "9c0d7a7e-5a43-4f0b-a3a8-1d8f6a1b2c3d"
    answer = pb.Task(id=TASK_ID, state=pb.TASK_STATE_QUEUED, waiting_for=holder)
    rpc.terminate(pb.StartResponse(task=answer), (), grpc.StatusCode.OK, "")
    task = future.result(5)
    assert (task.state, task.waiting_for, task.waiting) == ("QUEUED", holder, True)
    assert not task.already_existed and task.fencing_token == 0


def test_task_types_carry_key_slots_line_limit_quiet_period_and_replace_mode(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(client.task_types)
    _, _, rpc = channel.take_unary_unary(method("ListTaskTypes"))
    response = pb.ListTaskTypesResponse()
    shaped = response.task_types.add(
        name="reports.build",
        default_exclusivity_key="reports",
        key_slots=3,
        key_line_limit=10,
        quiet_after_success=True,
        replace_mode=pb.CANCEL_MODE_GRACEFUL,
    )
    shaped.quiet_period.FromNanoseconds(90_500_000_000)
    response.task_types.add(name="demo.dummy")
    rpc.terminate(response, (), grpc.StatusCode.OK, "")
    shaped_type, plain = future.result(5)
    assert shaped_type == TaskType(
        name="reports.build",
        description="",
        default_exclusivity_key="reports",
        parameters=[],
        key_slots=3,
        key_line_limit=10,
        quiet_period=90.5,
        quiet_after_success=True,
        replace_mode=CancelMode.GRACEFUL,
    )
    # Unset: the server's defaults, told apart from a quiet period of 0s.
    assert (plain.key_slots, plain.key_line_limit, plain.quiet_period) == (0, 0, None)
    assert (plain.quiet_after_success, plain.replace_mode) == (False, None)


def test_key_quiet_and_key_line_full_carry_their_metadata(
    client: Client, channel: Any, call: Callable[..., Future[Any]]
) -> None:
    future = call(client.start, "demo.dummy", key="k1", conflict_policy="queue")
    _, _, rpc = channel.take_unary_unary(method("Start"))
    quiet = error_details_pb2.ErrorInfo(
        reason="KEY_QUIET",
        domain="taskservice.dev",
        metadata={"task_id": TASK_ID, "free_time": "2031-07-01T07:30:15Z"},
    )
    rpc.terminate(None, details(quiet), grpc.StatusCode.ALREADY_EXISTS, "key k1 is quiet")
    with pytest.raises(KeyQuiet) as raised_quiet:
        future.result(5)
    assert raised_quiet.value.task_id == TASK_ID
    assert raised_quiet.value.metadata["free_time"] == "2031-07-01T07:30:15Z"
    future = call(client.start, "demo.dummy", key="k1", conflict_policy="queue")
    _, _, rpc = channel.take_unary_unary(method("Start"))
    full = error_details_pb2.ErrorInfo(
        reason="KEY_LINE_FULL",
        domain="taskservice.dev",
        metadata={"exclusivity_key": "k1", "limit": "10"},
    )
    rpc.terminate(None, details(full), grpc.StatusCode.RESOURCE_EXHAUSTED, "line full")
    with pytest.raises(KeyLineFull) as raised_full:
        future.result(5)
    assert raised_full.value.metadata == {"exclusivity_key": "k1", "limit": "10"}
    assert raised_full.value.code == "RESOURCE_EXHAUSTED"


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
