"""Bad input answers INVALID_ARGUMENT or NOT_FOUND with a usable message; never INTERNAL."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from tests.support.client import error_info, finished, start_request, value, violations

UNKNOWN_ID = "6f1c5d0e-3d5b-4c1e-9a57-1f0a5a1e2b3c"


async def expect(code: grpc.StatusCode, call: Any, *fragments: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in (caught.value.details() or ""), caught.value.details()
    return caught.value


async def test_unknown_ids_are_not_found(stub: pb_grpc.TaskServiceStub) -> None:
    error = await expect(
        grpc.StatusCode.NOT_FOUND,
        stub.GetStatus(pb.GetStatusRequest(task_id=UNKNOWN_ID)),
        UNKNOWN_ID,
    )
    assert error_info(error).reason == "TASK_NOT_FOUND"
    assert error_info(error).domain == "taskservice.dev"
    await expect(grpc.StatusCode.NOT_FOUND, stub.Cancel(pb.CancelRequest(task_id=UNKNOWN_ID)))
    await expect(
        grpc.StatusCode.NOT_FOUND,
        stub.GetStatus(pb.GetStatusRequest(exclusivity_key="no-such-key")),
    )


@pytest.mark.parametrize("task_id", ["", "nope", "123", "6f1c5d0e-3d5b-4c1e-9a57", "x" * 5000])
async def test_malformed_ids_are_invalid(stub: pb_grpc.TaskServiceStub, task_id: str) -> None:
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.GetStatus(pb.GetStatusRequest(task_id=task_id)),
        "task_id",
    )
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT, stub.Cancel(pb.CancelRequest(task_id=task_id)), "task_id"
    )


@pytest.mark.parametrize(
    "name",
    ["", "nope", "celery.backend_cleanup", "celery.chord_unlock", "taskservice.worker.tasks.dummy"],
)
async def test_only_exposed_tasks_can_start(stub: pb_grpc.TaskServiceStub, name: str) -> None:
    error = await expect(
        grpc.StatusCode.INVALID_ARGUMENT, stub.Start(pb.StartRequest(task_name=name)), "task"
    )
    if name:
        assert error_info(error).reason == "TASK_TYPE_NOT_FOUND"


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (start_request("demo.dummy", 1, 2, 3), "too many positional"),
        (start_request("demo.dummy", nme="typo"), "unexpected keyword"),
        (start_request("test.write_after"), "missing a required argument"),
        (start_request("test.echo", key="bad key!"), "exclusivity_key"),
        (start_request("test.echo", key="k" * 129), "exclusivity_key"),
        (start_request("test.echo", float("nan")), "finite"),
    ],
)
async def test_arguments_that_do_not_fit_are_invalid(
    stub: pb_grpc.TaskServiceStub, request_: pb.StartRequest, fragment: str
) -> None:
    await expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Start(request_), fragment)


async def test_too_large_args_are_invalid(stub: pb_grpc.TaskServiceStub) -> None:
    error = await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.Start(start_request("test.echo", "x" * 300_000)),
        "limit",
    )
    assert error_info(error).reason == "ARGS_TOO_LARGE"


def with_options(**options: Any) -> pb.StartRequest:
    request = start_request("test.echo", 1)
    for name, option in options.items():
        if isinstance(option, duration_pb2.Duration):
            getattr(request.options, name).CopyFrom(option)
        else:
            setattr(request.options, name, option)
    return request


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (with_options(countdown=duration_pb2.Duration(seconds=-1)), "countdown"),
        (with_options(countdown=duration_pb2.Duration(seconds=10**6)), "countdown"),
        (with_options(time_limit=duration_pb2.Duration(seconds=0)), "time_limit"),
        (
            with_options(
                time_limit=duration_pb2.Duration(seconds=2),
                soft_time_limit=duration_pb2.Duration(seconds=3),
            ),
            "soft_time_limit",
        ),
        (with_options(queue="bad queue"), "queue"),
        (
            with_options(countdown=duration_pb2.Duration(seconds=1, nanos=-2_000_000_000)),
            "Duration",
        ),
    ],
)
async def test_bad_options_are_invalid(
    stub: pb_grpc.TaskServiceStub, request_: pb.StartRequest, fragment: str
) -> None:
    await expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Start(request_), fragment)


async def test_unknown_enum_values_are_invalid(stub: pb_grpc.TaskServiceStub) -> None:
    request = start_request("test.echo", 1)
    request.conflict_policy = 42  # type: ignore[assignment]
    await expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Start(request), "conflict_policy")
    await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.Cancel(pb.CancelRequest(task_id=UNKNOWN_ID, mode=9)),  # type: ignore[arg-type]
        "mode",
    )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
durations = st.builds(
    duration_pb2.Duration,
    seconds=st.integers(min_value=-(10**12), max_value=10**12),
    nanos=st.integers(min_value=-(2**31), max_value=2**31 - 1),
)


@st.composite
def start_requests(draw: st.DrawFn) -> pb.StartRequest:
    name = draw(
        st.sampled_from(["test.echo", "demo.fail", "celery.backend_cleanup", ""])
        | st.text(max_size=30)
    )
    request = start_request(name)
    for item in draw(st.lists(json_values, max_size=3)):
        request.args.values.append(_value(item))
    for k, item in draw(st.dictionaries(st.text(max_size=10), json_values, max_size=3)).items():
        request.kwargs.fields[k].CopyFrom(_value(item))
    request.exclusivity_key = draw(st.text(max_size=140))
    request.conflict_policy = draw(st.integers(min_value=-1, max_value=4))  # type: ignore[assignment]
    for field in ("countdown", "time_limit", "soft_time_limit"):
        if draw(st.booleans()):
            getattr(request.options, field).CopyFrom(draw(durations))
    request.options.queue = draw(st.sampled_from(["", "celery", "x y"]) | st.text(max_size=10))
    return request


def _value(item: Any) -> Any:
    from google.protobuf import struct_pb2

    out = struct_pb2.Value()
    if item is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(item, bool):
        out.bool_value = item
    elif isinstance(item, float):
        out.number_value = item
    elif isinstance(item, str):
        out.string_value = item
    elif isinstance(item, list):
        out.list_value.values.extend([_value(i) for i in item])
    else:
        for k, v in item.items():
            out.struct_value.fields[k].CopyFrom(_value(v))
    return out


ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=start_requests())
async def test_no_start_request_gets_internal(
    stub: pb_grpc.TaskServiceStub, request: pb.StartRequest
) -> None:
    try:
        response = await stub.Start(request)
    except grpc.aio.AioRpcError as error:
        assert error.code() in ALLOWED, (error.code(), error.details())
        assert error.details()
    else:
        # Accepted: it really is a task of ours.
        assert response.task.task_name in {"test.echo", "demo.fail"}
        status = await stub.GetStatus(pb.GetStatusRequest(task_id=response.task.id))
        assert status.task.id == response.task.id


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    task_id=st.text(max_size=60) | st.uuids().map(str),
    key=st.text(max_size=140),
    mode=st.integers(min_value=-1, max_value=5),
)
async def test_no_lookup_gets_internal(
    stub: pb_grpc.TaskServiceStub, task_id: str, key: str, mode: int
) -> None:
    calls = [
        stub.GetStatus(pb.GetStatusRequest(task_id=task_id)),
        stub.GetStatus(pb.GetStatusRequest(exclusivity_key=key)),
        stub.Cancel(pb.CancelRequest(task_id=task_id, mode=mode)),  # type: ignore[arg-type]
    ]
    for call in calls:
        try:
            await call
        except grpc.aio.AioRpcError as error:
            assert error.code() in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}, (
                error.code(),
                error.details(),
            )


async def test_arguments_are_checked_against_annotations_naming_the_parameter(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    error = await expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.Start(start_request("test.typed", count=1, ratio="ten", tags=["a", 2])),
        "kwargs.ratio",
    )
    found = violations(error)
    assert set(found) == {"kwargs.ratio", "kwargs.tags[1]"}
    assert "float" in found["kwargs.ratio"]
    # The signature in the message is as written, annotations unquoted.
    assert (
        "test.typed(count: int, ratio: float = 1.0, tags: list[str] | None = None) "
        "-> dict[str, Any]" in (error.details() or "")
    )
    error = await expect(
        grpc.StatusCode.INVALID_ARGUMENT, stub.Start(start_request("test.sleep", "long"))
    )
    assert set(violations(error)) == {"args[0]"}


def _start(**fields: Any) -> pb.StartRequest:
    request = start_request(str(fields.pop("task_name", "test.echo")))
    for name, field_value in fields.items():
        if name in ("countdown", "time_limit", "soft_time_limit", "start_time"):
            getattr(request.options, name).FromSeconds(field_value)
        elif name == "kwargs":
            request.kwargs.update(field_value)
        else:
            setattr(request, name, field_value)
    return request


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (("start", {"task_name": ""}), "task_name"),
        (("start", {"exclusivity_key": "no spaces"}), "exclusivity_key"),
        (("start", {"countdown": 10**6}), "options.countdown"),
        (("start", {"countdown": 5, "start_time": 5}), "options.start_time"),
        (("start", {"replace_mode": 9}), "replace_mode"),
        (("start", {"time_limit": 5, "soft_time_limit": 9}), "options.soft_time_limit"),
        (("start", {"conflict_policy": 7}), "conflict_policy"),
        (("start", {"task_name": "test.sleep", "kwargs": {"seconds": 1, "x": 2}}), "kwargs.x"),
        (("start", {"task_name": "test.sleep"}), "kwargs.seconds"),
        (("get", {"task_id": "not-a-uuid"}), "task_id"),
        (("get", {}), "selector"),
        (("cancel", {"task_id": ""}), "task_id"),
    ],
)
async def test_every_invalid_argument_names_its_field_in_a_bad_request(
    stub: pb_grpc.TaskServiceStub, call: tuple[str, dict[str, Any]], field: str
) -> None:
    method, fields = call
    if method == "start":
        pending = stub.Start(_start(**fields))
    elif method == "get":
        pending = stub.GetStatus(pb.GetStatusRequest(**fields))
    else:
        pending = stub.Cancel(pb.CancelRequest(**fields))
    error = await expect(grpc.StatusCode.INVALID_ARGUMENT, pending)
    assert field in violations(error), (field, error.details())


async def test_arguments_arrive_converted_to_their_annotations(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    task = (await stub.Start(start_request("test.typed", "3", ratio=2))).task
    done = await finished(stub, task.id)
    assert done.result == value({"count": [3, "int"], "ratio": [2.0, "float"], "tags": None})


async def test_an_empty_value_is_invalid_naming_the_field(stub: pb_grpc.TaskServiceStub) -> None:
    request = start_request("test.echo")
    request.kwargs.fields["value"].struct_value.fields["name"].CopyFrom(struct_pb2.Value())
    error = await expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Start(request), "no kind set")
    assert set(violations(error)) == {"kwargs.value.name"}


async def test_a_huge_argument_name_is_not_echoed_back(stub: pb_grpc.TaskServiceStub) -> None:
    request = start_request("test.sleep", seconds=0)
    request.kwargs.fields["x" * 100_000].number_value = 1
    error = await expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Start(request))
    assert len(error.details() or "") <= 1100


@pytest.mark.parametrize("queue", ["unacked", "_kombu.binding.celery", "not-declared", "q"])
async def test_only_declared_queues_can_be_named(stub: pb_grpc.TaskServiceStub, queue: str) -> None:
    request = start_request("test.echo", 1)
    request.options.queue = queue
    error = await expect(grpc.StatusCode.INVALID_ARGUMENT, stub.Start(request), "declare")
    assert set(violations(error)) == {"options.queue"}


PRECISE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
METHODS = ("Start", "GetStatus", "Cancel", "WatchStatus", "ListTaskTypes")
_VALID = {
    "Start": start_request("test.echo", {"a": [1, 2.5]}, key="fuzz").SerializeToString(),
    "GetStatus": pb.GetStatusRequest(task_id=UNKNOWN_ID).SerializeToString(),
    "Cancel": pb.CancelRequest(task_id=UNKNOWN_ID, request_id="r-1").SerializeToString(),
    "WatchStatus": pb.WatchStatusRequest(task_id=UNKNOWN_ID, after_sequence=3).SerializeToString(),
    "ListTaskTypes": b"",
}


@st.composite
def raw_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A method and bytes for it: random, or a valid request with bytes changed."""
    method = draw(st.sampled_from(METHODS))
    if draw(st.booleans()):
        return method, draw(st.binary(max_size=300))
    data = bytearray(_VALID[method])
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        if data:
            at = draw(st.integers(min_value=0, max_value=len(data) - 1))
            data[at] = draw(st.integers(min_value=0, max_value=255))
    return method, bytes(data)


async def call_raw(channel: grpc.aio.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    path = f"/taskservice.v1.TaskService/{method}"
    try:
        if method == "WatchStatus":
            call = channel.unary_stream(path)(payload, timeout=5)
            await call.read()
            call.cancel()
        else:
            await channel.unary_unary(path)(payload, timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=raw_requests())
async def test_no_bytes_on_any_method_get_internal_or_unknown(
    channel: grpc.aio.Channel, request: tuple[str, bytes]
) -> None:
    code = await call_raw(channel, *request)
    assert code in PRECISE, (request, code)


async def test_the_server_is_healthy_after_the_fuzzing(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    check = await health.Check(health_pb2.HealthCheckRequest(service="taskservice.v1.TaskService"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
