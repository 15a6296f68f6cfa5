"""Task messages and revokes to the Celery broker: off the event loop, bounded.

When the broker is the Redis that holds the task records, a Start pushes
its message in its claim script (`message` builds it exactly as kombu's
Redis transport would), so it costs one Redis round trip and no thread; but
only where kombu would push that very message onto the plain list named
after the queue (see `push`): a global key prefix, a priority list or an
exchange's bindings send it elsewhere, so those Starts publish through kombu.
Otherwise Celery publishes: its calls block, so they run in thread pools,
one for task messages and one for revokes, so that a stalled broker delaying
publishes never delays a Cancel. Every wait is bounded: the broker's sockets
have timeouts (see `taskservice.worker.app`), a Start waits at most `publish_timeout`
(or its caller's deadline), and at most `max_pending_publishes` Starts of
this server may be waiting for the broker; more answer PublishBacklog.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import concurrent.futures
import contextlib
import dataclasses
import functools
import reprlib
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Celery
from celery.app.routes import MapRoute
from celery.utils.nodenames import anon_nodename
from kombu import Queue
from kombu.transport.redis import PRIORITY_STEPS
from kombu.utils import json as kombu_json

from taskservice import apps
from taskservice.core.errors import BrokerUnavailable, PublishBacklog
from taskservice.core.record import CLAIMED_HEADER
from taskservice.core.settings import Settings
from taskservice.server.status import broker_error

T = TypeVar("T")

PUBLISH_THREADS = 8

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200
_REPR.maxlong = 100
CONTROL_THREADS = 2

# What a route may say for a message to still go where `message` says: kombu
# applies anything else (an exchange, a routing key, a serializer...) itself.
_PLAIN_ROUTE = frozenset({"queue", "priority"})


@dataclass(frozen=True, slots=True)
class Delivery:
    """One task message to send: what a Start enqueues."""

    task_name: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue: str
    countdown: float | None
    time_limit: float | None
    soft_time_limit: float | None
    priority: int | None = None
    """The task's own priority (its `priority` option, else the app's
    task_default_priority); None leaves it to the app's routes, as with
    `apply_async`."""
    exclusivity_key: str = ""
    """The key its Start claimed ("" for none), carried in CLAIMED_HEADER."""
    trace_context: dict[str, str] = dataclasses.field(default_factory=dict)
    """Its Start's trace context (W3C `traceparent`, `tracestate`), carried
    in the message's headers so that the task's run continues the trace
    (taskservice.server.tracing); empty when tracing is off."""

    def to_json(self) -> str:
        """The delivery as kept for a deferred task (kombu's JSON, so that
        arguments converted to dates, UUIDs or decimals come back as such)."""
        return kombu_json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Delivery:
        """A delivery kept by `to_json`."""
        return cls(**kombu_json.loads(text))


class Ticket:
    """A reserved place among the pending publishes (see Publisher.admit)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def hand_over(self) -> Callable[[], None]:
        """The release, now owned by whoever completes the publish."""
        release, self._release = self._release, None
        assert release is not None, "a ticket is handed over once"
        return release

    def close(self) -> None:
        """Give the admission back."""
        if self._release is not None:
            self._release()
            self._release = None


