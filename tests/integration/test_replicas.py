"""Several servers behind one client: calls spread round robin, and rolling
restarts under a retrying load lose nothing and answer nothing CANCELLED."""

from __future__ import annotations

import asyncio
import functools
import random
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from taskservice import (
    AsyncClient,
    ShuttingDown,
    Task,
    TaskServiceError,
    TaskState,
    Unavailable,
)
from taskservice.cli.embedded import free_port, stop_process_group
from taskservice.core.settings import Settings
from taskservice.server.server import Server, create_server
from tests.conftest import start_server_process

T = TypeVar("T")

UNDER_WAY = 6
"""Tasks started before the first restart."""

RETRY_PAUSE = 0.05
"""Seconds a client of these tests waits before calling again after UNAVAILABLE,
but for SHUTTING_DOWN: that one says to call again (elsewhere), and it does at once."""


def started_here(running: Server) -> float:
    """Tasks this server's Starts created (its own metrics registry)."""
    counter = running.operations.records.metrics.tasks_started
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


async def test_a_client_given_two_addresses_spreads_calls_and_skips_a_draining_server(
    settings: Settings,
) -> None:
    a, b = await create_server(settings, port=0), await create_server(settings, port=0)
    loop = asyncio.get_running_loop()
    try:
        async with AsyncClient(f"127.0.0.1:{a.port},127.0.0.1:{b.port}", timeout=10) as client:

            async def start() -> None:
                await client.start("test.echo", [1], queue="nobody-listens")

            # Round robin over both once both are connected (the first calls
            # may all go to whichever connected first).
            for _ in range(200):
                await start()
                if min(started_here(a), started_here(b)) >= 10:
                    break
            assert min(started_here(a), started_here(b)) >= 10, (started_here(a), started_here(b))

            # A server that turns NOT_SERVING (as when it drains) gets no
            # more calls once the client has heard it on its health watch.
            await a.health.enter_graceful_shutdown()
            deadline = loop.time() + 5
            while True:
                before = started_here(a), started_here(b)
                for _ in range(20):
                    await start()
                if started_here(a) == before[0]:
                    break
                assert loop.time() < deadline, "the client kept calling a NOT_SERVING server"
            assert started_here(b) == before[1] + 20
    finally:
        await a.stop(0)
        await b.stop(0)


