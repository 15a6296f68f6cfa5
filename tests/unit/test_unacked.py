"""The sweep of the broker's unacknowledged messages (taskservice.server.unacked)
against a real Redis and kombu's own Redis transport: which messages it puts
back, where they go, and that one already gone is never put back.

The messages are taken the way a worker takes them (kombu's `basic_get`
without an ack, which records them in `unacked`), by a channel that then
vanishes without putting them back, as a SIGKILLed worker does.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client import CollectorRegistry

from taskservice import apps
from taskservice.cli.embedded import EmbeddedRedis
from taskservice.core import record
from taskservice.core.metrics import ServerMetrics
from taskservice.core.registry import TaskRegistry
from taskservice.core.scripts import Call, Claimed, Confirmed
from taskservice.core.settings import Settings
from taskservice.server.records import Records
from taskservice.server.redis_link import RedisLink
from taskservice.server.unacked import Unacked, _restore, task_id_of

LEASE = 0.2


@dataclass
class Broker:
    settings: Settings
    app: Celery
    records: Records
    registry: CollectorRegistry
    client: redis.Redis
    prefix: str
    """The broker's global_keyprefix."""
    queue: str

    async def run(self, call: Call[Any]) -> Any:
        return await self.records.run(call)

    async def queued(self, *, started: bool = False, held: bool = False) -> str:
        """A task started through taskservice, its Start confirmed: QUEUED.
        `held`: leased by a worker holding it; `started`: running."""
        task_id = str(uuid.uuid4())
        fields = record.new_record_fields(
            task_id, "t.x", exclusivity_key="", queue=self.queue, scheduled=None
        )
        scripts = self.records.scripts
        claim = scripts.claim(fields, exclusivity_key="", provisional_ms=60_000)
        assert isinstance(await self.run(claim), Claimed)
        assert await self.run(scripts.confirm(task_id)) == Confirmed()
        if held:
            await self.run(scripts.renew([], [task_id], worker="w", lease_ms=60_000))
        if started:
            call = scripts.start(task_id, worker="w", run="r", lease_ms=60_000, when=1.0)
            await self.run(call)
        return task_id

    def send(self, task_id: str, *, priority: int = 0) -> None:
        self.app.send_task("t.x", task_id=task_id, queue=self.queue, priority=priority)

    def take_and_vanish(self, count: int) -> dict[str, str]:
        """What a worker killed right after taking `count` messages leaves:
        them in `unacked`, nowhere else. Task id -> delivery tag."""
        taken = {}
        with self.app.connection_for_write() as connection:
            channel: Any = connection.channel()
            channel.qos.restore_at_shutdown = False  # a SIGKILLed worker restores nothing
            for _ in range(count):
                message = channel.basic_get(self.queue)
                assert message is not None
                taken[message.headers["id"]] = message.delivery_tag
            channel.close()
        return taken

    def unacked_tags(self) -> set[str]:
        return set(self.client.hkeys(f"{self.prefix}unacked"))

    def restored(self) -> float:
        return self.registry.get_sample_value("taskservice_messages_restored_total") or 0.0


@pytest.fixture
async def broker(redis_server: EmbeddedRedis) -> AsyncIterator[Broker]:
    """The records and a Redis broker on the session's Redis, the broker's
    keys under a global_keyprefix of the test's own."""
    own = uuid.uuid4().hex[:8]
    settings = Settings(
        redis_url=redis_server.url,
        key_prefix=f"unacked-{own}",
        lease=LEASE,
        heartbeat_interval=LEASE / 4,
    )
    prefix = f"broker-{own}:"
    config = apps.celery_config(settings)
    config["broker_transport_options"] = {
        **config["broker_transport_options"],
        "global_keyprefix": prefix,
    }
    config.pop("result_backend")
    app = Celery("unacked-test", set_as_current=False)
    app.config_from_object(config)
    registry = CollectorRegistry()
    link = RedisLink.to_records(settings, client_name="unacked-test")
    records = Records(settings, link, TaskRegistry(), ServerMetrics(registry))
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        yield Broker(settings, app, records, registry, client, prefix, f"q-{own}")
    finally:
        records.close()
        app.close()
        for pattern in (f"{prefix}*", f"{settings.key_prefix}:*"):
            for name in client.scan_iter(pattern):
                client.delete(name)
        client.close()


async def test_only_the_messages_of_queued_tasks_without_a_lease_go_back_to_their_queue(
    broker: Broker,
) -> None:
    lost = await broker.queued()
    held = await broker.queued(held=True)  # a live worker vouches for it
    running = await broker.queued(started=True)
    foreign = str(uuid.uuid4())  # a plain delay(): no record
    for task_id in (held, running, foreign):
        broker.send(task_id)
    broker.send(lost, priority=9)  # kombu keeps it on a list of its own
    tags = broker.take_and_vanish(4)
    unacked = Unacked(broker.records, broker.app)
    try:
        assert await unacked.sweep() == []  # younger than the lease: not yet
        await asyncio.sleep(LEASE + 0.1)
        assert await unacked.sweep() == [lost]
        assert await unacked.sweep() == []
    finally:
        unacked.close()
    assert broker.unacked_tags() == {tags[held], tags[running], tags[foreign]}
    # Back on its priority list, under the broker's prefix, marked redelivered.
    waiting = broker.client.lrange(f"{broker.prefix}{broker.queue}\x06\x169", 0, -1)
    assert [json.loads(message)["headers"]["id"] for message in waiting] == [lost]
    assert json.loads(waiting[0])["headers"]["redelivered"] is True
    assert broker.client.llen(f"{broker.prefix}{broker.queue}") == 0
    assert broker.restored() == 1


async def test_a_message_goes_back_to_the_head_of_its_queue_once_whoever_puts_it_back(
    broker: Broker,
) -> None:
    lost = await broker.queued()
    broker.send(lost)
    tags = broker.take_and_vanish(1)
    later = str(uuid.uuid4())
    broker.send(later)  # waiting in the queue already
    await asyncio.sleep(LEASE + 0.1)
    servers = [Unacked(broker.records, broker.app) for _ in range(2)]
    try:
        restored = await asyncio.gather(*(server.sweep() for server in servers))
    finally:
        for server in servers:
            server.close()
    assert sorted(restored) == [[], [lost]]  # two servers at once: one puts it back
    # Acknowledged (or put back) meanwhile: the tag is gone, nothing is pushed.
    assert (
        await asyncio.to_thread(_restore, broker.app, [(tags[lost], lost)], ServerMetrics()) == []
    )
    assert broker.restored() == 1
    queue = broker.client.lrange(f"{broker.prefix}{broker.queue}", 0, -1)
    # Workers pop from the right: the restored message comes first.
    assert [json.loads(message)["headers"]["id"] for message in queue] == [later, lost]
    assert broker.unacked_tags() == set()


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[]",
        '[{"headers": {}}, "", "q"]',
        '[{"headers": {"id": 7}}, "", "q"]',
        '[{"body": "protocol 1 keeps the id in its body"}, "", "q"]',
    ],
)
def test_a_message_without_a_task_id_header_names_no_task(message: str) -> None:
    assert task_id_of(message) is None
