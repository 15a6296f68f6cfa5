"""A team's Celery app whose broker is the records' own Redis
(TASKSERVICE_REDIS_URL), configured as PUBLISH_CONFIG names (see
publish_configs). Each task answers where its message came from."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task

from taskservice import expose
from tests.support.publish_configs import CONFIGS

app = Celery("publish", broker=os.environ.get("TASKSERVICE_REDIS_URL"), set_as_current=False)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    **CONFIGS[os.environ.get("PUBLISH_CONFIG", "routed")],
)


def delivered(task: Task) -> dict[str, Any]:  # type: ignore[type-arg]
    info = task.request.delivery_info or {}
    return {key: info.get(key) for key in ("exchange", "routing_key", "priority")}


@expose()
@app.task(bind=True, name="pub.plain")
def plain(self: Task) -> dict[str, Any]:  # type: ignore[type-arg]
    """To the default queue."""
    return delivered(self)


@expose()
@app.task(bind=True, name="pub.routed")
def routed(self: Task) -> dict[str, Any]:  # type: ignore[type-arg]
    """task_routes send it to a queue by name."""
    return delivered(self)


@expose()
@app.task(bind=True, name="pub.own_exchange")
def own_exchange(self: Task) -> dict[str, Any]:  # type: ignore[type-arg]
    """task_routes send it to a queue that has an exchange of its own."""
    return delivered(self)


@expose()
@app.task(bind=True, name="pub.by_exchange")
def by_exchange(self: Task) -> dict[str, Any]:  # type: ignore[type-arg]
    """task_routes send it to an exchange and routing key, not a queue."""
    return delivered(self)


@expose()
@app.task(bind=True, name="pub.urgent", priority=6)
def urgent(self: Task) -> dict[str, Any]:  # type: ignore[type-arg]
    """Its own priority puts it on a priority list of kombu's."""
    return delivered(self)