@dataclass
class Load:
    """Starts (with a request id, retried on UNAVAILABLE), each watched to its
    end (resuming with after_sequence after an error), and GetStatus polls."""

    client: AsyncClient
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    under_way: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once UNDER_WAY tasks have started."""
    errors: Counter[str] = field(default_factory=Counter)
    """Every error a call met, by class name (ShuttingDown, Cancelled...)."""
    answered: Counter[str] = field(default_factory=Counter)
    started: dict[str, str] = field(default_factory=dict)
    """request id -> the task id its Start answered."""
    failed_starts: list[str] = field(default_factory=list)
    watched: dict[str, list[tuple[int, TaskState]]] = field(default_factory=dict)
    resumed: int = 0

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call`'s answer, calling again after UNAVAILABLE (for up to 30 s);
        None after any other error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            try:
                answer = await call()
            except Unavailable as error:
                self.errors[type(error).__name__] += 1
                if loop.time() > deadline:
                    return None
                await asyncio.sleep(0 if isinstance(error, ShuttingDown) else RETRY_PAUSE)
            except TaskServiceError as error:
                self.errors[type(error).__name__] += 1
                return None
            else:
                self.answered[what] += 1
                return answer

    async def starter(self) -> None:
        while not self.stopping.is_set():
            request_id = str(uuid.uuid4())

            async def start(request_id: str = request_id) -> Task:
                return await self.client.start(
                    "demo.progress",
                    kwargs={"steps": 3, "seconds_per_step": 0.1},
                    key=f"roll-{request_id}",
                    request_id=request_id,
                )

            task = await self.retrying("Start", start)
            if task is None:
                self.failed_starts.append(request_id)
                continue
            self.started[request_id] = task.id
            if len(self.started) >= UNDER_WAY:
                self.under_way.set()
            await self.watch(task.id)

    async def watch(self, task_id: str) -> None:
        seen: list[tuple[int, TaskState]] = []
        self.watched[task_id] = seen
        while True:
            try:
                after = seen[-1][0] if seen else 0
                async for change in self.client.watch(task_id, after_sequence=after):
                    seen.append((change.sequence, change.state))
                self.answered["WatchStatus"] += 1
                return
            except Unavailable as error:  # the server drains: watch again, elsewhere
                self.errors[type(error).__name__] += 1
                self.resumed += 1
                await asyncio.sleep(RETRY_PAUSE)
            except TaskServiceError as error:
                self.errors[type(error).__name__] += 1
                return

    async def poller(self, client: AsyncClient | None = None) -> None:
        """GetStatus of a random started task in a loop, through `client`
        (default: the load's)."""
        client = client or self.client
        while not self.stopping.is_set():
            if self.started:
                task_id = random.choice(list(self.started.values()))
                await self.retrying("GetStatus", functools.partial(client.get, task_id))
            await asyncio.sleep(0.01)


@pytest.mark.timeout(150)  # three server processes started 9 times, under load (~40 s)
async def test_rolling_restarts_of_three_replicas_lose_nothing_and_cancel_nothing(
    tmp_path: Path, worker_process: subprocess.Popen[bytes]
) -> None:
    ports = [free_port() for _ in range(3)]
    logs: list[Path] = []

    def launch(replica: int) -> subprocess.Popen[bytes]:
        log = tmp_path / f"replica-{replica}-{len(logs)}.log"
        logs.append(log)
        return start_server_process(log, port=ports[replica])[0]

    replicas: list[subprocess.Popen[bytes]] = []
    pinned: list[AsyncClient] = []
    try:
        replicas += await asyncio.gather(*(asyncio.to_thread(launch, r) for r in range(3)))
        addresses = ",".join(f"127.0.0.1:{port}" for port in ports)
        # Besides the round-robin client (which checks health, so it stops
        # calling a draining server), one pinned to each replica: it calls a
        # draining server until the port closes, and again once it is back.
        # retry=None: the load retries by itself (as a client of another
        # language would), so that it sees every answer the servers give.
        pinned += [AsyncClient(f"127.0.0.1:{port}", timeout=10, retry=None) for port in ports]
        async with AsyncClient(addresses, timeout=10, retry=None) as client:
            load = Load(client)
            workers = [asyncio.create_task(load.starter()) for _ in range(6)]
            workers += [asyncio.create_task(load.poller()) for _ in range(2)]
            workers += [asyncio.create_task(load.poller(c)) for c in pinned for _ in range(3)]
            await asyncio.wait_for(load.under_way.wait(), 30)
            for _ in range(2):
                for replica in range(3):
                    replicas[replica].send_signal(signal.SIGTERM)
                    assert await asyncio.to_thread(replicas[replica].wait, 20) == 0
                    replicas[replica] = await asyncio.to_thread(launch, replica)
            load.stopping.set()
            await asyncio.wait_for(asyncio.gather(*workers), 60)
            # Each request id gave one task, and the one its Start answered.
            for request_id, task_id in load.started.items():
                tasks = [t async for t in client.list_tasks(key=f"roll-{request_id}")]
                assert [t.id for t in tasks] == [task_id], request_id
    finally:
        for pinned_client in pinned:
            await pinned_client.close()
        for process in replicas:
            stop_process_group(process)

    print(
        f"answered {dict(load.answered)}, errors met {dict(load.errors)}, "
        f"watches resumed {load.resumed}"
    )
    assert load.errors["Cancelled"] == 0, load.errors
    assert set(load.errors) <= {"ShuttingDown", "Unavailable"}, load.errors
    assert load.failed_starts == []
    assert len(load.started) >= 20
    # Every watch saw every change once, in order, to the end.
    for task_id, seen in load.watched.items():
        sequences = [sequence for sequence, _ in seen]
        assert sequences == list(range(sequences[0], sequences[0] + len(seen))), (task_id, seen)
        assert seen[-1][1] == TaskState.SUCCEEDED, (task_id, seen)
    assert load.resumed > 0  # the drains did cut watch streams, which resumed elsewhere
    for log in logs:
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "internal error" not in text, log
