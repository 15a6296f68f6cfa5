"""The one map from what went wrong to a gRPC status.

Handlers and the backend raise the exceptions below; `to_status` turns any
exception into a `grpc.Status` carrying a google.rpc.ErrorInfo whose reason
a client can branch on. Errors of redis-py, kombu and py-amqp are
translated by the two tables at the end (`REDIS_ERRORS`, `BROKER_ERRORS`):
the most specific match wins. Hierarchy (code, then reason = the class's `reason`):

    TaskServiceError                      (abstract)
      InvalidArgument        INVALID_ARGUMENT    bad id, key or option; args that do not bind
        TaskTypeNotFound     INVALID_ARGUMENT    task name not exposed (celery.* never is)
        ArgsTooLarge         INVALID_ARGUMENT    args + kwargs above TASKSERVICE_MAX_ARGS_BYTES
      TaskNotFound           NOT_FOUND           id never issued here, or its record expired
      KeyNotFound            NOT_FOUND           no task ever ran under the key (or it expired)
      TaskAlreadyRunning     ALREADY_EXISTS      the key is held; metadata task_id = holder
      TaskFinished           FAILED_PRECONDITION cancel of a task that already finished
      Unauthenticated        UNAUTHENTICATED     no valid bearer token (service.auth)
      PermissionDenied       PERMISSION_DENIED   the token lacks the method's permission
      Misconfigured          FAILED_PRECONDITION the server cannot use Redis or the broker as
                                                 configured (credentials, ACL): retrying is
                                                 pointless until an operator fixes it
        RedisMisconfigured
        BrokerMisconfigured
      ResourceExhausted      RESOURCE_EXHAUSTED  retry later, with backoff
        PublishBacklog                           too many Starts are waiting for the broker
        RedisOutOfMemory                         Redis reached its maxmemory
        RedisPoolExhausted                       every Redis connection of the server is busy
      Unavailable            UNAVAILABLE         retryable
        RedisUnavailable                         Redis unreachable or too slow
        RedisBusy                                Redis is loading, or running a long script
        RedisReadOnly                            Redis is a replica (failover in progress)
        BrokerUnavailable                        the broker refused or timed out
        ShuttingDown                             the server is draining
    anything else            INTERNAL            a bug; logged with its traceback
"""

from __future__ import annotations

import logging
from typing import Any

import amqp.exceptions
import grpc
import kombu.exceptions
import redis.exceptions
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

DOMAIN = "taskservice.dev"


class TaskServiceError(Exception):
    """Base of the errors a caller can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self, message: str, *, violations: list[tuple[str, str]] | None = None, **metadata: str
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata
        self.violations = violations or []
        """(field, description) pairs, sent as a google.rpc.BadRequest."""


class InvalidArgument(TaskServiceError):
    """The request is malformed: fix it before retrying."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    @classmethod
    def of(cls, field: str, message: str) -> InvalidArgument:
        """One field's problem: the message, and a BadRequest violation naming it."""
        return cls(message, violations=[(field, message)])


class TaskTypeNotFound(InvalidArgument):
    """The task name is not one ListTaskTypes lists."""

    reason = "TASK_TYPE_NOT_FOUND"


class ArgsTooLarge(InvalidArgument):
    """args and kwargs together exceed TASKSERVICE_MAX_ARGS_BYTES."""

    reason = "ARGS_TOO_LARGE"


class TaskNotFound(TaskServiceError):
    """No task has this id: never started here, or its record expired."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "TASK_NOT_FOUND"


class KeyNotFound(TaskServiceError):
    """No task has run under this exclusivity key (or its record expired)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "KEY_NOT_FOUND"


class TaskAlreadyRunning(TaskServiceError):
    """An unfinished task holds the exclusivity key; metadata task_id names it."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "TASK_ALREADY_RUNNING"


class TaskFinished(TaskServiceError):
    """The task already finished, so it cannot be cancelled."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TASK_FINISHED"


class Unauthenticated(TaskServiceError):
    """No valid bearer token: send `authorization: Bearer <token>`."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(TaskServiceError):
    """The token is valid but lacks the permission the method needs."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Misconfigured(TaskServiceError):
    """The server cannot use Redis or the broker as configured; an operator must act."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "MISCONFIGURED"


class RedisMisconfigured(Misconfigured):
    """Redis refused taskservice's credentials or permissions (AUTH, ACL)."""

    reason = "REDIS_MISCONFIGURED"


class BrokerMisconfigured(Misconfigured):
    """The broker refused taskservice's credentials or permissions."""

    reason = "BROKER_MISCONFIGURED"


class ResourceExhausted(TaskServiceError):
    """A capacity limit was reached; retry later, with backoff."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class PublishBacklog(ResourceExhausted):
    """Too many Starts of this server are waiting for the broker."""

    reason = "PUBLISH_BACKLOG"


class RedisOutOfMemory(ResourceExhausted):
    """Redis reached its maxmemory and refuses writes."""

    reason = "REDIS_OUT_OF_MEMORY"


class RedisPoolExhausted(ResourceExhausted):
    """Every Redis connection of this server is in use."""

    reason = "REDIS_POOL_EXHAUSTED"


class Unavailable(TaskServiceError):
    """Temporarily unable to serve; retry (with backoff)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class RedisUnavailable(Unavailable):
    """Redis is unreachable or did not answer in time."""

    reason = "REDIS_UNAVAILABLE"


class RedisBusy(Unavailable):
    """Redis is loading its data, or busy with a long script."""

    reason = "REDIS_BUSY"


class RedisReadOnly(Unavailable):
    """Redis answered as a read-only replica: a failover is under way."""

    reason = "REDIS_READ_ONLY"


class BrokerUnavailable(Unavailable):
    """The Celery broker refused the message or did not confirm it in time."""

    reason = "BROKER_UNAVAILABLE"


class ShuttingDown(Unavailable):
    """This server is draining; call another, or again."""

    reason = "SHUTTING_DOWN"


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


def cut(text: str, limit: int = 300) -> str:
    """`text`, cut to `limit` characters: never echo unbounded input."""
    return text if len(text) <= limit else text[:limit] + "..."


def _advice(cls: type[TaskServiceError]) -> str:
    if issubclass(cls, Misconfigured):
        return "retrying will not help until an operator fixes the server's settings"
    return "retry with backoff"


def _short(exc: BaseException) -> str:
    # Foreign messages may echo keys or arguments: keep trailers small.
    return cut(str(exc) or type(exc).__name__, 200)


_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
}
