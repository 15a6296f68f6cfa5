"""Settings: one frozen object, read from TASKSERVICE_* environment variables.

Both the gRPC server and the Celery worker read these, so that a server and
the workers it feeds agree on where Redis and the broker are.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """taskservice settings. Every field is read from `TASKSERVICE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="TASKSERVICE_", frozen=True, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding taskservice's task records, exclusivity locks and events."""

    broker_url: str | None = None
    """Celery broker URL; defaults to `redis_url`."""

    result_backend: str | None = None
    """Celery result backend URL; defaults to `redis_url`."""

    key_prefix: str = "taskservice"
    """Prefix of every Redis key and channel taskservice uses (several
    deployments, or test runs, can share one Redis with different prefixes)."""

    tasks: str = "worker.tasks"
    """Comma-separated modules whose `expose`d tasks may be started. Only
    these tasks are reachable over gRPC."""

    host: str = "127.0.0.1"
    """Address the gRPC server listens on (`0.0.0.0` for all interfaces)."""

    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one."""

    lock_wait: float = Field(default=4.0, gt=0)
    """Seconds a Start waits for an exclusivity key's lock before answering
    UNAVAILABLE."""

    lock_expiry: float = Field(default=30.0, gt=0)
    """Seconds after which an exclusivity lock expires even if its holder
    (a crashed server) never releases it."""

    record_ttl: int = Field(default=7 * 24 * 3600, gt=0)
    """Seconds a task's record is kept after its last change; after that its
    id answers NOT_FOUND."""

    cancel_wait: float = Field(default=5.0, ge=0)
    """Seconds a TERMINATE/KILL Cancel waits for the worker to confirm before
    answering with the task as it then is."""

    max_args_bytes: int = Field(default=256 * 1024, gt=0)
    """Largest accepted size of a Start's args plus kwargs, in bytes."""

    redis_timeout: float = Field(default=2.0, gt=0)
    """Socket timeout of Redis commands, in seconds."""

    health_interval: float = Field(default=1.0, gt=0)
    """Seconds between health checks of Redis."""

    shutdown_grace: float = Field(default=5.0, ge=0)
    """Seconds in-flight calls get to finish on shutdown."""

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or self.redis_url

    @property
    def task_modules(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.tasks.split(",") if m.strip())
