"""The task the benchmarks start: it does nothing, so only the machinery is measured."""

from __future__ import annotations

from taskservice.worker.app import app, expose
from taskservice.worker.signals import TrackedTask


@expose()
@app.task(bind=True, base=TrackedTask, name="bench.noop")
def noop(self: TrackedTask) -> None:
    """Do nothing."""
