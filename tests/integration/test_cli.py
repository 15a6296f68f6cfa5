"""What a newcomer does: `taskservice dev`, then grpcurl against it; and `taskservice
health`, a container's HEALTHCHECK."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import redis
import trustme

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, free_port
from taskservice.core.settings import Settings
from taskservice.server.server import Server, create_server
from tests.conftest import ROOT

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


async def grpcurl(port: int, *args: str, data: str | None = None) -> str:
    # Async: the server under test runs on this event loop.
    process = await asyncio.create_subprocess_exec(
        GRPCURL,
        "-plaintext",
        *(["-d", data] if data is not None else []),
        f"127.0.0.1:{port}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


def descendants(pid: int) -> set[int]:
    children: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, set()).add(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path(GRPCURL).exists(), reason="grpcurl is not installed")
async def test_grpcurl_lists_describes_and_calls_with_reflection(server: Server) -> None:
    listed = await grpcurl(server.port, "list")
    assert "taskservice.v1.TaskService" in listed
    assert "grpc.health.v1.Health" in listed
    described = await grpcurl(server.port, "describe", "taskservice.v1.Task")
    assert "exclusivity_key" in described
    # The proto's comments are the API docs: reflection must carry them.
    assert "The per-task sequence number" in described
    method = await grpcurl(server.port, "describe", "taskservice.v1.TaskService.Cancel")
    assert "rpc Cancel" in method and "FAILED_PRECONDITION" in method
    started = json.loads(
        await grpcurl(
            server.port,
            "taskservice.v1.TaskService/Start",
            data='{"task_name": "test.echo", "args": [{"a": [1, 2.5, null, true]}]}',
        )
    )
    task_id = started["task"]["id"]
    assert started["task"]["state"] == "TASK_STATE_QUEUED"
    watched = await grpcurl(
        server.port, "taskservice.v1.TaskService/WatchStatus", data=json.dumps({"task_id": task_id})
    )
    messages = [json.loads(chunk) for chunk in watched.replace("}\n{", "}\x00{").split("\x00")]
    assert messages[-1]["task"]["state"] == "TASK_STATE_SUCCEEDED"
    assert messages[-1]["task"]["result"] == {"a": [1, 2.5, None, True]}
    # README's CancelTasks example, on a task no worker will take.
    key = f"grpcurl-{uuid.uuid4().hex[:8]}"
    parked = json.loads(
        await grpcurl(
            server.port,
            "taskservice.v1.TaskService/Start",
            data=json.dumps(
                {"task_name": "test.echo", "exclusivity_key": key, "options": {"queue": "parked-g"}}
            ),
        )
    )
    cancelled = json.loads(
        await grpcurl(
            server.port,
            "taskservice.v1.TaskService/CancelTasks",
            data=json.dumps({"exclusivity_key": key}),
        )
    )
    assert cancelled == {"endedCount": 1, "taskIds": [parked["task"]["id"]]}


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_dev_runs_everything_and_leaves_no_process_when_stopped(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSERVICE_")}
    temp = tmp_path / "tmp"  # where dev makes its folders
    temp.mkdir()
    env.update(TASKSERVICE_PORT=str(port), PYTHONPATH=str(ROOT), TMPDIR=str(temp))
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "taskservice", "dev"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = pb_grpc.TaskServiceStub(channel)
        task = stub.Start(
            pb.StartRequest(task_name="demo.dummy", kwargs={"name": "Dev", "seconds": 0.2})
        ).task
        final = list(stub.WatchStatus(pb.WatchStatusRequest(task_id=task.id), timeout=60))[-1].task
        assert final.state == pb.TASK_STATE_SUCCEEDED, log.read_text()
        assert final.result.string_value == "Hello Dev!"
        channel.close()
        text = log.read_text()
        assert "redis: redis://127.0.0.1:" in text and "worker: pid" in text and f":{port}" in text
        redis_url = text.split("redis: ", 1)[1].split()[0]
        children = descendants(dev.pid)
        assert len(children) >= 3  # redis-server, the worker and its pool
        dev.send_signal(stop_signal)
        # Ctrl-C stops everything in order; after kill -9 the children stop
        # themselves (they get SIGTERM when their parent dies).
        assert dev.wait(30) == (0 if stop_signal == signal.SIGINT else -stop_signal), (
            log.read_text()
        )
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.1)
    assert not [pid for pid in children if alive(pid)]
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
    if stop_signal == signal.SIGINT:
        # A clean run leaves no folder behind (its logs were in one).
        assert "taskservice-dev-" in text
        assert not list(temp.iterdir()), log.read_text()


RELOADED_MODULE = """
from taskservice.worker.app import app, expose
from taskservice.worker.signals import TrackedTask


@expose()
@app.task(bind=True, base=TrackedTask, name="reload.answer")
def answer(self: TrackedTask) -> str:
    return {answer!r}
"""


def wait_for_text(path: Path, text: str, process: subprocess.Popen[bytes], count: int = 1) -> str:
    """`path`'s text once it holds `text` `count` times (bounded)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        content = path.read_text(errors="replace")
        if content.count(text) >= count:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} x{count} not seen:\n{path.read_text(errors='replace')}")


def answer(stub: pb_grpc.TaskServiceStub) -> str:
    task = stub.Start(pb.StartRequest(task_name="reload.answer")).task
    final = list(stub.WatchStatus(pb.WatchStatusRequest(task_id=task.id), timeout=60))[-1].task
    assert final.state == pb.TASK_STATE_SUCCEEDED, final
    return str(final.result.string_value)


