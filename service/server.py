"""Build and run the gRPC server: TaskService, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.exceptions
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.apps import AppNotFound, load_app, load_exposed
from taskservice.core import connect, record
from taskservice.core.metrics import Endpoint, ServerMetrics, multiprocess_mode, own_registry
from taskservice.core.metrics import serve as serve_metrics
from taskservice.core.registry import EXPOSED, NotTrackable
from taskservice.core.settings import Settings
from taskservice.server.auth import Token, Tokens, load_tokens
from taskservice.server.drain import Gate
from taskservice.server.guard import Guard
from taskservice.server.health import HealthServicer
from taskservice.server.hub import EventHub
from taskservice.server.operations import Operations
from taskservice.server.publisher import Publisher, create_publisher
from taskservice.server.redis_link import RedisLink
from taskservice.server.reflection import add_reflection
from taskservice.server.servicer import TaskServiceServicer
from taskservice.server.tracing import server_tracing

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TaskService"].full_name
LIVENESS = "liveness"
"""The health service name that is SERVING while the server runs, whatever
Redis says, until it drains: for liveness probes (the server's own names
follow Redis, for readiness). Served with `health_port`."""

CLOSE_GRACE = 1.0
"""Seconds the calls held during a drain get to be answered once gRPC's stop
has begun (at most the whole grace)."""


class StartupError(Exception):
    """The server cannot start as configured; the message says what to change."""


class PortInUse(StartupError):
    """The gRPC address is taken (and port sharing was not asked for)."""


class Insecure(StartupError):
    """A non-loopback address without TLS or tokens, not explicitly allowed."""


@dataclass
class Server:
    """A running server; `stop` drains it and releases everything."""

    server: grpc.aio.Server
    port: int
    operations: Operations
    health: HealthServicer
    guard: Guard
    metrics_endpoint: Endpoint | None = None
    health_server: grpc.aio.Server | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then close everything. Health turns NOT_SERVING; new calls
        answer UNAVAILABLE/SHUTTING_DOWN (call again, elsewhere); watch streams
        end so; calls already admitted get up to `grace` seconds to finish.
        Then the port closes, at a moment when no call is on its way, so that
        gRPC cancels none (taskservice.server.drain has the steps)."""
        loop = asyncio.get_running_loop()
        grace = grace or 0.0
        until = loop.time() + grace
        gate = self.guard.gate
        for task in self._tasks:
            task.cancel()
        # Health watchers hear it first: clients that check health (and load
        # balancers) stop sending calls here.
        await self.health.enter_graceful_shutdown()
        gate.refuse()
        await self.operations.hub.close()  # watch streams end UNAVAILABLE/SHUTTING_DOWN
        if not await gate.idle(until) and grace:
            logger.warning(
                "%d calls still running after the shutdown grace (%.1fs): they answer UNAVAILABLE",
                gate.in_flight,
                grace,
            )
        gate.hold()
        await gate.quiet(until)
        # The first step of gRPC's stop stops listening and queues a GOAWAY on
        # every connection (grpc_server_shutdown_and_notify); the held calls
        # are answered after it, so their clients call again elsewhere.
        closing = max(until - loop.time(), min(grace, CLOSE_GRACE))
        stopping = asyncio.ensure_future(self.server.stop(closing))
        await asyncio.sleep(0)  # lets that first step run
        gate.close()
        await stopping
        if self.health_server is not None:  # NOT_SERVING on it until here
            await self.health_server.stop(0)
        await self.operations.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()

    async def wait(self) -> None:
        """Wait until the server stops."""
        await self.server.wait_for_termination()


