"""grpc.health.v1.Health for a server that drains (taskservice.server.drain).

Serves Check and Watch as grpc_health.v1's asyncio servicer does, with the
same `set` and `enter_graceful_shutdown` (its model: once shutting down,
every service is NOT_SERVING for good), but:

- Each Watch stream has its own wake-up. grpc_health's streams share one
  asyncio.Condition per service, which the first stream to end deletes: the
  others then never hear of a change again, the NOT_SERVING of a shutdown
  included, and a stream that cannot write holds it and blocks `set`.
  Client-side health checking (a round-robin client avoiding a draining
  server) depends on every stream hearing NOT_SERVING.
- Health calls pass the drain gate like every other call: new ones are held
  while it holds calls, and Watch streams end UNAVAILABLE/SHUTTING_DOWN when
  the port closes, instead of being cancelled by gRPC's stop.

It is added to the server unguarded: probes need no token.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskservice.server.drain import Gate, shutting_down
from taskservice.server.status import end_stream, to_status

Context = grpc.aio.ServicerContext[Any, Any]
Status = int
"""A health_pb2.HealthCheckResponse.ServingStatus value."""

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    """The statuses of this server's services ("" for the server as a whole)."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self._statuses: dict[str, Status] = {"": SERVING}
        self._changed: set[asyncio.Event] = set()  # one per Watch stream
        self._shutting_down = False

    async def set(self, service: str, status: Status) -> None:
        """Set a service's status (ignored once shutting down)."""
        if not self._shutting_down:
            self._publish(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """Set every service NOT_SERVING, for good: later `set`s are ignored."""
        self._shutting_down = True
        for service in self._statuses:
            self._publish(service, NOT_SERVING)

    def _publish(self, service: str, status: Status) -> None:
        self._statuses[service] = status
        for changed in self._changed:
            changed.set()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        """The service's status now; NOT_FOUND for a service never set."""
        if self._gate.draining:
            await self._gate.arrive(context.time_remaining())
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        """The service's status now, then each change; SERVICE_UNKNOWN for a
        service never set. Ends UNAVAILABLE/SHUTTING_DOWN when the server
        closes its port."""
        if self._gate.draining:
            await self._gate.arrive(context.time_remaining())
        closing = asyncio.ensure_future(self._gate.closing())
        changed = asyncio.Event()
        self._changed.add(changed)
        try:
            last = None
            while not closing.done():
                changed.clear()  # before reading: a change meanwhile wakes the wait
                status = self._statuses.get(request.service, SERVICE_UNKNOWN)
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                woken = asyncio.ensure_future(changed.wait())
                try:
                    await asyncio.wait({woken, closing}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    woken.cancel()
        finally:
            self._changed.discard(changed)
            closing.cancel()
        await end_stream(context, to_status(shutting_down()))
