"""One trace from caller to task (OpenTelemetry, the otel extra).

The caller is this process: a gRPC channel with OpenTelemetry's client
interceptor and an in-memory exporter. The server and the worker are real
processes configured only by OTEL_* variables, exporting over OTLP/HTTP to a
collector this module runs (`Collector`, decoding opentelemetry-proto's
ExportTraceServiceRequest). Each Start must leave one trace: the client's
call, the server's Start as its child, the claim under the Start, and the
worker's run under the Start, whichever way the message went (pushed with
the claim, or published through kombu) and whenever (at once, or when due).
Without OTEL_* variables nothing is traced and the message carries no trace
context.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from opentelemetry.instrumentation.grpc import aio_client_interceptors
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, stop_process_group
from taskservice.core import tracing
from taskservice.server.server import Server
from tests.conftest import ROOT, start_server_process, start_worker
from tests.support.client import finished, start_request
from tests.support.otlp import Collector

PREFIX = f"ts-trace-{uuid.uuid4().hex[:8]}"
QUEUE = f"q-trace-{uuid.uuid4().hex[:8]}"  # only this module's worker consumes it
START = "/taskservice.v1.TaskService/Start"

pytestmark = pytest.mark.skipif(
    tracing.wanted(), reason="this process's own OTEL_* variables would trace the off cases"
)


@dataclass
class Caller:
    """The traced client: its stub, and the spans its calls made."""

    stub: pb_grpc.TaskServiceStub
    spans: InMemorySpanExporter

    def start_span(self) -> ReadableSpan:
        """The (single) client span of a Start made since the last one."""
        started = [s for s in self.spans.get_finished_spans() if s.name == START]
        self.spans.clear()
        assert len(started) == 1, started
        return started[0]


@contextlib.asynccontextmanager
async def traced_caller(port: int) -> AsyncIterator[Caller]:
    """A stub on a channel whose calls are traced in this process (and send
    their trace context along, as any instrumented caller's do)."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    interceptors = aio_client_interceptors(tracer_provider=provider)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=interceptors) as channel:
        yield Caller(pb_grpc.TaskServiceStub(channel), spans)


@dataclass
class Stack:
    port: int
    collector: Collector
    worker_log: Path


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A server and a prefork worker, traced by OTEL_* variables only."""
    folder = tmp_path_factory.mktemp("tracing")
    collector = Collector()
    env = {
        "TASKSERVICE_KEY_PREFIX": PREFIX,
        "TASKSERVICE_TASKS": "tests.support.tasks,tests.support.traced_tasks",
        "TASKSERVICE_LOG_FORMAT": "json",
        "TASKSERVICE_DISPATCH_INTERVAL": "0.1",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: spans go out at once
    }
    worker = start_worker(folder / "worker.log", concurrency=2, queues=QUEUE, env=env)
    try:
        server, port = start_server_process(folder / "server.log", env)
        try:
            yield Stack(port, collector, folder / "worker.log")
        finally:
            stop_process_group(server)
    finally:
        stop_process_group(worker)
        collector.close()


@pytest.fixture
async def caller(stack: Stack) -> AsyncIterator[Caller]:
    async with traced_caller(stack.port) as traced:
        yield traced


@pytest.mark.parametrize(
    ("task_name", "countdown", "published"),
    [
        ("test.trace_view", 0.0, False),
        ("test.trace_view", 0.3, False),
        ("test.trace_view_prioritized", 0.0, True),
        ("test.trace_view_prioritized", 0.3, True),
    ],
    ids=["pushed-with-claim", "pushed-when-due", "kombu", "kombu-when-due"],
)
async def test_one_trace_holds_the_call_the_start_the_claim_and_the_run(
    stack: Stack, caller: Caller, task_name: str, countdown: float, published: bool
) -> None:
    request = start_request(task_name)
    request.options.queue = QUEUE
    if countdown:
        request.options.countdown.FromTimedelta(timedelta(seconds=countdown))
    task = (await caller.stub.Start(request)).task
    client = caller.start_span()
    trace_id = format(client.context.trace_id, "032x")
    done = await finished(caller.stub, task.id)
    assert done.state == pb.TASK_STATE_SUCCEEDED, done

    run = f"run/{task_name}"
    names = [START, "claim", run] + (["publish"] if published else [])
    spans = await stack.collector.trace(trace_id, *names)
    assert set(spans) == set(names), f"trace {trace_id} has {sorted(spans)}, wants {names}"
    start, claim, ran = spans[START], spans["claim"], spans[run]
    assert start.service == claim.service == "taskservice-server"
    assert ran.service == "taskservice-worker"
    assert start.parent_id == format(client.context.span_id, "016x")
    assert claim.parent_id == start.span_id
    assert claim.attributes["taskservice.task_id"] == task.id
    # The message carries the Start's context, whoever sent it and when.
    assert ran.parent_id == start.span_id
    if published:
        assert spans["publish"].parent_id == start.span_id
        assert spans["publish"].attributes["messaging.destination.name"] == QUEUE
    seen = json_format.MessageToDict(done.result)
    assert seen["traceparent"].split("-")[1:3] == [trace_id, start.span_id]

    # The worker's lines about the run carry its span beside the task id.
    lines = [_json(line) for line in stack.worker_log.read_text().splitlines()]
    about = [line for line in lines if line.get("task_id") == task.id]
    assert any(
        line.get("trace_id") == trace_id and line.get("span_id") == ran.span_id for line in about
    ), about


def _json(line: str) -> dict[str, Any]:
    try:
        parsed = json.loads(line)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


async def test_without_otel_variables_nothing_is_traced_and_no_context_is_sent(
    server: Server, worker_process: subprocess.Popen[bytes]
) -> None:
    """The session's server (this process) and worker have no OTEL_*
    variables: a traced caller's context goes no further than the call."""
    async with traced_caller(server.port) as traced:
        task = (await traced.stub.Start(start_request("test.trace_view"))).task
        assert traced.start_span().context.is_valid  # the caller did send one
        done = await finished(traced.stub, task.id)
    assert done.state == pb.TASK_STATE_SUCCEEDED, done
    assert json_format.MessageToDict(done.result) == {"traceparent": None, "tracing_loaded": False}


_SERVER_WITHOUT_OTEL = """
import asyncio, json, sys
import grpc
from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.core import logs
from taskservice.core.settings import Settings
from taskservice.server.server import create_server
from tests.support.tasks import tracing_loaded

async def main() -> None:
    logs.configure("json")
    running = await create_server(Settings(), port=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        request = pb.StartRequest(task_name="test.echo")
        request.options.queue = sys.argv[1]
        await pb_grpc.TaskServiceStub(channel).Start(
            request, metadata=[("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]
        )
    await running.stop(0)
    print(json.dumps(tracing_loaded()))

asyncio.run(main())
"""


def test_a_server_without_otel_variables_imports_no_opentelemetry(
    redis_server: EmbeddedRedis,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    queue = f"parked-{uuid.uuid4().hex[:8]}"
    ran = subprocess.run(
        [sys.executable, "-c", _SERVER_WITHOUT_OTEL, queue],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.splitlines()[-1]) == []
    # The message it pushed: Celery's headers and ours, no trace context.
    import redis

    with redis.Redis.from_url(os.environ["TASKSERVICE_REDIS_URL"]) as client:
        message = json.loads(client.rpop(queue) or b"{}")
        client.delete(queue)
    assert message["headers"]["task"] == "test.echo"
    assert not {"traceparent", "tracestate"} & set(message["headers"])
