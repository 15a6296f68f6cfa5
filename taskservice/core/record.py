"""The per-task record in Redis: key names, states and fields.

The server creates a record when it accepts a Start; the worker moves it
along (started, progress, finished); Cancel marks it; the lease sweeper ends
it LOST when nobody renews its lease. Every change is a *transition*: one of
the Lua scripts in `taskservice.core.scripts`, which bumps the record's sequence number
and publishes the whole record on one channel, so watchers see every change,
in order, from a single subscription per server process.

Record states use Celery's vocabulary (PENDING, STARTED, SUCCESS, FAILURE,
REVOKED) plus LOST: `taskservice.core.states` maps them to `taskservice.v1.TaskState`.

Keys:
    <prefix>:task:{<task id>}        HASH   the record
    <prefix>:key:{<exclusivity key>} STRING the key's *holder*: the id of the
                                            latest task started under the key.
                                            The key is held while that task is
                                            active; a terminal state frees it.
    <prefix>:fence:{<exclusivity key>} STRING the key's last fencing token:
                                            each claim of the key records a
                                            larger one on its task's record
                                            (max(last + 1, Redis's clock in ms),
                                            so it grows even after this expired)
    <prefix>:leases                  ZSET   task id -> lease deadline (ms, Redis
                                            clock) of every task whose liveness
                                            someone must prove: running tasks
                                            (renewed by their worker), tasks a
                                            worker holds unstarted, and Starts
                                            whose message is not yet confirmed
                                            in the broker
    <prefix>:log:{<task id>}         LIST   the record after each change but
                                            the terminal one (which stays the
                                            record): the last LOG_LENGTH, so a
                                            watch can resume from a sequence
                                            number
    <prefix>:request:{<request id>}  HASH   what a request id was used for
                                            (fingerprint, task, response), so
                                            a retried call is answered alike
    <prefix>:holders:{<key>}         ZSET   the key's unfinished holders (id ->
                                            claim ms): at most its slots
    <prefix>:line:{<key>}            LIST   the tasks waiting for the key, in
                                            order (REPLACE, QUEUE_LATEST, QUEUE)
    <prefix>:quiet:{<key>}           STRING the task whose end started the key's
                                            quiet period; expires when it ends
    <prefix>:send:{<task id>}        HASH   how a deferred task reaches the broker:
                                            the broker list and message, or the
                                            delivery a server publishes
    <prefix>:due                     ZSET   task id -> when a deferred task is
                                            sent (ms, Redis clock): its start
                                            time, or its turn for its key
    <prefix>:stats                   HASH   counters the scripts keep
                                            (handovers, superseded, waits)
    <prefix>:events                  pub/sub channel: "<task id> <record JSON>"

A script may touch more than the record it is about: a Start's claim also
reads and writes the key's holder, the holder's record, the lease set, the
ListTasks indexes and a request key; every change appends to the task's log
and publishes on the events channel. Only some of these keys are passed in
KEYS, and they share no hash tag: every script is written against a single
Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PENDING = "PENDING"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
LOST = "LOST"
ACTIVE_STATES = frozenset({PENDING, STARTED})
TERMINAL_STATES = frozenset({SUCCESS, FAILURE, REVOKED, LOST})

MAX_JSON_DEPTH = 30
"""Deepest nesting of a result's JSON: deeper, protobuf clients (recursion
limit 100 messages, three per JSON object level) could not decode it."""

MAX_MESSAGE_CHARS = 16 * 1024
"""Longest error or progress message kept (the start of it)."""

MAX_TRACEBACK_CHARS = 64 * 1024
"""Longest traceback kept (the end of it, where the error is)."""

LOG_LENGTH = 64
"""How many changes of a task are kept for resuming watches; a watch resumed
from further back gets the current record instead of each change."""

WORKER_LOST_ERROR = "WorkerLostError"
NOT_ENQUEUED_ERROR = "NotEnqueued"
RECORD_LOST_ERROR = "RecordLost"

CLAIMED_HEADER = "taskservice_claimed"
"""The task message header a Start sets (its value: the exclusivity key, ""
for none): the task was claimed, so a worker that finds no record for it
knows Redis lost the record (and refuses to run it), where a plain
`delay()` of an exposed task never had one."""


def clip(text: str, limit: int) -> str:
    """The start of `text`, at most `limit` characters."""
    return text if len(text) <= limit else text[:limit] + "... (cut)"


def clip_end(text: str, limit: int) -> str:
    """The end of `text`, at most `limit` characters."""
    return text if len(text) <= limit else "(cut) ..." + text[-limit:]


def unrepresentable(value: Any, depth: int = 1) -> str:
    """Why a JSON-encodable value cannot be a google.protobuf.Value that every
    client can decode; "" if it can."""
    if depth > MAX_JSON_DEPTH:
        return f"it nests deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return ""
    if isinstance(value, int | float):
        try:
            float(value)
        except OverflowError:
            return "it holds an integer beyond the range of a double"
        return ""
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return ""  # what kombu's JSON encoder turns into a string (dates, UUIDs)
    for item in items:
        problem = unrepresentable(item, depth + 1)
        if problem:
            return problem
    return ""


def task_key(prefix: str, task_id: str) -> str:
    """The Redis key of a task's record (a hash)."""
    return f"{prefix}:task:{{{task_id}}}"


def holder_key(prefix: str, exclusivity_key: str) -> str:
    """The Redis key naming the task that holds (or last held) an exclusivity key."""
    return f"{prefix}:key:{{{exclusivity_key}}}"


