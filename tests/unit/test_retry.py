"""Retries: the back-off schedule, which errors are retried, how a call's
attempts share its deadline and a watch resumes; the blocking client doing it
against grpcio-testing's channel (this test plays the server); and the gRPC
service config shipped for other languages, as gRPC itself reads it."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future
from itertools import islice
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from taskservice import (
    Client,
    DeadlineExceeded,
    KeyLineFull,
    RedisOutOfMemory,
    RetryPolicy,
    TaskServiceError,
    Unavailable,
)
from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import free_port
from taskservice.client.retry import Attempts, WatchAttempts, retryable
from taskservice.core.errors import from_status
from tests.support.testing_channel import SERVICE, method

ROOT = Path(__file__).resolve().parents[2]
SERVICE_CONFIG = ROOT / "protos" / "taskservice" / "v1" / "service_config.json"
TASK_ID = "2b1f4bf4-0c39-4e8c-9d59-7d4d4e0c7d11"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.02, deadline=10)
"""Retries within moments, so that a test plays each attempt's server at once."""


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def error(code: str, reason: str = "", hint: str = "") -> TaskServiceError:
    """The error the client raises for this status."""
    raised = from_status(code, "x", reason=reason)
    raised.hint = hint
    return raised


# -- The policy ------------------------------------------------------------------


def test_the_back_off_grows_by_its_multiplier_to_its_ceiling_with_full_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    waits = list(islice(policy.backoffs(random.Random(7)), 8))
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    same_draws = random.Random(7)
    assert waits == [same_draws.uniform(0, ceiling) for ceiling in ceilings]
    assert all(0 <= wait <= ceiling for wait, ceiling in zip(waits, ceilings, strict=True))
    # Spread over the whole window, not bunched at its top (equal jitter) or fixed.
    flat = RetryPolicy(initial_backoff=1, max_backoff=1)
    many = list(islice(flat.backoffs(random.Random(1)), 400))
    assert min(many) < 0.1 and max(many) > 0.9


def test_a_thousand_retries_never_overflow_the_wait() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=3.0, multiplier=1e6)
    assert max(islice(policy.backoffs(random.Random(3)), 1000)) <= 3.0


@pytest.mark.parametrize(
    "values",
    [
        {"initial_backoff": 0},
        {"initial_backoff": 2, "max_backoff": 1},
        {"multiplier": 0.5},
        {"deadline": 0},
        {"deadline": float("nan")},
    ],
)
def test_a_policy_that_makes_no_schedule_is_refused(values: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**values)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("UNAVAILABLE", ""),  # a connection refused or cut: no reason at all
        ("UNAVAILABLE", "SHUTTING_DOWN"),
        ("UNAVAILABLE", "REDIS_UNAVAILABLE"),
        ("UNAVAILABLE", "SOMETHING_NEWER"),
        ("RESOURCE_EXHAUSTED", "PUBLISH_BACKLOG"),
        ("RESOURCE_EXHAUSTED", "REDIS_POOL_EXHAUSTED"),
    ],
)
def test_unavailable_and_the_backlogs_are_retried(code: str, reason: str) -> None:
    assert retryable(error(code, reason))


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("RESOURCE_EXHAUSTED", "KEY_LINE_FULL"),
        ("RESOURCE_EXHAUSTED", "REDIS_OUT_OF_MEMORY"),
        ("RESOURCE_EXHAUSTED", ""),  # gRPC's own: a message over its size limit
        ("DEADLINE_EXCEEDED", ""),
        ("CANCELLED", ""),
        ("INTERNAL", ""),
        ("ALREADY_EXISTS", "TASK_ALREADY_RUNNING"),
        ("FAILED_PRECONDITION", "REDIS_MISCONFIGURED"),
        ("UNAUTHENTICATED", ""),
    ],
)
def test_other_errors_are_never_retried(code: str, reason: str) -> None:
    assert not retryable(error(code, reason))


def test_a_tls_mismatch_is_not_retried_as_it_fails_the_same_way_each_time() -> None:
    assert not retryable(error("UNAVAILABLE", hint="the server closed the connection: ..."))


