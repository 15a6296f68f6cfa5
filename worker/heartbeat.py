"""The worker's heartbeat: it renews the lease of every task the worker holds,
and stops the tasks it can no longer vouch for.

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

A task is leased RECEIVE_DELAY after it arrives (or at its start, if sooner).
A worker that dies before then leaves no lease to lapse: the task is QUEUED,
its message unacknowledged in the broker. With the broker on the records' Redis,
each server's sweep puts that message back in its queue once it is older than
the lease and its task still has none (taskservice.server.unacked), and
another worker runs it; RabbitMQ requeues it as the connection drops. That
sweep relies on what follows: a live worker leases every task it holds within
RECEIVE_DELAY plus one renewal, or its fence drops the task before the lease
could have lapsed, so an unleased task older than the lease is nobody's.

The fence. A worker that lives but cannot renew (Redis unreachable, the link
stalled, the worker frozen and resumed) must not run a task past its lease:
the key's next holder may start then. So a second thread, the `Fence`, stops
each task `fence_margin` before its lease could lapse, counted from when the
last renewal that covered it was sent (or from the task's arrival, if none
did yet; a lease starts when Redis takes the write, never earlier): it sends
the pool process running it SIGTERM, then SIGKILL half the margin later, and
puts a task held unstarted on Celery's revoked list, so it never starts here.
A renewal whose answer says the task is no longer this worker's (ended LOST,
run elsewhere) stops it at once. A stopped task is never renewed again, and
its record is left to its lease: it ends LOST (the worker writes nothing, as
it could only write late). Each renewal is one attempt bounded well within
the margin (`Reporter.run_bounded`); after a failure the next comes sooner.

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
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
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

RUNNING_POLL = 0.05
"""Seconds between the fence's looks at a running task it is stopping."""

HELD_POLL = 0.5
"""Seconds between its looks at a dropped task Celery still holds (one that
was already on its way to a pool process is stopped when it shows up)."""

FENCED_KEPT = 4096
"""How many stopped task ids the worker remembers (for the hooks that would
otherwise write their ends)."""

_FENCED: OrderedDict[str, str] = OrderedDict()
_FENCED_LOCK = threading.Lock()


def fenced(task_id: str) -> str:
    """Why this worker stopped (or dropped) the task because it could not
    vouch for it; "" if it did not."""
    with _FENCED_LOCK:
        return _FENCED.get(task_id, "")


def _fence(task_id: str, reason: str) -> bool:
    """Remember the task as stopped; False if it already was."""
    with _FENCED_LOCK:
        if task_id in _FENCED:
            return False
        _FENCED[task_id] = reason
        while len(_FENCED) > FENCED_KEPT:
            _FENCED.popitem(last=False)
        return True


def held_tasks() -> tuple[list[str], list[str]]:
    """(ids of the tasks this worker runs, ids of those it holds unstarted),
    from Celery's bookkeeping, which the consumer thread changes meanwhile."""
    requests: dict[str, Any] = dict(state.requests)  # a dict copy is atomic under the GIL
    active = {request.id for request in _active()}
    running = sorted(task_id for task_id in requests if task_id in active)
    unstarted = sorted(task_id for task_id in requests if task_id not in active)
    return running, unstarted


def _active() -> list[Any]:
    # Copying a WeakSet runs Python code between items; its underlying set
    # of references copies atomically.
    refs: set[Any] = set(state.active_requests.data)  # type: ignore[attr-defined]
    return [request for request in (ref() for ref in refs) if request is not None]


