"""Every Lua script that changes a task record (and the few that read several
keys in one step), and its contract.

The Lua lives in taskservice/core/lua/ (package data), one file per script,
each run after the shared `prelude.lua` (who may hold an exclusivity key,
when a lease counts as lapsed, what ends a task). Each script has one method
of `Scripts` here that builds its KEYS and ARGV and one parser that turns its
reply into a typed result (`Held(holder)`, `Claimed()`...): a `Call` carries
both, and whoever runs it (the server's redis.asyncio link, the worker's
redis-py client) returns `call.parse(reply)`. No reply is read by position
anywhere else. `tests/unit/test_scripts.py` checks each script's refusals
against a real Redis; .ci/lint runs luacheck over each file.

Time comes from Redis (`TIME`), so lease deadlines do not depend on the
clocks of servers and workers. Each script reads ARGV[1] (key prefix) and
ARGV[2] (record TTL, seconds) first; the rest is per script (each file's
header says what).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Generic, TypeVar

import redis.exceptions

from taskservice.core import record
from taskservice.core.record import TaskRecord

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Script:
    """A script's name (its file) and its source, prelude included."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


@cache
def script(name: str) -> Script:
    """The script of taskservice/core/lua/<name>.lua, after the prelude."""
    folder = resources.files("taskservice.core") / "lua"
    prelude = (folder / "prelude.lua").read_text()
    # The prelude keeps a copy of LOG_LENGTH for Lua; it must be this one.
    if f"local LOG_LENGTH = {record.LOG_LENGTH}\n" not in prelude:
        raise RuntimeError(f"lua/prelude.lua: LOG_LENGTH must be {record.LOG_LENGTH}")
    return Script(name, prelude + "\n" + (folder / f"{name}.lua").read_text())


NAMES = (
    "claim",
    "confirm",
    "abandon",
    "start",
    "transition",
    "cancel",
    "read",
    "renew",
    "release",
    "sweep",
    "list",
    "remember",
    "orphan",
    "due",
    "sent",
    "unacked",
    "unvouched",
)
"""Every script, by the name of its file."""


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One script run: the script, its KEYS and ARGV, and the parser of its reply."""

    script: Script
    keys: list[str]
    args: list[str]
    parse: Callable[[Any], R]


@dataclass(frozen=True, slots=True)
class Request:
    """A caller's request id (AIP-155), with what it asked for and how long
    the answer is remembered."""

    id: str
    fingerprint: str
    ttl: int


# -- Replies ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """claim: the task is the key's holder now (and its message is on the broker
    list when the claim pushed it)."""

    fencing_token: int = 0
    """Its fencing token, on its record too (0 without an exclusivity key)."""
    superseded: tuple[str, ...] = ()
    """Tasks that waited for the key and ended, superseded by this one."""


@dataclass(frozen=True, slots=True)
class Deferred:
    """claim: accepted, and sent by the scripts and the dispatchers once it may
    run: at its start time, or when its turn for the key comes."""

    fencing_token: int = 0
    """Its fencing token if it holds its key already (0 while it waits)."""
    waiting_for: str = ""
    """The task whose end it waits for; "" if it holds its key (or has none)."""
    superseded: tuple[str, ...] = ()
    """Tasks that waited for the key and ended, superseded by this one."""
    revoke: str = ""
    """REPLACE: the running task asked to stop, to revoke with `revoke_mode`."""
    revoke_mode: str = ""
    record: TaskRecord | None = None
    """The record, when it changed in the claim itself (REPLACE of a queued
    task hands the key over at once); None: as accepted."""


@dataclass(frozen=True, slots=True)
class Quiet:
    """claim: the key is in its quiet period after a task ended."""

    last: TaskRecord | None
    """The task that ended (None if its record expired)."""
    free_in: float
    """Seconds until the key takes Starts again."""


@dataclass(frozen=True, slots=True)
class LineFull:
    """claim: QUEUE, and the key's line of waiting tasks is at its limit."""

    limit: int


