"""What every domain module of the server shares: the task records in Redis,
reached through one pipelined link, changed only by the Lua scripts of
taskservice.core.scripts.

The domain modules (starts, cancels, reads, watches, sweeper) each do one
thing; they share one `Records` per server process, which runs their scripts,
knows the settings, and counts the ends it makes. Every record change is one
script, so each decision (is the key free? may this task be cancelled? has
its lease lapsed?) and its write happen in one atomic step.

Each operation binds what it knows about its task (task_id, exclusivity_key,
request_id) to the logging context as soon as it knows it, so every line
logged on its behalf carries them (taskservice.core.logs).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis.exceptions

from taskservice.core import record, scripts
from taskservice.core.errors import InvalidArgument
from taskservice.core.metrics import ServerMetrics
from taskservice.core.record import TaskRecord
from taskservice.core.registry import EXCLUSIVITY_KEY_PATTERN, TaskRegistry
from taskservice.core.scripts import Call, Scripts
from taskservice.core.settings import Settings
from taskservice.core.states import STATE_LABELS
from taskservice.server.redis_link import RedisLink

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Records:
    """The task records, for one server process."""

    def __init__(
        self,
        settings: Settings,
        link: RedisLink,
        registry: TaskRegistry,
        metrics: ServerMetrics,
        *,
        replicated: RedisLink | None = None,
    ) -> None:
        self.settings = settings
        self.link = link
        self.registry = registry
        self.metrics = metrics
        self.prefix = settings.key_prefix
        self.scripts = Scripts(settings.key_prefix, settings.record_ttl)
        self.min_replicas = settings.redis_min_replicas
        """Replicas a Start's writes must reach before it answers OK (0: none)."""
        self._replicated = replicated or link

    async def run(self, call: Call[T]) -> T:
        """Run a script once; its typed reply."""
        return await self.link.script(call)

    async def run_replicated(self, call: Call[T]) -> T:
        """Run a script once and wait until `min_replicas` replicas have its
        writes (within `redis_min_replicas_timeout`); its typed reply.
        NotReplicated, carrying the reply, if they do not confirm in time."""
        reply, acked = await self._replicated.script_replicated(
            call, self.min_replicas, self.settings.redis_min_replicas_timeout
        )
        if acked < self.min_replicas:
            raise NotReplicated(reply, acked)
        return reply

    def close(self) -> None:
        """Close the links; calls waiting on them fail."""
        self.link.close()
        if self._replicated is not self.link:
            self._replicated.close()

    async def persist(self, call: Call[T]) -> T:
        """Run a script, retrying through a Redis restart or failover for up
        to half a lease: long enough to ride out a blip, short enough to end
        well within the provisional lease of a Start."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.settings.lease / 2
        delay = 0.05
        while True:
            try:
                return await self.run(call)
            except redis.exceptions.RedisError as error:
                if not scripts.transient(error) or loop.time() + delay > give_up:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def ping(self) -> bool:
        """True if Redis answers."""
        try:
            return bool(await self.link.execute("PING") == "PONG")
        except (redis.exceptions.RedisError, OSError):
            return False

    def ended(self, task_name: str, state: str) -> None:
        """Count an end this server made; a task type no longer exposed is
        counted without its name (label values stay bounded)."""
        name = task_name if self.registry.get(task_name) is not None else ""
        self.metrics.tasks_ended.labels(name, STATE_LABELS.get(state, state.lower())).inc()


class NotReplicated(Exception):
    """Fewer replicas than `redis_min_replicas` confirmed a write in time: it
    may be lost if the master fails now."""

    def __init__(self, reply: Any, acked: int) -> None:
        super().__init__(f"{acked} replica(s) confirmed the write in time")
        self.reply = reply
        """What the script answered (it ran on the master)."""
        self.acked = acked


def parse_task_id(task_id: str) -> str:
    """The canonical form of a task id; InvalidArgument if it is no UUID."""
    if not task_id:
        raise InvalidArgument.of("task_id", "task_id is required")
    try:
        return str(uuid.UUID(task_id))
    except ValueError:
        raise InvalidArgument.of("task_id", f"task_id {task_id[:80]!r} is not a UUID") from None


def check_exclusivity_key(key: str) -> str:
    """`key`; InvalidArgument unless it is a valid exclusivity key."""
    if not EXCLUSIVITY_KEY_PATTERN.fullmatch(key):
        raise InvalidArgument.of(
            "exclusivity_key",
            f"exclusivity_key {key[:80]!r} must be 1-128 characters of [A-Za-z0-9._:@/-]",
        )
    return key


def never_enqueued(rec: TaskRecord) -> bool:
    """True for a task whose Start gave it up before the broker had it."""
    return rec.error is not None and rec.error.type == record.NOT_ENQUEUED_ERROR


async def shielded(operation: Coroutine[Any, Any, T]) -> T:
    """Await `operation`, letting it finish even if the awaiting call is cancelled."""
    task = asyncio.ensure_future(operation)
    task.add_done_callback(_log_orphan_failure)
    return await asyncio.shield(task)


def _log_orphan_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # Retrieving the exception here keeps asyncio from warning "never
        # retrieved" when the caller left; a caller still waiting raises it.
        logger.debug("operation ended with %r", task.exception())
