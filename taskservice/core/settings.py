"""Settings: one frozen object, read from TASKSERVICE_* environment variables.

Both the gRPC server and the Celery worker read these, so that a server and
the workers it feeds agree on where Redis and the broker are.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """taskservice settings. Every field is read from `TASKSERVICE_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="TASKSERVICE_", frozen=True, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding taskservice's task records, exclusivity keys, leases and
    events. With `redis_sentinels`, only its database number and credentials
    are used: the sentinels say where the master is."""

    broker_url: str | None = None
    """Celery broker URL; defaults to the records' Redis (`redis_url`, or its
    sentinels)."""

    result_backend: str | None = None
    """Celery result backend URL; defaults to the records' Redis (`redis_url`,
    or its sentinels)."""

    redis_sentinels: str = ""
    """Comma-separated `host:port` of the Redis Sentinels watching the records'
    Redis (with `redis_sentinel_master`). Then every part finds the current
    master through them and follows a failover by itself: the server's calls
    and event subscription, the workers' record writes, and, unless
    `broker_url` or `result_backend` name another, Celery's broker (kombu's
    `sentinel://` transport) and result backend. `redis_url` then gives only
    the database number and the master's credentials (`redis://[user:password@]
    any-host/db`): its host and port are not used. Empty: `redis_url` is the
    Redis itself."""

    redis_sentinel_master: str = ""
    """The name the sentinels know the records' master set by (`sentinel
    monitor <name> ...` in their configuration); required with
    `redis_sentinels`."""

    redis_sentinel_password: SecretStr = SecretStr("")
    """Password of the sentinels themselves (their `requirepass`), if they
    have one; the master's own password goes in `redis_url`."""

    redis_min_replicas: int = Field(default=0, ge=0)
    """Replicas that must have a write before it counts (Redis's `WAIT`): with
    1 or more, a Start answers OK only once the replicas hold its claim and
    its message, and a worker runs a task body only once they hold its start
    (and records an outcome only once they hold it), so a failover to one of
    them loses no accepted task. A Start whose replicas do not answer within
    `redis_min_replicas_timeout` answers UNAVAILABLE (REDIS_NOT_REPLICATED)
    and gives its key back. 0: writes count once the master has them
    (replication is asynchronous: a failover may lose the last ones)."""

    redis_min_replicas_timeout: float = Field(default=0.5, gt=0)
    """Seconds a write waits for `redis_min_replicas` replicas; below
    `redis_timeout`, since the wait holds the connection."""

    key_prefix: str = "taskservice"
    """Prefix of every Redis key and channel taskservice uses (several
    deployments, or test runs, can share one Redis with different prefixes)."""

    celery_app: str = ""
    """Your own Celery app, as `module:attribute` (e.g. `proj.celery:app`):
    Starts go to its broker, routed by its configuration, and its workers
    report back through the hooks `expose` installs. Empty: taskservice's own
    app (`taskservice.worker.app`), configured from these settings."""

    tasks: str = ""
    """Comma-separated modules whose `expose`d tasks may be started. Only
    these tasks are reachable over gRPC. `taskservice dev` defaults to the
    demo tasks (`taskservice.worker.tasks`); `serve` and `worker` expose nothing unless
    told."""

    queues: str = ""
    """Comma-separated queues a Start may name besides the default one
    ("celery"); an entry ending in `*` allows every queue starting with it.
    Workers should consume them (`taskservice worker -Q ...`)."""

    host: str = "127.0.0.1"
    """Address the gRPC server listens on (`0.0.0.0` for all interfaces)."""

    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one."""

    lease: float = Field(default=30.0, gt=0)
    """Seconds a task's lease lasts. A worker renews the lease of every task it
    runs (or holds unstarted) every `heartbeat_interval`; a task whose lease
    lapses ends LOST and frees its exclusivity key. Workers and servers must
    agree on it."""

    heartbeat_interval: float = Field(default=10.0, gt=0)
    """Seconds between a worker's lease renewals; well below `lease`."""

    heartbeat_file: str = ""
    """A file each worker touches whenever it has renewed every lease it holds
    (or held none to renew): `taskservice health --worker` fails once it is
    older than `lease`, when the worker can no longer vouch for its tasks (a
    liveness probe). Empty: none."""

    fence_margin: float | None = Field(default=None, gt=0)
    """Seconds before a task's lease could lapse at which a worker that could
    not renew it stops the task (SIGTERM, and SIGKILL half the margin later),
    so that the body is gone before the key's next holder can start. Counted
    from when the last successful renewal was sent, on the worker's own clock;
    the margin covers the SIGTERM cleanup and a Redis clock running fast.
    Unset: the larger of `heartbeat_interval` and a fifth of `lease` (10 s by
    default: a worker that cannot reach Redis stops its tasks 20 s after its
    last successful renewal, retrying every 2.5 s meanwhile). Below `lease`."""

    sweep_interval: float = Field(default=1.0, gt=0)
    """Seconds between each server's sweeps for lapsed leases: a dead worker's
    task ends LOST within `lease` + `sweep_interval`. The same sweep puts back
    in its queue the message of a task a dead worker had taken but not yet
    leased, once that message is `lease` old (broker on the records' Redis)."""

    key_slots: str = ""
    """Tasks that may run at once under the keys matching a pattern, for task
    types that declare no `key_slots`: `,`-separated `<pattern>=<n>` entries,
    a pattern a key or a prefix ending in `*` (the first match wins), e.g.
    `tenant-*=4,report=2`. Keys matching none have one slot."""

    key_line_limit: int = Field(default=100, gt=0)
    """The longest line of Starts waiting for one key (CONFLICT_POLICY_QUEUE),
    for task types that declare no `key_line_limit`."""

    dispatch_interval: float = Field(default=0.2, gt=0)
    """Seconds between each server's looks for deferred tasks that are due (a
    countdown or start_time reached, or a key's turn that the broker must be
    told of by a server): how late such a task may reach the broker."""

    publish_timeout: float = Field(default=5.0, gt=0)
    """Seconds a Start waits for the broker to take its message (less if the
    caller's deadline is nearer) before answering UNAVAILABLE; the key is then
    free and the message, should it arrive later, is refused."""

    max_pending_publishes: int = Field(default=64, gt=0)
    """Starts of one server that may wait for the broker at once; more answer
    RESOURCE_EXHAUSTED (a stalled broker cannot pile up work)."""

    task_events: bool = True
    """Whether the workers of taskservice's own app send Celery's task events
    (received, started, succeeded...: a PUBLISH each on a Redis broker), so
    that Flower and `celery events` see tasks without enabling them remotely.
    Off: less work per task for the worker and Redis. A team's app
    (`celery_app`) keeps its own `worker_send_task_events`."""

    worker_write_retry: float = Field(default=30.0, ge=0)
    """Seconds a worker keeps retrying a record change while Redis is
    unreachable (a restart, a failover) before giving up on it; a running task
    whose changes were lost ends LOST through its lease."""

    tls_cert_file: str = ""
    """PEM certificate (chain) the server presents; with `tls_key_file`,
    the server speaks TLS only."""

    tls_key_file: str = ""
    """PEM private key of `tls_cert_file`."""

    tls_client_ca_file: str = ""
    """PEM CA certificates: when set, every client must present a
    certificate they signed (mutual TLS)."""

    tokens: SecretStr = SecretStr("")
    """Bearer tokens, `;`-separated entries `<name> <token> [read,start,cancel]`
    (see service/auth.py). With any token set, every call but health needs one."""

    tokens_file: str = ""
    """A file of token entries, one per line (`#` comments)."""

    reflection: bool = True
    """Serve gRPC reflection (grpcurl without proto files); it needs a `read`
    token when tokens are set."""

    allow_insecure: bool = False
    """Let `serve` listen on a non-loopback address without TLS or tokens
    (anyone who reaches the port could start, read and kill tasks)."""

    hide_tracebacks: bool = False
    """Send TaskError without its traceback (type and message only), for
    callers who should not see server paths."""

    reuse_port: bool = False
    """Let several servers listen on one port (SO_REUSEPORT), e.g. one per
    core. Off, a taken port stops `serve` with a clear message instead of
    silently sharing it with an unrelated server."""

    keepalive_time: float = Field(default=30.0, gt=0)
    """Seconds of silence after which the server pings a client connection."""

    keepalive_timeout: float = Field(default=10.0, gt=0)
    """Seconds the server waits for a ping's answer before dropping the
    connection (and its streams)."""

    max_request_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    """Largest request message accepted (RESOURCE_EXHAUSTED above it)."""

    max_response_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    """Largest response message sent; results are capped well below it."""

    max_pending_calls: int = Field(default=20_000, gt=0)
    """Calls that may wait to be picked up by the server before gRPC starts
    dropping some (CANCELLED); gRPC's own default of 1,000 turns a burst of
    Starts or watches into failures. Twice this is the hard limit."""

    record_ttl: int = Field(default=7 * 24 * 3600, gt=0)
    """Seconds a task's record is kept after its last change; after that its
    id answers NOT_FOUND."""

    request_id_ttl: int = Field(default=24 * 3600, gt=0)
    """Seconds a request_id (of Start or Cancel) is remembered: a retry
    within it is answered as the first call was."""

    cancel_wait: float = Field(default=5.0, ge=0)
    """Seconds a TERMINATE/KILL Cancel waits for the worker to confirm before
    answering with the task as it then is."""

    max_result_bytes: int = Field(default=1024 * 1024, gt=0)
    """Largest result (as JSON) a task may return; larger ends FAILED with
    ResultTooLarge, so every client can still read the task. Set it on the
    workers."""

    max_args_bytes: int = Field(default=256 * 1024, gt=0)
    """Largest accepted size of a Start's args plus kwargs, in bytes."""

    redis_timeout: float = Field(default=2.0, gt=0)
    """Socket timeout of Redis commands, in seconds."""

    health_interval: float = Field(default=1.0, gt=0)
    """Seconds between health checks of Redis."""

    shutdown_grace: float = Field(default=5.0, ge=0)
    """Seconds in-flight calls get to finish on shutdown."""

    health_port: int = Field(default=0, ge=0, le=65535)
    """Port of a second, plaintext listener on `host` that serves gRPC health
    (grpc.health.v1) and nothing else: for probes that present no client
    certificate (kubelet's gRPC probe) when the gRPC port requires mutual TLS.
    Besides the server's own services it answers `liveness`: SERVING while the
    server runs, whether Redis answers or not, until it drains. 0: none."""

    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of the server's Prometheus endpoint (`/metrics`); 0: none. With
    `serve --processes N`, the first process serves the sum of all N."""

    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of each worker's Prometheus endpoint, served by its main process
    for all its pool processes; 0: none. Workers sharing a host each need
    their own."""

    metrics_host: str = "127.0.0.1"
    """Address the Prometheus endpoints (server and workers) listen on. They
    have no authentication: open them only to your scraper's network."""

    log_format: Literal["json", "console"] = "json"
    """How `serve`, `worker` and `dev` log: `json`, one JSON object per line
    (for a log collector), or `console`, readable lines. `taskservice dev`
    uses console unless this is set."""

    @model_validator(mode="after")
    def _tls_files_together(self) -> Settings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file are set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _broker_of_one_app(self) -> Settings:
        if self.celery_app and (self.broker_url or self.result_backend):
            raise ValueError(
                "celery_app is set: its broker and result backend come from that app's own "
                "configuration; unset broker_url and result_backend"
            )
        return self

    @model_validator(mode="after")
    def _sentinels_complete(self) -> Settings:
        if bool(self.redis_sentinels.strip()) != bool(self.redis_sentinel_master):
            raise ValueError("redis_sentinels and redis_sentinel_master are set together")
        if self.redis_sentinels.strip():
            scheme = self.redis_url.split("://", 1)[0]
            if scheme != "redis":
                raise ValueError(
                    f"with redis_sentinels, redis_url gives the database and credentials as a "
                    f"redis:// URL (not {scheme}://; TLS to a Sentinel-managed Redis is not "
                    "supported)"
                )
            for address in self.sentinel_addresses:
                if not address[0] or not 0 < address[1] < 65536:
                    raise ValueError(f"redis_sentinels: {address[0]}:{address[1]} is no host:port")
        if self.redis_min_replicas and self.redis_min_replicas_timeout >= self.redis_timeout:
            raise ValueError(
                f"redis_min_replicas_timeout ({self.redis_min_replicas_timeout:g}s) must be "
                f"below redis_timeout ({self.redis_timeout:g}s): the wait holds the connection"
            )
        return self

    @model_validator(mode="after")
    def _key_slots_readable(self) -> Settings:
        for entry in self.key_slots.split(","):
            if not entry.strip():
                continue
            pattern, equals, count = entry.partition("=")
            if not (equals and pattern.strip() and count.strip().isdigit() and int(count) > 0):
                raise ValueError(
                    f"key_slots: {entry.strip()!r} is not <key or prefix*>=<slots above 0>"
                )
        return self

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_interval * 2 > self.lease:
            raise ValueError(
                f"heartbeat_interval ({self.heartbeat_interval:g}s) must be at most half of "
                f"lease ({self.lease:g}s), or a slow renewal lets a live task's lease lapse"
            )
        return self

    @model_validator(mode="after")
    def _fence_within_lease(self) -> Settings:
        if self.fence_margin is not None and self.fence_margin >= self.lease:
            raise ValueError(
                f"fence_margin ({self.fence_margin:g}s) must be below lease ({self.lease:g}s): "
                "a worker would stop every task before its first renewal"
            )
        return self

    @property
    def effective_fence_margin(self) -> float:
        """fence_margin, else the larger of heartbeat_interval and lease / 5."""
        if self.fence_margin is not None:
            return self.fence_margin
        return max(self.heartbeat_interval, self.lease / 5)

    @property
    def provisional_lease(self) -> float:
        """Seconds a Start's claim lives before its message is confirmed in the
        broker: a server that dies in between frees the key after this."""
        return self.publish_timeout + self.lease

    @property
    def sentinel_addresses(self) -> tuple[tuple[str, int], ...]:
        """The sentinels (host, port) of `redis_sentinels`; () without."""
        found = []
        for entry in self.redis_sentinels.split(","):
            host, _, port = entry.strip().rpartition(":")
            if entry.strip():
                found.append((host.strip("[]"), int(port) if port.isdigit() else 0))
        return tuple(found)

    @property
    def records_celery_url(self) -> str:
        """The records' Redis as Celery's broker or result backend URL:
        `redis_url`, or with sentinels kombu's `sentinel://` list (one entry
        per sentinel, `;`-separated, each with redis_url's credentials and
        database; the master's name goes in the transport options)."""
        if not self.sentinel_addresses:
            return self.redis_url
        parts = urlsplit(self.redis_url)
        credentials = parts.netloc.rpartition("@")[0]
        credentials = f"{credentials}@" if credentials else ""
        database = parts.path.strip("/") or "0"
        return ";".join(
            f"sentinel://{credentials}{_host(host)}:{port}/{database}"
            for host, port in self.sentinel_addresses
        )

    @property
    def effective_broker_url(self) -> str:
        """The Celery broker: broker_url, else the records' Redis (`records_celery_url`)."""
        return self.broker_url or self.records_celery_url

    @property
    def effective_result_backend(self) -> str:
        """Celery's result backend: result_backend, else the records' Redis."""
        return self.result_backend or self.records_celery_url

    @property
    def queue_names(self) -> tuple[str, ...]:
        """The queues (and queue patterns ending in *) a Start may name."""
        return tuple(q.strip() for q in self.queues.split(",") if q.strip())

    @property
    def key_slot_rules(self) -> tuple[tuple[str, int], ...]:
        """`key_slots` as (pattern, slots) pairs, in order."""
        rules = []
        for entry in self.key_slots.split(","):
            if entry.strip():
                pattern, _, count = entry.partition("=")
                rules.append((pattern.strip(), int(count)))
        return tuple(rules)

    def slots_for(self, exclusivity_key: str) -> int:
        """The slots of a key whose task type declares none (`key_slots`)."""
        for pattern, slots in self.key_slot_rules:
            if exclusivity_key == pattern or (
                pattern.endswith("*") and exclusivity_key.startswith(pattern[:-1])
            ):
                return slots
        return 1

    @property
    def task_modules(self) -> tuple[str, ...]:
        """The modules whose exposed tasks may be started."""
        return tuple(m.strip() for m in self.tasks.split(",") if m.strip())


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


ENV_PREFIX = "TASKSERVICE_"
CLIENT_VARIABLES = frozenset({"TASKSERVICE_ADDRESS", "TASKSERVICE_TOKEN"})
"""Read by the client commands (taskservice.client.commands), not settings."""


def unknown_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """One line per TASKSERVICE_* variable that is no setting (a typo would
    otherwise be ignored silently), with the closest setting's name."""
    known = [ENV_PREFIX + name.upper() for name in Settings.model_fields]
    known += sorted(CLIENT_VARIABLES)
    lines = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in known:
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{name} is not a taskservice setting and is ignored{hint}")
    return lines
