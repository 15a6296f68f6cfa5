"""A team's existing Celery app (TASKSERVICE_CELERY_APP), run by the team's
own `celery -A ... worker` command: its exposed tasks are tracked without
changing their base class or app, and what cannot be tracked is refused at
startup."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from celery import Celery

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import stop_process_group, tied_to_this_process
from taskservice.core.settings import Settings
from taskservice.server.publisher import Publisher
from tests.conftest import REDIS_PORT, ROOT, start_server_process, wait_for_log
from tests.support.client import error_info, finished, start, wait_until

TEAM_ENV = {
    "TASKSERVICE_CELERY_APP": "tests.support.team_app:app",
    "TASKSERVICE_TASKS": "tests.support.team_app",
    # The team's broker is not the records' database: Starts go through kombu.
    "TEAM_BROKER_URL": f"redis://127.0.0.1:{REDIS_PORT}/1",
}


@pytest.fixture(scope="module")
def team_worker(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The team's worker, started the team's way: plain Celery, its own app.
    Yields its log."""
    log = tmp_path_factory.mktemp("team") / "worker.log"
    command = [
        sys.executable, "-m", "celery", "-A", "tests.support.team_app:app", "worker",
        "--pool=prefork", "--concurrency=2", "--loglevel=INFO", "-Q", "team-work,team-routed",
        "-n", f"team-{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            tied_to_this_process(command),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **TEAM_ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for_log(log, "ready.", process, timeout=60)
    yield log
    stop_process_group(process)


@pytest.fixture(scope="module")
async def team_stub(
    team_worker: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    log = tmp_path_factory.mktemp("team-server") / "server.log"
    process, port = await asyncio.to_thread(start_server_process, log, TEAM_ENV)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.TaskServiceStub(channel)
    finally:
        stop_process_group(process)


async def test_a_team_task_runs_tracked_with_its_own_base_class(
    team_stub: pb_grpc.TaskServiceStub, key: str
) -> None:
    task = await start(team_stub, "team.greet", "Ann", key=key)
    assert task.state == pb.TASK_STATE_QUEUED
    done = await finished(team_stub, task.id)
    assert done.state == pb.TASK_STATE_SUCCEEDED, done
    assert done.result.string_value == "hello Ann"  # TeamTask.greeting
    assert done.worker.startswith("team-")


async def test_the_default_exclusivity_key_and_routes_of_the_team_app_apply(
    team_stub: pb_grpc.TaskServiceStub,
) -> None:
    first = await start(team_stub, "team.greet", "Bo", seconds=3)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await start(team_stub, "team.greet", "Cy")
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info(refused.value).metadata["task_id"] == first.id
    # task_routes send it to team-routed, which the team's worker consumes.
    routed = await start(team_stub, "team.routed")
    assert (await finished(team_stub, routed.id)).result.string_value == "routed"
    assert (await finished(team_stub, first.id)).state == pb.TASK_STATE_SUCCEEDED


async def test_kill_cancel_of_a_running_team_task_stops_it(
    team_stub: pb_grpc.TaskServiceStub, tmp_path: Path
) -> None:
    marker = tmp_path / "written"
    task = await start(team_stub, "team.write_after", str(marker), 3.0)
    running = await wait_until(team_stub, task.id, lambda t: t.progress.message == "waiting")
    assert running.state == pb.TASK_STATE_RUNNING
    cancelled = await team_stub.Cancel(pb.CancelRequest(task_id=task.id, mode=pb.CANCEL_MODE_KILL))
    assert cancelled.task.state == pb.TASK_STATE_CANCELLED
    await asyncio.sleep(3.5)
    assert not marker.exists(), "the task ran on after a KILL answered CANCELLED"


async def test_a_team_task_taskservice_never_started_runs_past_the_lease_untouched(
    team_stub: pb_grpc.TaskServiceStub, settings: Settings, tmp_path: Path
) -> None:
    # It has no record and no lease: the heartbeat's renewals find nothing,
    # and the worker's fence must leave it alone.
    marker = tmp_path / "written"
    sender = Celery("team-sender", broker=TEAM_ENV["TEAM_BROKER_URL"], set_as_current=False)
    seconds = settings.lease * 1.5
    await asyncio.to_thread(
        sender.send_task, "team.unexposed", (str(marker), seconds), queue="team-work"
    )
    for _ in range(int((seconds + 10) / 0.1)):
        if marker.exists():
            break
        await asyncio.sleep(0.1)
    assert marker.exists(), "the team's own task was stopped"


def test_the_team_apps_task_events_setting_is_left_as_it_is(
    team_stub: pb_grpc.TaskServiceStub, team_worker: Path
) -> None:
    # The team decides (README: turn worker_send_task_events on for Flower);
    # tracking its tasks must not switch them on behind its back.
    assert "task events: OFF" in team_worker.read_text()


def test_queue_for_follows_the_apps_task_routes(settings: Settings) -> None:
    app = Celery("routes", broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue="work", task_routes={"r.*": {"queue": "routed"}})
    publisher = Publisher(app, settings)
    try:
        assert publisher.queue_for("r.one") == "routed"
        assert publisher.queue_for("other") == "work"
    finally:
        publisher.close()


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_a_task_of_another_app_is_refused_at_startup(
    redis_server: object, tmp_path: Path, command: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskservice", command],
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TASKSERVICE_TASKS": "tests.support.foreign_tasks",
            "TASKSERVICE_PORT": "0",
            "TASKSERVICE_PROT": "1",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "task 'other.add'" in result.stderr
    assert "belongs to Celery app 'other'" in result.stderr
    assert "TASKSERVICE_CELERY_APP" in result.stderr
    # A mistyped variable is reported, with the setting it was probably meant to be.
    assert "TASKSERVICE_PROT is not a taskservice setting" in result.stderr
    assert "did you mean TASKSERVICE_PORT?" in result.stderr


def test_a_celery_app_that_cannot_be_found_is_refused(redis_server: object) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskservice", "serve"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TASKSERVICE_CELERY_APP": "nope.missing:app"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "TASKSERVICE_CELERY_APP='nope.missing:app' names no Celery app" in result.stderr
