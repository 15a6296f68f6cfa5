"""Logging: every line a server or worker writes goes through one structlog
formatter, as JSON (one object a line, for a log collector) or as readable
console lines (`taskservice dev`).

taskservice's code, Celery, kombu and grpc all log through the standard
library; `configure` gives the root logger one handler whose formatter
(structlog's ProcessorFormatter) renders each record with the same fields:

    {"event": "task cancelled (KILL) while queued: it will not run",
     "level": "info", "logger": "taskservice.server.backend",
     "timestamp": "2025-01-01T12:00:00.000000Z",
     "task_id": "0b5c...", "exclusivity_key": "report-42", "request_id": "r-1"}

The per-call fields come from structlog's context variables: the server
binds task_id, exclusivity_key and request_id where it learns them
(taskservice.server.backend); a worker binds task_id and task_name around each task
it runs, and exclusivity_key once its record says it (taskservice.worker.signals). Each
gRPC call and each task run has its own context, so fields never leak from
one to another. With tracing on (taskservice.core.tracing), a line logged
inside a span also carries its `trace_id` and `span_id`: in a worker, those
of the task's run; in the server, those of the call (or of its claim).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from taskservice.core import tracing

FORMATS = ("json", "console")

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(
    log_format: str, *, level: int | str = logging.INFO, stream: TextIO | None = None
) -> None:
    """Send every log record of this process to `stream` (stderr) in
    `log_format` ("json" or "console"), from `level` up. Replaces the root
    logger's handlers (basicConfig's, Celery's); safe to call again."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    stream = stream or sys.stderr
    renderer: Any
    if log_format == "json":
        # A traceback stays one JSON string, not lines of their own.
        ending: list[Any] = [structlog.processors.format_exc_info]
        renderer = structlog.processors.JSONRenderer()
    else:
        ending = []
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    shared = list(_SHARED)
    trace_ids = tracing.log_fields()  # None when tracing is off: lines pay nothing
    if trace_ids is not None:
        shared.append(trace_ids)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *ending,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn's text becomes a line like the others
    # structlog's own loggers, should code use them, end in the same handler.
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
