"""Who may call: bearer tokens, each with its permissions; a table, each
method's permission; default deny.

Tokens come from TASKSERVICE_TOKENS (entries separated by ";") or the file
TASKSERVICE_TOKENS_FILE (one per line; `#` starts a comment). An entry is
`<name> <token> [<permissions>]`, permissions a comma-separated subset of
`read,start,cancel` (all three if omitted). A caller sends
`authorization: Bearer <token>` metadata.

METHODS names the permission of every method of every service the server
serves: Start needs `start`, Cancel and CancelTasks `cancel`, every other
TaskService method and reflection `read`; the health service is OPEN
(probes need no token).
A method not in METHODS is refused with PERMISSION_DENIED, naming it, to
every caller:

- with tokens, whatever the caller's token (`Tokens.refusal`);
- without tokens too, where every listed method is open: the guard
  (taskservice.server.guard) looks each method up when it wraps it, and
  serves an unlisted one a handler that only refuses (and logs a warning at
  startup). So a method added to the proto without a line here fails closed
  at once, in development, rather than once tokens are set in production.

tests/unit/test_auth.py checks that METHODS lists exactly the methods of the
services the server registers.

Tokens are compared in constant time and never logged or echoed; only an
entry's name reaches the logs.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from taskservice.core import errors
from taskservice.core.errors import PermissionDenied, Unauthenticated

logger = logging.getLogger(__name__)

PERMISSIONS = frozenset({"read", "start", "cancel"})
"""What a token may be granted."""

OPEN = "open"
"""The permission of a method anyone may call, with or without a token. No
token can be granted it (it is not in PERMISSIONS)."""

METHODS: Mapping[str, str] = MappingProxyType(
    {
        "/taskservice.v1.TaskService/Start": "start",
        "/taskservice.v1.TaskService/GetStatus": "read",
        "/taskservice.v1.TaskService/Cancel": "cancel",
        "/taskservice.v1.TaskService/CancelTasks": "cancel",
        "/taskservice.v1.TaskService/WatchStatus": "read",
        "/taskservice.v1.TaskService/ListTaskTypes": "read",
        "/taskservice.v1.TaskService/ListTasks": "read",
        # Load balancers and orchestrators probe without credentials.
        "/grpc.health.v1.Health/Check": OPEN,
        "/grpc.health.v1.Health/Watch": OPEN,
        # grpcio-health-checking 1.80 and later also serve List.
        "/grpc.health.v1.Health/List": OPEN,
        # Reflection describes the API (taskservice.server.reflection).
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "read",
    }
)
"""The permission each method needs (OPEN: none), by its full path
`/<package>.<Service>/<Method>`. A method not here is refused (see the module)."""


def needed(method: str) -> str | None:
    """The permission `method` needs (OPEN: none); None if it is not in
    METHODS, and so refused to every caller."""
    return METHODS.get(method)


def unlisted(method: str) -> PermissionDenied:
    """The refusal of a method that is not in METHODS."""
    return PermissionDenied(
        f"{method} has no permission in this server's table, so nobody may call it "
        "(a server bug: please report it)",
        method=method,
    )


@dataclass(frozen=True, slots=True)
class Token:
    """One entry of the token list: a name for the logs, the secret and its permissions."""

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
    """The tokens of TASKSERVICE_TOKENS and TASKSERVICE_TOKENS_FILE."""
    tokens = parse_tokens(inline, separator=";", origin="TASKSERVICE_TOKENS")
    if file:
        tokens += parse_tokens(Path(file).read_text(), origin=file)
    return tokens


class Tokens:
    """The tokens of a server, and what each may do."""

    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tokens

    def refusal(self, method: str, metadata: Any) -> errors.TaskServiceError | None:
        """Why a call of `method` (its full path) with this metadata may not
        proceed; None if it may. An unlisted method never may."""
        permission = needed(method)
        if permission is None:
            return unlisted(method)
        if permission == OPEN:
            return None
        token = self._holder(dict(metadata or ()))  # (key, value) pairs
        if token is None:
            return Unauthenticated(
                "missing or unknown bearer token: send `authorization: Bearer <token>`"
            )
        if permission not in token.permissions:
            logger.info("token %r may not %s (%s)", token.name, permission, method)
            granted = ", ".join(sorted(token.permissions))
            return PermissionDenied(
                f"this token may not {permission}; it may: {granted}", permission=permission
            )
        return None

    def _holder(self, metadata: Mapping[str, str | bytes]) -> Token | None:
        presented = metadata.get("authorization", "")
        if isinstance(presented, bytes):
            presented = presented.decode("latin-1")
        scheme, _, secret = presented.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            return None
        found = None
        candidate = secret.strip().encode()
        for token in self._tokens:  # no early exit: the time says nothing
            if hmac.compare_digest(token.secret, candidate):
                found = token
        return found
