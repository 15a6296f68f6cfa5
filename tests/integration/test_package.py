"""The installed package: one top-level import name, `taskservice`, so a team
whose own modules are `worker.py` and `service.py` (`celery -A worker worker`,
the most common layout) installs taskservice beside them and runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskservice.cli.embedded import free_port, stop_process_group, tied_to_this_process
from taskservice.client import Client
from tests.conftest import REDIS_PORT, ROOT, wait_for_log

BIN = Path(sys.executable).parent

# The repository's folders and the packages they install as.
FOLDERS = {
    "taskservice": "taskservice",
    "service": "taskservice/server",
    "worker": "taskservice/worker",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (built,) = out.glob("taskservice-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_one_top_level_name(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == {"taskservice"}
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["taskservice"]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "taskservice = taskservice.cli:main" in wheel.read(entry_points).decode()


def test_the_wheel_holds_every_file_of_the_three_folders(wheel: zipfile.ZipFile) -> None:
    """pyproject.toml lists the packages by hand (package-dir needs it): a
    folder left out of the list would silently be missing from the wheel."""
    names = set(wheel.namelist())
    expected = set()
    for folder, installed in FOLDERS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                inside = path.relative_to(ROOT / folder)
                if folder == "taskservice" and inside.parts[0] in ("server", "worker"):
                    continue
                expected.add(f"{installed}/{inside.as_posix()}")
    assert expected - names == set()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    assert sorted(packages) == packages, "keep [tool.setuptools] packages sorted"


TEAM_WORKER = """\
    '''The team's Celery app, in the team's own worker.py.'''
    import os

    from celery import Celery

    from service import shout  # the team's own service.py
    from taskservice import expose

    app = Celery("team", broker=os.environ["TEAM_BROKER_URL"], set_as_current=False)
    app.conf.task_default_queue = os.environ["TEAM_QUEUE"]


    @expose(exclusivity_key="team-shout")
    @app.task(bind=True, name="team.shout")
    def shout_task(self, text: str) -> str:
        return shout(text)
"""

TEAM_SERVICE = """\
    '''The team's own module named service.py.'''


    def shout(text: str) -> str:
        return text.upper() + "!"
"""


@pytest.fixture
def team_project(tmp_path: Path, redis_server: object) -> Iterator[tuple[Path, dict[str, str]]]:
    project = tmp_path / "project"
    project.mkdir()
    (project / "worker.py").write_text(textwrap.dedent(TEAM_WORKER))
    (project / "service.py").write_text(textwrap.dedent(TEAM_SERVICE))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        TASKSERVICE_CELERY_APP="worker:app",
        TASKSERVICE_TASKS="worker",
        TASKSERVICE_QUEUES="",
        # The team's broker is another database of the same Redis.
        TEAM_BROKER_URL=f"redis://127.0.0.1:{REDIS_PORT}/3",
        TEAM_QUEUE=f"team-{uuid.uuid4().hex[:8]}",
    )
    yield project, env


def test_a_team_project_with_its_own_worker_and_service_modules_runs_end_to_end(
    team_project: tuple[Path, dict[str, str]],
) -> None:
    project, env = team_project
    port = free_port()
    env = {**env, "TASKSERVICE_PORT": str(port), "TASKSERVICE_HOST": "127.0.0.1"}
    worker_log, server_log = project / "celery.log", project / "server.log"
    processes = []
    try:
        # Started the team's way, from the project folder: `celery -A worker worker`.
        with open(worker_log, "wb") as out:
            command = [
                str(BIN / "celery"), "-A", "worker", "worker", "--pool=solo", "--loglevel=INFO",
                "-Q", env["TEAM_QUEUE"], "--without-gossip", "--without-mingle",
            ]  # fmt: skip
            worker = subprocess.Popen(
                tied_to_this_process(command),
                cwd=project,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        processes.append(worker)
        with open(server_log, "wb") as out:
            server = subprocess.Popen(
                tied_to_this_process([str(BIN / "taskservice"), "serve"]),
                cwd=project,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        processes.append(server)
        wait_for_log(worker_log, "ready.", worker, timeout=60)
        wait_for_log(server_log, "taskservice listening on", server, timeout=60)
        with Client(f"127.0.0.1:{port}") as client:
            assert [t.name for t in client.task_types()] == ["team.shout"]
            task = client.start("team.shout", kwargs={"text": "hello"})
            final = None
            for change in client.watch(task.id):
                final = change
            assert final is not None
            assert (final.state, final.result) == ("SUCCEEDED", "HELLO!"), final
            # The key was freed: the next Start under it runs too.
            again = client.start("team.shout", kwargs={"text": "again"})
            assert again.id != task.id
    finally:
        for process in processes:
            stop_process_group(process)
