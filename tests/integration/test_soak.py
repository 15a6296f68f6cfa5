"""A randomized fault soak of every conflict policy.

Actors start `test.span` tasks on a few keys (one of them `test.span_two`'s,
two slots) under every policy (REJECT, RETURN_EXISTING, REPLACE in each cancel
mode, QUEUE_LATEST, QUEUE), some with a countdown or start_time, and cancel
some, through two server processes onto two prefork workers, while a fault
loop SIGKILLs a worker (and starts another), SIGKILLs a server (and starts
another on its port), or SIGKILLs Redis and starts it again. A call answered
UNAVAILABLE (or not at all) is sent again with the same request_id, so a task
is *accepted* once a Start answered OK.

After a bounded drain, a checker proves, from the bodies' own timestamps (the
`<id> start|end <time>` lines test.span writes) and the final records:
(a) under a key, never more bodies at once than its slots (a body with no end
    line, killed, counts until its record's end: for LOST, when its lapsed
    lease was swept, later than the body's death);
(b) no task ran a body twice, and none that was superseded, replaced, never
    enqueued or cancelled while queued ran one;
(c) a task that waited for its key started only after the task it waited for
    had ended (two slots: took its slot after the task ahead of it, as the
    fencing tokens say; (a) checks a slot was free), or ended without running
    (cancelled, superseded, LOST); a delayed task never started before its time;
(d) every accepted task ended, none is unknown, and each LOST is explained by
    a fault (its worker was killed, or Redis restarted, within a lease);
(e) no key is wedged: a fresh REJECT Start on each runs, and the keys' holder
    sets and lines, the due set and the lease set are empty at the end.

Redis appends every write to its append-only file before it answers
(appendfsync always), so a write it acknowledged survives its SIGKILL (as in
test_faults' restart test). The file is on tmpfs when there is one: the soak
kills the process, not the machine, so the page cache keeps every write as
surely, and a disk's fsync stalls (up to 0.85 s each, measured on a loaded
two-core machine) cannot starve the workers' lease renewals.
TASKSERVICE_SOAK_SECONDS sets the length of the load (65 s by default; 420
for the long soak), TASKSERVICE_SOAK_SEED its random choices.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, free_port, stop_process_group
from taskservice.core import record
from taskservice.core.record import TaskRecord
from tests.conftest import start_server_process, start_worker
from tests.support.client import TERMINAL, error_info, start_request

# Taken out of the environment: the workers and servers would warn of them.
SOAK_SECONDS = float(os.environ.pop("TASKSERVICE_SOAK_SECONDS", "65"))
FAULT_FREE_TAIL = 6.0
"""Seconds at the end of the load with no fault (see `inflict`)."""
SEED = int(os.environ.pop("TASKSERVICE_SOAK_SEED", "0")) or random.randrange(1, 10**6)

LEASE = 3.0
HEARTBEAT = 0.5
SWEEP = 0.2
DISPATCH = 0.1
LINE_LIMIT = 4
LONGEST_BODY = 0.5
LONGEST_DELAY = 2.0
ACTORS = 6
CALL_TIMEOUT = 8.0
RETRY_FOR = 60.0
"""A call answered nothing but "retry" for this long fails the soak."""

LOST_WITHIN = LEASE + SWEEP + 3
"""How long after a fault a task it explains may end LOST: a lease, a sweep,
and slack for the renewal before the fault and a loaded machine."""

DRAIN_WITHIN = LONGEST_DELAY + LOST_WITHIN + (LINE_LIMIT + 2) * (LONGEST_BODY + 1) + 10
"""How long after the load every accepted task must have ended: the latest
start time, a lapsed lease, and a full line run one after another."""

KEYS = {
    "soak-a": ("test.span", 1),
    "soak-b": ("test.span", 1),
    "soak-c": ("test.span", 1),
    "soak-pair": ("test.span_two", 2),
}
"""Exclusivity key -> (the task type started under it, its slots)."""

POLICIES = [
    pb.CONFLICT_POLICY_REJECT,
    pb.CONFLICT_POLICY_RETURN_EXISTING,
    pb.CONFLICT_POLICY_REPLACE,
    pb.CONFLICT_POLICY_QUEUE_LATEST,
    pb.CONFLICT_POLICY_QUEUE,
]
MODES = [
    pb.CANCEL_MODE_UNSPECIFIED,
    pb.CANCEL_MODE_GRACEFUL,
    pb.CANCEL_MODE_TERMINATE,
    pb.CANCEL_MODE_KILL,
]
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
NEVER_RAN = {"Superseded", "Replaced", record.NOT_ENQUEUED_ERROR}
"""Error types of tasks ended before they could run."""

CHANNEL_OPTIONS = [
    # A restarted server is found again within a fraction of a second, not
    # after gRPC's default reconnect backoff (up to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass(frozen=True, slots=True)
class Accepted:
    """A task a Start answered OK for (not RETURN_EXISTING's holder)."""

    task_id: str
    key: str
    policy: str
    asked: float
    """time.time() before the Start's first attempt."""
    waiting_for: str
    """What the answer said the task waits for ("" if it took a slot)."""


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    """"worker", "server" or "redis"."""
    began: float
    ended: float
    """When Redis answered again (redis); `began` for a SIGKILL."""
    worker: str = ""
    """The killed worker's node name."""
    running: int = 0
    """How many task bodies it was running (as their records said)."""


@dataclass(slots=True)
class Body:
    """What a task's body wrote: when it began and ended (None: killed)."""

    start: float
    end: float | None = None
    starts: int = 1


class Cluster:
    """Two workers and two server processes on one Redis, each of which the
    soak may kill; a killed one is replaced (a server on the same port)."""

    def __init__(self, folder: Path, own: EmbeddedRedis, env: dict[str, str]) -> None:
        self.folder = folder
        self.redis = own
        self.env = env
        self.workers: list[tuple[subprocess.Popen[bytes], str]] = []
        self.servers: list[tuple[subprocess.Popen[bytes], int]] = []
        self.ports: list[int] = []
        self._started = 0

    async def start(self) -> None:
        for _ in range(2):
            await self.add_worker()
        for _ in range(2):
            port = free_port()
            self.ports.append(port)
            await self.add_server(port)

    async def add_worker(self) -> None:
        self._started += 1
        name = f"soak{self._started}-{uuid.uuid4().hex[:4]}"
        process = await asyncio.to_thread(
            start_worker,
            self.folder / f"{name}.log",
            concurrency=3,
            env=self.env,
            name=name,
        )
        self.workers.append((process, name))

    async def add_server(self, port: int) -> None:
        self._started += 1
        log = self.folder / f"server{self._started}-{port}.log"
        process, _ = await asyncio.to_thread(start_server_process, log, self.env, port=port)
        self.servers.append((process, port))

    async def inflict(self, kind: str, rng: random.Random) -> Fault:
        """Do one fault of `kind` and repair it; what happened, when."""
        began = time.time()
        if kind == "worker":
            victim, running = await self.busiest_worker()
            process, name = self.workers.pop(victim)
            began = time.time()
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait)
            await self.add_worker()
            return Fault(kind, began, began, worker=name, running=running)
        if kind == "server":
            server, port = self.servers.pop(rng.randrange(len(self.servers)))
            os.killpg(server.pid, signal.SIGKILL)
            await asyncio.to_thread(server.wait)
            await self.add_server(port)
            return Fault(kind, began, began)
        self.redis.crash()
        await asyncio.sleep(rng.uniform(0.2, 1.5))
        await asyncio.to_thread(self.redis.start)
        return Fault(kind, began, time.time())

    async def busiest_worker(self) -> tuple[int, int]:
        """(index, bodies running) of the worker running the most task
        bodies, waiting up to 2 s for one that runs two (a kill should cut
        some short)."""
        names = [name for _, name in self.workers]
        best = (0, 0)
        client = redis.asyncio.Redis.from_url(
            self.redis.url, decode_responses=True, socket_timeout=1
        )
        prefix = self.env["TASKSERVICE_KEY_PREFIX"]
        try:
            for _ in range(20):
                running: Counter[str] = Counter()
                with contextlib.suppress(redis.RedisError, OSError):
                    active = await client.zrange(record.index_key(prefix, active=True), 0, -1)
                    for task_id in active:
                        state, worker = await client.hmget(  # type: ignore[misc]
                            record.task_key(prefix, task_id), "state", "worker"
                        )
                        if state == record.STARTED and worker:
                            running[worker.split("@")[0]] += 1
                for n, name in enumerate(names):
                    if running[name] > best[1]:
                        best = (n, running[name])
                if best[1] >= 2:
                    break
                await asyncio.sleep(0.1)
        finally:
            await client.aclose()
        return best

    def stop(self) -> None:
        for process, _ in self.workers:
            stop_process_group(process)
        for server, _ in self.servers:
            stop_process_group(server)


