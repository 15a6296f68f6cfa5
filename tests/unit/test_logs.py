"""The log formats: what `taskservice dev` prints for a person, and JSON
lines for a collector, with the per-call fields either way."""

from __future__ import annotations

import json
import subprocess
import sys

from taskservice.cli import log_format
from taskservice.core.settings import Settings
from tests.conftest import ROOT

SNIPPET = """
import logging, sys
from structlog.contextvars import bound_contextvars
from taskservice.core import logs
logs.configure(sys.argv[1])
with bound_contextvars(task_id="t-1", exclusivity_key="k-1", request_id="r-1"):
    logging.getLogger("celery.app.trace").info("Task %s succeeded", "demo")
logging.getLogger("taskservice.server.server").warning("outside any call")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("taskservice.core.errors").exception("internal error")
"""


def logged(log_format: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", SNIPPET, log_format],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stderr.splitlines()


def test_json_lines_carry_the_bound_fields_and_nothing_leaks_past_them() -> None:
    lines = logged("json")
    assert len(lines) == 3, lines  # the traceback stays inside its line
    first, second, third = (json.loads(line) for line in lines)
    assert first["event"] == "Task demo succeeded"
    assert (first["task_id"], first["exclusivity_key"], first["request_id"]) == (
        "t-1",
        "k-1",
        "r-1",
    )
    assert (first["level"], first["logger"]) == ("info", "celery.app.trace")
    assert "timestamp" in first
    assert "task_id" not in second and second["level"] == "warning"
    assert "ZeroDivisionError" in third["exception"]


def test_console_lines_read_as_text_with_the_fields() -> None:
    lines = logged("console")
    assert not lines[0].startswith("{")
    assert "Task demo succeeded" in lines[0] and "task_id=t-1" in lines[0]
    assert "request_id=r-1" in lines[0] and "[info" in lines[0]
    assert "ZeroDivisionError" in "\n".join(lines)


def test_dev_logs_for_a_person_unless_told_otherwise() -> None:
    assert log_format("dev", Settings()) == "console"
    assert log_format("serve", Settings()) == "json"
    assert log_format("worker", Settings()) == "json"
    assert log_format("dev", Settings(log_format="json")) == "json"
    assert log_format("serve", Settings(log_format="console")) == "console"
