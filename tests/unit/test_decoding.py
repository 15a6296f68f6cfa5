"""A request that does not decode is answered with why, whichever protobuf
runtime decodes it: protobuf 7 says why in its error, protobuf 6 names only
the message type, and the guard then finds the reason itself."""

from __future__ import annotations

import pytest

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice.server import guard

NOT_UTF8 = b"\x0a\x02\xff\xfe"  # field 1, a string in StartRequest


def nested(levels: int) -> bytes:
    """A StartRequest whose kwargs hold a JSON object `levels` deep, encoded by
    hand (building it as messages would already hit the limit)."""
    value = b"\x08\x00"  # Value.null_value
    for _ in range(levels):
        entry = b"\x0a\x01a" + field(2, value)  # map entry "a": value
        value = field(5, field(1, entry))  # Value.struct_value: Struct.fields
    return field(1, b"t") + field(3, field(1, b"\x0a\x01k" + field(2, value)))


def field(number: int, data: bytes) -> bytes:
    """A length-delimited field."""
    size, out = len(data), bytearray()
    while size > 0x7F:
        out.append(size & 0x7F | 0x80)
        size >>= 7
    out.append(size)
    return bytes([number << 3 | 2]) + bytes(out) + data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (NOT_UTF8, "not valid UTF-8"),
        (nested(40), "nested too deeply"),
        (b"\xff\xff\xff", "not a valid protobuf message"),
    ],
)
def test_the_guard_says_why_a_request_did_not_decode(data: bytes, reason: str) -> None:
    deserialize = guard._safe(pb.StartRequest.FromString)
    assert deserialize is not None
    answer = deserialize(data)
    assert isinstance(answer, guard.Undecodable)
    assert reason in answer.reason


def test_the_reason_is_found_without_protobuf_saying_it() -> None:
    descriptor = pb.StartRequest.DESCRIPTOR
    assert "UTF-8" in (guard._why_undecodable(descriptor, NOT_UTF8) or "")
    assert "nested too deeply" in (guard._why_undecodable(descriptor, nested(40)) or "")
    # Within the limit, and a truncated message: neither reason.
    pb.StartRequest.FromString(nested(30))
    assert guard._why_undecodable(descriptor, nested(30)) is None
    assert guard._why_undecodable(descriptor, nested(3)[:-3]) is None
