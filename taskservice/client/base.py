"""What the blocking and the asyncio client share: building each request,
decoding each answer and each error. `Client` and `AsyncClient` only do I/O
(as httpx's clients share `BaseClient`)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice.client.models import CancelledTasks, Task, TaskType, to_value
from taskservice.client.retry import Attempts, RetryPolicy, WatchAttempts
from taskservice.core.errors import TaskServiceError, from_status
from taskservice.core.states import CancelMode, ConflictPolicy, TaskState

HEALTH_SERVICE = "taskservice.v1.TaskService"
"""The service whose health a round-robin client checks (the server reports it)."""

ROUND_ROBIN_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        # Client-side health checking: a server that reports NOT_SERVING (it
        # is draining, or cannot reach Redis) gets no calls while others do.
        "healthCheckConfig": {"serviceName": HEALTH_SERVICE},
    }
)

_SPREAD_SCHEMES = ("dns:", "ipv4:", "ipv6:")
"""Target schemes that may name several servers (gRPC's name syntax)."""

Options = list[tuple[str, str | int]]

MAX_PAGE_SIZE = 500
"""The most tasks the server lists or cancels in one call."""

DEFAULT_RETRY = RetryPolicy()
"""How the clients retry unless told otherwise (`retry=None`: not at all)."""


def new_request_id() -> str:
    """A request_id for a Start or Cancel whose caller gave none: every
    attempt of the call sends it, so a retry cannot act twice."""
    return str(uuid.uuid4())


def default_target() -> str:
    """TASKSERVICE_ADDRESS, else 127.0.0.1 and TASKSERVICE_PORT (50051)."""
    return os.environ.get("TASKSERVICE_ADDRESS") or (
        f"127.0.0.1:{os.environ.get('TASKSERVICE_PORT') or 50051}"
    )


def channel_target(address: str | Sequence[str]) -> tuple[str, Options]:
    """The gRPC target and channel options for `address`.

    - One "host:port" (or any other gRPC target, e.g. "unix:/path"): as it is,
      one server at a time (gRPC's pick_first).
    - Several, comma-separated ("host1:50051,host2:50051") or as a list:
      calls are spread round robin over all of them, skipping any whose
      health is not SERVING (a server draining for a restart, say). Host
      names are resolved here, once; the target is `ipv4:` (or `ipv6:`, with
      IPv4 addresses mapped) listing every address. Over TLS, each server's
      certificate must name the first host.
    - A `dns:`, `ipv4:` or `ipv6:` target (e.g. "dns:///tasks.internal:50051",
      which gRPC re-resolves as the name's addresses change): round robin
      with health checking over the addresses it names.

    ValueError if an entry of several is not "host:port".
    """
    entries = [address] if isinstance(address, str) else list(address)
    if len(entries) == 1 and entries[0].strip().startswith(_SPREAD_SCHEMES):
        return entries[0].strip(), _round_robin()
    entries = [entry.strip() for text in entries for entry in text.split(",") if entry.strip()]
    if not entries:
        raise ValueError("no server address given")
    if len(entries) == 1:
        return entries[0], []
    resolved: list[tuple[str, int]] = []
    for entry in entries:
        host, port = _host_port(entry)
        resolved += [(ip, port) for ip in _addresses(host, port) if (ip, port) not in resolved]
    if all(":" not in ip for ip, _ in resolved):
        target = "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in resolved)
    else:  # one target names one family: IPv4 addresses as IPv4-mapped IPv6 ones
        target = "ipv6:" + ",".join(
            f"[{ip if ':' in ip else '::ffff:' + ip}]:{port}" for ip, port in resolved
        )
    # The :authority of every call, which TLS checks against the certificate.
    return target, [*_round_robin(), ("grpc.default_authority", entries[0])]


def _round_robin() -> Options:
    # A service config from DNS (TXT records) would replace this one.
    return [
        ("grpc.service_config", ROUND_ROBIN_CONFIG),
        ("grpc.service_config_disable_resolution", 1),
    ]


def _host_port(entry: str) -> tuple[str, int]:
    """("host", port) of "host:port" or "[v6 address]:port"."""
    host, colon, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs brackets before its port
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"server address {entry!r}: expected host:port ([address]:port for IPv6)")
    return host, int(port)


