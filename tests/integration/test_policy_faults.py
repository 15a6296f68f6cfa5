"""Conflict policies under faults, against real Redis, worker and server
processes: a key handed to its waiting task when the holder's worker is
SIGKILLed or the holder's Start is abandoned; the kombu path (a broker the
claim script cannot push to: the dispatcher sends what waited); slots held
across two servers; a delayed start across a server and a Redis restart;
Starts retried with their request_id; the policies' metrics.

Leases are short (conftest). What ran, and when, is judged by the bodies' own
timestamps (test.span) beside the records' end times.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio
from google.protobuf import timestamp_pb2

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, free_port, stop_process_group
from taskservice.core import record
from taskservice.core.settings import Settings
from taskservice.server.server import create_server
from tests.conftest import serving, start_server_process, start_worker
from tests.integration.test_leases import on_queue, until_held
from tests.integration.test_observability import Samples, until_counted, value
from tests.integration.test_policies import policy_request, spans
from tests.support.amqp import AmqpBroker, amqp_broker
from tests.support.client import error_info, finished, start_request
from tests.support.proxies import BlackholeProxy, LateConnectionsProxy

QUEUED = pb.TASK_STATE_QUEUED
SUCCEEDED = pb.TASK_STATE_SUCCEEDED
REJECT = pb.CONFLICT_POLICY_REJECT
QUEUE = pb.CONFLICT_POLICY_QUEUE
QUEUE_LATEST = pb.CONFLICT_POLICY_QUEUE_LATEST
REPLACE = pb.CONFLICT_POLICY_REPLACE


def seconds(stamp: timestamp_pb2.Timestamp) -> float:
    """A Timestamp as seconds since the epoch."""
    return stamp.ToNanoseconds() / 1e9


def starts_of(path: Path, task_id: str) -> int:
    """How many times the body of `task_id` began (test.span's start lines)."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return sum(1 for line in lines if line.split()[:2] == [task_id, "start"])


async def body_began(path: Path, task_id: str, timeout: float = 15) -> None:
    """Wait until the body of `task_id` wrote its start line."""
    deadline = time.monotonic() + timeout
    while not starts_of(path, task_id):
        assert time.monotonic() < deadline, f"the body of {task_id} never began"
        await asyncio.sleep(0.05)


def max_overlap(ran: dict[str, tuple[float, float | None]]) -> int:
    """The most bodies that ran at one instant (each must have ended); one
    that ends as another begins does not overlap it."""
    events = []
    for task_id, (began, ended) in ran.items():
        assert ended is not None, f"the body of {task_id} never ended"
        events += [(began, 1), (ended, -1)]
    running = most = 0
    for _, change in sorted(events):  # at one instant, the end (-1) first
        running += change
        most = max(most, running)
    return most


# -- hand-over after a fault of the holder ------------------------------------


@pytest.mark.parametrize("policy", [QUEUE_LATEST, QUEUE], ids=["queue_latest", "queue"])
async def test_a_waiting_task_takes_the_key_once_its_killed_holders_lease_lapses(
    stub: pb_grpc.TaskServiceStub,
    settings: Settings,
    key: str,
    tmp_path: Path,
    policy: pb.ConflictPolicy.ValueType,
) -> None:
    log = tmp_path / "spans"
    queue = f"doomed-{uuid.uuid4().hex[:8]}"
    worker = await asyncio.to_thread(
        start_worker, tmp_path / "worker.log", concurrency=1, queues=queue
    )
    try:
        request = on_queue(policy_request(log, key, REJECT, 60), queue)
        holder = (await stub.Start(request)).task
        await body_began(log, holder.id)
        waiting = (await stub.Start(policy_request(log, key, policy))).task
        assert waiting.state == QUEUED and waiting.waiting_for == holder.id
        killed_at = time.time()
        os.killpg(worker.pid, signal.SIGKILL)  # the worker and the body, at once
    finally:
        stop_process_group(worker)
    lost = await finished(stub, holder.id, timeout=settings.lease + 10)
    assert lost.state == pb.TASK_STATE_LOST and lost.error.type == "WorkerLostError"
    done = await finished(stub, waiting.id)
    assert done.state == SUCCEEDED and done.waiting_for == ""
    assert done.fencing_token > lost.fencing_token
    ran = spans(log)
    assert set(ran) == {holder.id, waiting.id}
    assert ran[holder.id][1] is None, "the holder's body was killed mid-run"
    # Not before the lease lapsed (the last renewal was at most one heartbeat
    # before the kill), and only after the record says the holder ended.
    began = ran[waiting.id][0]
    assert began >= killed_at + settings.lease - settings.heartbeat_interval - 0.1
    assert began >= seconds(lost.end_time)
    assert seconds(done.start_time) >= seconds(lost.end_time)
    await asyncio.sleep(0.5)  # a second run would have begun by now
    assert starts_of(log, waiting.id) == 1


@pytest.mark.parametrize("policy", [QUEUE, QUEUE_LATEST], ids=["queue", "queue_latest"])
async def test_a_waiting_task_runs_once_its_holders_publish_fails(
    stub: pb_grpc.TaskServiceStub,
    settings: Settings,
    worker_process: subprocess.Popen[bytes],
    key: str,
    tmp_path: Path,
    policy: pb.ConflictPolicy.ValueType,
) -> None:
    log = tmp_path / "spans"
    async with BlackholeProxy() as broker:
        hung = settings.model_copy(update={"broker_url": broker.url, "publish_timeout": 1.5})
        async with serving(hung) as hung_stub:
            call = hung_stub.Start(policy_request(log, key, REJECT))
            holder = await until_held(stub, key)  # claimed, its message stuck
            waiting = (await stub.Start(policy_request(log, key, policy))).task
            assert waiting.state == QUEUED and waiting.waiting_for == holder.id
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "BROKER_UNAVAILABLE"
    await _ran_after_the_abandoned_holder(stub, log, holder.id, waiting.id)


@pytest.mark.parametrize("policy", [QUEUE, QUEUE_LATEST], ids=["queue", "queue_latest"])
async def test_a_waiting_task_runs_once_the_server_that_held_the_key_dies_mid_publish(
    stub: pb_grpc.TaskServiceStub,
    settings: Settings,
    worker_process: subprocess.Popen[bytes],
    key: str,
    tmp_path: Path,
    policy: pb.ConflictPolicy.ValueType,
) -> None:
    log = tmp_path / "spans"
    async with BlackholeProxy() as broker:
        env = {"TASKSERVICE_BROKER_URL": broker.url, "TASKSERVICE_PUBLISH_TIMEOUT": "1"}
        doomed, port = await asyncio.to_thread(start_server_process, tmp_path / "server.log", env)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.TaskServiceStub(channel).Start(policy_request(log, key, REJECT))
                holder = await until_held(stub, key)
                waiting = (await stub.Start(policy_request(log, key, policy))).task
                assert waiting.waiting_for == holder.id
                os.killpg(doomed.pid, signal.SIGKILL)
                with pytest.raises(grpc.aio.AioRpcError):
                    await call
        finally:
            stop_process_group(doomed)
    # Nobody abandons it: its provisional lease lapses, and the sweeper's end
    # of it hands the key over.
    provisional = 1 + settings.lease
    await finished(stub, holder.id, timeout=provisional + settings.sweep_interval + 5)
    await _ran_after_the_abandoned_holder(stub, log, holder.id, waiting.id)


async def _ran_after_the_abandoned_holder(
    stub: pb_grpc.TaskServiceStub, log: Path, holder_id: str, waiting_id: str
) -> None:
    given_up = await finished(stub, holder_id)
    assert given_up.state == pb.TASK_STATE_CANCELLED
    assert given_up.error.type == "NotEnqueued"
    assert not given_up.HasField("start_time")
    done = await finished(stub, waiting_id)
    assert done.state == SUCCEEDED
    assert seconds(done.start_time) >= seconds(given_up.end_time)
    await asyncio.sleep(0.5)  # a late copy of either message would have run by now
    ran = spans(log)
    assert set(ran) == {waiting_id}, "the abandoned holder ran"
    assert ran[waiting_id][0] >= seconds(given_up.end_time)
    assert starts_of(log, waiting_id) == 1


# -- the kombu path: a broker the claim script cannot push to ------------------


@pytest.fixture(scope="module")
def amqp() -> Iterator[AmqpBroker]:
    with amqp_broker() as broker:
        yield broker


@pytest.fixture(scope="module")
async def kombu_stub(
    amqp: AmqpBroker, redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    """A server whose broker is RabbitMQ (records in Redis), and a worker on it."""
    log = tmp_path_factory.mktemp("policy-amqp") / "worker.log"
    worker = await asyncio.to_thread(
        start_worker, log, queues=amqp.worker_queues, env=amqp.worker_env
    )
    try:
        running = await create_server(Settings(broker_url=amqp.url), port=0)
        try:
            assert not running.operations.publisher.direct, "this is the kombu path"
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                yield amqp.routed(pb_grpc.TaskServiceStub(channel))
        finally:
            await running.stop(1)
    finally:
        stop_process_group(worker)


@pytest.mark.parametrize(
    "policy", [QUEUE, QUEUE_LATEST, REPLACE], ids=["queue", "queue_latest", "replace"]
)
async def test_through_kombu_a_waiting_task_is_dispatched_when_its_holder_ends(
    kombu_stub: pb_grpc.TaskServiceStub,
    key: str,
    tmp_path: Path,
    policy: pb.ConflictPolicy.ValueType,
) -> None:
    stub, log = kombu_stub, tmp_path / "spans"
    holder = (await stub.Start(policy_request(log, key, REJECT, 1.0))).task
    await body_began(log, holder.id)
    # REPLACE lets the holder finish (GRACEFUL: test.span does not look).
    waiting = (
        await stub.Start(policy_request(log, key, policy, replace_mode=pb.CANCEL_MODE_GRACEFUL))
    ).task
    assert waiting.state == QUEUED and waiting.waiting_for == holder.id
    ended = await finished(stub, holder.id)
    done = await finished(stub, waiting.id)
    assert done.state == SUCCEEDED
    ran = spans(log)
    holder_end = ran[holder.id][1]
    assert holder_end is not None and ran[waiting.id][0] >= holder_end
    assert seconds(done.start_time) >= seconds(ended.end_time)
    assert starts_of(log, waiting.id) == 1


async def test_through_kombu_a_delayed_start_is_published_when_due(
    kombu_stub: pb_grpc.TaskServiceStub, key: str, tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    request = policy_request(log, key, REJECT)
    request.options.start_time.FromNanoseconds(int((time.time() + 1.5) * 1e9))
    task = (await kombu_stub.Start(request)).task
    assert task.state == QUEUED
    with pytest.raises(grpc.aio.AioRpcError) as held:  # it holds its key meanwhile
        await kombu_stub.Start(policy_request(log, key, REJECT))
    assert error_info(held.value).metadata["task_id"] == task.id
    done = await finished(kombu_stub, task.id)
    assert done.state == SUCCEEDED
    assert spans(log)[task.id][0] >= seconds(task.scheduled_time) - 0.05
    assert starts_of(log, task.id) == 1


# -- slots across two servers --------------------------------------------------


@pytest.fixture(scope="module")
async def two_servers(
    redis_server: EmbeddedRedis,
    worker_process: subprocess.Popen[bytes],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[list[pb_grpc.TaskServiceStub]]:
    """Stubs of two server processes on the session's Redis and worker."""
    folder = tmp_path_factory.mktemp("policy-servers")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        ports = []
        for n in range(2):
            process, port = await asyncio.to_thread(start_server_process, folder / f"{n}.log")
            processes.append(process)
            ports.append(port)
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as first,
            grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as second,
        ):
            yield [pb_grpc.TaskServiceStub(first), pb_grpc.TaskServiceStub(second)]
    finally:
        for process in processes:
            stop_process_group(process)


async def test_n_slots_take_exactly_n_of_n_plus_one_starts_over_two_servers(
    two_servers: list[pb_grpc.TaskServiceStub], key: str, tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    request = start_request("test.span_two", key=key, path=str(log), seconds=1.5)
    outcomes = await asyncio.gather(
        *(two_servers[n % 2].Start(request) for n in range(3)), return_exceptions=True
    )
    accepted = [o.task for o in outcomes if isinstance(o, pb.StartResponse)]
    refused = [o for o in outcomes if not isinstance(o, pb.StartResponse)]
    assert len(accepted) == 2, outcomes
    assert [e.code() for e in refused if isinstance(e, grpc.aio.AioRpcError)] == [
        grpc.StatusCode.ALREADY_EXISTS
    ]
    assert error_info(refused[0]).metadata["task_id"] in {t.id for t in accepted}
    for task in accepted:
        assert (await finished(two_servers[0], task.id)).state == SUCCEEDED
    assert set(spans(log)) == {t.id for t in accepted}
    assert max_overlap(spans(log)) == 2


async def test_n_slots_run_n_at_once_and_the_queue_waits_for_a_free_one_over_two_servers(
    two_servers: list[pb_grpc.TaskServiceStub], key: str, tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    request = start_request("test.span_two", key=key, path=str(log), seconds=0.8)
    request.conflict_policy = QUEUE
    answers = await asyncio.gather(*(two_servers[n % 2].Start(request) for n in range(5)))
    tasks = [a.task for a in answers]
    assert sum(1 for t in tasks if t.waiting_for) == 3
    for task in tasks:
        assert (await finished(two_servers[1], task.id)).state == SUCCEEDED
    ran = spans(log)
    assert set(ran) == {t.id for t in tasks}
    assert max_overlap(ran) == 2
    # Each waiting task began only once one of the earlier ones had ended.
    for task in tasks:
        if task.waiting_for:
            began = ran[task.id][0]
            ends = [end for other, (_, end) in ran.items() if other != task.id]
            assert any(end is not None and end <= began for end in ends), task.id


# -- durability of a delayed start ---------------------------------------------


async def test_a_start_due_seconds_ahead_survives_a_server_and_a_redis_restart_and_runs_once(
    tmp_path: Path,
) -> None:
    # Every acknowledged write on disk before it is acknowledged.
    own = EmbeddedRedis(args=("--appendonly", "yes", "--appendfsync", "always")).start()
    env = {
        "TASKSERVICE_REDIS_URL": own.url,
        "TASKSERVICE_KEY_PREFIX": f"delayed-{uuid.uuid4().hex[:6]}",
        "TASKSERVICE_REDIS_TIMEOUT": "0.5",
        "TASKSERVICE_HEALTH_INTERVAL": "0.2",
    }
    log, key = tmp_path / "spans", f"delayed-{uuid.uuid4().hex[:8]}"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(await asyncio.to_thread(start_worker, tmp_path / "worker.log", env=env))
        first, port = await asyncio.to_thread(start_server_process, tmp_path / "a.log", env)
        processes.append(first)
        request = start_request("test.span", key=key, path=str(log))
        # Due 4 s ahead (the issue asked for 2): both restarts must come before
        # it, and on a loaded 2-core machine they took up to 2.5 s.
        request.options.start_time.FromNanoseconds(int((time.time() + 4) * 1e9))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            task = (await pb_grpc.TaskServiceStub(channel).Start(request)).task
        os.killpg(first.pid, signal.SIGKILL)  # the server that accepted it
        own.crash()  # and Redis, kill -9: the AOF keeps what it acknowledged
        await asyncio.to_thread(own.start)
        assert time.time() < seconds(task.scheduled_time), "restarted only after it was due"
        second, port = await asyncio.to_thread(start_server_process, tmp_path / "b.log", env)
        processes.append(second)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            done = await finished(stub, task.id, timeout=20)
            assert done.state == SUCCEEDED
            await asyncio.sleep(1)  # a second copy would have run by now
            assert (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task == done
    finally:
        for process in processes:
            stop_process_group(process)
        own.stop()
    assert starts_of(log, task.id) == 1
    assert spans(log)[task.id][0] >= seconds(task.scheduled_time) - 0.05


# -- retried Starts --------------------------------------------------------------


@pytest.mark.parametrize(
    "policy", [QUEUE, QUEUE_LATEST, REPLACE], ids=["queue", "queue_latest", "replace"]
)
async def test_a_start_retried_with_its_request_id_answers_the_same_task_and_adds_nothing(
    two_servers: list[pb_grpc.TaskServiceStub],
    settings: Settings,
    key: str,
    policy: pb.ConflictPolicy.ValueType,
) -> None:
    parked = f"parked-{uuid.uuid4().hex[:8]}"  # nobody consumes it: everything stays queued
    holder = (
        await two_servers[0].Start(on_queue(start_request("test.echo", 1, key=key), parked))
    ).task
    request = on_queue(start_request("test.echo", 2, key=key), parked)
    request.conflict_policy = policy
    request.request_id = str(uuid.uuid4())
    # Sent twice at once (to both servers), then once more: as clients retry.
    answers = await asyncio.gather(*(s.Start(request) for s in two_servers))
    answers.append(await two_servers[1].Start(request))
    task = answers[0].task
    assert [a.task.id for a in answers] == [task.id] * 3
    assert task.id != holder.id
    status = (await two_servers[0].GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert status.state == QUEUED, "the retry superseded or replaced its own task"
    listed = await two_servers[1].ListTasks(pb.ListTasksRequest(exclusivity_key=key))
    assert sorted(t.id for t in listed.tasks) == sorted([task.id, holder.id])
    client = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        line = await client.lrange(f"{settings.key_prefix}:line:{{{key}}}", 0, -1)  # type: ignore[misc]
        messages = [
            json.loads(m)["headers"]["id"]
            for m in await client.lrange(parked, 0, -1)  # type: ignore[misc]
        ]
    finally:
        await client.aclose()
    if policy == REPLACE:
        # The queued holder ended at once and the task took its key: its one message.
        ended = (await two_servers[0].GetStatus(pb.GetStatusRequest(task_id=holder.id))).task
        assert ended.error.type == "Replaced"
        assert status.waiting_for == "" and line == []
        assert sorted(messages) == sorted([holder.id, task.id])
    else:
        assert status.waiting_for == holder.id and line == [task.id]
        assert messages == [holder.id]
    for each in (task, holder):
        await two_servers[0].Cancel(pb.CancelRequest(task_id=each.id))


# -- metrics ---------------------------------------------------------------------


@pytest.fixture
async def metered(
    settings: Settings, worker_process: subprocess.Popen[bytes]
) -> AsyncIterator[tuple[pb_grpc.TaskServiceStub, int]]:
    """A server serving its metrics: its stub and metrics port."""
    metrics_port = free_port()
    served = settings.model_copy(update={"metrics_port": metrics_port})
    running = await create_server(served, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield pb_grpc.TaskServiceStub(channel), metrics_port
    finally:
        await running.stop(0)


async def test_waits_supersessions_and_handovers_are_counted_as_documented(
    metered: tuple[pb_grpc.TaskServiceStub, int], key: str, tmp_path: Path, settings: Settings
) -> None:
    stub, port = metered
    log = tmp_path / "spans"
    # The hand-over gauge is deployment-wide (earlier tests on this prefix
    # count in it): start from what the new server has read from Redis.
    client = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        stats = record.stats_key(settings.key_prefix)
        handed = float(await client.hget(stats, "handovers") or 0)
    finally:
        await client.aclose()
    before = await until_counted(port, lambda s: value(s, "taskservice_key_handovers") == handed)
    holder = (await stub.Start(policy_request(log, key, REJECT, 1.0))).task
    await body_began(log, holder.id)  # running: REPLACE waits for it to end
    latest = [(await stub.Start(policy_request(log, key, QUEUE_LATEST))).task for _ in range(3)]
    queued = [(await stub.Start(policy_request(log, key, QUEUE))).task for _ in range(2)]
    replacing = (
        await stub.Start(policy_request(log, key, REPLACE, replace_mode=pb.CANCEL_MODE_GRACEFUL))
    ).task
    # Each waited; QUEUE_LATEST superseded the two before it, REPLACE the
    # three waiting then (the last QUEUE_LATEST and both QUEUE).
    assert [t.waiting_for for t in latest] == [holder.id] * 3
    assert replacing.waiting_for == holder.id
    assert (await finished(stub, replacing.id)).state == SUCCEEDED
    for task in [*latest, *queued]:
        assert (await finished(stub, task.id)).error.type == "Superseded"

    def grew(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    # The hand-over gauge is read from Redis at each dispatch: a moment after.
    after = await until_counted(port, lambda s: grew(s, "taskservice_key_handovers") >= 1)
    waits = "taskservice_key_waits_total"
    assert grew(after, waits, task_name="test.span", policy="queue_latest") == 3
    assert grew(after, waits, task_name="test.span", policy="queue") == 2
    assert grew(after, waits, task_name="test.span", policy="replace") == 1
    assert grew(after, "taskservice_superseded_total", task_name="test.span") == 5
    # One hand-over: the holder's end gave the key to the one left waiting.
    assert grew(after, "taskservice_key_handovers") == 1
    assert set(spans(log)) == {holder.id, replacing.id}


# -- a REPLACE's revoke outlives its caller ----------------------------------------


async def test_a_replace_answers_before_its_revoke_and_the_running_holder_still_stops(
    settings: Settings,
    redis_server: EmbeddedRedis,
    worker_process: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    log = tmp_path / "spans"
    keys = [f"replace-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    async with LateConnectionsProxy(redis_server.port) as proxy:
        # Records and broker through the proxy: the claim script pushes
        # (the path where a Start has nothing to finish after its claim).
        running = await create_server(settings.model_copy(update={"redis_url": proxy.url}), port=0)
        try:
            assert running.operations.publisher.direct
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = pb_grpc.TaskServiceStub(channel)
                holders = [
                    (await stub.Start(policy_request(log, k, REJECT, 20))).task for k in keys
                ]
                for holder in holders:
                    await body_began(log, holder.id)
                # The revokes' broker connections are opened now, and held:
                # the first two replacements keep both revoke threads busy...
                proxy.hold()
                busy = [
                    asyncio.ensure_future(stub.Start(policy_request(log, k, REPLACE)))
                    for k in keys[:2]
                ]
                for holder in holders[:2]:
                    await _cancel_asked(stub, holder.id)
                # ...so the third one's revoke waits its turn: its Start
                # answers anyway, with no wait for the broker.
                third = await stub.Start(policy_request(log, keys[2], REPLACE), timeout=0.5)
                assert third.task.waiting_for == holders[2].id
                asked = (await stub.GetStatus(pb.GetStatusRequest(task_id=holders[2].id))).task
                assert asked.state == pb.TASK_STATE_RUNNING
                assert asked.cancel_mode == pb.CANCEL_MODE_TERMINATE
                proxy.release()
                await asyncio.gather(*busy)
                # The record says the holder was asked to stop: it is stopped,
                # not left to run its 20 s while its replacement waits.
                for holder in holders:
                    ended = await finished(stub, holder.id, timeout=10)
                    assert ended.state == pb.TASK_STATE_CANCELLED, holder.id
        finally:
            await running.stop(0)
    ran = spans(log)
    assert all(ran[holder.id][1] is None for holder in holders), "a holder ran to its end"


async def _cancel_asked(stub: pb_grpc.TaskServiceStub, task_id: str) -> None:
    deadline = time.monotonic() + 10
    while True:
        task = (await stub.GetStatus(pb.GetStatusRequest(task_id=task_id))).task
        if task.cancel_mode != pb.CANCEL_MODE_UNSPECIFIED:
            return
        assert time.monotonic() < deadline, f"no cancel of {task_id} was recorded"
        await asyncio.sleep(0.02)
