"""A worker that lost its lease stops its task before the key's next holder
can start, and a task's fencing token lets its own store refuse a stale writer.

Real faults: a worker whose link to Redis stalls (a proxy that holds every
byte back, then delivers it late) and a worker frozen with SIGSTOP, each for
three leases while its task runs; a second worker runs the key's next task
meanwhile. The bodies write their own ticks (time, fencing token, whether
the fenced store took the write) to a file, which is what is measured.
These tests run their own server and workers with a 4 s lease and a 1 s
heartbeat (each test takes ~20-25 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis.asyncio
import redis.exceptions

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, stop_process_group
from taskservice.core import record
from taskservice.core.scripts import Changed, Scripts
from taskservice.core.settings import Settings
from tests.conftest import serving, start_worker
from tests.support.client import TERMINAL, finished, start_request, wait_until
from tests.support.proxies import HoldingProxy

LEASE = 4.0
HEARTBEAT = 1.0
ENV = {"TASKSERVICE_LEASE": str(LEASE), "TASKSERVICE_HEARTBEAT_INTERVAL": str(HEARTBEAT)}
FAULT = 3 * LEASE
"""How long each fault lasts."""


@dataclass
class Run:
    """One body's ticks, as it wrote them."""

    task_id: str
    token: int
    pid: int
    times: list[float] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)

    @property
    def start(self) -> float:
        return self.times[0]

    @property
    def end(self) -> float:
        return self.times[-1]

    def spans(self) -> list[tuple[float, float]]:
        """When the body ran: its ticks, split where it was frozen."""
        spans = [[self.times[0], self.times[0]]]
        for when in self.times[1:]:
            if when - spans[-1][1] > 0.5:
                spans.append([when, when])
            spans[-1][1] = when
        return [(start, end) for start, end in spans]


def read_runs(path: Path) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    for line in path.read_text().splitlines():
        task_id, token, pid, when, accepted = line.split()
        run = runs.setdefault(task_id, Run(task_id, int(token), int(pid)))
        run.times.append(float(when))
        run.accepted.append(accepted)
    return runs


def overlap(a: Run, b: Run) -> float:
    """Seconds both bodies ran at once (not counting while one was frozen)."""
    return sum(
        max(0.0, min(a_end, b_end) - max(a_start, b_start))
        for a_start, a_end in a.spans()
        for b_start, b_end in b.spans()
    )


@pytest.fixture
def fenced(settings: Settings) -> Settings:
    """The settings of these tests' server: the workers' lease."""
    return settings.model_copy(update={"lease": LEASE, "heartbeat_interval": HEARTBEAT})


def ticks_request(
    queue: str, key: str, path: Path, seconds: float, **store: str
) -> pb.StartRequest:
    request = start_request("test.ticks", key=key, path=str(path), seconds=seconds, **store)
    request.options.queue = queue
    return request


