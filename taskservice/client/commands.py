"""The client commands of `taskservice`: start, status, cancel, watch, ls, tasks.

They talk to a running server (TASKSERVICE_ADDRESS, else 127.0.0.1 and
TASKSERVICE_PORT) through taskservice.client. Exit codes: 0 done (a watched task
SUCCEEDED), 1 the call failed, 2 bad usage, 3 the task FAILED, 4 it was
CANCELLED, 5 it was LOST.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from google.protobuf import json_format

from taskservice.client import (
    CancelMode,
    Client,
    ConflictPolicy,
    Task,
    TaskType,
    channel_credentials,
    default_target,
)
from taskservice.core.errors import TaskServiceError, Unavailable

EXIT_OK = 0
EXIT_CALL_FAILED = 1
EXIT_FAILED = 3
EXIT_CANCELLED = 4
EXIT_LOST = 5
STATE_EXITS = {"FAILED": EXIT_FAILED, "CANCELLED": EXIT_CANCELLED, "LOST": EXIT_LOST}

EPILOG = (
    "exit codes: 0 done (a watched task SUCCEEDED), 1 the call failed, 2 bad usage, "
    "3 the task FAILED, 4 it was CANCELLED, 5 it was LOST"
)
COMMANDS = ("start", "status", "cancel", "watch", "ls", "tasks")


def add_commands(commands: Any) -> None:
    """Add the client commands to `taskservice`'s subcommands."""
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("connection")
    group.add_argument(
        "--address",
        default=None,
        help="server host:port, or several comma-separated (calls spread round robin over "
        "those that report SERVING), or dns:///name:port "
        "(default: TASKSERVICE_ADDRESS, else 127.0.0.1:TASKSERVICE_PORT)",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("TASKSERVICE_TOKEN", ""),
        help="bearer token (default: TASKSERVICE_TOKEN)",
    )
    group.add_argument("--tls", action="store_true", help="use TLS (system CAs unless --ca-file)")
    group.add_argument("--ca-file", default="", help="PEM CA of the server's certificate")
    group.add_argument("--cert-file", default="", help="PEM client certificate (mutual TLS)")
    group.add_argument("--key-file", default="", help="PEM key of --cert-file")
    group.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default 30)")
    group.add_argument("--json", action="store_true", help="print JSON (one object per line)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(  # type: ignore[no-any-return]
            name, help=help, parents=[connection], epilog=EPILOG
        )

    start = command("start", "start a task (prints it; --watch follows it to its end)")
    start.add_argument("task_name", help="a task type, as `taskservice tasks` lists them")
    start.add_argument(
        "--arg",
        dest="args",
        action="append",
        default=[],
        metavar="VALUE",
        help='a positional argument, as JSON (`5`, `[1,2]`, `"x"`) or else a string; repeatable',
    )
    start.add_argument(
        "--kwarg",
        dest="kwargs",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a keyword argument, VALUE as for --arg; repeatable",
    )
    start.add_argument("--key", default="", help="exclusivity key (default: the task type's)")
    start.add_argument(
        "--policy",
        default="reject",
        choices=_choices(ConflictPolicy),
        help="if a task holds the key: reject (fail, the default) or return-existing (return it)",
    )
    start.add_argument("--countdown", type=float, help="seconds before a worker may run it")
    start.add_argument("--queue", default="", help="queue to send it to")
    start.add_argument("--time-limit", type=float, help="hard time limit, seconds")
    start.add_argument("--soft-time-limit", type=float, help="soft time limit, seconds")
    start.add_argument("--request-id", default="", help="makes a retried start safe (AIP-155)")
    start.add_argument("--watch", action="store_true", help="follow the task to its end")

    status = command("status", "show a task, by id or by exclusivity key")
    _selector(status)

    cancel = command("cancel", "cancel a task")
    cancel.add_argument("task_id")
    cancel.add_argument(
        "--mode",
        default="KILL",
        type=str.upper,
        choices=_choices(CancelMode, str.upper),
        help="default KILL",
    )
    cancel.add_argument("--request-id", default="")

    watch = command("watch", "follow a task to its end, with a progress bar")
    _selector(watch)

    ls = command("ls", "list tasks, newest first")
    ls.add_argument(
        "--state",
        dest="states",
        action="append",
        default=[],
        type=str.upper,
        choices=["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "LOST"],
        help="only tasks in this state; repeatable",
    )
    ls.add_argument("--name", default="", help="only tasks of this type")
    ls.add_argument("--key", default="", help="only tasks under this exclusivity key")
    ls.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")

    command("tasks", "list the task types Start accepts")


def _selector(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task_id", nargs="?", default="")
    parser.add_argument("--key", default="", help="the current (else latest) task under this key")


def run(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run one client command; its exit code."""
    try:
        with _client(args) as client:
            return _COMMANDS[args.command](client, args, _Output(args.json, out))
    except TaskServiceError as error:
        if args.json:
            print(json.dumps(_error_json(error)), file=err)
        else:
            print(f"error: {error}", file=err)
            if error.task_id:
                print(f"  task: {error.task_id}", file=err)
            for field, why in error.violations:
                print(f"  {field}: {why}", file=err)
        return EXIT_CALL_FAILED
    except ValueError as error:  # a value the client refused before calling
        print(f"error: {error}", file=err)
        return 2


def _client(args: argparse.Namespace) -> Client:
    credentials = None
    if args.tls or args.ca_file or args.cert_file:
        credentials = channel_credentials(args.ca_file, args.cert_file, args.key_file)
    return Client(
        args.address or default_target(),
        credentials=credentials,
        token=args.token or None,
        timeout=args.timeout,
    )


def parse_value(text: str) -> Any:
    """JSON if it parses, else the text itself: `5` is 5, `Bob` is "Bob"."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _kwargs(pairs: Iterable[str]) -> dict[str, Any]:
    kwargs = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise ValueError(f"--kwarg {pair!r}: expected NAME=VALUE")
        kwargs[name] = parse_value(value)
    return kwargs


def _start(client: Client, args: argparse.Namespace, output: _Output) -> int:
    task = client.start(
        args.task_name,
        [parse_value(value) for value in args.args],
        _kwargs(args.kwargs),
        key=args.key,
        conflict_policy=args.policy,
        countdown=args.countdown,
        queue=args.queue,
        time_limit=args.time_limit,
        soft_time_limit=args.soft_time_limit,
        request_id=args.request_id,
    )
    if not args.watch:
        output.task(task, title="already running" if task.already_existed else "started")
        return EXIT_OK
    return _follow(client.watch(task.id), output)


def _status(client: Client, args: argparse.Namespace, output: _Output) -> int:
    output.task(client.get(args.task_id, key=args.key))
    return EXIT_OK


def _cancel(client: Client, args: argparse.Namespace, output: _Output) -> int:
    output.task(client.cancel(args.task_id, args.mode, request_id=args.request_id))
    return EXIT_OK


def _watch(client: Client, args: argparse.Namespace, output: _Output) -> int:
    return _follow(client.watch(args.task_id, key=args.key), output)


def _follow(changes: Iterator[Task], output: _Output) -> int:
    last = output.follow(changes)
    if last is None or not last.terminal:
        raise Unavailable("the stream ended before the task did")
    return STATE_EXITS.get(last.state, EXIT_OK)


def _ls(client: Client, args: argparse.Namespace, output: _Output) -> int:
    if args.limit <= 0:
        raise ValueError("--limit must be positive")
    tasks = []
    for task in client.list_tasks(
        states=args.states, task_name=args.name, key=args.key, page_size=min(args.limit, 500)
    ):
        tasks.append(task)
        if len(tasks) >= args.limit:
            break
    output.table(tasks)
    return EXIT_OK


def _tasks(client: Client, args: argparse.Namespace, output: _Output) -> int:
    output.task_types(client.task_types())
    return EXIT_OK


_COMMANDS = {
    "start": _start,
    "status": _status,
    "cancel": _cancel,
    "watch": _watch,
    "ls": _ls,
    "tasks": _tasks,
}


def task_json(task: Task) -> dict[str, Any]:
    """A task as the proto's JSON mapping, with the proto's field names."""
    data: dict[str, Any] = json_format.MessageToDict(task.message, preserving_proto_field_name=True)
    if task.already_existed:
        data["already_existed"] = True
    return data


def _choices(enum: Iterable[str], spell: Callable[[str], str] = str.lower) -> list[str]:
    """The members of an API enum as the command line spells them."""
    return [spell(member).replace("_", "-") for member in enum if member != "UNSPECIFIED"]


def _error_json(error: TaskServiceError) -> dict[str, Any]:
    data: dict[str, Any] = {"code": error.code, "message": error.message, "reason": error.reason}
    if error.metadata:
        data["metadata"] = error.metadata
    if error.violations:
        data["violations"] = [{"field": f, "description": d} for f, d in error.violations]
    return data


class _Output:
    """What the commands print: JSON lines, or text for people (rich)."""

    def __init__(self, as_json: bool, out: TextIO) -> None:
        self._json = as_json
        self._out = out

    def _console(self) -> Any:
        from rich.console import Console

        return Console(file=self._out, highlight=False, soft_wrap=True)

    def task(self, task: Task, *, title: str = "") -> None:
        if self._json:
            print(json.dumps(task_json(task)), file=self._out)
            return
        console = self._console()
        head = f"{title} " if title else ""
        console.print(f"{head}[bold]{task.id}[/bold]  {task.task_name}  {_state(task.state)}")
        for label, value in _details(task):
            console.print(f"  {label:<10} {value}")

    def follow(self, changes: Iterator[Task]) -> Task | None:
        """Print each change (JSON), or show a live progress bar; the last."""
        last = None
        if self._json or not self._out.isatty():
            for last in changes:
                if self._json:
                    print(json.dumps(task_json(last)), file=self._out, flush=True)
                else:
                    print(_line(last), file=self._out, flush=True)
            return last
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = self._console()
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            shown = bar.add_task("", total=None, detail="")
            for last in changes:
                progress = last.progress
                total = progress.total if progress and progress.total > 0 else None
                bar.update(
                    shown,
                    description=f"{last.task_name} {last.state}",
                    completed=progress.current if progress else 0,
                    total=total,
                    detail=progress.message if progress else "",
                )
        if last is not None:
            self.task(last)
        return last

    def table(self, tasks: list[Task]) -> None:
        if self._json:
            for task in tasks:
                print(json.dumps(task_json(task)), file=self._out)
            return
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        # Whole ids, however narrow the terminal: they are what the other
        # commands take.
        table.add_column("ID", no_wrap=True, min_width=36)
        for column in ("TASK", "STATE", "KEY", "CREATED", "WORKER"):
            table.add_column(column)
        for task in tasks:
            created = (
                task.create_time.astimezone().strftime("%Y-%m-%d %H:%M:%S")
                if (task.create_time)
                else ""
            )
            table.add_row(
                task.id, task.task_name, task.state, task.exclusivity_key, created, task.worker
            )
        self._console().print(table)

    def task_types(self, types: list[TaskType]) -> None:
        if self._json:
            for task_type in types:
                data = {
                    "name": task_type.name,
                    "description": task_type.description,
                    "default_exclusivity_key": task_type.default_exclusivity_key,
                    "parameters": [vars_of(p) for p in task_type.parameters],
                }
                print(json.dumps(data), file=self._out)
            return
        console = self._console()
        for task_type in types:
            key = (
                f"  [dim](key {task_type.default_exclusivity_key})[/dim]"
                if (task_type.default_exclusivity_key)
                else ""
            )
            console.print(f"[bold]{task_type.name}[/bold]({_signature(task_type)}){key}")
            if task_type.description:
                console.print(f"  {task_type.description.splitlines()[0]}")


def vars_of(parameter: Any) -> dict[str, Any]:
    """The attributes of a dataclass instance, by name."""
    return {name: getattr(parameter, name) for name in parameter.__slots__}


def _signature(task_type: TaskType) -> str:
    parts = []
    for p in task_type.parameters:
        text = {"VAR_POSITIONAL": "*", "VAR_KEYWORD": "**"}.get(p.kind, "") + p.name
        if p.annotation:
            text += f": {p.annotation}"
        if not p.required and p.kind not in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            default = p.default
            if p.annotation == "float" and isinstance(default, int):
                default = float(default)  # JSON numbers lose the ".0"
            text += f" = {json.dumps(default)}"
        parts.append(text)
    return ", ".join(parts)


def _state(state: str) -> str:
    colour = {
        "SUCCEEDED": "green",
        "FAILED": "red",
        "LOST": "red",
        "CANCELLED": "yellow",
        "RUNNING": "cyan",
    }.get(state, "white")
    return f"[{colour}]{state}[/{colour}]"


def _details(task: Task) -> list[tuple[str, str]]:
    rows = []
    if task.exclusivity_key:
        rows.append(("key", task.exclusivity_key))
    if task.worker:
        rows.append(("worker", task.worker))
    if task.progress:
        p = task.progress
        done = f"{p.current:g}/{p.total:g}" if p.total else f"{p.current:g}"
        rows.append(("progress", f"{done} {p.message}".strip()))
    if task.state == "SUCCEEDED" or task.result is not None:
        rows.append(("result", json.dumps(task.result)))
    if task.error:
        rows.append(("error", f"{task.error.type}: {task.error.message}"))
    if task.cancel_mode:
        rows.append(("cancel", task.cancel_mode))
    return rows


def _line(task: Task) -> str:
    """One change as a line, for logs and pipes."""
    text = f"{task.state}"
    if task.progress:
        p = task.progress
        text += f" {p.current:g}/{p.total:g}" if p.total else f" {p.current:g}"
        if p.message:
            text += f" {p.message}"
    if task.terminal:
        text += f" result={json.dumps(task.result)}" if task.state == "SUCCEEDED" else ""
        if task.error:
            text += f" error={task.error.type}: {task.error.message}"
    return text
