"""A task whose Starts publish through kombu although the broker is the
records' Redis (tests/integration/test_tracing.py loads it; its priority
attribute, which Celery deprecates, would warn in every test run)."""

from __future__ import annotations

from typing import Any

from taskservice.worker.app import app, expose
from taskservice.worker.signals import TrackedTask
from tests.support.tasks import trace_view_of


@expose()
@app.task(bind=True, base=TrackedTask, name="test.trace_view_prioritized", priority=5)
def trace_view_prioritized(self: TrackedTask) -> dict[str, Any]:
    """test.trace_view, with a priority that kombu's Redis transport keeps on
    a list of its own: its Starts publish through kombu, not the claim script."""
    return trace_view_of(self)