def test_attempts_share_the_deadline_and_stop_when_a_wait_would_spend_it() -> None:
    clock = Clock()
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=4.0, deadline=10.0)
    attempts = Attempts(policy, 3.0, clock=clock, rng=random.Random(5))
    expected = policy.backoffs(random.Random(5))
    assert attempts.timeout() == 3.0  # the client's timeout, less than the time left
    waited = []
    while True:
        clock.now += 0.5  # each attempt fails after half a second
        pause = attempts.wait(error("UNAVAILABLE"))
        if pause is None:
            break
        assert pause == next(expected)
        waited.append(pause)
        clock.now += pause
        assert attempts.timeout() == min(3.0, 110.0 - clock.now)
    assert len(waited) >= 3
    # It gave up because the next wait reached the deadline, not before.
    assert clock.now + next(expected) >= 110.0
    assert clock.now < 110.0


def test_an_error_no_retry_mends_stops_the_attempts_at_once() -> None:
    attempts = Attempts(RetryPolicy(), None, clock=Clock())
    assert attempts.wait(error("RESOURCE_EXHAUSTED", "KEY_LINE_FULL")) is None
    assert attempts.timeout() == 30.0  # no client timeout: the time left


def test_a_watch_resumes_after_its_last_change_by_task_id_and_progress_renews_its_budget() -> None:
    clock = Clock()
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=0.5, deadline=2.0)
    resume = WatchAttempts(policy, {"exclusivity_key": "k1"}, 0, clock=clock, rng=random.Random(2))
    assert resume.opening() == {"exclusivity_key": "k1", "after_sequence": 0}
    assert resume.fresh(TASK_ID, 3) and resume.fresh(TASK_ID, 4)
    assert not resume.fresh(TASK_ID, 4) and not resume.fresh(TASK_ID, 2)  # seen: dropped
    # By the task's id from now on: the key may have moved on to another task.
    assert resume.opening() == {"task_id": TASK_ID, "after_sequence": 4}

    def drops_until_given_up() -> float:
        """Seconds the watch keeps re-opening a stream that fails at once."""
        began = clock.now
        while (pause := resume.wait(error("UNAVAILABLE"))) is not None:
            clock.now += pause
            resume.opening()
        return clock.now - began

    assert 1.5 <= drops_until_given_up() < 2.0  # the deadline, less a wait at most
    # A change starts the count afresh...
    assert resume.fresh(TASK_ID, 5)
    assert resume.wait(error("UNAVAILABLE")) is not None
    assert 1.5 <= drops_until_given_up() < 2.0
    # ...and so does a stream that stayed open a whole deadline before it dropped.
    resume.opening()
    clock.now += 2.0
    assert resume.wait(error("UNAVAILABLE")) is not None
    assert resume.wait(error("RESOURCE_EXHAUSTED", "KEY_LINE_FULL")) is None


def test_a_watch_without_a_policy_never_resumes() -> None:
    resume = WatchAttempts(None, {"task_id": TASK_ID}, 0)
    assert resume.wait(error("UNAVAILABLE")) is None


# -- The blocking client, against grpcio-testing's channel -----------------------


def reason(code: int, why: str) -> tuple[tuple[str, bytes], ...]:
    """The trailer of a status whose ErrorInfo carries `why`."""
    status = status_pb2.Status(code=code, message="x")
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.ErrorInfo(reason=why, domain="taskservice.dev"))
    status.details.append(packed)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def answer_task(state: pb.TaskState.ValueType = pb.TASK_STATE_QUEUED, sequence: int = 1) -> pb.Task:
    return pb.Task(id=TASK_ID, task_name="demo.dummy", state=state, sequence=sequence)