class Publisher:
    """Sends tasks and revokes through `app` (a Celery app without a result backend)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self._app = app
        self.direct = _same_redis(app, settings)
        """Messages go into the records' Redis with the claim (see `message`)."""
        self._reply_to = app.thread_oid
        self._origin = anon_nodename()  # Celery would compute it for every message
        self._default_queue = str(app.conf.task_default_queue)
        self._limit = settings.max_pending_publishes
        self._timeout = settings.publish_timeout
        self._pending = 0
        self._publish_pool = ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="publish")
        self._control_pool = ThreadPoolExecutor(CONTROL_THREADS, thread_name_prefix="control")

    @property
    def app(self) -> Celery:
        """The app it publishes with: the broker settings of the workers."""
        return self._app

    @property
    def default_queue(self) -> str:
        """The queue a task goes to when neither a route nor the Start names one."""
        return self._default_queue

    @functools.cache  # noqa: B019 (one publisher per server, a few task names)
    def queue_for(self, task_name: str) -> str:
        """The queue a task goes to when the caller names none: where the
        app's `task_routes` send it, else the default queue."""
        route = self._app.amqp.router.route({}, task_name)
        queue = route.get("queue")
        return str(getattr(queue, "name", None) or self._default_queue)

    def push(self, delivery: Delivery) -> tuple[str, str] | None:
        """The (list, message) a Start pushes with its claim: the message kombu
        would send for `delivery`, on the list kombu would put it on. None when
        only kombu can deliver it: publish it with `send`."""
        if not self.direct:
            return None
        priority = self._plain_priority(delivery.task_name, delivery.queue, delivery.priority)
        if priority is None:
            return None
        return delivery.queue, self.message(delivery, priority=priority)

    def pushes(self, task_name: str, queue: str, priority: int | None) -> bool:
        """Whether `push` has a message for a Start of `task_name` on `queue`
        ('' for the task's routed queue) with the task's `priority`."""
        queue = queue or self.queue_for(task_name)
        return self.direct and self._plain_priority(task_name, queue, priority) is not None

    # Few entries (task names x queues), but callers may name queues by a pattern.
    @functools.lru_cache(maxsize=1024)  # noqa: B019 (one publisher per server)
    def _plain_priority(self, task_name: str, queue: str, priority: int | None) -> int | None:
        """The priority kombu writes on the message when it LPUSHes it on the
        list named `queue` itself; None if it would put it anywhere else.

        Mirrors Celery's send_task and kombu's Redis transport: Celery routes
        a message by queue name (kombu's nameless exchange, routing key = the
        queue's name) unless a route names an exchange or routing key, or the
        queue's exchange is not a direct one; kombu's Redis transport then
        pushes it on `global_keyprefix` + queue, + a priority step unless the
        message's priority maps to step 0.
        """
        conf = self._app.conf
        transport = conf.broker_transport_options or {}
        if transport.get("global_keyprefix") or conf.task_compression:
            return None
        router = self._app.amqp.router
        routes = router.routes  # type: ignore[attr-defined]  # not in celery-types
        if not all(isinstance(route, MapRoute) for route in routes):
            return None  # a router function may route by the arguments
        try:
            routed = router.route({"queue": queue, "priority": priority}, task_name)
        except KeyError:  # QueueNotFound: kombu's path reports it
            return None
        target = routed.get("queue")
        if any(v is not None for k, v in routed.items() if k not in _PLAIN_ROUTE):
            return None  # an exchange, routing key or other option of a route
        if not isinstance(target, Queue) or target.name != queue:
            return None
        if getattr(target.exchange, "type", "direct") != "direct":
            return None  # fanout or topic: delivered through the exchange's bindings
        expires = target.expires  # type: ignore[attr-defined]  # not in kombu's stubs
        if expires is not None or "x-expires" in (target.queue_arguments or {}):
            return None  # kombu also sets the expiry of the queue's lists
        # kombu writes `priority or 0` in the message, and picks the list by
        # that number clamped to 0..9: the plain list is the step that is 0.
        written = routed.get("priority") or 0
        if not isinstance(written, int) or isinstance(written, bool):
            return None  # whatever kombu makes of it, it is not ours to guess
        steps = transport.get("priority_steps") or PRIORITY_STEPS
        if steps[bisect.bisect(steps, max(min(written, 9), 0)) - 1]:
            return None  # kombu pushes it on queue + sep + step
        return written

    def message(self, delivery: Delivery, *, priority: int = 0) -> str:
        """A task message as kombu's Redis transport pushes it on the list
        named `queue`: Celery's own headers and body (protocol 2), in kombu's
        envelope, routed by queue name so that a redelivery finds it too.
        `priority` is what kombu writes in it (see `push`)."""
        message = self._app.amqp.create_task_message(
            delivery.task_id,
            delivery.task_name,
            delivery.args,
            delivery.kwargs,
            countdown=delivery.countdown,
            time_limit=delivery.time_limit,
            soft_time_limit=delivery.soft_time_limit,
            reply_to=self._reply_to,
            origin=self._origin,
            ignore_result=None,  # the task's own setting applies, as with send_task
            # What worker logs show; reprlib's bounded repr costs a fraction
            # of Celery's saferepr.
            argsrepr=_REPR.repr(delivery.args),
            kwargsrepr=_REPR.repr(delivery.kwargs),
        )
        headers = {
            **message.headers,
            CLAIMED_HEADER: delivery.exclusivity_key,
            **delivery.trace_context,
        }
        body = kombu_json.dumps(message.body).encode("utf-8")
        properties = {
            **message.properties,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": delivery.queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
        envelope = {
            "body": base64.b64encode(body).decode("ascii"),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": headers,
            "properties": properties,
        }
        return str(kombu_json.dumps(envelope))

    @contextlib.contextmanager
    def admit(self) -> Iterator[Ticket]:
        """Reserve a place for one publish, or raise PublishBacklog. The place
        is freed on exit, unless `send` took the ticket: then it is freed when
        the broker call really ends (a thread may outlive its Start)."""
        if self._pending >= self._limit:
            raise PublishBacklog(
                f"{self._pending} Starts are waiting for the Celery broker (the limit is "
                f"{self._limit}); retry with backoff"
            )
        self._pending += 1
        ticket = Ticket(self._released)
        try:
            yield ticket
        finally:
            ticket.close()

    def _released(self) -> None:
        self._pending -= 1

    async def send(self, ticket: Ticket, delivery: Delivery, *, wait: float) -> None:
        """Publish a task message; BrokerUnavailable if the broker fails or does
        not take it within `wait` seconds (it may still arrive later)."""
        call = functools.partial(
            self._app.send_task,
            delivery.task_name,
            args=delivery.args,
            kwargs=delivery.kwargs,
            task_id=delivery.task_id,
            queue=delivery.queue,
            countdown=delivery.countdown,
            # Celery takes float seconds here; its stubs say int.
            time_limit=delivery.time_limit,  # type: ignore[arg-type]
            soft_time_limit=delivery.soft_time_limit,  # type: ignore[arg-type]
            # As apply_async does; None leaves the routes' priority.
            priority=delivery.priority,
            headers={CLAIMED_HEADER: delivery.exclusivity_key, **delivery.trace_context},
        )
        loop = asyncio.get_running_loop()
        release = ticket.hand_over()

        def released(_: object) -> None:
            # From the publishing thread, possibly after the server stopped.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(release)

        future = self._publish_pool.submit(call)
        future.add_done_callback(released)
        await _bounded(future, wait, "the Celery broker did not take the message")

    async def revoke(self, task_ids: list[str], *, signal: str | None = None) -> None:
        """Broadcast Celery's revoke of `task_ids` (one message for all); with
        `signal`, the workers running them also send that signal to their
        processes."""
        revoke = self._app.control.revoke
        if signal is None:
            call = functools.partial(revoke, list(task_ids))
        else:
            call = functools.partial(revoke, list(task_ids), terminate=True, signal=signal)
        future = self._control_pool.submit(call)
        await _bounded(future, self._timeout, "the Celery broker did not take the revoke")

    def close(self) -> None:
        """Stop the publish and revoke threads."""
        for pool in (self._publish_pool, self._control_pool):
            pool.shutdown(wait=False, cancel_futures=True)


async def _bounded(future: concurrent.futures.Future[T], wait: float, timeout_message: str) -> T:
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), wait)
    except TimeoutError:
        # Not started yet: it never will be. Started: it ends within the
        # broker's socket timeout, still counted as pending until then.
        future.cancel()
        raise BrokerUnavailable(f"{timeout_message} within {wait:g}s; retry") from None
    except Exception as exc:
        error = broker_error(exc)
        if error is None:
            raise
        raise error from exc


