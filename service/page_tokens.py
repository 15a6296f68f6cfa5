"""Page tokens of ListTasks and CancelTasks: opaque to callers, checked
strictly when they come back.

A token says where the previous page ended (the index score and the task id
of its last entry) and which filters it listed, as a fingerprint. A token is
attacker input that reaches a Redis script, so `decode` accepts exactly what
`encode` writes and refuses everything else with INVALID_ARGUMENT:

- the token is at most MAX_LENGTH characters of the base64url alphabet; it is
  measured before anything decodes it;
- the decoded text has one fixed shape, read by one anchored pattern (no
  parser, so no nesting and no recursion to exhaust);
- the score is the form Redis writes for an index score, which is a creation
  time in ms (taskservice.core.scripts): an optional minus, digits, maybe a
  fraction. Python's float() would also take `nan`, `inf`, `1_000` or ` 1 `;
  ZRANGEBYSCORE refuses some of them ("min or max is not a float"), and the
  server never writes any of them;
- the task id is a canonical UUID (lowercase, hyphenated), as Start issues them.

The text is `["<score>","<task id>","<fingerprint>"]`, byte for byte the JSON
that servers before this module wrote, so tokens stay valid across an upgrade
(in both directions, during a rolling one).
"""

from __future__ import annotations

import base64
import binascii
import re

from taskservice.core.errors import InvalidArgument

MAX_LENGTH = 256
"""The longest token `decode` looks at; `encode` writes at most about 200."""

_ALPHABET = re.compile(r"[A-Za-z0-9_-]+")
_SCORE = r"-?[0-9]{1,17}(?:\.[0-9]{1,17})?"  # 17 digits: all a double has
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_FINGERPRINT = r"[0-9a-f]{1,64}"
_TEXT = re.compile(rf'\["({_SCORE})","({_UUID})","({_FINGERPRINT})"\]')


def encode(score: str, task_id: str, fingerprint: str) -> str:
    """The token of the page after the entry (`score`, `task_id`) of a listing
    whose filters have `fingerprint` (lowercase hex).

    ValueError if a part is not of the form `decode` accepts (see the module):
    the server would hand out a token it then refuses, so that is a bug."""
    text = f'["{score}","{task_id}","{fingerprint}"]'
    if not _TEXT.fullmatch(text):
        raise ValueError(f"not a page position: score {score!r}, task id {task_id!r}")
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode(
    token: str,
    fingerprint: str,
    *,
    rpc: str = "ListTasks",
    bound_to: str = "states, task_name and exclusivity_key",
) -> tuple[str, str]:
    """The (score, task id) `token` continues after, if `encode` wrote it for
    a call of `rpc` whose filters (`bound_to`, as the messages name them)
    have `fingerprint`.

    InvalidArgument, with a violation on `page_token`, for anything else:
    whatever the token holds, nothing else is raised."""
    found = _TEXT.fullmatch(_text(token)) if _well_formed(token) else None
    if found is None:
        raise InvalidArgument(
            f"page_token is not one {rpc} returned; start again with an empty one",
            violations=[("page_token", f"not a token {rpc} returned")],
        )
    score, task_id, issued_for = found.groups()
    if issued_for != fingerprint:
        raise InvalidArgument(
            f"page_token belongs to a {rpc} call with other filters; pass the same "
            f"{bound_to} as for the first page",
            violations=[("page_token", "filters differ from the first page's")],
        )
    return score, task_id


def _well_formed(token: str) -> bool:
    # The length first: the pattern below need not scan a huge token.
    return len(token) <= MAX_LENGTH and _ALPHABET.fullmatch(token) is not None


def _text(token: str) -> str:
    """The text of a well-formed token; "" if it is no valid base64 or ASCII."""
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        return raw.decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        return ""
