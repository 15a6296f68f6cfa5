"""The Celery app taskservice serves: found, configured and checked the same way
by the server (which sends its tasks) and the worker (which runs them).

Either taskservice's own app (`taskservice.worker.app:app`) or a team's existing
app named by TASKSERVICE_CELERY_APP. Celery, never gRPC: the one module both
sides share above the core, so neither imports the other.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.app.utils import find_app

from taskservice.core import connect
from taskservice.core.registry import EXPOSED, NotTrackable
from taskservice.core.settings import Settings

OWN_APP = "taskservice.worker.app:app"
"""taskservice's own app, used when TASKSERVICE_CELERY_APP names none."""

MAX_COUNTDOWN = 3600.0
"""The longest countdown a message may carry to a worker, in seconds: a task
that retries itself (`self.retry(countdown=...)`). A Start's countdown never
rides in its message: the server keeps the task until it is due."""

VISIBILITY_TIMEOUT = 2 * MAX_COUNTDOWN
"""Seconds after which kombu's Redis transport redelivers a message nobody
acknowledged. A worker acknowledges a task when it starts it, so a countdown
task stays unacknowledged for up to MAX_COUNTDOWN: the timeout must exceed it,
or the task would be delivered twice (the second run is refused anyway)."""

REDIS_TRANSPORT = "taskservice.worker.redis_transport:Transport"
"""kombu's Redis transport with the fix that survives a Redis restart."""

SENTINEL_TRANSPORT = "taskservice.worker.redis_transport:SentinelTransport"
"""kombu's Redis Sentinel transport, with the same fix."""

_SETTINGS = "taskservice_settings"


class AppNotFound(Exception):
    """TASKSERVICE_CELERY_APP names no importable Celery app."""


def load_app(settings: Settings) -> Celery:
    """The app whose tasks taskservice starts: TASKSERVICE_CELERY_APP's, or
    taskservice's own (configured with `settings` unless it already was),
    carrying `settings` for the hooks that keep records current."""
    name = settings.celery_app or OWN_APP
    try:
        app = find_app(name)
    except Exception as exc:
        raise AppNotFound(
            f"TASKSERVICE_CELERY_APP={name!r} names no Celery app ({exc}); "
            "give it as module:attribute, e.g. proj.celery:app"
        ) from None
    if not isinstance(app, Celery):
        raise AppNotFound(
            f"TASKSERVICE_CELERY_APP={name!r} is a {type(app).__name__}, not a Celery app"
        )
    if settings.celery_app:
        attach(app, settings)
    elif settings_of(app) is None:
        configure(app, settings)
    return app


def load_exposed(settings: Settings, app: Celery) -> None:
    """Import the task modules (TASKSERVICE_TASKS) and check that every task
    they expose can be started on `app` and followed; NotTrackable if not.
    What the server refuses to start, the worker refuses to run."""
    EXPOSED.load(settings.task_modules)
    accepted = app.conf.accept_content or ()
    for task_type in EXPOSED.types():
        if task_type.task.app is not app:
            raise NotTrackable(
                f"task {task_type.name!r} (module {task_type.module}) belongs to Celery app "
                f"{task_type.task.app.main!r}, but taskservice sends to app {app.main!r}: "
                "its Starts would never be followed. Set TASKSERVICE_CELERY_APP to your "
                "app (module:attribute), or define the task on that app"
            )
        if "json" not in accepted and "application/json" not in accepted:
            raise NotTrackable(
                f"Celery app {app.main!r} does not accept JSON messages (accept_content="
                f"{list(accepted)}), which taskservice sends: task {task_type.name!r} "
                "could never run. Add 'json' to its accept_content"
            )


def configure(app: Celery, settings: Settings, *, force: bool = True) -> None:
    """Point taskservice's own app at `settings` (Redis, broker, task modules)."""
    attach(app, settings)
    app.config_from_object(celery_config(settings), force=force)


def attach(app: Celery, settings: Settings) -> None:
    """Give `app` the settings its tracked tasks report with."""
    setattr(app, _SETTINGS, settings)


def settings_of(app: Celery) -> Settings | None:
    """The settings `app` was given; None before any were."""
    settings: Settings | None = getattr(app, _SETTINGS, None)
    return settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's settings for taskservice's apps."""
    timeouts = {
        # kombu's Redis transport waits forever by default: a broker that
        # accepts and never answers would hang a publish for good.
        "socket_timeout": settings.redis_timeout * 5,
        "socket_connect_timeout": settings.redis_timeout,
    }
    broker = settings.effective_broker_url
    config: dict[str, Any] = {
        "broker_url": broker,
        "result_backend": settings.effective_result_backend,
        "include": list(settings.task_modules),
        # JSON end to end: results become google.protobuf.Value, and a result
        # JSON cannot encode fails the task with EncodeError (never pickled).
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # One task per worker process at a time: queued tasks wait in the
        # broker (where Cancel finds them QUEUED), not in a busy worker's buffer.
        "worker_prefetch_multiplier": 1,
        # A Start fails fast (UNAVAILABLE) when the broker is down.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "broker_connection_timeout": settings.redis_timeout,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {**timeouts, "visibility_timeout": VISIBILITY_TIMEOUT},
        "redis_socket_timeout": settings.redis_timeout * 5,
        "redis_socket_connect_timeout": settings.redis_timeout,
        # Celery's own result store (for Flower and AsyncResult) rides
        # through a Redis restart instead of failing the task's bookkeeping.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 10,
        "worker_hijack_root_logger": True,
        # Flower and `celery events` see tasks from the worker's own events
        # (received, started, succeeded...: a PUBLISH each on a Redis broker),
        # not only after enabling them remotely, unless turned off for speed.
        # No task-sent events: a Start on the same Redis pushes its message
        # in the claim script, which sends none, and another broker would pay
        # one more publish per Start.
        "worker_send_task_events": settings.task_events,
    }
    scheme = broker.split("://", 1)[0]
    if scheme in ("redis", "rediss"):
        # Survives a Redis restart (see taskservice.worker.redis_transport).
        config["broker_transport"] = REDIS_TRANSPORT
    elif scheme == "sentinel":
        # kombu's sentinel:// transport, with the same fix: each connection
        # asks the sentinels for the master. A READONLY reply (a demoted
        # master) is a channel error to Celery, which stops the worker unless
        # told to reconnect on those too (celery#7946).
        config["broker_transport"] = SENTINEL_TRANSPORT
        config["broker_channel_error_retry"] = True
        config["broker_transport_options"] = {
            **config["broker_transport_options"],
            **_sentinel_options(settings),
        }
    if config["result_backend"].startswith("sentinel://"):
        config["result_backend_transport_options"] = _sentinel_options(settings)
    elif scheme in ("amqp", "amqps", "pyamqp"):
        # py-amqp silently ignores the Redis option names above. Without
        # confirms a publish returns once its bytes are in the socket buffer
        # (a Start answered OK for a message RabbitMQ never got, and its key
        # stayed held); without socket timeouts a broker that stops answering
        # on an open connection blocks a publish forever.
        config["broker_transport_options"] = {
            "confirm_publish": True,
            "read_timeout": timeouts["socket_timeout"],
            "write_timeout": timeouts["socket_timeout"],
        }
    return config


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    """kombu's and Celery's options for a `sentinel://` URL: the master's
    name, and how to talk to the sentinels themselves."""
    return {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": connect.sentinel_options(settings),
    }