class Fence:
    """Stops the tasks whose leases this worker could not renew in time.

    It watches the tasks of taskservice (`Tracked`) from their arrival;
    `vouch` records when a renewal covering them was sent, and a thread stops
    each once `lease - margin` has passed since (on the monotonic clock, which
    also runs while the process is stopped). Tasks without a record (not
    started through taskservice) have no lease and are left alone."""

    def __init__(self, *, lease: float, margin: float, exiting: threading.Event) -> None:
        self.lease = lease
        self.margin = margin
        self.grace = margin / 2
        """Seconds between SIGTERM and SIGKILL."""
        self._exiting = exiting
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._watched: dict[str, tuple[float, float]] = {}
        """Task id -> (when it arrived, since when its lease is vouched for)."""
        self._stopping: dict[str, float | None] = {}
        """Running tasks being stopped -> when SIGTERM was sent (None: not yet)."""

    def start(self) -> None:
        threading.Thread(target=self._run, name="taskservice-fence", daemon=True).start()

    def arrived(self, task_id: str, when: float) -> None:
        """A task arrived: no lease of it can have started before `when`."""
        with self._lock:
            self._watched.setdefault(task_id, (when, when))
        self._changed.set()

    def vouch(self, task_ids: Iterable[str], sent: float) -> None:
        """A renewal of `task_ids` sent at `sent` succeeded."""
        with self._lock:
            for task_id in task_ids:
                watched = self._watched.get(task_id)
                if watched is not None:
                    self._watched[task_id] = (watched[0], max(watched[1], sent))
        self._changed.set()

    def forget(self, task_ids: Iterable[str]) -> None:
        """Stop watching these tasks (they have no record, hence no lease)."""
        with self._lock:
            for task_id in task_ids:
                self._watched.pop(task_id, None)

    def keep(self, task_ids: Iterable[str], *, seen: float) -> None:
        """Forget the tasks the worker no longer held at `seen` (ones that
        arrived since are kept)."""
        kept = set(task_ids)
        with self._lock:
            for task_id, (arrived, _) in list(self._watched.items()):
                if task_id not in kept and arrived < seen:
                    del self._watched[task_id]

    def stop(self, task_id: str, reason: str) -> None:
        """Stop the task now (running) or drop it (held unstarted)."""
        if not _fence(task_id, reason):
            return
        logger.warning("stopping task %s: %s", task_id, reason)
        with self._lock:
            self._watched.pop(task_id, None)
            self._stopping[task_id] = None
        self._changed.set()

    def _run(self) -> None:
        while not self._exiting.is_set():
            cutoff = self.lease - self.margin
            now = time.monotonic()
            with self._lock:
                due = [t for t, (_, since) in self._watched.items() if since + cutoff <= now]
            for task_id in due:
                self.stop(
                    task_id,
                    f"this worker could not renew its lease for {cutoff:g}s "
                    f"(lease {self.lease:g}s, fence margin {self.margin:g}s)",
                )
            timeout = self._enforce()
            with self._lock:
                wake = min((since + cutoff for _, since in self._watched.values()), default=None)
            if wake is not None:
                until = max(0.0, wake - time.monotonic())
                timeout = until if timeout is None else min(timeout, until)
            self._changed.wait(timeout)
            self._changed.clear()

    def _enforce(self) -> float | None:
        """Signal (or drop) each task being stopped, and forget those that
        are gone; seconds until it should look again (None: nothing to do)."""
        with self._lock:
            stopping = dict(self._stopping)
        if not stopping:
            return None
        active = {request.id: request for request in _active()}
        poll = None
        for task_id, termed in stopping.items():
            request = active.get(task_id)
            if request is None:
                if task_id not in state.requests:
                    with self._lock:
                        self._stopping.pop(task_id, None)
                    continue
                # Held unstarted: Celery discards it when it comes to run it.
                # Watched until then, should it have been on its way to a pool
                # process already.
                state.revoked.add(task_id)
                poll = poll or HELD_POLL
                continue
            poll = RUNNING_POLL
            pid = _running_pid(request)
            if pid is None:
                continue  # its outcome is back: it leaves Celery's books
            now = time.monotonic()
            if termed is None:
                _signal(pid, signal.SIGTERM, task_id)
                with self._lock:
                    self._stopping[task_id] = now
            elif now - termed >= self.grace:
                _signal(pid, signal.SIGKILL, task_id)
                with self._lock:
                    self._stopping[task_id] = float("inf")  # killed: wait for it to go
        return poll


def _tracked(request: Any) -> bool:
    """True for a task taskservice tracks (it has a record, and a lease once a
    worker holds it); the fence leaves every other task of the worker alone."""
    from taskservice.worker.signals import Tracked  # signals imports this module

    return isinstance(getattr(request, "task", None), Tracked)


