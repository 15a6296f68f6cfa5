"""A worker's Prometheus endpoint (`worker_metrics_port`), and the metrics its
processes record (taskservice.core.metrics.WorkerMetrics).

The prefork pool runs tasks in child processes, each with memory of its own:
so every process of the worker writes its metrics to files in one folder
(prometheus_client's multiprocess mode) and the main process serves their
sum. The `MetricsEndpoint` bootstep makes the folder, fresh, when the worker
is built: in the main process, before the pool forks, and before
prometheus_client is imported here (it reads the folder's variable then);
the children inherit it all. The folder goes when the worker stops.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from taskservice import apps
from taskservice.core.settings import Settings
from taskservice.core.states import STATE_LABELS

if TYPE_CHECKING:
    from taskservice.core.metrics import Endpoint, WorkerMetrics

logger = logging.getLogger(__name__)

_metrics: WorkerMetrics | None = None


def ended(task_name: str, state: str) -> None:
    """Count a task end this process wrote (`state` a record state)."""
    if _metrics is not None:
        try:
            _metrics.tasks_ended.labels(task_name, STATE_LABELS.get(state, state.lower())).inc()
        except Exception:  # a metric must never fail the task it describes
            logger.exception("recording a task end failed")


def refused(task_name: str, reason: str) -> None:
    """Count a task this process refused to run (`reason`: record_lost)."""
    if _metrics is not None:
        try:
            _metrics.tasks_refused.labels(task_name, reason).inc()
        except Exception:
            logger.exception("recording a refused task failed")


def ran(task_name: str, state: str, seconds: float) -> None:
    """Record how long a task body ran, by how it ended: a record state, or
    "retried"."""
    if _metrics is not None:
        try:
            label = STATE_LABELS.get(state, state.lower())
            _metrics.task_duration.labels(task_name, label).observe(seconds)
        except Exception:
            logger.exception("recording a task's duration failed")


class MetricsEndpoint(bootsteps.StartStopStep):
    """Bootstep serving the worker's metrics from its main process."""

    label = "taskservice metrics"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        settings = apps.settings_of(parent.app) or Settings()
        self.host, self.port = settings.metrics_host, settings.worker_metrics_port
        self.enabled = bool(self.port)
        self._endpoint: Endpoint | None = None
        self._folder = ""
        if self.enabled:
            # Every step is built before any starts, and the pool forks when
            # it starts: here is early enough for the children.
            self._folder = tempfile.mkdtemp(prefix="taskservice-worker-metrics-")
            _record_in(self._folder)
            # Not at stop: pool processes may still write until they exit.
            atexit.register(_remove, self._folder, os.getpid())

    def start(self, parent: Any) -> None:
        """Serve the worker's metrics (Celery calls this once the worker starts)."""
        from taskservice.core.metrics import serve

        try:
            declared = _metrics.declared() if _metrics is not None else []
            self._endpoint = serve(self.host, self.port, declared=declared)
        except OSError as error:
            # The tasks matter more than their metrics: run without.
            logger.error(
                "cannot serve worker metrics on %s:%d (%s); set another "
                "TASKSERVICE_WORKER_METRICS_PORT for each worker of a host",
                self.host,
                self.port,
                error,
            )
            return
        logger.info("metrics on http://%s:%d/metrics", self.host, self._endpoint.port)

    def stop(self, parent: Any) -> None:
        """Stop serving."""
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None


def _record_in(folder: str) -> None:
    global _metrics
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    from prometheus_client import values

    from taskservice.core.metrics import WorkerMetrics

    if not getattr(values.ValueClass, "_multiprocess", False):
        # Something (the app's own code, say) imported prometheus_client
        # before the variable was set: its metrics made so far stay in this
        # process, but ours must go to the folder, or the children's counts
        # would never be seen.
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _metrics = WorkerMetrics()


def _remove(folder: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a pool process that inherited the registration
        shutil.rmtree(folder, ignore_errors=True)
