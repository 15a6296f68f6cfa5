"""Tasks the tests start (exposed only when TASKSERVICE_TASKS lists this module)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from taskservice.worker.app import app, expose
from taskservice.worker.signals import TrackedTask


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
    _publish_pid(path)
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
@app.task(bind=True, base=TrackedTask, name="test.retry_later")
def retry_later(self: TrackedTask, marker: str, countdown: float) -> str:
    """Retry once, `countdown` seconds later: meanwhile its worker holds the
    message unstarted (Celery's eta)."""
    if not Path(marker).exists():
        Path(marker).write_text("tried")
        raise self.retry(countdown=countdown, max_retries=1)
    return "second try"


@expose()
@app.task(bind=True, base=TrackedTask, name="test.sleep")
def sleep(self: TrackedTask, seconds: float) -> float:
    """Sleep `seconds` and return them."""
    time.sleep(seconds)
    return seconds


@expose()
@app.task(bind=True, base=TrackedTask, name="test.non_json_ignored", ignore_result=True)
def non_json_ignored(self: TrackedTask) -> object:
    """Return something JSON cannot encode, from a task Celery stores no result of."""
    return object()


@expose()
@app.task(bind=True, base=TrackedTask, name="test.log_run")
def log_run(self: TrackedTask, path: str, seconds: float = 0) -> str:
    """Append one line per execution of the body to `path`, then sleep."""
    with open(path, "a") as log:
        log.write(f"{self.request.id}\n")
    time.sleep(seconds)
    return "ran"


@expose()
@app.task(bind=True, base=TrackedTask, name="test.finally_marker")
def finally_marker(self: TrackedTask, path: str, seconds: float, cleanup: float = 0) -> None:
    """Publish our pid, sleep, and in `finally:` (whatever stops us) take
    `cleanup` seconds, then write `path`."""
    _publish_pid(path)
    try:
        time.sleep(seconds)
    finally:
        time.sleep(cleanup)
        Path(path).write_text("finally ran")


@expose()
@app.task(bind=True, base=TrackedTask, name="test.retry_then_sleep")
def retry_then_sleep(self: TrackedTask, marker: str, seconds: float) -> str:
    """Retry at once (countdown 0) on the first run; sleep `seconds` on the second."""
    if not Path(marker).exists():
        Path(marker).write_text("tried")
        raise self.retry(countdown=0, max_retries=1)
    _publish_pid(marker)
    time.sleep(seconds)
    return "second run"


def _publish_pid(path: str) -> None:
    # Written whole, then renamed: a reader never sees an empty pid file.
    staging = Path(path + ".pid.tmp")
    staging.write_text(str(os.getpid()))
    staging.rename(path + ".pid")


@expose()
@app.task(bind=True, base=TrackedTask, name="test.typed")
def typed(
    self: TrackedTask, count: int, ratio: float = 1.0, tags: list[str] | None = None
) -> dict[str, Any]:
    """Return the arguments as received, with their Python types."""
    return {
        "count": [count, type(count).__name__],
        "ratio": [ratio, type(ratio).__name__],
        "tags": tags,
    }


@expose()
@app.task(bind=True, base=TrackedTask, name="test.make")
def make(self: TrackedTask, kind: str, size: int = 0) -> Any:
    """Return a value clients cannot all read: "text" of `size` characters,
    lists nested `size` deep, an integer of `size` digits, or "nan"."""
    if kind == "text":
        return "x" * size
    if kind == "nested":
        value: Any = None
        for _ in range(size):
            value = [value]
        return value
    if kind == "digits":
        return int("9" * size)
    return float("nan")


@expose()
@app.task(bind=True, base=TrackedTask, name="test.flood")
def flood(self: TrackedTask, count: int, size: int = 0, pause: float = 0) -> int:
    """Report progress `count` times, each with a message of `size` characters."""
    for step in range(1, count + 1):
        self.report_progress(step, count, "x" * size)
        if pause:
            time.sleep(pause)
    return count


FENCED_SET = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
if tonumber(ARGV[1]) < stored then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'value', ARGV[2])
return 1
"""
"""Write `value` unless a holder with a higher fencing token wrote before
(the README's example of a store that refuses stale writers)."""


@expose()
@app.task(bind=True, base=TrackedTask, name="test.ticks")
def ticks(
    self: TrackedTask, path: str, seconds: float, store_url: str = "", store_key: str = ""
) -> int:
    """For `seconds`, every 50 ms, and once more in `finally:` (whatever stops
    the body): append "<task id> <fencing token> <pid> <time> <accepted>" to
    `path`, where accepted says whether the store at `store_url` took a write
    fenced by the token (1), refused it (0), or there is no store (-)."""
    import redis

    token = self.fencing_token
    store = redis.Redis.from_url(store_url, socket_timeout=5) if store_url else None
    fenced_set = store.register_script(FENCED_SET) if store else None

    def tick() -> None:
        accepted = "-"
        if fenced_set is not None:
            accepted = str(fenced_set(keys=[store_key], args=[token, self.request.id]))
        with open(path, "a") as log:
            log.write(f"{self.request.id} {token} {os.getpid()} {time.time():.3f} {accepted}\n")

    count = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            tick()
            count += 1
            time.sleep(0.05)
    finally:
        tick()  # e.g. a cleanup that saves where it got to
    return count


@expose()
@app.task(bind=True, base=TrackedTask, name="test.stamp")
def stamp(self: TrackedTask, path: str, tag: str, seconds: float) -> str:
    """Append a JSON line when the body starts and another when it ends (one
    write each, O_APPEND), so that what ran, and when, is known from the
    bodies themselves whatever Redis remembers."""
    _append(path, {"id": self.request.id, "tag": tag, "event": "start", "t": time.time()})
    time.sleep(seconds)
    _append(path, {"id": self.request.id, "tag": tag, "event": "end", "t": time.time()})
    return "stamped"


def _append(path: str, entry: dict[str, Any]) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(descriptor)


@expose()
@app.task(bind=True, base=TrackedTask, name="test.span")
def span(self: TrackedTask, path: str, seconds: float = 0, value: Any = None) -> Any:
    """Append `<id> start <time>` to `path`, sleep, append `<id> end <time>`:
    the body's own account of when it ran (a killed body writes no end)."""
    _span(str(self.request.id), path, seconds)
    return value


@expose(key_slots=2)
@app.task(bind=True, base=TrackedTask, name="test.span_two")
def span_two(self: TrackedTask, path: str, seconds: float = 0) -> None:
    """`test.span`, two of which may run at once under one key."""
    _span(str(self.request.id), path, seconds)


def _span(task_id: str, path: str, seconds: float) -> None:
    with open(path, "a") as log:
        log.write(f"{task_id} start {time.time():.6f}\n")
    time.sleep(seconds)
    with open(path, "a") as log:
        log.write(f"{task_id} end {time.time():.6f}\n")


@expose(quiet_period=1.5, quiet_after_success=True)
@app.task(bind=True, base=TrackedTask, name="test.quiet")
def quiet(self: TrackedTask, fail: bool = False) -> str:
    """Refuse Starts under its key for 1.5 s after it succeeded."""
    if fail:
        raise ValueError("asked to fail")
    return "done"


TRACING_MODULES = (
    "opentelemetry.sdk.trace",
    "opentelemetry.propagate",
    "opentelemetry.instrumentation",
)
"""OpenTelemetry's modules that only tracing loads. (Not OpenTelemetry as a
whole: redis-py 8 imports its API and metrics SDK whenever it is installed.)"""


def tracing_loaded() -> list[str]:
    """The modules of TRACING_MODULES this process has loaded."""
    return sorted(name for name in sys.modules if name.startswith(TRACING_MODULES))


def trace_view_of(task: TrackedTask) -> dict[str, Any]:
    """What `task`'s run sees of tracing: the trace context its message
    carried, and whether its process loaded OpenTelemetry's tracing."""
    return {
        # Celery makes each message header an attribute of the request.
        "traceparent": getattr(task.request, "traceparent", None),
        "tracing_loaded": bool(tracing_loaded()),
    }


@expose()
@app.task(bind=True, base=TrackedTask, name="test.trace_view")
def trace_view(self: TrackedTask) -> dict[str, Any]:
    """What its run sees of tracing (see trace_view_of)."""
    return trace_view_of(self)
