"""The clients' own retries under real faults: a server killed and restarted,
connections cut by a proxy, in the middle of Starts, Cancels and watches. The
caller sees no error while the deadline allows, no task is made twice, and a
watch delivers every change once, in order, to the end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from taskservice import (
    AsyncClient,
    ConflictPolicy,
    KeyLineFull,
    RetryPolicy,
    Task,
    TaskState,
    Unavailable,
)
from taskservice.cli.embedded import free_port, stop_process_group
from taskservice.core.settings import Settings
from taskservice.server.server import Server, create_server
from tests.conftest import ROOT, start_server_process
from tests.support.proxies import LateConnectionsProxy

T = TypeVar("T")

FAST = RetryPolicy(initial_backoff=0.02, max_backoff=0.3, deadline=30)
"""Retries soon after each failure, so that the tests take seconds."""


@dataclass
class Traffic:
    """Starts, each under a key of its own (CONFLICT_POLICY_QUEUE, so that a
    Start made twice would show as a second task under the key rather than as
    an error), every other one cancelled; every call's time span kept."""

    client: AsyncClient
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    started: dict[str, str] = field(default_factory=dict)
    """key -> the id its Start answered."""
    cancelled: set[str] = field(default_factory=set)
    spans: list[tuple[float, float]] = field(default_factory=list)

    async def timed(self, call: Awaitable[T]) -> T:
        began = time.monotonic()
        answer = await call
        self.spans.append((began, time.monotonic()))
        return answer

    async def loop(self) -> None:
        while not self.stopping.is_set():
            key = f"retries-{uuid.uuid4().hex}"
            task = await self.timed(
                self.client.start(
                    "test.echo",
                    [key],
                    key=key,
                    conflict_policy=ConflictPolicy.QUEUE,
                    queue="nobody-listens",  # stays QUEUED: a Cancel ends it at once
                )
            )
            self.started[key] = task.id
            if len(self.started) % 2:
                cancelled = await self.timed(self.client.cancel(task.id))
                assert cancelled.state == TaskState.CANCELLED
                self.cancelled.add(task.id)

    async def until(self, count: int) -> None:
        """Until `count` Starts have been answered (at most 30 s)."""
        await soon(lambda: len(self.started) >= count)

    async def check(self, client: AsyncClient) -> None:
        """Each key has exactly the one task its Start answered; each
        cancelled one is CANCELLED, the others QUEUED."""
        for key, task_id in self.started.items():
            tasks = [task async for task in client.list_tasks(key=key)]
            assert [task.id for task in tasks] == [task_id], key
            want = TaskState.CANCELLED if task_id in self.cancelled else TaskState.QUEUED
            assert tasks[0].state == want, (key, tasks[0])

    def rode_through(self, moment: float) -> bool:
        """Whether a call was under way at `moment` and answered after it."""
        return any(began < moment < ended for began, ended in self.spans)


@dataclass
class Watched:
    """A task followed with `client.watch`, every change it yielded kept."""

    task: Task
    changes: list[Task] = field(default_factory=list)

    async def follow(self, client: AsyncClient) -> None:
        async for change in client.watch(self.task.id):
            self.changes.append(change)

    def check(self) -> None:
        """Each change once, in order, none missing, to the terminal state."""
        sequences = [change.sequence for change in self.changes]
        assert sequences == list(range(sequences[0], sequences[0] + len(sequences))), sequences
        assert self.changes[-1].state == TaskState.SUCCEEDED, self.changes[-1]


async def watched(client: AsyncClient, steps: int, pause: float) -> Watched:
    """A test.flood task (`steps` progress reports, `pause` s apart) being watched."""
    task = await client.start("test.flood", [steps], {"pause": pause})
    return Watched(task)


async def running(watches: list[Watched]) -> None:
    """Until every watch has seen its task report progress (at most 30 s)."""
    await soon(lambda: all(any(c.progress for c in w.changes) for w in watches))