def fence_key(prefix: str, exclusivity_key: str) -> str:
    """The Redis key of an exclusivity key's last fencing token (a string)."""
    return f"{prefix}:fence:{{{exclusivity_key}}}"


def log_key(prefix: str, task_id: str) -> str:
    """The Redis key of a task's change log (a list)."""
    return f"{prefix}:log:{{{task_id}}}"


def request_key(prefix: str, request_id: str) -> str:
    """The Redis key of what a request id was used for (a hash)."""
    return f"{prefix}:request:{{{request_id}}}"


def index_key(prefix: str, *, active: bool = False, name: str = "", key: str = "") -> str:
    """The ListTasks index of every task, of the active ones, of one task
    type or of one exclusivity key (the claim script adds, see scripts.py)."""
    if key:
        return f"{prefix}:index:key:{key}"
    if name:
        return f"{prefix}:index:name:{name}"
    return f"{prefix}:index:active" if active else f"{prefix}:index"


def due_key(prefix: str) -> str:
    """The Redis key of the due set (task id -> when a deferred task is sent,
    ms on Redis's clock), which every server's dispatcher reads."""
    return f"{prefix}:due"


def stats_key(prefix: str) -> str:
    """The Redis key of the deployment's counters kept by the scripts
    (hand-overs, supersessions, waits: a hash)."""
    return f"{prefix}:stats"


def leases_key(prefix: str) -> str:
    """The Redis key of the lease set (task id -> deadline, ms on Redis's clock)."""
    return f"{prefix}:leases"


def events_channel(prefix: str) -> str:
    """The pub/sub channel every record change is published on."""
    return f"{prefix}:events"


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a running task says it is (`report_progress`): the record's
    and the client's Task's."""

    current: float
    total: float
    message: str


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a task failed: its exception's type, message and traceback."""

    type: str
    message: str
    traceback: str


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as stored in Redis, decoded."""

    id: str
    name: str
    state: str
    sequence: int
    exclusivity_key: str
    queue: str
    created: float | None
    started: float | None
    finished: float | None
    scheduled: float | None
    worker: str
    has_result: bool
    result: Any
    error: ErrorInfo | None
    progress: Progress | None
    cancel: str
    fencing_token: int = 0
    """Larger than the token of every task claimed under its exclusivity key
    before it; 0 without a key."""
    publishing: bool = False
    """Its Start has not yet confirmed that the broker has the message."""
    waiting_for: str = ""
    """While it waits for its exclusivity key: the task whose end it awaits."""
    fields: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    """The stored fields it was decoded from."""

    @property
    def terminal(self) -> bool:
        """True once the task has ended: its record will not change again."""
        return self.state in TERMINAL_STATES

    def to_json(self) -> str:
        """The record as the scripts publish it (JSON of its hash fields)."""
        return json.dumps(dict(self.fields))

    @classmethod
    def from_json(cls, payload: str) -> TaskRecord:
        """A record from the JSON the scripts return and publish (the same
        JSON, read again, is decoded once)."""
        rec = _DECODED.get(payload)
        if rec is None:
            rec = _DECODED[payload] = cls.from_fields(json.loads(payload))
            if len(_DECODED) > DECODED_KEPT:
                _DECODED.pop(next(iter(_DECODED)))
        return rec

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> TaskRecord:
        """The record of a task's hash fields, as Redis holds them."""

        def number(name: str) -> float | None:
            value = fields.get(name)
            return float(value) if value else None

        error = None
        has_result, result = "result" in fields, None
        if has_result:
            try:
                result = json.loads(fields["result"])
            except (ValueError, RecursionError):
                # Not written by a current worker; still readable, never INTERNAL.
                has_result = False
                error = ErrorInfo("ResultNotRepresentable", "the stored result is not JSON", "")
        if "error_type" in fields:
            error = ErrorInfo(
                type=fields["error_type"],
                message=fields.get("error_message", ""),
                traceback=fields.get("traceback", ""),
            )
        progress = None
        if "progress" in fields:
            raw = json.loads(fields["progress"])
            progress = Progress(
                current=float(raw.get("current", 0)),
                total=float(raw.get("total", 0)),
                message=str(raw.get("message", "")),
            )
        return cls(
            id=fields["id"],
            name=fields.get("name", ""),
            state=fields["state"],
            sequence=int(fields.get("seq", "0")),
            exclusivity_key=fields.get("key", ""),
            queue=fields.get("queue", ""),
            created=number("created"),
            started=number("started"),
            finished=number("finished"),
            scheduled=number("scheduled"),
            worker=fields.get("worker", ""),
            has_result=has_result,
            result=result,
            error=error,
            progress=progress,
            cancel=fields.get("cancel", ""),
            fencing_token=int(fields.get("fence", "0")),
            publishing="publishing" in fields,
            waiting_for=fields.get("waiting_for", ""),
            fields=fields,
        )


DECODED_KEPT = 1024
_DECODED: dict[str, TaskRecord] = {}


def new_record_fields(
    task_id: str,
    name: str,
    *,
    exclusivity_key: str,
    queue: str,
    scheduled: float | None,
) -> dict[str, str]:
    """The fields of a freshly accepted task (state PENDING, sequence 1)."""
    fields = {
        "id": task_id,
        "name": name,
        "state": PENDING,
        "seq": "1",
        "created": repr(time.time()),
        "queue": queue,
    }
    if exclusivity_key:
        fields["key"] = exclusivity_key
    if scheduled is not None:
        fields["scheduled"] = repr(scheduled)
    return fields
