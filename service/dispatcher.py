"""The dispatcher: sends deferred tasks to the broker when they are due.

A task with a countdown or start_time, and one whose turn for its key came
while only kombu can deliver its message, waits in Redis's due set. Every
server looks every TASKSERVICE_DISPATCH_INTERVAL; the `due` script pushes the
messages it can itself and hands this server the others to publish. An entry
it hands out is due again a provisional lease later, so a server that stops
mid-publish leaves it to the next look; should the message then reach the
broker twice, the task still runs once (a worker starts a task only through
its record, see the `start` script)."""

from __future__ import annotations

import logging

from structlog.contextvars import bound_contextvars

from taskservice.core.errors import TaskServiceError
from taskservice.server.publisher import Delivery, Publisher
from taskservice.server.records import Records
from taskservice.server.tracing import OFF, Tracing

logger = logging.getLogger(__name__)


class Dispatcher:
    """Sending the deferred tasks that are due."""

    def __init__(self, records: Records, publisher: Publisher, tracing: Tracing = OFF) -> None:
        self._records = records
        self._publisher = publisher
        self._tracing = tracing

    async def dispatch(self, batch: int = 100) -> int:
        """Send every deferred task that is due; how many this server published."""
        published = 0
        retry_ms = int(self._records.settings.provisional_lease * 1000)
        while True:
            due = await self._records.run(self._records.scripts.due(batch, retry_ms=retry_ms))
            self._records.metrics.handovers.set(due.handovers)
            for task_id, payload in due.deliveries:
                with bound_contextvars(task_id=task_id):
                    if await self._publish(Delivery.from_json(payload)):
                        await self._records.run(self._records.scripts.sent(task_id))
                        published += 1
            if due.seen < batch:
                return published

    async def _publish(self, delivery: Delivery) -> bool:
        # In the trace of the task's Start, which its run continues too.
        span = self._tracing.publish(
            delivery.task_id, delivery.queue, parent=delivery.trace_context
        )
        try:
            with span, self._publisher.admit() as ticket:
                await self._publisher.send(
                    ticket, delivery, wait=self._records.settings.publish_timeout
                )
        except TaskServiceError as exc:
            logger.warning("could not send a due task to the broker (%s); retrying later", exc)
            return False
        logger.info("due task sent to the broker")
        return True
