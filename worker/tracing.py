"""Tracing in the worker: each task's run is a span of its Start's trace.

With tracing on (the OTEL_* variables, see taskservice.core.tracing), a
worker runs OpenTelemetry's Celery instrumentation: each run is a span
`run/<task name>`, the child of the trace context in the task's message
headers (`traceparent`, put there by the server's Start, see
taskservice.server.tracing), and a task the task sends itself (a retry, a
subtask) carries the run's context on. Log lines written during the run
carry its `trace_id` and `span_id` beside `task_id` (taskservice.core.logs).

Only workers trace tasks: the hooks are connected when a worker starts
(`worker_init`), never in the server, which imports the same app. Each
process that runs tasks makes its own tracer provider (a prefork pool
process after the fork: exporters hold threads and connections that a fork
does not carry over) and flushes it when it exits.
Off, nothing is connected and nothing imported from opentelemetry.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.signals import (
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)

from taskservice.core import tracing

DEFAULT_SERVICE_NAME = "taskservice-worker"
"""The `service.name` of a worker's spans unless OTEL_SERVICE_NAME (or
OTEL_RESOURCE_ATTRIBUTES) names another."""

FLUSH_MILLIS = 5000
"""How long a pool process that exits waits for its last spans to go out."""

_provided = threading.Event()


def connect() -> None:
    """Trace the tasks of the worker this process becomes, if the OTEL_*
    variables ask for it (nothing happens in a process that is no worker)."""
    if tracing.wanted():
        worker_init.connect(_start, weak=False)


def _start(**_: Any) -> None:
    if not tracing.available():  # says why, once, if the extra is missing
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    # A prefork pool process makes it as it starts, the others (solo,
    # threads) before their first task, ahead of the instrumentation's own
    # task_prerun hook (receivers run in the order connected).
    worker_process_init.connect(_provide, weak=False)
    task_prerun.connect(_provide, weak=False)
    worker_process_shutdown.connect(_flush, weak=False)
    CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]  # no type hints


def _provide(**_: Any) -> None:
    if not _provided.is_set():
        # The instrumentation's tracer follows the global provider once set.
        tracing.tracer_provider(DEFAULT_SERVICE_NAME)
        _provided.set()


def _flush(**_: Any) -> None:
    # A pool process ends with os._exit: no atexit hook flushes its spans.
    # Bounded: a collector that is away must not hold up a worker's stop.
    provider = tracing.tracer_provider(DEFAULT_SERVICE_NAME) if _provided.is_set() else None
    if provider is not None:
        provider.force_flush(FLUSH_MILLIS)
