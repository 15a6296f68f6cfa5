"""A team's existing Celery app: its own configuration, queues, routes and
base class. The only taskservice line is `expose`; taskservice reaches it
through TASKSERVICE_CELERY_APP=tests.support.team_app:app."""

from __future__ import annotations

import os
import time
from pathlib import Path

from celery import Celery, Task

from taskservice import expose

app = Celery("team", broker=os.environ.get("TEAM_BROKER_URL"), set_as_current=False)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_default_queue="team-work",
    task_routes={"team.routed": {"queue": "team-routed"}},
)


class TeamTask(Task):  # type: ignore[type-arg]
    """The team's own base class, which keeps working."""

    greeting = "hello"


@expose(exclusivity_key="team")
@app.task(bind=True, base=TeamTask, name="team.greet")
def greet(self: TeamTask, who: str, seconds: float = 0) -> str:
    time.sleep(seconds)
    return f"{self.greeting} {who}"


@expose()
@app.task(name="team.routed")
def routed() -> str:
    """Sent to the team-routed queue by the app's task_routes."""
    return "routed"


@expose()
@app.task(bind=True, name="team.write_after")
def write_after(self: Task, path: str, seconds: float) -> str:  # type: ignore[type-arg]
    """Write `path` after `seconds`, reporting progress meanwhile."""
    self.report_progress(0, 1, "waiting")  # type: ignore[attr-defined]
    time.sleep(seconds)
    Path(path).write_text("written")
    return "written"


@app.task(name="team.unexposed")
def unexposed(path: str, seconds: float) -> str:
    """A task of the team's that taskservice never starts (no record, no
    lease): write `path` after `seconds`."""
    time.sleep(seconds)
    Path(path).write_text("written")
    return "written"
