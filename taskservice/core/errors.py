"""The errors a caller can act on: one hierarchy for the server and the client.

The server raises these; taskservice.server.status turns each into a gRPC
status (the class's `code`, by name) carrying a google.rpc.ErrorInfo whose
`reason` is the class's, and a BadRequest for `violations`. The client
raises the same classes from that status (taskservice.client), with the
same `message`, `metadata`, `violations` and `task_id`, so code that calls
taskservice catches exactly what the server documents. Nothing here imports
gRPC. Hierarchy (code, then reason = the class's `reason`):

    TaskServiceError         INTERNAL            a bug on the server; also any code the
                                                 client meets that no class below names
      InvalidArgument        INVALID_ARGUMENT    bad id, key or option; args that do not bind
        TaskTypeNotFound                         task name not exposed (celery.* never is)
        ArgsTooLarge                             args + kwargs above TASKSERVICE_MAX_ARGS_BYTES
      NotFound               NOT_FOUND
        TaskNotFound                             id never issued here, or its record expired
        KeyNotFound                              no task ever ran under the key (or it expired)
      AlreadyExists          ALREADY_EXISTS
        TaskAlreadyRunning                       the key is held; `task_id` = the holder
        KeyQuiet                                 the key's quiet period after a run; `task_id`
                                                 = the task that ended, `free_time` = when
      FailedPrecondition     FAILED_PRECONDITION
        TaskFinished                             cancel of a task that already finished
        Misconfigured                            the server cannot use Redis or the broker as
                                                 configured (credentials, ACL): retrying is
                                                 pointless until an operator fixes it
          RedisMisconfigured
          BrokerMisconfigured
      Unauthenticated        UNAUTHENTICATED     no valid bearer token (taskservice.server.auth)
      PermissionDenied       PERMISSION_DENIED   the token lacks the method's permission, or
                                                 the method has none (server.auth.METHODS)
      ResourceExhausted      RESOURCE_EXHAUSTED  retry later, with backoff
        PublishBacklog                           too many Starts are waiting for the broker
        RedisOutOfMemory                         Redis reached its maxmemory
        RedisPoolExhausted                       every Redis connection of the server is busy
        KeyLineFull                              the key's line of waiting tasks is full
      Unavailable            UNAVAILABLE         retryable
        RedisUnavailable                         Redis unreachable or too slow
        RedisBusy                                Redis is loading, or running a long script
        RedisReadOnly                            Redis is a replica (failover in progress)
        RedisNotReplicated                       too few replicas confirmed a Start's writes
                                                 in time (TASKSERVICE_REDIS_MIN_REPLICAS)
        BrokerUnavailable                        the broker refused or timed out
        ShuttingDown                             the server is draining
      DeadlineExceeded       DEADLINE_EXCEEDED   (client) the call's deadline passed first
      Cancelled              CANCELLED           (client) the call was cancelled

A class's `reason` is its name in upper snake case where it has its own
(TASK_ALREADY_RUNNING); the code's bases use the code's name. The client maps a
status to the class whose reason it carries, else to its code's base class
(`from_status`), so a newer server's new reason still lands on the right base.
"""

from __future__ import annotations

DOMAIN = "taskservice.dev"
"""google.rpc.ErrorInfo.domain of every error taskservice answers."""


