"""Tasks the tests start (exposed only when TASKSERVICE_TASKS lists this module)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from worker.app import app, expose
from worker.signals import TrackedTask


@expose()
@app.task(bind=True, base=TrackedTask, name="test.echo")
def echo(self: TrackedTask, value: Any = None) -> Any:
    """Return `value` unchanged."""
    return value


@expose()
@app.task(bind=True, base=TrackedTask, name="test.non_json")
def non_json(self: TrackedTask) -> object:
    """Return something JSON cannot encode."""
    return object()


@expose()
@app.task(bind=True, base=TrackedTask, name="test.write_after")
def write_after(self: TrackedTask, path: str, seconds: float, text: str = "done") -> str:
    """Record our pid in `path`.pid, sleep, then write `text` to `path` (the
    side effect a cancel must prevent)."""
    Path(path + ".pid").write_text(str(os.getpid()))
    time.sleep(seconds)
    Path(path).write_text(text)
    return text


@expose()
@app.task(bind=True, base=TrackedTask, name="test.retry_once")
def retry_once(self: TrackedTask, marker: str) -> str:
    """Fail the first time (retrying at once), succeed the second."""
    if not Path(marker).exists():
        Path(marker).write_text("tried")
        raise self.retry(countdown=0.2, max_retries=1)
    return "second try"


@expose()
@app.task(bind=True, base=TrackedTask, name="test.sleep")
def sleep(self: TrackedTask, seconds: float) -> float:
    """Sleep `seconds` and return them."""
    time.sleep(seconds)
    return seconds
