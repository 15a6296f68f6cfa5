"""The baseline: a plain Celery app, configured like taskservice's but without
its hooks, lease heartbeat or TrackedTask, with the same no-op task.

    celery -A bench.plain worker ...
"""

from __future__ import annotations

import os

from celery import Celery

from taskservice.apps import celery_config
from taskservice.core.settings import Settings

if "TASKSERVICE_REDIS_URL" not in os.environ:
    # Never fall back to a default Redis that may be someone else's.
    raise RuntimeError("bench.plain is imported by bench/run.py, after it set up its own Redis")

app = Celery("bench-plain", set_as_current=False)
_config = celery_config(Settings())
_config.pop("include")
app.config_from_object(_config)


@app.task(name="plain.noop")
def noop() -> None:
    """Do nothing."""
