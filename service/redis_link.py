"""One Redis connection that every call of a server shares, pipelined.

Each command is written at once and its reply matched in order (Redis
answers in order), so concurrent calls share one connection without a pool:
no connection is checked out or waited for, writes issued in the same loop
iteration leave in one packet, and hiredis parses the replies. Measured on
this machine kind: about 10 us of client CPU per script call, against 60-100
us through redis-py's pools.

Failure: a lost connection fails every call waiting on it with a
redis.exceptions.ConnectionError; one reply later than `timeout` fails them
with TimeoutError (a pipeline cannot skip a reply), and the next call
reconnects. Calls retry such errors a few times, with backoff: every script
of taskservice is safe to run twice. Error replies become redis-py's own
exception classes, so service/errors.py maps them as it maps redis-py's.

With `sentinels`, every connection first asks them where the master of
`master_name` is, and checks with ROLE that it reached a master: a master
that died, or a server that answers READONLY (it was demoted), drops the
connection, and the next attempt finds the master again, so the link
follows a failover by itself. Writes that must reach replicas before they
count go through `script_replicated` (a script, then Redis's WAIT on the
same connection).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Sequence
from typing import Any, TypeVar

import hiredis
import redis.exceptions
from redis.connection import parse_url

from taskservice.core.scripts import Call
from taskservice.core.settings import Settings

R = TypeVar("R")

logger = logging.getLogger(__name__)

RETRIES = 3
"""Attempts of a call after a connection error or timeout, with backoff."""

_ERRORS: dict[str, type[redis.exceptions.RedisError]] = {
    "NOSCRIPT": redis.exceptions.NoScriptError,
    "READONLY": redis.exceptions.ReadOnlyError,
    "OOM": redis.exceptions.OutOfMemoryError,
    "LOADING": redis.exceptions.BusyLoadingError,
    "NOAUTH": redis.exceptions.AuthenticationError,
    "WRONGPASS": redis.exceptions.AuthenticationError,
    "NOPERM": redis.exceptions.NoPermissionError,
    "TRYAGAIN": redis.exceptions.TryAgainError,
    "EXECABORT": redis.exceptions.ExecAbortError,
}


def _error(message: str) -> redis.exceptions.RedisError:
    """redis-py's exception for an error reply (`BUSY ...` stays a ResponseError
    carrying its code, as redis-py leaves it)."""
    code, _, rest = message.partition(" ")
    if rest.startswith("Protocol error: unauthenticated"):
        # Redis 7 answers a long command (EVALSHA with its keys) from a
        # client that has not authenticated with this instead of NOAUTH,
        # and closes the connection.
        return redis.exceptions.AuthenticationError(rest)
    cls = _ERRORS.get(code)
    return cls(rest) if cls is not None else redis.exceptions.ResponseError(message)


def _raised(reply: Any) -> Any:
    if isinstance(reply, BaseException):
        raise reply
    return reply


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


_LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _read_only(reply: Any) -> bool:
    """True for a READONLY reply: the server is a replica now (before Redis 7 a
    script's error carries the code inside its message)."""
    return isinstance(reply, redis.exceptions.ReadOnlyError) or (
        isinstance(reply, redis.exceptions.ResponseError) and "-READONLY " in str(reply)
    )


def _command(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = (
            arg.encode()
            if isinstance(arg, str)
            else arg
            if isinstance(arg, bytes)
            else (str(arg).encode())
        )
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace", replyError=_error)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self._link._answer(self, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._lost(
            self, redis.exceptions.ConnectionError(f"Redis closed the connection: {exc}")
        )


class RedisLink:
    """A pipelined connection to the Redis at `url`, or to the master the
    `sentinels` name for `master_name` (`url` then gives the database and
    credentials); see the module."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        client_name: str = "",
        sentinels: Sequence[tuple[str, int]] = (),
        master_name: str = "",
        sentinel_password: str = "",
    ) -> None:
        self._options = parse_url(url)  # type: ignore[no-untyped-call]
        self._tls = url.startswith("rediss://")
        self._timeout = timeout
        self._client_name = client_name
        self._sentinels = list(sentinels)
        self._master_name = master_name
        self._sentinel_password = sentinel_password
        # WAITs asked for in this turn of the loop: one, written after every
        # command of the turn, serves them all.
        self._turn_waits: dict[tuple[int, int], asyncio.Future[Any]] = {}
        # A WAIT written and not yet answered: it blocks the connection, so
        # the next replicated writes wait for it and share one WAIT after it
        # (group commit), instead of queueing one WAIT each behind it.
        self._wait_in_flight: asyncio.Future[Any] | None = None
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        # Commands issued in one turn of the event loop leave in one write.
        self._outgoing: list[bytes] = []
        self._flushing: _Protocol | None = None

    @classmethod
    def to_records(cls, settings: Settings, *, client_name: str) -> RedisLink:
        """A link to the records' Redis: `redis_url`, or the master its sentinels name."""
        return cls(
            settings.redis_url,
            timeout=settings.redis_timeout,
            client_name=client_name,
            sentinels=settings.sentinel_addresses,
            master_name=settings.redis_sentinel_master,
            sentinel_password=settings.redis_sentinel_password.get_secret_value(),
        )

    async def execute(self, *args: Any) -> Any:
        """Run one command and return its reply (retrying a lost connection,
        and with sentinels a demoted master)."""
        delay = 0.05
        for attempt in range(RETRIES + 1):
            try:
                return await self._send(args)
            except (
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
                redis.exceptions.ResponseError,
            ) as error:
                if isinstance(error, redis.exceptions.ResponseError) and not (
                    self._sentinels and _read_only(error)
                ):
                    raise  # READONLY without sentinels: the same server would answer
                if attempt == RETRIES or isinstance(error, redis.exceptions.AuthenticationError):
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def script_replicated(
        self, call: Call[R], replicas: int, wait_for: float
    ) -> tuple[R, int]:
        """Run a script, then Redis's `WAIT replicas wait_for` on the same
        connection: its parsed reply, and how many replicas acknowledged every
        write made so far on the connection (this script's included).

        Not retried on a lost connection (a rerun that writes nothing would
        be confirmed by a WAIT on the new connection for nothing): the caller
        decides. WAITs asked for in one turn of the loop share one."""
        keys, script = call.keys, call.script
        ms = max(1, round(wait_for * 1000))
        reply, acked = await self._with_wait(
            ("EVALSHA", script.sha, len(keys), *keys, *call.args), replicas, ms
        )
        if isinstance(reply, redis.exceptions.NoScriptError):
            reply, acked = await self._with_wait(
                ("EVAL", script.source, len(keys), *keys, *call.args), replicas, ms
            )
        return call.parse(_raised(reply)), int(_raised(acked))

    async def _with_wait(self, args: tuple[Any, ...], replicas: int, ms: int) -> tuple[Any, Any]:
        while self._wait_in_flight is not None:
            await asyncio.wait({self._wait_in_flight})
        protocol = self._protocol or await self._connect()
        command = self._write(protocol, args)
        wait = self._turn_waits.get((replicas, ms))
        if wait is None:
            wait = self._turn_waits[(replicas, ms)] = asyncio.get_running_loop().create_future()
        outcomes: tuple[Any, Any] = await asyncio.gather(command, wait, return_exceptions=True)
        reply, acked = outcomes
        for outcome in (reply, acked):
            if isinstance(outcome, _LOST):
                raise outcome
        if _read_only(reply):
            self._drop(protocol)
        return reply, acked

    async def script(self, call: Call[R]) -> R:
        """Run a script by its SHA (sending its source when Redis does not
        know it: a first call, a Redis restart, a SCRIPT FLUSH); its reply,
        parsed by the call's own parser."""
        keys, script = call.keys, call.script
        try:
            reply = await self.execute("EVALSHA", script.sha, len(keys), *keys, *call.args)
        except redis.exceptions.NoScriptError:
            reply = await self.execute("EVAL", script.source, len(keys), *keys, *call.args)
        return call.parse(reply)

    def close(self) -> None:
        """Close the connection; calls waiting on it fail with ConnectionError."""
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._fail(redis.exceptions.ConnectionError("the Redis link was closed"))

    async def _send(self, args: tuple[Any, ...]) -> Any:
        protocol = self._protocol or await self._connect()
        reply = await self._write(protocol, args)
        if _read_only(reply):
            # A demoted master: the next call reconnects (through the
            # sentinels, to the new one).
            self._drop(protocol)
        return _raised(reply)

    def _drop(self, protocol: _Protocol) -> None:
        """Stop using `protocol`: the calls waiting on it fail, the next reconnects."""
        if protocol is self._protocol:
            logger.warning("Redis answered READONLY (a demoted master); reconnecting")
            self._protocol = None
            if protocol.transport is not None:
                protocol.transport.close()
            self._fail(redis.exceptions.ConnectionError("Redis is read-only now; reconnecting"))

    def _write(self, protocol: _Protocol, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Send a command; the future gets its reply (in order)."""
        loop = asyncio.get_running_loop()
        if self._flushing is not None and self._flushing is not protocol:
            # What this turn wrote so far went to another connection (one
            # that was lost and replaced meanwhile): it leaves first, there.
            self._flush()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((future, loop.time()))
        self._outgoing.append(_command(args))
        if self._flushing is None:
            self._flushing = protocol
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout, self._check)
        return future

    def _flush(self) -> None:
        protocol, self._flushing = self._flushing, None
        waits, self._turn_waits = self._turn_waits, {}
        if waits:
            now = asyncio.get_running_loop().time()
            for (replicas, ms), future in waits.items():
                self._waiting.append((future, now))
                self._outgoing.append(_command(("WAIT", replicas, ms)))
                self._wait_in_flight = future
                future.add_done_callback(self._wait_answered)
        data, self._outgoing = b"".join(self._outgoing), []
        if protocol is not None and protocol.transport is not None:
            protocol.transport.write(data)

    def _wait_answered(self, future: asyncio.Future[Any]) -> None:
        if self._wait_in_flight is future:
            self._wait_in_flight = None

    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            # Its callers may all be cancelled before it fails; the error
            # reaches whoever awaits it, not the loop's "never retrieved" log.
            self._connecting.add_done_callback(_retrieved)
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        options = self._options
        context = ssl.create_default_context() if self._tls else None
        if self._sentinels:
            host, port = await self._find_master()
        else:
            host, port = options.get("host", "localhost"), options.get("port", 6379)
        try:
            if "path" in options and not self._sentinels:
                connecting = loop.create_unix_connection(lambda: _Protocol(self), options["path"])
            else:
                connecting = loop.create_connection(
                    lambda: _Protocol(self), host, port, ssl=context
                )
            _, protocol = await asyncio.wait_for(connecting, self._timeout)
        except (OSError, TimeoutError) as error:
            raise redis.exceptions.ConnectionError(f"cannot connect to Redis: {error}") from None
        setup: list[tuple[Any, ...]] = []
        if options.get("password"):
            user = options.get("username")
            setup.append(
                ("AUTH", user, options["password"]) if user else ("AUTH", options["password"])
            )
        if options.get("db"):
            setup.append(("SELECT", options["db"]))
        if self._client_name:
            setup.append(("CLIENT", "SETNAME", self._client_name))
        if self._sentinels:
            # The sentinels' answer may be stale (a failover under way).
            setup.append(("ROLE",))
        # Written before any call can see the connection, so every call
        # follows AUTH and SELECT in the pipeline.
        replies = [self._write(protocol, command) for command in setup]
        self._protocol = protocol
        last: Any = None
        try:
            for reply in replies:
                last = _raised(await reply)
            if self._sentinels and (not last or last[0] != "master"):
                raise redis.exceptions.ConnectionError(
                    f"{host}:{port} is no master (ROLE {last[0] if last else '?'}); "
                    "a failover is under way"
                )
        except redis.exceptions.RedisError:
            self.close()
            raise
        return protocol

    async def _find_master(self) -> tuple[str, int]:
        """The master's address, as the first sentinel that knows it says."""
        problems = []
        for n, (host, port) in enumerate(self._sentinels):
            try:
                address = await asyncio.wait_for(self._ask_sentinel(host, port), self._timeout)
            except (OSError, TimeoutError, redis.exceptions.RedisError) as error:
                problems.append(f"{host}:{port}: {error or type(error).__name__}")
                continue
            if address is None:
                problems.append(f"{host}:{port} knows no master {self._master_name!r}")
                continue
            if n:  # ask the one that answered first, next time
                self._sentinels.insert(0, self._sentinels.pop(n))
            return address
        raise redis.exceptions.ConnectionError(
            f"no sentinel names the master {self._master_name!r}: {'; '.join(problems)}"
        )

    async def _ask_sentinel(self, host: str, port: int) -> tuple[str, int] | None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            commands: list[tuple[Any, ...]] = []
            if self._sentinel_password:
                commands.append(("AUTH", self._sentinel_password))
            commands.append(("SENTINEL", "get-master-addr-by-name", self._master_name))
            writer.write(b"".join(_command(command) for command in commands))
            parser = hiredis.Reader(encoding="utf-8", errors="replace", replyError=_error)
            replies: list[Any] = []
            while len(replies) < len(commands):
                data = await reader.read(4096)
                if not data:
                    raise redis.exceptions.ConnectionError("the sentinel closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    replies.append(reply)
            address = [_raised(reply) for reply in replies][-1]
            return None if address is None else (str(address[0]), int(address[1]))
        finally:
            writer.close()

    def _answer(self, protocol: _Protocol, reply: Any) -> None:
        if protocol is not self._protocol or not self._waiting:
            return
        future, _ = self._waiting.popleft()
        if not future.done():
            future.set_result(reply)

    def _lost(self, protocol: _Protocol, error: redis.exceptions.RedisError) -> None:
        if protocol is self._protocol:
            self._protocol = None
            self._fail(error)

    def _fail(self, error: redis.exceptions.RedisError) -> None:
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def _check(self) -> None:
        """The watchdog: a reply overdue by `timeout` breaks the connection."""
        self._watchdog = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        overdue = loop.time() - self._waiting[0][1] - self._timeout
        if overdue >= 0:
            logger.warning("Redis did not answer within %gs; reconnecting", self._timeout)
            protocol, self._protocol = self._protocol, None
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abort()
            self._fail(redis.exceptions.TimeoutError(f"Redis did not answer in {self._timeout:g}s"))
        else:
            self._watchdog = loop.call_later(-overdue, self._check)
