"""A Redis failover under load: the master is killed with SIGKILL and the
sentinels promote its replica, while Starts keep coming.

One master, one replica and three sentinels on loopback
(tests.support.sentinels); a server of this process and a prefork worker
subprocess, both told only where the sentinels are (their redis_url points at
a port where nothing listens, so nothing can reach Redis another way). Starts
run under a few exclusivity keys; each task body appends its own start and
end to a file, so what ran, and when, is known whatever Redis remembers. After
the sentinels name the new master, the killed server comes back as its
replica (as an orchestrator brings a failed node back), so that writes can
reach a replica again.

Whatever the setting, during the switch a Start answers OK, ALREADY_EXISTS or
UNAVAILABLE, never anything else; the server and the worker follow the new
master by themselves; a watch opened before the kill ends with the task's
terminal state (resuming after an UNAVAILABLE). With
TASKSERVICE_REDIS_MIN_REPLICAS=1 no accepted task is lost and no key runs two
bodies at once, by the bodies' own timestamps; with 0 the test reports what
was lost instead (replication is asynchronous).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, free_port, stop_process_group
from taskservice.core.settings import Settings
from taskservice.server.server import create_server
from tests.conftest import serving, start_worker
from tests.support.client import TERMINAL, error_info, start_request
from tests.support.sentinels import MASTER_NAME, SentinelSet, online_replicas

KEYS = 4
REPLICALESS = 1.5
"""Seconds between the switch and the failed node's return as a replica."""
BODY_SECONDS = 0.3
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAVAILABLE}


@pytest.fixture
def sentinels(redis_server: EmbeddedRedis) -> Iterator[SentinelSet]:
    # After the session's Redis: its port is chosen early but bound only then,
    # and these servers pick free ports too.
    cluster = SentinelSet().start()
    try:
        yield cluster
    finally:
        cluster.stop()


def environment(cluster: SentinelSet, min_replicas: int) -> dict[str, str]:
    return {
        # Nothing listens there: every part must go through the sentinels.
        "TASKSERVICE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "TASKSERVICE_REDIS_SENTINELS": cluster.addresses,
        "TASKSERVICE_REDIS_SENTINEL_MASTER": MASTER_NAME,
        "TASKSERVICE_REDIS_MIN_REPLICAS": str(min_replicas),
        "TASKSERVICE_REDIS_MIN_REPLICAS_TIMEOUT": "0.5",
        "TASKSERVICE_REDIS_TIMEOUT": "1",
        "TASKSERVICE_KEY_PREFIX": f"failover-{uuid.uuid4().hex[:6]}",
        # Longer than a failover takes (about 2 s here), as the README asks.
        "TASKSERVICE_LEASE": "8",
        "TASKSERVICE_HEARTBEAT_INTERVAL": "1",
        "TASKSERVICE_WORKER_WRITE_RETRY": "30",
    }


@dataclass
class Answer:
    """One Start's answer."""

    tag: str
    sent: float
    answered: float
    code: grpc.StatusCode
    reason: str = ""
    task_id: str = ""


@dataclass
class Run:
    """What a failover run saw."""

    answers: list[Answer] = field(default_factory=list)
    watched: list[int] = field(default_factory=list)
    """The states a watch opened before the kill received, in order."""
    resumes: int = 0


async def load(stub: pb_grpc.TaskServiceStub, tag: str, stamps: Path, stop: asyncio.Event,
               run: Run) -> None:  # fmt: skip
    """Start tasks under the exclusivity key `tag`, one after another, until told to stop."""
    while not stop.is_set():
        request = start_request(
            "test.stamp", key=tag, path=str(stamps), tag=tag, seconds=BODY_SECONDS
        )
        sent = time.monotonic()
        try:
            response = await stub.Start(request, timeout=15)
        except grpc.aio.AioRpcError as error:
            reason = error_info(error).reason if error.code() in ALLOWED else error.details()
            run.answers.append(Answer(tag, sent, time.monotonic(), error.code(), reason or ""))
            await asyncio.sleep(0.05)
            continue
        run.answers.append(
            Answer(tag, sent, time.monotonic(), grpc.StatusCode.OK, task_id=response.task.id)
        )


async def watch_to_the_end(stub: pb_grpc.TaskServiceStub, task_id: str, run: Run) -> None:
    """Follow a task to its terminal state, resuming after the last sequence
    received whenever the stream ends UNAVAILABLE."""
    after = 0
    while True:
        request = pb.WatchStatusRequest(task_id=task_id, after_sequence=after)
        try:
            async for message in stub.WatchStatus(request, timeout=60):
                run.watched.append(message.task.state)
                after = message.task.sequence
                if message.task.state in TERMINAL:
                    return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            run.resumes += 1
            await asyncio.sleep(0.1)


