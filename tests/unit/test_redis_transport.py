"""The worker's Redis transport through a Redis restart, against kombu's own.

A worker holding an unacknowledged message loses Redis and reconnects the way
Celery does (taskservice.worker.redis_transport's docstring has the sequence):
kombu's stock transport raises the AttributeError that stops the worker, and
leaves the message in the `unacked` hash for the visibility timeout; the
transport taskservice configures raises only what Celery ignores while
reconnecting, and the message is back in its queue once Redis is.

Each case runs twice: with a `redis://` broker, and with the same Redis
reached through a sentinel (`sentinel://`, kombu's SentinelChannel, which
taskservice selects with TASKSERVICE_REDIS_SENTINELS and fixes the same way).

The stock cases are expected to fail the way they do: they prove that kombu
still has the bug. If a kombu release makes them fail, kombu fixed it, and the
fix in taskservice.worker.redis_transport may be dropped. pyproject.toml keeps
kombu below its next minor until a release has passed here (.ci/ceilings runs
this file at the newest versions allowed).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kombu
import pytest
import redis
from celery import Celery
from kombu import pidbox
from kombu.transport import get_transport_cls
from kombu.transport import redis as kombu_redis

from taskservice import apps
from taskservice.cli.embedded import EmbeddedRedis, free_port
from taskservice.core.settings import Settings
from taskservice.worker.redis_transport import SentinelTransport
from tests.support.sentinels import MASTER_NAME, start_sentinel, stop_sentinel

STOCK = "kombu"
OURS = "taskservice"
DIRECT = "redis://"
SENTINEL = "sentinel://"
QUEUE = "transport-test"
PAYLOAD = {"task": "held while Redis restarts"}


@pytest.fixture(params=[DIRECT, SENTINEL])
def broker(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: EmbeddedRedis
) -> Iterator[Broker]:
    """A Redis of the test's own that writes every change to disk at once, so
    that after SIGKILL and a restart the `unacked` hash is where kombu left it;
    reached directly, or through a sentinel watching it (which, with no
    replica to promote, keeps naming it). Started after the session's Redis,
    whose port is chosen early but bound only then."""
    own = EmbeddedRedis(args=("--appendonly", "yes", "--appendfsync", "always")).start()
    sentinel = None
    settings = Settings(redis_url=own.url, redis_timeout=0.5)
    if request.param == SENTINEL:
        port = free_port()
        sentinel = start_sentinel(tmp_path / "sentinel", port, own.port, quorum=1,
                                  down_after_ms=60_000)  # fmt: skip
        settings = Settings(
            redis_url=own.url,
            redis_timeout=0.5,
            redis_sentinels=f"127.0.0.1:{port}",
            redis_sentinel_master=MASTER_NAME,
        )
    try:
        yield Broker(own, settings)
    finally:
        if sentinel is not None:
            stop_sentinel(sentinel)
        own.stop()


@dataclass
class Broker:
    """The broker's Redis, and the settings that reach it (directly or not)."""

    redis: EmbeddedRedis
    settings: Settings


def connect(broker: Broker, transport: str) -> kombu.Connection:
    """A broker connection as taskservice's worker opens one (its app's
    configuration), with kombu's stock transport for the broker's URL or with
    the one taskservice configures (whatever taskservice.apps selects)."""
    app = Celery("transport-test", set_as_current=False)
    apps.configure(app, broker.settings)
    # A BRPOP answers nil after polling_interval (1 s by default): one the test
    # left unread that long would end cleanly, and the failure below needs it
    # still pending when Redis goes away (a worker reads each reply at once
    # and sends the next BRPOP, so its consuming channel always has one).
    options = {"polling_interval": 60}
    if transport == STOCK:
        stock = (
            kombu_redis.SentinelTransport
            if broker.settings.sentinel_addresses
            else kombu_redis.Transport
        )
        return app.connection_for_read(transport=stock, transport_options=options)
    return app.connection_for_read(transport_options=options)


@dataclass
class Worker:
    """A worker's broker connection at the moment Redis went away."""

    connection: kombu.Connection
    channel: Any
    """The task consumer's channel, holding one unacknowledged message."""
    ignored: tuple[type[BaseException], ...]
    """The errors Celery ignores while it reconnects (`kombu.common.ignore_errors`)."""

    def close_consumer_channel(self) -> None:
        """Celery's next step after `collect()`: close the consumer's channel,
        ignoring connection and channel errors. Anything else stops the worker."""
        try:
            self.channel.close()
        except self.ignored:
            pass


def publish_and_consume(connection: kombu.Connection) -> tuple[Any, list[Any]]:
    """PAYLOAD published on QUEUE, and a consumer of QUEUE as Celery's task
    consumer (on the connection's default channel; a message stays
    unacknowledged until its task starts, a countdown task for long): the
    consumer, and the list the bodies it receives go to."""
    with connection.Producer() as producer:
        producer.publish(PAYLOAD, routing_key=QUEUE, declare=[kombu.Queue(QUEUE)])
    received: list[Any] = []
    consumer = connection.Consumer(
        kombu.Queue(QUEUE), callbacks=[lambda body, message: received.append(body)]
    )
    consumer.consume()
    return consumer, received


