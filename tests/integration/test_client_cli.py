"""`taskservice start/status/cancel/watch/ls/tasks` against a live server,
and the asyncio client."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest

from taskservice import AsyncClient, TaskAlreadyRunning
from taskservice.cli.embedded import free_port
from taskservice.server.server import Server
from tests.conftest import ROOT


async def cli(server: Server, *args: str) -> tuple[int, str, str]:
    """Run `taskservice ARGS` against `server` (async: the server runs on this loop)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskservice",
        *args,
        "--address",
        f"127.0.0.1:{server.port}",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_start_and_watch_to_success_as_json(server: Server, key: str) -> None:
    code, out, err = await cli(
        server, "start", "test.echo", "--arg", '{"n": [1, 2]}', "--key", key, "--watch", "--json"
    )
    assert code == 0, err
    changes = lines(out)
    assert changes[-1]["state"] == "TASK_STATE_SUCCEEDED"
    assert changes[-1]["result"] == {"n": [1, 2]}
    assert changes[-1]["exclusivity_key"] == key
    sequences = [change["sequence"] for change in changes]
    assert sequences == sorted(sequences)


async def test_exit_codes_say_how_the_task_ended(server: Server, key: str) -> None:
    code, out, _ = await cli(server, "start", "demo.fail", "--kwarg", "message=boom", "--watch")
    assert code == 3
    assert "ValueError: boom" in out
    code, out, _ = await cli(server, "start", "test.sleep", "--arg", "30", "--key", key, "--json")
    assert code == 0
    task_id = lines(out)[0]["id"]
    # The key is held: exit 1, and the error names the task holding it.
    code, _, err = await cli(server, "start", "test.sleep", "--arg", "1", "--key", key)
    assert code == 1
    assert "ALREADY_EXISTS" in err and task_id in err
    # With --policy return-existing, the held task is the answer.
    code, out, _ = await cli(
        server,
        "start",
        "test.sleep",
        "--arg",
        "1",
        "--key",
        key,
        "--policy",
        "return-existing",
        "--json",
    )
    assert code == 0
    assert (lines(out)[0]["id"], lines(out)[0]["already_existed"]) == (task_id, True)
    watching = asyncio.ensure_future(cli(server, "watch", task_id))
    await asyncio.sleep(1.0)
    code, out, _ = await cli(server, "cancel", task_id, "--mode", "terminate", "--json")
    assert code == 0 and lines(out)[0]["state"] == "TASK_STATE_CANCELLED"
    code, out, _ = await watching
    assert code == 4, out
    assert out.splitlines()[-1].startswith("CANCELLED")


async def test_status_ls_and_tasks(server: Server, key: str) -> None:
    code, out, _ = await cli(server, "start", "test.echo", "--arg", "7", "--key", key, "--watch")
    assert code == 0
    code, out, _ = await cli(server, "status", "--key", key)
    assert code == 0 and "SUCCEEDED" in out and "result     7" in out
    code, out, _ = await cli(server, "ls", "--key", key, "--json")
    (listed,) = lines(out)
    assert listed["task_name"] == "test.echo" and listed["result"] == 7
    code, out, _ = await cli(server, "ls", "--key", key, "--state", "running")
    assert code == 0 and "test.echo" not in out
    code, out, _ = await cli(server, "tasks")
    assert code == 0
    assert 'demo.dummy(name: str = "Bob", seconds: float = 5.0)  (key demo)' in out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["start", "test.echo", "--kwarg", "novalue"], 2, "expected NAME=VALUE"),
        (["status", "not-a-uuid"], 1, "INVALID_ARGUMENT"),
        (["cancel", "2b1f4bf4-0c39-4e8c-9d59-7d4d4e0c7d11"], 1, "NOT_FOUND"),
        (["ls", "--state", "done"], 2, "invalid choice"),
    ],
)
async def test_bad_input_exits_non_zero_with_a_message(
    server: Server, args: list[str], code: int, message: str
) -> None:
    exit_code, _, err = await cli(server, *args)
    assert exit_code == code
    assert message in err


async def test_the_asyncio_client(server: Server, key: str) -> None:
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        task = await client.start("test.echo", ["hi"], key=key)
        states = [change.state async for change in client.watch(task.id)]
        assert states[-1] == "SUCCEEDED"
        assert (await client.get(task.id)).result == "hi"
        with pytest.raises(TaskAlreadyRunning) as raised:
            await client.start("test.sleep", [5], key=key + "-held")
            await client.start("test.sleep", [5], key=key + "-held")
        held = raised.value.task_id
        assert (await client.cancel(held)).state == "CANCELLED"
        listed = [t.id async for t in client.list_tasks(key=key)]
        assert listed == [task.id]
        assert "demo.dummy" in [t.name for t in await client.task_types()]
        assert await client.healthy()


async def test_several_addresses_skip_one_that_is_down_and_a_bad_one_is_usage(
    server: Server,
) -> None:
    async def taskservice(env: dict[str, str], *args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "taskservice",
            *args,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    code, out, err = await taskservice(
        {"TASKSERVICE_ADDRESS": f"{nobody},127.0.0.1:{server.port}"}, "tasks"
    )
    assert code == 0, err
    assert "test.echo" in out
    code, _, err = await taskservice({}, "tasks", "--address", f"{nobody},tasks")
    assert code == 2
    assert "server address 'tasks': expected host:port" in err
