"""The one map from what went wrong to a gRPC status.

Handlers and the domain modules raise taskservice.core.errors; `to_status`
turns any exception into a `grpc.Status` carrying a google.rpc.ErrorInfo
whose reason a client can branch on. Errors of redis-py, kombu and py-amqp
are translated by the two tables below (`REDIS_ERRORS`, `BROKER_ERRORS`): the
first entry that matches wins, so each table lists subclasses before their
bases.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NoReturn

import amqp.exceptions
import grpc
import kombu.exceptions
import redis.exceptions
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from taskservice.core.errors import (
    DOMAIN,
    BrokerMisconfigured,
    BrokerUnavailable,
    Misconfigured,
    RedisBusy,
    RedisMisconfigured,
    RedisOutOfMemory,
    RedisPoolExhausted,
    RedisReadOnly,
    RedisUnavailable,
    TaskServiceError,
    cut,
)

logger = logging.getLogger(__name__)


_CREDENTIALS = (
    redis.exceptions.AuthenticationError,
    redis.exceptions.AuthenticationWrongNumberOfArgsError,
    redis.exceptions.AuthorizationError,
    redis.exceptions.NoPermissionError,
)

ErrorMap = tuple[tuple[type[BaseException], str, type[TaskServiceError], str], ...]
"""(exception class, Redis error code or "", what it becomes, what a caller reads)."""

REDIS_ERRORS: ErrorMap = (
    (redis.exceptions.AuthenticationError, "", RedisMisconfigured, "Redis refused the credentials"),
    (
        redis.exceptions.AuthenticationWrongNumberOfArgsError,
        "",
        RedisMisconfigured,
        "Redis refused the credentials",
    ),
    (redis.exceptions.AuthorizationError, "", RedisMisconfigured, "Redis refused the user"),
    (
        redis.exceptions.NoPermissionError,
        "",
        RedisMisconfigured,
        "the Redis user lacks a permission",
    ),
    (redis.exceptions.MaxConnectionsError, "", RedisPoolExhausted, "all Redis connections busy"),
    (redis.exceptions.BusyLoadingError, "", RedisBusy, "Redis is loading its data"),
    (redis.exceptions.ReadOnlyError, "", RedisReadOnly, "Redis is a read-only replica"),
    (redis.exceptions.OutOfMemoryError, "", RedisOutOfMemory, "Redis is out of memory"),
    (redis.exceptions.TryAgainError, "", RedisBusy, "Redis asked to try again"),
    # Redis before 7 reports an error inside a script as a generic one that
    # carries the original code ("... @user_script:1: -READONLY ...").
    (redis.exceptions.ResponseError, "READONLY", RedisReadOnly, "Redis is a read-only replica"),
    (redis.exceptions.ResponseError, "OOM", RedisOutOfMemory, "Redis is out of memory"),
    (
        redis.exceptions.ResponseError,
        "NOPERM",
        RedisMisconfigured,
        "the Redis user lacks a permission",
    ),
    (redis.exceptions.ResponseError, "BUSY", RedisBusy, "Redis is busy running a script"),
    (redis.exceptions.ResponseError, "TRYAGAIN", RedisBusy, "Redis asked to try again"),
    (redis.exceptions.ConnectionError, "", RedisUnavailable, "Redis is unreachable"),
    (redis.exceptions.TimeoutError, "", RedisUnavailable, "Redis did not answer in time"),
)
"""redis-py's errors, most specific first (subclasses before their bases)."""

BROKER_ERRORS: ErrorMap = (
    *((cls, "", BrokerMisconfigured, "the broker refused the server's credentials")
      for cls in _CREDENTIALS),
    # RabbitMQ (py-amqp): a wrong password or user, a vhost that is not there
    # or not the user's, a queue already declared with other arguments.
    (amqp.exceptions.AccessRefused, "", BrokerMisconfigured, "the broker refused the server"),
    (amqp.exceptions.NotAllowed, "", BrokerMisconfigured, "the broker refused the vhost"),
    (amqp.exceptions.PreconditionFailed, "", BrokerMisconfigured, "the broker refused to declare"),
    (amqp.exceptions.MessageNacked, "", BrokerUnavailable, "the broker refused the message"),
    (kombu.exceptions.OperationalError, "", BrokerUnavailable, "the broker is unreachable"),
    (redis.exceptions.RedisError, "", BrokerUnavailable, "the broker failed"),
    (amqp.exceptions.AMQPError, "", BrokerUnavailable, "the broker failed"),
    (ConnectionError, "", BrokerUnavailable, "the broker is unreachable"),
    (TimeoutError, "", BrokerUnavailable, "the broker did not answer in time"),
    (OSError, "", BrokerUnavailable, "the broker is unreachable"),
)  # fmt: skip
"""Errors of a call to the Celery broker (publish, revoke), most specific first."""