async def create_server(settings: Settings, *, port: int | None = None) -> Server:
    """Build and start a server for `settings` (port 0: a free port).

    Imports the task modules in `settings.tasks`; only their exposed tasks
    can be started.
    """
    tokens, credentials = _security(settings)
    try:
        # Before the task modules: reading task names and signatures
        # configures taskservice's own app, which should see these settings.
        celery_app = load_app(settings)
        load_exposed(settings, celery_app)
    except (AppNotFound, NotTrackable) as error:
        raise StartupError(str(error)) from None
    if not settings.task_modules:
        logger.warning("no task modules (TASKSERVICE_TASKS): nothing can be started")
    # Every call of this process shares one pipelined connection; the event
    # subscription has one more. A few connections serve any burst.
    link = RedisLink.to_records(settings, client_name=f"{settings.key_prefix}:calls")
    # Writes that wait for replicas (WAIT holds its connection) get their
    # own, so that reads never queue behind a WAIT.
    replicated = None
    if settings.redis_min_replicas:
        replicated = RedisLink.to_records(settings, client_name=f"{settings.key_prefix}:claims")
    # The subscription waits indefinitely for messages, so it gets a client
    # without a read timeout.
    sub_client = connect.async_client(
        settings,
        decode_responses=True,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=10,
        client_name=events_client_name(settings),
    )
    hub = EventHub(sub_client, record.events_channel(settings.key_prefix))
    await hub.start(wait=settings.redis_timeout)
    publisher = Publisher(create_publisher(settings, celery_app), settings)
    # Several processes (serve --processes) write files one of them serves;
    # a single one keeps its metrics in its own registry.
    metrics_registry = None if multiprocess_mode() else own_registry()
    served = bool(settings.metrics_port) or multiprocess_mode()
    metrics = ServerMetrics(metrics_registry, per_call=served)
    tracing = server_tracing()  # OFF unless OTEL_* variables ask for traces
    operations = Operations.build(
        settings,
        EXPOSED,
        publisher,
        link,
        hub,
        metrics=metrics,
        replicated=replicated,
        tracing=tracing,
    )

    gate = Gate()
    guard = Guard(Tokens(tokens) if tokens else None, metrics=metrics, gate=gate)
    server = grpc.aio.server(
        options=server_options(settings), interceptors=tracing.interceptors or None
    )
    servicer = TaskServiceServicer(
        operations,
        tracebacks=not settings.hide_tracebacks,
        max_response_bytes=settings.max_response_bytes,
    )
    guard.add(server, functools.partial(pb_grpc.add_TaskServiceServicer_to_server, servicer))
    health_servicer = HealthServicer(gate)  # unguarded: probes need no token
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        add_reflection(server, names, guard=guard)
    address = f"{settings.host}:{settings.port if port is None else port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        await operations.close()
        raise PortInUse(
            f"cannot listen on {address}: the port is taken (another taskservice?). Pick "
            "another TASKSERVICE_PORT, or set TASKSERVICE_REUSE_PORT=true to share it on purpose"
        ) from None
    endpoint = None
    if settings.metrics_port:
        try:
            endpoint = serve_metrics(settings.metrics_host, settings.metrics_port, metrics_registry)
        except OSError as error:
            await operations.close()
            raise StartupError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} "
                f"({error}); pick another TASKSERVICE_METRICS_PORT"
            ) from None
        logger.info("metrics on http://%s:%d/metrics", endpoint.host, endpoint.port)
    health_server = None
    if settings.health_port:
        try:
            health_server = health_only_server(settings, health_servicer)
        except StartupError:
            await operations.close()
            if endpoint is not None:
                endpoint.close()
            raise
    await server.start()
    running = Server(
        server=server,
        port=bound,
        operations=operations,
        health=health_servicer,
        guard=guard,
        metrics_endpoint=endpoint,
        health_server=health_server,
    )
    await _report_health(operations, health_servicer)
    if health_server is not None:
        await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await health_server.start()
        logger.info("health only, plaintext, on %s:%d", settings.host, settings.health_port)
    running._tasks += [
        asyncio.create_task(_health_loop(operations, health_servicer, settings.health_interval)),
        # Every server sweeps and dispatches: each expiry, and each hand-out
        # of a due task, is one atomic script, so none happens twice.
        asyncio.create_task(
            _every(settings.sweep_interval, "lease sweep", operations.sweeper.sweep)
        ),
        asyncio.create_task(
            _every(settings.dispatch_interval, "dispatch", operations.dispatcher.dispatch)
        ),
    ]
    logger.info("taskservice listening on %s:%d", settings.host, bound)
    return running


