"""Pure translation code: records -> proto, Values -> Python, errors -> status."""

from __future__ import annotations

import asyncio
import enum
import inspect
import typing
from typing import Any, cast

import amqp.exceptions
import grpc
import kombu.exceptions
import pytest
import redis.exceptions
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice.core import errors
from taskservice.core.record import TaskRecord
from taskservice.core.registry import annotation_text, signature_text
from taskservice.core.states import CancelMode, ConflictPolicy, TaskState
from taskservice.server import status as status_map
from taskservice.server.servicer import _from_value, task_message


def fields(**extra: str) -> dict[str, str]:
    return {
        "id": "6f1c5d0e-3d5b-4c1e-9a57-1f0a5a1e2b3c",
        "name": "demo.dummy",
        "state": "PENDING",
        "seq": "1",
        "created": "1700000000.25",
        "queue": "celery",
        **extra,
    }


@pytest.mark.parametrize(
    ("state", "extra", "expected"),
    [
        ("PENDING", {}, pb.TASK_STATE_QUEUED),
        ("STARTED", {}, pb.TASK_STATE_RUNNING),
        ("SUCCESS", {"result": "1"}, pb.TASK_STATE_SUCCEEDED),
        ("FAILURE", {"error_type": "ValueError"}, pb.TASK_STATE_FAILED),
        ("FAILURE", {"error_type": "WorkerLostError"}, pb.TASK_STATE_LOST),
        ("REVOKED", {"cancel": "KILL"}, pb.TASK_STATE_CANCELLED),
    ],
)
def test_record_states_map_to_task_states(state: str, extra: dict[str, str], expected: int) -> None:
    assert task_message(TaskRecord.from_fields(fields(state=state, **extra))).state == expected


def test_task_message_carries_every_field() -> None:
    rec = TaskRecord.from_fields(
        fields(
            state="SUCCESS",
            seq="5",
            key="k",
            started="1700000001.5",
            finished="1700000002",
            worker="w@h",
            result='{"a": [1, null]}',
            progress='{"current": 2, "total": 4, "message": "half"}',
            cancel="GRACEFUL",
        )
    )
    task = task_message(rec)
    assert task.id == rec.id and task.task_name == "demo.dummy" and task.exclusivity_key == "k"
    assert task.sequence == 5 and task.worker == "w@h" and task.queue == "celery"
    assert task.create_time.seconds == 1700000000 and task.create_time.nanos == 250_000_000
    assert task.start_time.nanos == 500_000_000 and task.end_time.seconds == 1700000002
    assert (
        task.result.struct_value.fields["a"].list_value.values[1].WhichOneof("kind") == "null_value"
    )
    assert (task.progress.current, task.progress.total, task.progress.message) == (2, 4, "half")
    assert task.cancel_mode == pb.CANCEL_MODE_GRACEFUL
    assert not task.HasField("scheduled_time")


def test_whole_numbers_become_int_others_stay_float() -> None:
    assert _from_value(struct_pb2.Value(number_value=3.0), "v") == 3
    assert isinstance(_from_value(struct_pb2.Value(number_value=3.0), "v"), int)
    assert _from_value(struct_pb2.Value(number_value=2.5), "v") == 2.5
    assert isinstance(_from_value(struct_pb2.Value(number_value=2.0**60), "v"), float)
    nested = struct_pb2.Value()
    nested.list_value.values.add().struct_value.fields["x"].number_value = 1
    assert _from_value(nested, "v") == [{"x": 1}]
    assert _from_value(struct_pb2.Value(null_value=0), "v") is None


