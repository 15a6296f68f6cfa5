"""The broker's unacknowledged messages of tasks nobody vouches for, put back
in their queue: a worker killed just after taking a task must not leave it
QUEUED, holding its exclusivity key, for kombu's visibility timeout.

kombu's Redis transport keeps every message a worker took and has not yet
acknowledged in a hash (`unacked`: delivery tag -> `[message, exchange,
routing key]`) and a sorted set (`unacked_index`: delivery tag -> when the
worker took it, in seconds on the worker's clock). It puts a message back
only once it is older than `visibility_timeout` (2 h here, see
taskservice.apps). A task leased by its worker needs none of this: its lease
lapses and it ends LOST. But a worker SIGKILLed less than RECEIVE_DELAY after
taking a task (taskservice.worker.heartbeat) leaves it QUEUED without a lease,
which no sweep ends.

So each server's sweep also looks at these messages, when the broker is the
records' Redis (otherwise it cannot see them, and does nothing): a bounded
batch of `unacked_index` entries older than the lease, on Redis's clock. It
reads each message's Celery task id (protocol 2: the `id` header; protocol 1
keeps it in the body, and is left alone) and puts the message back at the
head of its queue only if the task's record exists, is QUEUED (neither
started nor ended) and the task has no lease. Nobody vouches for it then: a
live worker leases every task it holds within RECEIVE_DELAY plus one renewal
of taking it; one that cannot renew has its fence drop the task before the
lease could lapse (`lease - fence_margin` after it arrived), so it never runs
there. Messages of tasks without a record (not started through taskservice:
a plain `delay()`, another app's task) are never touched: nothing here knows
whether their worker lives, and a live one still holds them.

The restore is kombu's own, `QoS.restore_by_tag` (it WATCHes the hash, takes
the tag out of both keys and pushes the message back on its queue's list,
priority lists included, in one transaction), run in a thread through a kombu
channel built from the publisher app's broker settings: the transport, its
options and global_keyprefix the workers use (taskservice.apps). What can
happen between the check and the restore:
- a worker acknowledged the message (it started the task): the tag is gone
  and the restore does nothing, counted as nothing;
- a worker leased the task (a slow heartbeat): the message is then delivered
  twice, and the task's record lets one copy run; the other finds it running
  under a live lease, or ended, and is dropped (the `start` script);
- other servers restore the same tag: the WATCH lets one of them push it.
Each restore is logged (WARNING, with the task id) and counted
(`taskservice_messages_restored_total`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from celery import Celery
from structlog.contextvars import bound_contextvars

from taskservice.core.metrics import ServerMetrics
from taskservice.server.records import Records

logger = logging.getLogger(__name__)

T = TypeVar("T")

BATCH = 50
"""Index entries a sweep looks at, at most: the next sweep goes on from there."""

MAX_TASK_ID = 255
"""Longest header `id` taken for a task id (taskservice's are UUIDs)."""


class Unacked:
    """Putting back the broker messages of tasks a vanished worker had taken."""

    def __init__(self, records: Records, app: Celery, *, batch: int = BATCH) -> None:
        self._records = records
        self._app = app
        self._batch = batch
        self._keys: tuple[str, str] | None = None
        self._skip = 0
        """Index entries the next sweep skips: each goes on where the last
        stopped, so entries left alone (other apps' messages, tasks a live
        worker holds) never hide older ones. Entries that leave the index
        meanwhile shift the rest; one passed over is met on the next round."""
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="restore")
        self._busy: concurrent.futures.Future[Any] | None = None

    async def sweep(self) -> list[str]:
        """Put back the messages of one batch whose tasks nobody vouches for;
        the ids of the tasks whose message this server put back."""
        if self._busy is not None and not self._busy.done():
            return []  # a slow broker: the last restore is still going
        if self._keys is None:
            self._keys = await self._in_thread(functools.partial(_key_names, self._app))
        index, hash_key = self._keys
        records = self._records
        # The index holds the taking worker's clock, compared with Redis's:
        # a worker whose clock is behind by s seconds makes its messages look
        # s seconds older. Harmless at the lease's scale: the age only spares
        # the messages a live worker has just taken and not yet leased (for
        # RECEIVE_DELAY plus one renewal, far below the lease), so only a
        # skew of nearly the whole lease could put back a message a live
        # worker still holds, and that costs a second delivery, never a
        # second run. A clock ahead only delays the restore by as much.
        age_ms = round(records.settings.lease * 1000)
        page = await records.run(
            records.scripts.unacked(
                index, hash_key, age_ms=age_ms, skip=self._skip, limit=self._batch
            )
        )
        tasks = {tag: task_id for tag, message in page.messages if (task_id := task_id_of(message))}
        unvouched: set[str] = set()
        if tasks:
            found: list[str] = await records.run(records.scripts.unvouched(tasks.values()))
            unvouched.update(found)
        lost = [(tag, task_id) for tag, task_id in tasks.items() if task_id in unvouched]
        restored: list[str] = []
        if lost:
            restore = functools.partial(_restore, self._app, lost, records.metrics)
            restored = await self._in_thread(restore)
        self._skip = self._skip + page.seen - len(restored) if page.seen == self._batch else 0
        return restored

    async def _in_thread(self, call: Callable[[], T]) -> T:
        """Run a blocking kombu call in this sweeper's thread, bounded by the
        publish timeout (the broker's socket timeouts end it later anyway;
        until then, sweeps leave the broker's messages alone)."""
        self._busy = future = self._thread.submit(call)
        wait = self._records.settings.publish_timeout
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), wait)
        except TimeoutError:
            raise TimeoutError(f"the Celery broker did not answer within {wait:g}s") from None

    def close(self) -> None:
        """Stop the thread (a restore under way finishes)."""
        self._thread.shutdown(wait=False, cancel_futures=True)


