"""kombu's Redis transport, made to survive a Redis restart.

With kombu/Celery 5.7, a worker that loses its Redis broker while it holds
unacknowledged messages (prefetched, or waiting for a countdown) can die on
reconnect: `Unrecoverable error: AttributeError("'NoneType' object has no
attribute 'hostname'")`. The consumer's reconnect first calls
`Connection.collect()`: the consuming channel fails to close (its pending
BRPOP read fails, Redis being down; the transport's `close_connection`
would try again, but the control mailbox's channel, which it closes first,
fails too), and `collect()` then detaches the transport
(`transport.client = None`). Celery then closes the same channel again,
which now tries to put its unacknowledged messages back through a new
connection pool, built from `transport.client.hostname`: the
AttributeError escapes Celery's reconnect handler and stops the worker.
tests/unit/test_redis_transport.py plays this against kombu's transport
and this one; pyproject.toml caps kombu below its next minor for it.

This transport (selected by `broker_transport` in `taskservice.apps`, and
`SentinelTransport` for a `sentinel://` broker, whose channel is kombu's
Sentinel channel with the same fix) fixes both halves:
- a channel remembers its kombu Connection and uses it when the transport
  was detached, so the late restore fails like any restore while Redis is
  down (a ConnectionError, which Celery ignores while reconnecting);
- the delivery tags that could not be restored are remembered, and put back
  in their queue by the first new channel to the same Redis, as soon as it
  connects (kombu's own `restore_by_tag`, atomic, a no-op for a tag already
  gone). Without this they would wait in the `unacked` hash for the whole
  visibility timeout.

A third window, on the way in: kombu BRPOPs a message off its queue and only
then records it as unacknowledged (`QoS.append`, a second write). If Redis
dies between the two (the pop is already in its AOF), the write fails, the
message is in no list and no hash, and its task would wait QUEUED for good.
The message is still in this process's memory: it is remembered and put back
at the head of its queue by the first new channel, like the tags above (a
copy the failed write did store too is redelivered at most once more, and
the record refuses a second run).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import kombu.transport as kombu_transport
from kombu.transport import redis as kombu_redis

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_unrestored: dict[tuple[Any, ...], list[str]] = {}
"""Delivery tags whose restore failed, by (host, port, db, unacked key, prefix)."""
_unplaced: dict[tuple[Any, ...], list[tuple[Any, str, str]]] = {}
"""Messages popped off a queue whose unacked record failed: (payload, exchange,
routing key), by the same target."""


def _forget_all() -> None:
    _unrestored.clear()
    _unplaced.clear()


os.register_at_fork(after_in_child=_forget_all)  # a pool child restores nothing

# kombu's stubs omit most of what is overridden here.
_QoS: Any = kombu_redis.QoS
_Channel: Any = kombu_redis.Channel
_Transport: Any = kombu_redis.Transport
_SentinelChannel: Any = kombu_redis.SentinelChannel
_SentinelTransport: Any = kombu_redis.SentinelTransport


def _target(channel: Channel) -> tuple[Any, ...] | None:
    conninfo = channel.conninfo
    if conninfo is None:
        return None
    options = getattr(conninfo, "transport_options", None) or {}
    return (
        conninfo.hostname,
        conninfo.port,
        conninfo.virtual_host,
        channel.unacked_key,
        options.get("global_keyprefix", ""),
    )


class QoS(_QoS):  # type: ignore[misc]
    """kombu's QoS, restoring through the channel's own connection (see the module)."""

    def restore_unacked(self, client: Any = None) -> Any:
        """Put the unacknowledged messages back; remember the tags that could not be."""
        self._flush()  # forget what was acknowledged meanwhile
        tags = list(self._delivered)
        try:
            return super().restore_unacked(client)
        except self.channel.connection_errors:
            target = _target(self.channel)
            if tags and target is not None:
                with _lock:
                    _unrestored.setdefault(target, []).extend(tags)
                logger.warning(
                    "broker down: %d unacknowledged message(s) will be restored on reconnect",
                    len(tags),
                )
            raise

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record a delivered message as unacknowledged; if Redis is gone,
        remember the message to put it back on reconnect (see the module)."""
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors:
            target = _target(self.channel)
            if target is not None:
                delivery = message.delivery_info
                entry = (message._raw, delivery["exchange"], delivery["routing_key"])
                with _lock:
                    _unplaced.setdefault(target, []).append(entry)
                logger.warning(
                    "broker down as message %s arrived: it goes back to its queue on reconnect",
                    delivery_tag,
                )
            raise


