"""The per-task record in Redis: key names, fields and the transition script.

The server creates a record when it accepts a Start; the worker's hooks move
it along (started, progress, finished); Cancel marks it. Every change goes
through one Lua script that bumps the record's sequence number and publishes
the whole record on one channel, so watchers see every change, in order, from
a single subscription per server process.

Record states use Celery's vocabulary (PENDING, STARTED, SUCCESS, FAILURE,
REVOKED): `service.states` maps them to `taskservice.v1.TaskState`.

Keys (each multi-key operation stays inside one hash tag, so Redis Cluster
remains possible):
    <prefix>:task:{<task id>}        HASH   the record
    <prefix>:key:{<exclusivity key>} STRING id of the latest task under the key
    <prefix>:lock:{<exclusivity key>}       the Start lock of the key
    <prefix>:events                  pub/sub channel: "<task id> <record JSON>"
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PENDING = "PENDING"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
ACTIVE_STATES = frozenset({PENDING, STARTED})
TERMINAL_STATES = frozenset({SUCCESS, FAILURE, REVOKED})

CANCEL_MODES = ("GRACEFUL", "TERMINATE", "KILL")


def task_key(prefix: str, task_id: str) -> str:
    return f"{prefix}:task:{{{task_id}}}"


def slot_key(prefix: str, exclusivity_key: str) -> str:
    return f"{prefix}:key:{{{exclusivity_key}}}"


def lock_key(prefix: str, exclusivity_key: str) -> str:
    return f"{prefix}:lock:{{{exclusivity_key}}}"


def events_channel(prefix: str) -> str:
    return f"{prefix}:events"


# KEYS[1] record. ARGV: channel, ttl, allowed states (comma list), new state
# ("" keeps it), then field/value pairs.
# Returns {"ok", record JSON} | {"missing", ""} | {"rejected", current state}.
# A task whose cancel was requested ends REVOKED even if it then succeeds or
# fails: the caller asked for it to stop, and its key must be free.
TRANSITION_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
if string.find(',' .. ARGV[3] .. ',', ',' .. state .. ',', 1, true) == nil then
  return {'rejected', state}
end
local new_state = ARGV[4]
if (new_state == 'SUCCESS' or new_state == 'FAILURE')
    and redis.call('HEXISTS', KEYS[1], 'cancel') == 1 then
  new_state = 'REVOKED'
end
if new_state ~= '' then redis.call('HSET', KEYS[1], 'state', new_state) end
if #ARGV > 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 5)) end
redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
local flat = redis.call('HGETALL', KEYS[1])
local rec = {}
for i = 1, #flat, 2 do rec[flat[i]] = flat[i + 1] end
local payload = cjson.encode(rec)
redis.call('PUBLISH', ARGV[1], rec['id'] .. ' ' .. payload)
return {'ok', payload}
"""


@dataclass(frozen=True, slots=True)
class Progress:
    current: float
    total: float
    message: str


@dataclass(frozen=True, slots=True)
class ErrorInfo:
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

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> TaskRecord:
        def number(name: str) -> float | None:
            value = fields.get(name)
            return float(value) if value else None

        error = None
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
            has_result="result" in fields,
            result=json.loads(fields["result"]) if "result" in fields else None,
            error=error,
            progress=progress,
            cancel=fields.get("cancel", ""),
        )


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


def transition_args(
    channel: str,
    ttl: int,
    allowed: frozenset[str],
    new_state: str,
    fields: Mapping[str, str],
) -> list[str]:
    """ARGV for TRANSITION_LUA."""
    args = [channel, str(ttl), ",".join(sorted(allowed)), new_state]
    for name, value in fields.items():
        args += [name, value]
    return args
