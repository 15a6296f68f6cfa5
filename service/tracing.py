"""Tracing in the server: its spans, and the trace context a Start hands its task.

With tracing on (the OTEL_* variables, see taskservice.core.tracing), each
TaskService call continues its caller's trace (W3C `traceparent` in the call's
metadata, read by OpenTelemetry's gRPC server interceptor): its span is named
after the method (`/taskservice.v1.TaskService/Start`). Within a Start, the
claim script gets a child span `claim`, and a publish through kombu one named
`publish`; the task's message carries the Start span's context in its headers
(`traceparent`, `tracestate`), so the worker's run of the task is its child,
also when the message is sent later (a countdown, a wait for the key): it was
made, or kept, at the Start. The dispatcher's later publish of such a task is
a `publish` span of the Start's trace too. Health and reflection calls are
not traced (probes would flood the traces).

Off (the default), `OFF` stands in: no interceptor, no header, no span, and
nothing imported from opentelemetry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import grpc

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice.core import tracing

SERVICE = pb.DESCRIPTOR.services_by_name["TaskService"].full_name
DEFAULT_SERVICE_NAME = "taskservice-server"
"""The `service.name` of the server's spans unless OTEL_SERVICE_NAME (or
OTEL_RESOURCE_ATTRIBUTES) names another."""

TASK_ID = "taskservice.task_id"
"""The attribute naming the task a span is about."""

NO_CONTEXT: dict[str, str] = {}
"""The trace context of an untraced Start (shared: never changed)."""

_NOTHING = contextlib.nullcontext()


class Tracing:
    """What the server traces: nothing (this class; see `Traced`)."""

    interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
    """The gRPC server's interceptors for tracing."""

    def context(self) -> dict[str, str]:
        """The current trace context, as message headers (`traceparent`...)."""
        return NO_CONTEXT

    def claim(self, task_id: str) -> AbstractContextManager[object]:
        """The span of a Start's claim script, child of the current span."""
        return _NOTHING

    def publish(
        self, task_id: str, queue: str, *, parent: Mapping[str, str] | None = None
    ) -> AbstractContextManager[object]:
        """The span of a publish through kombu, child of the current span, or
        of the trace context `parent` (a deferred task's Start)."""
        return _NOTHING


OFF = Tracing()


class Traced(Tracing):
    """Tracing on, with the spans of `provider`."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.instrumentation.grpc import (
            GrpcAioInstrumentorServer,
            aio_server_interceptor,
        )
        from opentelemetry.instrumentation.grpc.filters import service_name

        self._tracer = provider.get_tracer("taskservice.server")
        self._inject = propagate.inject
        self._extract = propagate.extract
        self._internal, self._producer = trace.SpanKind.INTERNAL, trace.SpanKind.PRODUCER
        # Under `opentelemetry-instrument`, grpc.aio.server() adds the same
        # interceptor itself: a second would trace each call twice. (The
        # instrumentations have no type hints.)
        instrumentor = GrpcAioInstrumentorServer()  # type: ignore[no-untyped-call]
        if not instrumentor.is_instrumented_by_opentelemetry:
            interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
                tracer_provider=provider, filter_=service_name(SERVICE)
            )
            self.interceptors = (interceptor,)

    def context(self) -> dict[str, str]:
        carrier: dict[str, str] = {}
        self._inject(carrier)
        return carrier

    def claim(self, task_id: str) -> AbstractContextManager[object]:
        span: AbstractContextManager[object] = self._tracer.start_as_current_span(
            "claim", kind=self._internal, attributes={TASK_ID: task_id}
        )
        return span

    def publish(
        self, task_id: str, queue: str, *, parent: Mapping[str, str] | None = None
    ) -> AbstractContextManager[object]:
        span: AbstractContextManager[object] = self._tracer.start_as_current_span(
            "publish",
            context=self._extract(parent) if parent else None,
            kind=self._producer,
            attributes={
                TASK_ID: task_id,
                "messaging.system": "celery",
                "messaging.operation": "publish",
                "messaging.destination.name": queue,
            },
        )
        return span


def server_tracing() -> Tracing:
    """`Traced` if the OTEL_* variables ask for traces (and the extra is
    installed), else OFF."""
    provider = tracing.tracer_provider(DEFAULT_SERVICE_NAME)
    return OFF if provider is None else Traced(provider)
