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
from typing import Any

from taskservice.core import errors
from taskservice.core.errors import PermissionDenied, Unauthenticated

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


class Tokens:
    """The tokens of a server, and what each may do."""

    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tokens

    def refusal(self, method: str, metadata: Any) -> errors.TaskServiceError | None:
        """Why a call of `method` with this metadata may not proceed; None if it may."""
        token = self._holder(dict(metadata or ()))  # (key, value) pairs
        needed = _NEEDED.get(method, "read")
        if token is None:
            return Unauthenticated(
                "missing or unknown bearer token: send `authorization: Bearer <token>`"
            )
        if needed not in token.permissions:
            logger.info("token %r may not %s (%s)", token.name, needed, method)
            return PermissionDenied(
                f"this token may not {needed}; it may: {', '.join(sorted(token.permissions))}",
                permission=needed,
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