@dataclass(frozen=True, slots=True)
class Held:
    """claim: an unfinished task holds the key."""

    holder: TaskRecord


@dataclass(frozen=True, slots=True)
class Repeat:
    """claim: an earlier Start with this request id asked the same; its task."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Reused:
    """claim: an earlier call used this request id for a different request."""


@dataclass(frozen=True, slots=True)
class Missing:
    """The task has no record (never made here, or expired)."""


@dataclass(frozen=True, slots=True)
class Confirmed:
    """confirm: the provisional lease is gone; the task waits in the broker."""


@dataclass(frozen=True, slots=True)
class Moved:
    """confirm, abandon: the task had moved on (a worker started it, a Cancel
    or the sweeper ended it) before this ran; its record now."""

    record: TaskRecord


@dataclass(frozen=True, slots=True)
class Abandoned:
    """abandon: the task ended (it will not run) and its key went back."""

    record: TaskRecord


@dataclass(frozen=True, slots=True)
class Began:
    """start: this execution may run the body (also when its own start was
    retried); the record, now STARTED."""

    record: TaskRecord


@dataclass(frozen=True, slots=True)
class RunningElsewhere:
    """start: another execution runs the task under a live lease."""

    worker: str


@dataclass(frozen=True, slots=True)
class Over:
    """start: the task already ended (cancelled, lost, finished); its state."""

    state: str


@dataclass(frozen=True, slots=True)
class Changed:
    """transition: the change was written; the record now."""

    record: TaskRecord


@dataclass(frozen=True, slots=True)
class Rejected:
    """transition: the task is in none of the allowed states; its state."""

    state: str


@dataclass(frozen=True, slots=True)
class CancelledQueued:
    """cancel: the task was queued and ended REVOKED; it will not run."""

    record: TaskRecord


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """cancel: the task runs; the strongest mode asked for is on its record."""

    record: TaskRecord


@dataclass(frozen=True, slots=True)
class Finished:
    """cancel: the task had already ended; its record."""

    record: TaskRecord


@dataclass(frozen=True, slots=True)
class Expired:
    """A task the sweeper ended because its lease lapsed."""

    task_id: str
    task_name: str
    exclusivity_key: str
    state: str
    """Its record state now: LOST, or REVOKED (its Start never confirmed that
    the broker had it, or a cancel had been asked for)."""
    error_type: str


@dataclass(frozen=True, slots=True)
class Renewed:
    """renew: what the worker must stop or drop (ended LOST, or run by another
    worker), and the ids without a record (not taskservice's, or expired)."""

    gone: list[str]
    unknown: list[str]


@dataclass(frozen=True, slots=True)
class Swept:
    """sweep: the leases looked at, and the tasks ended."""

    seen: int
    expired: list[Expired]


@dataclass(frozen=True, slots=True)
class Due:
    """due: the entries looked at, and the deliveries to publish (task id,
    delivery JSON); each then needs `sent`."""

    seen: int
    handovers: int
    """Keys handed from an ended task to a waiting one so far, deployment-wide."""
    deliveries: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class UnackedPage:
    """unacked: the broker's index entries looked at, and the messages still
    in its hash among them: (delivery tag, kombu's `[message, exchange,
    routing key]` JSON)."""

    seen: int
    messages: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class ListPage:
    """list: the entries found (score, record), and where the scan stopped:
    `more` if the index may hold more past (`score`, `last_id`)."""

    more: bool
    score: str
    last_id: str
    entries: list[tuple[str, TaskRecord]]


def _status(reply: Any) -> tuple[str, str]:
    status, detail = reply
    return str(status), str(detail)


def _claim(reply: Any) -> Claimed | Deferred | Held | Quiet | LineFull | Repeat | Reused:
    status, detail, *more = (str(part) for part in reply)
    if status == "held":
        return Held(TaskRecord.from_json(detail))
    if status == "quiet":
        last = TaskRecord.from_json(detail) if detail else None
        return Quiet(last, max(0, int(more[0])) / 1000)
    if status == "full":
        return LineFull(int(detail))
    if status == "repeat":
        return Repeat(detail)
    if status == "reused":
        return Reused()
    waiting_for, gone, revoke, mode, *changed = more or ("", "", "", "")
    superseded = tuple(gone.split(",")) if gone else ()
    if status == "deferred":
        rec = TaskRecord.from_json(changed[0]) if changed else None
        return Deferred(int(detail or 0), waiting_for, superseded, revoke, mode, rec)
    return Claimed(int(detail or 0), superseded)


def _due(reply: Any) -> Due:
    seen, handovers, *found = reply
    deliveries = [(str(found[n]), str(found[n + 1])) for n in range(0, len(found), 2)]
    return Due(int(seen), int(handovers), deliveries)


def _confirm(reply: Any) -> Confirmed | Moved | Missing:
    status, detail = _status(reply)
    if status == "missing":
        return Missing()
    if status == "moved":
        return Moved(TaskRecord.from_json(detail))
    return Confirmed()


def _abandon(reply: Any) -> Abandoned | Moved | Missing:
    status, detail = _status(reply)
    if status == "missing":
        return Missing()
    if status == "moved":
        return Moved(TaskRecord.from_json(detail))
    return Abandoned(TaskRecord.from_json(detail))


def _orphan(reply: Any) -> Changed | Moved:
    status, detail = _status(reply)
    if status == "exists":
        return Moved(TaskRecord.from_json(detail))
    return Changed(TaskRecord.from_json(detail))


def _start(reply: Any) -> Began | RunningElsewhere | Over | Missing:
    status, detail = _status(reply)
    if status == "started":
        return Began(TaskRecord.from_json(detail))
    if status == "running":
        return RunningElsewhere(detail)
    if status == "ended":
        return Over(detail)
    return Missing()


def _transition(reply: Any) -> Changed | Rejected | Missing:
    status, detail = _status(reply)
    if status == "ok":
        return Changed(TaskRecord.from_json(detail))
    if status == "rejected":
        return Rejected(detail)
    return Missing()


def _cancel(reply: Any) -> CancelledQueued | CancelRequested | Finished | Missing:
    status, detail = _status(reply)
    if status == "missing":
        return Missing()
    rec = TaskRecord.from_json(detail)
    if status == "cancelled":
        return CancelledQueued(rec)
    if status == "requested":
        return CancelRequested(rec)
    return Finished(rec)


def _read(reply: Any) -> TaskRecord | None:
    return None if reply is None else TaskRecord.from_json(reply)


def _renew(reply: Any) -> Renewed:
    gone, unknown = reply
    return Renewed([str(t) for t in gone], [str(t) for t in unknown])


def _count(reply: Any) -> int:
    return int(reply)


def _sweep(reply: Any) -> Swept:
    _, seen, *found = reply
    expired = [
        Expired(*(str(value) for value in found[n : n + 5])) for n in range(0, len(found), 5)
    ]
    return Swept(int(seen), expired)


def _unacked(reply: Any) -> UnackedPage:
    seen, *found = reply
    return UnackedPage(int(seen), list(zip(found[::2], found[1::2], strict=True)))


def _ids(reply: Any) -> list[str]:
    return [str(task_id) for task_id in reply]


def _list(reply: Any) -> ListPage:
    more, score, last, *found = reply
    entries = [
        (str(entry_score), TaskRecord.from_json(payload))
        for entry_score, payload in zip(found[::2], found[1::2], strict=True)
    ]
    return ListPage(bool(int(more)), str(score), str(last), entries)


def _none(reply: Any) -> None:
    return None


# -- Calls -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scripts:
    """Builds the calls of one deployment (key prefix, record TTL)."""

    prefix: str
    ttl: int

    def _call(self, name: str, keys: list[str], parse: Callable[[Any], R], *args: str) -> Call[R]:
        return Call(script(name), keys, [self.prefix, str(self.ttl), *args], parse)

    def _task(self, name: str, task_id: str, parse: Callable[[Any], R], *args: str) -> Call[R]:
        return self._call(name, [record.task_key(self.prefix, task_id)], parse, task_id, *args)

    def claim(
        self,
        fields: Mapping[str, str],
        *,
        exclusivity_key: str,
        provisional_ms: int,
        request: Request | None = None,
        push: tuple[str, str] | None = None,
        policy: str = "REJECT",
        slots: int = 1,
        line_limit: int = 0,
        replace_mode: str = "TERMINATE",
        delivery: str = "",
        delay_ms: int = 0,
    ) -> Call[Claimed | Deferred | Held | Quiet | LineFull | Repeat | Reused]:
        """Make the new task (`fields`) a holder of `exclusivity_key` if one of
        its `slots` is free, with a fencing token above every earlier
        holder's; else do what `policy` (a ConflictPolicy's name) says (see
        claim.lua). With `push` (broker list, message), the message is enqueued
        in the same step (or kept, for a deferred task); without, the claim
        carries a provisional lease until `confirm` (or `abandon`), and a
        deferred task keeps `delivery` for the dispatcher to publish. `delay_ms`:
        the task may run no earlier than this long from now (Redis's clock)."""
        task_id = fields["id"]
        keys = [record.task_key(self.prefix, task_id)]
        if exclusivity_key:
            keys.append(record.holder_key(self.prefix, exclusivity_key))
            keys.append(record.fence_key(self.prefix, exclusivity_key))
        if request is None:
            request_args = ["", "", "0"]
        else:
            request_args = [
                record.request_key(self.prefix, request.id),
                request.fingerprint,
                str(request.ttl),
            ]
        push_args = list(push) if push else ["", ""]
        policy_args = [policy, str(slots), str(line_limit), replace_mode, delivery]
        args = [
            task_id,
            str(provisional_ms),
            *request_args,
            *push_args,
            *policy_args,
            str(delay_ms) if delay_ms > 0 else "",
            exclusivity_key,
            *_pairs(fields),
        ]
        return self._call("claim", keys, _claim, *args)

    def due(self, limit: int, *, retry_ms: int) -> Call[Due]:
        """Send up to `limit` deferred tasks whose time has come; the ones the
        caller must publish (then `sent`), due again `retry_ms` later until then."""
        return self._call("due", [record.due_key(self.prefix)], _due, str(limit), str(retry_ms))

    def sent(self, task_id: str) -> Call[None]:
        """The broker has the deferred task's message (see `due`)."""
        return self._call("sent", [record.due_key(self.prefix)], _none, task_id)

    def confirm(
        self, task_id: str, *, push: tuple[str, str] | None = None
    ) -> Call[Confirmed | Moved | Missing]:
        """The broker has the message: drop the provisional lease. With
        `push` (broker list, message), the message is enqueued now, in the
        same step (a claim that had to reach replicas first pushes here)."""
        return self._task("confirm", task_id, _confirm, *(push or ("", "")))

    def abandon(
        self, task_id: str, message: str, *, withdraw: bool = False
    ) -> Call[Abandoned | Moved | Missing]:
        """Publishing failed: end the task and give its key back. With
        `withdraw`, also a task whose message is in the broker, as long as it
        is queued (a worker that gets it refuses it, ended)."""
        return self._task("abandon", task_id, _abandon, message, "1" if withdraw else "")

    def orphan(self, task_id: str, fields: Mapping[str, str]) -> Call[Changed | Moved]:
        """Record a claimed task whose record Redis lost, with `fields` (ended,
        see orphan.lua): Changed(record) if written, Moved(record) if a record
        exists after all."""
        return self._task("orphan", task_id, _orphan, *_pairs(fields))

    def start(
        self, task_id: str, *, worker: str, run: str, lease_ms: int, when: float
    ) -> Call[Began | RunningElsewhere | Over | Missing]:
        """A worker is about to run the body as execution `run`."""
        return self._task("start", task_id, _start, worker, run, str(lease_ms), repr(when))

    def transition(
        self,
        task_id: str,
        allowed: Iterable[str],
        new_state: str = "",
        fields: Mapping[str, str] | None = None,
    ) -> Call[Changed | Rejected | Missing]:
        """Move a task in one of `allowed` states to `new_state` ("" keeps
        it), writing `fields`."""
        return self._task(
            "transition",
            task_id,
            _transition,
            ",".join(sorted(allowed)),
            new_state,
            *_pairs(fields or {}),
        )

    def cancel(
        self, task_id: str, mode: str, *, when: float
    ) -> Call[CancelledQueued | CancelRequested | Finished | Missing]:
        """Cancel with `mode` (GRACEFUL, TERMINATE or KILL)."""
        return self._task("cancel", task_id, _cancel, mode, repr(when))

    def read(self, task_id: str) -> Call[TaskRecord | None]:
        """The task's record (None if missing), ended LOST first if its lease lapsed."""
        return self._task("read", task_id, _read)

    def renew(
        self, running: Iterable[str], held: Iterable[str], *, worker: str, lease_ms: int
    ) -> Call[Renewed]:
        """Renew the leases of the tasks `worker` runs and holds; which of them
        are no longer its own (to stop or drop) and which have no record. A
        lapsed lease is never renewed: its task ends LOST."""
        running = list(running)
        leases = [record.leases_key(self.prefix)]
        args = [worker, str(lease_ms), str(len(running)), *running, *held]
        return self._call("renew", leases, _renew, *args)

    def release(self, task_ids: Iterable[str]) -> Call[int]:
        """Drop the leases of tasks handed back unstarted; how many were dropped."""
        return self._call("release", [record.leases_key(self.prefix)], _count, *task_ids)

    def remember(self, request: Request, response: str) -> Call[None]:
        """Keep a call's answer under its request id."""
        key = record.request_key(self.prefix, request.id)
        return self._call("remember", [key], _none, request.fingerprint, response, str(request.ttl))

    def sweep(self, limit: int) -> Call[Swept]:
        """End up to `limit` tasks whose lease lapsed."""
        return self._call("sweep", [record.leases_key(self.prefix)], _sweep, str(limit))

    def unacked(
        self, index: str, messages: str, *, age_ms: int, skip: int, limit: int
    ) -> Call[UnackedPage]:
        """Up to `limit` of the broker's unacknowledged messages taken more
        than `age_ms` ago (Redis's clock), oldest first after the first
        `skip`: kombu's Redis transport keeps them in the sorted set `index`
        and the hash `messages` (their full names, its global_keyprefix
        included). Changes nothing."""
        return self._call(
            "unacked", [index, messages], _unacked, str(age_ms), str(skip), str(limit)
        )

    def unvouched(self, task_ids: Iterable[str]) -> Call[list[str]]:
        """Those of `task_ids` that nobody vouches for: QUEUED (PENDING, not
        started) and without a lease. Tasks without a record are never among
        them. Changes nothing."""
        return self._call("unvouched", [record.leases_key(self.prefix)], _ids, *task_ids)

    def list_page(
        self,
        index: str,
        *,
        after: tuple[str, str] | None,
        size: int,
        budget: int,
        states: Iterable[str] = (),
        name: str = "",
        exclusivity_key: str = "",
    ) -> Call[ListPage]:
        """One page of `index` (see record.index_key) after the cursor
        `after` = (score, id) of the previous page's last entry."""
        score, last = after or ("+inf", "")
        wanted = "".join(f",{state}" for state in sorted(states))
        return self._call(
            "list",
            [index],
            _list,
            score,
            last,
            str(size),
            str(budget),
            wanted + "," if wanted else "",
            name,
            exclusivity_key,
        )


def transient(error: BaseException) -> bool:
    """True for the errors a Redis restart or failover causes, which pass by
    themselves (a retry is worth it); False for wrong credentials and the like."""
    return isinstance(
        error,
        (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ReadOnlyError,
            redis.exceptions.TryAgainError,
        ),
    ) and not isinstance(
        error, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)
    )


def _pairs(fields: Mapping[str, str]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, value]
    return flat
