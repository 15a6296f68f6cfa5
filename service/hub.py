"""The event hub: one Redis subscription per server process, fanned out to
one mailbox per watching stream.

Every record change is published on one channel as "<task id> <record JSON>"
(see taskservice.core.record). The hub decodes a message once, only if some stream
watches that task, and hands the same record to each such stream's mailbox,
so every stream gets every change in publish order (unlike an
asyncio.Condition, which may skip). If the subscription drops, the hub
reconnects and tells each stream to re-read its task (RESYNC), since changes
during the gap were not delivered.

A mailbox is bounded: a stream whose client reads too slowly collapses its
backlog into one RESYNC, so it re-reads the latest record. Progress may be
skipped that way; a terminal state never is (it is the latest record).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import redis.exceptions

from taskservice.core.errors import RedisUnavailable, ShuttingDown
from taskservice.core.record import TaskRecord

logger = logging.getLogger(__name__)


class Marker(enum.Enum):
    """What a mailbox may hold besides a record."""

    RESYNC = "resync"
    """Changes may have been missed: re-read the record."""
    SHUTDOWN = "shutdown"
    """The server is shutting down: end the stream."""


Event = TaskRecord | Marker

CLOSE_WAIT = 2.0

MAILBOX_BUDGET = 16
"""Events a stream may have waiting before its backlog collapses to RESYNC."""


class Mailbox:
    """The events waiting for one stream: at most MAILBOX_BUDGET of them."""

    def __init__(self) -> None:
        self._events: collections.deque[Event] = collections.deque()
        self._ready = asyncio.Event()
        self._closed = False

    def put(self, event: Event) -> None:
        """Queue a change (or a marker) for the stream."""
        if self._closed:
            return
        if event is Marker.SHUTDOWN:
            self._closed = True
            self._events.clear()
        elif len(self._events) >= MAILBOX_BUDGET:
            # Whatever waits is superseded by the record as Redis has it now.
            self._events.clear()
            event = Marker.RESYNC
        self._events.append(event)
        self._ready.set()

    async def get(self) -> Event:
        """The next change or marker, waiting for one."""
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        return self._events.popleft()

    def __len__(self) -> int:
        return len(self._events)


_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class EventHub:
    """Fans out record changes to watchers; see the module docstring."""

    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._watchers: dict[str, set[Mailbox]] = {}
        self._connected = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """True while the subscription is up."""
        return self._connected.is_set()

    async def start(self, *, wait: float) -> None:
        """Start listening; wait up to `wait` seconds for the subscription
        (the hub keeps retrying in the background if Redis is down)."""
        self._task = asyncio.create_task(self._run(), name="taskservice-event-hub")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), wait)

    async def close(self) -> None:
        """Stop listening and end every stream, in at most CLOSE_WAIT seconds
        (a subscription stuck on a dead socket must not hang a shutdown)."""
        self._closing = True
        for mailboxes in self._watchers.values():
            for mailbox in mailboxes:
                mailbox.put(Marker.SHUTDOWN)
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=CLOSE_WAIT)
            if not done:
                logger.warning("event hub did not stop within %gs; leaving it", CLOSE_WAIT)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[Mailbox]:
        """A mailbox receiving every change of `task_id` published from now on.

        Raises RedisUnavailable while the subscription is down, since changes
        could then be missed, and ShuttingDown once the hub is closing."""
        if self._closing:
            raise ShuttingDown("the server is shutting down; watch again to resume")
        if not self.connected:
            raise RedisUnavailable("not subscribed to task events (Redis unreachable); retry")
        mailbox = Mailbox()
        self._watchers.setdefault(task_id, set()).add(mailbox)
        try:
            yield mailbox
        finally:
            mailboxes = self._watchers.get(task_id)
            if mailboxes is not None:
                mailboxes.discard(mailbox)
                if not mailboxes:
                    del self._watchers[task_id]

    @property
    def watcher_count(self) -> int:
        """Streams watching right now."""
        return sum(len(q) for q in self._watchers.values())

    async def _run(self) -> None:
        delay = 0.05
        while not self._closing:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                while (await pubsub.get_message(timeout=1.0)) is None:
                    pass  # the first message is the subscribe confirmation
                self._connected.set()
                delay = 0.05
                self._broadcast(Marker.RESYNC)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None and message["type"] == "message":
                        self._dispatch(message["data"])
            except Exception as exc:
                if not isinstance(exc, _CONNECTION_ERRORS):
                    # A bug must not silently stop every watcher: log it and
                    # resubscribe; the streams re-read their tasks (RESYNC).
                    logger.exception("event hub failed; resubscribing")
                elif self._connected.is_set():
                    logger.warning("event subscription lost (%s); reconnecting", exc)
                self._connected.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), 1.0)  # type: ignore[no-untyped-call]

    def _dispatch(self, data: str) -> None:
        task_id, _, payload = data.partition(" ")
        mailboxes = self._watchers.get(task_id)
        if not mailboxes:
            return
        try:
            rec = TaskRecord.from_json(payload)
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring malformed event for task %s: %.200r", task_id, payload)
            return
        for mailbox in mailboxes:
            mailbox.put(rec)

    def _broadcast(self, marker: Marker) -> None:
        for mailboxes in self._watchers.values():
            for mailbox in mailboxes:
                mailbox.put(marker)