async def soon(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Until `condition` holds, checked every 10 ms; AssertionError after `timeout` s."""
    for _ in range(int(timeout * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout} s")


async def gather_all(*calls: Awaitable[Any]) -> None:
    """Await them all; the first exception of any, if one raised (60 s at most)."""
    await asyncio.wait_for(asyncio.gather(*calls), 60)


@pytest.mark.timeout(90)
async def test_a_server_killed_and_restarted_mid_traffic_costs_callers_nothing(
    tmp_path: Path, worker_process: subprocess.Popen[bytes]
) -> None:
    port = free_port()
    server = (await asyncio.to_thread(start_server_process, tmp_path / "a.log", port=port))[0]
    try:
        async with AsyncClient(f"127.0.0.1:{port}", timeout=10, retry=FAST) as client:
            # About 4 s of progress, 10 changes a second: a restart in the
            # middle leaves fewer unseen than the 64 the server keeps.
            watch = await watched(client, 40, 0.1)
            traffic = Traffic(client)
            calls = [asyncio.create_task(traffic.loop()) for _ in range(4)]
            calls.append(asyncio.create_task(watch.follow(client)))
            await traffic.until(20)
            await running([watch])
            os.killpg(server.pid, signal.SIGKILL)  # no drain: connections just die
            await asyncio.to_thread(server.wait, 10)
            assert not any(change.terminal for change in watch.changes)
            relaunched = time.monotonic()
            log = tmp_path / "b.log"
            server = (await asyncio.to_thread(start_server_process, log, port=port))[0]
            await traffic.until(len(traffic.started) + 20)
            traffic.stopping.set()
            await gather_all(*calls)
            await traffic.check(client)
    finally:
        stop_process_group(server)
    assert traffic.rode_through(relaunched)  # calls waited for the new server
    watch.check()


@pytest.fixture
async def proxy(server: Server) -> AsyncIterator[LateConnectionsProxy]:
    """A TCP proxy in front of the session's server."""
    async with LateConnectionsProxy(server.port) as in_front:
        yield in_front


@pytest.mark.timeout(60)
async def test_connections_cut_mid_traffic_and_mid_watches_cost_callers_nothing(
    proxy: LateConnectionsProxy, worker_process: subprocess.Popen[bytes]
) -> None:
    async with AsyncClient(f"127.0.0.1:{proxy.port}", timeout=10, retry=FAST) as client:
        watches = [await watched(client, 30, 0.05) for _ in range(3)]
        traffic = Traffic(client)
        calls = [asyncio.create_task(traffic.loop()) for _ in range(4)]
        calls += [asyncio.create_task(w.follow(client)) for w in watches]
        await traffic.until(10)
        await running(watches)
        # Every watch is open when the connections are first cut.
        assert not any(change.terminal for w in watches for change in w.changes)
        cuts = []
        for _ in range(3):
            cuts.append((time.monotonic(), proxy.cut()))
            await traffic.until(len(traffic.started) + 5)
        traffic.stopping.set()
        await gather_all(*calls)
        await traffic.check(client)
    assert all(count > 0 for _, count in cuts), cuts
    for watch in watches:
        watch.check()
    assert any(traffic.rode_through(moment) for moment, _ in cuts)


@pytest.mark.timeout(60)
async def test_with_retries_off_a_cut_watch_raises_unavailable(
    proxy: LateConnectionsProxy, worker_process: subprocess.Popen[bytes]
) -> None:
    async with AsyncClient(f"127.0.0.1:{proxy.port}", timeout=10, retry=None) as client:
        watch = await watched(client, 40, 0.05)
        follow = asyncio.create_task(watch.follow(client))
        await running([watch])
        assert proxy.cut() > 0
        with pytest.raises(Unavailable):
            await asyncio.wait_for(follow, 10)
        assert not watch.changes[-1].terminal
    # The same watch with retries on, through the same cuts, reaches the end.
    async with AsyncClient(f"127.0.0.1:{proxy.port}", timeout=10, retry=FAST) as client:
        again = Watched(watch.task)
        follow = asyncio.create_task(again.follow(client))
        await running([again])
        assert proxy.cut() > 0
        await asyncio.wait_for(follow, 30)
        again.check()


class CountingStarts(grpc.aio.UnaryUnaryClientInterceptor):
    """Counts the Start attempts a client makes."""

    def __init__(self) -> None:
        self.starts = 0

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        if details.method.endswith(b"/Start"):  # grpc.aio names methods in bytes
            self.starts += 1
        return await continuation(details, request)


async def test_a_full_key_line_is_raised_at_the_first_attempt(settings: Settings, key: str) -> None:
    """RESOURCE_EXHAUSTED that is no backlog (KEY_LINE_FULL: the line moves
    only as tasks end) is not retried, whatever time the policy leaves."""
    running_server = await create_server(settings.model_copy(update={"key_line_limit": 1}), port=0)
    counting = CountingStarts()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running_server.port}", interceptors=[counting])
    try:
        async with AsyncClient(channel=channel, timeout=10, retry=FAST) as client:

            async def start() -> Task:
                return await client.start(
                    "test.echo",
                    key=key,
                    conflict_policy=ConflictPolicy.QUEUE,
                    queue="nobody-listens",
                )

            holder, waiting = await start(), await start()
            assert waiting.waiting_for == holder.id
            with pytest.raises(KeyLineFull):
                await start()
            assert counting.starts == 3
            await client.cancel_all(key=key)
    finally:
        await running_server.stop(0)


async def cli_watch(port: int, task_id: str, *args: str) -> asyncio.subprocess.Process:
    """`taskservice watch TASK_ID --json ARGS` against 127.0.0.1:`port`, under way."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskservice",
        "watch",
        task_id,
        "--json",
        "--address",
        f"127.0.0.1:{port}",
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.timeout(60)
async def test_the_cli_resumes_a_cut_watch_unless_told_not_to_retry(
    proxy: LateConnectionsProxy, worker_process: subprocess.Popen[bytes]
) -> None:
    async with AsyncClient(f"127.0.0.1:{proxy.port}", timeout=10) as client:
        for extra, want in (((), 0), (("--no-retry",), 1)):
            task = await client.start("test.flood", [40], {"pause": 0.05})
            process = await cli_watch(proxy.port, task.id, *extra)
            assert process.stdout is not None and process.stderr is not None
            first = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
            assert first["id"] == task.id
            assert proxy.cut() > 0
            out, err = await asyncio.wait_for(process.communicate(), 30)
            assert process.returncode == want, err.decode()
            lines = [first, *map(json.loads, out.decode().splitlines())]
            sequences = [int(line["sequence"]) for line in lines]
            assert sequences == sorted(set(sequences)), sequences
            if want == 0:
                assert lines[-1]["state"] == "TASK_STATE_SUCCEEDED"
                assert sequences == list(range(sequences[0], sequences[-1] + 1)), sequences
            else:
                assert "UNAVAILABLE" in err.decode()
