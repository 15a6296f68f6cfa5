"""Flower (or `celery events`) on the same Redis sees taskservice's tasks: the
worker sends Celery's task events itself, without being asked remotely, unless
TASKSERVICE_TASK_EVENTS turns them off."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import stop_process_group
from taskservice.core.settings import Settings
from taskservice.server.server import Server
from tests.conftest import start_worker
from tests.support.client import finished, start, start_request

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

    def caught_up(self, timeout: float = 20) -> None:
        """Return once every event published before this call was captured
        (one channel, in order: a ping sent now arrives after them)."""
        mark = f"{PING}-{uuid.uuid4().hex}"
        deadline = time.monotonic() + timeout
        with self.app.events.default_dispatcher() as dispatcher:
            dispatcher.send(mark)
        while not any(event["type"] == mark for event in self.events):
            assert self._failure is None, self._failure
            assert time.monotonic() < deadline, "the receiver fell behind"
            time.sleep(0.05)

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


async def test_a_worker_with_task_events_off_sends_none(
    stub: pb_grpc.TaskServiceStub, event_log: EventLog, tmp_path: Path
) -> None:
    queue = f"q-quiet-{uuid.uuid4().hex[:8]}"
    worker = start_worker(
        tmp_path / "worker.log",
        concurrency=1,
        queues=queue,
        env={"TASKSERVICE_TASK_EVENTS": "false"},
    )
    try:
        ids = []
        for _ in range(2):
            request = start_request("test.echo", "unseen")
            request.options.queue = queue
            ids.append((await stub.Start(request)).task.id)
        # One process: the second ran after the first's events would have gone.
        for task_id in ids:
            assert (await finished(stub, task_id)).state == pb.TASK_STATE_SUCCEEDED
        await asyncio.to_thread(event_log.caught_up)
        assert [event_log.of_task(task_id) for task_id in ids] == [[], []]
    finally:
        stop_process_group(worker)
