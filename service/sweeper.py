"""The lease sweeper: ends every task whose lease lapsed (LOST, or REVOKED for a
Start that never confirmed the broker had it), freeing its key. Every server
runs it every TASKSERVICE_SWEEP_INTERVAL; the script is idempotent, so
several servers sweeping at once end each task once.

When the broker is the records' Redis, each sweep then puts back in their
queue the unacknowledged messages of tasks nobody vouches for (a worker that
took them died before leasing them): see taskservice.server.unacked."""

from __future__ import annotations

import logging

import redis.exceptions
from structlog.contextvars import bound_contextvars

from taskservice.core import record
from taskservice.core.scripts import Expired
from taskservice.core.states import STATE_LABELS
from taskservice.server.records import Records
from taskservice.server.unacked import Unacked

logger = logging.getLogger(__name__)


class Sweeper:
    """Ending tasks whose lease lapsed."""

    def __init__(self, records: Records, unacked: Unacked | None = None) -> None:
        self._records = records
        self._unacked = unacked
        """None unless the broker is the records' Redis."""

    async def sweep(self, batch: int = 100) -> list[Expired]:
        """End every task whose lease lapsed, then put back the messages of
        tasks nobody vouches for; the tasks ended, each logged and counted."""
        ended: list[Expired] = []
        while True:
            swept = await self._records.run(self._records.scripts.sweep(batch))
            for expired in swept.expired:
                self._expired(expired)
                ended.append(expired)
            if swept.seen < batch:
                break
        if self._unacked is not None:
            try:
                await self._unacked.sweep()
            except (redis.exceptions.RedisError, OSError) as exc:
                # Redis away, or the broker slow (TimeoutError): next sweep.
                logger.debug("looking at unacknowledged messages failed (%s)", exc)
        return ended

    def close(self) -> None:
        """Stop the thread that puts messages back."""
        if self._unacked is not None:
            self._unacked.close()

    def _expired(self, expired: Expired) -> None:
        self._records.metrics.lease_expiries.inc()
        context = {"task_id": expired.task_id}
        if expired.exclusivity_key:
            context["exclusivity_key"] = expired.exclusivity_key
        with bound_contextvars(**context):
            if expired.error_type == record.NOT_ENQUEUED_ERROR:
                # Never counted as started: the server that accepted it
                # stopped before the broker confirmed.
                logger.warning("task given up: its Start never confirmed that the broker had it")
                return
            self._records.ended(expired.task_name, expired.state)
            logger.info(
                "task ended %s: its lease lapsed (no worker vouched for it)",
                STATE_LABELS.get(expired.state, expired.state),
            )