def health_only_server(settings: Settings, servicer: HealthServicer) -> grpc.aio.Server:
    """A server (not started) answering `servicer` and nothing else, in
    plaintext on `settings.host:settings.health_port`: kubelet's gRPC probes
    present no client certificate, so under mutual TLS they need this port.
    It tells only health states; every other method answers UNIMPLEMENTED."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"{settings.host}:{settings.health_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError:
        raise StartupError(
            f"cannot listen on {address} for health: the port is taken; pick another "
            "TASKSERVICE_HEALTH_PORT"
        ) from None
    return server


def _security(settings: Settings) -> tuple[list[Token], grpc.ServerCredentials | None]:
    """The tokens and TLS credentials `settings` ask for; StartupError if the
    files do not load, or if the server would be open to the network."""
    try:
        tokens = load_tokens(settings.tokens.get_secret_value(), settings.tokens_file)
        credentials = None
        if settings.tls_cert_file:
            ca = settings.tls_client_ca_file
            credentials = grpc.ssl_server_credentials(
                [
                    (
                        Path(settings.tls_key_file).read_bytes(),
                        Path(settings.tls_cert_file).read_bytes(),
                    )
                ],
                root_certificates=Path(ca).read_bytes() if ca else None,
                require_client_auth=bool(ca),
            )
    except (OSError, ValueError) as error:
        raise StartupError(f"cannot load the TLS or token settings: {error}") from None
    if not (tokens or credentials or settings.allow_insecure or _loopback(settings.host)):
        raise Insecure(
            f"refusing to listen on {settings.host} without TLS or tokens: anyone who "
            "reaches the port could start, read and kill tasks. Set TASKSERVICE_TOKENS "
            "(or _TOKENS_FILE) and/or TASKSERVICE_TLS_CERT_FILE and _KEY_FILE, or "
            "TASKSERVICE_ALLOW_INSECURE=true if the network is trusted"
        )
    return tokens, credentials


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC server options for real traffic (see the settings' docstrings)."""
    return [
        ("grpc.so_reuseport", int(settings.reuse_port)),
        ("grpc.server.max_pending_requests", settings.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_calls),
        ("grpc.max_receive_message_length", settings.max_request_bytes),
        ("grpc.max_send_message_length", settings.max_response_bytes),
        # Ping idle connections, and drop those that stop answering: a
        # half-open watch stream is noticed instead of held forever.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let clients ping too (every 10 s at most) without being sent away.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def events_client_name(settings: Settings) -> str:
    """The name of each server's event subscription in Redis's CLIENT LIST."""
    return f"{settings.key_prefix}:events"


async def _report_health(operations: Operations, servicer: HealthServicer) -> None:
    ok = await operations.ping()
    status = (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _health_loop(operations: Operations, servicer: HealthServicer, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await _report_health(operations, servicer)
        except Exception:
            logger.exception("health check failed")


async def _every(interval: float, what: str, work: Callable[[], Awaitable[object]]) -> None:
    """Run `work` every `interval` seconds for good; a Redis that is away
    only makes a round fail (logged quietly), a bug is logged loudly."""
    while True:
        try:
            await work()
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.debug("%s failed (%s); next in %gs", what, exc, interval)
        except Exception:
            logger.exception("%s failed", what)
        await asyncio.sleep(interval)


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then drain within `settings.shutdown_grace`."""
    running = await create_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down (grace %.1fs)", settings.shutdown_grace)
    await running.stop(settings.shutdown_grace)
