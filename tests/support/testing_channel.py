"""grpcio-testing's channel for TaskService: a unit test plays the server,
taking each call the client makes and answering it."""

from __future__ import annotations

from typing import Any

import grpc_testing

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["TaskService"]


def testing_channel() -> Any:
    return grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())


def method(name: str) -> Any:
    """The descriptor of TaskService's method `name`, to take its calls."""
    return SERVICE.methods_by_name[name]