def test_a_start_is_retried_with_one_request_id_until_it_is_answered(
    channel: Any, call: Callable[..., Future[Any]]
) -> None:
    client = Client(channel=channel, timeout=5, retry=FAST)
    future = call(client.start, "demo.dummy", kwargs={"seconds": 1})
    ids = []
    _, request, rpc = channel.take_unary_unary(method("Start"))
    ids.append(request.request_id)
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    _, request, rpc = channel.take_unary_unary(method("Start"))
    ids.append(request.request_id)
    rpc.terminate(None, reason(8, "PUBLISH_BACKLOG"), grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
    _, request, rpc = channel.take_unary_unary(method("Start"))
    ids.append(request.request_id)
    rpc.terminate(pb.StartResponse(task=answer_task()), (), grpc.StatusCode.OK, "")
    assert future.result(5).id == TASK_ID
    assert UUID.fullmatch(ids[0]) and ids == [ids[0]] * 3
    # The caller's own request id is the one sent, every time.
    future = call(client.cancel, TASK_ID, request_id="mine-1")
    for answer in ("UNAVAILABLE", "OK"):
        _, request, rpc = channel.take_unary_unary(method("Cancel"))
        assert request.request_id == "mine-1"
        if answer == "OK":
            rpc.terminate(pb.CancelResponse(task=answer_task()), (), grpc.StatusCode.OK, "")
        else:
            rpc.terminate(None, reason(14, "SHUTTING_DOWN"), grpc.StatusCode.UNAVAILABLE, "bye")
    assert future.result(5).id == TASK_ID


def test_every_start_and_cancel_gets_a_request_id_of_its_own(
    channel: Any, call: Callable[..., Future[Any]]
) -> None:
    client = Client(channel=channel, timeout=5, retry=None)
    ids = set()
    for _ in range(2):
        future = call(client.start, "demo.dummy")
        _, request, rpc = channel.take_unary_unary(method("Start"))
        ids.add(request.request_id)
        rpc.terminate(pb.StartResponse(task=answer_task()), (), grpc.StatusCode.OK, "")
        future.result(5)
        future = call(client.cancel, TASK_ID)
        _, request, rpc = channel.take_unary_unary(method("Cancel"))
        ids.add(request.request_id)
        rpc.terminate(pb.CancelResponse(task=answer_task()), (), grpc.StatusCode.OK, "")
        future.result(5)
    assert len(ids) == 4 and all(UUID.fullmatch(i) for i in ids)


@pytest.mark.parametrize(
    ("code", "why", "raised"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "KEY_LINE_FULL", KeyLineFull),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "REDIS_OUT_OF_MEMORY", RedisOutOfMemory),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", DeadlineExceeded),
    ],
)
def test_an_error_no_retry_mends_is_raised_after_one_attempt(
    channel: Any,
    call: Callable[..., Future[Any]],
    code: grpc.StatusCode,
    why: str,
    raised: type[TaskServiceError],
) -> None:
    client = Client(channel=channel, timeout=5, retry=FAST)
    future = call(client.start, "demo.dummy", key="k1", conflict_policy="queue")
    _, _, rpc = channel.take_unary_unary(method("Start"))
    rpc.terminate(None, reason(code.value[0], why) if why else (), code, "no")
    # A retry would wait for this test to answer it: the future would not end.
    with pytest.raises(raised):
        future.result(5)


def test_with_retries_off_the_first_unavailable_is_raised(
    channel: Any, call: Callable[..., Future[Any]]
) -> None:
    client = Client(channel=channel, timeout=5, retry=None)
    future = call(client.get, TASK_ID)
    _, _, rpc = channel.take_unary_unary(method("GetStatus"))
    rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    with pytest.raises(Unavailable):
        future.result(5)
    future = call(lambda: list(client.watch(TASK_ID)))
    _, _, rpc = channel.take_unary_stream(method("WatchStatus"))
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "connection reset")
    with pytest.raises(Unavailable):
        future.result(5)


def test_cancel_tasks_is_retried_only_when_it_is_to_cancel_every_match(
    channel: Any, call: Callable[..., Future[Any]]
) -> None:
    client = Client(channel=channel, timeout=5, retry=FAST)
    # Every match: a repeat ends what is left, so it is retried.
    future = call(client.cancel_all, key="k1")
    for answer in ("UNAVAILABLE", "OK"):
        _, _, rpc = channel.take_unary_unary(method("CancelTasks"))
        if answer == "OK":
            done = pb.CancelTasksResponse(ended_count=1, task_ids=[TASK_ID])
            rpc.terminate(done, (), grpc.StatusCode.OK, "")
        else:
            rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
    assert future.result(5).task_ids == [TASK_ID]
    # Bounded: a repeat after a lost answer could cancel a page more than asked.
    for bounded in (lambda: client.cancel_all(key="k1", limit=5), lambda: client.cancel_tasks()):
        future = call(bounded)
        _, _, rpc = channel.take_unary_unary(method("CancelTasks"))
        rpc.terminate(None, (), grpc.StatusCode.UNAVAILABLE, "connection reset")
        with pytest.raises(Unavailable):
            future.result(5)


