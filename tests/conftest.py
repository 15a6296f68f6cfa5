"""Fixtures: a Redis of the test session's own, a real prefork Celery worker,
and a real grpc.aio server on a free port with real channels.

TASKSERVICE_* variables are set before anything imports taskservice.worker.app, so the
worker subprocess and this process agree on Redis, key prefix and tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from taskservice.cli.embedded import EmbeddedRedis, free_port, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
REDIS_PORT = free_port()
os.environ.update(
    TASKSERVICE_REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}/0",
    TASKSERVICE_KEY_PREFIX=f"ts-test-{uuid.uuid4().hex[:8]}",
    TASKSERVICE_TASKS="taskservice.worker.tasks,tests.support.tasks",
    TASKSERVICE_CANCEL_WAIT="5",
    # The queues tests send tasks to, besides the default one.
    TASKSERVICE_QUEUES="nobody-listens,parked-*,doomed-*,again-*,q-*",
    # Short leases, so that faults resolve within seconds (defaults: 30/10/1).
    TASKSERVICE_LEASE="3",
    TASKSERVICE_HEARTBEAT_INTERVAL="0.5",
    TASKSERVICE_SWEEP_INTERVAL="0.25",
)
for name in ("TASKSERVICE_BROKER_URL", "TASKSERVICE_RESULT_BACKEND", "TASKSERVICE_PORT"):
    os.environ.pop(name, None)

from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc  # noqa: E402
from taskservice.cli import worker_command  # noqa: E402
from taskservice.core.settings import Settings  # noqa: E402
from taskservice.server.server import Server, create_server  # noqa: E402


def wait_for_log(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _logged(path, text):
            return
        if process.poll() is not None:
            break
        time.sleep(0.1)
    _not_logged(path, text)


async def log_shows(
    path: Path, text: str, process: subprocess.Popen[bytes], timeout: float
) -> None:
    """wait_for_log for async tests: the event loop (and the servers on it) keeps running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _logged(path, text):
            return
        if process.poll() is not None:
            break
        await asyncio.sleep(0.05)
    _not_logged(path, text)


def _logged(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


def _not_logged(path: Path, text: str) -> None:
    log = path.read_text(errors="replace") if path.exists() else ""
    raise RuntimeError(f"{text!r} not seen in {path}:\n{log[-3000:]}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(port=REDIS_PORT).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def settings(redis_server: EmbeddedRedis) -> Settings:
    return Settings()


def start_worker(
    log: Path,
    *,
    concurrency: int = 4,
    queues: str = "celery",
    env: dict[str, str] | None = None,
    name: str = "",
) -> subprocess.Popen[bytes]:
    """A prefork worker in its own process group (`os.killpg` kills it whole),
    named `name`@host (a fresh test-... name by default): a record's worker."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            worker_command(
                "--pool=prefork",
                f"--concurrency={concurrency}",
                "--loglevel=INFO",
                "-Q",
                queues,
                "-n",
                f"{name or 'test-' + uuid.uuid4().hex[:6]}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for_log(log, "ready.", process, timeout=60)
    return process


def start_server_process(
    log: Path, env: dict[str, str] | None = None, *, port: int = 0
) -> tuple[subprocess.Popen[bytes], int]:
    """`python -m taskservice serve` in its own process group, on `port` (0: a free one)."""
    port = port or free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "taskservice", "serve"],
            cwd=ROOT,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "TASKSERVICE_PORT": str(port),
                **(env or {}),
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for_log(log, "taskservice listening", process, timeout=60)
    return process, port


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    """A server of this process for `settings`, and a stub on a channel to it."""
    running = await create_server(settings, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield pb_grpc.TaskServiceStub(channel)
    finally:
        await running.stop(0)


@pytest.fixture(scope="session")
def worker_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log of the session's worker (`worker_process`)."""
    return tmp_path_factory.mktemp("worker") / "worker.log"


@pytest.fixture(scope="session")
def worker_process(
    redis_server: EmbeddedRedis, worker_log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    process = start_worker(worker_log)
    yield process
    stop_process_group(process)


@pytest.fixture(scope="session")
async def server(
    settings: Settings, worker_process: subprocess.Popen[bytes]
) -> AsyncIterator[Server]:
    running = await create_server(settings, port=0)
    yield running
    await running.stop(1)


@pytest.fixture(scope="session")
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> pb_grpc.TaskServiceStub:
    return pb_grpc.TaskServiceStub(channel)


@pytest.fixture
def key() -> str:
    """An exclusivity key no other test uses."""
    return f"test-{uuid.uuid4().hex[:12]}"