async def final_state(stub: pb_grpc.TaskServiceStub, task_id: str) -> str:
    """The task's terminal state once it has one; NOT_FOUND if Redis lost it."""
    deadline = time.monotonic() + 40
    while True:
        try:
            task = (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id), timeout=5)).task
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return "NOT_FOUND"
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        else:
            if task.state in TERMINAL:
                return pb.TaskState.Name(task.state)
        assert time.monotonic() < deadline, f"task {task_id} did not end"
        await asyncio.sleep(0.1)


def read_stamps(path: Path) -> dict[str, dict[str, float]]:
    """task id -> {"start": t, "end": t, "starts": count, "tag": key} from the bodies' lines."""
    bodies: dict[str, dict[str, float]] = defaultdict(lambda: {"starts": 0})
    tags: dict[str, str] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        entry = json.loads(line)
        body = bodies[entry["id"]]
        body[entry["event"]] = entry["t"]
        tags[entry["id"]] = entry["tag"]
        if entry["event"] == "start":
            body["starts"] += 1
    return {task_id: {**body, "tag": tags[task_id]} for task_id, body in bodies.items()}  # type: ignore[dict-item]


def overlaps(bodies: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
    """Pairs of bodies that ran at the same time under one key."""
    by_key: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for task_id, body in bodies.items():
        by_key[str(body["tag"])].append((body["start"], body.get("end", float("inf")), task_id))
    found = []
    for runs in by_key.values():
        runs.sort()
        latest_end, latest = float("-inf"), ""
        for start, end, task_id in runs:
            if start < latest_end:
                found.append((latest, task_id))
            if end > latest_end:
                latest_end, latest = end, task_id
    return found


@pytest.mark.timeout(90, func_only=False)  # each variant runs in ~20 s
@pytest.mark.parametrize("min_replicas", [0, 1])
async def test_a_failover_under_load_answers_only_ok_conflict_or_unavailable_and_recovers(
    sentinels: SentinelSet, tmp_path: Path, min_replicas: int
) -> None:
    env = environment(sentinels, min_replicas)
    settings = Settings(
        **{name[len("TASKSERVICE_") :].lower(): value for name, value in env.items()}
    )
    stamps = tmp_path / "stamps.jsonl"
    worker = start_worker(tmp_path / "worker.log", concurrency=KEYS + 1, env=env)
    running = await create_server(settings, port=0)
    run = Run()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            report = await fail_over(stub, sentinels, stamps, run)
    finally:
        await running.stop(0)
        stop_process_group(worker)
    print(f"\nmin_replicas={min_replicas}: {json.dumps(report, indent=1)}")

    codes = Counter(answer.code for answer in run.answers)
    assert set(codes) <= ALLOWED, (
        f"answers: {codes}, {[a for a in run.answers if a.code not in ALLOWED]}"
    )
    # Both the server and the worker followed the new master by themselves:
    # Starts sent after the failover were accepted, and their tasks ran.
    assert report["accepted after the kill"] > 0
    assert report["accepted after the kill, not succeeded"] == []
    assert run.watched and run.watched[-1] in TERMINAL, f"the watch saw {run.watched}"
    if min_replicas:
        assert report["lost (accepted, no body ran)"] == []
        assert report["accepted, not succeeded"] == []
        assert report["bodies run twice"] == [] and report["overlaps under a key"] == []
        assert run.watched[-1] == pb.TASK_STATE_SUCCEEDED


async def fail_over(
    stub: pb_grpc.TaskServiceStub, cluster: SentinelSet, stamps: Path, run: Run
) -> dict[str, object]:
    """Load, the kill, the switch, the end of every accepted task; a report."""
    watched = (await stub.Start(start_request(
        "test.stamp", key="watched", path=str(stamps), tag="watched", seconds=4.0
    ), timeout=15)).task.id  # fmt: skip
    watcher = asyncio.create_task(watch_to_the_end(stub, watched, run))
    stop = asyncio.Event()
    loaders = [asyncio.create_task(load(stub, f"key-{n}", stamps, stop, run)) for n in range(KEYS)]
    await asyncio.sleep(2)  # load before the fault
    assert any(a.code == grpc.StatusCode.OK for a in run.answers), "no Start got through"
    old_port = cluster.master_port()
    killed = cluster.server_on(old_port)
    killed_at, wall_killed = time.monotonic(), time.time()
    killed.crash()  # SIGKILL: nothing flushed, no goodbye to the replica
    new_port = await asyncio.to_thread(cluster.wait_failover, old_port)
    switched_at = time.monotonic()
    # A while with no replica at all (the failed node takes time to come
    # back): with min_replicas the new master's writes cannot count then.
    await asyncio.sleep(REPLICALESS)
    await asyncio.to_thread(cluster.rejoin, killed, new_port)
    rejoined_at = time.monotonic()
    # Keep the load on until Starts have been accepted for a while again.
    deadline = killed_at + 30
    while time.monotonic() < deadline:
        after = [a for a in run.answers if a.code == grpc.StatusCode.OK and a.sent > killed_at]
        if after and time.monotonic() > min(a.answered for a in after) + 3:
            break
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.gather(*loaders)
    await asyncio.wait_for(watcher, 40)

    accepted = [a for a in run.answers if a.code == grpc.StatusCode.OK]
    states = dict(
        zip(
            [a.task_id for a in accepted],
            await asyncio.gather(*(final_state(stub, a.task_id) for a in accepted)),
            strict=True,
        )
    )
    bodies = read_stamps(stamps)
    after_kill = [a for a in accepted if a.sent > killed_at]
    first = min((a.answered for a in after_kill), default=float("nan"))
    unreplicated = [a.answered for a in run.answers if a.reason == "REDIS_NOT_REPLICATED"]
    return {
        "Starts answered": {
            code.name: n for code, n in Counter(a.code for a in run.answers).items()
        },
        "UNAVAILABLE reasons": dict(
            Counter(
                a.reason for a in run.answers if a.reason and a.code == grpc.StatusCode.UNAVAILABLE
            )
        ),
        "kill -> sentinels name the new master (s)": round(switched_at - killed_at, 3),
        "kill -> old master back as a replica (s)": round(rejoined_at - killed_at, 3),
        "kill -> first accepted Start (s)": round(first - killed_at, 3),
        "kill -> first and last REDIS_NOT_REPLICATED (s)": [
            round(min(unreplicated) - killed_at, 3) if unreplicated else None,
            round(max(unreplicated) - killed_at, 3) if unreplicated else None,
        ],
        "kill -> first body started after it (s)": round(
            min(
                (b["start"] - wall_killed for b in bodies.values() if b["start"] > wall_killed),
                default=float("nan"),
            ),
            3,
        ),
        "accepted": len(accepted),
        "accepted after the kill": len(after_kill),
        "accepted, not succeeded": sorted(
            f"{task_id} {state}"
            for task_id, state in states.items()
            if state != "TASK_STATE_SUCCEEDED"
        ),
        "accepted after the kill, not succeeded": sorted(
            a.task_id for a in after_kill if states[a.task_id] != "TASK_STATE_SUCCEEDED"
        ),
        "lost (accepted, no body ran)": sorted(
            a.task_id for a in accepted if a.task_id not in bodies
        ),
        "bodies run twice": sorted(t for t, b in bodies.items() if b["starts"] > 1),
        "overlaps under a key": overlaps(bodies),
        "watch": [pb.TaskState.Name(s) for s in run.watched],
        "watch resumed": run.resumes,
    }


async def test_a_worker_refuses_a_claimed_task_whose_record_redis_lost(
    settings: Settings, tmp_path: Path
) -> None:
    """Redis loses the record of an accepted Start (here: the records' Redis is
    killed and comes back empty; a failover to a replica that missed the claim
    does the same) while its message waits in the broker (another Redis). The
    worker refuses that message, which the Start marked as claimed, and records
    it LOST (RecordLost), where a plain message of the same task, never
    claimed, still runs."""
    records = EmbeddedRedis().start()
    queue = f"q-{uuid.uuid4().hex[:8]}"
    ours = settings.model_copy(
        update={
            "redis_url": records.url,
            "broker_url": settings.redis_url,  # the session's Redis: it keeps the message
            "key_prefix": f"lost-{uuid.uuid4().hex[:6]}",
        }
    )
    claimed_file, plain_file = tmp_path / "claimed", tmp_path / "plain"
    metrics_port = free_port()
    worker = None
    try:
        async with serving(ours) as stub:
            request = start_request("test.write_after", path=str(claimed_file), seconds=0)
            request.exclusivity_key = "reports"
            request.options.queue = queue
            task_id = (await stub.Start(request)).task.id
            # What a plain `delay()` sends: no record, no claim.
            plain = Celery("plain", broker=settings.redis_url, set_as_current=False)
            plain.send_task("test.write_after", args=[str(plain_file), 0], queue=queue)

            records.crash()  # SIGKILL; nothing was persisted
            records = EmbeddedRedis(port=records.port).start()

            env = {
                "TASKSERVICE_REDIS_URL": records.url,
                "TASKSERVICE_BROKER_URL": settings.redis_url,
                "TASKSERVICE_KEY_PREFIX": ours.key_prefix,
                "TASKSERVICE_WORKER_METRICS_PORT": str(metrics_port),
            }
            worker = start_worker(tmp_path / "worker.log", queues=queue, env=env)
            task = await ended_record(stub, task_id)
            assert task.state == pb.TASK_STATE_LOST
            assert task.error.type == "RecordLost"
            assert task.exclusivity_key == "reports"
            assert "refused to run it" in task.error.message
            await asyncio.to_thread(wait_for_file, plain_file)
        assert not claimed_file.exists(), "the claimed body ran without its record"
        log = (tmp_path / "worker.log").read_text()
        assert f"task {task_id} (test.write_after, exclusivity key 'reports') has no record" in log
        samples = await asyncio.to_thread(scrape, metrics_port)
        refused = ("taskservice_tasks_refused_total",
                   (("reason", "record_lost"), ("task_name", "test.write_after")))  # fmt: skip
        assert samples.get(refused) == 1.0
    finally:
        if worker is not None:
            stop_process_group(worker)
        records.stop()


async def ended_record(stub: pb_grpc.TaskServiceStub, task_id: str) -> pb.Task:
    """The task once it has a terminal record again (it answers NOT_FOUND until then)."""
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND, or UNAVAILABLE
            task = (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task
            if task.state in TERMINAL:
                return task
        assert time.monotonic() < deadline, f"task {task_id} got no terminal record"
        await asyncio.sleep(0.1)


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize("path", ["pushed with the claim", "published through kombu"])
async def test_a_start_whose_replica_does_not_confirm_answers_unavailable_and_enqueues_nothing(
    settings: Settings, path: str
) -> None:
    master = EmbeddedRedis(args=("--repl-diskless-sync-delay", "0")).start()
    replica_args = ("--replicaof", "127.0.0.1", str(master.port))
    replica = EmbeddedRedis(args=replica_args).start()
    queue = f"q-{uuid.uuid4().hex[:8]}"
    ours = settings.model_copy(
        update={
            "redis_url": master.url,
            # The same Redis under another name: the server publishes through kombu.
            "broker_url": None
            if path.startswith("pushed")
            else f"redis://localhost:{master.port}/0",
            "key_prefix": f"unreplicated-{uuid.uuid4().hex[:6]}",
            "redis_min_replicas": 1,
            "redis_min_replicas_timeout": 0.3,
        }
    )
    client = redis.Redis(port=master.port, decode_responses=True)
    try:
        async with serving(ours) as stub:
            request = start_request("test.echo", 1, key="reports")
            request.options.queue = queue
            await asyncio.to_thread(wait_replicas, client, 1)
            first = (await stub.Start(request)).task.id  # a replica confirms: accepted
            assert client.llen(queue) == 1
            message = json.loads(client.lindex(queue, 0))
            assert message["headers"]["taskservice_claimed"] == "reports"
            await stub.Cancel(pb.CancelRequest(task_id=first))
            client.delete(queue)

            replica.crash()  # SIGKILL: no replica confirms anything now
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Start(request)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "REDIS_NOT_REPLICATED"
            assert client.llen(queue) == 0  # nothing a worker could run
            given_up = [
                client.hgetall(name) for name in client.scan_iter(f"{ours.key_prefix}:task:*")
            ]
            assert sorted(r["state"] for r in given_up) == ["REVOKED", "REVOKED"]
            assert sum(r.get("error_type") == "NotEnqueued" for r in given_up) == 1

            replica = EmbeddedRedis(port=replica.port, args=replica_args).start()
            await asyncio.to_thread(wait_replicas, client, 1)
            await stub.Start(request)  # the key was given back: accepted again
            assert client.llen(queue) == 1
    finally:
        client.close()
        replica.stop()
        master.stop()


def wait_replicas(client: redis.Redis, count: int) -> None:
    """Until the master counts `count` replicas online: only those answer WAIT
    (Redis 7 puts a replica online at its first acknowledgement, up to a
    second after its sync)."""
    deadline = time.monotonic() + 15
    while online_replicas(client) < count:
        assert time.monotonic() < deadline, "the replica did not come online"
        time.sleep(0.05)
