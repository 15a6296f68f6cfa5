"""Server reflection that serves the proto files with their comments.

Generated Python modules carry descriptors without comments, so stock
reflection gives grpcurl `describe` bare fields. protos/generate.py also
writes a descriptor set with source info; this servicer answers with those
files instead, so the field comments (the API docs) reach grpcurl users.
"""

from __future__ import annotations

import functools
from importlib import resources

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from taskservice.server.guard import Guard


def _documented_files() -> dict[str, bytes]:
    raw = (resources.files("taskservice._proto") / "descriptors.binpb").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(raw).file
    return {f.name: f.SerializeToString() for f in files}


class DocumentedReflectionServicer(ReflectionServicer):
    """grpc_reflection's servicer, answering with documented file descriptors.

    It overrides the two private lookups that return files (their stubs do
    not declare them); tests/integration/test_cli.py fails if a grpcio
    release changes them."""

    def __init__(self, service_names: tuple[str, ...]) -> None:
        super().__init__(service_names)
        self._documented = _documented_files()

    def _file_by_filename(
        self, request: reflection_pb2.ServerReflectionRequest, filename: str
    ) -> reflection_pb2.ServerReflectionResponse:
        return self._with_docs(super()._file_by_filename(request, filename))  # type: ignore[misc]

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        response = super()._file_containing_symbol(request, name)  # type: ignore[misc]
        if response.HasField("error_response") and "." in name:
            # The descriptor pool does not index methods ("pkg.Service.Method"):
            # answer with the file of the service that holds the method.
            parent = super()._file_containing_symbol(request, name.rsplit(".", 1)[0])  # type: ignore[misc]
            if parent.HasField("file_descriptor_response"):
                response = parent
        return self._with_docs(response)

    def _with_docs(
        self, response: reflection_pb2.ServerReflectionResponse
    ) -> reflection_pb2.ServerReflectionResponse:
        if response.HasField("file_descriptor_response"):
            files = response.file_descriptor_response.file_descriptor_proto
            for i, serialized in enumerate(files):
                name = descriptor_pb2.FileDescriptorProto.FromString(serialized).name
                if name in self._documented:
                    files[i] = self._documented[name]
        return response


def add_reflection(
    server: grpc.aio.Server, service_names: tuple[str, ...], *, guard: Guard
) -> None:
    """Serve reflection (v1alpha, which grpcurl speaks) for `service_names`,
    through `guard` (it needs a read token when tokens are set)."""
    servicer = DocumentedReflectionServicer((*service_names, reflection.SERVICE_NAME))
    guard.add(
        server,
        functools.partial(reflection_pb2_grpc.add_ServerReflectionServicer_to_server, servicer),
    )
