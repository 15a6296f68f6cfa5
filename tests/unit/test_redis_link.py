"""The server's pipelined Redis link against real Redis servers: finding the
master through sentinels, leaving a demoted one, and writes that wait for
replicas (one WAIT per batch, never a queue of them)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.exceptions

from taskservice.cli.embedded import EmbeddedRedis
from taskservice.core import record
from taskservice.core.scripts import Claimed, Scripts
from taskservice.server.redis_link import RedisLink
from tests.support.sentinels import MASTER_NAME, online_replicas

SCRIPTS = Scripts("link-test", 600)


class FakeSentinel:
    """Answers every `SENTINEL get-master-addr-by-name` with `port` on 127.0.0.1
    (a real sentinel would also watch and promote; here the test decides)."""

    def __init__(self) -> None:
        self.port = 0
        self.master_port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeSentinel:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        port = str(self.master_port).encode()
        writer.write(b"*2\r\n$9\r\n127.0.0.1\r\n$%d\r\n%s\r\n" % (len(port), port))
        await writer.drain()
        writer.close()


@pytest.fixture
def pair(redis_server: EmbeddedRedis) -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    """A master and its replica (started after the session's Redis, whose
    port is chosen early but bound only then)."""
    master = EmbeddedRedis(args=("--repl-diskless-sync-delay", "0")).start()
    replica = EmbeddedRedis(args=("--replicaof", "127.0.0.1", str(master.port))).start()
    client = redis.Redis(port=master.port, decode_responses=True)
    deadline = time.monotonic() + 10
    while online_replicas(client) < 1:
        assert time.monotonic() < deadline, "the replica did not come online"
        time.sleep(0.05)
    client.close()
    yield master, replica
    replica.stop()
    master.stop()


@pytest.fixture
async def sentinel() -> AsyncIterator[FakeSentinel]:
    async with FakeSentinel() as fake:
        yield fake


def through(fake: FakeSentinel) -> RedisLink:
    return RedisLink(
        "redis://127.0.0.1:1/0",  # never reached: the sentinel names the master
        timeout=1,
        sentinels=[("127.0.0.1", fake.port)],
        master_name=MASTER_NAME,
    )


def claim(key: str = "") -> tuple[str, object]:
    task_id = str(uuid.uuid4())
    fields = record.new_record_fields(task_id, "t", exclusivity_key=key, queue="q", scheduled=None)
    return task_id, SCRIPTS.claim(fields, exclusivity_key=key, provisional_ms=60_000)


async def test_a_link_through_sentinels_connects_only_to_a_master(
    pair: tuple[EmbeddedRedis, EmbeddedRedis], sentinel: FakeSentinel
) -> None:
    master, replica = pair
    link = through(sentinel)
    try:
        sentinel.master_port = replica.port  # stale: a failover under way
        with pytest.raises(redis.exceptions.ConnectionError, match="is no master"):
            await link.execute("PING")
        sentinel.master_port = master.port
        assert await link.execute("SET", "k", "v") == "OK"
    finally:
        link.close()


async def test_a_master_demoted_under_the_link_is_left_for_the_new_one(
    pair: tuple[EmbeddedRedis, EmbeddedRedis], sentinel: FakeSentinel
) -> None:
    master, replica = pair
    sentinel.master_port = master.port
    link = through(sentinel)
    try:
        _, first = claim()
        assert await link.script(first) == Claimed()  # type: ignore[arg-type]
        # The replica takes over and the old master follows it, keeping its
        # clients: the link's next write meets READONLY.
        promoted = redis.Redis(port=replica.port)
        promoted.execute_command("REPLICAOF", "NO", "ONE")
        redis.Redis(port=master.port).execute_command("REPLICAOF", "127.0.0.1", replica.port)
        sentinel.master_port = replica.port
        task_id, second = claim()
        assert await link.script(second) == Claimed()  # type: ignore[arg-type]
        assert promoted.exists(record.task_key(SCRIPTS.prefix, task_id))
        promoted.close()
    finally:
        link.close()


async def test_without_sentinels_readonly_is_answered_not_retried(
    pair: tuple[EmbeddedRedis, EmbeddedRedis],
) -> None:
    _, replica = pair
    link = RedisLink(replica.url, timeout=1)
    try:
        _, call = claim()
        # Redis 7 answers READONLY, 6.2 an error that carries it inside.
        with pytest.raises(redis.exceptions.ResponseError) as caught:
            await link.script(call)  # type: ignore[arg-type]
        assert isinstance(caught.value, redis.exceptions.ReadOnlyError) or (
            "READONLY" in str(caught.value)
        )
    finally:
        link.close()


async def test_a_long_first_command_without_the_password_is_an_authentication_error() -> None:
    # Redis 7 answers a command of more than 10 parts from a client that has
    # not authenticated with a protocol error, not NOAUTH: the claim is one.
    own = EmbeddedRedis(args=("--requirepass", "secret")).start()
    link = RedisLink(own.url, timeout=1)
    try:
        _, call = claim()
        with pytest.raises(redis.exceptions.AuthenticationError):
            await link.script(call)  # type: ignore[arg-type]
    finally:
        link.close()
        own.stop()


async def test_replicated_writes_of_a_burst_share_waits_and_report_the_replicas(
    pair: tuple[EmbeddedRedis, EmbeddedRedis],
) -> None:
    master, _ = pair
    link = RedisLink(master.url, timeout=1)
    stats = redis.Redis(port=master.port, decode_responses=True)
    try:
        stats.config_resetstat()
        results = await asyncio.gather(
            *(link.script_replicated(claim()[1], 1, 0.5) for _ in range(50))  # type: ignore[arg-type]
        )
        assert results == [(Claimed(), 1)] * 50
        waits = stats.info("commandstats")["cmdstat_wait"]["calls"]
        assert waits < 10, f"{waits} WAITs for one burst of 50 writes"
    finally:
        stats.close()
        link.close()


async def test_replicated_writes_without_a_replica_answer_after_the_wait_not_a_queue_of_them(
    pair: tuple[EmbeddedRedis, EmbeddedRedis],
) -> None:
    master, replica = pair
    replica.crash()  # SIGKILL: the master has no replica any more
    link = RedisLink(master.url, timeout=1)
    try:
        began = time.monotonic()

        async def one(delay: float) -> tuple[object, int]:
            await asyncio.sleep(delay)  # arriving one by one, in different turns
            return await link.script_replicated(claim()[1], 1, 0.3)  # type: ignore[arg-type]

        results = await asyncio.gather(*(one(n * 0.02) for n in range(10)))
        took = time.monotonic() - began
        # Each WAIT holds the connection for 0.3 s: one WAIT each, queued,
        # would take 3 s and trip the link's 1 s timeout.
        assert results == [(Claimed(), 0)] * 10
        assert took < 1.0, f"{took:.2f}s"
    finally:
        link.close()
