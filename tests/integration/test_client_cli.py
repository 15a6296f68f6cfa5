"""`taskservice start/status/cancel/cancel-many/watch/ls/tasks` against a live
server, and the asyncio client."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sys
import uuid
from typing import Any

import pytest

from taskservice import AsyncClient, ConflictPolicy, KeyQuiet, TaskAlreadyRunning
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
        # Wide enough that no table cell is cut short, whatever the terminal.
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
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
    assert "ALREADY_EXISTS" in err and task_id in err and "reason: TASK_ALREADY_RUNNING" in err
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
        (["cancel-many", "--state", "succeeded"], 2, "invalid choice"),
        (["cancel-many", "--limit", "0"], 2, "--limit must be positive"),
    ],
)
async def test_bad_input_exits_non_zero_with_a_message(
    server: Server, args: list[str], code: int, message: str
) -> None:
    exit_code, _, err = await cli(server, *args)
    assert exit_code == code
    assert message in err


async def test_cancel_many_by_key_and_a_limited_run_continued_with_its_token(
    server: Server, key: str
) -> None:
    parked = f"parked-{uuid.uuid4().hex[:12]}"  # no worker consumes it: tasks stay queued
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        held = await client.start("test.echo", [1], key=key, queue=parked)
        code, out, err = await cli(server, "cancel-many", "--key", key, "--json")
        assert code == 0, err
        assert lines(out) == [
            {"ended_count": 1, "requested_count": 0, "task_ids": [held.id], "next_page_token": ""}
        ]
        assert (await client.get(held.id)).state == "CANCELLED"

        older, newer = [
            (await client.start("test.stamp", ["unused", tag, 0], queue=parked)).id
            for tag in ("older", "newer")
        ]
        filters = ["--name", "test.stamp", "--state", "queued", "--mode", "graceful"]
        code, out, err = await cli(server, "cancel-many", *filters, "--limit", "1")
        assert code == 0, err
        assert "cancelled 1, asked 0 running to stop" in out and newer in out
        token = out.split("--page-token ")[1].split()[0]
        code, out, err = await cli(server, "cancel-many", *filters, "--page-token", token, "--json")
        assert code == 0, err
        (done,) = lines(out)
        assert older in done["task_ids"] and newer not in done["task_ids"]
        assert done["next_page_token"] == ""
        for task_id in (older, newer):
            assert (await client.get(task_id)).state == "CANCELLED"
        # The asyncio client's: nothing of this type is queued any more.
        rest = await client.cancel_all(task_name="test.stamp", states=["queued"], page_size=500)
        assert (rest.ended, rest.task_ids, rest.done) == (0, [], True)


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


# -- Issue 15: waiting policies, replace mode and delayed starts from the CLI and
# the asyncio client, against the real server and worker.


async def until_running(client: AsyncClient, task_id: str) -> None:
    async for change in client.watch(task_id):
        if change.state == "RUNNING":
            return
        assert not change.terminal, f"{task_id} ended {change.state} before it ran"


async def test_start_policy_queue_waits_visibly_and_runs_once_the_holder_ends(
    server: Server, key: str
) -> None:
    code, out, err = await cli(server, "start", "test.sleep", "--arg", "30", "--key", key, "--json")
    assert code == 0, err
    holder = lines(out)[0]["id"]
    code, out, err = await cli(
        server, "start", "test.echo", "--arg", '"next"', "--key", key, "--policy", "queue"
    )
    assert code == 0, err
    head, *details = out.splitlines()
    assert head.startswith("waiting ") and head.endswith("test.echo  QUEUED")
    waiting = head.split()[1]
    assert f"  waiting    for {holder} to end" in details
    code, out, _ = await cli(server, "status", waiting)
    assert code == 0 and f"waiting    for {holder} to end" in out
    code, out, _ = await cli(server, "ls", "--key", key, "--json")
    assert [(t["id"], t.get("waiting_for", "")) for t in lines(out)] == [
        (waiting, holder),
        (holder, ""),
    ]
    code, out, _ = await cli(server, "cancel", holder, "--json")
    assert code == 0 and lines(out)[0]["state"] == "TASK_STATE_CANCELLED"
    code, out, _ = await cli(server, "watch", waiting, "--json")
    assert code == 0, out
    assert lines(out)[-1]["result"] == "next" and "waiting_for" not in lines(out)[-1]


async def test_start_policy_replace_kills_the_running_holder_and_runs_after_it(
    server: Server, key: str
) -> None:
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        holder = await client.start("test.sleep", [30], key=key)
        await until_running(client, holder.id)
        code, out, err = await cli(
            server,
            "start", "test.echo", "--arg", "7", "--key", key,
            "--policy", "replace", "--replace-mode", "kill", "--json",
        )  # fmt: skip
        assert code == 0, err
        (started,) = lines(out)
        # Start answers before the kill lands: the new task waits for the holder.
        assert started["waiting_for"] == holder.id
        code, out, _ = await cli(server, "watch", started["id"], "--json")
        assert code == 0, out
        last = lines(out)[-1]
        assert last["state"] == "TASK_STATE_SUCCEEDED" and last["result"] == 7
        replaced = await client.get(holder.id)
        assert (replaced.state, replaced.cancel_mode) == ("CANCELLED", "KILL")


async def test_start_in_and_at_schedule_the_task_and_show_when(server: Server, key: str) -> None:
    code, out, err = await cli(server, "start", "test.echo", "--key", key, "--in", "2d", "--json")
    assert code == 0, err
    far = lines(out)[0]
    assert far["state"] == "TASK_STATE_QUEUED"
    due = datetime.datetime.fromisoformat(far["scheduled_time"])
    now = datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=2, minutes=-1) < due - now <= datetime.timedelta(days=2)
    code, out, _ = await cli(server, "status", far["id"])
    assert code == 0 and f"scheduled  {due.astimezone():%Y-%m-%d %H:%M:%S}" in out
    code, out, _ = await cli(server, "ls", "--key", key)
    assert code == 0 and f"until {due.astimezone():%Y-%m-%d %H:%M}" in out
    code, out, _ = await cli(server, "cancel", far["id"], "--json")
    assert code == 0 and lines(out)[0]["state"] == "TASK_STATE_CANCELLED"
    at = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).replace(microsecond=0)
    at_text = at.astimezone(datetime.timezone(datetime.timedelta(hours=-5))).isoformat()
    code, out, err = await cli(server, "start", "test.echo", "--key", key, "--at", at_text)
    assert code == 0, err
    head = out.splitlines()[0]
    assert head.startswith("scheduled ") and head.endswith("QUEUED")
    code, out, _ = await cli(server, "status", "--key", key, "--json")
    assert lines(out)[0]["scheduled_time"] == at.strftime("%Y-%m-%dT%H:%M:%SZ")
    code, _, _ = await cli(server, "cancel", lines(out)[0]["id"])
    assert code == 0


async def test_tasks_shows_the_key_settings_of_each_type(server: Server) -> None:
    code, out, err = await cli(server, "tasks", "--json")
    assert code == 0, err
    types = {t["name"]: t for t in lines(out)}
    assert types["test.span_two"]["key_slots"] == 2
    quiet = types["test.quiet"]
    # The proto's JSON mapping: a Duration as a string, enums by their names.
    assert (quiet["quiet_period"], quiet["quiet_after_success"]) == ("1.500s", True)
    assert "quiet_period" not in types["test.echo"]
    assert types["test.echo"]["replace_mode"] == "CANCEL_MODE_TERMINATE"  # unless a type says
    assert types["demo.dummy"]["parameters"][0] == {
        "name": "name",
        "kind": "PARAMETER_KIND_POSITIONAL_OR_KEYWORD",
        "default_value": "Bob",
        "annotation": "str",
    }
    code, out, _ = await cli(server, "tasks")
    assert code == 0
    assert "  2 slots per key" in out.splitlines()
    assert "  quiet 1.5s after a success" in out.splitlines()


async def test_the_asyncio_client_waits_schedules_and_reports_a_quiet_key(
    server: Server, key: str
) -> None:
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        holder = await client.start("test.sleep", [30], key=key)
        superseded = await client.start("test.echo", [1], key=key, conflict_policy="queue-latest")
        latest = await client.start(
            "test.echo", [2], key=key, conflict_policy=ConflictPolicy.QUEUE_LATEST
        )
        assert superseded.waiting and superseded.waiting_for == holder.id
        assert latest.waiting_for == holder.id
        ended = [change async for change in client.watch(superseded.id)][-1]
        assert ended.state == "CANCELLED" and ended.error is not None
        assert ended.error.type == "Superseded" and ended.start_time is None
        await client.cancel(holder.id)
        states = [change async for change in client.watch(latest.id)]
        assert (states[-1].state, states[-1].result, states[-1].waiting_for) == ("SUCCEEDED", 2, "")

        at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
        scheduled = await client.start("test.echo", key=key + "-later", start_at=at)
        assert scheduled.state == "QUEUED" and scheduled.scheduled_time is not None
        assert abs((scheduled.scheduled_time - at).total_seconds()) < 0.001
        await client.cancel(scheduled.id)

        ran = await client.start("test.quiet", key=key + "-quiet")
        assert [c.state async for c in client.watch(ran.id)][-1] == "SUCCEEDED"
        with pytest.raises(KeyQuiet) as quiet:
            await client.start("test.quiet", key=key + "-quiet")
        assert quiet.value.task_id == ran.id
        free = datetime.datetime.fromisoformat(quiet.value.metadata["free_time"])
        assert ran.create_time is not None and free > ran.create_time
        types = {t.name: t for t in await client.task_types()}
        assert types["test.quiet"].quiet_period == 1.5
        assert types["test.span_two"].key_slots == 2


async def test_piped_watch_prints_a_line_only_when_something_shown_changed(
    server: Server, key: str
) -> None:
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        task = await client.start("test.sleep", [2], key=key)
        await until_running(client, task.id)
        watching = asyncio.ensure_future(cli(server, "watch", task.id))
        await asyncio.sleep(1.0)  # the watch has printed RUNNING
        code, out, err = await cli(server, "cancel", task.id, "--mode", "graceful", "--json")
        assert code == 0, err
        assert lines(out)[0]["cancel_mode"] == "CANCEL_MODE_GRACEFUL"
        code, out, err = await watching
    # Graceful: the task runs to its end, then ends CANCELLED with its result.
    assert code == 4, (out, err)
    shown = out.splitlines()
    assert shown[0] == "RUNNING"
    assert shown[1] == "RUNNING cancel requested (GRACEFUL)"
    assert shown[-1].startswith("CANCELLED")
    assert len(shown) == 3, shown
