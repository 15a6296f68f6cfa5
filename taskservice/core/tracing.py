"""Tracing (OpenTelemetry, the `taskservice[otel]` extra): when it is on, the
tracer provider of a process, and the trace ids in its log lines.

Off unless the standard variables ask for it: OTEL_TRACES_EXPORTER names an
exporter (anything but "none"), or OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT names a collector; OTEL_SDK_DISABLED=true
turns it off whatever else says. Off, nothing imports opentelemetry and no
call or task pays for tracing (taskservice.server.tracing and
taskservice.worker.tracing add their hooks only when it is on).

On, each process builds its provider from the same variables as
OpenTelemetry's own `opentelemetry-instrument` would (exporters, OTLP
protocol and endpoint, sampler, resource, batch delays), unless a provider is
already set, which it then uses. A Start's trace context travels in the task
message's headers as W3C `traceparent`/`tracestate`, where the Celery
instrumentation in the worker reads it (Celery makes every message header an
attribute of `task.request`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, MutableMapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger(__name__)

EXTRA_MISSING = (
    "the OTEL_* variables ask for tracing, but OpenTelemetry is not installed "
    "(%s): install taskservice[otel] (pip install 'taskservice[otel]'); tracing stays off"
)

_OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
"""The exporter entry point that "otlp" means for each OTLP protocol."""

_lock = threading.Lock()
_provider: TracerProvider | None = None
_warned = False


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables in `environ` (default: this process's)
    ask for traces (see the module)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return any(name.strip() not in ("", "none") for name in exporters.split(","))
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def available() -> bool:
    """Whether tracing is wanted and the extra is installed; says once, as
    a warning, when it is wanted but missing."""
    if not wanted():
        return False
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as error:
        _warn_missing(error)
        return False
    return True


def tracer_provider(service_name: str) -> TracerProvider | None:
    """This process's tracer provider, made on the first call from the
    OTEL_* variables (its `service.name` is `service_name` unless
    OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one); None when
    tracing is off (see `available`). A provider already set (say by
    `opentelemetry-instrument`) is used as it is."""
    global _provider
    if not available():
        return None
    if _provider is not None:
        return _provider
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    with _lock:
        if _provider is not None:
            return _provider
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            _provider = current
            return current
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: service_name}))
        provider = TracerProvider(resource=resource)
        for exporter in _exporters(os.environ):
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
        return provider


def log_fields() -> Callable[[Any, str, MutableMapping[str, Any]], MutableMapping[str, Any]] | None:
    """A structlog processor that adds `trace_id` and `span_id` (hex, as
    trace backends show them) of the span current where a line is logged;
    None when tracing is off, so that lines then pay nothing."""
    if not wanted():
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        return None  # `available` says so, once, where tracing is set up

    def add_trace_ids(
        _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event["trace_id"] = format(context.trace_id, "032x")
            event["span_id"] = format(context.span_id, "016x")
        return event

    return add_trace_ids


def _exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    """The span exporters OTEL_TRACES_EXPORTER names (default "otlp", in
    the OTLP protocol its variables name, default grpc as in OpenTelemetry's
    Python SDK), each configured by its own OTEL_EXPORTER_* variables. One
    that cannot be made is logged and left out."""
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
    exporters: list[SpanExporter] = []
    for name in names:
        if name in ("", "none"):
            continue
        entry = name
        if name == "otlp":
            protocol = (
                env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc"
            ).strip()
            if protocol not in _OTLP_BY_PROTOCOL:
                logger.warning(
                    "OTLP protocol %r is not one of %s: no spans are exported over OTLP",
                    protocol,
                    ", ".join(_OTLP_BY_PROTOCOL),
                )
                continue
            entry = _OTLP_BY_PROTOCOL[protocol]
        found = entry_points(group="opentelemetry_traces_exporter", name=entry)
        if not found:
            logger.warning(
                "OTEL_TRACES_EXPORTER names %r, which no installed package provides "
                "(entry point %r): its spans are not exported",
                name,
                entry,
            )
            continue
        try:
            exporters.append(next(iter(found)).load()())
        except Exception:
            logger.exception("span exporter %r could not be made: its spans are not exported", name)
    return exporters


def _warn_missing(error: ImportError) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(EXTRA_MISSING, error)
