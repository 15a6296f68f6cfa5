"""The worker's heartbeat: it renews the lease of every task the worker holds.

A thread in the worker's main process (a Celery bootstep), not in the task
body, so a busy or blocked task never loses its lease while its worker lives.
Every `heartbeat_interval` (and at once when a task arrives) it renews, in
one script call, the tasks in Celery's own bookkeeping of the worker
(`celery.worker.state`):
- the tasks it runs (`active_requests`), and
- the tasks it holds unstarted: prefetched, or waiting for their countdown.

When the worker dies, nothing renews them: they end LOST within `lease` (plus
a sweep), and their exclusivity keys are free. When it loses its broker
connection, Celery drops the unstarted ones (kombu redelivers them only after
its visibility timeout), so they end LOST too and the late copy is refused.

A warm shutdown first drops the unstarted tasks from Celery's bookkeeping,
waits for the running ones, and only then hands the unstarted messages back
to the broker. The heartbeat keeps their leases alive through that wait (a
worker killed during it leaves them LOST, not stuck) and drops the leases as
the process exits, so they wait in the broker again, unleased.

With `heartbeat_file` set, each beat that renewed every lease it had to (or
had none to renew) touches that file: `taskservice health --worker` reads its
age as "this worker still vouches for its tasks" (a Kubernetes liveness probe).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from pathlib import Path
from typing import Any

from celery import bootsteps
from celery.signals import task_received, worker_shutting_down
from celery.worker import state

from taskservice.worker.reporter import reporter_of

logger = logging.getLogger(__name__)

RECEIVE_DELAY = 0.25
"""Seconds between a task's arrival and the beat it triggers. A task that
starts sooner gets its lease from its start (no beat needed, none made, so a
busy worker does not beat per task); one held longer is leased then, together
with whatever else arrived meanwhile."""


def held_tasks() -> tuple[list[str], list[str]]:
    """(ids of the tasks this worker runs, ids of those it holds unstarted),
    from Celery's bookkeeping, which the consumer thread changes meanwhile."""
    requests: dict[str, Any] = dict(state.requests)  # a dict copy is atomic under the GIL
    # Copying a WeakSet runs Python code between items; its underlying set
    # of references copies atomically.
    refs: set[Any] = set(state.active_requests.data)  # type: ignore[attr-defined]
    active = {request.id for request in _alive(refs)}
    running = sorted(task_id for task_id in requests if task_id in active)
    unstarted = sorted(task_id for task_id in requests if task_id not in active)
    return running, unstarted


def _alive(refs: set[Any]) -> list[Any]:
    return [request for request in (ref() for ref in refs) if request is not None]


class Heartbeat(bootsteps.StartStopStep):
    """Bootstep running the heartbeat thread in the worker's main process."""

    label = "taskservice heartbeat"
    # A deterministic place in the worker's start order; its stop() runs
    # before the pool waits for running tasks, which still need their leases.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._wake = threading.Event()
        self._exiting = threading.Event()
        self._handed_back: set[str] = set()
        self._reporter: Any = None
        self._hostname = ""
        self._pid = 0
        self._alive_file: Path | None = None
        self._touch_failed = False

    def start(self, parent: Any) -> None:
        """Start the heartbeat thread (Celery calls this once the pool is up)."""
        self._reporter = reporter_of(parent.app)
        self._hostname = parent.hostname
        self._pid = os.getpid()
        if self._reporter.settings.heartbeat_file:
            self._alive_file = Path(self._reporter.settings.heartbeat_file)
            self._mark_alive()  # alive from the start: nothing to renew yet
        task_received.connect(self._on_received, weak=False)
        worker_shutting_down.connect(self._on_shutting_down, weak=False)
        atexit.register(self._at_exit)
        threading.Thread(
            target=self._run,
            args=(self._reporter.heartbeat_interval,),
            name="taskservice-heartbeat",
            daemon=True,
        ).start()

    def _on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        # Lease it soon rather than at the next beat: a worker dying in
        # between would leave the task waiting for kombu's redelivery.
        self._wake.set()

    def _on_shutting_down(self, **_: Any) -> None:
        self._handed_back.update(held_tasks()[1])

    def _run(self, interval: float) -> None:
        while not self._exiting.is_set():
            if self._wake.wait(interval):
                self._exiting.wait(RECEIVE_DELAY)
            self._wake.clear()
            if self._exiting.is_set():
                return
            self.beat()

    def beat(self) -> None:
        """Renew the leases of every task this worker holds, once."""
        running, held = held_tasks()
        held = sorted(set(held) | self._handed_back)
        if not running and not held:
            self._mark_alive()
            return
        reporter = self._reporter
        call = reporter.scripts.renew(
            running, held, worker=self._hostname, lease_ms=reporter.lease_ms
        )
        try:
            reporter.run(call)
        except Exception:
            # The leases simply lapse if this lasts, which is the truth: this
            # worker cannot vouch for its tasks.
            logger.exception("heartbeat failed for %d tasks", len(running) + len(held))
        else:
            self._mark_alive()

    def _mark_alive(self) -> None:
        """Touch `heartbeat_file` (if set): every lease this worker holds is renewed."""
        if self._alive_file is None:
            return
        try:
            self._alive_file.touch()
        except OSError as error:
            # Logged once: a missing or read-only folder stays so, and the
            # liveness probe reading the file says the rest.
            if not self._touch_failed:
                logger.error("cannot touch the heartbeat file %s: %s", self._alive_file, error)
            self._touch_failed = True
        else:
            self._touch_failed = False

    def _at_exit(self) -> None:
        if os.getpid() != self._pid:
            return  # a forked pool process inherited the registration
        self._exiting.set()
        self._wake.set()
        if self._handed_back:
            # Their messages are back in the broker: let them wait there unleased.
            try:
                call = self._reporter.scripts.release(sorted(self._handed_back))
                self._reporter.run(call, retry_for=0)
            except Exception:
                logger.exception("could not drop the leases of %d tasks", len(self._handed_back))