class Actors:
    """The clients: Starts under every policy, Cancels, each retried with its
    request_id while the answer is "retry"."""

    def __init__(self, stubs: list[pb_grpc.TaskServiceStub], spans: Path) -> None:
        self.stubs = stubs
        self.spans = spans
        self.accepted: dict[str, Accepted] = {}
        self.order: list[str] = []
        self.outcomes: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.unexpected: list[str] = []

    async def call(self, rng: random.Random, rpc: str, request: Any) -> Any:
        """The answer of `rpc`, or the AioRpcError that is not "retry"."""
        give_up = time.monotonic() + RETRY_FOR
        while True:
            stub = rng.choice(self.stubs)
            try:
                return await getattr(stub, rpc)(request, timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    return error
                self.retries[rpc] += 1
                if time.monotonic() > give_up:
                    raise AssertionError(
                        f"{rpc} answered only {error.code().name} for {RETRY_FOR:g}s: "
                        f"{error.details()}"
                    ) from error
                await asyncio.sleep(rng.uniform(0.05, 0.25))

    async def act(self, rng: random.Random, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.order and rng.random() < 0.12:
                await self.cancel(rng)
            else:
                await self.start(rng)
            await asyncio.sleep(rng.uniform(0.02, 0.25))

    async def start(self, rng: random.Random) -> None:
        key = rng.choice(list(KEYS))
        policy = rng.choice(POLICIES)
        request = start_request(
            KEYS[key][0], key=key, path=str(self.spans), seconds=round(rng.uniform(0, 0.5), 3)
        )
        request.conflict_policy = policy
        request.request_id = str(uuid.uuid4())
        if policy == pb.CONFLICT_POLICY_REPLACE:
            request.replace_mode = rng.choice(MODES)
        roll = rng.random()
        delay_ms = rng.randint(500, int(LONGEST_DELAY * 1000))
        if roll < 0.1:
            request.options.countdown.FromMilliseconds(delay_ms)
        elif roll < 0.2:
            request.options.start_time.FromNanoseconds(time.time_ns() + delay_ms * 10**6)
        asked = time.time()
        answer = await self.call(rng, "Start", request)
        policy_name = pb.ConflictPolicy.Name(policy).removeprefix("CONFLICT_POLICY_")
        if isinstance(answer, grpc.aio.AioRpcError):
            code = answer.code()
            refused = code == grpc.StatusCode.ALREADY_EXISTS and policy_name == "REJECT"
            full = (
                code == grpc.StatusCode.RESOURCE_EXHAUSTED
                and policy_name == "QUEUE"
                and error_info(answer).reason == "KEY_LINE_FULL"
            )
            if refused or full:
                self.outcomes[f"refused {code.name}"] += 1
            else:
                self.unexpected.append(f"Start {policy_name}: {code.name} {answer.details()}")
            return
        task = answer.task
        if answer.already_existed:
            if policy_name != "RETURN_EXISTING":
                self.unexpected.append(f"Start {policy_name} answered an existing task {task.id}")
            self.outcomes["returned existing"] += 1
            return
        self.outcomes[f"accepted {policy_name}"] += 1
        self.accepted[task.id] = Accepted(task.id, key, policy_name, asked, task.waiting_for)
        self.order.append(task.id)

    async def cancel(self, rng: random.Random) -> None:
        task_id = rng.choice(self.order[-20:])
        request = pb.CancelRequest(
            task_id=task_id, mode=rng.choice(MODES), request_id=str(uuid.uuid4())
        )
        answer = await self.call(rng, "Cancel", request)
        if not isinstance(answer, grpc.aio.AioRpcError):
            self.outcomes["cancel answered"] += 1
        elif answer.code() == grpc.StatusCode.FAILED_PRECONDITION:
            self.outcomes["cancel of an ended task"] += 1
        else:
            self.unexpected.append(f"Cancel: {answer.code().name} {answer.details()}")

    async def drain(self, rng: random.Random, within: float) -> dict[str, pb.Task]:
        """Every accepted task once it ended, read through the servers."""
        ended: dict[str, pb.Task] = {}
        last: dict[str, pb.Task] = {}
        deadline = time.monotonic() + within
        while True:
            for task_id in sorted(self.accepted.keys() - ended.keys()):
                answer = await self.call(rng, "GetStatus", _get(task_id))
                if isinstance(answer, grpc.aio.AioRpcError):
                    self.unexpected.append(f"GetStatus {task_id}: {answer.code().name}")
                    ended[task_id] = pb.Task(id=task_id)  # unknown: not waited for again
                elif answer.task.state in TERMINAL:
                    ended[task_id] = answer.task
                else:
                    last[task_id] = answer.task
            waiting = self.accepted.keys() - ended.keys()
            if not waiting:
                return ended
            if time.monotonic() > deadline:
                stuck = [f"{last[t].id} {pb.TaskState.Name(last[t].state)}" for t in waiting]
                raise AssertionError(
                    f"{len(waiting)} accepted tasks had not ended {within:g}s after the load: "
                    + ", ".join(sorted(stuck)[:10])
                )
            await asyncio.sleep(0.5)


def _get(task_id: str) -> pb.GetStatusRequest:
    return pb.GetStatusRequest(task_id=task_id)


def read_bodies(path: Path) -> dict[str, Body]:
    """Each body's start and end as it wrote them (test.span)."""
    bodies: dict[str, Body] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        task_id, what, when = line.split()
        body = bodies.get(task_id)
        if what == "start":
            if body is None:
                bodies[task_id] = Body(float(when))
            else:
                body.starts += 1
        else:
            assert body is not None, f"an end line before its start: {line}"
            body.end = float(when)
    return bodies


async def read_records(url: str, prefix: str) -> dict[str, TaskRecord]:
    """Every task record of the soak, straight from Redis."""
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        found = {}
        async for name in client.scan_iter(record.task_key(prefix, "*"), count=1000):
            fields: dict[str, str] = await client.hgetall(name)  # type: ignore[misc]
            found[fields["id"]] = TaskRecord.from_fields(fields)
        return found
    finally:
        await client.aclose()


@dataclass(slots=True)
class Checker:
    """The guarantees, checked after the drain; `violations` says what broke."""

    accepted: dict[str, Accepted]
    records: dict[str, TaskRecord]
    bodies: dict[str, Body]
    faults: list[Fault]
    violations: list[str] = field(default_factory=list)
    overlaps: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    waits_checked: int = 0
    """Tasks that waited for their key, then ran: each checked by (c)."""

    def check(self) -> None:
        self.bodies_have_records()
        for key, (_, slots) in KEYS.items():
            self.overlaps[key] = self.most_at_once(key, slots)
        self.never_ran()
        self.waited()
        self.nothing_lost()

    def fail(self, text: str) -> None:
        self.violations.append(text)

    def end_of(self, task_id: str) -> float | None:
        """When the task's body ended: its end line, else (killed, or never
        ran) its record's end, which comes later."""
        body = self.bodies.get(task_id)
        if body is not None and body.end is not None:
            return body.end
        rec = self.records.get(task_id)
        return rec.finished if rec is not None else None

    def bodies_have_records(self) -> None:
        for task_id, body in self.bodies.items():
            rec = self.records.get(task_id)
            if rec is None:
                self.fail(f"(b) a body of {task_id} ran, and it has no record")
            elif rec.started is None or rec.started > body.start:
                self.fail(f"(b) the body of {task_id} began ({body.start}) unrecorded: {rec}")
            if body.starts > 1:
                self.fail(f"(b) the body of {task_id} ran {body.starts} times")
            if rec is not None and not rec.fencing_token:
                self.fail(f"(a) {task_id} ran without ever taking a slot of its key: {rec}")

    def most_at_once(self, key: str, slots: int) -> int:
        """(a): the most bodies that ran at once under `key`."""
        events: list[tuple[float, int, str]] = []
        for task_id, body in self.bodies.items():
            rec = self.records.get(task_id)
            if rec is None or rec.exclusivity_key != key:
                continue
            end = self.end_of(task_id)
            if end is None:
                self.fail(f"(a) the body of {task_id} has no end, nor its record")
                continue
            # An end sorts before a start at the same instant: one after the other.
            events += [(body.start, 1, task_id), (end, 0, task_id)]
        running: set[str] = set()
        most = 0
        for _, starts, task_id in sorted(events):
            if not starts:
                running.discard(task_id)
                continue
            running.add(task_id)
            most = max(most, len(running))
            if len(running) > slots:
                at_once = ", ".join(
                    f"{t} [{self.bodies[t].start:.3f}, {self.end_of(t):.3f}] "
                    f"{self.records[t].state}"
                    for t in sorted(running)
                )
                self.fail(f"(a) {len(running)} bodies at once under {key!r} ({slots}): {at_once}")
        return most

    def never_ran(self) -> None:
        """(b): tasks ended before they could run have no body."""
        for task_id, rec in self.records.items():
            kind = rec.error.type if rec.error else ""
            unstarted_cancel = rec.state == record.REVOKED and rec.started is None
            if (kind in NEVER_RAN or unstarted_cancel) and task_id in self.bodies:
                self.fail(f"(b) {task_id} ran although it ended {rec.state} {kind!r}: {rec}")

    def waited(self) -> None:
        """(c): a waiting task ran after what it waited for; a delayed one not early."""
        for task_id, body in self.bodies.items():
            rec = self.records.get(task_id)
            # A scheduled time is the server's clock; the due set, Redis's.
            if rec is not None and rec.scheduled is not None and body.start < rec.scheduled - 0.05:
                self.fail(f"(c) {task_id} ran at {body.start}, before its time: {rec}")
        for task in self.accepted.values():
            rec = self.records.get(task.task_id)
            body = self.bodies.get(task.task_id)
            if rec is None or not task.waiting_for:
                continue  # no record: (d) says so
            if body is None:
                if rec.state not in (record.REVOKED, record.LOST):
                    self.fail(f"(c) {task.task_id} waited and ended {rec.state} without running")
                continue
            self.waits_checked += 1
            # Its turn came after what it waited for took a slot (the line is
            # first come, first served): fencing tokens grow with each claim.
            ahead = self.records.get(task.waiting_for)
            if ahead is not None and ahead.fencing_token >= rec.fencing_token:
                self.fail(f"(c) {task.task_id} took a slot before {ahead.id}, which was ahead")
            if KEYS[task.key][1] > 1:
                # With two slots, the other holder's end may not be what let
                # it run; (a) checks that a slot was free when it began.
                continue
            end = self.end_of(task.waiting_for)
            if end is None or body.start < end:
                self.fail(
                    f"(c) {task.task_id} began at {body.start:.3f}, before "
                    f"{task.waiting_for}, which it waited for, ended ({end})"
                )

    def nothing_lost(self) -> None:
        """(d): every accepted task has a record, every record ended, LOST has a cause."""
        for task_id in self.accepted:
            if task_id not in self.records:
                self.fail(f"(d) accepted task {task_id} has no record")
        for task_id, rec in self.records.items():
            if not rec.terminal:
                self.fail(f"(d) {task_id} never ended: {rec}")
            elif rec.state == record.LOST:
                self.lost += 1
                if not self.explained(rec):
                    self.fail(f"(d) {task_id} ended LOST, and no fault explains it: {rec}")

    def explained(self, rec: TaskRecord) -> bool:
        end = rec.finished or 0
        for fault in self.faults:
            if not fault.began <= end <= fault.ended + LOST_WITHIN:
                continue
            if fault.kind == "redis":
                return True  # its worker could not renew the lease in time
            ran_there = rec.worker.split("@")[0] == fault.worker
            if fault.kind == "worker" and (ran_there or rec.started is None):
                return True
        return False


async def no_key_wedged(
    actors: Actors, rng: random.Random, url: str, prefix: str, spans: Path
) -> list[str]:
    """(e): a fresh REJECT Start runs on every key; then nothing holds or waits."""
    problems = []
    fresh = []
    for key, (name, _) in KEYS.items():
        request = start_request(name, key=key, path=str(spans))
        request.request_id = str(uuid.uuid4())
        answer = await actors.call(rng, "Start", request)
        if isinstance(answer, grpc.aio.AioRpcError):
            problems.append(f"(e) {key!r} refused a fresh Start: {answer.code().name}")
        else:
            fresh.append(answer.task.id)
    for task_id in fresh:
        deadline = time.monotonic() + 30
        while True:
            task = (await actors.call(rng, "GetStatus", _get(task_id))).task
            if task.state in TERMINAL:
                if task.state != pb.TASK_STATE_SUCCEEDED:
                    problems.append(f"(e) the fresh {task_id} ended {task.state}")
                break
            if time.monotonic() > deadline:
                problems.append(f"(e) the fresh {task_id} never ended")
                break
            await asyncio.sleep(0.1)
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        for key in KEYS:
            for kind in ("holders", "line"):
                name = f"{prefix}:{kind}:{{{key}}}"
                if await client.exists(name):
                    problems.append(f"(e) {name} is left: {await client.dump(name)!r}")
        for name in (record.due_key(prefix), record.leases_key(prefix)):
            left = await client.zrange(name, 0, -1)
            if left:
                problems.append(f"(e) {name} still has {left}")
    finally:
        await client.aclose()
    return problems


def summarize(loaded: float, actors: Actors, ended: dict[str, pb.Task], checker: Checker) -> str:
    """The soak's figures, on one line."""
    starts = {k: v for k, v in actors.outcomes.items() if not k.startswith("cancel")}
    cancels = sum(actors.outcomes.values()) - sum(starts.values())
    states = (pb.TaskState.Name(t.state).removeprefix("TASK_STATE_") for t in ended.values())
    errors = [t.error.type for t in ended.values() if t.HasField("error")]
    cut_short = (
        f"{rec.state}/{rec.error.type if rec.error else ''}"
        for t, body in checker.bodies.items()
        if body.end is None and (rec := checker.records.get(t)) is not None
    )
    overlaps = " ".join(f"{k}={n}/{KEYS[k][1]}" for k, n in checker.overlaps.items())
    return (
        f"soak seed={SEED} load={loaded:.0f}s: starts={sum(starts.values())} "
        f"[{tally(Counter(starts).elements())}] "
        f"cancels={cancels} "
        f"accepted={len(actors.accepted)} ran={len(checker.bodies)} "
        f"waited={sum(1 for a in actors.accepted.values() if a.waiting_for)} "
        f"(then ran={checker.waits_checked}) "
        f"superseded={errors.count('Superseded')} replaced={errors.count('Replaced')} "
        f"ended[{tally(states)}] "
        f"cut_short[{tally(cut_short)}] faults[{tally(f.kind for f in checker.faults)}] "
        f"bodies_on_killed_workers={sum(f.running for f in checker.faults)} "
        f"max_overlap[{overlaps}] LOST={checker.lost} "
        f"retried[{tally(actors.retries.elements())}]"
    )


def tally(items: Iterable[str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(Counter(items).items())) or "none"


@pytest.mark.timeout(SOAK_SECONDS + 360)
async def test_every_policy_keeps_its_guarantees_while_workers_servers_and_redis_are_killed(
    tmp_path: Path,
) -> None:
    shm = Path("/dev/shm")
    data = Path(
        tempfile.mkdtemp(prefix="soak-redis-", dir=shm if os.access(shm, os.W_OK) else None)
    )
    own = EmbeddedRedis(args=("--appendonly", "yes", "--appendfsync", "always"), directory=data)
    own.start()
    prefix = f"soak-{uuid.uuid4().hex[:6]}"
    env = {
        "TASKSERVICE_REDIS_URL": own.url,
        "TASKSERVICE_KEY_PREFIX": prefix,
        "TASKSERVICE_LEASE": str(LEASE),
        "TASKSERVICE_HEARTBEAT_INTERVAL": str(HEARTBEAT),
        "TASKSERVICE_SWEEP_INTERVAL": str(SWEEP),
        "TASKSERVICE_DISPATCH_INTERVAL": str(DISPATCH),
        "TASKSERVICE_KEY_LINE_LIMIT": str(LINE_LIMIT),
        "TASKSERVICE_REDIS_TIMEOUT": "0.5",
        "TASKSERVICE_HEALTH_INTERVAL": "0.2",
        "TASKSERVICE_CANCEL_WAIT": "2",
    }
    spans = tmp_path / "spans"
    cluster = Cluster(tmp_path, own, env)
    rng = random.Random(SEED)
    faults: list[Fault] = []
    try:
        await cluster.start()
        async with contextlib.AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(
                    grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
                )
                for port in cluster.ports
            ]
            actors = Actors([pb_grpc.TaskServiceStub(c) for c in channels], spans)
            stop = asyncio.Event()

            async def inflict() -> None:
                kinds: list[str] = []
                # No fault in the load's last seconds: a worker killed within a
                # moment of taking a task leaves it QUEUED (the known gap that
                # test_leases.py keeps as an expected failure); during the load a
                # REPLACE or Cancel soon ends such a task, at its very end nothing
                # would, and the drain would report that gap instead of the policies.
                quiet_from = time.monotonic() + SOAK_SECONDS - FAULT_FREE_TAIL
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), rng.uniform(3, 6))
                        return
                    if time.monotonic() >= quiet_from:
                        await stop.wait()
                        return
                    if not kinds:  # every kind, in a random order, again and again
                        kinds = ["worker", "server", "redis"]
                        rng.shuffle(kinds)
                    faults.append(await cluster.inflict(kinds.pop(), rng))

            began, started = time.monotonic(), time.time()
            running = [
                asyncio.create_task(actors.act(random.Random(SEED + n), stop))
                for n in range(1, ACTORS + 1)
            ]
            running.append(asyncio.create_task(inflict()))
            await asyncio.sleep(SOAK_SECONDS)
            stop.set()
            await asyncio.gather(*running)
            loaded = time.monotonic() - began

            ended = await actors.drain(rng, DRAIN_WITHIN)
            records = await read_records(own.url, prefix)
            checker = Checker(actors.accepted, records, read_bodies(spans), faults)
            checker.check()
            wedged = await no_key_wedged(actors, rng, own.url, prefix, spans)

        summary = summarize(loaded, actors, ended, checker)
        print(summary)
        problems = actors.unexpected + checker.violations + wedged
        timeline = " ".join(f"{f.kind}@{f.began - started:.1f}s" for f in faults)
        assert not problems, f"{summary}\nfaults: {timeline}\n" + "\n".join(problems[:30])
        kinds = {f.kind for f in faults}
        assert kinds == {"worker", "server", "redis"}, f"only {kinds} in {loaded:.0f}s of load"
        assert all(n <= KEYS[k][1] for k, n in checker.overlaps.items()), summary
    finally:
        cluster.stop()
        own.stop()
        shutil.rmtree(data, ignore_errors=True)