async def ticking(path: Path, task_id: str, timeout: float = 20) -> Run:
    """The run of `task_id` once its body wrote its first tick."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (run := read_runs(path).get(task_id)):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"the body of {task_id} never ran")


async def start_when_free(
    stub: pb_grpc.TaskServiceStub, request: pb.StartRequest, timeout: float
) -> pb.Task:
    """Start `request` as soon as its key is free."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return (await stub.Start(request)).task
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error.details()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def gone(pid: int, timeout: float) -> float | None:
    """When (time.time()) process `pid` was seen gone (or a zombie); None if
    it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return time.time()
        if status.rsplit(")", 1)[1].split()[0] == "Z":
            return time.time()
        await asyncio.sleep(0.01)
    return None


def report(name: str, **figures: float | int | str | None) -> None:
    shown = ", ".join(
        f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"\nFENCE {name}: {shown}")


async def two_workers(
    tmp_path: Path, old_env: dict[str, str]
) -> tuple[str, str, list[subprocess.Popen[bytes]]]:
    """A worker of the old task's queue (with `old_env`) and one of the new's."""
    old_queue, new_queue = (f"q-{role}-{uuid.uuid4().hex[:8]}" for role in ("old", "new"))
    workers = await asyncio.gather(
        asyncio.to_thread(
            start_worker, tmp_path / "old.log", concurrency=1, queues=old_queue, env=old_env
        ),
        asyncio.to_thread(
            start_worker, tmp_path / "new.log", concurrency=1, queues=new_queue, env=ENV
        ),
    )
    return old_queue, new_queue, list(workers)


async def test_a_worker_cut_off_from_redis_stops_its_task_before_the_next_holder_starts(
    fenced: Settings, redis_server: EmbeddedRedis, key: str, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    async with HoldingProxy(redis_server.port) as link:
        cut_env = {**ENV, "TASKSERVICE_REDIS_URL": link.in_place_of(fenced.redis_url)}
        old_queue, new_queue, workers = await two_workers(tmp_path, cut_env)
        try:
            async with serving(fenced) as stub:
                first = (await stub.Start(ticks_request(old_queue, key, ticks, 60))).task
                await ticking(ticks, first.id)
                link.hold()  # records, broker and result backend: all behind the link
                held_at = time.monotonic()
                second = await start_when_free(
                    stub, ticks_request(new_queue, key, ticks, 6), timeout=2 * LEASE
                )
                lost = (await stub.GetStatus(pb.GetStatusRequest(task_id=first.id))).task
                await asyncio.sleep(held_at + FAULT - time.monotonic())  # the fault lasts
                link.release()  # what the cut worker sent meanwhile arrives now
                done = await finished(stub, second.id, timeout=20)
                later = (await stub.GetStatus(pb.GetStatusRequest(task_id=first.id))).task
        finally:
            for worker in workers:
                stop_process_group(worker)
    runs = read_runs(ticks)
    old, new = runs[first.id], runs[second.id]
    report(
        "stalled link",
        overlap=overlap(old, new),
        old_ran_after_new_began=old.end - new.start,
        old_stopped_after_hold=old.end - (time.time() - (time.monotonic() - held_at)),
        tokens=f"{old.token}->{new.token}",
    )
    assert lost.state == pb.TASK_STATE_LOST and lost.error.type == "WorkerLostError"
    assert done.state == pb.TASK_STATE_SUCCEEDED
    assert overlap(old, new) == 0
    assert old.end < new.start
    assert 0 < first.fencing_token < second.fencing_token
    assert (old.token, new.token) == (first.fencing_token, second.fencing_token)
    # The cut worker's late writes (delivered once the link recovered) changed nothing.
    assert (later.state, later.sequence) == (lost.state, lost.sequence)


async def test_a_worker_frozen_for_three_leases_stops_its_task_on_waking_and_its_writes_are_refused(
    fenced: Settings, redis_server: EmbeddedRedis, key: str, tmp_path: Path
) -> None:
    ticks = tmp_path / "ticks"
    store_url = f"redis://127.0.0.1:{redis_server.port}/1"
    store = {"store_url": store_url, "store_key": f"fenced-store-{key}"}
    old_queue, new_queue, workers = await two_workers(tmp_path, ENV)
    frozen = workers[0]
    try:
        async with serving(fenced) as stub:
            first = (await stub.Start(ticks_request(old_queue, key, ticks, 60, **store))).task
            pid = (await ticking(ticks, first.id)).pid
            os.killpg(frozen.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            lost = await wait_until(stub, first.id, lambda t: t.state in TERMINAL, 2 * LEASE)
            # Still running when the frozen worker wakes up:
            second = (await stub.Start(ticks_request(new_queue, key, ticks, 10, **store))).task
            await ticking(ticks, second.id)
            await asyncio.sleep(stopped_at + FAULT - time.monotonic())  # the fault lasts
            os.killpg(frozen.pid, signal.SIGCONT)
            resumed = time.time()
            ended = await gone(pid, timeout=5)
            done = await finished(stub, second.id, timeout=20)
            later = (await stub.GetStatus(pb.GetStatusRequest(task_id=first.id))).task
    finally:
        for worker in workers:
            stop_process_group(worker)
    runs = read_runs(ticks)
    old, new = runs[first.id], runs[second.id]
    new_first_write = min(t for t, a in zip(new.times, new.accepted, strict=True) if a == "1")
    late = [a for t, a in zip(old.times, old.accepted, strict=True) if t > new_first_write]
    client = redis.asyncio.Redis.from_url(store_url, decode_responses=True)
    try:
        kept = await client.hgetall(store["store_key"])
    finally:
        await client.aclose()
    report(
        "SIGSTOP",
        overlap=overlap(old, new),
        stopped_after_resume=None if ended is None else ended - resumed,
        old_ticks_after_resume=sum(t > resumed for t in old.times),
        stale_writes=late.count("1"),
        refused_writes=late.count("0"),
        tokens=f"{old.token}->{new.token}",
    )
    assert lost.state == pb.TASK_STATE_LOST
    assert done.state == pb.TASK_STATE_SUCCEEDED
    assert ended is not None and ended - resumed < HEARTBEAT, "the old body outlived its lease"
    assert overlap(old, new) < HEARTBEAT
    assert 0 < first.fencing_token < second.fencing_token
    assert late.count("0") >= 1  # it tried, at least in its `finally:` on SIGTERM...
    assert late.count("1") == 0  # ...and no stale write got through
    assert kept == {"token": str(second.fencing_token), "value": second.id}
    # Its late outcome (if any) did not change the LOST record.
    assert (later.state, later.sequence) == (lost.state, lost.sequence)


async def test_a_worker_stops_a_task_its_renewal_finds_ended_lost_within_a_heartbeat(
    stub: pb_grpc.TaskServiceStub,
    settings: Settings,
    worker_process: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    """The state a Redis failover that lost the worker's renewals leaves behind
    (the new primary's sweeper ends the task LOST while the worker, healthy,
    still runs it): the next renewal's answer stops it."""
    ticks = tmp_path / "ticks"
    task = (await stub.Start(start_request("test.ticks", path=str(ticks), seconds=30))).task
    pid = (await ticking(ticks, task.id)).pid
    client = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
    scripts = Scripts(settings.key_prefix, settings.record_ttl)
    call = scripts.transition(task.id, {record.STARTED}, record.LOST, {"error_type": "Swept"})
    try:
        ended = call.parse(
            await client.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        )
    except redis.exceptions.NoScriptError:
        ended = call.parse(
            await client.eval(call.script.source, len(call.keys), *call.keys, *call.args)
        )
    finally:
        await client.aclose()
    assert isinstance(ended, Changed)
    lost_at = time.time()
    stopped = await gone(pid, timeout=5)
    assert stopped is not None and stopped - lost_at < settings.heartbeat_interval + 1
    later = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert (later.state, later.sequence) == (pb.TASK_STATE_LOST, ended.record.sequence)
