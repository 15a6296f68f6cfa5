"""The Celery app taskservice's workers run and its server sends tasks to.

Either taskservice's own app (`app` here), or a team's existing app named by
TASKSERVICE_CELERY_APP (`load_app`): its tasks marked with `expose` are
tracked without changing their base class or their app's configuration.
Task authors import from the `taskservice` package (see it).

Importing this module reads no settings: `configure(app, settings)` points
the app at a Redis and a broker. When nothing called it, the app configures
itself from TASKSERVICE_* variables the first time Celery reads its
configuration (as `celery -A worker.app worker` does).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.app.utils import find_app

from service.config import Settings
from worker import signals
from worker.registry import TaskRegistry

MAX_COUNTDOWN = 3600.0
"""The longest countdown a Start may ask for, in seconds."""

VISIBILITY_TIMEOUT = 2 * MAX_COUNTDOWN
"""Seconds after which kombu's Redis transport redelivers a message nobody
acknowledged. A worker acknowledges a task when it starts it, so a countdown
task stays unacknowledged for up to MAX_COUNTDOWN: the timeout must exceed it,
or the task would be delivered twice (the second run is refused anyway)."""


class AppNotFound(Exception):
    """TASKSERVICE_CELERY_APP names no importable Celery app."""


def configure(app: Celery, settings: Settings) -> None:
    """Point taskservice's own `app` at `settings` (Redis, broker, task
    modules) and connect the hooks that keep task records current."""
    _apply(app, settings, force=True)


def load_app(settings: Settings) -> Celery:
    """The app whose tasks taskservice starts: TASKSERVICE_CELERY_APP's,
    tracked with `settings`, or taskservice's own, configured with them
    unless it already was."""
    if not settings.celery_app:
        if signals.settings_of(app) is None:
            configure(app, settings)
        return app
    try:
        team_app = find_app(settings.celery_app)
    except Exception as exc:
        raise AppNotFound(
            f"TASKSERVICE_CELERY_APP={settings.celery_app!r} names no Celery app ({exc}); "
            "give it as module:attribute, e.g. proj.celery:app"
        ) from None
    if not isinstance(team_app, Celery):
        raise AppNotFound(
            f"TASKSERVICE_CELERY_APP={settings.celery_app!r} is a {type(team_app).__name__}, "
            "not a Celery app"
        )
    signals.track(team_app, settings)
    return team_app


def create_publisher(settings: Settings, source: Celery) -> Celery:
    """The app the gRPC server sends `source`'s tasks and revokes with: the
    same broker and routing, bounded waits, JSON messages.

    It has no result backend: with the Redis backend, Celery subscribes the
    sender to each sent task's result channel, which a long-running server
    must not accumulate; taskservice's records carry results instead.
    """
    publisher = Celery("taskservice-publisher", set_as_current=False)
    if source is app:
        config = celery_config(settings)
    else:
        # The team's own settings (broker, queues, routes), read unmasked.
        config = {
            name: source.conf[name]
            for name in source.conf.table(with_defaults=False)
            if name != "deprecated_settings"
        }
        ours = celery_config(settings.model_copy(update={"broker_url": source.conf.broker_url}))
        for name in ("task_serializer", "task_publish_retry_policy", "broker_connection_timeout"):
            config[name] = ours[name]
        config["broker_transport_options"] = {
            **ours["broker_transport_options"],
            **(config.get("broker_transport_options") or {}),
        }
    config.pop("result_backend", None)
    publisher.config_from_object(config)
    return publisher


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
        # not only after enabling them remotely. No task-sent events: a Start
        # on the same Redis pushes its message in the claim script, which
        # sends none, and another broker would pay one more publish per Start.
        "worker_send_task_events": True,
    }
    scheme = broker.split("://", 1)[0]
    if scheme in ("redis", "rediss"):
        # Survives a Redis restart (see the module).
        config["broker_transport"] = "worker.redis_transport:Transport"
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


app = Celery("taskservice", task_cls="worker.signals:TrackedTask", set_as_current=False)
signals.track(app)
registry = TaskRegistry()
expose = registry.expose


@app.on_configure.connect
def _configure_from_environment(sender: Celery, **_: Any) -> None:
    if signals.settings_of(sender) is None:
        # Celery is reading the configuration right now: hand it the source
        # without forcing a reload.
        _apply(sender, Settings(), force=False)


def _apply(app: Celery, settings: Settings, *, force: bool) -> None:
    signals.track(app, settings)
    app.config_from_object(celery_config(settings), force=force)
