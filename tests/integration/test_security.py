"""TLS, mutual TLS, bearer tokens with permissions, and refusing to start open."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from taskservice import Client, Unavailable
from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.cli.embedded import free_port
from taskservice.client import channel_credentials
from taskservice.core.settings import Settings
from taskservice.server import auth
from taskservice.server.server import Server, create_server
from tests.conftest import ROOT
from tests.support.client import error_info, finished, start_request

TOKENS = "admin s3cret-admin; viewer s3cret-viewer read; starter s3cret-starter read,start"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as files."""
    folder = tmp_path_factory.mktemp("pki")
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.com")
    files = {
        "ca": folder / "ca.pem",
        "cert": folder / "server.pem",
        "key": folder / "server.key",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    files["cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    files["client_cert"].write_bytes(b"".join(blob.bytes() for blob in client.cert_chain_pems))
    return files


async def serve(settings: Settings, **changes: object) -> Server:
    return await create_server(settings.model_copy(update=changes), port=0)


@pytest.fixture
async def tokened(
    settings: Settings, worker_process: subprocess.Popen[bytes]
) -> AsyncIterator[Server]:
    running = await serve(
        settings, tokens=SecretStr(TOKENS), reflection=False, hide_tracebacks=True
    )
    yield running
    await running.stop(0)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_tokens_guard_every_method_but_health(tokened: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tokened.port}") as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        for metadata in ((), bearer("wrong"), (("authorization", "s3cret-admin"),)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListTaskTypes(pb.ListTaskTypesRequest(), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_info(caught.value).reason == "UNAUTHENTICATED"
            assert "s3cret" not in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await anext(aiter(stub.WatchStatus(pb.WatchStatusRequest(task_id="x"))))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Probes need no token.
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_each_token_may_do_what_its_permissions_say(tokened: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tokened.port}") as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        listed = await stub.ListTaskTypes(
            pb.ListTaskTypesRequest(), metadata=bearer("s3cret-viewer")
        )
        assert listed.task_types
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Start(start_request("test.echo", 1), metadata=bearer("s3cret-viewer"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).metadata["permission"] == "start"
        started = await stub.Start(
            start_request("test.sleep", 5), metadata=bearer("s3cret-starter")
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Cancel(
                pb.CancelRequest(task_id=started.task.id), metadata=bearer("s3cret-starter")
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        cancelled = await stub.Cancel(
            pb.CancelRequest(task_id=started.task.id), metadata=bearer("s3cret-admin")
        )
        assert cancelled.task.state == pb.TASK_STATE_CANCELLED


async def test_tracebacks_can_be_kept_from_callers(tokened: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tokened.port}") as channel:
        stub = pb_grpc.TaskServiceStub(channel)
        admin = bearer("s3cret-admin")
        task = (await stub.Start(start_request("demo.fail", "boom"), metadata=admin)).task
        done = None
        async for message in stub.WatchStatus(
            pb.WatchStatusRequest(task_id=task.id), metadata=admin
        ):
            done = message.task
        assert done is not None and done.state == pb.TASK_STATE_FAILED
        assert (done.error.type, done.error.message, done.error.traceback) == (
            "ValueError",
            "boom",
            "",
        )


async def test_tls_serves_only_tls_clients(
    settings: Settings, pki: dict[str, Path], worker_process: subprocess.Popen[bytes]
) -> None:
    running = await serve(settings, tls_cert_file=str(pki["cert"]), tls_key_file=str(pki["key"]))
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}", credentials) as channel:
            stub = pb_grpc.TaskServiceStub(channel)
            task = (await stub.Start(start_request("test.echo", "over tls"))).task
            assert (await finished(stub, task.id)).result.string_value == "over tls"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.TaskServiceStub(plain).ListTaskTypes(
                    pb.ListTaskTypesRequest(), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


async def cli(port: int, *args: str) -> tuple[int, str, str]:
    """`taskservice ARGS` against the server on `port`, as a subprocess."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskservice",
        *args,
        "--address",
        f"127.0.0.1:{port}",
        "--timeout",
        "10",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_tls_mismatch_says_what_to_try(
    settings: Settings, pki: dict[str, Path], server: Server
) -> None:
    running = await serve(settings, tls_cert_file=str(pki["cert"]), tls_key_file=str(pki["key"]))
    try:
        # Without --tls, the TLS server hangs up: gRPC says only "Socket closed".
        code, _, err = await cli(running.port, "tasks")
        assert code == 1
        assert "Socket closed" in err
        assert "hint: the server closed the connection: if it speaks TLS" in err
        assert "--tls" in err
        code, _, err = await cli(running.port, "tasks", "--json")
        assert code == 1 and "if it speaks TLS" in json.loads(err)["hint"]
        code, out, err = await cli(running.port, "tasks", "--tls", "--ca-file", str(pki["ca"]))
        assert code == 0 and "test.echo" in out, err
        # The Python client says the same.
        with (
            Client(f"127.0.0.1:{running.port}", timeout=10) as client,
            pytest.raises(Unavailable) as caught,
        ):
            await asyncio.to_thread(client.task_types)
        assert "if it speaks TLS" in caught.value.hint
        assert "if it speaks TLS" in str(caught.value)
    finally:
        await running.stop(0)
    # TLS to a plaintext server: its answer is no TLS record.
    code, _, err = await cli(server.port, "tasks", "--tls", "--ca-file", str(pki["ca"]))
    assert code == 1 and "if it does not speak TLS" in err
    # No hint where a mismatch is not the likely cause: nothing listens (and
    # no retries, which would only wait for a server that is not coming).
    code, _, err = await cli(free_port(), "tasks", "--no-retry")
    assert code == 1 and "UNAVAILABLE" in err and "hint" not in err
    with (
        Client(f"127.0.0.1:{free_port()}", timeout=10, retry=None) as client,
        pytest.raises(Unavailable) as caught,
    ):
        await asyncio.to_thread(client.task_types)
    assert caught.value.hint == ""
    with (
        Client(
            f"127.0.0.1:{free_port()}",
            credentials=channel_credentials(str(pki["ca"])),
            timeout=10,
            retry=None,
        ) as client,
        pytest.raises(Unavailable) as caught,
    ):
        await asyncio.to_thread(client.task_types)
    assert caught.value.hint == ""


async def test_mutual_tls_needs_a_client_certificate_the_ca_signed(
    settings: Settings, pki: dict[str, Path]
) -> None:
    running = await serve(
        settings,
        tls_cert_file=str(pki["cert"]),
        tls_key_file=str(pki["key"]),
        tls_client_ca_file=str(pki["ca"]),
    )
    address = f"127.0.0.1:{running.port}"
    try:
        anonymous = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        async with grpc.aio.secure_channel(address, anonymous) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.TaskServiceStub(channel).ListTaskTypes(
                    pb.ListTaskTypesRequest(), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        stranger = trustme.CA().issue_cert("client@elsewhere")
        for cert, key in (
            (pki["client_cert"].read_bytes(), pki["client_key"].read_bytes()),
            (
                b"".join(b.bytes() for b in stranger.cert_chain_pems),
                stranger.private_key_pem.bytes(),
            ),
        ):
            credentials = grpc.ssl_channel_credentials(
                root_certificates=pki["ca"].read_bytes(), private_key=key, certificate_chain=cert
            )
            async with grpc.aio.secure_channel(address, credentials) as channel:
                call = pb_grpc.TaskServiceStub(channel).ListTaskTypes(
                    pb.ListTaskTypesRequest(), timeout=5
                )
                if cert == pki["client_cert"].read_bytes():
                    assert (await call).task_types
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(0)


def test_serve_refuses_an_open_network_address_unless_told(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TASKSERVICE_HOST": "0.0.0.0"}
    done = subprocess.run(
        [sys.executable, "-m", "taskservice", "serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "refusing to listen on 0.0.0.0 without TLS or tokens" in done.stderr
    assert "Traceback" not in done.stderr


async def test_reflection_can_be_switched_off(tokened: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tokened.port}") as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )(metadata=bearer("s3cret-admin"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


class Recording:
    """A grpc.aio server that notes each method registered on it."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.methods: set[str] = set()

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        self.methods.update(f"/{service}/{name}" for name in handlers)
        self._server.add_registered_method_handlers(service, handlers)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


async def test_every_method_the_server_registers_has_a_permission(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Recording] = []
    real_server = grpc.aio.server

    def server(*args: Any, **kwargs: Any) -> Recording:
        made.append(Recording(real_server(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(grpc.aio, "server", server)
    running = await serve(settings, reflection=True)
    await running.stop(0)
    (recording,) = made
    assert recording.methods, "no method registered: grpc registers them otherwise now"
    assert recording.methods <= set(auth.METHODS), recording.methods - set(auth.METHODS)


async def test_a_method_whose_permission_is_removed_is_refused(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    method = "/taskservice.v1.TaskService/ListTaskTypes"
    monkeypatch.setattr(
        auth, "METHODS", {name: needed for name, needed in auth.METHODS.items() if name != method}
    )
    for tokens in (TOKENS, ""):  # default deny holds without tokens too
        running = await serve(settings, tokens=SecretStr(tokens), reflection=False)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = pb_grpc.TaskServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ListTaskTypes(
                        pb.ListTaskTypesRequest(), metadata=bearer("s3cret-admin")
                    )
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert method in (caught.value.details() or "")
                assert error_info(caught.value).metadata["method"] == method
                # The methods still listed are served as before.
                listed = await stub.ListTasks(
                    pb.ListTasksRequest(page_size=1), metadata=bearer("s3cret-admin")
                )
                assert len(listed.tasks) <= 1
        finally:
            await running.stop(0)
