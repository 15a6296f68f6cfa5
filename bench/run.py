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
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
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

CONCURRENCY = 32
PARKED = "bench-parked"  # a queue no worker consumes


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
            **{k: v for k, v in os.environ.items() if not k.startswith("TASKSERVICE_")},
            "PYTHONPATH": str(ROOT),
            "TASKSERVICE_REDIS_URL": self.redis.url,
            "TASKSERVICE_KEY_PREFIX": self.prefix,
            "TASKSERVICE_TASKS": "bench.tasks",
            "TASKSERVICE_QUEUES": PARKED,
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

    def worker(
        self,
        *,
        app: str = "taskservice.worker.app",
        pool: str = "solo",
        concurrency: int = 1,
        queues: str = "celery",
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
                env=self.env,
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
    raise RuntimeError(f"timed out; see {log}:\n{log.read_text()[-2000:]}")


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


def _h2load(port: int, path: str, body: bytes, calls: int, folder: Path) -> Load:
    folder.mkdir(parents=True, exist_ok=True)
    body_file = folder / "body.bin"
    body_file.write_bytes(body)
    log = folder / "h2load.log"
    done = subprocess.run(
        [
            "h2load",
            "-n",
            str(calls),
            "-c",
            "4",
            "-m",
            str(CONCURRENCY // 4),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
            str(body_file),
            f"--log-file={log}",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    rate = float(out.split("finished in ", 1)[1].split(", ", 1)[1].split(" req/s")[0])
    traffic = out.split("traffic: ", 1)[1].splitlines()[0]
    data_bytes = int(traffic.rsplit("(", 1)[1].split(")")[0])
    succeeded = int(out.split(" succeeded", 1)[0].rsplit(", ", 1)[1])
    latencies = [int(line.split("\t")[2]) / 1000 for line in log.read_text().splitlines() if line]
    return Load(rate, succeeded, data_bytes, latencies)


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
    """gRPC floor, Start accepted / rejected, GetStatus: h2load at 32 streams."""
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
    cpu = cpu_seconds(pids)
    start = load(
        port,
        "/taskservice.v1.TaskService/Start",
        pb.StartRequest(task_name="bench.noop"),
        calls,
        stack.folder,
    )
    cpu_per_call = (cpu_seconds(pids) - cpu) / calls * 1e6
    published = stack.client.llen("celery") - queued
    if published != start.calls:
        raise RuntimeError(f"{start.calls} Starts answered but {published} messages published")
    ratio_row(
        report, "Start accepted", "rate", start.rate, "calls/s", "gRPC floor", floor.rate, 0.45
    )
    ratio_row(
        report, "Start accepted", "rate", start.rate, "calls/s", "raw delay()", delay_rate, 1.2
    )
    today = 1524  # us per Start at 093fadd, the measurement on this machine kind
    report.add(
        Row(
            "Start accepted",
            "server CPU per Start",
            cpu_per_call,
            "us",
            f"{today} us (093fadd)",
            cpu_per_call / today,
            "<= 0.33x",
            cpu_per_call <= today / 3,
        )
    )
    stack.client.delete("celery")

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        held = pb.StartRequest(task_name="bench.noop", exclusivity_key="hot")
        held.options.queue = PARKED
        stub.Start(held)
        task_id = stub.Start(pb.StartRequest(task_name="bench.noop")).task.id
        expected = len(stub.GetStatus(pb.GetStatusRequest(task_id=task_id)).SerializeToString())
    before = stack.client.llen("celery")
    rejected = load(
        port,
        "/taskservice.v1.TaskService/Start",
        pb.StartRequest(task_name="bench.noop", exclusivity_key="hot"),
        calls,
        stack.folder,
    )
    if rejected.data_bytes or stack.client.llen("celery") != before:
        raise RuntimeError("a Start on the held key was accepted")
    ratio_row(
        report,
        "Start rejected (held key)",
        "rate",
        rejected.rate,
        "calls/s",
        "gRPC floor",
        floor.rate,
        0.7,
    )
    report.add(
        Row(
            "Start rejected (held key)",
            "p99",
            rejected.p99,
            "ms",
            target="<= 5 ms",
            met=rejected.p99 <= 5,
        )
    )

    status = load(
        port,
        "/taskservice.v1.TaskService/GetStatus",
        pb.GetStatusRequest(task_id=task_id),
        calls,
        stack.folder,
    )
    if status.data_bytes != status.calls * (5 + expected):
        raise RuntimeError("not every GetStatus answered with the task")
    ratio_row(
        report, "GetStatus by id", "rate", status.rate, "calls/s", "gRPC floor", floor.rate, 0.7
    )
    stack.stop(server)


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
        1.2,
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
    told, first_ms, rss, connections = asyncio.run(_watch_burst(stack, port, watchers, tasks))
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
    report.add(
        Row(
            "watch burst",
            "last stream told after the end",
            first_ms,
            "ms",
            target="<= 1000 ms",
            met=first_ms <= 1000,
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


async def _watch_burst(
    stack: Stack, port: int, watchers: int, tasks: int
) -> tuple[int, float, float, int]:
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
        began = time.perf_counter()
        await asyncio.gather(*(stubs[0].Cancel(pb.CancelRequest(task_id=i)) for i in ids))
        ends = await asyncio.gather(*(c.read() for c in calls), return_exceptions=True)
        last_ms = (time.perf_counter() - began) * 1000
        told = sum(
            1
            for e in ends
            if isinstance(e, pb.WatchStatusResponse) and e.task.state == pb.TASK_STATE_CANCELLED
        )
        return min(served, told), last_ms, rss, connections
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
    """No-op tasks drained by one worker: ours against a plain Celery one."""
    import bench.plain as plain

    server, port = stack.server()
    for pool, concurrency in (("solo", 1), ("prefork", 2)):
        stack.client.delete("celery")
        ids = [plain.noop.delay().id for _ in range(count)]
        plain_rate = _drain(
            stack, "bench.plain", pool, concurrency, count, partial(_results_stored, stack, ids)
        )
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            ours = [
                stub.Start(pb.StartRequest(task_name="bench.noop")).task.id for _ in range(count)
            ]
        our_rate = _drain(
            stack,
            "taskservice.worker.app",
            pool,
            concurrency,
            count,
            partial(_succeeded, stack, ours),
        )
        name = f"worker throughput ({pool}{'' if pool == 'solo' else f', {concurrency} processes'})"
        report.add(Row(name, "plain Celery", plain_rate, "tasks/s"))
        ratio_row(report, name, "taskservice", our_rate, "tasks/s", "plain Celery", plain_rate, 0.8)
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
    stack: Stack, app: str, pool: str, concurrency: int, count: int, done: Callable[[], int]
) -> float:
    worker = stack.worker(app=app, pool=pool, concurrency=concurrency)
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


def _redis_cpu(stack: Stack) -> float:
    info = stack.client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- main --------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="run every scenario tiny (CI)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME",
        help="run only this scenario (unary, start_to_terminal, watch_burst, "
        "worker_throughput, processes, replicated_starts); repeatable",
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