def test_an_empty_value_is_invalid_and_named() -> None:
    nested = struct_pb2.Value()
    nested.list_value.values.add().struct_value.fields["x"].CopyFrom(struct_pb2.Value())
    with pytest.raises(errors.InvalidArgument) as caught:
        _from_value(nested, "kwargs.data")
    assert caught.value.violations[0][0] == "kwargs.data[0].x"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.TaskTypeNotFound("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.TaskNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.TaskAlreadyRunning("x", task_id="t"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.TaskFinished("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.PublishBacklog("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.RedisMisconfigured("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.BrokerUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (ConnectionRefusedError("x"), grpc.StatusCode.INTERNAL),
        (KeyError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_map_to_codes_with_error_info(error: Exception, code: grpc.StatusCode) -> None:
    status = status_map.to_status(error)
    assert status.code == code
    detail = dict(status.trailing_metadata)["grpc-status-details-bin"]
    rich = status_pb2.Status.FromString(detail)
    info = error_details_pb2.ErrorInfo()
    assert rich.details[0].Unpack(info)
    assert info.domain == "taskservice.dev"
    if isinstance(error, errors.TaskAlreadyRunning):
        assert info.metadata["task_id"] == "t"
    if code == grpc.StatusCode.INTERNAL:
        assert "bug" not in status.details  # internals stay in the server log


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (redis.exceptions.ConnectionError("down"), "UNAVAILABLE", "REDIS_UNAVAILABLE"),
        (redis.exceptions.TimeoutError("slow"), "UNAVAILABLE", "REDIS_UNAVAILABLE"),
        (redis.exceptions.BusyLoadingError("loading"), "UNAVAILABLE", "REDIS_BUSY"),
        (redis.exceptions.TryAgainError("again"), "UNAVAILABLE", "REDIS_BUSY"),
        (redis.exceptions.ReadOnlyError("replica"), "UNAVAILABLE", "REDIS_READ_ONLY"),
        (
            redis.exceptions.ResponseError("Error running script: @user_script:1: -READONLY x"),
            "UNAVAILABLE",
            "REDIS_READ_ONLY",
        ),
        (redis.exceptions.OutOfMemoryError("oom"), "RESOURCE_EXHAUSTED", "REDIS_OUT_OF_MEMORY"),
        (
            redis.exceptions.MaxConnectionsError("Too many"),
            "RESOURCE_EXHAUSTED",
            "REDIS_POOL_EXHAUSTED",
        ),
        (
            redis.exceptions.NoPermissionError("noperm"),
            "FAILED_PRECONDITION",
            "REDIS_MISCONFIGURED",
        ),
        (
            redis.exceptions.AuthenticationError("auth"),
            "FAILED_PRECONDITION",
            "REDIS_MISCONFIGURED",
        ),
        (redis.exceptions.ResponseError("WRONGTYPE x"), "INTERNAL", "INTERNAL"),  # a bug of ours
    ],
)
def test_redis_errors_map_by_kind(error: Exception, code: str, reason: str) -> None:
    status = status_map.to_status(error)
    assert status.code.name == code
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"]).details[
        0
    ].Unpack(info)
    assert info.reason == reason


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (kombu.exceptions.OperationalError("refused"), "BROKER_UNAVAILABLE"),
        (redis.exceptions.ConnectionError("down"), "BROKER_UNAVAILABLE"),
        (OSError("unreachable"), "BROKER_UNAVAILABLE"),
        (redis.exceptions.AuthenticationError("auth"), "BROKER_MISCONFIGURED"),
        # RabbitMQ, as py-amqp raises them: a wrong password, a missing vhost,
        # a queue declared elsewhere with other arguments, a nacked publish,
        # a connection the broker closed.
        (amqp.exceptions.AccessRefused("(403) ACCESS_REFUSED"), "BROKER_MISCONFIGURED"),
        (amqp.exceptions.NotAllowed("(530) NOT_ALLOWED - vhost"), "BROKER_MISCONFIGURED"),
        (amqp.exceptions.PreconditionFailed("(406) PRECONDITION_FAILED"), "BROKER_MISCONFIGURED"),
        (amqp.exceptions.MessageNacked(), "BROKER_UNAVAILABLE"),
        (amqp.exceptions.ConnectionForced("(320) CONNECTION_FORCED"), "BROKER_UNAVAILABLE"),
        (amqp.exceptions.RecoverableConnectionError("closed"), "BROKER_UNAVAILABLE"),
    ],
)
def test_broker_errors_map_to_broker_reasons(error: Exception, reason: str) -> None:
    mapped = status_map.broker_error(error)
    assert mapped is not None and mapped.reason == reason
    assert status_map.broker_error(KeyError("bug")) is None


def _under_future_annotations(
    name: str = "Bob", *, tags: list[str] | None = None
) -> dict[str, int]:
    return {}


def test_annotations_print_as_written_without_quotes() -> None:
    # This module has `from __future__ import annotations`: the annotations are strings.
    signature = inspect.signature(_under_future_annotations)
    assert [annotation_text(p.annotation) for p in signature.parameters.values()] == [
        "str",
        "list[str] | None",
    ]
    assert signature_text(signature) == (
        "(name: str = 'Bob', *, tags: list[str] | None = None) -> dict[str, int]"
    )
    # Evaluated annotations (a module without the future import) print the same.
    optional_int = typing.Optional[int]  # noqa: UP045 (as older code writes it)
    evaluated = inspect.Signature(
        [
            inspect.Parameter("a", inspect.Parameter.POSITIONAL_ONLY, annotation=str),
            inspect.Parameter(
                "b", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=dict[str, int]
            ),
            inspect.Parameter("c", inspect.Parameter.KEYWORD_ONLY, annotation=optional_int),
            inspect.Parameter("d", inspect.Parameter.KEYWORD_ONLY),
        ],
        return_annotation=None,
    )
    assert [annotation_text(p.annotation) for p in evaluated.parameters.values()] == [
        "str",
        "dict[str, int]",
        "Optional[int]",
        "",
    ]
    assert (
        signature_text(evaluated)
        == "(a: str, /, b: dict[str, int], *, c: Optional[int], d) -> None"
    )


@pytest.mark.parametrize(
    ("domain", "proto", "prefix"),
    [
        (TaskState, pb.TaskState, "TASK_STATE_"),
        (ConflictPolicy, pb.ConflictPolicy, "CONFLICT_POLICY_"),
        (CancelMode, pb.CancelMode, "CANCEL_MODE_"),
    ],
)
def test_domain_enums_have_the_proto_enums_names(
    domain: type[enum.StrEnum], proto: Any, prefix: str
) -> None:
    assert [prefix + member for member in domain] == list(proto.keys())
    assert all(member.name == member.value for member in domain)


class ExecuteBatchError(Exception):
    """Named as grpc.aio's failed-send error (grpc._cython.cygrpc), which
    cannot be made outside a real call."""


class _Ending:
    """A servicer context whose abort fails with `error` instead of raising
    AbortError."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.sent: list[grpc.Status] = []

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.sent.append(status)
        raise self.error


async def test_a_stream_whose_caller_hung_up_first_ends_as_cancelled() -> None:
    context = _Ending(ExecuteBatchError("Failed execute_batch"))
    status = status_map.to_status(errors.ShuttingDown("closing"))
    with pytest.raises(asyncio.CancelledError):
        await status_map.end_stream(cast(Any, context), status)
    assert context.sent == [status]


async def test_ending_a_stream_lets_any_other_failure_through() -> None:
    with pytest.raises(grpc.aio.AbortError):
        await status_map.end_stream(
            cast(Any, _Ending(grpc.aio.AbortError())),
            status_map.to_status(errors.ShuttingDown("x")),
        )
    with pytest.raises(RuntimeError):
        await status_map.end_stream(
            cast(Any, _Ending(RuntimeError("bug"))), status_map.to_status(errors.ShuttingDown("x"))
        )
