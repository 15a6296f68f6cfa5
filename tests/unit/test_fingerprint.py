"""A Start's request fingerprint covers every field of the command unless the
field says it is not part of the request: a repeat with the same request_id
that asks anything else is refused, and one that asks the same is answered."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskservice.core.states import CancelMode, ConflictPolicy
from taskservice.server.starts import StartCommand

LEFT_OUT = {"args_size", "time_remaining", "request_id"}
"""How the call was made, not what it asks: the only fields left out."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
seconds = st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "task_name": st.text(max_size=12),
    "args": st.lists(json_values, max_size=3),
    "kwargs": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    "args_size": st.integers(min_value=0, max_value=10**6),
    "exclusivity_key": st.text(max_size=12),
    "conflict_policy": st.sampled_from(
        [p for p in ConflictPolicy if p is not ConflictPolicy.UNSPECIFIED]
    ),
    "countdown": seconds,
    "start_time": seconds,
    "replace_mode": st.sampled_from(list(CancelMode)),
    "queue": st.text(max_size=12),
    "time_limit": seconds,
    "soft_time_limit": seconds,
    "time_remaining": seconds,
    "request_id": st.text(max_size=12),
}


def test_only_how_the_call_was_made_is_left_out() -> None:
    fields = {f.name: f for f in dataclasses.fields(StartCommand)}
    assert set(fields) == set(FIELDS), "a new StartCommand field needs a strategy here"
    left_out = {name for name, f in fields.items() if not f.metadata.get("request", True)}
    assert left_out == LEFT_OUT


# Drawing a different value for each field rejects a few draws; on a busy
# machine that trips the "too slow" check, which says nothing about the code.
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.fixed_dictionaries(FIELDS), st.data())
def test_changing_any_field_of_the_request_changes_the_fingerprint(
    values: dict[str, Any], data: st.DataObject
) -> None:
    command = StartCommand(**values)
    for name, strategy in FIELDS.items():
        other = data.draw(strategy.filter(lambda v, was=values[name]: v != was), label=name)
        changed = dataclasses.replace(command, **{name: other})
        if name in LEFT_OUT:
            assert changed.fingerprint() == command.fingerprint(), name
        else:
            assert changed.fingerprint() != command.fingerprint(), name


def test_an_unspecified_conflict_policy_is_the_same_request_as_reject() -> None:
    asked = {"task_name": "t", "args": [], "kwargs": {}, "args_size": 0}
    unspecified = StartCommand(**asked, conflict_policy=ConflictPolicy.UNSPECIFIED)
    assert unspecified.fingerprint() == StartCommand(**asked).fingerprint()
