"""What Kubernetes probes (deploy/kubernetes/) ask, under real faults.

The server's plaintext health-only port (TASKSERVICE_HEALTH_PORT), which
kubelet's gRPC probes reach when the gRPC port requires client certificates;
and a worker's liveness, `taskservice health --worker`, which fails once the
worker stops renewing its leases (its heartbeat file ages).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli import main
from taskservice.cli.embedded import EmbeddedRedis, free_port, stop_process_group
from taskservice.core.settings import Settings
from taskservice.server.server import LIVENESS, SERVICE_NAME, StartupError, create_server
from tests.conftest import start_worker
from tests.support.client import start, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(health: health_pb2_grpc.HealthStub, service: str) -> asyncio.Future[int]:
    async def status() -> int:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(answer.status)

    return asyncio.ensure_future(status())


async def test_the_health_port_answers_probes_in_plaintext_and_nothing_else_under_mutual_tls(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    files = {name: tmp_path / name for name in ("ca.crt", "tls.crt", "tls.key")}
    ca.cert_pem.write_to_path(str(files["ca.crt"]))
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(files["tls.key"]))
    files["tls.crt"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    own = EmbeddedRedis().start()
    settings = Settings(
        redis_url=own.url,
        key_prefix=f"probes-{uuid.uuid4().hex[:6]}",
        health_interval=0.1,
        redis_timeout=0.5,
        tls_cert_file=str(files["tls.crt"]),
        tls_key_file=str(files["tls.key"]),
        tls_client_ca_file=str(files["ca.crt"]),
        health_port=free_port(),
    )
    running = await create_server(settings, port=0)
    stopped = False
    try:
        # The gRPC port: no client certificate, no answer (a kubelet probe there fails).
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(plain).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME, LIVENESS):
                assert await check(health, service) == SERVING, service
            # Health and nothing else: no TaskService, no reflection.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.TaskServiceStub(channel).ListTaskTypes(
                    pb.ListTaskTypesRequest(), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, caught.value.details()
            # No request written: one being written as the server refuses the
            # stream could fail on the client's side instead.
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                timeout=5
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await reflection.read()
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, caught.value.details()

            # Redis killed: readiness ("" and the service) turns NOT_SERVING,
            # liveness stays SERVING (a restart would not bring Redis back).
            readiness = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await readiness.read()).status == SERVING
            own.crash()
            assert (await asyncio.wait_for(readiness.read(), 10)).status == NOT_SERVING
            readiness.cancel()
            assert await check(health, SERVICE_NAME) == NOT_SERVING
            assert await check(health, LIVENESS) == SERVING

            # Draining: liveness turns NOT_SERVING on this port before it closes.
            liveness = health.Watch(health_pb2.HealthCheckRequest(service=LIVENESS))
            assert (await liveness.read()).status == SERVING
            stopping = asyncio.ensure_future(running.stop(1))
            assert (await asyncio.wait_for(liveness.read(), 5)).status == NOT_SERVING
            await asyncio.wait_for(stopping, 10)
            stopped = True
    finally:
        if not stopped:
            await running.stop(0)
        own.stop()


async def test_a_taken_health_port_stops_the_server_with_a_clear_message(
    settings: Settings,
) -> None:
    running = await create_server(settings.model_copy(update={"health_port": free_port()}), port=0)
    try:
        taken = settings.model_copy(update={"health_port": running.port})
        with pytest.raises(StartupError, match="TASKSERVICE_HEALTH_PORT"):
            await create_server(taken, port=0)
    finally:
        await running.stop(0)


async def probe_until(
    wanted: int, capsys: pytest.CaptureFixture[str], timeout: float
) -> tuple[float, str]:
    """Run `taskservice health --worker` until it exits `wanted`: (seconds it
    took, what it printed)."""
    started = time.monotonic()
    while True:
        code = main(["health", "--worker"])
        out, err = capsys.readouterr()
        if code == wanted:
            return time.monotonic() - started, out + err
        if time.monotonic() - started > timeout:
            raise AssertionError(f"`health --worker` still exits {code} after {timeout}s: {err}")
        await asyncio.sleep(0.1)


async def test_worker_liveness_fails_once_the_worker_stops_renewing_its_leases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    own = EmbeddedRedis().start()
    alive_file = tmp_path / "heartbeat"
    alive_file.write_text("left by a previous container")  # `worker` removes it
    old = time.time() - 1
    os.utime(alive_file, (old, old))
    env = {
        "TASKSERVICE_REDIS_URL": own.url,
        "TASKSERVICE_KEY_PREFIX": f"liveness-{uuid.uuid4().hex[:6]}",
        "TASKSERVICE_HEARTBEAT_FILE": str(alive_file),
        # A renewal that fails gives up at once (the default retries 30 s).
        "TASKSERVICE_WORKER_WRITE_RETRY": "0",
        "TASKSERVICE_REDIS_TIMEOUT": "0.5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    lease = settings.lease  # 3 s in tests (conftest)
    worker = await asyncio.to_thread(start_worker, tmp_path / "worker.log", concurrency=1, env=env)
    server = None
    try:
        assert alive_file.stat().st_mtime > old, "the stale file was not replaced"
        took, said = await probe_until(0, capsys, timeout=5)
        assert took < 1 and "renewed" in said

        # Frozen (SIGSTOP): nothing renews, and after a lease the probe fails.
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            took, said = await probe_until(1, capsys, timeout=lease + 3)
            assert lease - 1 < took and "longer than the lease" in said
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        await probe_until(0, capsys, timeout=5)

        # Running a task and cut off from Redis (SIGKILL): its renewals fail,
        # the probe fails while the process still lives.
        server = await create_server(settings, port=0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            task = await start(stub, "test.sleep", 60)
            await wait_until(stub, task.id, lambda t: t.state == pb.TASK_STATE_RUNNING)
        await server.stop(0)
        server = None
        await probe_until(0, capsys, timeout=1)
        own.crash()
        took, said = await probe_until(1, capsys, timeout=lease + 5)
        assert "longer than the lease" in said
        assert worker.poll() is None, "the worker died: the probe proved nothing"
    finally:
        if server is not None:
            await server.stop(0)
        stop_process_group(worker)
        own.stop()


def test_worker_liveness_never_trusts_a_file_a_previous_worker_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TASKSERVICE_HEARTBEAT_FILE", raising=False)
    assert main(["health", "--worker"]) == 1
    assert "TASKSERVICE_HEARTBEAT_FILE is not set" in capsys.readouterr().err

    # A fresh file of the container before (an emptyDir outlives a restart):
    # the new worker removes it first, even when it then fails to start.
    alive_file = tmp_path / "heartbeat"
    alive_file.touch()
    monkeypatch.setenv("TASKSERVICE_HEARTBEAT_FILE", str(alive_file))
    assert main(["health", "--worker"]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "taskservice", "worker"],
        env={**os.environ, "TASKSERVICE_CELERY_APP": "no_such_module:app"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "no_such_module" in done.stderr
    capsys.readouterr()
    assert main(["health", "--worker"]) == 1
    assert "no heartbeat yet" in capsys.readouterr().err
