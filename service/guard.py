"""What every call of a guarded service goes through before its handler.

In order: the token check (when tokens are set, see taskservice.server.auth), decoding,
the drain gate.

- Default deny: a method without a permission in taskservice.server.auth.METHODS
  is served a handler that only refuses (PERMISSION_DENIED), tokens or not; so
  is a method of a kind the guard cannot check (client streaming). Both are
  decided once, when the method is wrapped, and logged as a warning then.

- Decoding: a request that fails to decode (bytes that are not protobuf,
  invalid UTF-8, JSON nested deeper than protobuf's recursion limit) answers
  INVALID_ARGUMENT saying why, instead of gRPC's UNKNOWN "Unexpected
  DecodeError" raised before any handler runs.
- The drain gate (taskservice.server.drain) counts the admitted calls; once
  the server drains, a new call answers UNAVAILABLE/SHUTTING_DOWN, at once or,
  near the end of the drain, when the port closes.
- Whatever a handler raises leaves as its gRPC status (status.to_status).
- Every answer is counted by method and code, unary ones timed, open
  streams gauged (taskservice.core.metrics); the label children are resolved when
  the method is wrapped, so a call pays a dict lookup and two increments
  (nothing when the server serves no metrics).

The guard wraps each method's handler once, when the service is added
(`Guard.add`), rather than as a gRPC interceptor: an interceptor runs per
call, through grpc.aio's interceptor pipeline, and measurably slows every
call. The health service is added unguarded, so probes always get an answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from taskservice.core import errors
from taskservice.core.metrics import ServerMetrics
from taskservice.server import auth
from taskservice.server.auth import Tokens
from taskservice.server.drain import Gate, Phase, shutting_down
from taskservice.server.status import end_stream, to_status

if TYPE_CHECKING:  # grpc's handler type is generic only in its stubs
    Handler = grpc.RpcMethodHandler[Any, Any]

Context = grpc.aio.ServicerContext[Any, Any]

logger = logging.getLogger(__name__)

_DECODE_REASONS = (
    (
        "MaxDepth",
        "a JSON value is nested too deeply (objects may nest at most 32 levels, lists 48)",
    ),
    ("UTF-8", "a string field is not valid UTF-8"),
)


_RECURSION_LIMIT = 100
"""protobuf's default limit on how deep messages may nest when decoding."""


def _why_undecodable(descriptor: Descriptor, data: bytes) -> str | None:
    """Which of `_DECODE_REASONS`' reasons broke `data`, when protobuf's
    error does not say (protobuf 6 names only the message type): a string
    field that is not UTF-8, or messages nested past the recursion limit."""
    markers = dict(_DECODE_REASONS)
    try:
        found = _walk(descriptor, memoryview(data), 1)
    except (IndexError, ValueError):  # truncated: not one of the two
        return None
    return markers[found] if found else None


def _walk(descriptor: Descriptor, data: memoryview, depth: int) -> str | None:
    if depth > _RECURSION_LIMIT:
        return "MaxDepth"
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        wire_type = key & 7
        if wire_type == 0:
            _, at = _varint(data, at)
        elif wire_type in (1, 5):
            at += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise ValueError("truncated")
            chunk, at = data[at : at + size], at + size
            field = descriptor.fields_by_number.get(key >> 3)
            if field is None:
                continue
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    bytes(chunk).decode("utf-8")
                except UnicodeDecodeError:
                    return "UTF-8"
            elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type:
                found = _walk(field.message_type, chunk, depth + 1)
                if found:
                    return found
        else:  # groups, or not protobuf at all
            return None
    return None


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


