"""What every call goes through before its handler: the token check
(service.auth, when tokens are set), decoding, then the drain gate.

- `Decoding`: a request that fails to decode (bytes that are not protobuf,
  invalid UTF-8, JSON nested deeper than protobuf's recursion limit) answers
  INVALID_ARGUMENT saying why, instead of gRPC's UNKNOWN "Unexpected
  DecodeError" raised before any handler runs.
- `Gate`: counts the calls in flight; once the server drains, new calls answer
  UNAVAILABLE/SHUTTING_DOWN at once while those already admitted finish. The
  health service stays open, so probes see NOT_SERVING rather than an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from service import errors

HEALTH_PREFIX = "/grpc.health.v1.Health/"

QUIET = 0.1
"""Seconds without a new call after which a draining server stops."""

if TYPE_CHECKING:  # grpc's handler type is generic only in its stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]
Behaviour = Callable[..., Any]


class Undecodable:
    """Stands in for a request whose bytes did not decode."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


_DECODE_REASONS = (
    (
        "MaxDepth",
        "a JSON value is nested too deeply (objects may nest at most 32 levels, lists 48)",
    ),
    ("UTF-8", "a string field is not valid UTF-8"),
)


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            text = str(error)
            for marker, reason in _DECODE_REASONS:
                if marker in text:
                    return Undecodable(reason)
            return Undecodable("the request is not a valid protobuf message of the method's type")

    return deserialize


def rewrap(
    handler: Handler,
    wrap_unary: Callable[[Behaviour], Behaviour],
    wrap_stream: Callable[[Behaviour], Behaviour],
    *,
    deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """`handler` with its behaviour wrapped (unary-unary and unary-stream only:
    the methods this server has)."""
    request_deserializer = deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary),
            request_deserializer=request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream),
            request_deserializer=request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


async def _responses(outcome: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses, whether it yields them or writes them
    with `context.write` (as grpc_health's Watch does) and returns."""
    if hasattr(outcome, "__aiter__"):
        async for response in outcome:
            yield response
    else:
        await outcome


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> None:
    await context.abort_with_status(errors.to_status(error))


class Decoding(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT, saying why, for requests that do not decode."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        def unary(behaviour: Behaviour) -> Behaviour:
            async def checked(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if isinstance(request, Undecodable):
                    await _abort(context, errors.InvalidArgument(request.reason))
                return await behaviour(request, context)

            return checked

        def stream(behaviour: Behaviour) -> Behaviour:
            async def checked(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await _abort(context, errors.InvalidArgument(request.reason))
                async for response in _responses(behaviour(request, context)):
                    yield response

            return checked

        return rewrap(handler, unary, stream, deserializer=_safe(handler.request_deserializer))


class Gate(grpc.aio.ServerInterceptor):
    """Admits calls until the server drains; counts those in flight."""

    def __init__(self) -> None:
        self._draining = False
        self._in_flight = 0
        self._last_call = 0.0

    def drain(self) -> None:
        """From now on, refuse new calls (UNAVAILABLE/SHUTTING_DOWN)."""
        self._draining = True

    async def drained(self, within: float) -> bool:
        """Wait up to `within` seconds until the admitted calls have finished
        and no call has arrived for QUIET seconds. gRPC's own stop cancels the
        calls it holds but has not yet handed to the server (CANCELLED, not
        retryable); a quiet moment means it holds none."""
        loop = asyncio.get_running_loop()
        until = loop.time() + within
        while self._in_flight or loop.time() - self._last_call < QUIET:
            if loop.time() >= until:
                return False
            await asyncio.sleep(0.01)
        return True

    def _admit(self) -> None:
        self._last_call = asyncio.get_running_loop().time()
        if self._draining:
            raise errors.ShuttingDown("the server is shutting down; call again (another server)")
        self._in_flight += 1

    def _release(self) -> None:
        self._in_flight -= 1

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        gate = self

        def unary(behaviour: Behaviour) -> Behaviour:
            async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    gate._admit()
                except errors.ShuttingDown as error:
                    await _abort(context, error)
                try:
                    return await behaviour(request, context)
                finally:
                    gate._release()

            return gated

        def stream(behaviour: Behaviour) -> Behaviour:
            async def gated(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    gate._admit()
                except errors.ShuttingDown as error:
                    await _abort(context, error)
                try:
                    async for response in _responses(behaviour(request, context)):
                        yield response
                finally:
                    gate._release()

            return gated

        return rewrap(handler, unary, stream)