def task_id_of(message: str) -> str | None:
    """The Celery task id of an unacknowledged message (kombu's `[message,
    exchange, routing key]` JSON, Celery's protocol 2); None if it has none."""
    try:
        task_id = json.loads(message)[0]["headers"]["id"]
    except (ValueError, RecursionError, LookupError, TypeError):
        return None
    if isinstance(task_id, str) and 0 < len(task_id) <= MAX_TASK_ID:
        return task_id
    return None


def _key_names(app: Celery) -> tuple[str, str]:
    """The full names of the index and the hash of `app`'s unacknowledged
    messages, as its kombu channel has them (options and key prefix included)."""
    with _channel(app) as channel:
        prefix = str(channel.global_keyprefix)
        return prefix + str(channel.unacked_index_key), prefix + str(channel.unacked_key)


def _restore(app: Celery, lost: list[tuple[str, str]], metrics: ServerMetrics) -> list[str]:
    """Put the messages (delivery tag, task id) back in their queues, through
    kombu; the task ids of those it put back (a tag already gone is not)."""
    restored = []
    with _channel(app) as channel, channel.conn_or_acquire() as client:
        watched = _Transactions(client)
        for tag, task_id in lost:
            channel.qos.restore_by_tag(tag, client=watched)
            if not watched.pushed():
                continue  # acknowledged, or put back by another server, meanwhile
            restored.append(task_id)
            metrics.messages_restored.inc()
            with bound_contextvars(task_id=task_id):
                logger.warning(
                    "task message put back in its queue: the worker that took it "
                    "vanished before leasing it (nobody vouches for the task)"
                )
    return restored


@contextlib.contextmanager
def _channel(app: Celery) -> Iterator[Any]:
    """A kombu Redis channel to `app`'s broker (kombu's stubs know only the
    generic channel), closed on exit."""
    with app.connection_for_write() as connection:
        channel: Any = connection.channel()
        try:
            yield channel
        finally:
            channel.close()


class _Transactions:
    """A channel's Redis client that remembers what its last transaction
    answered. `restore_by_tag` runs one (WATCH the hash, then MULTI: ZREM,
    HDEL and one push per queue only if the message was still there) and
    does not tell whether it pushed anything."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._replies: list[Any] = []

    def transaction(self, func: Callable[[Any], None], *watches: str, **options: Any) -> Any:
        self._replies = self._client.transaction(func, *watches, **options)
        return self._replies

    def pushed(self) -> bool:
        """Whether the last transaction put a message back on a queue."""
        return len(self._replies) > 2
