"""The Celery app taskservice's workers run and its server sends tasks to.

Run a worker with `taskservice worker` or `celery -A worker.app worker`.
Add your own tasks in a module listed in TASKSERVICE_TASKS:

    from worker.app import app, expose

    @expose()
    @app.task(bind=True, name="reports.build")
    def build(self, month: str) -> dict: ...
"""

from __future__ import annotations

from celery import Celery

from service.config import Settings
from worker import signals
from worker.registry import TaskRegistry


def create_app(settings: Settings) -> signals.TaskServiceCelery:
    """Build the Celery app for `settings`, with its state-reporting hooks."""
    app = signals.TaskServiceCelery(
        "taskservice",
        broker=settings.effective_broker_url,
        backend=settings.effective_result_backend,
        task_cls="worker.signals:TrackedTask",
        include=list(settings.task_modules),
        set_as_current=False,
    )
    _configure(app, settings)
    signals.connect(app, settings)
    return app


def create_publisher(settings: Settings) -> Celery:
    """The app the gRPC server sends tasks and revokes with.

    It has no result backend: with the Redis backend, Celery subscribes the
    sender to each sent task's result channel, which a long-running server
    must not accumulate; taskservice's records carry results instead.
    """
    publisher = Celery(
        "taskservice-publisher", broker=settings.effective_broker_url, set_as_current=False
    )
    _configure(publisher, settings)
    return publisher


def _configure(app: Celery, settings: Settings) -> None:
    app.conf.update(
        # JSON end to end: results become google.protobuf.Value, and a result
        # JSON cannot encode fails the task with EncodeError (never pickled).
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # One task per worker process at a time: queued tasks wait in the
        # broker (where Cancel finds them QUEUED), not in a busy worker's buffer.
        worker_prefetch_multiplier=1,
        # A Start fails fast (UNAVAILABLE) when the broker is down rather than
        # retrying for long under the exclusivity lock.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        broker_connection_timeout=settings.redis_timeout,
        broker_connection_retry_on_startup=True,
        redis_socket_timeout=settings.redis_timeout * 5,
        redis_socket_connect_timeout=settings.redis_timeout,
        worker_hijack_root_logger=True,
    )


settings = Settings()
app = create_app(settings)
registry = TaskRegistry()
expose = registry.expose