def test_a_dropped_watch_resumes_after_the_last_change_it_yielded(
    channel: Any, call: Callable[..., Future[Any]]
) -> None:
    client = Client(channel=channel, timeout=5, retry=FAST)
    seen: list[tuple[int, str]] = []

    def watch() -> None:
        seen.extend((t.sequence, t.state) for t in client.watch(key="k1"))

    def read(count: int) -> None:
        """Wait until the client has read `count` changes (grpcio-testing
        drops those still unread when the stream ends in an error)."""
        for _ in range(500):
            if len(seen) >= count:
                return
            time.sleep(0.01)
        raise AssertionError(f"the client read {seen}")

    future = call(watch)
    _, request, rpc = channel.take_unary_stream(method("WatchStatus"))
    assert (request.exclusivity_key, request.after_sequence) == ("k1", 0)
    for sequence in (3, 4):
        rpc.send_response(pb.WatchStatusResponse(task=answer_task(pb.TASK_STATE_RUNNING, sequence)))
    read(2)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "connection reset")
    # Refused while the server restarts: tried again.
    _, request, rpc = channel.take_unary_stream(method("WatchStatus"))
    assert (request.task_id, request.after_sequence) == (TASK_ID, 4)
    rpc.terminate(reason(14, "SHUTTING_DOWN"), grpc.StatusCode.UNAVAILABLE, "draining")
    _, request, rpc = channel.take_unary_stream(method("WatchStatus"))
    assert (request.task_id, request.exclusivity_key, request.after_sequence) == (TASK_ID, "", 4)
    for sequence, state in ((4, pb.TASK_STATE_RUNNING), (5, pb.TASK_STATE_SUCCEEDED)):
        rpc.send_response(pb.WatchStatusResponse(task=answer_task(state, sequence)))
    rpc.terminate((), grpc.StatusCode.OK, "")
    future.result(5)
    assert seen == [(3, "RUNNING"), (4, "RUNNING"), (5, "SUCCEEDED")]


# -- A real channel -----------------------------------------------------------------


