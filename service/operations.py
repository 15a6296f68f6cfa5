"""The server's domain, wired once per process: one module per operation
(starts, reads, cancels, watches, the sweeper, the dispatcher) over the shared task records,
the event hub and the publisher. The servicer calls one of them per RPC."""

from __future__ import annotations

from dataclasses import dataclass

from taskservice.core.metrics import ServerMetrics
from taskservice.core.registry import TaskRegistry
from taskservice.core.settings import Settings
from taskservice.server.cancels import Cancels
from taskservice.server.dispatcher import Dispatcher
from taskservice.server.hub import EventHub
from taskservice.server.publisher import Publisher
from taskservice.server.reads import Reads
from taskservice.server.records import Records
from taskservice.server.redis_link import RedisLink
from taskservice.server.starts import Starts
from taskservice.server.sweeper import Sweeper
from taskservice.server.tracing import OFF, Tracing
from taskservice.server.unacked import Unacked
from taskservice.server.watches import Watches


@dataclass(frozen=True, slots=True)
class Operations:
    """Every operation of one server process."""

    records: Records
    starts: Starts
    reads: Reads
    cancels: Cancels
    watches: Watches
    sweeper: Sweeper
    dispatcher: Dispatcher
    hub: EventHub
    publisher: Publisher

    @classmethod
    def build(
        cls,
        settings: Settings,
        registry: TaskRegistry,
        publisher: Publisher,
        link: RedisLink,
        hub: EventHub,
        *,
        metrics: ServerMetrics | None = None,
        replicated: RedisLink | None = None,
        tracing: Tracing = OFF,
    ) -> Operations:
        """Wire every operation over `link`, `hub` and `publisher` (and
        `replicated`, the link of writes that wait for replicas, when
        `redis_min_replicas` asks for them), tracing with `tracing`."""
        records = Records(
            settings, link, registry, metrics or ServerMetrics(), replicated=replicated
        )
        reads = Reads(records)
        watches = Watches(records, reads, hub)
        return cls(
            records=records,
            starts=Starts(records, reads, publisher, tracing),
            reads=reads,
            cancels=Cancels(records, reads, watches, publisher),
            watches=watches,
            # Only on the records' Redis can a server see the broker's
            # unacknowledged messages (and only a Redis broker keeps them so).
            sweeper=Sweeper(records, Unacked(records, publisher.app) if publisher.direct else None),
            dispatcher=Dispatcher(records, publisher, tracing),
            hub=hub,
            publisher=publisher,
        )

    async def ping(self) -> bool:
        """True if Redis answers and the event subscription is up."""
        return await self.records.ping() and self.hub.connected

    async def close(self) -> None:
        """Stop the background work and close the hub, the publisher and the link."""
        self.starts.close()
        self.cancels.close()
        self.sweeper.close()
        await self.hub.close()
        self.publisher.close()
        self.records.close()
