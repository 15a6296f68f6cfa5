"""Build and run the gRPC server: TaskService, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field

import grpc
import redis.asyncio as aioredis
import redis.exceptions
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from service._proto.taskservice.v1 import task_service_pb2 as pb
from service._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from service.backend import Backend
from service.config import Settings
from service.hub import EventHub
from service.publisher import Publisher
from service.reflection import add_reflection
from service.servicer import TaskServiceServicer
from worker import record

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TaskService"].full_name


@dataclass
class Server:
    """A running server; `stop` drains it and releases everything."""

    server: grpc.aio.Server
    port: int
    backend: Backend
    health: health.aio.HealthServicer
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace: float | None = None) -> None:
        for task in self._tasks:
            task.cancel()
        # Tell health watchers first, so load balancers stop sending calls
        # while in-flight ones finish.
        await self.health.enter_graceful_shutdown()
        await self.backend.hub.close()
        await self.server.stop(grace)
        await self.backend.close()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def create_server(settings: Settings, *, port: int | None = None) -> Server:
    """Build and start a server for `settings` (port 0: a free port).

    Imports the task modules in `settings.tasks`; only their exposed tasks
    can be started.
    """
    from worker.app import app, configure, create_publisher, registry

    if app.settings is None:
        # Reading task names and signatures configures the app: let it see
        # these settings rather than the environment.
        configure(app, settings)
    registry.load(settings.task_modules)
    client = aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        max_connections=256,
        # After a Redis restart every pooled connection is stale: reconnect
        # and retry rather than fail the call (every script is safe to run
        # twice), and check connections that sat idle before using them.
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
        health_check_interval=30,
    )
    # The subscription waits indefinitely for messages, so it gets a client
    # without a read timeout.
    sub_client = aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=10,
        client_name=events_client_name(settings),
    )
    hub = EventHub(sub_client, record.events_channel(settings.key_prefix))
    await hub.start(wait=settings.redis_timeout)
    publisher = Publisher(create_publisher(settings), settings)
    backend = Backend(settings, registry, publisher, client, hub)

    server = grpc.aio.server(
        options=[
            ("grpc.server.max_pending_requests", settings.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_calls),
        ]
    )
    pb_grpc.add_TaskServiceServicer_to_server(TaskServiceServicer(backend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_reflection(
        server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    )
    bound = server.add_insecure_port(f"{settings.host}:{settings.port if port is None else port}")
    await server.start()
    running = Server(server=server, port=bound, backend=backend, health=health_servicer)
    await _report_health(backend, health_servicer)
    running._tasks += [
        asyncio.create_task(_health_loop(backend, health_servicer, settings.health_interval)),
        asyncio.create_task(_sweep_loop(backend, settings.sweep_interval)),
    ]
    logger.info("taskservice listening on %s:%d", settings.host, bound)
    return running


def events_client_name(settings: Settings) -> str:
    """The name of each server's event subscription in Redis's CLIENT LIST."""
    return f"{settings.key_prefix}:events"


async def _report_health(backend: Backend, servicer: health.aio.HealthServicer) -> None:
    ok = await backend.ping()
    status = (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


async def _health_loop(
    backend: Backend, servicer: health.aio.HealthServicer, interval: float
) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await _report_health(backend, servicer)
        except Exception:
            logger.exception("health check failed")


async def _sweep_loop(backend: Backend, interval: float) -> None:
    """End tasks whose lease lapsed. Every server sweeps; each expiry is one
    atomic script, so a task is never ended twice."""
    while True:
        try:
            ended = await backend.sweep()
            if ended:
                logger.info("ended %d task(s) whose lease lapsed", ended)
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.debug("lease sweep failed (%s); next in %gs", exc, interval)
        except Exception:
            logger.exception("lease sweep failed")
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
