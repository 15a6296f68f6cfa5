"""The worker's heartbeat: it renews the lease of every task the worker holds.

A thread in the worker's main process (a Celery bootstep), not in the task
body, so a busy or blocked task never loses its lease while its worker lives.
Every `heartbeat_interval` it renews, in one script call:
- the tasks the worker runs (Celery's active requests), and
- the tasks it holds unstarted: prefetched, or waiting for their countdown.
When the worker dies, nothing renews them: they end LOST within `lease` (plus
a sweep), and their exclusivity keys are free. On a warm shutdown the worker
hands unstarted tasks back to the broker, so their leases are dropped.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from celery import bootsteps
from celery.signals import task_received
from celery.worker import state

logger = logging.getLogger(__name__)

BATCH_DELAY = 0.05


class Holdings:
    """The requests this worker process holds, by task id."""

    def __init__(self) -> None:
        # Written by the consumer thread (one dict operation at a time, atomic
        # under the GIL), read by the heartbeat thread from a copy.
        self._received: dict[str, weakref.ref[Any]] = {}

    def received(self, request: Any) -> None:
        self._received[request.id] = weakref.ref(request)

    def snapshot(self) -> tuple[list[str], list[str]]:
        """(ids of tasks running, ids of tasks held unstarted)."""
        running = _ids(state.active_requests)
        held = []
        for task_id, ref in self._received.copy().items():
            request = ref()
            if request is None:
                self._received.pop(task_id, None)
            elif not request.acknowledged and task_id not in running:
                held.append(task_id)
        return sorted(running), held


def _ids(requests: Any) -> set[str]:
    # A WeakSet the consumer thread changes while we copy it: copy again.
    for _ in range(10):
        try:
            return {request.id for request in list(requests)}
        except RuntimeError:
            continue
    return set()


class Heartbeat(bootsteps.StartStopStep):
    """Bootstep running the heartbeat thread in the worker's main process."""

    label = "taskservice heartbeat"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._holdings = Holdings()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._reporter: Any = None
        self._hostname = ""

    def start(self, parent: Any) -> None:
        app = parent.app
        settings = app.settings
        self._reporter = app.reporter
        self._hostname = parent.hostname
        task_received.connect(self._on_received, weak=False)
        self._thread = threading.Thread(
            target=self._run,
            args=(settings.heartbeat_interval,),
            name="taskservice-heartbeat",
            daemon=True,
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        task_received.disconnect(self._on_received)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _, held = self._holdings.snapshot()
        if held and self._reporter is not None:
            # Their messages return to the queue; let them wait there unleased.
            try:
                self._reporter.run(self._reporter.scripts.release(held))
            except Exception:
                logger.exception("could not release the leases of %d unstarted tasks", len(held))

    shutdown = stop

    def _on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        if request is not None and getattr(request, "id", None):
            self._holdings.received(request)
            # Lease it now rather than at the next beat: a worker dying in
            # between would leave the task waiting for kombu's redelivery.
            self._wake.set()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.beat()
            # Tasks received together are leased together.
            self._stop.wait(BATCH_DELAY)

    def beat(self) -> None:
        running, held = self._holdings.snapshot()
        if not running and not held:
            return
        reporter = self._reporter
        call = reporter.scripts.renew(
            running, held, worker=self._hostname, lease_ms=reporter.lease_ms
        )
        try:
            reporter.run(call)
        except Exception:
            # Celery would not hear of it; the leases simply lapse if this
            # lasts, which is the truth: this worker cannot vouch for them.
            logger.exception("heartbeat failed for %d tasks", len(running) + len(held))
