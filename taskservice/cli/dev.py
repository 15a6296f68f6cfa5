"""The worker of `taskservice dev`, and `--reload`: restart it when task code changes.

The server keeps running across restarts, with the task types it loaded at
start: ListTaskTypes and the argument checks of Start see a changed
signature (or a new task) only once `taskservice dev` itself is restarted.
A running server cannot re-import task modules (Celery keeps the first task
registered under a name), and restarting it would drop every client's calls.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from taskservice.cli.embedded import stop_process_group

logger = logging.getLogger("taskservice")

STOP_WAIT = 10.0
"""Seconds a worker being restarted gets to finish its running tasks (Celery's
warm shutdown) before it is killed; a task killed so ends LOST."""


class DevWorker:
    """A worker process that can be stopped and started again, each run's
    output appended to one log file."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self._command = list(command)
        self._env = dict(env)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the worker process (again, after a restart)."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self._command,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: the terminal's Ctrl-C reaches only dev,
                # which stops the worker (and its pool) in order.
                start_new_session=True,
            )
        logger.info("worker: pid %d (log %s)", self.process.pid, self.log)

    def exit_code(self) -> int | None:
        """The code the worker exited with on its own; None while it runs
        (or before it started)."""
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = STOP_WAIT) -> None:
        """A warm shutdown: SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.process is not None:
            stop_process_group(self.process, timeout)


def watched_paths(task_modules: Iterable[str], cwd: Path) -> list[Path]:
    """What `--reload` watches: the current directory and the directory of
    each task module (recursively; installed packages are left out: their
    code does not change under a developer)."""
    paths = {cwd.resolve()}
    for module in task_modules:
        try:
            spec = importlib.util.find_spec(module)
        except Exception:  # a parent package that fails to import
            spec = None
        if spec is None or not spec.has_location or not spec.origin:
            logger.warning("reload: cannot find module %s; not watching it", module)
            continue
        directory = Path(spec.origin).resolve().parent
        if not {"site-packages", "dist-packages"} & set(directory.parts):
            paths.add(directory)
    return sorted(p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths))


class Reloader:
    """A thread that restarts `worker` whenever a Python file under `paths`
    changes (`.venv`, `.git`, `__pycache__` and the like excepted)."""

    def __init__(self, worker: DevWorker, paths: Sequence[Path]) -> None:
        self._worker = worker
        self._paths = list(paths)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reload", daemon=True)

    def start(self) -> None:
        # Its "1 change detected" says less than our own line.
        """Watch the task code in a background thread."""
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; returns once a restart under way is done."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:  # e.g. the system's limit of watched folders
            logger.exception("reload: watching failed; the worker no longer restarts on changes")

    def _watch(self) -> None:
        from watchfiles import PythonFilter, watch

        reported: subprocess.Popen[bytes] | None = None
        hinted = watching = False
        # Wakes every second without changes, to report a worker that died.
        for changes in watch(
            *self._paths,
            watch_filter=PythonFilter(),
            stop_event=self._stopping,
            rust_timeout=1000,
            yield_on_timeout=True,
            ignore_permission_denied=True,
        ):
            if self._stopping.is_set():
                return
            if not watching:  # said once the watch is set up: changes from now on count
                watching = True
                logger.info("reload: watching %s", ", ".join(str(p) for p in self._paths))
            if not changes:
                code = self._worker.exit_code()
                if code is not None and reported is not self._worker.process:
                    reported = self._worker.process
                    logger.error(
                        "worker exited with code %d (log %s); it restarts when a watched "
                        "file changes",
                        code,
                        self._worker.log,
                    )
                continue
            changed = sorted({path for _, path in changes})
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            logger.info(
                "reload: %s changed; restarting the worker (running tasks get %gs to finish)",
                ", ".join(changed[:3]) + more,
                STOP_WAIT,
            )
            self._worker.stop()
            self._worker.start()
            if not hinted:
                hinted = True
                logger.info(
                    "reload: the server still checks Starts against the task signatures it "
                    "loaded; restart `taskservice dev` after changing parameters or adding tasks"
                )