@pytest.mark.timeout(180)
def test_dev_reload_restarts_the_worker_when_task_code_changes(tmp_path: Path) -> None:
    modules, project, temp = tmp_path / "modules", tmp_path / "project", tmp_path / "tmp"
    for folder in (modules, project, temp):
        folder.mkdir()
    module = modules / "reload_tasks.py"
    module.write_text(RELOADED_MODULE.format(answer="first"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSERVICE_")}
    env.update(
        TASKSERVICE_PORT=str(port),
        TASKSERVICE_TASKS="reload_tasks",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(modules)]),
        TMPDIR=str(temp),
    )
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "taskservice", "dev", "--reload", "--concurrency=1"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = pb_grpc.TaskServiceStub(channel)
            assert answer(stub) == "first"
            text = wait_for_text(log, "reload: watching", dev)
            assert f"{modules}, {project}" in text  # the task module's folder and the current one
            module.write_text(RELOADED_MODULE.format(answer="second"))
            wait_for_text(log, "reload_tasks.py changed; restarting the worker", dev)
            wait_for_text(log, "worker: pid", dev, count=2)
            assert answer(stub) == "second"
            # A worker that cannot start is reported; its log is kept.
            module.write_text("def broken(:\n")
            text = wait_for_text(log, "worker exited with code 1", dev)
        dev.send_signal(signal.SIGINT)
        assert dev.wait(30) == 0, log.read_text()
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    text = log.read_text()
    kept = Path(text.split("their logs are kept in ", 1)[1].split()[0])
    assert kept.parent == temp
    assert "SyntaxError" in (kept / "worker.log").read_text()


def test_worker_exits_non_zero_when_celery_stops_on_an_error(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    # A supervisor restarts a worker that crashed only if it can tell.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TASKSERVICE_REDIS_URL": redis_server.url,
        "TASKSERVICE_TASKS": "taskservice.worker.tasks,tests.support.crashing_worker",
    }
    done = subprocess.run(
        [sys.executable, "-m", "taskservice", "worker", "--pool=solo", "-Q", f"q-{tmp_path.name}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Unrecoverable error: RuntimeError('crashing on purpose')" in done.stderr


async def health(port: int, *args: str, **env: str) -> tuple[int, str]:
    """`taskservice health` in a subprocess (the server under test runs on this event loop)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskservice",
        "health",
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TASKSERVICE_PORT": str(port), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_health_exits_0_when_serving_and_checks_this_machine_for_0_0_0_0(
    server: Server,
) -> None:
    # The image sets TASKSERVICE_HOST=0.0.0.0; its HEALTHCHECK asks 127.0.0.1.
    for service in ("", "taskservice.v1.TaskService"):
        code, output = await health(server.port, "--service", service, TASKSERVICE_HOST="0.0.0.0")
        assert (code, output) == (0, f"127.0.0.1:{server.port}: SERVING\n")


async def test_health_exits_1_with_one_line_when_draining_or_down(settings: Settings) -> None:
    running = await create_server(settings, port=0)
    try:
        await running.health.enter_graceful_shutdown()  # as on SIGTERM
        code, output = await health(running.port)
        assert (code, output) == (1, f"127.0.0.1:{running.port}: NOT_SERVING\n")
    finally:
        await running.stop(0)
    code, output = await health(running.port, "--timeout", "5")
    assert code == 1
    assert output.startswith(f"127.0.0.1:{running.port}: UNAVAILABLE: ")
    assert output.count("\n") == 1


async def test_health_speaks_tls_and_mutual_tls_when_the_server_does(
    settings: Settings, tmp_path: Path
) -> None:
    ca = trustme.CA()
    # Named for another host than the one checked (127.0.0.1), as in a container.
    server_cert = ca.issue_cert("taskservice.internal")
    client_cert = ca.issue_cert("probe@example.com")
    files = {name: tmp_path / name for name in ("ca", "cert", "key", "client", "client_key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.private_key_pem.write_to_path(str(files["key"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client_cert.private_key_pem.write_to_path(str(files["client_key"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["client"]))
    client = (
        "--cert-file",
        str(files["client"]),
        "--key-file",
        str(files["client_key"]),
    )
    tls = {"tls_cert_file": str(files["cert"]), "tls_key_file": str(files["key"])}
    mutual = {**tls, "tls_client_ca_file": str(files["ca"])}

    running = await create_server(settings.model_copy(update=tls), port=0)
    try:
        serving = (0, f"127.0.0.1:{running.port}: SERVING\n")
        assert await health(running.port, **as_env(tls)) == serving
        code, output = await health(running.port)  # plaintext against a TLS server
        assert code == 1 and "UNAVAILABLE" in output
    finally:
        await running.stop(0)

    running = await create_server(settings.model_copy(update=mutual), port=0)
    try:
        code, output = await health(running.port, **as_env(mutual))
        assert code == 1 and output.count("\n") == 1
        assert "pass --cert-file and --key-file" in output
        serving = (0, f"127.0.0.1:{running.port}: SERVING\n")
        assert await health(running.port, *client, **as_env(mutual)) == serving
    finally:
        await running.stop(0)


def as_env(settings: dict[str, str]) -> dict[str, str]:
    return {f"TASKSERVICE_{name.upper()}": value for name, value in settings.items()}
