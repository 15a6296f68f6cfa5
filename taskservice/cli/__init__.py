"""`taskservice` command line: serve, worker, dev, health; and the client commands
(start, status, cancel, cancel-many, watch, ls, tasks: see
taskservice.client.commands)."""

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
import time
from collections.abc import Sequence
from pathlib import Path

from taskservice.client import commands as client_commands
from taskservice.core import logs
from taskservice.core.settings import Settings, unknown_variables

logger = logging.getLogger("taskservice")

DEV_TASKS = "taskservice.worker.tasks"
"""What `taskservice dev` exposes unless TASKSERVICE_TASKS says otherwise: the demos."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `taskservice` command with `argv` (default: sys.argv[1:]); its exit code."""
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
    health = commands.add_parser(
        "health",
        help="check the gRPC health service of the server at TASKSERVICE_HOST:TASKSERVICE_PORT "
        "(exit 0 when SERVING, else 1)",
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    health.add_argument("--service", default="", help='service name (default "": the server)')
    health.add_argument("--cert-file", default="", help="PEM client certificate (mutual TLS)")
    health.add_argument("--key-file", default="", help="PEM key of --cert-file")
    health.add_argument(
        "--worker",
        action="store_true",
        help="check this machine's worker instead: its heartbeat renewed every lease it holds "
        "within TASKSERVICE_LEASE seconds (the age of TASKSERVICE_HEARTBEAT_FILE)",
    )
    client_commands.add_commands(commands)
    # Unknown options belong to `celery worker` (e.g. --concurrency=8 -Q a,b).
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "worker":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in client_commands.COMMANDS:
        return client_commands.run(args)
    if args.command == "health" and args.worker:
        return _worker_health()
    if args.command == "health":  # one line of its own, no logging
        return _health(args.timeout, args.service, args.cert_file, args.key_file)

    logs.configure(log_format(args.command, Settings()))
    for line in unknown_variables():
        logger.warning("%s", line)
    if args.command == "serve":
        return _serve_processes(Settings(), args.processes)
    if args.command == "worker":
        return _worker(extra)
    return _dev(args.concurrency, reload=args.reload)


def log_format(command: str, settings: Settings) -> str:
    """How `command` logs: as `settings` say, but readable in `dev` unless
    TASKSERVICE_LOG_FORMAT is set."""
    if command == "dev" and "log_format" not in settings.model_fields_set:
        return "console"  # a person reads it
    return settings.log_format


def _serve(settings: Settings) -> int:
    from taskservice.server.server import StartupError, serve

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
    from taskservice.cli.embedded import tied_to_this_process

    env = {**os.environ, "TASKSERVICE_REUSE_PORT": "true"}
    metrics_folder = ""
    if settings.metrics_port:
        # Every process writes its metrics to files in one folder; this one
        # serves their sum. prometheus_client reads the variable when first
        # imported, which in this process is still to come (taskservice.server.server).
        metrics_folder = tempfile.mkdtemp(prefix="taskservice-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_folder
        env.update(PROMETHEUS_MULTIPROC_DIR=metrics_folder, TASKSERVICE_METRICS_PORT="0")
    command = tied_to_this_process([sys.executable, "-m", "taskservice", "serve"])
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

    from taskservice.apps import OWN_APP, AppNotFound, load_app, load_exposed
    from taskservice.core.registry import NotTrackable

    settings = Settings()
    if settings.heartbeat_file:
        # Left by a previous run (a Kubernetes emptyDir outlives a container
        # restart): it must not vouch for this one before its heartbeat does.
        Path(settings.heartbeat_file).unlink(missing_ok=True)
    try:
        # What the server refuses to start, the worker refuses to run.
        celery_app = load_app(settings)
        load_exposed(settings, celery_app)
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
    app = settings.celery_app or OWN_APP
    code = celery.main(
        args=["-A", app, *quiet, "worker", "--loglevel=INFO", *celery_args],
        standalone_mode=False,
    )
    return code if isinstance(code, int) else 0


def worker_command(*celery_args: str) -> list[str]:
    """The command that runs `taskservice worker` as a child that ends if
    this process dies."""
    from taskservice.cli.embedded import tied_to_this_process

    return tied_to_this_process([sys.executable, "-m", "taskservice", "worker", *celery_args])


def _dev(concurrency: int, *, reload: bool = False) -> int:
    from taskservice.cli.dev import DevWorker, Reloader, watched_paths
    from taskservice.cli.embedded import EmbeddedRedis, NoRedisServer, redis_server_binary

    try:
        redis_server_binary()  # before anything starts: say what to install
    except NoRedisServer as error:
        logger.error("%s", error)
        return 1
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
    env.setdefault("TASKSERVICE_LOG_FORMAT", "console")
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


def _health(timeout: float, service: str, client_cert: str, client_key: str) -> int:
    """Ask the server these settings describe (0.0.0.0 or :: means this
    machine) for its health, as a container's HEALTHCHECK does. With TLS, the
    server's own certificate (TASKSERVICE_TLS_CERT_FILE) is the one trusted,
    under any name it carries; a server that requires client certificates
    needs --cert-file and --key-file. Prints one line."""
    import ssl

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = Settings()
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(
        settings.host, settings.host
    )
    target = f"[{host.strip('[]')}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"
    options: list[tuple[str, str]] = []
    try:
        if not settings.tls_cert_file:
            channel = grpc.insecure_channel(target)
        else:
            if settings.tls_client_ca_file and not (client_cert and client_key):
                print(
                    f"{target}: the server requires client certificates "
                    "(TASKSERVICE_TLS_CLIENT_CA_FILE): pass --cert-file and --key-file",
                    file=sys.stderr,
                )
                return 1
            server_cert = Path(settings.tls_cert_file).read_bytes()
            # `target` is this machine, which the certificate need not name:
            # trusting exactly the server's own certificate is the check, under
            # a name it carries. (CPython's decoder: no public API reads a PEM.)
            decoded = ssl._ssl._test_decode_cert(settings.tls_cert_file)  # type: ignore[attr-defined]
            names = [v for k, v in decoded.get("subjectAltName", ()) if k in ("DNS", "IP Address")]
            if names:
                options.append(("grpc.ssl_target_name_override", names[0]))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=server_cert,
                private_key=Path(client_key).read_bytes() if client_key else None,
                certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
            )
            channel = grpc.secure_channel(target, credentials, options=options)
    except (OSError, ssl.SSLError) as error:
        print(f"{target}: cannot load the TLS files: {error}", file=sys.stderr)
        return 1
    with channel:
        try:
            # The stubs' HealthStub declares no methods.
            answer: health_pb2.HealthCheckResponse = health_pb2_grpc.HealthStub(  # type: ignore[attr-defined]
                channel
            ).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            details = " ".join(str(error.details()).split())
            print(f"{target}: {error.code().name}: {details}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{target}: {status}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


def _worker_health() -> int:
    """0 if this machine's worker renewed its leases (or had none to renew)
    within `lease` seconds, going by TASKSERVICE_HEARTBEAT_FILE; else 1. Older
    than that, the leases of its tasks have lapsed: it vouches for nothing.
    Prints one line."""
    settings = Settings()
    path = settings.heartbeat_file
    if not path:
        print(
            "TASKSERVICE_HEARTBEAT_FILE is not set: workers keep no heartbeat file", file=sys.stderr
        )
        return 1
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        print(f"{path}: no heartbeat yet (is the worker running?)", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"{path}: {error}", file=sys.stderr)
        return 1
    if age > settings.lease:
        print(
            f"{path}: leases last renewed {age:.1f}s ago, longer than the lease "
            f"({settings.lease:g}s)",
            file=sys.stderr,
        )
        return 1
    print(f"{path}: leases renewed {age:.1f}s ago")
    return 0


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