class Counting(grpc.UnaryUnaryClientInterceptor):
    """Counts the attempts a client makes, by method."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        name = details.method.rsplit("/", 1)[-1]
        self.calls[name] = self.calls.get(name, 0) + 1
        return continuation(details, request)


def test_the_deadline_bounds_every_attempt_at_a_dead_address_together() -> None:
    counting = Counting()
    policy = RetryPolicy(initial_backoff=0.05, max_backoff=0.2, deadline=1.0)
    dead = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{free_port()}"), counting)
    with Client(channel=dead, timeout=30, retry=policy) as client:
        began = time.monotonic()
        with pytest.raises(Unavailable):
            client.get(TASK_ID)
        took = time.monotonic() - began
    assert counting.calls["GetStatus"] > 2
    # It gives up once the next wait would reach the deadline: within the
    # deadline, and later than the deadline less the longest wait.
    assert policy.deadline - policy.max_backoff <= took < policy.deadline + 0.5


def test_a_client_making_its_channel_reconnects_on_the_policys_schedule() -> None:
    policy = RetryPolicy(initial_backoff=0.25, max_backoff=2.0)
    assert policy.channel_options() == [
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


# -- The service config for other languages --------------------------------------


def shipped_config() -> dict[str, Any]:
    return json.loads(SERVICE_CONFIG.read_text())  # type: ignore[no-any-return]


def test_the_service_config_names_only_methods_the_service_has() -> None:
    # A misspelt name would never be retried, without a word from gRPC.
    named = {
        (name["service"], name["method"])
        for entry in shipped_config()["methodConfig"]
        for name in entry["name"]
    }
    methods = {(SERVICE.full_name, m.name) for m in SERVICE.methods}
    assert named <= methods
    assert {m for _, m in named} == {
        "GetStatus",
        "ListTasks",
        "ListTaskTypes",
        "WatchStatus",
        "CancelTasks",
        "Start",
        "Cancel",
    }
    for entry in shipped_config()["methodConfig"]:
        assert entry["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


class FailingOnce:
    """A TaskService whose unary methods each answer UNAVAILABLE once (or
    `failures` times), then OK."""

    def __init__(self, failures: int = 1) -> None:
        self.calls: dict[str, int] = {}
        self.failures = failures

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(name: str, response: Any) -> Any:
            def handle(request: Any, context: grpc.ServicerContext) -> Any:
                self.calls[name] = self.calls.get(name, 0) + 1
                if self.calls[name] <= self.failures:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
                return response

            return grpc.unary_unary_rpc_method_handler(
                handle,
                request_deserializer=lambda data: data,
                response_serializer=lambda message: message.SerializeToString(),
            )

        task = answer_task()
        responses = {
            "Start": pb.StartResponse(task=task),
            "GetStatus": pb.GetStatusResponse(task=task),
            "Cancel": pb.CancelResponse(task=task),
            "ListTasks": pb.ListTasksResponse(),
            "ListTaskTypes": pb.ListTaskTypesResponse(),
            "CancelTasks": pb.CancelTasksResponse(),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE.full_name, {name: unary(name, r) for name, r in responses.items()}
        )


@pytest.fixture
def failing_once() -> Iterator[tuple[FailingOnce, int]]:
    service = FailingOnce()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers([service.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, port
    server.stop(0)


def config_channel(port: int, config: str, *, retries: bool = True) -> grpc.Channel:
    return grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.service_config", config), ("grpc.enable_retries", int(retries))],
    )


def test_grpc_retries_each_safe_method_by_the_shipped_service_config(
    failing_once: tuple[FailingOnce, int],
) -> None:
    service, port = failing_once
    with config_channel(port, SERVICE_CONFIG.read_text()) as channel:
        stub: Any = pb_grpc.TaskServiceStub(channel)
        calls = [  # at once: each waits out its own back-off
            stub.GetStatus.future(pb.GetStatusRequest(task_id=TASK_ID), timeout=10),
            stub.ListTasks.future(pb.ListTasksRequest(), timeout=10),
            stub.ListTaskTypes.future(pb.ListTaskTypesRequest(), timeout=10),
            stub.CancelTasks.future(pb.CancelTasksRequest(), timeout=10),
            # Safe only because each carries a request_id: see the README.
            stub.Start.future(pb.StartRequest(task_name="x", request_id="r-1"), timeout=10),
            stub.Cancel.future(pb.CancelRequest(task_id=TASK_ID, request_id="r-2"), timeout=10),
        ]
        for answer in calls:
            answer.result()
    assert service.calls == dict.fromkeys(
        ["GetStatus", "ListTasks", "ListTaskTypes", "CancelTasks", "Start", "Cancel"], 2
    )


@pytest.mark.parametrize("retries", [True, False])
def test_grpc_retries_a_read_through_a_refused_connection_by_the_shipped_config(
    retries: bool,
) -> None:
    port = free_port()  # nothing listens there yet
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.service_config", SERVICE_CONFIG.read_text()),
            ("grpc.enable_retries", int(retries)),
            # Reconnect soon after the refusal, not gRPC's default second.
            ("grpc.initial_reconnect_backoff_ms", 50),
        ],
    )
    refused = threading.Event()

    def state(connectivity: grpc.ChannelConnectivity) -> None:
        if connectivity == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            refused.set()

    channel.subscribe(state)
    server = None
    try:
        stub: Any = pb_grpc.TaskServiceStub(channel)
        answer = stub.GetStatus.future(pb.GetStatusRequest(task_id=TASK_ID), timeout=10)
        # The first attempt has met the refusal (a call fails at once while its
        # channel is in TRANSIENT_FAILURE); only then does a server listen there.
        assert refused.wait(10)
        server = grpc.server(futures.ThreadPoolExecutor(2))
        server.add_generic_rpc_handlers([FailingOnce(failures=0).handler()])
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        if retries:
            assert answer.result().task.id == TASK_ID
        else:
            with pytest.raises(grpc.RpcError) as caught:
                answer.result()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.unsubscribe(state)
        channel.close()
        if server is not None:
            server.stop(0)


def test_without_the_config_the_same_failure_reaches_the_caller(
    failing_once: tuple[FailingOnce, int],
) -> None:
    service, port = failing_once
    # Retries off: what the test above saw retried is the config's doing.
    with config_channel(port, SERVICE_CONFIG.read_text(), retries=False) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.TaskServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # gRPC refuses an invalid config outright: a valid one is what it used.
    broken = shipped_config()
    broken["methodConfig"][0]["retryPolicy"]["maxAttempts"] = 1
    with config_channel(port, json.dumps(broken)) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.TaskServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
        # Said in the details from grpcio 1.7x on; 1.72 says only that the
        # channel could not be made, with INVALID_ARGUMENT.
        error = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT or "service config" in (
            error.details() or ""
        ), error
    assert service.calls == {"GetStatus": 1}
