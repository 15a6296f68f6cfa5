"""`taskservice` command line: serve, worker, dev; and the client commands
(start, status, cancel, watch, ls, tasks: see service.client_cli)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from service import client_cli
from service.config import Settings, unknown_variables

logger = logging.getLogger("taskservice")

DEV_TASKS = "worker.tasks"
"""What `taskservice dev` exposes unless TASKSERVICE_TASKS says otherwise: the demos."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="taskservice", description="A gRPC front door for Celery."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the gRPC server (settings from TASKSERVICE_* variables)"
    )
    serve.add_argument(
        "--processes",
        type=int,
        default=1,
        help="server processes sharing the port (SO_REUSEPORT); default 1",
    )
    commands.add_parser("worker", help="run a Celery worker; extra arguments go to `celery worker`")
    dev = commands.add_parser(
        "dev", help="run an embedded Redis, a worker and the server; Ctrl-C stops all"
    )
    dev.add_argument("--concurrency", type=int, default=2, help="worker processes (default 2)")
    dev.add_argument(
        "--reload",
        action="store_true",
        help="restart the worker when a Python file of the task modules or the current "
        "directory changes (the server keeps the task signatures it started with)",
    )
    client_cli.add_commands(commands)
    # Unknown options belong to `celery worker` (e.g. --concurrency=8 -Q a,b).
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "worker":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in client_cli.COMMANDS:
        return client_cli.run(args)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for line in unknown_variables():
        logger.warning("%s", line)
    if args.command == "serve":
        return _serve_processes(Settings(), args.processes)
    if args.command == "worker":
        return _worker(extra)
    return _dev(args.concurrency, reload=args.reload)


def _serve(settings: Settings) -> int:
    from service.server import StartupError, serve

    try:
        asyncio.run(serve(settings))
    except StartupError as error:
        logger.error("%s", error)
        return 1
    return 0


def _serve_processes(settings: Settings, count: int) -> int:
    """`count` server processes on one port: this one and count - 1 children
    that end with it. The kernel spreads connections over them."""
    if count <= 1:
        return _serve(settings)
    if settings.port == 0:
        logger.error("--processes needs a fixed TASKSERVICE_PORT, not 0")
        return 2
    from service.embedded import tied_to_this_process

    env = {**os.environ, "TASKSERVICE_REUSE_PORT": "true"}
    command = tied_to_this_process([sys.executable, "-m", "service", "serve"])
    children = [subprocess.Popen(command, env=env) for _ in range(count - 1)]
    try:
        return _serve(settings.model_copy(update={"reuse_port": True}))
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait()


def _worker(celery_args: Sequence[str]) -> int:
    from celery.bin.celery import celery

    from worker.app import AppNotFound, load_app, registry
    from worker.registry import NotTrackable

    settings = Settings()
    try:
        # What the server refuses to start, the worker refuses to run.
        celery_app = load_app(settings)
        registry.load(settings.task_modules, celery_app)
    except (AppNotFound, NotTrackable) as error:
        logger.error("%s", error)
        return 1
    # Celery's own command line, so that its exit code reaches the caller
    # (`app.worker_main` drops it): a supervisor must see a crash as one.
    code = celery.main(
        args=["-A", settings.celery_app or "worker.app", "worker", "--loglevel=INFO", *celery_args],
        standalone_mode=False,
    )
    return code if isinstance(code, int) else 0


def worker_command(*celery_args: str) -> list[str]:
    """The command that runs `taskservice worker` as a child that ends if
    this process dies."""
    from service.embedded import tied_to_this_process

    return tied_to_this_process([sys.executable, "-m", "service", "worker", *celery_args])


def _dev(concurrency: int, *, reload: bool = False) -> int:
    from service.dev import DevWorker, Reloader, watched_paths
    from service.embedded import EmbeddedRedis

    settings = Settings()
    if not settings.reuse_port and not _can_listen(settings.host, settings.port):
        # Before starting anything: two dev runs must not share one port.
        logger.error(
            "cannot listen on %s:%d: the port is taken (another taskservice?); "
            "set TASKSERVICE_PORT to another port",
            settings.host,
            settings.port,
        )
        return 1
    # The logs (Redis's too): removed on exit unless something failed.
    run_dir = Path(tempfile.mkdtemp(prefix="taskservice-dev-"))
    try:
        redis_server = EmbeddedRedis(directory=run_dir).start()
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    logger.info("redis: %s (log %s)", redis_server.url, redis_server.log)
    env = {**os.environ, "TASKSERVICE_REDIS_URL": redis_server.url}
    env.setdefault("TASKSERVICE_TASKS", DEV_TASKS)
    env.pop("TASKSERVICE_BROKER_URL", None)
    env.pop("TASKSERVICE_RESULT_BACKEND", None)
    worker = DevWorker(
        worker_command("--loglevel=INFO", "--pool=prefork", f"--concurrency={concurrency}"),
        env,
        run_dir / "worker.log",
    )
    os.environ.update(TASKSERVICE_REDIS_URL=redis_server.url)
    settings = settings.model_copy(
        update={
            "redis_url": redis_server.url,
            "broker_url": None,
            "result_backend": None,
            "tasks": settings.tasks or DEV_TASKS,
        }
    )
    reloader = None
    code = 1
    try:
        worker.start()
        if reload:
            reloader = Reloader(worker, watched_paths(settings.task_modules, Path.cwd()))
            reloader.start()
        logger.info("grpc: %s:%d (Ctrl-C stops everything)", settings.host, settings.port)
        code = _serve(settings)
        return code
    finally:
        if reloader is not None:
            reloader.stop()
        exited = worker.exit_code()
        worker.stop()
        redis_server.stop()
        if exited is None and code == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
            logger.info("stopped redis and worker")
        else:
            logger.info("stopped redis and worker; their logs are kept in %s", run_dir)


def _can_listen(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # Like a server's own socket: a port left in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
