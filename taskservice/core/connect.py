"""How the parts reach the records' Redis: by `redis_url`, or, with
`redis_sentinels`, the current master of the set the sentinels watch.

redis-py's Sentinel support does the finding: a connection asks the
sentinels for the master's address whenever it (re)connects, and one that
meets a READONLY reply (its server was demoted) drops itself and raises
ConnectionError, so the next attempt finds the new master. Callers keep
their own retries (the worker's `Reporter.run`, the event hub's loop);
these clients only decide where a connection goes. The server's pipelined
calls use `taskservice.server.redis_link`, which asks the sentinels itself.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from taskservice.core.settings import Settings


def master_options(settings: Settings) -> dict[str, Any]:
    """The database and credentials of `redis_url`, for a connection to the
    master the sentinels name (their host and port are not used)."""
    parts = urlsplit(settings.redis_url)
    options: dict[str, Any] = {"db": int(parts.path.strip("/") or 0)}
    if parts.password is not None:
        options["password"] = unquote(parts.password)
    if parts.username:
        options["username"] = unquote(parts.username)
    return options


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """How to talk to the sentinels themselves: the same timeouts, and their
    own password if they have one."""
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": settings.redis_timeout,
    }
    password = settings.redis_sentinel_password.get_secret_value()
    if password:
        options["password"] = password
    return options


def client(settings: Settings, **options: Any) -> redis.Redis:
    """A redis-py client of the records' Redis (`options` as redis.Redis takes
    them): of `redis_url`, or of the master the sentinels name."""
    if not settings.sentinel_addresses:
        return redis.Redis.from_url(settings.redis_url, **options)
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(settings.sentinel_addresses), sentinel_kwargs=sentinel_options(settings)
    )
    master: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, **{**master_options(settings), **options}
    )
    return master


def async_client(settings: Settings, **options: Any) -> redis.asyncio.Redis:
    """`client`, for asyncio."""
    if not settings.sentinel_addresses:
        return redis.asyncio.Redis.from_url(settings.redis_url, **options)
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(settings.sentinel_addresses), sentinel_kwargs=sentinel_options(settings)
    )
    master: redis.asyncio.Redis = sentinel.master_for(
        settings.redis_sentinel_master, **{**master_options(settings), **options}
    )
    return master