def _running_pid(request: Any) -> int | None:
    """The pool process running `request` now; None if it is not (yet) in
    one, or its outcome is already back (the process may run another)."""
    pid = getattr(request, "worker_pid", None)
    ref = getattr(request, "_apply_result", None)
    job = ref() if ref is not None else None
    if not pid or job is None or job.ready():
        return None
    return int(pid)


def _signal(pid: int, signum: int, task_id: str) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return
    logger.warning(
        "sent %s to pool process %d running task %s", signal.Signals(signum).name, pid, task_id
    )


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
        self._fence: Fence | None = None
        self._hostname = ""
        self._pid = 0
        self._alive_file: Path | None = None
        self._touch_failed = False
        self._failing_since: float | None = None

    def start(self, parent: Any) -> None:
        """Start the heartbeat thread (Celery calls this once the pool is up)."""
        self._reporter = reporter_of(parent.app)
        self._hostname = parent.hostname
        self._pid = os.getpid()
        if self._reporter.settings.heartbeat_file:
            self._alive_file = Path(self._reporter.settings.heartbeat_file)
            self._mark_alive()  # alive from the start: nothing to renew yet
        self._fence = Fence(
            lease=self._reporter.lease_ms / 1000,
            margin=self._reporter.fence_margin,
            exiting=self._exiting,
        )
        task_received.connect(self._on_received, weak=False)
        worker_shutting_down.connect(self._on_shutting_down, weak=False)
        atexit.register(self._at_exit)
        self._fence.start()
        threading.Thread(
            target=self._run,
            args=(self._reporter.heartbeat_interval,),
            name="taskservice-heartbeat",
            daemon=True,
        ).start()

    def _on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        task_id = getattr(request, "id", None)
        if task_id and self._fence is not None and _tracked(request):
            self._fence.arrived(task_id, time.monotonic())
        # Lease it soon rather than at the next beat: a worker dying in
        # between leaves the task to the servers' sweep of unacknowledged
        # messages (a lease later), or with another Redis broker to kombu's
        # redelivery (its visibility timeout).
        self._wake.set()

    def _on_shutting_down(self, **_: Any) -> None:
        self._handed_back.update(held_tasks()[1])

    def _run(self, interval: float) -> None:
        # After a failed renewal, try again well before the fence stops anything.
        retry = min(interval, self._reporter.fence_margin / 4)
        delay = interval
        while not self._exiting.is_set():
            if self._wake.wait(delay):
                self._exiting.wait(RECEIVE_DELAY)
            self._wake.clear()
            if self._exiting.is_set():
                return
            delay = interval if self.beat() else retry

    def beat(self) -> bool:
        """Renew the leases of every task this worker holds, once; False if
        the renewal failed."""
        seen = time.monotonic()
        running, held = held_tasks()
        held = sorted(set(held) | self._handed_back)
        fence = self._fence
        assert fence is not None
        fence.keep(running + held, seen=seen)
        running = [task_id for task_id in running if not fenced(task_id)]
        held = [task_id for task_id in held if not fenced(task_id)]
        if not running and not held:
            # Nothing to vouch for; after a failed renewal (the fence may have
            # stopped every task since), alive only once Redis answers again.
            if self._failing_since is None or self._reporter.reachable():
                self._failing_since = None
                self._mark_alive()
            return True
        reporter = self._reporter
        call = reporter.scripts.renew(
            running, held, worker=self._hostname, lease_ms=reporter.lease_ms
        )
        sent = time.monotonic()
        try:
            renewed = reporter.run_bounded(call)
        except Exception as exc:
            # The leases lapse if this lasts, which is the truth: this worker
            # cannot vouch for its tasks, and the fence stops them in time.
            if self._failing_since is None:
                self._failing_since = sent
                logger.warning(
                    "heartbeat failed for %d tasks (%s); retrying", len(running) + len(held), exc
                )
            return False
        if self._failing_since is not None:
            logger.warning("heartbeat renewed again after %.1fs", sent - self._failing_since)
            self._failing_since = None
        gone = set(renewed.gone)
        fence.forget(renewed.unknown)
        fence.vouch([t for t in running + held if t not in gone], sent)
        for task_id in sorted(gone):
            fence.stop(
                task_id, "its record says it is no longer this worker's (LOST, or run elsewhere)"
            )
        self._mark_alive()
        return True

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