def _match(exc: BaseException, table: ErrorMap) -> TaskServiceError | None:
    text = str(exc)
    for cls, code, ours, message in table:
        if isinstance(exc, cls) and (
            not code or text.startswith(f"{code} ") or f"-{code} " in text
        ):
            error = ours(f"{message} ({_short(exc)}); {_advice(ours)}")
            if isinstance(error, Misconfigured):
                logger.error("configuration error: %s", error.message, exc_info=exc)
            return error
    return None


def broker_error(exc: BaseException) -> TaskServiceError | None:
    """What a failed broker call means to a caller; None if it is no broker error."""
    return _match(exc, BROKER_ERRORS)


def translate(exc: BaseException) -> TaskServiceError:
    """The TaskServiceError a caller gets for `exc` (INTERNAL for a bug, logged)."""
    if isinstance(exc, TaskServiceError):
        return exc
    error = _match(exc, REDIS_ERRORS)
    if error is not None:
        return error
    logger.error("internal error", exc_info=exc)
    return TaskServiceError("internal error; the server log has the details")


def to_status(exc: BaseException) -> grpc.Status:
    """The gRPC status (with ErrorInfo, and BadRequest for field violations)
    a caller receives for `exc`. Texts are cut, so no input a caller sent can
    swell the trailers past gRPC's metadata limit."""
    error = translate(exc)
    key = (type(error), error.message, tuple(error.metadata.items()), tuple(error.violations))
    status = _STATUSES.get(key)
    if status is None:
        # The same refusal often repeats (a storm of Starts on one held key).
        status = _STATUSES[key] = _status(error)
        if len(_STATUSES) > STATUSES_KEPT:
            _STATUSES.pop(next(iter(_STATUSES)))
    return status


STATUSES_KEPT = 256
_STATUSES: dict[tuple[Any, ...], grpc.Status] = {}


async def end_stream(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> NoReturn:
    """Ends a stream that a closing server cuts, with `status`.

    A caller that saw gRPC's GOAWAY may hang up first. If the status then
    fails to go out before gRPC has learnt that the caller left, grpc.aio logs
    the failed send (ExecuteBatchError) as an error with a traceback, though
    nobody is left to tell; the call ends as cancelled instead, as it does when
    gRPC learns of the hang-up first."""
    try:
        await context.abort_with_status(status)
    except grpc.aio.AbortError:
        raise
    except Exception as error:
        # grpc's own class, not part of its public API; matched by name.
        if type(error).__name__ != "ExecuteBatchError":
            raise
        raise asyncio.CancelledError from error
    raise AssertionError("abort_with_status returned")  # it always raises


def _status(error: TaskServiceError) -> grpc.Status:
    metadata = {key: cut(value, 200) for key, value in error.metadata.items()}
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    status = status_pb2.Status(code=_CODES[error.code], message=cut(error.message, 1000))
    status.details.add().Pack(info)
    if error.violations:
        bad = error_details_pb2.BadRequest()
        for field, description in error.violations[:20]:
            bad.field_violations.add(field=cut(field, 200), description=cut(description, 300))
        status.details.add().Pack(bad)
    return rpc_status.to_status(status)


def _advice(cls: type[TaskServiceError]) -> str:
    if issubclass(cls, Misconfigured):
        return "retrying will not help until an operator fixes the server's settings"
    return "retry with backoff"


def _short(exc: BaseException) -> str:
    # Foreign messages may echo keys or arguments: keep trailers small.
    return cut(str(exc) or type(exc).__name__, 200)


_CODES: dict[str, int] = {
    "INVALID_ARGUMENT": code_pb2.INVALID_ARGUMENT,
    "NOT_FOUND": code_pb2.NOT_FOUND,
    "ALREADY_EXISTS": code_pb2.ALREADY_EXISTS,
    "FAILED_PRECONDITION": code_pb2.FAILED_PRECONDITION,
    "UNAUTHENTICATED": code_pb2.UNAUTHENTICATED,
    "PERMISSION_DENIED": code_pb2.PERMISSION_DENIED,
    "RESOURCE_EXHAUSTED": code_pb2.RESOURCE_EXHAUSTED,
    "UNAVAILABLE": code_pb2.UNAVAILABLE,
    "INTERNAL": code_pb2.INTERNAL,
}
