"""When tracing turns on (only when the OTEL_* variables ask), what it makes of
them, and what it says when the otel extra is missing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

import pytest

from taskservice.core import tracing
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "svc", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_ask(environ: dict[str, str], on: bool) -> None:
    assert tracing.wanted(environ) is on


def test_variables_without_the_extra_warn_once_and_leave_tracing_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    monkeypatch.setattr(tracing, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=tracing.__name__):
        assert tracing.tracer_provider("taskservice-server") is None
        assert not tracing.available()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "pip install 'taskservice[otel]'" in warnings[0]


TRACED = """
import logging
from opentelemetry import trace
from taskservice.core import logs, tracing

logs.configure("json")
provider = tracing.tracer_provider("taskservice-test")
assert provider is trace.get_tracer_provider() and tracing.tracer_provider("other") is provider
with provider.get_tracer("test").start_as_current_span("work"):
    logging.getLogger("test").info("inside")
logging.getLogger("test").info("outside")
provider.force_flush()
"""


def traced(environ: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The spans (console exporter) and log lines of TRACED run with `environ`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", TRACED],
        cwd=ROOT,
        env={**env, "OTEL_TRACES_EXPORTER": "console", **environ},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    decoder = json.JSONDecoder()
    spans: list[dict[str, Any]] = []
    text = done.stdout.strip()
    while text:  # the console exporter prints indented JSON objects
        span, end = decoder.raw_decode(text)
        spans.append(span)
        text = text[end:].strip()
    return spans, [json.loads(line) for line in done.stderr.splitlines()]


def test_the_provider_exports_as_the_variables_say_and_lines_carry_its_trace_ids() -> None:
    spans, lines = traced({})
    (span,) = spans
    assert span["name"] == "work"
    assert span["resource"]["attributes"]["service.name"] == "taskservice-test"
    inside, outside = lines
    assert inside["event"] == "inside"
    assert "0x" + str(inside["trace_id"]) == span["context"]["trace_id"]
    assert "0x" + str(inside["span_id"]) == span["context"]["span_id"]
    assert "trace_id" not in outside and "span_id" not in outside


def test_otel_service_name_names_the_service() -> None:
    spans, _ = traced({"OTEL_SERVICE_NAME": "billing-tasks"})
    assert spans[0]["resource"]["attributes"]["service.name"] == "billing-tasks"


def test_an_exporter_no_package_provides_is_said_and_left_out() -> None:
    spans, lines = traced({"OTEL_TRACES_EXPORTER": "console,zipkin_nowhere"})
    assert len(spans) == 1
    said = [line["event"] for line in lines if line.get("level") == "warning"]
    assert any("zipkin_nowhere" in str(event) for event in said), lines
