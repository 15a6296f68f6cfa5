"""Demo tasks: the seed's `dummy`, one that fails, one that reports progress.

Tasks stay thin: each calls plain code and is registered by name.
"""

from __future__ import annotations

import time

from taskservice.worker.app import app, expose
from taskservice.worker.signals import TrackedTask


@expose(exclusivity_key="demo")
@app.task(bind=True, base=TrackedTask, name="demo.dummy")
def dummy(self: TrackedTask, name: str = "Bob", seconds: float = 5.0) -> str:
    """Sleep `seconds`, then greet `name`. Runs one at a time (key "demo")."""
    time.sleep(seconds)
    return f"Hello {name}!"


@expose()
@app.task(bind=True, base=TrackedTask, name="demo.fail")
def fail(self: TrackedTask, message: str = "something went wrong") -> None:
    """Raise ValueError(message): shows how a failure arrives."""
    raise ValueError(message)


@expose()
@app.task(bind=True, base=TrackedTask, name="demo.progress")
def progress(self: TrackedTask, steps: int = 5, seconds_per_step: float = 1.0) -> dict[str, int]:
    """Work through `steps` steps, reporting progress after each; stops early
    (ending CANCELLED) after a graceful cancel."""
    for step in range(1, steps + 1):
        if self.cancel_requested():
            raise InterruptedError(f"cancelled after {step - 1} of {steps} steps")
        time.sleep(seconds_per_step)
        self.report_progress(step, steps, f"step {step} of {steps}")
    return {"steps": steps}
