"""Page tokens: what the server wrote comes back; anything else is INVALID_ARGUMENT."""

from __future__ import annotations

import base64
import json
import math
import re
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskservice.core.errors import InvalidArgument
from taskservice.server import page_tokens

FINGERPRINT = "0123456789abcdef"
TASK_ID = "8c0a9c4e-52f4-4d8e-9b55-7f3f1e0a2b6d"
SCORE = "1700000000123"
NOT_OURS = "not a token ListTasks returned"
OTHER_FILTERS = "filters differ from the first page's"


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def as_token(parts: list[object]) -> str:
    """A token as servers before page_tokens wrote it (JSON), with any parts."""
    return b64(json.dumps(parts, separators=(",", ":")))


def refusal(token: str, fingerprint: str = FINGERPRINT) -> str:
    """The page_token violation decoding `token` raises."""
    with pytest.raises(InvalidArgument) as caught:
        page_tokens.decode(token, fingerprint)
    ((field, description),) = caught.value.violations
    assert field == "page_token"
    return description


def test_a_token_continues_where_its_page_ended() -> None:
    for score in (SCORE, "0", "-3", "1.5", "9007199254740992"):
        token = page_tokens.encode(score, TASK_ID, FINGERPRINT)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
        assert page_tokens.decode(token, FINGERPRINT) == (score, TASK_ID)


def test_tokens_of_earlier_servers_still_continue() -> None:
    # Servers before page_tokens wrote JSON; a rolling upgrade meets them.
    token = as_token([SCORE, TASK_ID, FINGERPRINT])
    assert token == page_tokens.encode(SCORE, TASK_ID, FINGERPRINT)
    assert page_tokens.decode(token, FINGERPRINT) == (SCORE, TASK_ID)


def test_a_token_only_continues_its_own_filters() -> None:
    token = page_tokens.encode(SCORE, TASK_ID, FINGERPRINT)
    assert refusal(token, "fedcba9876543210") == OTHER_FILTERS


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(b64("[" * 5000 + "]" * 5000), id="deep-nesting"),
        pytest.param(as_token(["nan", TASK_ID, FINGERPRINT]), id="nan"),
        pytest.param(as_token(["NaN", TASK_ID, FINGERPRINT]), id="NaN"),
        pytest.param(as_token(["inf", TASK_ID, FINGERPRINT]), id="inf"),
        pytest.param(as_token(["1_000", TASK_ID, FINGERPRINT]), id="underscore"),
        pytest.param(as_token([" 1 ", TASK_ID, FINGERPRINT]), id="spaces"),
        pytest.param(as_token(["1e3", TASK_ID, FINGERPRINT]), id="exponent"),
        pytest.param(as_token(["\u0661\u0662", TASK_ID, FINGERPRINT]), id="arabic-digits"),
        pytest.param(as_token([1, TASK_ID, FINGERPRINT]), id="number-not-string"),
        pytest.param(as_token([SCORE, TASK_ID.upper(), FINGERPRINT]), id="uppercase-id"),
        pytest.param(as_token([SCORE, TASK_ID.replace("-", ""), FINGERPRINT]), id="hex-id"),
        pytest.param(as_token([SCORE, f"{{{TASK_ID}}}", FINGERPRINT]), id="braced-id"),
        pytest.param(as_token([SCORE, TASK_ID]), id="two-parts"),
        pytest.param(as_token([SCORE, TASK_ID, FINGERPRINT, "x"]), id="four-parts"),
        pytest.param(b64(f'["{SCORE}", "{TASK_ID}", "{FINGERPRINT}"]'), id="spaced-json"),
        pytest.param(page_tokens.encode(SCORE, TASK_ID, FINGERPRINT) + "=", id="padded"),
        pytest.param(page_tokens.encode(SCORE, TASK_ID, FINGERPRINT) + "\n", id="newline"),
        pytest.param("A" * 10**6, id="a-megabyte"),
        pytest.param("not-a-token", id="not-base64-text"),
        pytest.param("é" * 8, id="not-ascii"),
    ],
)
def test_tokens_the_server_never_wrote_are_refused(token: str) -> None:
    assert refusal(token) == NOT_OURS


@pytest.mark.parametrize(
    ("score", "task_id", "fingerprint"),
    [
        ("nan", TASK_ID, FINGERPRINT),
        ("1e+21", TASK_ID, FINGERPRINT),
        (SCORE, "not-a-uuid", FINGERPRINT),
        (SCORE, TASK_ID, 'x","y'),
    ],
)
def test_the_server_never_writes_a_token_it_would_refuse(
    score: str, task_id: str, fingerprint: str
) -> None:
    with pytest.raises(ValueError):
        page_tokens.encode(score, task_id, fingerprint)


# -- whatever comes in: valid values or InvalidArgument, never anything else --

REDIS_REFUSES_OR_WE_NEVER_WRITE = [
    "nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "1_000", " 1 ", "1 ", "\t1",
    "1\n", "1e3", "1E3", "0x10", "1.", ".5", "+1", "--1", "", "\u0661", "1" * 18, "1." + "1" * 18,
]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
scores = st.one_of(
    st.integers(-(10**17) + 1, 10**17 - 1).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(REDIS_REFUSES_OR_WE_NEVER_WRITE),
    st.text(max_size=30),
)
task_ids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: f"{{{u}}}"),
    st.uuids().map(lambda u: f"urn:uuid:{u}"),
    st.text(max_size=40),
)
edited = st.builds(lambda s, t, f: as_token([s, t, f]), scores, task_ids, st.just(FINGERPRINT))
nested = st.integers(1, 20_000).map(lambda depth: b64("[" * depth + "]" * depth))
long = st.builds(
    lambda token, tail: token + tail,
    st.builds(page_tokens.encode, st.integers(0, 10**13).map(str), st.uuids().map(str),
              st.just(FINGERPRINT)),
    st.text("ABCabc0123_-=", min_size=1, max_size=5000),
)  # fmt: skip
tokens = st.one_of(
    st.text(),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/"),
    st.binary(max_size=300).map(b64),
    json_values.map(lambda value: b64(json.dumps(value))),
    edited,
    nested,
    long,
)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(token=tokens)
def test_decoding_any_token_gives_valid_values_or_invalid_argument(token: str) -> None:
    try:
        score, task_id = page_tokens.decode(token, FINGERPRINT)
    except InvalidArgument as error:
        assert [field for field, _ in error.violations] == ["page_token"]
        return
    # What reaches Redis: a finite number in a form ZRANGEBYSCORE takes, a canonical id.
    assert re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", score)
    assert math.isfinite(float(score))
    assert str(uuid.UUID(task_id)) == task_id
