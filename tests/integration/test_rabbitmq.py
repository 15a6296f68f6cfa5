"""RabbitMQ as the Celery broker, Redis still the store of records, keys,
leases and events: Starts take the publish-and-confirm path (kombu over AMQP)
instead of the claim script's LPUSH, revokes travel over RabbitMQ, and a dead
worker's unacknowledged messages come back at once, not after a visibility
timeout. The module has its own worker and server (tests/support/amqp.py says
where on the broker); it is skipped only when no broker answers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import EmbeddedRedis, free_port, stop_process_group
from taskservice.core.settings import Settings
from taskservice.server.server import Server, create_server
from tests.conftest import log_shows, serving, start_worker
from tests.integration import test_cancel, test_start, test_watch
from tests.integration.test_faults import records_under
from tests.integration.test_leases import on_queue
from tests.support.amqp import AmqpBroker, amqp_broker
from tests.support.client import error_info, finished, start, start_request, wait_until, watch_all
from tests.support.proxies import StallingProxy, with_port

# -- This module's broker, worker and server (overriding conftest's) ----------


@pytest.fixture(scope="module")
def amqp() -> Iterator[AmqpBroker]:
    with amqp_broker() as broker:
        yield broker


@pytest.fixture(scope="module")
def settings(amqp: AmqpBroker, redis_server: EmbeddedRedis) -> Settings:
    return Settings(broker_url=amqp.url)


@pytest.fixture(scope="module")
def worker_process(
    amqp: AmqpBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path_factory.mktemp("amqp-worker") / "worker.log"
    process = start_worker(log, queues=amqp.worker_queues, env=amqp.worker_env)
    yield process
    stop_process_group(process)


@pytest.fixture(scope="module")
async def server(
    settings: Settings, worker_process: subprocess.Popen[bytes]
) -> AsyncIterator[Server]:
    running = await create_server(settings, port=0)
    assert not running.operations.publisher.direct, "this module tests the publishing path"
    yield running
    await running.stop(1)


@pytest.fixture(scope="module")
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.aio.Channel, amqp: AmqpBroker) -> pb_grpc.TaskServiceStub:
    return amqp.routed(pb_grpc.TaskServiceStub(channel))


# -- The core scenarios of the Redis-broker modules, run here again -----------
# (collected in this module, they get the fixtures above)

test_start_runs_the_task_and_returns_its_result = (
    test_start.test_start_runs_the_task_and_returns_its_result
)
test_failure_carries_type_message_and_traceback = (
    test_start.test_failure_carries_type_message_and_traceback
)
test_seed_behaviour_second_dummy_is_rejected_with_the_first_id = (
    test_start.test_seed_behaviour_second_dummy_is_rejected_with_the_first_id
)
test_return_existing_answers_ok_with_the_running_task = (
    test_start.test_return_existing_answers_ok_with_the_running_task
)
test_countdown_delays_the_task = test_start.test_countdown_delays_the_task
test_cancel_of_a_queued_task_means_it_never_runs = (
    test_cancel.test_cancel_of_a_queued_task_means_it_never_runs
)
test_cancel_stops_a_running_task_before_its_side_effect = (
    test_cancel.test_cancel_stops_a_running_task_before_its_side_effect
)
test_graceful_cancel_lets_a_running_task_finish_then_ends_cancelled = (
    test_cancel.test_graceful_cancel_lets_a_running_task_finish_then_ends_cancelled
)
test_a_task_whose_worker_process_dies_ends_lost_and_frees_its_key = (
    test_cancel.test_a_task_whose_worker_process_dies_ends_lost_and_frees_its_key
)
test_watch_delivers_every_change_in_order_and_ends = (
    test_watch.test_watch_delivers_every_change_in_order_and_ends
)
test_a_retried_task_goes_back_to_queued_then_runs_again = (
    test_watch.test_a_retried_task_goes_back_to_queued_then_runs_again
)


# -- Where RabbitMQ differs: it keeps and redelivers messages itself -----------


async def test_a_cancel_made_while_no_worker_consumes_still_wins_once_one_does(
    stub: pb_grpc.TaskServiceStub, amqp: AmqpBroker, tmp_path: Path
) -> None:
    # RabbitMQ keeps the message for the worker that comes later; Celery's
    # revoke broadcast, sent while no worker listened, reached nobody.
    queue = amqp.queue("parked-")
    out = tmp_path / "out"
    request = start_request("test.write_after", path=str(out), seconds=0)
    task = (await stub.Start(on_queue(request, queue))).task
    cancelled = (await stub.Cancel(pb.CancelRequest(task_id=task.id))).task
    assert cancelled.state == pb.TASK_STATE_CANCELLED
    log = tmp_path / "late-worker.log"
    late = await asyncio.to_thread(
        start_worker, log, concurrency=1, queues=queue, env=amqp.worker_env
    )
    try:
        # The late worker got the message and refused it...
        await log_shows(log, f"task {task.id} already ended", late, timeout=10)
        # ...and runs what comes after it.
        after = (await stub.Start(on_queue(start_request("test.echo", "after"), queue))).task
        assert (await finished(stub, after.id)).state == pb.TASK_STATE_SUCCEEDED
    finally:
        stop_process_group(late)
    assert not out.exists() and not Path(str(out) + ".pid").exists()
    status = (await stub.GetStatus(pb.GetStatusRequest(task_id=task.id))).task
    assert status.state == pb.TASK_STATE_CANCELLED
    assert status.sequence == cancelled.sequence
    assert not status.HasField("start_time")


async def test_a_whole_worker_killed_ends_its_tasks_lost_and_their_redelivery_never_runs(
    stub: pb_grpc.TaskServiceStub,
    settings: Settings,
    amqp: AmqpBroker,
    key: str,
    tmp_path: Path,
) -> None:
    queue = amqp.queue("doomed-")
    log = tmp_path / "worker.log"
    worker = await asyncio.to_thread(
        start_worker, log, concurrency=1, queues=queue, env=amqp.worker_env
    )
    runs = tmp_path / "runs"
    try:
        request = start_request("test.log_run", str(runs), 60, key=key)
        busy = (await stub.Start(on_queue(request, queue))).task
        await wait_until(stub, busy.id, lambda t: t.state == pb.TASK_STATE_RUNNING)
        # Delivered to the worker, not started, not acknowledged (prefetched):
        # RabbitMQ requeues it the moment the worker's connection dies.
        held = (await stub.Start(on_queue(start_request("test.log_run", str(runs)), queue))).task
        await log_shows(log, held.id, worker, timeout=10)  # "Task ... received"
        watchers = [asyncio.create_task(watch_all(stub, t.id, timeout=30)) for t in (busy, held)]
        await asyncio.sleep(settings.heartbeat_interval * 2)  # both leased by now
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        os.killpg(worker.pid, signal.SIGKILL)  # OOM killer, eviction, compose down
        ends = [messages[-1] for messages in await asyncio.gather(*watchers)]
        took = loop.time() - killed_at
    finally:
        stop_process_group(worker)
    assert [t.state for t in ends] == [pb.TASK_STATE_LOST] * 2
    assert took < settings.lease + settings.sweep_interval + 2, took
    follow_up = await start(stub, "test.echo", key=key)  # the key is free
    # The next worker on the queue gets the requeued message and refuses it.
    log = tmp_path / "next-worker.log"
    worker = await asyncio.to_thread(
        start_worker, log, concurrency=1, queues=queue, env=amqp.worker_env
    )
    try:
        await log_shows(log, f"task {held.id} already ended", worker, timeout=10)
    finally:
        stop_process_group(worker)
    assert runs.read_text().splitlines() == [busy.id]
    assert (await finished(stub, follow_up.id)).state == pb.TASK_STATE_SUCCEEDED


# -- A broker that fails the server --------------------------------------------


@pytest.mark.parametrize("fault", ["closed port", "never answers", "stalls mid-connection"])
async def test_a_broker_that_is_down_answers_unavailable_in_time_and_holds_no_key(
    settings: Settings, stub: pb_grpc.TaskServiceStub, amqp: AmqpBroker, key: str, fault: str
) -> None:
    async with StallingProxy(urlsplit(amqp.url).port or 5672) as proxy:
        url = proxy.in_place_of(amqp.url)
        if fault == "closed port":
            url = with_port(amqp.url, free_port())
        elif fault == "never answers":
            proxy.stall()  # from the first byte: the AMQP handshake hangs
        down = settings.model_copy(update={"broker_url": url, "publish_timeout": 1.5})
        async with serving(down) as unrouted:
            down_stub = amqp.routed(unrouted)
            if fault == "stalls mid-connection":
                # The server's connection works, then the broker stops
                # answering on it: the message gets no further than the
                # socket, and only a publisher confirm can tell.
                warm = await start(down_stub, "test.echo", "warm")
                assert (await finished(stub, warm.id)).state == pb.TASK_STATE_SUCCEEDED
                proxy.stall()
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await down_stub.Start(start_request("test.echo", 1, key=key))
            took = loop.time() - began
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert error_info(caught.value).reason == "BROKER_UNAVAILABLE"
    assert took < down.publish_timeout + 1, took
    # The Start was given up for good (a late copy would be refused), and
    # the key is free at once.
    given_up = await records_under(settings, key)
    assert [(r["state"], r["error_type"]) for r in given_up] == [("REVOKED", "NotEnqueued")]
    task = await start(stub, "test.echo", 2, key=key)
    assert (await finished(stub, task.id)).state == pb.TASK_STATE_SUCCEEDED


@pytest.mark.parametrize("wrong", ["password", "vhost"])
async def test_a_broker_that_refuses_the_server_answers_failed_precondition(
    settings: Settings, stub: pb_grpc.TaskServiceStub, amqp: AmqpBroker, key: str, wrong: str
) -> None:
    parts = urlsplit(amqp.url)
    if wrong == "password":
        address = parts.netloc.rpartition("@")[2]
        url = parts._replace(netloc=f"{parts.username}:not-{parts.password}@{address}").geturl()
    else:
        url = parts._replace(path=f"/taskservice-test-no-such-vhost-{amqp.run}").geturl()
    async with serving(settings.model_copy(update={"broker_url": url})) as refused_stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await amqp.routed(refused_stub).Start(start_request("test.echo", 1, key=key))
    # Retrying will not help: an operator must fix the settings.
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
    assert error_info(caught.value).reason == "BROKER_MISCONFIGURED"
    assert "not-" not in (caught.value.details() or ""), "the password is echoed"
    task = await start(stub, "test.echo", 2, key=key)
    assert (await finished(stub, task.id)).state == pb.TASK_STATE_SUCCEEDED
