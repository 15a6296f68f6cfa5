"""A Sentinel-watched Redis on loopback: one master, one replica, three sentinels.

Real processes (`redis-server`, and `redis-server <config> --sentinel` for
each sentinel, as Debian's Redis 7.0 runs them), on free ports, each in its
own process group and tied to this process (a killed test run leaves none
behind). The fault is `server_on(master_port()).crash()`: SIGKILL, nothing
flushed, and the sentinels promote the replica by themselves; `rejoin` brings
the killed server back as the new master's replica.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from taskservice.cli.embedded import (
    EmbeddedRedis,
    free_port,
    redis_server_binary,
    tied_to_this_process,
)

MASTER_NAME = "tsmaster"
FAST_SYNC = ("--repl-diskless-sync-delay", "0")
"""A master sends a new replica its data at once (Redis 7 waits 5 s for more)."""


def online_replicas(client: redis.Redis) -> int:
    """How many replicas the master `client` talks to counts online: only those
    answer WAIT (Redis 7 puts a replica online at its first acknowledgement, up
    to a second after its sync)."""
    info = client.info("replication")
    return sum(
        1
        for name, value in info.items()
        if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    )


def start_sentinel(
    folder: Path, port: int, master_port: int, *, quorum: int = 2, down_after_ms: int = 600,
    failover_timeout_ms: int = 3000,
) -> subprocess.Popen[bytes]:  # fmt: skip
    """A sentinel on `port` watching the master on `master_port` as MASTER_NAME,
    its configuration, log and state in `folder` (which it rewrites)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "sentinel.conf"
    config.write_text(
        f"port {port}\n"
        "bind 127.0.0.1\n"
        f"dir {folder}\n"
        f"logfile {folder / 'sentinel.log'}\n"
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
        f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
        f"sentinel parallel-syncs {MASTER_NAME} 1\n"
    )
    process = subprocess.Popen(
        tied_to_this_process([redis_server_binary(), str(config), "--sentinel"]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return process
            except redis.exceptions.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    raise RuntimeError(f"the sentinel on {port} did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


def stop_sentinel(process: subprocess.Popen[bytes]) -> None:
    """Stop a sentinel (SIGTERM, then SIGKILL after 5 s)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class SentinelSet:
    """A master, a replica of it and three sentinels (quorum 2); see the module."""

    def __init__(self, *, down_after_ms: int = 600, failover_timeout_ms: int = 3000) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="taskservice-sentinel-"))
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.master = EmbeddedRedis(directory=self.dir / "a", args=FAST_SYNC)
        self.replica = EmbeddedRedis(
            directory=self.dir / "b",
            args=(*FAST_SYNC, "--replicaof", "127.0.0.1", str(self.master.port)),
        )
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def addresses(self) -> str:
        """The sentinels as TASKSERVICE_REDIS_SENTINELS wants them."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start(self, timeout: float = 30.0) -> SentinelSet:
        """Start everything and wait until the sentinels know the replica and
        each other (only then can they agree on a failover); self."""
        for server in (self.master, self.replica):
            server.dir.mkdir(parents=True, exist_ok=True)
            server.start()
        for n, port in enumerate(self.sentinel_ports):
            self._sentinels.append(
                start_sentinel(
                    self.dir / f"s{n}",
                    port,
                    self.master.port,
                    down_after_ms=self.down_after_ms,
                    failover_timeout_ms=self.failover_timeout_ms,
                )
            )
        deadline = time.monotonic() + timeout
        self._wait_replica_synced(deadline)
        for port in self.sentinel_ports:
            self._wait_sentinel_ready(port, deadline)
        return self

    def master_port(self) -> int:
        """The port of the master, as the first sentinel that answers says."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.exceptions.RedisError):
                client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
                try:
                    address = client.execute_command(
                        "SENTINEL", "get-master-addr-by-name", MASTER_NAME
                    )
                finally:
                    client.close()
                if address:
                    return int(address[1])
        raise RuntimeError("no sentinel answers")

    def server_on(self, port: int) -> EmbeddedRedis:
        """The server (master or replica) listening on `port`."""
        return self.master if self.master.port == port else self.replica

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> int:
        """Wait until every sentinel names a master other than `old_port`; its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ports = set()
            for port in self.sentinel_ports:
                client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
                try:
                    address = client.execute_command(
                        "SENTINEL", "get-master-addr-by-name", MASTER_NAME
                    )
                    ports.add(int(address[1]))
                except redis.exceptions.RedisError:
                    ports.add(-1)
                finally:
                    client.close()
            if len(ports) == 1 and old_port not in ports and -1 not in ports:
                return ports.pop()
            time.sleep(0.05)
        raise RuntimeError(f"no failover within {timeout}s:\n{self.logs()}")

    def rejoin(self, killed: EmbeddedRedis, master_port: int, timeout: float = 15.0) -> None:
        """Start the killed server again, empty, as a replica of the new master
        (as an operator or orchestrator brings a failed node back), and wait
        until the master counts it online."""
        again = EmbeddedRedis(
            port=killed.port,
            directory=killed.dir,
            args=(*FAST_SYNC, "--replicaof", "127.0.0.1", str(master_port)),
        ).start()
        if killed is self.master:
            self.master = again
        else:
            self.replica = again
        client = self.client(master_port)
        deadline = time.monotonic() + timeout
        try:
            while online_replicas(client) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("the old master did not come back as a replica")
                time.sleep(0.05)
        finally:
            client.close()

    def client(self, port: int) -> redis.Redis:
        """A client of the Redis on `port` (master or replica)."""
        return redis.Redis(port=port, decode_responses=True, socket_timeout=2)

    def logs(self) -> str:
        """The tail of every sentinel's log (for a failure message)."""
        parts = []
        for n in range(len(self.sentinel_ports)):
            log = self.dir / f"s{n}" / "sentinel.log"
            if log.exists():
                parts.append(f"--- sentinel {n}\n" + log.read_text(errors="replace")[-1500:])
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop every process and remove the folder."""
        for process in self._sentinels:
            stop_sentinel(process)
        for server in (self.master, self.replica):
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _wait_replica_synced(self, deadline: float) -> None:
        client = self.client(self.master.port)
        try:
            while online_replicas(client) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica did not come online")
                time.sleep(0.05)
        finally:
            client.close()

    def _wait_sentinel_ready(self, port: int, deadline: float) -> None:
        while True:
            with contextlib.suppress(redis.exceptions.RedisError):
                client = redis.Redis(port=port, socket_timeout=1, decode_responses=True)
                try:
                    state = client.execute_command("SENTINEL", "MASTER", MASTER_NAME)
                finally:
                    client.close()
                if isinstance(state, list):
                    state = dict(zip(state[::2], state[1::2], strict=True))
                if int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= 2:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel {port} did not get ready:\n{self.logs()}")
            time.sleep(0.1)