def lose_redis_holding_a_message(broker: Broker, transport: str) -> Worker:
    """Run the reconnect sequence of the docstring of taskservice.worker.
    redis_transport up to Celery's `connection.collect()`, Redis being down."""
    connection = connect(broker, transport)
    consumer, received = publish_and_consume(connection)
    # Celery's control mailbox (celery.worker.pidbox): a channel of its own,
    # opened after the task consumer's, with an auto-delete fanout queue. Its
    # close fails while Redis is down, which stops `collect()` from closing
    # the task consumer's channel a second time (that one would succeed).
    node = pidbox.Mailbox("celery", type="fanout").Node("worker@test", channel=connection.channel())
    node.listen(callback=lambda *_: None)
    deadline = time.monotonic() + 10
    while not received:
        assert time.monotonic() < deadline, "the message never arrived"
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=1)
    assert received == [PAYLOAD]
    # Wait for the next message, as a worker does: a BRPOP is pending.
    while True:
        assert time.monotonic() < deadline, "the consumer never went idle"
        try:
            connection.drain_events(timeout=0.1)
        except TimeoutError:
            break
    ignored = connection.connection_errors + connection.channel_errors
    broker.redis.crash()
    # As celery.worker.consumer.Consumer.on_connection_error_after_connected.
    with contextlib.suppress(Exception):
        connection.collect()
    return Worker(connection, consumer.channel, ignored)


def count(broker: Broker) -> tuple[int, int]:
    """(messages waiting in the queue, messages in the unacked hash)."""
    client = redis.Redis(port=broker.redis.port)
    try:
        unacked_key = kombu_redis.Channel.unacked_key
        return client.llen(QUEUE), client.hlen(unacked_key)
    finally:
        client.close()


@pytest.mark.parametrize("transport", [STOCK, OURS])
def test_a_worker_survives_closing_its_channel_after_redis_went_away(
    broker: Broker, transport: str
) -> None:
    worker = lose_redis_holding_a_message(broker, transport)
    if transport == STOCK:
        # kombu's bug, still there: the error that stops a Celery worker.
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'hostname'"):
            worker.close_consumer_channel()
    else:
        worker.close_consumer_channel()  # a connection error at most, which Celery ignores


@pytest.mark.parametrize("transport", [STOCK, OURS])
def test_a_message_held_through_a_redis_restart_goes_back_to_its_queue_on_reconnect(
    broker: Broker, transport: str
) -> None:
    worker = lose_redis_holding_a_message(broker, transport)
    # The stock transport raises AttributeError here (the test above): the
    # worker process dies, and a supervisor starts a new one.
    with contextlib.suppress(AttributeError):
        worker.close_consumer_channel()
    broker.redis.start()
    assert count(broker) == (0, 1)  # still unacknowledged, as the crash left it

    connection = connect(broker, transport)
    try:
        connection.connect()  # its first channel connects, as a restarted worker's does
        if transport == STOCK:
            # Back only after the visibility timeout (two hours here).
            assert count(broker) == (0, 1)
            return
        assert count(broker) == (1, 0)
        received: list[Any] = []
        queue = kombu.Queue(QUEUE)
        with connection.Consumer(queue, callbacks=[lambda body, m: received.append(body)]):
            connection.drain_events(timeout=5)
        assert received == [PAYLOAD]
    finally:
        connection.release()


@pytest.mark.parametrize("transport", [STOCK, OURS])
def test_a_message_popped_as_redis_dies_goes_back_to_its_queue_on_reconnect(
    broker: Broker, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu BRPOPs a message, then records it as unacknowledged in a second
    write: Redis killed between the two (the pop already on disk) leaves the
    message in no list and no hash, unless the transport puts it back."""
    record_unacked = kombu_redis.QoS.append

    def die_first(qos: Any, message: Any, delivery_tag: str) -> None:
        broker.redis.crash()
        record_unacked(qos, message, delivery_tag)

    connection = connect(broker, transport)
    _, received = publish_and_consume(connection)
    monkeypatch.setattr(kombu_redis.QoS, "append", die_first)
    with pytest.raises(connection.connection_errors):
        connection.drain_events(timeout=5)
    monkeypatch.undo()
    assert received == []
    with contextlib.suppress(Exception):
        connection.collect()
    broker.redis.start()

    connection = connect(broker, transport)
    try:
        connection.connect()
        if transport == STOCK:
            assert count(broker) == (0, 0)  # gone: its task would wait for good
            return
        assert count(broker) == (1, 0)
        queue = kombu.Queue(QUEUE)
        with connection.Consumer(queue, callbacks=[lambda body, m: received.append(body)]):
            connection.drain_events(timeout=5)
        assert received == [PAYLOAD]
    finally:
        connection.release()


def test_a_sentinel_broker_connection_keeps_the_fixed_transport_on_the_next_sentinel() -> None:
    """kombu moves a failed connection on to the next `;`-separated URL (one
    per sentinel) and re-reads the transport from its scheme: `sentinel` must
    then name taskservice's transport, or the fix is gone after a failover."""
    app = Celery("transport-test", set_as_current=False)
    settings = Settings(
        redis_url="redis://ignored/0",
        redis_sentinels="127.0.0.1:1,127.0.0.1:2",
        redis_sentinel_master=MASTER_NAME,
    )
    apps.configure(app, settings)
    connection = app.connection_for_read()
    try:
        assert connection.transport_cls == apps.SENTINEL_TRANSPORT
        connection.maybe_switch_next()  # what a failed connect does
        assert connection.hostname == "127.0.0.1" and connection.port == 2
        assert connection.transport_cls == "sentinel"  # kombu's own doing
        assert get_transport_cls(connection.transport_cls) is SentinelTransport
    finally:
        connection.release()
