"""Request ids (AIP-155): a retried Start or Cancel with the same request_id
gets the first call's answer instead of acting twice; the same id for a
different request is refused. A request is identified by a fingerprint of
what it asks."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from taskservice.core import record
from taskservice.core.errors import InvalidArgument, cut
from taskservice.core.scripts import Request
from taskservice.core.settings import Settings
from taskservice.server.records import Records

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def fingerprint(*call: Any) -> str:
    """A digest of a call's name and arguments (JSON-like values)."""
    canonical = json.dumps(call, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(canonical.encode()).hexdigest()


def remembered(
    request_id: str, fingerprint_of: Callable[[], str], settings: Settings
) -> Request | None:
    """The request id of a call with the fingerprint of what it asks (None
    without an id); InvalidArgument for an id of the wrong shape."""
    if not request_id:
        return None
    if not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise InvalidArgument(
            f"request_id {cut(request_id, 80)!r} must be 1-128 characters of "
            "[A-Za-z0-9._:-] (a UUID, say)",
            violations=[("request_id", "not 1-128 characters of [A-Za-z0-9._:-]")],
        )
    return Request(request_id, fingerprint_of(), settings.request_id_ttl)


async def earlier_answer(records: Records, request: Request) -> str | None:
    """The answer (a record's JSON) given to an earlier call with this request
    id, None if there was none; InvalidArgument if that call asked otherwise."""
    key = record.request_key(records.prefix, request.id)
    flat = await records.link.execute("HGETALL", key)
    seen = dict(zip(flat[::2], flat[1::2], strict=True))
    if not seen:
        return None
    if seen.get("fingerprint") != request.fingerprint:
        raise reused(request)
    return str(seen["response"])


def reused(request: Request | None) -> InvalidArgument:
    """The error for a request id used before for a different request."""
    return InvalidArgument(
        f"request_id {request.id if request else ''!r} was already used for a different "
        "request; use a new one for each distinct call",
        violations=[("request_id", "already used for a different request")],
    )
