"""Prometheus metrics: every metric taskservice exports is defined here.

A server (`ServerMetrics`, on `metrics_port`):

    taskservice_rpc_requests_total{method, code}       calls answered, by gRPC status code
    taskservice_rpc_duration_seconds{method}           time to answer, unary methods only
    taskservice_watch_streams                          WatchStatus streams open now
    taskservice_tasks_started_total{task_name}         new tasks a Start accepted
    taskservice_tasks_ended_total{task_name, state}    ends this server made (see below)
    taskservice_conflicts_total{task_name, policy}     Starts that met a held exclusivity key
    taskservice_lease_expiries_total                   tasks the sweeper ended: lease lapsed
    taskservice_messages_restored_total                unacknowledged broker messages the
                                                       sweeper put back in their queue
    taskservice_key_waits_total{task_name, policy}     Starts that wait for their key
    taskservice_superseded_total{task_name}            waiting tasks a newer Start superseded
    taskservice_key_handovers                          keys handed from an ended task to a
                                                       waiting one, deployment-wide (read
                                                       from Redis: every server shows the
                                                       same total)

A worker (`WorkerMetrics`, on `worker_metrics_port`, served by its main
process for all its pool processes):

    taskservice_tasks_ended_total{task_name, state}    ends this worker recorded
    taskservice_task_duration_seconds{task_name, state} run time of task bodies
    taskservice_tasks_refused_total{task_name, reason} tasks it would not run: record_lost
                                                       (a Start claimed it, Redis lost it)

Each task end is counted once, by the process that wrote it: the worker for
the outcomes of the tasks it ran (and for those it saw die or time out), the
server for a Cancel that ended a queued task and for the sweeper's LOST ends.
Summed over every server and worker, `tasks_ended_total` counts every end,
except those found by a read: GetStatus, Cancel or a worker's start that
meets a lapsed lease ends the task inside its Redis script, which does not
say so (the sweeper would have ended it within `sweep_interval`).

Labels stay bounded: `task_name` is a task type the deployment exposes (the
server checks it; a record of another name is counted without one), `state`
one of succeeded, failed, cancelled, lost (the TaskState a client sees),
`code` a gRPC status code, `policy` fail, return_existing, quiet or
line_full for conflicts and replace, queue_latest or queue for waits.

A server not serving metrics skips the per-call ones (a counter and a
histogram cost the guard about 2.5 us a call); the rest, a few per task, it
records anyway. With PROMETHEUS_MULTIPROC_DIR set (as `serve --processes N`
and workers with a metrics port do), prometheus_client writes them to files
in that folder and the serving process sums every process's.
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    multiprocess,
    start_http_server,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's multiprocess folder; it must be set before
prometheus_client is first imported by every process that writes to it."""

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
"""Seconds: a GetStatus takes a fraction of a millisecond, a Start waiting
for the broker or a Cancel waiting for its worker up to seconds."""

TASK_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip
"""Seconds: tasks run from milliseconds to an hour."""


def multiprocess_mode() -> bool:
    """True if this process writes its metrics to PROMETHEUS_MULTIPROC_DIR."""
    return bool(os.environ.get(MULTIPROC_DIR))


