"""The errors a caller can act on: one hierarchy for the server and the client.

The server raises these; taskservice.server.status turns each into a gRPC
status (the class's `code`, by name) carrying a google.rpc.ErrorInfo whose
`reason` is the class's, and a BadRequest for `violations`. The client
raises the same classes from that status (taskservice.client), with the
same `message`, `metadata`, `violations` and `task_id`, so code that calls
taskservice catches exactly what the server documents. Nothing here imports
gRPC. Hierarchy (code, then reason = the class's `reason`):

    TaskServiceError                      (abstract)
      InvalidArgument        INVALID_ARGUMENT    bad id, key or option; args that do not bind
        TaskTypeNotFound     INVALID_ARGUMENT    task name not exposed (celery.* never is)
        ArgsTooLarge         INVALID_ARGUMENT    args + kwargs above TASKSERVICE_MAX_ARGS_BYTES
      TaskNotFound           NOT_FOUND           id never issued here, or its record expired
      KeyNotFound            NOT_FOUND           no task ever ran under the key (or it expired)
      TaskAlreadyRunning     ALREADY_EXISTS      the key is held; metadata task_id = holder
      TaskFinished           FAILED_PRECONDITION cancel of a task that already finished
      Unauthenticated        UNAUTHENTICATED     no valid bearer token (taskservice.server.auth)
      PermissionDenied       PERMISSION_DENIED   the token lacks the method's permission, or
                                                 the method has none (server.auth.METHODS)
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

DOMAIN = "taskservice.dev"
"""google.rpc.ErrorInfo.domain of every error taskservice answers."""


class TaskServiceError(Exception):
    """Base of the errors a caller can act on."""

    code: str = "INTERNAL"
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

    code = "INVALID_ARGUMENT"
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

    code = "NOT_FOUND"
    reason = "TASK_NOT_FOUND"


class KeyNotFound(TaskServiceError):
    """No task has run under this exclusivity key (or its record expired)."""

    code = "NOT_FOUND"
    reason = "KEY_NOT_FOUND"


class TaskAlreadyRunning(TaskServiceError):
    """An unfinished task holds the exclusivity key; metadata task_id names it."""

    code = "ALREADY_EXISTS"
    reason = "TASK_ALREADY_RUNNING"


class TaskFinished(TaskServiceError):
    """The task already finished, so it cannot be cancelled."""

    code = "FAILED_PRECONDITION"
    reason = "TASK_FINISHED"


class Unauthenticated(TaskServiceError):
    """No valid bearer token: send `authorization: Bearer <token>`."""

    code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class PermissionDenied(TaskServiceError):
    """The token is valid but lacks the permission the method needs (metadata
    `permission`), or the method has no permission at all (metadata `method`)."""

    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class Misconfigured(TaskServiceError):
    """The server cannot use Redis or the broker as configured; an operator must act."""

    code = "FAILED_PRECONDITION"
    reason = "MISCONFIGURED"


class RedisMisconfigured(Misconfigured):
    """Redis refused taskservice's credentials or permissions (AUTH, ACL)."""

    reason = "REDIS_MISCONFIGURED"


class BrokerMisconfigured(Misconfigured):
    """The broker refused taskservice's credentials or permissions."""

    reason = "BROKER_MISCONFIGURED"


class ResourceExhausted(TaskServiceError):
    """A capacity limit was reached; retry later, with backoff."""

    code = "RESOURCE_EXHAUSTED"
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

    code = "UNAVAILABLE"
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


def cut(text: str, limit: int = 300) -> str:
    """`text`, cut to `limit` characters: never echo unbounded input."""
    return text if len(text) <= limit else text[:limit] + "..."
