"""Flower (or `celery events`) on the same Redis sees taskservice's tasks: the
worker sends Celery's task events itself, without being asked remotely."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.core.settings import Settings
from taskservice.server.server import Server
from tests.support.client import finished, start

PING = "taskservice-test-ping"


class EventLog:
    """Celery events as a monitor receives them, collected by a thread."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._capture, daemon=True)

    def _capture(self) -> None:
        try:
            with self.app.connection_for_read() as connection:
                self._receiver = self.app.events.Receiver(
                    connection, handlers={"*": self.events.append}
                )
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as error:
            self._failure = error

    def start(self, timeout: float = 20) -> None:
        """Capture, and return once the capture sees events (its subscription
        is live: an event published before it would be missed)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        with self.app.events.default_dispatcher() as dispatcher:
            while not any(event["type"] == PING for event in self.events):
                assert self._failure is None, self._failure
                assert time.monotonic() < deadline, "the receiver never saw an event"
                dispatcher.send(PING)
                time.sleep(0.1)

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)

    def of_task(self, task_id: str) -> list[str]:
        return [event["type"] for event in list(self.events) if event.get("uuid") == task_id]


@pytest.fixture
def event_log(settings: Settings, server: Server) -> Iterator[EventLog]:
    # An app of its own on the session's broker, like Flower's: the
    # process's taskservice app may point at another module's broker.
    log = EventLog(Celery("monitor", broker=settings.effective_broker_url, set_as_current=False))
    log.start()
    yield log
    log.stop()


async def test_the_worker_sends_task_events_for_a_task_started_over_grpc(
    stub: pb_grpc.TaskServiceStub, event_log: EventLog
) -> None:
    task = await start(stub, "test.echo", "seen")
    assert (await finished(stub, task.id)).state == pb.TASK_STATE_SUCCEEDED
    wanted = ["task-received", "task-started", "task-succeeded"]
    for _ in range(100):
        if all(kind in event_log.of_task(task.id) for kind in wanted):
            break
        await asyncio.sleep(0.1)
    # Nobody switched them on (`celery control enable_events`): the worker
    # sends them by its configuration. (With JSON logs, `taskservice worker`
    # prints no banner to say "task events: ON".)
    assert event_log.of_task(task.id) == wanted