def _addresses(host: str, port: int) -> list[str]:
    """The IP addresses of `host` (itself, if it is one)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ValueError(f"server address {host}:{port}: cannot resolve {host} ({error})") from None
    addresses: list[str] = []
    for _, _, _, _, sockaddr in found:
        ip = str(sockaddr[0])
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def channel_credentials(
    ca_file: str = "", cert_file: str = "", key_file: str = ""
) -> grpc.ChannelCredentials:
    """TLS credentials: the server's CA (system roots if none) and, for
    mutual TLS, this client's certificate and key."""

    def read(path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as file:
            return file.read()

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


PLAINTEXT_TO_TLS = (
    "the server closed the connection: if it speaks TLS, connect with TLS "
    "(CLI: --tls, and --ca-file for a private CA; Python: credentials=channel_credentials(...))"
)
TLS_TO_PLAINTEXT = (
    "the server answered the TLS handshake with something else: if it does not speak TLS, "
    "connect without (CLI: no --tls/--ca-file/--cert-file; Python: no credentials)"
)


def connection_hint(code: str, details: str, *, tls: bool | None) -> str:
    """What to try when a call failed before reaching the server in a way a
    TLS mismatch explains ("" otherwise, or if `tls`, whether this client
    used TLS, is unknown). A plaintext client's first bytes make a TLS
    server hang up: gRPC says only "Socket closed" while connecting (not the
    same as a connection refused, or one lost mid-call); a TLS client meeting
    a plaintext server fails its handshake on a wrong record version."""
    if code != "UNAVAILABLE" or tls is None:
        return ""
    if not tls and "failed to connect" in details and "Socket closed" in details:
        return PLAINTEXT_TO_TLS
    if tls and "WRONG_VERSION_NUMBER" in details:
        return TLS_TO_PLAINTEXT
    return ""


def error_from(rpc_error: grpc.RpcError, *, tls: bool | None = None) -> TaskServiceError:
    """The error a failed call stands for: the class the server raised (by
    the ErrorInfo reason, else the code), with its message, metadata and
    BadRequest violations (taskservice.core.errors); with a `hint` when
    `tls` (whether the channel uses TLS, None if unknown) explains a failed
    connection."""
    call: Any = rpc_error  # a grpc.Call (sync) or grpc.aio.AioRpcError
    code: grpc.StatusCode = call.code()
    message: str = call.details() or code.name
    reason, metadata, violations = "", {}, []
    for key, value in call.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # not a google.rpc.Status (a proxy's, say): the code still holds
            continue
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(bad):
                violations = [(v.field, v.description) for v in bad.field_violations]
    error = from_status(code.name, message, reason=reason, metadata=metadata, violations=violations)
    error.hint = connection_hint(code.name, message, tls=tls)
    return error


class BaseClient:
    """Options, requests and decoding; the subclasses call the server."""

    def __init__(
        self, *, token: str | None, timeout: float | None, retry: RetryPolicy | None
    ) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._timeout = timeout
        self._retry = retry

    def _channel_options(self, options: Options) -> Options:
        """`options` for a channel this client makes, and the policy's own."""
        return options + (self._retry.channel_options() if self._retry else [])

    def _attempts(self, request: Any) -> Attempts | None:
        """The schedule of a unary call's attempts; None if it is made once."""
        if self._retry is None:
            return None
        if isinstance(request, pb.StartRequest | pb.CancelRequest) and not request.request_id:
            return None  # a repeat could act twice (the clients always set one)
        return Attempts(self._retry, self._timeout)

    def _watch_attempts(self, task_id: str, key: str, after_sequence: int) -> WatchAttempts:
        """What a watch asks, re-asked after each drop (see WatchAttempts)."""
        return WatchAttempts(self._retry, _select(task_id, key), after_sequence)

    # -- Requests ------------------------------------------------------------

    @staticmethod
    def _start_request(
        task_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        *,
        key: str,
        conflict_policy: ConflictPolicy | str,
        replace_mode: CancelMode | str | None,
        countdown: float | None,
        start_at: datetime.datetime | None,
        queue: str,
        time_limit: float | None,
        soft_time_limit: float | None,
        request_id: str,
    ) -> pb.StartRequest:
        policy = _member(ConflictPolicy, conflict_policy, "conflict_policy")
        if countdown is not None and start_at is not None:
            raise ValueError("give countdown or start_at, not both")
        if start_at is not None and not isinstance(start_at, datetime.datetime):
            raise TypeError(f"start_at must be a datetime, not {type(start_at).__name__}")
        if start_at is not None and start_at.utcoffset() is None:
            # A naive time means another moment on a machine in another zone.
            raise ValueError(
                f"start_at {start_at.isoformat()} has no time zone: give an aware datetime "
                "(e.g. datetime.now(UTC) + timedelta(hours=1))"
            )
        request = pb.StartRequest(
            task_name=task_name,
            exclusivity_key=key,
            conflict_policy=pb.ConflictPolicy.Value(f"CONFLICT_POLICY_{policy}"),
            request_id=request_id or new_request_id(),
        )
        if replace_mode is not None:
            mode = _member(CancelMode, replace_mode, "replace_mode")
            request.replace_mode = pb.CancelMode.Value(f"CANCEL_MODE_{mode}")
        request.args.CopyFrom(to_value(list(args)).list_value)
        request.kwargs.CopyFrom(to_value(dict(kwargs or {})).struct_value)
        options = request.options
        options.queue = queue
        for name, seconds in (
            ("countdown", countdown),
            ("time_limit", time_limit),
            ("soft_time_limit", soft_time_limit),
        ):
            if seconds is not None:
                getattr(options, name).FromNanoseconds(round(seconds * 1e9))
        if start_at is not None:
            options.start_time.FromDatetime(start_at)  # aware: converted to UTC
        return request

    @staticmethod
    def _get_request(task_id: str, key: str) -> pb.GetStatusRequest:
        return pb.GetStatusRequest(**_select(task_id, key))

    @staticmethod
    def _cancel_request(task_id: str, mode: CancelMode | str, request_id: str) -> pb.CancelRequest:
        member = _member(CancelMode, mode, "cancel mode")
        return pb.CancelRequest(
            task_id=task_id,
            mode=pb.CancelMode.Value(f"CANCEL_MODE_{member}"),
            request_id=request_id or new_request_id(),
        )

    @staticmethod
    def _list_request(
        states: Sequence[TaskState | str],
        task_name: str,
        key: str,
        page_size: int,
        page_token: str,
    ) -> pb.ListTasksRequest:
        return pb.ListTasksRequest(
            states=_states(states),
            task_name=task_name,
            exclusivity_key=key,
            page_size=page_size,
            page_token=page_token,
        )

    @staticmethod
    def _cancel_tasks_request(
        states: Sequence[TaskState | str],
        task_name: str,
        key: str,
        mode: CancelMode | str,
        page_size: int,
        page_token: str,
    ) -> pb.CancelTasksRequest:
        member = _member(CancelMode, mode, "cancel mode")
        return pb.CancelTasksRequest(
            states=_states(states),
            task_name=task_name,
            exclusivity_key=key,
            mode=pb.CancelMode.Value(f"CANCEL_MODE_{member}"),
            page_size=page_size,
            page_token=page_token,
        )

    @staticmethod
    def _cancel_page_size(page_size: int, limit: int | None, counted: int) -> int | None:
        """The page_size of cancel_all's next call; None once `limit` tasks
        are counted. ValueError for a `limit` below 1."""
        if limit is None:
            return page_size
        if limit <= 0:
            raise ValueError(f"limit must be positive (None for no limit), not {limit}")
        if counted >= limit:
            return None
        return min(limit - counted, page_size or MAX_PAGE_SIZE)

    # -- Answers -------------------------------------------------------------

    @staticmethod
    def _started(response: pb.StartResponse) -> Task:
        return Task.from_message(response.task, already_existed=response.already_existed)

    @staticmethod
    def _task(response: pb.GetStatusResponse | pb.CancelResponse | pb.WatchStatusResponse) -> Task:
        return Task.from_message(response.task)

    @staticmethod
    def _task_types(response: pb.ListTaskTypesResponse) -> list[TaskType]:
        return [TaskType.from_message(t) for t in response.task_types]

    @staticmethod
    def _cancelled(response: pb.CancelTasksResponse) -> CancelledTasks:
        return CancelledTasks.from_message(response)


def _states(states: Sequence[TaskState | str]) -> list[pb.TaskState.ValueType]:
    return [pb.TaskState.Value(f"TASK_STATE_{_member(TaskState, s, 'state')}") for s in states]


def _select(task_id: str, key: str) -> dict[str, str]:
    if bool(task_id) == bool(key):
        raise ValueError("give a task id or an exclusivity key (one of them)")
    return {"task_id": task_id} if task_id else {"exclusivity_key": key}


E = TypeVar("E", ConflictPolicy, CancelMode, TaskState)


def _member(enum: type[E], value: E | str, what: str) -> E:
    """`value` as a member of `enum` (a member, or its name in any case, `-`
    for `_`); ValueError naming the choices."""
    try:
        member = enum(value.upper().replace("-", "_"))
    except ValueError:
        member = None
    if member is None or member == "UNSPECIFIED":
        choices = ", ".join(m for m in enum if m != "UNSPECIFIED")
        raise ValueError(f"{what} {value!r} is none of {choices}")
    return member
