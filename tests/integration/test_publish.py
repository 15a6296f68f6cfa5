"""A team app whose broker is the records' own Redis: a Start pushes its
message with its claim only where kombu would push that very message itself,
and publishes through kombu wherever kombu would put it elsewhere (a global
key prefix, a priority list, an exchange's bindings). Either way the task
runs, keeps its priority, and gives its exclusivity key back."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from celery import Celery
from google.protobuf import json_format

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import stop_process_group, tied_to_this_process
from taskservice.core.record import CLAIMED_HEADER
from taskservice.core.settings import Settings
from taskservice.server.publisher import Delivery, Publisher, create_publisher
from tests.conftest import REDIS_PORT, ROOT, start_server_process, wait_for_log
from tests.support.client import finished
from tests.support.publish_configs import CONFIGS, QUEUES

APP = "tests.support.publish_app:app"


def team_env(config: str) -> dict[str, str]:
    return {
        "TASKSERVICE_CELERY_APP": APP,
        "TASKSERVICE_TASKS": "tests.support.publish_app",
        "TASKSERVICE_QUEUES": "pub-*",
        "PUBLISH_CONFIG": config,
    }


def start_team_worker(config: str, log: Path) -> subprocess.Popen[bytes]:
    """The team's worker, started the team's way (`celery -A`), once ready."""
    command = [
        sys.executable, "-m", "celery", "-A", APP, "worker", "--pool=prefork",
        "--concurrency=1", "--loglevel=INFO", "-Q", QUEUES[config],
        "-n", f"pub-{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            tied_to_this_process(command),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **team_env(config)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_log(log, "ready.", worker, timeout=60)
    except BaseException:
        stop_process_group(worker)
        raise
    return worker


@pytest.fixture(scope="module")
async def team(
    request: pytest.FixtureRequest,
    redis_server: object,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[pb_grpc.TaskServiceStub]:
    """A stub of a taskservice server for the app configured as the test's
    parameter says (indirect), with the team's own worker running."""
    config: str = request.param
    logs = tmp_path_factory.mktemp(f"publish-{config}")
    worker = await asyncio.to_thread(start_team_worker, config, logs / "worker.log")
    try:
        server, port = await asyncio.to_thread(
            start_server_process, logs / "server.log", team_env(config)
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield pb_grpc.TaskServiceStub(channel)
        finally:
            stop_process_group(server)
    finally:
        stop_process_group(worker)


def seen(exchange: str, routing_key: str, priority: int) -> dict[str, Any]:
    """What a task of publish_app answers: the delivery its worker saw."""
    return {"exchange": exchange, "routing_key": routing_key, "priority": priority}


# (task, queue option, what the worker saw of the message)
ROUTED = [
    # task_default_priority 1 is kept, also where the message is pushed directly.
    ("pub.plain", "", seen("", "pub-default", 1)),
    ("pub.routed", "", seen("", "pub-routed", 1)),
    # Celery sends to a queue by its name, whatever the queue's exchange.
    ("pub.own_exchange", "", seen("", "pub-x", 1)),
    ("pub.plain", "pub-x", seen("", "pub-x", 1)),
    ("pub.by_exchange", "", seen("hipri-x", "hi", 1)),
    # Priority 6 lives on pub-default + "\x06\x16" + "6".
    ("pub.urgent", "", seen("", "pub-default", 6)),
]


@pytest.mark.parametrize("team", ["routed"], indirect=True)
@pytest.mark.parametrize(("task_name", "queue", "expected"), ROUTED)
async def test_a_start_of_a_routed_app_on_the_records_redis_runs_and_frees_its_key(
    team: pb_grpc.TaskServiceStub, task_name: str, queue: str, expected: dict[str, Any], key: str
) -> None:
    await runs_and_frees_its_key(team, task_name, queue, expected, key)


@pytest.mark.parametrize("team", ["prefixed"], indirect=True)
async def test_a_start_of_a_prefixed_app_on_the_records_redis_runs_and_frees_its_key(
    team: pb_grpc.TaskServiceStub, key: str
) -> None:
    # Its worker reads proj:pub-prefixed; kombu writes priority 0 when unset.
    await runs_and_frees_its_key(team, "pub.plain", "", seen("", "pub-prefixed", 0), key)


async def runs_and_frees_its_key(
    stub: pb_grpc.TaskServiceStub, task_name: str, queue: str, expected: dict[str, Any], key: str
) -> None:
    request = pb.StartRequest(
        task_name=task_name, exclusivity_key=key, options=pb.StartOptions(queue=queue)
    )
    first = (await stub.Start(request)).task
    done = await finished(stub, first.id, timeout=20)
    assert done.state == pb.TASK_STATE_SUCCEEDED, done
    assert json_format.MessageToDict(done.result) == expected
    # The key is free again: a second Start under it is accepted and runs.
    second = (await stub.Start(request)).task
    assert second.id != first.id
    assert (await finished(stub, second.id, timeout=20)).state == pb.TASK_STATE_SUCCEEDED


def test_the_plain_default_configuration_still_pushes_with_the_claim(settings: Settings) -> None:
    # The fast path (one round trip, no thread): taskservice's own app.
    from taskservice.worker.app import app

    publisher = Publisher(create_publisher(settings, app), settings)
    try:
        assert publisher.pushes("test.echo", "", None)
        push = publisher.push(delivery("test.echo", "celery", None))
        assert push is not None
        assert push[0] == "celery"
    finally:
        publisher.close()


# (configuration, task, queue, the task's priority) -> the list kombu puts
# the message on. Pushed with the claim exactly when that is the queue's own.
WHERE_KOMBU_PUTS = {
    ("prefixed", "pub.plain", "pub-prefixed", None): "proj:pub-prefixed",
    ("routed", "pub.plain", "pub-default", None): "pub-default",
    ("routed", "pub.plain", "pub-default", 1): "pub-default",
    ("routed", "pub.routed", "pub-routed", 1): "pub-routed",
    ("routed", "pub.own_exchange", "pub-x", 1): "pub-x",
    ("routed", "pub.by_exchange", "pub-default", 1): "pub-hipri",
    ("routed", "pub.urgent", "pub-default", 2): "pub-default",
    ("routed", "pub.urgent", "pub-default", 6): "pub-default\x06\x166",
    ("routed", "pub.urgent", "pub-default", 9): "pub-default\x06\x169",
}


@pytest.mark.parametrize(("config", "task_name", "queue", "priority"), list(WHERE_KOMBU_PUTS))
def test_a_message_is_pushed_only_where_kombu_would_push_the_same(
    settings: Settings, config: str, task_name: str, queue: str, priority: int | None
) -> None:
    # A database of its own: no worker of this session reads these queues.
    url = f"redis://127.0.0.1:{REDIS_PORT}/3"
    # As the server sets it up for the team's app (TASKSERVICE_CELERY_APP).
    ours = settings.model_copy(update={"redis_url": url, "celery_app": APP})
    app = Celery("decisions", broker=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], **CONFIGS[config])
    publisher = Publisher(create_publisher(ours, app), ours)
    client = redis.Redis.from_url(url)
    try:
        push = publisher.push(delivery(task_name, queue, priority))
        kombu = create_publisher(ours, app)
        with kombu.connection_for_write() as connection:
            for declared in kombu.amqp.queues.values():  # as the team's worker does
                declared.bind(connection.default_channel).declare()
        options: dict[str, Any] = {"args": [1], "kwargs": {}, "queue": queue, "priority": priority}
        options["headers"] = {CLAIMED_HEADER: ""}  # as Publisher.send marks a Start's message
        kombu.send_task(task_name, task_id="id-kombu", **options)
        lists = {key: client.lrange(key, 0, -1) for key in client.scan_iter(_type="list")}
        [(where, [sent])] = lists.items()  # kombu's one message, wherever it went
        assert where.decode() == WHERE_KOMBU_PUTS[config, task_name, queue, priority]
        if where.decode() != queue:
            # Pushed on the queue's list, the message would never have run.
            assert push is None
        else:
            assert push is not None
            assert push[0] == queue
            assert normal(json.loads(push[1])) == normal(json.loads(sent))
    finally:
        client.flushdb()
        client.close()
        publisher.close()


def delivery(task_name: str, queue: str, priority: int | None) -> Delivery:
    return Delivery(task_name, "id-ours", [1], {}, queue, None, None, None, priority=priority)


def normal(message: dict[str, Any]) -> dict[str, Any]:
    """A message without what differs between any two sends."""
    for name in ("delivery_tag", "reply_to", "correlation_id"):
        message["properties"].pop(name)
    for header in ("id", "root_id", "eta", "origin"):
        message["headers"].pop(header)
    return message
