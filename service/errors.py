"""The one map from what went wrong to a gRPC status.

Handlers and the backend raise the exceptions below; `to_status` turns any
exception into a `grpc.Status` carrying a google.rpc.ErrorInfo whose reason
a client can branch on. Hierarchy:

    TaskServiceError                      (abstract)
      InvalidArgument        INVALID_ARGUMENT    bad id, key or option; args that do not bind
        TaskTypeNotFound     INVALID_ARGUMENT    task name not exposed (celery.* never is)
        ArgsTooLarge         INVALID_ARGUMENT    args + kwargs above TASKSERVICE_MAX_ARGS_BYTES
      TaskNotFound           NOT_FOUND           id never issued here, or its record expired
      KeyNotFound            NOT_FOUND           no task ever ran under the key (or it expired)
      TaskAlreadyRunning     ALREADY_EXISTS      the key is held; metadata task_id = holder
      TaskFinished           FAILED_PRECONDITION cancel of a task that already finished
      Unavailable            UNAVAILABLE         retryable
        LockTimeout                              the key's lock was not free within lock_wait
        RedisUnavailable                         Redis unreachable (redis-py errors map here too)
        BrokerUnavailable                        the broker refused or timed out
        ShuttingDown                             the server is draining
    anything else            INTERNAL            a bug; logged with its traceback
"""

from __future__ import annotations

import logging

import grpc
import redis.exceptions
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

logger = logging.getLogger(__name__)

DOMAIN = "taskservice.dev"


class TaskServiceError(Exception):
    """Base of the errors a caller can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidArgument(TaskServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class TaskTypeNotFound(InvalidArgument):
    reason = "TASK_TYPE_NOT_FOUND"


class ArgsTooLarge(InvalidArgument):
    reason = "ARGS_TOO_LARGE"


class TaskNotFound(TaskServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "TASK_NOT_FOUND"


class KeyNotFound(TaskServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "KEY_NOT_FOUND"


class TaskAlreadyRunning(TaskServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "TASK_ALREADY_RUNNING"


class TaskFinished(TaskServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "TASK_FINISHED"


class Unavailable(TaskServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class LockTimeout(Unavailable):
    reason = "LOCK_TIMEOUT"


class RedisUnavailable(Unavailable):
    reason = "REDIS_UNAVAILABLE"


class BrokerUnavailable(Unavailable):
    reason = "BROKER_UNAVAILABLE"


class ShuttingDown(Unavailable):
    reason = "SHUTTING_DOWN"


def _translate(exc: BaseException) -> TaskServiceError:
    if isinstance(exc, TaskServiceError):
        return exc
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return RedisUnavailable(f"Redis is unreachable: {exc}")
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return RedisUnavailable("Redis is loading its dataset")
    logger.error("internal error", exc_info=exc)
    return TaskServiceError("internal error; the server log has the details")


def to_status(exc: BaseException) -> grpc.Status:
    """The gRPC status (with ErrorInfo) a caller receives for `exc`."""
    error = _translate(exc)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    status = status_pb2.Status(code=_CODES[error.code], message=error.message)
    status.details.add().Pack(info)
    return rpc_status.to_status(status)


_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: code_pb2.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: code_pb2.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION: code_pb2.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
}
