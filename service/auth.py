"""Who may call: bearer tokens, each with its permissions.

Tokens come from TASKSERVICE_TOKENS (entries separated by ";") or the file
TASKSERVICE_TOKENS_FILE (one per line; `#` starts a comment). An entry is
`<name> <token> [<permissions>]`, permissions a comma-separated subset of
`read,start,cancel` (all three if omitted). A caller sends
`authorization: Bearer <token>` metadata.

Start needs `start`, Cancel `cancel`, every other TaskService method and
reflection `read`. The health service stays open, so probes need no token.
Tokens are compared in constant time and never logged or echoed; only an
entry's name reaches the logs.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from service import errors
from service.errors import PermissionDenied, Unauthenticated
from service.interceptors import HEALTH_PREFIX, rewrap

if TYPE_CHECKING:
    from service.interceptors import Behaviour, Continuation, Handler

logger = logging.getLogger(__name__)

PERMISSIONS = frozenset({"read", "start", "cancel"})

_NEEDED = {
    "/taskservice.v1.TaskService/Start": "start",
    "/taskservice.v1.TaskService/Cancel": "cancel",
}


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    secret: bytes
    permissions: frozenset[str]


def parse_tokens(text: str, *, separator: str = "\n", origin: str = "tokens") -> list[Token]:
    """The entries of `text` (see the module); ValueError naming the bad entry
    by its position, never by its content."""
    tokens = []
    for number, entry in enumerate(text.split(separator), start=1):
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        parts = entry.split()
        if len(parts) not in (2, 3):
            raise ValueError(f"{origin}, entry {number}: expected `<name> <token> [permissions]`")
        permissions = frozenset(parts[2].split(",")) if len(parts) == 3 else PERMISSIONS
        unknown = permissions - PERMISSIONS
        if unknown:
            raise ValueError(
                f"{origin}, entry {number}: unknown permission(s) {', '.join(sorted(unknown))}"
                f" (known: {', '.join(sorted(PERMISSIONS))})"
            )
        tokens.append(Token(parts[0], parts[1].encode(), permissions))
    return tokens


def load_tokens(inline: str, file: str) -> list[Token]:
    tokens = parse_tokens(inline, separator=";", origin="TASKSERVICE_TOKENS")
    if file:
        tokens += parse_tokens(Path(file).read_text(), origin=file)
    return tokens


class Auth(grpc.aio.ServerInterceptor):
    """Lets a call through only with a token holding the permission it needs."""

    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tokens

    def _holder(self, metadata: Mapping[str, Any]) -> Token | None:
        presented = metadata.get("authorization", "")
        if isinstance(presented, bytes):
            presented = presented.decode("latin-1")
        scheme, _, secret = str(presented).partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return None
        found = None
        candidate = secret.strip().encode()
        for token in self._tokens:  # no early exit: the time says nothing
            if hmac.compare_digest(token.secret, candidate):
                found = token
        return found

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        token = self._holder(metadata)
        needed = _NEEDED.get(method, "read")
        error: errors.TaskServiceError | None = None
        if token is None:
            error = Unauthenticated(
                "missing or unknown bearer token: send `authorization: Bearer <token>`"
            )
        elif needed not in token.permissions:
            logger.info("token %r may not %s (%s)", token.name, needed, method)
            error = PermissionDenied(
                f"this token may not {needed}; it may: {', '.join(sorted(token.permissions))}",
                permission=needed,
            )
        if error is None:
            return handler
        refusal = error

        def refuse(_: Behaviour) -> Behaviour:
            async def refused(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await context.abort_with_status(errors.to_status(refusal))

            return refused

        def refuse_stream(_: Behaviour) -> Behaviour:
            async def refused(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await context.abort_with_status(errors.to_status(refusal))
                yield  # never reached; makes this a generator, as streams are

            return refused

        return rewrap(handler, refuse, refuse_stream)
