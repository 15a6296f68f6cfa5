"""Default deny: every method the server serves has a permission; any other is refused."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice.core.errors import PermissionDenied, Unauthenticated
from taskservice.server import auth
from taskservice.server.auth import METHODS, OPEN, Tokens, parse_tokens
from taskservice.server.guard import Guard
from tests.support.client import error_info

ADMIN = (("authorization", "Bearer s3cret-admin"),)
TOKENS = Tokens(parse_tokens("admin s3cret-admin"))
FAKE = "test.v1.Fake"


def served_methods() -> dict[str, bool]:
    """Each method of the services the server registers (server.py,
    reflection.py), by full path: True if it is the health service's."""
    services = [
        pb.DESCRIPTOR.services_by_name["TaskService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    return {
        f"/{service.full_name}/{method.name}": service.full_name == "grpc.health.v1.Health"
        for service in services
        for method in service.methods
    }


def test_every_method_the_server_serves_has_a_permission() -> None:
    served = served_methods()
    # Seven of TaskService, health's two or three (List is newer), reflection.
    assert len(served) in (10, 11)
    # Nothing unlisted, and nothing listed that the server cannot serve.
    assert set(served) <= set(METHODS)
    assert set(METHODS) - set(served) <= {"/grpc.health.v1.Health/List"}
    # Probes need no token; Start and the cancels their own permission; the rest `read`.
    assert {method: METHODS[method] for method in served} == {
        **{method: OPEN if is_health else "read" for method, is_health in served.items()},
        "/taskservice.v1.TaskService/Start": "start",
        "/taskservice.v1.TaskService/Cancel": "cancel",
        "/taskservice.v1.TaskService/CancelTasks": "cancel",
    }


def test_a_token_cannot_be_granted_the_open_permission() -> None:
    with pytest.raises(ValueError, match="unknown permission"):
        parse_tokens(f"prober s3cret {OPEN}")


def test_tokens_refuse_an_unlisted_method_whoever_calls() -> None:
    for metadata in (ADMIN, ()):
        refusal = TOKENS.refusal(f"/{FAKE}/Echo", metadata)
        assert isinstance(refusal, PermissionDenied)
        assert f"/{FAKE}/Echo" in refusal.message
        assert refusal.metadata == {"method": f"/{FAKE}/Echo"}
    # Listed methods still go by the token.
    assert TOKENS.refusal("/taskservice.v1.TaskService/ListTasks", ADMIN) is None
    assert isinstance(TOKENS.refusal("/taskservice.v1.TaskService/ListTasks", ()), Unauthenticated)
    assert TOKENS.refusal("/grpc.health.v1.Health/Check", ()) is None


# -- through a real server: a fake service added by the guard ------------------


async def echo(request: bytes, context: Any) -> bytes:
    return request


async def repeat(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield request


async def upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
    return b"".join([request async for request in requests])


def register_fake(server: Any) -> None:
    server.add_registered_method_handlers(
        FAKE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Repeat": grpc.unary_stream_rpc_method_handler(repeat),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
        },
    )


@contextlib.asynccontextmanager
async def fake_server(guard: Guard) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    guard.add(server, register_fake)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize("tokens", [TOKENS, None], ids=["tokens", "no-tokens"])
async def test_a_method_without_a_permission_is_refused(tokens: Tokens | None) -> None:
    async with fake_server(Guard(tokens)) as channel:
        echoed = channel.unary_unary(f"/{FAKE}/Echo")(b"hi", metadata=ADMIN)
        streamed = channel.unary_stream(f"/{FAKE}/Repeat")(b"hi", metadata=ADMIN)
        for method, call in (("Echo", echoed), ("Repeat", streamed.read())):
            error = await refused(call)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert f"/{FAKE}/{method}" in (error.details() or "")
            info = error_info(error)
            assert info.reason == "PERMISSION_DENIED"
            assert info.metadata["method"] == f"/{FAKE}/{method}"


async def test_the_same_method_with_a_permission_is_served(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listed = {f"/{FAKE}/Echo": "read", f"/{FAKE}/Repeat": "read", f"/{FAKE}/Upload": "read"}
    monkeypatch.setattr(auth, "METHODS", MappingProxyType({**METHODS, **listed}))
    async with fake_server(Guard(TOKENS)) as channel:
        assert await channel.unary_unary(f"/{FAKE}/Echo")(b"hi", metadata=ADMIN) == b"hi"
        stream = channel.unary_stream(f"/{FAKE}/Repeat")(b"hi", metadata=ADMIN)
        assert [message async for message in stream] == [b"hi", b"hi"]
        error = await refused(channel.unary_unary(f"/{FAKE}/Echo")(b"hi"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        # Listed or not, the guard cannot check a client stream's token: refused.
        error = await refused(channel.stream_unary(f"/{FAKE}/Upload")(iter([b"a"]), metadata=ADMIN))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"/{FAKE}/Upload" in (error.details() or "")