class Channel(_Channel):  # type: ignore[misc]
    """kombu's Redis channel, remembering its connection (see the module)."""

    QoS = QoS
    conninfo: Any = None

    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        # `connection` is the transport; its `client` the kombu Connection.
        self.conninfo = connection.client
        super().__init__(connection, *args, **kwargs)
        self._restore_unrestored()

    def _connparams(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is not None and transport.client is None and self.conninfo is not None:
            transport.client = self.conninfo
            try:
                return super()._connparams(asynchronous=asynchronous)
            finally:
                transport.client = None
        return super()._connparams(asynchronous=asynchronous)

    def close(self) -> None:
        """Close, restoring what it holds through the remembered connection."""
        try:
            super().close()
        finally:
            if self.closed:
                # The late restore may have built a pool after close() had
                # already disconnected them.
                try:
                    self._disconnect_pools()
                except Exception:
                    logger.debug("disconnecting a closed channel's pools failed", exc_info=True)

    def _restore_unrestored(self) -> None:
        target = _target(self)
        if target is None:
            return
        with _lock:
            tags = _unrestored.pop(target, [])
            messages = _unplaced.pop(target, [])
        done = placed = 0
        try:
            with self.conn_or_acquire() as client:
                for tag in tags:
                    self.qos.restore_by_tag(tag, client=client)
                    done += 1
                for payload, exchange, routing_key in messages:
                    self._do_restore_message(payload, exchange, routing_key, client)
                    placed += 1
        except Exception as exc:
            with _lock:
                _unrestored.setdefault(target, []).extend(tags[done:])
                _unplaced.setdefault(target, []).extend(messages[placed:])
            logger.warning(
                "restoring %d message(s) failed (%r); retrying later",
                len(tags) + len(messages) - done - placed,
                exc,
            )
        if done or placed:
            logger.warning(
                "restored %d unacknowledged message(s) after reconnecting", done + placed
            )


class Transport(_Transport):  # type: ignore[misc]
    """kombu's Redis transport with this module's channel."""

    Channel = Channel


class SentinelChannel(Channel, _SentinelChannel):  # type: ignore[misc]
    """kombu's Redis Sentinel channel (it finds the master through the
    sentinels on every connect), with this module's fix."""

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        # It reads the sentinels' addresses from the kombu Connection too.
        transport = self.connection
        if transport is not None and transport.client is None and self.conninfo is not None:
            transport.client = self.conninfo
            try:
                return super()._sentinel_managed_pool(asynchronous)
            finally:
                transport.client = None
        return super()._sentinel_managed_pool(asynchronous)


class SentinelTransport(_SentinelTransport):  # type: ignore[misc]
    """kombu's Redis Sentinel transport (`sentinel://`) with this module's channel."""

    Channel = SentinelChannel


def _name_the_sentinel_scheme() -> None:
    """Make kombu's `sentinel` scheme name SentinelTransport in this process.

    A `sentinel://` broker is one URL per sentinel, `;`-separated, which
    kombu treats as failover alternates: when a connect fails it moves on to
    the next (kombu.Connection.switch), and re-reads the transport from that
    URL's scheme, dropping the one Celery was given (`broker_transport`). A
    worker would run kombu's own Sentinel transport, without the fix, after
    its first failover. Done on import, which kombu does when it first
    resolves this module's transport for a connection, before any switch.
    """
    kombu_transport.TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"
    # A class kombu resolved for the scheme before (private; kombu is capped).
    getattr(kombu_transport, "_transport_cache", {}).pop("sentinel", None)


_name_the_sentinel_scheme()