def _record(
    task_id: str,
    key: str,
    state: str,
    *,
    started: float | None = None,
    finished: float | None = None,
    error: str = "",
    fence: int = 0,
    worker: str = "",
    scheduled: float | None = None,
) -> TaskRecord:
    fields = {"id": task_id, "name": KEYS[key][0], "state": state, "key": key}
    for name, value in (
        ("started", started),
        ("finished", finished),
        ("scheduled", scheduled),
        ("error_type", error),
        ("fence", fence),
        ("worker", worker),
    ):
        if value:
            fields[name] = str(value)
    return TaskRecord.from_fields(fields)


def test_the_checker_finds_each_broken_guarantee_and_passes_a_sound_history() -> None:
    """The soak proves something only if its checker fails on a broken history."""
    t = 1000.0
    sound = [
        _record("ok1", "soak-a", "SUCCESS", started=t, finished=t + 1.1, fence=1),
        # Waited for ok1, started once its body ended.
        _record("ok2", "soak-a", "SUCCESS", started=t + 1.2, finished=t + 2.1, fence=2),
        # Killed with its worker at t + 3: LOST when its lease lapsed.
        _record("ok3", "soak-b", "LOST", started=t + 2, finished=t + 6, fence=3, worker="w1@h"),
        _record("ok4", "soak-b", "REVOKED", finished=t + 2.5, error="Superseded"),
        _record("ok5", "soak-pair", "SUCCESS", started=t, finished=t + 2, fence=4),
        _record("ok6", "soak-pair", "SUCCESS", started=t, finished=t + 2, fence=5),
        # Waited for a slot; ok5's end let it run.
        _record("ok7", "soak-pair", "SUCCESS", started=t + 2.5, finished=t + 3, fence=6),
    ]
    bodies = {
        "ok1": Body(t + 0.1, t + 1.0),
        "ok2": Body(t + 1.2, t + 2.0),
        "ok3": Body(t + 2.1),
        "ok5": Body(t + 0.1, t + 1.9),
        "ok6": Body(t + 0.1, t + 1.9),
        "ok7": Body(t + 2.5, t + 2.9),
    }
    accepted = {
        "ok2": Accepted("ok2", "soak-a", "QUEUE", t + 0.5, waiting_for="ok1"),
        "ok4": Accepted("ok4", "soak-b", "QUEUE_LATEST", t + 2.2, waiting_for="ok3"),
        "ok7": Accepted("ok7", "soak-pair", "QUEUE", t + 1, waiting_for="ok6"),
    }
    faults = [Fault("worker", t + 3, t + 3, worker="w1")]
    clean = Checker(accepted, {r.id: r for r in sound}, bodies, faults)
    clean.check()
    assert clean.violations == []
    assert clean.overlaps == {"soak-a": 1, "soak-b": 1, "soak-c": 0, "soak-pair": 2}
    assert (clean.lost, clean.waits_checked) == (1, 2)

    broken = [
        # (a) a second body under a one-slot key while the first ran.
        _record("a1", "soak-c", "SUCCESS", started=t + 10.5, finished=t + 11.1, fence=7),
        # (a) a third body under the two-slot key.
        _record("a2", "soak-pair", "SUCCESS", started=t + 1, finished=t + 1.5, fence=8),
        # (b) a superseded task whose body ran.
        _record("b1", "soak-b", "REVOKED", started=t + 7, finished=t + 7.5, error="Superseded"),
        # (c) began before the task it waited for ended (cancelled while queued).
        _record("c1", "soak-c", "REVOKED", finished=t + 9),
        _record("c2", "soak-c", "SUCCESS", started=t + 8, finished=t + 8.5, fence=9),
        # (c) a delayed task that began before its time.
        _record("c3", "soak-c", "SUCCESS", started=t + 10, finished=t + 11, scheduled=t + 11),
        # (d) never ended; ended LOST with no fault near.
        _record("d1", "soak-a", "PENDING", fence=10),
        _record("d2", "soak-a", "LOST", started=t + 20, finished=t + 30, fence=11, worker="w2@h"),
    ]
    bodies |= {
        "a1": Body(t + 10.5, t + 11.0),
        "a2": Body(t + 1, t + 1.4),
        "b1": Body(t + 7, t + 7.4),
        "c2": Body(t + 8, t + 8.4),
        "c3": Body(t + 10, t + 10.9),
        "d2": Body(t + 20),
    }
    broken += [
        # (c) took a slot of the two-slot key before the task ahead of it.
        _record("c4", "soak-pair", "SUCCESS", started=t + 5, finished=t + 5.5, fence=12),
        _record("c5", "soak-pair", "SUCCESS", started=t + 6, finished=t + 6.5, fence=13),
    ]
    bodies |= {"c4": Body(t + 5, t + 5.4), "c5": Body(t + 6, t + 6.4)}
    accepted |= {
        "c2": Accepted("c2", "soak-c", "QUEUE", t + 7, waiting_for="c1"),
        "c4": Accepted("c4", "soak-pair", "QUEUE", t + 4, waiting_for="c5"),
    }
    checker = Checker(accepted, {r.id: r for r in sound + broken}, bodies, faults)
    checker.check()
    found = {v[:3] + v.split(" ")[1] for v in checker.violations}
    assert {"(a)2", "(a)3", "(b)b1", "(c)c2", "(c)c3", "(d)d1", "(d)d2"} <= found, (
        checker.violations
    )
