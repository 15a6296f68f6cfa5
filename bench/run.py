"""taskservice's benchmarks: absolute figures, and ratios to baselines measured
in the same run on the same machine.

    python bench/run.py [--smoke] [--json bench/results.json]

Starts its own Redis, server process(es) and workers (loopback only). Load
comes from h2load (Debian's nghttp2-client) when it is on PATH, else from a
Python gRPC client (lower ceilings: the ratios still compare like with like).
Every call's success is checked, not assumed: h2load cannot read grpc-status,
so successes are counted from what the calls leave behind (messages in the
broker, bytes of response data). `--smoke` runs every scenario tiny, to keep
the harness working (CI does); its figures mean nothing.

The unary scenario also measures "the seed" (bench/seed.py: the FastAPI +
Celery HTTP service taskservice replaces, under uvicorn) with the same load
generator, calls and calls in flight, and gives taskservice's figures as
ratios to it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import redis  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb  # noqa: E402
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc  # noqa: E402
from taskservice.cli.embedded import (  # noqa: E402
    EmbeddedRedis,
    free_port,
    stop_process_group,
    tied_to_this_process,
)
from taskservice.core.record import TERMINAL_STATES  # noqa: E402

CONCURRENCY = 32
PARKED = "bench-parked"  # a queue no worker consumes
HOLD = "bench-hold"  # the queue of key holders that run (scenario policies)


@dataclass
class Row:
    """One line of the table."""

    scenario: str
    figure: str
    value: float
    unit: str
    baseline: str = ""
    ratio: float | None = None
    target: str = ""
    met: bool | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {row.scenario}: {row.figure} = {row.value:,.1f} {row.unit}", flush=True)

    def table(self) -> str:
        lines = [
            "| scenario | figure | value | baseline | ratio | target | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
            met = {True: "yes", False: "NO", None: ""}[r.met]
            value = f"{r.value:,.1f} {r.unit}"
            cells = [r.scenario, r.figure, value, r.baseline, ratio, r.target, met]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


# -- the stack ---------------------------------------------------------------


class Stack:
    """Redis, servers and workers of one benchmark run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.redis = EmbeddedRedis().start()
        self.prefix = f"bench-{uuid.uuid4().hex[:6]}"
        self.env = {
            # Untraced unless a scenario says so (tracing: OTEL_* variables).
            **{k: v for k, v in os.environ.items() if not k.startswith(("TASKSERVICE_", "OTEL_"))},
            "PYTHONPATH": str(ROOT),
            "TASKSERVICE_REDIS_URL": self.redis.url,
            "TASKSERVICE_KEY_PREFIX": self.prefix,
            "TASKSERVICE_TASKS": "bench.tasks",
            "TASKSERVICE_QUEUES": f"{PARKED},{HOLD}",
            "TASKSERVICE_MAX_PENDING_PUBLISHES": "4096",
        }
        os.environ.update(self.env)
        self._processes: list[subprocess.Popen[bytes]] = []
        self.client = redis.Redis(port=self.redis.port, decode_responses=True)

    def server(
        self, processes: int = 1, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        log = self.folder / f"server-{port}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "taskservice", "serve", f"--processes={processes}"],
                cwd=ROOT,
                env={**self.env, **(env or {}), "TASKSERVICE_PORT": str(port)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._processes.append(process)
        _wait_for(lambda: log.read_text().count("taskservice listening") >= processes, 60, log)
        return process, port

    def seed(self) -> tuple[subprocess.Popen[bytes], int]:
        """The seed (bench/seed.py) under uvicorn, as it is deployed: one
        worker process, uvicorn's defaults (access log included)."""
        missing = [name for name in ("fastapi", "uvicorn") if not importlib.util.find_spec(name)]
        if missing:
            raise RuntimeError(f"the seed needs {' and '.join(missing)}: pip install -e '.[dev]'")
        port = free_port()
        log = self.folder / f"seed-{port}.log"
        command = [sys.executable, "-m", "uvicorn", "bench.seed:app",
                   "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        with open(log, "wb") as out:
            process = subprocess.Popen(
                tied_to_this_process(command),
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._processes.append(process)
        _wait_for(lambda: "Uvicorn running on" in log.read_text(), 60, log)
        return process, port

    def worker(
        self,
        *,
        app: str = "taskservice.worker.app",
        pool: str = "solo",
        concurrency: int = 1,
        queues: str = "celery",
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        log = self.folder / f"worker-{uuid.uuid4().hex[:6]}.log"
        # Celery's own command for both apps, so the two workers compared
        # differ only in the app.
        command = tied_to_this_process(
            [sys.executable, "-m", "celery", "-A", app, "worker",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            "--loglevel=WARNING",
            "-Q",
            queues,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat"]
        )  # fmt: skip
        consuming = self._consumers()
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._processes.append(process)
        # Ready once it waits on its queue (its log is quiet at WARNING).
        _wait_for(lambda: self._consumers() > consuming, 60, log)
        return process

    def _consumers(self) -> int:
        return sum(1 for c in self.client.client_list() if c.get("cmd") == "brpop")

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        stop_process_group(process)
        self._processes.remove(process)

    def close(self) -> None:
        for process in list(self._processes):
            self.stop(process)
        self.client.close()
        self.redis.stop()


def _wait_for(condition: Callable[[], bool], seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if condition():
                return
        time.sleep(0.05)
    shown = log.read_text()[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"timed out; see {log}:\n{shown}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def family(process: subprocess.Popen[bytes]) -> list[int]:
    """The process and its descendants."""
    pids = [process.pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent in pids:
                    pids.append(int(entry.name))
    return pids


# -- load --------------------------------------------------------------------


@dataclass
class Load:
    rate: float  # calls per second
    calls: int
    data_bytes: int  # response DATA bytes, gRPC framing included
    latencies_ms: list[float]
    statuses: Counter[int] = field(default_factory=Counter)  # HTTP status codes

    @property
    def p99(self) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else 0.0


def grpc_body(message: Any) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


def load(port: int, path: str, message: Any, calls: int, folder: Path) -> Load:
    """`calls` unary calls of `message` to `path`, CONCURRENCY at a time."""
    if shutil.which("h2load"):
        return _h2load(port, path, grpc_body(message), calls, folder)
    return asyncio.run(_python_load(port, path, message.SerializeToString(), calls))


def _h2load(
    port: int,
    path: str,
    body: bytes | None,
    calls: int,
    folder: Path,
    *,
    http1: bool = False,
) -> Load:
    """gRPC: 4 connections of CONCURRENCY // 4 streams each, a POST of
    `body`. HTTP/1.1 (`http1`): CONCURRENCY keep-alive connections of one
    call each (what an HTTP/1.1 client does: no pipelining), a JSON POST of
    `body`, or a GET without one. Either way CONCURRENCY calls in flight."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "h2load.log"
    log.unlink(missing_ok=True)  # h2load appends to it
    if http1:
        shape = ["--h1", "-c", str(CONCURRENCY), "-m", "1", "-H", "content-type: application/json"]
    else:
        shape = ["-c", "4", "-m", str(CONCURRENCY // 4),
                 "-H", "content-type: application/grpc", "-H", "te: trailers"]  # fmt: skip
    if body is not None:
        body_file = folder / "body.bin"
        body_file.write_bytes(body)
        shape += ["-d", str(body_file)]
    done = subprocess.run(
        ["h2load", "-n", str(calls), *shape, f"--log-file={log}",
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    out = done.stdout
    rate = float(out.split("finished in ", 1)[1].split(", ", 1)[1].split(" req/s")[0])
    traffic = out.split("traffic: ", 1)[1].splitlines()[0]
    data_bytes = int(traffic.rsplit("(", 1)[1].split(")")[0])
    # Lines of start time, status code, microseconds to the response's end.
    calls_logged = [line.split("\t") for line in log.read_text().splitlines() if line]
    latencies = [int(fields[2]) / 1000 for fields in calls_logged]
    statuses = Counter(int(fields[1]) for fields in calls_logged)
    if http1:
        # h2load counts a 4xx as failed; the seed's refusals are 409s.
        answered = len(calls_logged)
    else:
        answered = int(out.split(" succeeded", 1)[0].rsplit(", ", 1)[1])
    return Load(rate, answered, data_bytes, latencies, statuses)


async def _python_load(port: int, path: str, body: bytes, calls: int) -> Load:
    latencies: list[float] = []
    sizes = [0]
    remaining = [calls]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.unary_unary(path)

        async def client() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                began = time.perf_counter()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    response = await method(body)
                    sizes[0] += 5 + len(response)
                latencies.append((time.perf_counter() - began) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - began
    return Load(calls / elapsed, calls, sizes[0], latencies)


def http_load(port: int, path: str, body: bytes | None, calls: int, folder: Path) -> Load:
    """`calls` HTTP/1.1 calls to `path` (a JSON POST of `body`, or a GET),
    CONCURRENCY at a time: the same tool, calls and calls in flight as `load`."""
    if shutil.which("h2load"):
        return _h2load(port, path, body, calls, folder, http1=True)
    return asyncio.run(_python_http_load(port, path, body, calls))


async def _python_http_load(port: int, path: str, body: bytes | None, calls: int) -> Load:
    """CONCURRENCY keep-alive connections, one call at a time on each."""
    head = f"{'GET' if body is None else 'POST'} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    request = (head + "\r\n").encode() + (body or b"")
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    sizes = [0]
    remaining = [calls]

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while remaining[0] > 0:
                remaining[0] -= 1
                began = time.perf_counter()
                writer.write(request)
                lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                length = next(
                    int(line.split(":", 1)[1])
                    for line in lines
                    if line.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                latencies.append((time.perf_counter() - began) * 1000)
                statuses[int(lines[0].split(" ", 2)[1])] += 1
                sizes[0] += length
        finally:
            writer.close()
            await writer.wait_closed()

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - began
    return Load(calls / elapsed, calls, sizes[0], latencies, statuses)


@dataclass
class Measured:
    """One load, with its server's CPU."""

    load: Load
    cpu_us: float  # server CPU (user + system) per call


def measured(pids: list[int], run_load: Callable[[], Load]) -> Measured:
    """`run_load`, with the CPU the processes `pids` spent meanwhile."""
    before = cpu_seconds(pids)
    result = run_load()
    return Measured(result, (cpu_seconds(pids) - before) / max(1, result.calls) * 1e6)


def ratio_row(
    report: Report,
    scenario: str,
    figure: str,
    value: float,
    unit: str,
    base_name: str,
    base: float,
    want: float,
    better: str = "higher",
) -> None:
    ratio = value / base if base else None
    met = None if ratio is None else (ratio >= want if better == "higher" else ratio <= want)
    sign = ">=" if better == "higher" else "<="
    report.add(Row(scenario, figure, value, unit, base_name, ratio, f"{sign} {want}x", met))


# -- scenarios ---------------------------------------------------------------


def unary(stack: Stack, report: Report, calls: int) -> None:
    """The seed's Start accepted / rejected and GetStatus, then taskservice's
    gRPC floor, Start accepted / rejected and GetStatus, as ratios to the
    seed's and the floor's: h2load at 32 calls in flight."""
    seed = seed_figures(stack, report, calls)

    server, port = stack.server()
    pids = family(server)
    floor = load(
        port, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(), calls, stack.folder
    )
    report.add(Row("gRPC floor", "Health/Check rate", floor.rate, "calls/s"))
    report.add(Row("gRPC floor", "Health/Check p99", floor.p99, "ms"))

    from taskservice.apps import configure
    from taskservice.core.settings import Settings
    from taskservice.worker.app import app

    configure(app, Settings())
    import bench.tasks as tasks

    began = time.perf_counter()
    for _ in range(max(50, calls // 10)):
        tasks.noop.delay()
    delay_rate = max(50, calls // 10) / (time.perf_counter() - began)
    report.add(Row("raw delay() loop", "rate", delay_rate, "calls/s"))
    stack.client.delete("celery")

    queued = stack.client.llen("celery")
    started = measured(
        pids,
        partial(
            load,
            port,
            "/taskservice.v1.TaskService/Start",
            pb.StartRequest(task_name="bench.noop"),
            calls,
            stack.folder,
        ),
    )
    start = started.load
    published = stack.client.llen("celery") - queued
    if published != start.calls:
        raise RuntimeError(f"{start.calls} Starts answered but {published} messages published")
    scenario = "Start accepted"
    ratio_row(report, scenario, "rate", start.rate, "calls/s", "gRPC floor", floor.rate, 0.55)
    ratio_row(report, scenario, "rate", start.rate, "calls/s", "raw delay()", delay_rate, 1.2)
    ratio_row(report, scenario, "rate", start.rate, "calls/s", "seed", seed.start.load.rate, 4)
    seed_row(report, scenario, "p99", start.p99, "ms", seed.start.load.p99)
    today = 1524  # us per Start at 093fadd, the measurement on this machine kind
    report.add(
        Row(
            scenario,
            "server CPU per Start",
            started.cpu_us,
            "us",
            f"{today} us (093fadd)",
            started.cpu_us / today,
            "<= 0.33x",
            started.cpu_us <= today / 3,
        )
    )
    seed_row(report, scenario, "server CPU per Start", started.cpu_us, "us", seed.start.cpu_us)
    stack.client.delete("celery")

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        held = pb.StartRequest(task_name="bench.noop", exclusivity_key="hot")
        held.options.queue = PARKED
        stub.Start(held)
        task_id = stub.Start(pb.StartRequest(task_name="bench.noop")).task.id
        expected = len(stub.GetStatus(pb.GetStatusRequest(task_id=task_id)).SerializeToString())
    before = stack.client.llen("celery")
    refused = measured(
        pids,
        partial(
            load,
            port,
            "/taskservice.v1.TaskService/Start",
            pb.StartRequest(task_name="bench.noop", exclusivity_key="hot"),
            calls,
            stack.folder,
        ),
    )
    rejected = refused.load
    if rejected.data_bytes or stack.client.llen("celery") != before:
        raise RuntimeError("a Start on the held key was accepted")
    scenario = "Start rejected (held key)"
    ratio_row(report, scenario, "rate", rejected.rate, "calls/s", "gRPC floor", floor.rate, 0.7)
    ratio_row(report, scenario, "rate", rejected.rate, "calls/s", "seed", seed.reject.load.rate, 3)
    p99_ratio = rejected.p99 / seed.reject.load.p99 if seed.reject.load.p99 else None
    report.add(
        Row(scenario, "p99", rejected.p99, "ms", "seed", p99_ratio, "<= 5 ms", rejected.p99 <= 5)
    )
    seed_row(report, scenario, "server CPU per call", refused.cpu_us, "us", seed.reject.cpu_us)

    read = measured(
        pids,
        partial(
            load,
            port,
            "/taskservice.v1.TaskService/GetStatus",
            pb.GetStatusRequest(task_id=task_id),
            calls,
            stack.folder,
        ),
    )
    status = read.load
    if status.data_bytes != status.calls * (5 + expected):
        raise RuntimeError("not every GetStatus answered with the task")
    scenario = "GetStatus by id"
    ratio_row(report, scenario, "rate", status.rate, "calls/s", "gRPC floor", floor.rate, 0.7)
    seed_row(report, scenario, "rate", status.rate, "calls/s", seed.status.load.rate)
    seed_row(report, scenario, "p99", status.p99, "ms", seed.status.load.p99)
    seed_row(report, scenario, "server CPU per call", read.cpu_us, "us", seed.status.cpu_us)
    stack.stop(server)


@dataclass
class Seed:
    """The seed's figures, for taskservice's to be given as ratios to."""

    start: Measured
    reject: Measured
    status: Measured


def seed_row(
    report: Report, scenario: str, figure: str, value: float, unit: str, base: float
) -> None:
    """A taskservice figure beside the seed's, as a ratio, with no target."""
    report.add(Row(scenario, figure, value, unit, "seed", value / base if base else None))


def seed_figures(stack: Stack, report: Report, calls: int) -> Seed:
    """The seed (bench/seed.py: FastAPI, uvicorn, Celery) under the load the
    taskservice rows get: the same calls, CONCURRENCY in flight, HTTP/1.1.
    Start accepted without a key (as taskservice's Start rows), refused on a
    held key (409), and the state of a queued task; each call's outcome is
    checked from its status code, the broker and the bytes answered."""
    import bench.plain as plain

    process, port = stack.seed()
    pids = family(process)
    start_path = f"/tasks/{plain.noop.name}"
    base = f"http://127.0.0.1:{port}"

    def post(body: dict[str, Any]) -> tuple[int, bytes]:
        request = urllib.request.Request(
            base + start_path,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read()

    # Warm up: the broker's and the lock's connections open, every path taken.
    for n in range(20):
        post({"exclusivity_key": f"warm-{n % 2}"})
    stack.client.delete("celery")

    def checked(what: str, result: Load, status: int) -> None:
        if result.statuses != Counter({status: result.calls}) or result.calls != calls:
            raise RuntimeError(f"seed {what}: {calls} calls answered {dict(result.statuses)}")

    body = json.dumps({"args": [], "kwargs": {}}).encode()
    start = measured(pids, partial(http_load, port, start_path, body, calls, stack.folder))
    checked("Start", start.load, 201)
    if stack.client.llen("celery") != calls:
        raise RuntimeError(f"seed: {calls} Starts answered 201, {stack.client.llen('celery')} sent")
    stack.client.delete("celery")

    held, answer = post({"exclusivity_key": "hot"})
    if held != 201:
        raise RuntimeError(f"seed: the holder's Start answered {held}: {answer!r}")
    task_id = json.loads(answer)["task_id"]
    queued = stack.client.llen("celery")
    body = json.dumps({"args": [], "kwargs": {}, "exclusivity_key": "hot"}).encode()
    reject = measured(pids, partial(http_load, port, start_path, body, calls, stack.folder))
    checked("reject", reject.load, 409)
    if stack.client.llen("celery") != queued:
        raise RuntimeError("seed: a Start on the held key sent its task")

    status_path = f"/tasks/{task_id}"
    with urllib.request.urlopen(base + status_path, timeout=30) as response:
        expected = len(response.read())
    status = measured(pids, partial(http_load, port, status_path, None, calls, stack.folder))
    checked("GetStatus", status.load, 200)
    if status.load.data_bytes != calls * expected:
        raise RuntimeError("seed: not every GET /tasks/{id} answered with the task")
    stack.stop(process)
    stack.client.delete("celery")

    for name, figures in (
        ("seed Start accepted", start),
        ("seed Start rejected (held key)", reject),
        ("seed GetStatus by id", status),
    ):
        report.add(Row(name, "rate", figures.load.rate, "calls/s"))
        report.add(Row(name, "p99", figures.load.p99, "ms"))
        report.add(Row(name, "server CPU per call", figures.cpu_us, "us"))
    return Seed(start, reject, status)


def start_to_terminal(stack: Stack, report: Report, rounds: int) -> None:
    """Start -> terminal message on WatchStatus, one at a time, against
    delay().get() on a plain Celery worker. Solo workers, no polling."""
    import bench.plain as plain

    stack.client.delete("celery")  # what earlier scenarios left queued
    worker = stack.worker(app="bench.plain")
    for _ in range(10):
        plain.noop.delay().get(timeout=30)
    raw = []
    for _ in range(rounds):
        began = time.perf_counter()
        plain.noop.delay().get(timeout=30)
        raw.append((time.perf_counter() - began) * 1000)
    stack.stop(worker)

    server, port = stack.server()
    worker = stack.worker()
    ours = asyncio.run(_watch_rounds(port, rounds))
    stack.stop(worker)
    stack.stop(server)
    raw_p50, our_p50 = statistics.median(raw), statistics.median(ours)
    report.add(Row("Start -> terminal", "raw delay().get() p50", raw_p50, "ms"))
    ratio_row(
        report,
        "Start -> terminal",
        "WatchStatus p50",
        our_p50,
        "ms",
        "delay().get()",
        raw_p50,
        1.3,
        better="lower",
    )


async def _watch_rounds(port: int, rounds: int) -> list[float]:
    samples = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        for n in range(rounds + 10):
            began = time.perf_counter()
            task = (await stub.Start(pb.StartRequest(task_name="bench.noop"))).task
            async for message in stub.WatchStatus(pb.WatchStatusRequest(task_id=task.id)):
                if message.task.state not in (pb.TASK_STATE_QUEUED, pb.TASK_STATE_RUNNING):
                    break
            if n >= 10:  # the first ones warm up
                samples.append((time.perf_counter() - began) * 1000)
    return samples


def watch_burst(stack: Stack, report: Report, watchers: int, tasks: int) -> None:
    """`watchers` WatchStatus opened at once on one server process, over
    `tasks` tasks that then all end at once."""
    server, port = stack.server()
    told, redis_ms, last_ms, rss, connections = asyncio.run(
        _watch_burst(stack, port, watchers, tasks)
    )
    stack.stop(server)
    report.add(
        Row(
            "watch burst",
            f"streams served of {watchers:,}",
            told,
            "streams",
            target=f"= {watchers:,}",
            met=told == watchers,
        )
    )
    report.add(Row("watch burst", "Redis done with the burst after its start", redis_ms, "ms"))
    report.add(
        Row(
            "watch burst",
            "last stream told after Redis was done",
            last_ms,
            "ms",
            target="<= 1000 ms",
            met=last_ms <= 1000,
        )
    )
    report.add(Row("watch burst", "server RSS", rss, "MiB", target="< 1024 MiB", met=rss < 1024))
    report.add(
        Row(
            "watch burst",
            "Redis connections of the server",
            connections,
            "",
            target="<= 10",
            met=connections <= 10,
        )
    )


class _LastPublished(threading.Thread):
    """When Redis published the terminal change of the last of `ids`: the
    moment the burst is done on Redis's side. Its own connection and thread,
    off the event loop that reads the streams."""

    def __init__(self, stack: Stack, ids: list[str]) -> None:
        super().__init__(daemon=True)
        self._pending = set(ids)
        self._pubsub = stack.client.pubsub()
        self._pubsub.subscribe(f"{stack.prefix}:events")
        self._pubsub.get_message(timeout=5)  # the subscription confirmed
        self.when = 0.0

    def run(self) -> None:
        while self._pending:
            message = self._pubsub.get_message(ignore_subscribe_messages=True, timeout=60)
            if message is None:
                return  # never all published: `when` stays 0
            task_id, _, payload = message["data"].partition(" ")
            if task_id in self._pending and json.loads(payload)["state"] in TERMINAL_STATES:
                self._pending.discard(task_id)
                self.when = time.perf_counter()
        self._pubsub.close()


async def _watch_burst(
    stack: Stack, port: int, watchers: int, tasks: int
) -> tuple[int, float, float, float, int]:
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(10)]
    try:
        stubs = [pb_grpc.TaskServiceStub(c) for c in channels]
        parked = pb.StartRequest(task_name="bench.noop")
        parked.options.queue = PARKED
        ids = [(await stubs[0].Start(parked)).task.id for _ in range(tasks)]
        calls = [
            stubs[n % len(stubs)].WatchStatus(pb.WatchStatusRequest(task_id=ids[n % tasks]))
            for n in range(watchers)
        ]
        firsts = await asyncio.gather(*(c.read() for c in calls), return_exceptions=True)
        served = sum(1 for f in firsts if isinstance(f, pb.WatchStatusResponse))
        rss = _rss_mib(stack, port)
        connections = sum(
            1 for c in stack.client.client_list() if c.get("name", "").startswith(stack.prefix)
        )
        published = _LastPublished(stack, ids)
        published.start()
        began = time.perf_counter()
        await asyncio.gather(*(stubs[0].Cancel(pb.CancelRequest(task_id=i)) for i in ids))
        ends = await asyncio.gather(*(c.read() for c in calls), return_exceptions=True)
        last = time.perf_counter()
        await asyncio.to_thread(published.join, 60)
        if not published.when:
            raise RuntimeError("Redis never published every task's end")
        told = sum(
            1
            for e in ends
            if isinstance(e, pb.WatchStatusResponse) and e.task.state == pb.TASK_STATE_CANCELLED
        )
        redis_ms = (published.when - began) * 1000
        return min(served, told), redis_ms, (last - published.when) * 1000, rss, connections
    finally:
        for channel in channels:
            await channel.close()


def _rss_mib(stack: Stack, port: int) -> float:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            environ = (entry / "environ").read_bytes()
            if (
                f"TASKSERVICE_PORT={port}".encode() in environ
                and b"serve" in (entry / "cmdline").read_bytes()
            ):
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
    return 0.0


def worker_throughput(stack: Stack, report: Report, count: int) -> None:
    """No-op tasks drained by one worker: ours against a plain Celery one, both
    with Celery's task events on (taskservice's default, for Flower) and both
    with them off (Celery's default; TASKSERVICE_TASK_EVENTS=false)."""
    import bench.plain as plain

    server, port = stack.server()
    for events in (True, False):
        env = {"TASKSERVICE_TASK_EVENTS": str(events).lower()}
        for pool, concurrency in (("solo", 1), ("prefork", 2)):
            stack.client.delete("celery")
            ids = [plain.noop.delay().id for _ in range(count)]
            plain_rate = _drain(
                stack,
                "bench.plain",
                pool,
                concurrency,
                count,
                partial(_results_stored, stack, ids),
                env,
            )
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.TaskServiceStub(channel)
                ours = [
                    stub.Start(pb.StartRequest(task_name="bench.noop")).task.id
                    for _ in range(count)
                ]
            our_rate = _drain(
                stack,
                "taskservice.worker.app",
                pool,
                concurrency,
                count,
                partial(_succeeded, stack, ours),
                env,
            )
            name = (
                f"worker throughput ({pool}"
                f"{'' if pool == 'solo' else f', {concurrency} processes'}"
                f"{'' if events else ', task events off'})"
            )
            report.add(Row(name, "plain Celery", plain_rate, "tasks/s"))
            ratio_row(
                report, name, "taskservice", our_rate, "tasks/s", "plain Celery", plain_rate, 0.85
            )
    stack.stop(server)


def _results_stored(stack: Stack, ids: list[str]) -> int:
    pipe = stack.client.pipeline(transaction=False)
    for task_id in ids:
        pipe.exists(f"celery-task-meta-{task_id}")
    return sum(pipe.execute())


def _succeeded(stack: Stack, ids: list[str]) -> int:
    pipe = stack.client.pipeline(transaction=False)
    for task_id in ids:
        pipe.hget(f"{stack.prefix}:task:{{{task_id}}}", "state")
    return sum(1 for state in pipe.execute() if state == "SUCCESS")


def _drain(
    stack: Stack,
    app: str,
    pool: str,
    concurrency: int,
    count: int,
    done: Callable[[], int],
    env: dict[str, str],
) -> float:
    worker = stack.worker(app=app, pool=pool, concurrency=concurrency, env=env)
    began = time.perf_counter()
    # Watch the broker, which costs Redis nothing much, then check each task
    # once: polling every task's state would load the Redis being measured.
    while stack.client.llen("celery") or stack.client.hlen("unacked") or done() < count:
        if time.perf_counter() - began > 300:
            raise RuntimeError(f"{app} did not finish {count} tasks")
        time.sleep(0.02)
    rate = count / (time.perf_counter() - began)
    stack.stop(worker)
    return rate


def processes(stack: Stack, report: Report, calls: int) -> None:
    """Start throughput with N server processes sharing a port (SO_REUSEPORT),
    and where the CPU went: what bounds the scaling on this machine."""
    rates = []
    for n in (1, 2):
        server, port = stack.server(processes=n)
        pids = family(server)
        server_cpu, redis_cpu = cpu_seconds(pids), _redis_cpu(stack)
        generator_cpu = _children_cpu()
        began = time.perf_counter()
        result = load(
            port,
            "/taskservice.v1.TaskService/Start",
            pb.StartRequest(task_name="bench.noop"),
            calls,
            stack.folder,
        )
        elapsed = time.perf_counter() - began
        busy = {
            "servers": (cpu_seconds(pids) - server_cpu) / elapsed,
            "Redis": (_redis_cpu(stack) - redis_cpu) / elapsed,
            "load generator": (_children_cpu() - generator_cpu) / elapsed,
        }
        stack.stop(server)
        stack.client.delete("celery")
        rates.append(result.rate)
        scenario = f"serve --processes {n}"
        report.add(
            Row(
                scenario,
                "Start rate",
                result.rate,
                "calls/s",
                "1 process" if n > 1 else "",
                result.rate / rates[0] if n > 1 else None,
            )
        )
        for name, cores in busy.items():
            report.add(Row(scenario, f"CPU of {name}", cores, f"of {os.cpu_count()} cores"))


def replicas(stack: Stack, report: Report, calls: int) -> None:
    """Start throughput with 1-3 replicas (each `serve`, one process, its own
    port, one load generator each, all at once), what each part of the machine
    was busy with, and Redis's CPU per Start: where the scaling stops here."""
    rates = []
    for n in (1, 2, 3):
        servers = [stack.server() for _ in range(n)]
        pids = [pid for server, _ in servers for pid in family(server)]
        server_cpu, redis_cpu, generator_cpu = cpu_seconds(pids), _redis_cpu(stack), _children_cpu()
        began = time.perf_counter()
        results = load_many(
            [port for _, port in servers],
            "/taskservice.v1.TaskService/Start",
            pb.StartRequest(task_name="bench.noop"),
            calls,
            stack.folder,
        )
        elapsed = time.perf_counter() - began
        done = sum(r.calls for r in results)
        busy = {
            "servers": (cpu_seconds(pids) - server_cpu) / elapsed,
            "Redis": (_redis_cpu(stack) - redis_cpu) / elapsed,
            "load generators": (_children_cpu() - generator_cpu) / elapsed,
        }
        for server, _ in servers:
            stack.stop(server)
        started = stack.client.llen("celery")
        stack.client.delete("celery")
        rate = started / elapsed
        rates.append(rate)
        scenario = f"{n} replica{'s' if n > 1 else ''}"
        report.add(
            Row(scenario, "Start rate", rate, "calls/s", "1 replica" if n > 1 else "",
                rate / rates[0] if n > 1 else None)
        )  # fmt: skip
        if started < done:
            report.add(Row(scenario, "Starts that failed", done - started, "calls"))
        for name, cores in busy.items():
            report.add(Row(scenario, f"CPU of {name}", cores, f"of {os.cpu_count()} cores"))
        if n == 1:
            report.add(
                Row("Redis cost", "CPU per Start", busy["Redis"] * elapsed / started * 1e6, "us")
            )


def redis_costs(stack: Stack, report: Report, calls: int, watchers: int) -> None:
    """Redis's CPU per GetStatus, and per task change told to watchers (one
    PUBLISH per change, whatever the number of streams: each server
    subscribes once), with the server's CPU per stream message beside it."""
    server, port = stack.server()
    pids = family(server)
    parked = pb.StartRequest(task_name="bench.noop")
    parked.options.queue = PARKED
    task_id = asyncio.run(_start(port, parked))
    before = _redis_cpu(stack)
    result = load(
        port,
        "/taskservice.v1.TaskService/GetStatus",
        pb.GetStatusRequest(task_id=task_id),
        calls,
        stack.folder,
    )
    per_read = (_redis_cpu(stack) - before) / max(1, result.calls) * 1e6
    report.add(Row("Redis cost", "CPU per GetStatus", per_read, "us"))
    changes, messages, redis_cpu, server_cpu = asyncio.run(
        _watched_changes(stack, port, pids, watchers)
    )
    report.add(Row("Redis cost", "CPU per task change watched", redis_cpu / changes * 1e6, "us"))
    report.add(
        Row("watch cost", "server CPU per stream message", server_cpu / messages * 1e6, "us")
    )
    stack.stop(server)
    stack.client.delete(PARKED)


async def _start(port: int, request: pb.StartRequest) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return str((await pb_grpc.TaskServiceStub(channel).Start(request)).task.id)


async def _watched_changes(
    stack: Stack, port: int, pids: list[int], watchers: int
) -> tuple[int, int, float, float]:
    """Tasks, each watched by watchers // tasks streams, all cancelled: (changes,
    stream messages, Redis CPU and server CPU seconds while they were told)."""
    tasks = max(1, watchers // 100)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        parked = pb.StartRequest(task_name="bench.noop")
        parked.options.queue = PARKED
        ids = [(await stub.Start(parked)).task.id for _ in range(tasks)]
        calls = [
            stub.WatchStatus(pb.WatchStatusRequest(task_id=ids[n % tasks])) for n in range(watchers)
        ]
        await asyncio.gather(*(c.read() for c in calls))
        redis_before, server_before = _redis_cpu(stack), cpu_seconds(pids)
        await asyncio.gather(*(stub.Cancel(pb.CancelRequest(task_id=i)) for i in ids))
        ends = await asyncio.gather(*(c.read() for c in calls))
        redis_cpu = _redis_cpu(stack) - redis_before
        server_cpu = cpu_seconds(pids) - server_before
    return tasks, len(ends), redis_cpu, server_cpu


def load_many(ports: list[int], path: str, message: Any, calls: int, folder: Path) -> list[Load]:
    """`calls` unary calls split over `ports`, one load generator each, all at once."""
    share = max(1, calls // len(ports))
    if shutil.which("h2load"):
        with concurrent.futures.ThreadPoolExecutor(len(ports)) as pool:
            futures = [
                pool.submit(_h2load, port, path, grpc_body(message), share, folder / str(port))
                for port in ports
            ]
            return [future.result() for future in futures]

    async def all_at_once() -> list[Load]:
        body = message.SerializeToString()
        return list(await asyncio.gather(*(_python_load(p, path, body, share) for p in ports)))

    return asyncio.run(all_at_once())


def replicated_starts(stack: Stack, report: Report, calls: int, rounds: int) -> None:
    """What waiting for a replica costs a Start (TASKSERVICE_REDIS_MIN_REPLICAS
    1 against 0): the same Starts, the same master with one replica on
    loopback, one server each way; 32 streams in flight, then one at a time."""
    replica = EmbeddedRedis(args=("--replicaof", "127.0.0.1", str(stack.redis.port))).start()
    try:
        _wait_for(lambda: stack.client.info("replication")["connected_slaves"] >= 1, 30,
                  replica.log)  # fmt: skip
        figures = {}
        for replicas in (0, 1):
            server, port = stack.server(env={"TASKSERVICE_REDIS_MIN_REPLICAS": str(replicas)})
            start = pb.StartRequest(task_name="bench.noop")
            path = "/taskservice.v1.TaskService/Start"
            load(port, path, start, max(100, calls // 10), stack.folder)  # warm up
            stack.client.delete("celery")
            queued = stack.client.llen("celery")
            result = load(port, path, start, calls, stack.folder)
            if stack.client.llen("celery") - queued != result.calls:
                raise RuntimeError(f"min replicas {replicas}: not every Start enqueued its task")
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.TaskServiceStub(channel)
                for _ in range(20):  # warm up
                    stub.Start(start)
                one = []
                for _ in range(rounds):
                    began = time.perf_counter()
                    stub.Start(start)
                    one.append((time.perf_counter() - began) * 1e6)
            stack.stop(server)
            stack.client.delete("celery")
            figures[replicas] = (result.rate, result.p99, statistics.median(one))
    finally:
        replica.stop()
    (rate0, p99_0, one0), (rate1, p99_1, one1) = figures[0], figures[1]
    scenario = "Start, min replicas 1 vs 0"
    report.add(Row(scenario, "rate, min replicas 0", rate0, "calls/s"))
    ratio_row(report, scenario, "rate, min replicas 1", rate1, "calls/s", "min replicas 0",
              rate0, 0.5)  # fmt: skip
    report.add(Row(scenario, "p99, min replicas 0", p99_0, "ms"))
    report.add(Row(scenario, "p99, min replicas 1", p99_1, "ms", "min replicas 0", p99_1 / p99_0))
    report.add(Row(scenario, "one at a time p50, min replicas 0", one0, "us"))
    report.add(
        Row(scenario, "one at a time p50, min replicas 1", one1, "us", "min replicas 0",
            one1 / one0)
    )  # fmt: skip
    report.add(Row(scenario, "added per Start, one at a time", one1 - one0, "us"))


POLICIES = (
    ("REJECT", pb.CONFLICT_POLICY_REJECT),
    ("QUEUE_LATEST", pb.CONFLICT_POLICY_QUEUE_LATEST),
    ("REPLACE", pb.CONFLICT_POLICY_REPLACE),
)
START = "/taskservice.v1.TaskService/Start"
REPEATS = 3
"""Each load of the policies scenario runs this many times (once in a smoke
run), the policies taking turns, and the median counts: one run of each in
a row would put the machine's drift between them."""


@dataclass(frozen=True)
class _Case:
    name: str
    policy: int
    running: bool = False  # the holder runs (else it is queued)
    replace_mode: int = pb.CANCEL_MODE_UNSPECIFIED


HELD_CASES = (
    _Case("REJECT", pb.CONFLICT_POLICY_REJECT),
    _Case("QUEUE_LATEST", pb.CONFLICT_POLICY_QUEUE_LATEST),
    _Case("REPLACE (queued holder)", pb.CONFLICT_POLICY_REPLACE),
    _Case("REPLACE (running holder)", pb.CONFLICT_POLICY_REPLACE, running=True),
    _Case(
        "REPLACE (running holder, GRACEFUL)",
        pb.CONFLICT_POLICY_REPLACE,
        running=True,
        replace_mode=pb.CANCEL_MODE_GRACEFUL,
    ),
)
"""Starts on a held key: REJECT refuses; QUEUE_LATEST waits, superseding
the Start before it; REPLACE ends a queued holder and takes the key, and
against a running one waits, supersedes, and asks it to stop (TERMINATE,
the default: a revoke broadcast through the broker; GRACEFUL: none)."""


def policies(stack: Stack, report: Report, calls: int, rounds: int, repeats: int) -> None:
    """Starts under QUEUE_LATEST and REPLACE beside REJECT, the same load, as
    ratios to REJECT in the same run, with what each costs Redis.

    On fresh keys (each Start's key is free: the common path; a body per
    call, so the Python load generator) and on a held key (HELD_CASES; one
    body, h2load if there is one). Redis round trips per Start are counted
    one Start at a time through a proxy between a second server and Redis
    (`RoundTrips`), the broker's included (the same Redis); Redis commands
    per Start, those its scripts run included, come from INFO."""
    server, port = stack.server()
    run = uuid.uuid4().hex[:6]
    counter = RoundTrips(stack.redis.port)
    quiet = {  # no background round trips while they are counted
        f"TASKSERVICE_{name}": "3600"
        for name in ("SWEEP_INTERVAL", "DISPATCH_INTERVAL", "HEALTH_INTERVAL")
    }
    counted_server, counted_port = stack.server(env={"TASKSERVICE_REDIS_URL": counter.url, **quiet})
    # Runs the running holders (of two cases, each loaded and counted, and a
    # warm-up one) at once; no revoke stops a task in a thread pool.
    worker = stack.worker(pool="threads", concurrency=2 * (repeats + 1) + 1, queues=HOLD)
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{port}") as a,
            grpc.insecure_channel(f"127.0.0.1:{counted_port}") as b,
        ):
            stubs = pb_grpc.TaskServiceStub(a), pb_grpc.TaskServiceStub(b)
            # Warm up: every script loaded, every path taken, the connection
            # revokes go through open (its first costs 18 round trips).
            for name, policy in POLICIES:
                for n, stub in itertools.product(range(20), stubs):
                    _start_or_refused(stub, _policy_start(policy, f"warm-{run}-{name}-{n % 2}"))
            _hold(stack, stubs[1], f"warm-{run}-running", running=True)
            for _ in range(3):
                replace = _policy_start(pb.CONFLICT_POLICY_REPLACE, f"warm-{run}-running")
                _start_or_refused(stubs[1], replace)
                stack.client.delete(PARKED)
            _fresh_keys(stack, report, port, stubs[1], counter, calls, rounds, run, repeats)
            _held_key(stack, report, port, stubs, counter, calls, rounds, run, repeats)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # its tasks would run for an hour
        stack.stop(worker)
        stack.stop(counted_server)
        stack.stop(server)
        counter.close()
        stack.client.delete(PARKED, HOLD)


def _policy_start(
    policy: int, key: str, *, replace_mode: int = pb.CANCEL_MODE_UNSPECIFIED
) -> pb.StartRequest:
    request = pb.StartRequest(task_name="bench.noop", exclusivity_key=key)
    request.conflict_policy = policy  # type: ignore[assignment]
    request.replace_mode = replace_mode  # type: ignore[assignment]
    request.options.queue = PARKED
    return request


def _start_or_refused(stub: pb_grpc.TaskServiceStub, request: pb.StartRequest) -> None:
    with contextlib.suppress(grpc.RpcError):  # REJECT on a held key; checked after
        stub.Start(request)


@dataclass
class _Cost:
    rate: float
    commands: float  # Redis commands per Start, its scripts' included
    cpu_us: float  # Redis CPU per Start


def _measured(stack: Stack, calls: int, run_load: Callable[[], Load]) -> _Cost:
    before = (_redis_commands(stack), _redis_cpu(stack))
    result = run_load()
    commands = (_redis_commands(stack) - before[0] - 1) / calls  # less the INFO itself
    return _Cost(result.rate, commands, (_redis_cpu(stack) - before[1]) / calls * 1e6)


def _median(costs: list[_Cost]) -> _Cost:
    return _Cost(
        statistics.median(c.rate for c in costs),
        statistics.median(c.commands for c in costs),
        statistics.median(c.cpu_us for c in costs),
    )


def _policy_rows(
    report: Report, scenario: str, runs: dict[str, list[_Cost]], trips: dict[str, float]
) -> None:
    costs = {name: _median(each) for name, each in runs.items()}
    base = costs["REJECT"].rate
    for name, cost in costs.items():
        if name == "REJECT":
            report.add(Row(scenario, f"{name} rate", cost.rate, "calls/s"))
        else:
            ratio = cost.rate / base
            report.add(Row(scenario, f"{name} rate", cost.rate, "calls/s", "REJECT", ratio))
    for name, cost in costs.items():
        report.add(Row(scenario, f"{name} Redis commands per Start", cost.commands, ""))
        report.add(Row(scenario, f"{name} Redis CPU per Start", cost.cpu_us, "us"))
    most = trips["REJECT"] + 1
    for name, count in trips.items():
        figure = f"{name} Redis round trips per Start"
        if name == "REJECT":
            report.add(Row(scenario, figure, count, ""))
        else:
            report.add(
                Row(scenario, figure, count, "", "REJECT", count / trips["REJECT"],
                    f"<= {most:.2f}", count <= most + 0.05)
            )  # fmt: skip


def _fresh_keys(
    stack: Stack,
    report: Report,
    port: int,
    counted: pb_grpc.TaskServiceStub,
    counter: RoundTrips,
    calls: int,
    rounds: int,
    run: str,
    repeats: int,
) -> None:
    share = max(1, calls // repeats)
    runs: dict[str, list[_Cost]] = {name: [] for name, _ in POLICIES}
    for repeat, (name, policy) in itertools.product(range(repeats), POLICIES):
        bodies = [
            _policy_start(policy, f"fresh-{run}-{name}-{repeat}-{n}").SerializeToString()
            for n in range(share)
        ]
        queued = stack.client.llen(PARKED)
        load_them = partial(asyncio.run, _python_load_bodies(port, START, bodies))
        runs[name].append(_measured(stack, share, load_them))
        if stack.client.llen(PARKED) - queued != share:
            raise RuntimeError(f"{name}: not every Start on a fresh key enqueued its task")
        stack.client.delete(PARKED)
    trips = {}
    for name, policy in POLICIES:
        requests = [_policy_start(policy, f"fresh-{run}-{name}-c{n}") for n in range(rounds)]
        trips[name] = counter.per_call(counted.Start, requests)
    stack.client.delete(PARKED)
    _policy_rows(report, "Start, fresh key", runs, trips)


def _held_key(
    stack: Stack,
    report: Report,
    port: int,
    stubs: tuple[pb_grpc.TaskServiceStub, pb_grpc.TaskServiceStub],
    counter: RoundTrips,
    calls: int,
    rounds: int,
    run: str,
    repeats: int,
) -> None:
    share = max(1, calls // repeats)
    runs: dict[str, list[_Cost]] = {case.name: [] for case in HELD_CASES}
    for repeat, (n, case) in itertools.product(range(repeats), enumerate(HELD_CASES)):
        key = f"held-{run}-{n}-{repeat}"
        _hold(stack, stubs[0], key, case.running)
        request = _policy_start(case.policy, key, replace_mode=case.replace_mode)
        seen = _seen(stack)
        runs[case.name].append(
            _measured(stack, share, partial(load, port, START, request, share, stack.folder))
        )
        _check_held(stack, case, share, seen)
    trips = {}
    for n, case in enumerate(HELD_CASES):
        key = f"held-{run}-{n}-counted"
        _hold(stack, stubs[1], key, case.running)
        request = _policy_start(case.policy, key, replace_mode=case.replace_mode)
        seen = _seen(stack)
        trips[case.name] = counter.per_call(
            partial(_start_or_refused, stubs[1]), [request] * rounds
        )
        _check_held(stack, case, rounds, seen)
    _policy_rows(report, "Start, held key", runs, trips)


def _hold(stack: Stack, stub: pb_grpc.TaskServiceStub, key: str, running: bool) -> None:
    """Start the holder of `key`: queued (parked), or running (bench.hold,
    until its worker stops: the holders are left as they are, each key is
    used once)."""
    if not running:
        stub.Start(_policy_start(pb.CONFLICT_POLICY_REJECT, key))
        return
    holder = pb.StartRequest(task_name="bench.hold", exclusivity_key=key)
    holder.kwargs["seconds"] = 3600
    holder.options.queue = HOLD
    task_id = stub.Start(holder).task.id

    def started() -> bool:
        task = stub.GetStatus(pb.GetStatusRequest(task_id=task_id)).task
        return task.state == pb.TASK_STATE_RUNNING

    _wait_for(started, 30, stack.folder / "bench.hold never ran")


def _seen(stack: Stack) -> tuple[int, dict[str, str]]:
    return stack.client.llen(PARKED), stack.client.hgetall(f"{stack.prefix}:stats")


def _check_held(stack: Stack, case: _Case, count: int, seen: tuple[int, dict[str, str]]) -> None:
    """Every Start on the held key did what its policy says (a REJECT no
    more than refuse), from what the scripts counted in Redis."""
    queued, stats = seen
    now = stack.client.hgetall(f"{stack.prefix}:stats")

    def grew(field: str) -> int:
        return int(now.get(field, 0)) - int(stats.get(field, 0))

    enqueued = stack.client.llen(PARKED) - queued
    if case.policy == pb.CONFLICT_POLICY_REJECT:
        ok = enqueued == 0 and grew("waits") == 0
    elif case.policy == pb.CONFLICT_POLICY_REPLACE and not case.running:
        ok = enqueued == count and grew("handovers") == count
    else:
        ok = enqueued == 0 and grew("waits") == count and grew("superseded") == count - 1
    if not ok:
        raise RuntimeError(f"{case.name}: the Starts on the held key did not all do as it says")


async def _python_load_bodies(port: int, path: str, bodies: list[bytes]) -> Load:
    """One unary call per body, CONCURRENCY at a time."""
    latencies: list[float] = []
    sizes = [0]
    pending = iter(bodies)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.unary_unary(path)

        async def client() -> None:
            for body in pending:
                began = time.perf_counter()
                response = await method(body)
                sizes[0] += 5 + len(response)
                latencies.append((time.perf_counter() - began) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - began
    return Load(len(bodies) / elapsed, len(bodies), sizes[0], latencies)


class RoundTrips:
    """A TCP proxy in front of Redis that counts round trips: a client
    sending again once answered (or for the first time) is one, however many
    commands it pipelines; what Redis pushes to a subscriber is none. Runs
    its own event loop in a thread."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.count = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def per_call(self, call: Callable[[Any], object], requests: list[Any]) -> float:
        """Round trips per `call`, made one at a time, less those the server
        makes meanwhile by itself (counted over as long, idle)."""
        began, counted = time.perf_counter(), self.count
        for request in requests:
            call(request)
        elapsed, total = time.perf_counter() - began, self.count - counted
        counted = self.count
        time.sleep(elapsed)
        idle = self.count - counted
        return (total - idle) / len(requests)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        answered = [True]

        async def upstream() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    if answered[0]:
                        self.count += 1
                        answered[0] = False
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.close()

        async def downstream() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await up_reader.read(65536):
                    answered[0] = True
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(upstream(), downstream())

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _redis_commands(stack: Stack) -> int:
    return int(stack.client.info("stats")["total_commands_processed"])


def _redis_cpu(stack: Stack) -> float:
    info = stack.client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tracing(stack: Stack, report: Report, calls: int) -> None:
    """What tracing costs a Start: the same load on a server without OTEL_*
    variables (off: no interceptor, no header) and on one that traces every
    call (a Start span, its claim span) to an OTLP/HTTP sink here. Whether
    off costs nothing is a comparison across commits: `--only unary` before
    and after (its Start rows run untraced)."""
    try:
        from tests.support.otlp import Collector
    except ImportError:
        print("  tracing: skipped (install taskservice[otel])", flush=True)
        return
    sink = Collector()
    traced = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink.endpoint,
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    request = pb.StartRequest(task_name="bench.noop")
    request.options.queue = PARKED
    figures: dict[str, tuple[float, float]] = {}
    try:
        for name, env in (("off", {}), ("on", traced)):
            server, port = stack.server(env=env)
            pids = family(server)
            queued = stack.client.llen(PARKED)
            cpu = cpu_seconds(pids)
            start = load(port, "/taskservice.v1.TaskService/Start", request, calls, stack.folder)
            cpu_per_call = (cpu_seconds(pids) - cpu) / calls * 1e6
            if stack.client.llen(PARKED) - queued != start.calls:
                raise RuntimeError(f"tracing {name}: not every Start published its task")
            stack.stop(server)  # a traced server flushes its spans as it exits
            figures[name] = (start.rate, cpu_per_call)
        if len(sink.spans) < 2 * calls:  # a Start span and a claim span each
            raise RuntimeError(
                f"the traced server exported {len(sink.spans)} spans for {calls} Starts"
            )
    finally:
        sink.close()
        stack.client.delete(PARKED)
    (off_rate, off_cpu), (on_rate, on_cpu) = figures["off"], figures["on"]
    report.add(Row("Start, tracing off", "rate", off_rate, "calls/s"))
    report.add(Row("Start, tracing off", "server CPU per Start", off_cpu, "us"))
    ratio_row(report, "Start, tracing on", "rate", on_rate, "calls/s", "tracing off", off_rate, 0.5)
    ratio_row(
        report,
        "Start, tracing on",
        "server CPU per Start",
        on_cpu,
        "us",
        "tracing off",
        off_cpu,
        2.0,
        better="lower",
    )


# -- main --------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run every scenario tiny (CI)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME",
        help="run only this scenario (unary: taskservice's and the seed's, start_to_terminal, "
        "watch_burst, worker_throughput, processes, replicated_starts, replicas, redis_costs, "
        "policies, tracing); "
        "repeatable",
    )  # fmt: skip
    args = parser.parse_args()
    calls, rounds, watchers, tasks, count = (
        (300, 10, 200, 10, 50) if args.smoke else (20_000, 200, 10_000, 100, 2_000)
    )
    report = Report(
        machine={
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load generator": "h2load" if shutil.which("h2load") else "python grpc.aio",
            "smoke": args.smoke,
        }
    )
    print(f"machine: {report.machine}", flush=True)
    with tempfile.TemporaryDirectory(prefix="taskservice-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            scenarios: dict[str, Callable[[], None]] = {
                "unary": lambda: unary(stack, report, calls),
                "start_to_terminal": lambda: start_to_terminal(stack, report, rounds),
                "watch_burst": lambda: watch_burst(stack, report, watchers, tasks),
                "worker_throughput": lambda: worker_throughput(stack, report, count),
                "processes": lambda: processes(stack, report, calls),
                "replicated_starts": lambda: replicated_starts(stack, report, calls, rounds * 2),
                "replicas": lambda: replicas(stack, report, calls),
                "redis_costs": lambda: redis_costs(stack, report, calls // 4, watchers // 10),
                "policies": lambda: policies(
                    stack, report, calls // 2, rounds, 1 if args.smoke else REPEATS
                ),
                "tracing": lambda: tracing(stack, report, calls // 2),
            }
            unknown = set(args.only) - set(scenarios)
            if unknown:
                parser.error(f"no scenario {', '.join(sorted(unknown))}")
            for name, scenario in scenarios.items():
                if not args.only or name in args.only:
                    scenario()
        finally:
            stack.close()
    print()
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