class ServerMetrics:
    """The metrics of one server process. `registry` None: registered nowhere
    (in multiprocess mode, the files are what is served). Without `per_call`,
    calls are not counted or timed (nobody reads them)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, per_call: bool = True) -> None:
        self.per_call = per_call
        self.rpc_requests = Counter(
            "taskservice_rpc_requests",
            "TaskService calls answered, by method and gRPC status code.",
            ["method", "code"],
            registry=registry,
        )
        self.rpc_duration = Histogram(
            "taskservice_rpc_duration_seconds",
            "Seconds from a unary TaskService call's arrival at its handler to its answer.",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.watch_streams = Gauge(
            "taskservice_watch_streams",
            "WatchStatus streams open now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.tasks_started = Counter(
            "taskservice_tasks_started",
            "New tasks accepted by Start (not repeats or RETURN_EXISTING answers).",
            ["task_name"],
            registry=registry,
        )
        self.tasks_ended = Counter(
            "taskservice_tasks_ended",
            "Task ends written by this process, by the state a client sees.",
            ["task_name", "state"],
            registry=registry,
        )
        self.conflicts = Counter(
            "taskservice_conflicts",
            "Starts that met a held exclusivity key: ALREADY_EXISTS (policy=fail) or "
            "the running task (policy=return_existing).",
            ["task_name", "policy"],
            registry=registry,
        )
        self.lease_expiries = Counter(
            "taskservice_lease_expiries",
            "Tasks the lease sweeper ended because their lease lapsed.",
            registry=registry,
        )
        self.messages_restored = Counter(
            "taskservice_messages_restored",
            "Unacknowledged broker messages the sweeper put back in their queue: their "
            "worker took them and vanished before leasing their tasks.",
            registry=registry,
        )
        self.waits = Counter(
            "taskservice_key_waits",
            "Starts accepted to wait for their exclusivity key, by conflict policy.",
            ["task_name", "policy"],
            registry=registry,
        )
        self.superseded = Counter(
            "taskservice_superseded",
            "Tasks waiting for their key that a newer Start (of task_name) superseded: they "
            "never ran.",
            ["task_name"],
            registry=registry,
        )
        self.handovers = Gauge(
            "taskservice_key_handovers",
            "Exclusivity keys handed from an ended task to a waiting one, in the whole "
            "deployment (the scripts count them in Redis; every server shows the same total).",
            registry=registry,
            multiprocess_mode="max",
        )

    def rpc(self, method: str, *, timed: bool) -> Callable[[enum.Enum, float], None]:
        """What a guarded method calls once per call with its status code (a
        grpc.StatusCode: labelled by its name) and seconds taken; the label
        children are resolved once per code, not per call."""
        if not self.per_call:
            return _ignore
        requests = self.rpc_requests
        requests.labels(method, "OK")  # shown from the start
        counts: dict[enum.Enum, Any] = {}
        duration = self.rpc_duration.labels(method) if timed else None

        def answered(code: enum.Enum, seconds: float) -> None:
            count = counts.get(code)
            if count is None:
                count = counts[code] = requests.labels(method, code.name)
            count.inc()
            if duration is not None:
                duration.observe(seconds)

        return answered


def _ignore(code: enum.Enum, seconds: float) -> None:
    pass


class WorkerMetrics:
    """The metrics of a worker's processes (see `taskservice.worker.metrics`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.tasks_ended = Counter(
            "taskservice_tasks_ended",
            "Task ends written by this worker, by the state a client sees.",
            ["task_name", "state"],
            registry=registry,
        )
        self.task_duration = Histogram(
            "taskservice_task_duration_seconds",
            "Seconds a task body ran, by its outcome (retried: it raised Retry).",
            ["task_name", "state"],
            buckets=TASK_BUCKETS,
            registry=registry,
        )
        self.tasks_refused = Counter(
            "taskservice_tasks_refused",
            "Tasks this worker would not run, by why (record_lost: a Start claimed the "
            "task but Redis lost its record).",
            ["task_name", "reason"],
            registry=registry,
        )

    def declared(self) -> list[MetricWrapperBase]:
        """Every metric of the worker, for `serve` to list from the start."""
        return [self.tasks_ended, self.task_duration, self.tasks_refused]


class _Summed:
    """The sum of the files every process writes (prometheus_client's
    MultiProcessCollector), and the HELP and TYPE of each `declared` metric
    no process has written yet. A process writes a labelled metric's file
    only with its first labelled value: without this, a fresh worker's
    /metrics would list none of its metrics until a task ended."""

    def __init__(self, declared: Sequence[MetricWrapperBase]) -> None:
        self._files = multiprocess.MultiProcessCollector(None)  # type: ignore[no-untyped-call]
        self._declared = declared

    def collect(self) -> Iterator[Metric]:
        written = set()
        for family in self._files.collect():  # type: ignore[no-untyped-call]
            written.add(family.name)
            yield family
        for metric in self._declared:
            for family in metric.describe():  # name, help and type; no samples
                if family.name not in written:
                    yield family


@dataclass
class Endpoint:
    """A running /metrics HTTP endpoint (a daemon thread); `close` stops it."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    def close(self) -> None:
        """Stop serving and wait for the thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(
    host: str,
    port: int,
    registry: CollectorRegistry | None = None,
    *,
    declared: Sequence[MetricWrapperBase] = (),
) -> Endpoint:
    """Serve `registry` on http://host:port/metrics, or, without one, the
    sum of every process writing to PROMETHEUS_MULTIPROC_DIR, listing the
    `declared` metrics (at least their HELP and TYPE) before any process
    wrote them. OSError if the port is taken."""
    if registry is None:
        registry = CollectorRegistry()
        registry.register(_Summed(declared))
    server, thread = start_http_server(port, host, registry=registry)
    return Endpoint(host, server.server_address[1], server, thread)


def own_registry() -> CollectorRegistry:
    """A registry for one process's metrics, with its CPU and memory
    (process_*), as prometheus_client's default registry has."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry
