"""The client commands of `taskservice`: start, status, cancel, cancel-many,
watch, ls, tasks.

They talk to a running server (TASKSERVICE_ADDRESS, else 127.0.0.1 and
TASKSERVICE_PORT) through taskservice.client. Exit codes: 0 done (a watched task
SUCCEEDED), 1 the call failed, 2 bad usage, 3 the task FAILED, 4 it was
CANCELLED, 5 it was LOST.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

from google.protobuf import json_format

from taskservice.client import (
    CancelledTasks,
    CancelMode,
    Client,
    ConflictPolicy,
    RetryPolicy,
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
COMMANDS = ("start", "status", "cancel", "cancel-many", "watch", "ls", "tasks")


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
    group.add_argument(
        "--timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds a call may take, retries included (default 30)",
    )
    group.add_argument(
        "--no-retry",
        action="store_true",
        help="fail at the first error; by default a call that fails UNAVAILABLE (a server "
        "restarting, a connection cut) or with a backlog is retried, and a dropped watch "
        "resumed, within --timeout",
    )
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
        help="if the key is held: reject (fail, the default), return-existing (return the "
        "holder), queue (wait in the key's line), queue-latest (wait as its only waiting "
        "task, superseding those waiting), replace (cancel the holder, run once it ended)",
    )
    start.add_argument(
        "--replace-mode",
        type=str.lower,
        choices=_choices(CancelMode),
        help="how --policy replace cancels a running holder (default: the task type's, "
        "else terminate)",
    )
    when = start.add_mutually_exclusive_group()
    when.add_argument(
        "--in",
        "--countdown",
        dest="countdown",
        type=duration,
        metavar="DURATION",
        help="run no earlier than this long from now: 90s, 15m, 2h, 3d, 1h30m, "
        "or plain seconds; any length",
    )
    when.add_argument(
        "--at",
        dest="start_at",
        type=moment,
        metavar="TIME",
        help="run no earlier than this RFC 3339 time, with its zone: "
        "2026-12-24T18:00:00Z, 2026-12-24T19:00:00+01:00",
    )
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

    many = command(
        "cancel-many",
        "cancel every queued and running task matching the filters (running ones are asked "
        "to stop, not waited for)",
    )
    many.add_argument(
        "--state",
        dest="states",
        action="append",
        default=[],
        type=str.upper,
        choices=["QUEUED", "RUNNING"],
        help="only tasks in this state; repeatable (default: both)",
    )
    many.add_argument("--name", default="", help="only tasks of this type")
    many.add_argument("--key", default="", help="only tasks under this exclusivity key")
    many.add_argument(
        "--mode",
        default="KILL",
        type=str.upper,
        choices=_choices(CancelMode, str.upper),
        help="how running tasks stop; default KILL",
    )
    many.add_argument(
        "--limit",
        type=int,
        default=None,
        help="at most this many (default: all); the output's token continues",
    )
    many.add_argument(
        "--page-token", default="", help="continue where a --limit run stopped (same filters)"
    )

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
            print(f"error: {error.code}: {error.message}", file=err)
            # The reason says which error of the code this is (what a script
            # branches on); a reason that only repeats the code adds nothing.
            if error.reason != error.code:
                print(f"  reason: {error.reason}", file=err)
            if error.hint:
                print(f"  hint: {error.hint}", file=err)
            # What the caller can act on: the holder's id, when a quiet key
            # frees (KeyQuiet), a line's limit (KeyLineFull), ...
            for name, value in error.metadata.items():
                print(f"  {_LABELS.get(name, name.replace('_', ' '))}: {value}", file=err)
            for field, why in error.violations:
                print(f"  {field}: {why}", file=err)
        return EXIT_CALL_FAILED
    except ValueError as error:  # a value the client refused before calling
        print(f"error: {error}", file=err)
        return 2


_LABELS = {"task_id": "task", "free_time": "free at", "exclusivity_key": "key"}
"""How the text output names an error's metadata (else: the name, spaced)."""


def _client(args: argparse.Namespace) -> Client:
    credentials = None
    if args.tls or args.ca_file or args.cert_file:
        credentials = channel_credentials(args.ca_file, args.cert_file, args.key_file)
    return Client(
        args.address or default_target(),
        credentials=credentials,
        token=args.token or None,
        timeout=args.timeout,
        retry=None if args.no_retry else RetryPolicy(deadline=args.timeout),
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


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)[smhdw]")


def duration(text: str) -> float:
    """Seconds of "90s", "15m", "2h", "3d", "1w", "1h30m" or plain "90"
    (argparse type: a bad value is a usage error)."""
    spelled = text.strip().lower()
    try:
        seconds = float(spelled)
    except ValueError:
        parts = _DURATION.findall(spelled)
        if not parts or "".join(parts) != spelled:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration: give e.g. 90s, 15m, 2h, 3d, 1h30m or seconds"
            ) from None
        seconds = sum(float(part[:-1]) * _UNITS[part[-1]] for part in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration is a non-negative length")
    return seconds


def positive_seconds(text: str) -> float:
    """Seconds, more than none (argparse type: anything else is a usage error)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return seconds


def moment(text: str) -> datetime.datetime:
    """An RFC 3339 time with its zone ("2026-12-24T18:00:00Z", "...+01:00")
    (argparse type: a bad value, or one without a zone, is a usage error)."""
    try:
        # RFC 3339 allows a lower-case "t" and "z"; fromisoformat does not.
        when = datetime.datetime.fromisoformat(text.strip().upper())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an RFC 3339 time: give e.g. 2026-12-24T18:00:00Z"
        ) from None
    if when.utcoffset() is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no time zone: add Z (UTC) or an offset such as +01:00"
        )
    return when


def _start(client: Client, args: argparse.Namespace, output: _Output) -> int:
    if args.replace_mode and args.policy != "replace":
        raise ValueError("--replace-mode goes with --policy replace")
    task = client.start(
        args.task_name,
        [parse_value(value) for value in args.args],
        _kwargs(args.kwargs),
        key=args.key,
        conflict_policy=args.policy,
        replace_mode=args.replace_mode,
        countdown=args.countdown,
        start_at=args.start_at,
        queue=args.queue,
        time_limit=args.time_limit,
        soft_time_limit=args.soft_time_limit,
        request_id=args.request_id,
    )
    if not args.watch:
        if task.already_existed:
            title = "already running"
        elif task.waiting:
            title = "waiting"
        elif task.state == "QUEUED" and task.scheduled_time:
            title = "scheduled"
        else:
            title = "started"
        output.task(task, title=title)
        return EXIT_OK
    return _follow(client.watch(task.id), output)


def _status(client: Client, args: argparse.Namespace, output: _Output) -> int:
    output.task(client.get(args.task_id, key=args.key))
    return EXIT_OK


def _cancel(client: Client, args: argparse.Namespace, output: _Output) -> int:
    output.task(client.cancel(args.task_id, args.mode, request_id=args.request_id))
    return EXIT_OK


def _cancel_many(client: Client, args: argparse.Namespace, output: _Output) -> int:
    if args.limit is not None and args.limit <= 0:
        raise ValueError("--limit must be positive")
    output.cancelled(
        client.cancel_all(
            states=args.states,
            task_name=args.name,
            key=args.key,
            mode=args.mode,
            limit=args.limit,
            page_token=args.page_token,
        )
    )
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
    "cancel-many": _cancel_many,
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
    if error.hint:
        data["hint"] = error.hint
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

    def cancelled(self, done: CancelledTasks) -> None:
        if self._json:
            data = {
                "ended_count": done.ended,
                "requested_count": done.requested,
                "task_ids": done.task_ids,
                "next_page_token": done.next_page_token,
            }
            print(json.dumps(data), file=self._out)
            return
        console = self._console()
        console.print(f"cancelled {done.ended}, asked {done.requested} running to stop")
        for task_id in done.task_ids:
            console.print(f"  {task_id}")
        if done.next_page_token:
            console.print(f"more may match: continue with --page-token {done.next_page_token}")

    def follow(self, changes: Iterator[Task]) -> Task | None:
        """Print each change (JSON), or show a live progress bar; the last."""
        last = None
        if self._json or not self._out.isatty():
            printed = ""
            for last in changes:
                if self._json:
                    print(json.dumps(task_json(last)), file=self._out, flush=True)
                    continue
                # A change may touch only what a line does not show (the
                # worker's lease, say): a line repeated says nothing.
                line = _line(last)
                if line != printed:
                    print(line, file=self._out, flush=True)
                    printed = line
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
                    description=f"{last.task_name} {last.state}"
                    + (" (waiting)" if last.waiting else "")
                    + (" (cancel requested)" if _cancel_pending(last) else ""),
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
        if not self._out.isatty():
            self._columns(tasks)
            return
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        # Whole ids, however narrow the terminal: they are what the other
        # commands take.
        table.add_column("ID", no_wrap=True, min_width=36)
        for column in ("TASK", "STATE", "KEY", "CREATED", "WORKER"):
            table.add_column(column)
        waits = [_waits(task) for task in tasks]
        if any(waits):  # a column only when some queued task waits for something
            table.add_column("WAITING")
        for task, wait in zip(tasks, waits, strict=True):
            table.add_row(*_row(task), *([wait] if any(waits) else []))
        self._console().print(table)

    def _columns(self, tasks: list[Task]) -> None:
        """The table for a pipe (grep, cut, awk): the same header and rows,
        tab-separated, every value whole (a terminal's table cuts cells to
        its width; a pipe has none), a waiting task's holder id too."""
        waits = [_waits(task, whole=True) for task in tasks]
        header = ["ID", "TASK", "STATE", "KEY", "CREATED", "WORKER"]
        print("\t".join(header + (["WAITING"] if any(waits) else [])), file=self._out)
        for task, wait in zip(tasks, waits, strict=True):
            row = [*_row(task), *([wait] if any(waits) else [])]
            # A tab or newline inside a value would split it: a space keeps
            # the columns.
            print("\t".join(re.sub(r"[\t\r\n]", " ", value) for value in row), file=self._out)

    def task_types(self, types: list[TaskType]) -> None:
        if self._json:
            for task_type in types:
                print(json.dumps(task_type_json(task_type)), file=self._out)
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
            keys = _key_behaviour(task_type)
            if keys:
                console.print(f"  [dim]{keys}[/dim]")


def task_type_json(task_type: TaskType) -> dict[str, Any]:
    """A task type as the proto's JSON mapping, with the proto's field names,
    as task_json prints a task: `default_value`, `kind` and `replace_mode` as
    enum names (PARAMETER_KIND_..., CANCEL_MODE_...), `quiet_period` a
    Duration ("90s"); fields at their default are left out."""
    data: dict[str, Any] = json_format.MessageToDict(
        task_type.message, preserving_proto_field_name=True
    )
    return data


def _key_behaviour(task_type: TaskType) -> str:
    """What a task type sets about its keys, as one line ("" if nothing)."""
    parts = []
    if task_type.key_slots:
        parts.append(f"{task_type.key_slots} slots per key")
    if task_type.key_line_limit:
        parts.append(f"line limit {task_type.key_line_limit}")
    if task_type.quiet_period is not None:
        after = "a success" if task_type.quiet_after_success else "each run"
        parts.append(f"quiet {_span(task_type.quiet_period)} after {after}")
    if task_type.replace_mode not in (None, CancelMode.TERMINATE):  # TERMINATE: the default
        parts.append(f"replace mode {task_type.replace_mode.lower()}")
    return ", ".join(parts)


def _span(seconds: float) -> str:
    """Seconds as the largest whole unit --in takes: 90 -> 90s, 3600 -> 1h."""
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def _waits(task: Task, *, whole: bool = False) -> str:
    """What a queued task waits for, in short: "for <id prefix>" (its key's
    holder; `status`, --json and `whole` have the whole id) or "until <time>"."""
    if task.waiting:
        return f"for {task.waiting_for if whole else task.waiting_for[:8]}"
    if task.state == "QUEUED" and task.scheduled_time:
        return f"until {_local(task.scheduled_time, seconds=False)}"
    return ""


def _local(when: datetime.datetime | None, *, seconds: bool = True) -> str:
    """A time in this machine's zone, as the tables show it ("" if unset)."""
    if when is None:
        return ""
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


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
    if task.waiting:
        rows.append(("waiting", f"for {task.waiting_for} to end"))
    if task.scheduled_time:
        rows.append(("scheduled", _local(task.scheduled_time)))
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
    if task.waiting:
        text += f" waiting for {task.waiting_for}"
    elif task.state == "QUEUED" and task.scheduled_time:
        text += f" scheduled {_local(task.scheduled_time)}"
    if task.progress:
        p = task.progress
        text += f" {p.current:g}/{p.total:g}" if p.total else f" {p.current:g}"
        if p.message:
            text += f" {p.message}"
    if _cancel_pending(task):
        text += f" cancel requested ({task.cancel_mode})"
    if task.terminal:
        text += f" result={json.dumps(task.result)}" if task.state == "SUCCEEDED" else ""
        if task.error:
            text += f" error={task.error.type}: {task.error.message}"
    return text


def _cancel_pending(task: Task) -> bool:
    """A cancel was asked for and the task has not ended yet (a GRACEFUL
    one lets it run on, or the worker has yet to stop it)."""
    return bool(task.cancel_mode) and not task.terminal


def _row(task: Task) -> list[str]:
    """A task's cells in `ls`, before WAITING: the table's and the pipe's."""
    return [
        task.id,
        task.task_name,
        task.state,
        task.exclusivity_key,
        _local(task.create_time),
        task.worker,
    ]