class Undecodable:
    """Stands in for a request whose bytes did not decode."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _passing_bytes(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """`serializer`, except that a handler's already serialized answer passes."""
    if serializer is None:
        return None

    def serialize(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serializer(response)

    return serialize


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    # The generated FromString is bound to its message class.
    descriptor: Descriptor | None = getattr(
        getattr(deserializer, "__self__", None), "DESCRIPTOR", None
    )

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            text = str(error)
            for marker, reason in _DECODE_REASONS:
                if marker in text:
                    return Undecodable(reason)
            found = _why_undecodable(descriptor, data) if descriptor is not None else None
            return Undecodable(
                found or "the request is not a valid protobuf message of the method's type"
            )

    return deserialize


class _Capture:
    """Stands in for a server to a generated `add_XServicer_to_server`."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: Mapping[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        self.service, self.handlers = service, handlers


class Guard:
    """The call policy of one server: tokens, decoding, the drain gate."""

    def __init__(
        self,
        tokens: Tokens | None = None,
        *,
        metrics: ServerMetrics | None = None,
        gate: Gate | None = None,
    ) -> None:
        self._tokens = tokens
        self._metrics = metrics or ServerMetrics(per_call=False)
        self.gate = gate or Gate()

    def add(self, server: grpc.aio.Server, register: Callable[[Any], None]) -> None:
        """Add a service to `server`, each method guarded. `register` is a
        generated `add_XServicer_to_server` with its servicer bound."""
        capture = _Capture()
        register(capture)
        guarded = {
            name: self._wrap(f"/{capture.service}/{name}", name, handler)
            for name, handler in capture.handlers.items()
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(capture.service, guarded),)
        )
        server.add_registered_method_handlers(capture.service, guarded)

    async def _refusal(
        self, method: str, request: Any, context: Context
    ) -> errors.TaskServiceError | None:
        """Why this call may not proceed; None if it may (then it is admitted
        and counted in the gate until it ends)."""
        refusal: errors.TaskServiceError | None = None
        if self._tokens is not None:
            refusal = self._tokens.refusal(method, context.invocation_metadata())
        if refusal is None and isinstance(request, Undecodable):
            refusal = errors.InvalidArgument(request.reason)
        if self.gate.draining:
            # Every answer of a draining server, a refusal for a bad token
            # included, waits while the gate holds calls.
            shutting_down = await self.gate.turn_away(context.time_remaining())
            return refusal or shutting_down
        if refusal is None:
            self.gate.enter()
        return refusal

    def _wrap(self, method: str, name: str, handler: Handler) -> Handler:
        if auth.needed(method) is None:
            logger.warning("%s has no permission in auth.METHODS: every call is refused", method)
            return self._refuser(name, handler, auth.unlisted(method))
        deserializer = _safe(handler.request_deserializer)
        serializer = _passing_bytes(handler.response_serializer)
        clock = time.perf_counter
        if handler.unary_unary is not None:
            behaviour: Any = handler.unary_unary  # an async handler; the stubs say sync
            answered = self._metrics.rpc(name, timed=True)

            async def unary(request: Any, context: Context) -> Any:
                began = clock()
                refusal = await self._refusal(method, request, context)
                if refusal is not None:
                    status = to_status(refusal)
                    answered(status.code, clock() - began)
                    await context.abort_with_status(status)
                code = grpc.StatusCode.OK
                try:
                    return await behaviour(request, context)
                except grpc.aio.AbortError:
                    code = _aborted(context)
                    raise
                except asyncio.CancelledError:
                    code = _gone(context)
                    raise
                except Exception as error:  # every error leaves through to_status
                    status = to_status(error)
                    code = status.code
                    await context.abort_with_status(status)
                finally:
                    self.gate.leave()
                    answered(code, clock() - began)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=deserializer, response_serializer=serializer
            )
        if handler.unary_stream is not None:
            streaming: Any = handler.unary_stream
            # A stream's duration is its client's business: counted, not timed.
            ended = self._metrics.rpc(name, timed=False)
            open_streams = self._metrics.watch_streams

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                refusal = await self._refusal(method, request, context)
                if refusal is not None:
                    status = to_status(refusal)
                    ended(status.code, 0.0)
                    await context.abort_with_status(status)
                code = grpc.StatusCode.OK
                open_streams.inc()
                try:
                    outcome = streaming(request, context)
                    if hasattr(outcome, "__aiter__"):  # one generator less per message
                        async for response in outcome:
                            yield response
                    else:
                        await outcome  # it writes with context.write
                except grpc.aio.AbortError:
                    code = _aborted(context)
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    code = _gone(context)
                    raise
                except Exception as error:
                    status = to_status(error)
                    code = status.code
                    await end_stream(context, status)
                finally:
                    self.gate.leave()
                    open_streams.dec()
                    ended(code, 0.0)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=deserializer, response_serializer=serializer
            )
        if handler.stream_stream is not None:  # reflection: tokens and the drain apply
            bidi: Any = handler.stream_stream

            async def both(requests: Any, context: Context) -> AsyncIterator[Any]:
                refusal = None
                if self._tokens is not None:
                    refusal = self._tokens.refusal(method, context.invocation_metadata())
                if self.gate.draining:
                    # Waits while the gate holds calls.
                    shutting = await self.gate.turn_away(context.time_remaining())
                    refusal = refusal or shutting
                if refusal is not None:
                    await context.abort_with_status(to_status(refusal))
                # The client decides when a reflection stream ends; a
                # closing server ends it (after gRPC's GOAWAY) rather than
                # wait for the client until the grace runs out.
                responses = _responses(bidi(requests, context))
                async for response in _until_closing(responses, self.gate):
                    yield response
                if self.gate.phase is Phase.CLOSED:
                    await end_stream(context, to_status(shutting_down()))

            return grpc.stream_stream_rpc_method_handler(
                both,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Client streaming: nothing above checks its tokens, so it is not served.
        logger.warning("%s streams requests, which the guard cannot check: refused", method)
        return self._refuser(
            name,
            handler,
            errors.PermissionDenied(
                f"{method} is of a kind this server cannot check, so nobody may call it "
                "(a server bug: please report it)",
                method=method,
            ),
        )

    def _refuser(self, name: str, handler: Handler, refusal: errors.TaskServiceError) -> Handler:
        """A handler of `handler`'s kind that answers every call with `refusal`."""
        status = to_status(refusal)
        answered = self._metrics.rpc(name, timed=False)

        async def refuse(request: Any, context: Context) -> None:
            if self.gate.draining:
                await self.gate.arrive(context.time_remaining())
            answered(status.code, 0.0)
            await context.abort_with_status(status)

        kinds = (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
        )
        build = next(
            (build for behaviour, build in kinds if behaviour is not None),
            grpc.stream_stream_rpc_method_handler,
        )
        return build(
            refuse,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _aborted(context: Context) -> grpc.StatusCode:
    """The code a handler aborted with (UNKNOWN if grpc does not say)."""
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _gone(context: Context) -> grpc.StatusCode:
    """Why a call was cancelled under its handler: its deadline passed, or
    its client went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


async def _responses(outcome: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses, whether it yields them or writes them
    with `context.write` and returns."""
    if hasattr(outcome, "__aiter__"):
        async for response in outcome:
            yield response
    else:
        await outcome


async def _until_closing(responses: AsyncIterator[Any], gate: Gate) -> AsyncIterator[Any]:
    """`responses` until they end, or until the gate closes the port."""
    closing = asyncio.ensure_future(gate.closing())
    try:
        while True:
            following = asyncio.ensure_future(anext(responses))
            await asyncio.wait({following, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                return
            try:
                response = following.result()
            except StopAsyncIteration:
                return
            yield response
    finally:
        closing.cancel()