class TaskServiceError(Exception):
    """Base of the errors a caller can act on: `code` is the gRPC status code
    by name, `reason` the google.rpc.ErrorInfo reason, `metadata` its
    metadata, `violations` the (field, description) pairs of a BadRequest."""

    code: str = "INTERNAL"
    reason: str = "INTERNAL"
    hint: str = ""
    """What to try, when the client can tell the likely cause of a failed
    connection (a plaintext call to a TLS server, say); never sent by a server."""

    def __init__(
        self, message: str, *, violations: list[tuple[str, str]] | None = None, **metadata: str
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata
        self.violations = violations or []

    @property
    def task_id(self) -> str:
        """The task the error is about ("" if none): for TaskAlreadyRunning,
        the task that holds the exclusivity key."""
        return self.metadata.get("task_id", "")

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        return f"{text}; {self.hint}" if self.hint else text


class InvalidArgument(TaskServiceError):
    """The request is malformed: fix it before retrying; `violations` names each field."""

    code = reason = "INVALID_ARGUMENT"

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


class NotFound(TaskServiceError):
    """What the call names does not exist (or its record expired)."""

    code = reason = "NOT_FOUND"


class TaskNotFound(NotFound):
    """No task has this id: never started here, or its record expired."""

    reason = "TASK_NOT_FOUND"


class KeyNotFound(NotFound):
    """No task has run under this exclusivity key (or its record expired)."""

    reason = "KEY_NOT_FOUND"


class AlreadyExists(TaskServiceError):
    """What the call would create exists already."""

    code = reason = "ALREADY_EXISTS"


class TaskAlreadyRunning(AlreadyExists):
    """An unfinished task holds the exclusivity key; `task_id` names it."""

    reason = "TASK_ALREADY_RUNNING"


class KeyQuiet(AlreadyExists):
    """The key is in its quiet period after a task ended: `task_id` names that
    task, metadata `free_time` (RFC 3339) says when the key takes Starts again."""

    reason = "KEY_QUIET"


class FailedPrecondition(TaskServiceError):
    """Not possible in the current state; retrying the same call will not help."""

    code = reason = "FAILED_PRECONDITION"


class TaskFinished(FailedPrecondition):
    """The task already finished, so it cannot be cancelled."""

    reason = "TASK_FINISHED"


class Misconfigured(FailedPrecondition):
    """The server cannot use Redis or the broker as configured; an operator must act."""

    reason = "MISCONFIGURED"


class RedisMisconfigured(Misconfigured):
    """Redis refused taskservice's credentials or permissions (AUTH, ACL)."""

    reason = "REDIS_MISCONFIGURED"


class BrokerMisconfigured(Misconfigured):
    """The broker refused taskservice's credentials or permissions."""

    reason = "BROKER_MISCONFIGURED"


class Unauthenticated(TaskServiceError):
    """No valid bearer token: send `authorization: Bearer <token>`."""

    code = reason = "UNAUTHENTICATED"


class PermissionDenied(TaskServiceError):
    """The token is valid but lacks the permission the method needs (metadata
    `permission`), or the method has no permission at all (metadata `method`)."""

    code = reason = "PERMISSION_DENIED"


class ResourceExhausted(TaskServiceError):
    """A capacity limit was reached; retry later, with backoff."""

    code = reason = "RESOURCE_EXHAUSTED"


class PublishBacklog(ResourceExhausted):
    """Too many Starts of this server are waiting for the broker."""

    reason = "PUBLISH_BACKLOG"


class RedisOutOfMemory(ResourceExhausted):
    """Redis reached its maxmemory and refuses writes."""

    reason = "REDIS_OUT_OF_MEMORY"


class RedisPoolExhausted(ResourceExhausted):
    """Every Redis connection of this server is in use."""

    reason = "REDIS_POOL_EXHAUSTED"


class KeyLineFull(ResourceExhausted):
    """CONFLICT_POLICY_QUEUE: the key's line of waiting tasks is at its limit
    (metadata `exclusivity_key`, `limit`); retry once the line moved."""

    reason = "KEY_LINE_FULL"


class Unavailable(TaskServiceError):
    """Temporarily unable to serve; retry (with backoff). A Start that failed
    this way left nothing running."""

    code = reason = "UNAVAILABLE"


class RedisUnavailable(Unavailable):
    """Redis is unreachable or did not answer in time."""

    reason = "REDIS_UNAVAILABLE"


class RedisBusy(Unavailable):
    """Redis is loading its data, or busy with a long script."""

    reason = "REDIS_BUSY"


class RedisReadOnly(Unavailable):
    """Redis answered as a read-only replica: a failover is under way."""

    reason = "REDIS_READ_ONLY"


class RedisNotReplicated(Unavailable):
    """Fewer replicas than `redis_min_replicas` confirmed a Start's writes
    within `redis_min_replicas_timeout`: the Start was given up (nothing runs,
    the key is free), since a failover could have lost it."""

    reason = "REDIS_NOT_REPLICATED"


class BrokerUnavailable(Unavailable):
    """The Celery broker refused the message or did not confirm it in time."""

    reason = "BROKER_UNAVAILABLE"


class ShuttingDown(Unavailable):
    """This server is draining; call another, or again."""

    reason = "SHUTTING_DOWN"


class DeadlineExceeded(TaskServiceError):
    """The call's deadline passed before an answer came (raised by the client)."""

    code = reason = "DEADLINE_EXCEEDED"


class Cancelled(TaskServiceError):
    """The call was cancelled before an answer came (raised by the client)."""

    code = reason = "CANCELLED"


def _classes(base: type[TaskServiceError]) -> list[type[TaskServiceError]]:
    found = [base]
    for sub in base.__subclasses__():
        found.extend(_classes(sub))
    return found


_BY_REASON = {cls.reason: cls for cls in _classes(TaskServiceError)}
_BY_CODE = {cls.code: cls for cls in _classes(TaskServiceError) if cls.reason == cls.code}


def from_status(
    code: str,
    message: str,
    *,
    reason: str = "",
    metadata: dict[str, str] | None = None,
    violations: list[tuple[str, str]] | None = None,
) -> TaskServiceError:
    """The error a status stands for (code by name, e.g. "ALREADY_EXISTS"): the
    class of its reason if that class has this code, else its code's base class,
    else TaskServiceError carrying the code."""
    cls = _BY_REASON.get(reason)
    if cls is None or cls.code != code:
        cls = _BY_CODE.get(code, TaskServiceError)
    error = cls(message, violations=violations, **(metadata or {}))
    if error.reason != reason and reason:
        error.reason = reason
    if cls.code != code:
        error.code = code
    return error


def cut(text: str, limit: int = 300) -> str:
    """`text`, cut to `limit` characters: never echo unbounded input."""
    return text if len(text) <= limit else text[:limit] + "..."
