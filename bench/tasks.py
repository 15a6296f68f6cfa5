"""The tasks the benchmarks start: one does nothing, so only the machinery is
measured; the other holds its key while running."""

from __future__ import annotations

import time

from taskservice.worker.app import app, expose
from taskservice.worker.signals import TrackedTask


@expose()
@app.task(bind=True, base=TrackedTask, name="bench.noop")
def noop(self: TrackedTask) -> None:
    """Do nothing."""


@expose()
@app.task(bind=True, base=TrackedTask, name="bench.hold")
def hold(self: TrackedTask, seconds: float) -> None:
    """Hold its exclusivity key, running, for `seconds` (a key's busy holder)."""
    time.sleep(seconds)
