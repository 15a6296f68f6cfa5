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

from service import client_cli, logs
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
    client_cli.add_commands(commands)
    # Unknown options belong to `celery worker` (e.g. --concurrency=8 -Q a,b).
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "worker":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in client_cli.COMMANDS:
        return client_cli.run(args)

    logs.configure(log_format(args.command, Settings()))
    for line in unknown_variables():
        logger.warning("%s", line)
    if args.command == "serve":
        return _serve_processes(Settings(), args.processes)
    if args.command == "worker":
        return _worker(extra)
    return _dev(args.concurrency)


def log_format(command: str, settings: Settings) -> str:
    """How `command` logs: as `settings` say, but readable in `dev` unless
    TASKSERVICE_LOG_FORMAT is set."""
    if command == "dev" and "log_format" not in settings.model_fields_set:
        return "console"  # a person reads it
    return settings.log_format


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
    metrics_folder = ""
    if settings.metrics_port:
        # Every process writes its metrics to files in one folder; this one
        # serves their sum. prometheus_client reads the variable when first
        # imported, which in this process is still to come (service.server).
        metrics_folder = tempfile.mkdtemp(prefix="taskservice-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_folder
        env.update(PROMETHEUS_MULTIPROC_DIR=metrics_folder, TASKSERVICE_METRICS_PORT="0")
    command = tied_to_this_process([sys.executable, "-m", "service", "serve"])
    children = [subprocess.Popen(command, env=env) for _ in range(count - 1)]
    try:
        return _serve(settings.model_copy(update={"reuse_port": True}))
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait()
        if metrics_folder:
            shutil.rmtree(metrics_folder, ignore_errors=True)


def _worker(celery_args: Sequence[str]) -> int:
    from celery.bin.celery import celery
    from celery.signals import setup_logging

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

    def take_over_logging(loglevel: int | None = None, **_: object) -> None:
        # Connected, this replaces Celery's own logging setup (in the main
        # process; pool processes inherit it): its lines look like ours.
        logs.configure(settings.log_format, level=loglevel or logging.INFO)
        if celery_app.conf.worker_redirect_stdouts:  # as Celery would: print() is logged
            celery_app.log.redirect_stdouts(celery_app.conf.worker_redirect_stdouts_level)

    setup_logging.connect(take_over_logging, weak=False)
    # Celery prints its banner as text, bypassing logging: not among JSON lines.
    quiet = ["--quiet"] if settings.log_format == "json" else []
    # Celery's own command line, so that its exit code reaches the caller
    # (`app.worker_main` drops it): a supervisor must see a crash as one.
    app = settings.celery_app or "worker.app"
    code = celery.main(
        args=["-A", app, *quiet, "worker", "--loglevel=INFO", *celery_args],
        standalone_mode=False,
    )
    return code if isinstance(code, int) else 0


def worker_command(*celery_args: str) -> list[str]:
    """The command that runs `taskservice worker` as a child that ends if
    this process dies."""
    from service.embedded import tied_to_this_process

    return tied_to_this_process([sys.executable, "-m", "service", "worker", *celery_args])


def _dev(concurrency: int) -> int:
    from service.embedded import EmbeddedRedis, stop_process_group

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
    run_dir = Path(tempfile.mkdtemp(prefix="taskservice-dev-"))
    redis_server = EmbeddedRedis().start()
    logger.info("redis: %s (log %s)", redis_server.url, redis_server.log)
    env = {**os.environ, "TASKSERVICE_REDIS_URL": redis_server.url}
    env.setdefault("TASKSERVICE_TASKS", DEV_TASKS)
    env.setdefault("TASKSERVICE_LOG_FORMAT", "console")
    env.pop("TASKSERVICE_BROKER_URL", None)
    env.pop("TASKSERVICE_RESULT_BACKEND", None)
    worker_log = run_dir / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            worker_command("--loglevel=INFO", "--pool=prefork", f"--concurrency={concurrency}"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: the terminal's Ctrl-C reaches only us, and we
            # stop the worker (and its pool) in order.
            start_new_session=True,
        )
    logger.info("worker: pid %d (log %s)", worker.pid, worker_log)
    os.environ.update(TASKSERVICE_REDIS_URL=redis_server.url)
    settings = settings.model_copy(
        update={
            "redis_url": redis_server.url,
            "broker_url": None,
            "result_backend": None,
            "tasks": settings.tasks or DEV_TASKS,
        }
    )
    try:
        logger.info("grpc: %s:%d (Ctrl-C stops everything)", settings.host, settings.port)
        return _serve(settings)
    finally:
        stop_process_group(worker)
        redis_server.stop()
        logger.info("stopped redis and worker; logs were in %s", run_dir)


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
