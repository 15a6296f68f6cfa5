"""A RabbitMQ broker for one test module, on a RabbitMQ others share.

Tests must leave alone what others keep there. Where `rabbitmqctl` works (as
root or as the rabbitmq user), the tests get a virtual host of their own, and
deleting it at the end removes everything Celery declared in it. Elsewhere
they share the broker URL's virtual host, so every queue they use gets a name
of this run's own (`AmqpBroker.queue`; Starts that name no queue go to
`AmqpBroker.default_queue`), and at the end they delete exactly those queues,
their exchanges, and Celery's standard exchanges if this run created them and
nothing else uses them.

TASKSERVICE_TEST_AMQP_URL names another broker; it is used as given (its
virtual host shared).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

import amqp.exceptions
import kombu
import pytest

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"

CELERY_EXCHANGES = {
    "celery": "direct",
    "celery.pidbox": "fanout",
    "reply.celery.pidbox": "direct",
    "celeryev": "topic",
}
"""The exchanges Celery declares by its default names, whoever runs it."""


@dataclass
class AmqpBroker:
    url: str
    """The broker URL the module's server and workers use."""

    default_queue: str | None = None
    """Where Starts that name no queue go and the module's worker consumes;
    None: Celery's own default ("celery"), in a virtual host of our own."""

    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    _queues: list[str] = field(default_factory=list)

    @property
    def worker_env(self) -> dict[str, str]:
        return {"TASKSERVICE_BROKER_URL": self.url}

    @property
    def worker_queues(self) -> str:
        return self.default_queue or "celery"

    def routed(self, stub: pb_grpc.TaskServiceStub) -> pb_grpc.TaskServiceStub:
        """`stub`, with its Starts that name no queue sent to `default_queue`."""
        if self.default_queue is None:
            return stub
        return cast(pb_grpc.TaskServiceStub, _OnQueue(stub, self.default_queue))

    def queue(self, prefix: str) -> str:
        """A queue name of this run's own, starting with `prefix` (a pattern
        in TASKSERVICE_QUEUES), deleted at the end."""
        name = f"{prefix}{self.run}-{uuid.uuid4().hex[:6]}"
        self._queues.append(name)
        return name


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2):
            return True
    except OSError:
        return False


def _rabbitmqctl(*args: str) -> bool:
    command = shutil.which("rabbitmqctl")
    if command is None:
        return False
    try:
        subprocess.run([command, *args], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@contextlib.contextmanager
def amqp_broker() -> Iterator[AmqpBroker]:
    """The module's broker; skips the module if no broker answers."""
    given = os.environ.get("TASKSERVICE_TEST_AMQP_URL")
    url = given or DEFAULT_URL
    if not _answers(url):
        where = urlsplit(url).netloc.rpartition("@")[2]
        pytest.skip(f"no AMQP broker answers at {where} (TASKSERVICE_TEST_AMQP_URL sets where)")
    if given is None:
        vhost = f"taskservice-test-{uuid.uuid4().hex[:10]}"
        user = unquote(urlsplit(url).username or "guest")
        if _rabbitmqctl("add_vhost", vhost):
            try:
                if _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*"):
                    parts = urlsplit(url)
                    yield AmqpBroker(parts._replace(path="/" + quote(vhost, safe="")).geturl())
                    return
            finally:
                if not _rabbitmqctl("delete_vhost", vhost):
                    logger.warning("could not delete the test vhost %r", vhost)
    broker = AmqpBroker(url)
    broker.default_queue = broker.queue("q-amqp-")
    existing = {name for name in CELERY_EXCHANGES if _exchange_exists(url, name)}
    try:
        yield broker
    finally:
        _clean_up(broker, [name for name in CELERY_EXCHANGES if name not in existing])


def _on_channel(url: str, operation: Callable[[Any], object]) -> bool:
    """Run `operation` on a channel of its own (a refusal closes the channel);
    False if the broker refused it."""
    with kombu.Connection(url, connect_timeout=5) as connection:
        channel = connection.channel()
        try:
            operation(channel)
        except amqp.exceptions.ChannelError:
            return False
        with contextlib.suppress(amqp.exceptions.AMQPError, OSError):
            channel.close()
    return True


def _exchange_exists(url: str, name: str) -> bool:
    return _on_channel(
        url, lambda ch: ch.exchange_declare(name, CELERY_EXCHANGES[name], passive=True)
    )


def _clean_up(broker: AmqpBroker, exchanges: list[str]) -> None:
    for name in broker._queues:
        _on_channel(broker.url, lambda ch, name=name: ch.queue_delete(name))
        # Celery declares a direct exchange of the queue's name with it.
        _on_channel(broker.url, lambda ch, name=name: ch.exchange_delete(name))
    for name in exchanges:
        # Only if no queue is bound to it: another run may have come to use it.
        if not _on_channel(broker.url, lambda ch, name=name: ch.exchange_delete(name, True)):
            logger.info("left exchange %r: something else uses it now", name)


class _OnQueue:
    """A stub whose Starts that name no queue go to `queue`."""

    def __init__(self, stub: pb_grpc.TaskServiceStub, queue: str) -> None:
        self._stub = stub
        self._queue = queue

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def Start(self, request: pb.StartRequest, **kwargs: Any) -> Any:
        if not request.options.queue:
            request = pb.StartRequest.FromString(request.SerializeToString())
            request.options.queue = self._queue
        return self._stub.Start(request, **kwargs)