def _same_redis(app: Celery, settings: Settings) -> bool:
    """Whether `app`'s broker is the records' Redis (the same URL; through
    sentinels, the same sentinels, database and master name), so that a
    claim script can push the message itself."""
    url = app.conf.broker_url
    if url != settings.records_celery_url:
        return False
    if settings.sentinel_addresses:
        options = app.conf.broker_transport_options or {}
        return bool(options.get("master_name") == settings.redis_sentinel_master)
    return str(url).startswith(("redis://", "rediss://", "unix://"))


def create_publisher(settings: Settings, source: Celery) -> Celery:
    """The app the gRPC server sends `source`'s tasks and revokes with: the
    same broker and routing, bounded waits, JSON messages.

    It has no result backend: with the Redis backend, Celery subscribes the
    sender to each sent task's result channel, which a long-running server
    must not accumulate; taskservice's records carry results instead.
    """
    publisher = Celery("taskservice-publisher", set_as_current=False)
    if not settings.celery_app:  # taskservice's own app (taskservice.apps.load_app)
        config = apps.celery_config(settings)
    else:
        # The team's own settings (broker, queues, routes), read unmasked.
        config = {
            name: source.conf[name]
            for name in source.conf.table(with_defaults=False)
            if name != "deprecated_settings"
        }
        ours = apps.celery_config(
            settings.model_copy(update={"broker_url": source.conf.broker_url})
        )
        for name in ("task_serializer", "task_publish_retry_policy", "broker_connection_timeout"):
            config[name] = ours[name]
        config["broker_transport_options"] = {
            **ours["broker_transport_options"],
            **(config.get("broker_transport_options") or {}),
        }
    config.pop("result_backend", None)
    publisher.config_from_object(config)
    return publisher
