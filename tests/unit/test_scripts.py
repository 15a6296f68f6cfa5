"""The record scripts against a real Redis: what each one accepts and refuses."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from taskservice.cli.embedded import EmbeddedRedis
from taskservice.core import record
from taskservice.core import scripts as scripts_module
from taskservice.core.record import TaskRecord
from taskservice.core.scripts import (
    NAMES,
    Abandoned,
    Began,
    Call,
    CancelledQueued,
    CancelRequested,
    Changed,
    Claimed,
    Confirmed,
    Deferred,
    Finished,
    Held,
    LineFull,
    Missing,
    Moved,
    Over,
    Quiet,
    Rejected,
    RunningElsewhere,
    Scripts,
    script,
)

R = TypeVar("R")
LONG = 60_000  # a lease (ms) that does not lapse during a test
LAPSED = 0  # a lease that has lapsed by the time anything reads it


class Store:
    """One test's keys (their own prefix) and a way to run scripts on them."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.prefix = f"scripts-{uuid.uuid4().hex[:8]}"
        self.scripts = Scripts(self.prefix, 600)

    def run(self, call: Call[R]) -> R:
        return call.parse(self.raw(call))

    def raw(self, call: Call[Any]) -> Any:
        return self.client.register_script(call.script.source)(keys=call.keys, args=call.args)

    def new(self, key: str = "", *, lease_ms: int = LONG, confirm: bool = True) -> str:
        task_id = str(uuid.uuid4())
        fields = record.new_record_fields(
            task_id, "t", exclusivity_key=key, queue="q", scheduled=None
        )
        claimed = self.run(self.scripts.claim(fields, exclusivity_key=key, provisional_ms=lease_ms))
        assert isinstance(claimed, Claimed)
        if confirm:
            assert self.run(self.scripts.confirm(task_id)) == Confirmed()
        return task_id

    def started(self, key: str = "", *, lease_ms: int = LONG, worker: str = "w1") -> str:
        task_id = self.new(key)
        began = self.run(
            self.scripts.start(task_id, worker=worker, run="r1", lease_ms=lease_ms, when=1.0)
        )
        assert isinstance(began, Began)
        return task_id

    def rec(self, task_id: str) -> TaskRecord:
        return TaskRecord.from_fields(self.client.hgetall(record.task_key(self.prefix, task_id)))

    def lease(self, task_id: str) -> float | None:
        return self.client.zscore(record.leases_key(self.prefix), task_id)

    def holder(self, key: str) -> str | None:
        value = self.client.get(record.holder_key(self.prefix, key))
        return str(value) if value else None

    def cleanup(self) -> None:
        for name in self.client.scan_iter(f"{self.prefix}:*"):
            self.client.delete(name)


@pytest.fixture
def store(redis_server: EmbeddedRedis) -> Iterator[Store]:
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    made = Store(client)
    yield made
    made.cleanup()
    client.close()


# -- claim -------------------------------------------------------------------


def test_claim_of_a_free_key_records_the_task_as_holder_with_a_provisional_lease(
    store: Store,
) -> None:
    task_id = store.new("k", confirm=False)
    assert store.holder("k") == task_id
    assert store.rec(task_id).state == record.PENDING
    assert store.lease(task_id) is not None  # until the broker has the message


def test_claim_of_a_held_key_writes_nothing_and_names_the_holder(store: Store) -> None:
    holder = store.new("k")
    fields = record.new_record_fields("x-1", "t", exclusivity_key="k", queue="q", scheduled=None)
    held = store.run(store.scripts.claim(fields, exclusivity_key="k", provisional_ms=1))
    assert isinstance(held, Held) and held.holder.id == holder
    assert not store.client.exists(record.task_key(store.prefix, "x-1"))
    assert store.holder("k") == holder


def test_a_claim_sent_twice_is_applied_once(store: Store) -> None:
    fields = record.new_record_fields("t-1", "t", exclusivity_key="k", queue="q", scheduled=None)
    call = store.scripts.claim(fields, exclusivity_key="k", provisional_ms=LONG)
    first = store.run(call)
    assert isinstance(first, Claimed) and first.fencing_token > 0
    assert store.run(call) == first  # a retry after a dropped connection: the same token
    assert store.holder("k") == "t-1"


def test_claim_after_the_holder_finished_takes_the_key(store: Store) -> None:
    first = store.new("k")
    store.run(store.scripts.transition(first, record.ACTIVE_STATES, record.SUCCESS))
    second = store.new("k")
    assert store.holder("k") == second


def test_claim_ends_a_holder_whose_lease_lapsed_and_takes_the_key(store: Store) -> None:
    dead = store.started("k", lease_ms=LAPSED)
    taker = store.new("k")
    assert store.holder("k") == taker
    lost = store.rec(dead)
    assert lost.state == record.LOST
    assert lost.error is not None and lost.error.type == "WorkerLostError"
    assert "w1 stopped heartbeating" in lost.error.message
    assert store.lease(dead) is None


# -- fencing tokens ----------------------------------------------------------


def claim(store: Store, key: str, *, lease_ms: int = LONG) -> tuple[str, int]:
    """A new task claimed under `key`: its id and fencing token."""
    task_id = str(uuid.uuid4())
    fields = record.new_record_fields(task_id, "t", exclusivity_key=key, queue="q", scheduled=None)
    claimed = store.run(store.scripts.claim(fields, exclusivity_key=key, provisional_ms=lease_ms))
    assert isinstance(claimed, Claimed), claimed
    assert store.rec(task_id).fencing_token == claimed.fencing_token  # kept on the record
    return task_id, claimed.fencing_token


def finish(store: Store, task_id: str, end: str = record.SUCCESS) -> None:
    store.run(store.scripts.transition(task_id, record.ACTIVE_STATES, end))


def test_each_claim_of_a_key_gets_a_larger_fencing_token_than_every_earlier_one(
    store: Store,
) -> None:
    tokens = []
    for end in (record.SUCCESS, record.FAILURE, record.REVOKED, record.LOST, record.SUCCESS):
        task_id, token = claim(store, "k")
        tokens.append(token)
        finish(store, task_id, end)
    assert tokens == sorted(set(tokens)) and tokens[0] > 0
    # A refused claim takes no token; the next claim's still grows.
    holder, token = claim(store, "k")
    fields = record.new_record_fields("x-1", "t", exclusivity_key="k", queue="q", scheduled=None)
    assert isinstance(
        store.run(store.scripts.claim(fields, exclusivity_key="k", provisional_ms=1)), Held
    )
    finish(store, holder)
    assert claim(store, "k")[1] > token


def test_fencing_tokens_grow_per_key_and_a_task_without_a_key_has_none(store: Store) -> None:
    first = claim(store, "a")[1]
    assert claim(store, "")[1] == 0  # nothing to fence against
    assert store.rec(claim(store, "")[0]).fencing_token == 0
    other = claim(store, "b")[1]
    assert other > 0
    finish(store, store.holder("a") or "")
    assert claim(store, "a")[1] > first


def test_the_fencing_token_still_grows_once_the_holders_record_and_counter_expired(
    store: Store,
) -> None:
    task_id, token = claim(store, "k")
    finish(store, task_id)
    expiring = [
        record.task_key(store.prefix, task_id),
        record.log_key(store.prefix, task_id),
        record.holder_key(store.prefix, "k"),
        record.fence_key(store.prefix, "k"),
    ]
    for name in expiring:
        store.client.pexpire(name, 1)
    for _ in range(200):  # Redis expires them (lazily on access, actively within ms)
        if not any(store.client.exists(name) for name in expiring):
            break
        time.sleep(0.01)
    assert not any(store.client.exists(name) for name in expiring)
    assert claim(store, "k")[1] > token


def test_a_fencing_counter_ahead_of_the_clock_still_grows_by_one(store: Store) -> None:
    # E.g. issued by a primary whose clock ran ahead, before a failover.
    ahead = 10**13
    store.client.set(record.fence_key(store.prefix, "k"), ahead)
    assert claim(store, "k")[1] == ahead + 1


def test_the_taker_of_a_lapsed_holders_key_gets_a_larger_token(store: Store) -> None:
    dead, dead_token = claim(store, "k")
    store.run(store.scripts.start(dead, worker="w1", run="r1", lease_ms=LAPSED, when=1.0))
    taker, taker_token = claim(store, "k")
    assert store.rec(dead).state == record.LOST and store.holder("k") == taker
    assert taker_token > dead_token
    # A Start abandoned after its claim gave the key back; its token is not reused.
    finish(store, taker)
    abandoned, abandoned_token = claim(store, "k")
    store.run(store.scripts.abandon(abandoned, "broker down"))
    assert store.holder("k") == taker
    assert claim(store, "k")[1] > abandoned_token > taker_token


# -- confirm and abandon -----------------------------------------------------


def test_confirm_drops_the_provisional_lease(store: Store) -> None:
    task_id = store.new("k")  # claims, then confirms
    assert store.lease(task_id) is None
    assert "publishing" not in store.client.hgetall(record.task_key(store.prefix, task_id))


def test_confirm_after_a_worker_started_the_task_changes_nothing(store: Store) -> None:
    task_id = store.new(confirm=False)
    store.run(store.scripts.start(task_id, worker="w", run="r", lease_ms=LONG, when=1.0))
    moved = store.run(store.scripts.confirm(task_id))
    assert isinstance(moved, Moved) and moved.record.state == record.STARTED
    assert store.lease(task_id) is not None  # the worker's lease stays


def test_abandon_gives_the_key_back_to_the_previous_holder(store: Store) -> None:
    first = store.new("k")
    store.run(store.scripts.transition(first, record.ACTIVE_STATES, record.SUCCESS))
    second = store.new("k", confirm=False)
    abandoned = store.run(store.scripts.abandon(second, "never enqueued: broker down"))
    assert isinstance(abandoned, Abandoned)
    ended = abandoned.record
    assert ended.state == record.REVOKED
    assert ended.error is not None and ended.error.type == record.NOT_ENQUEUED_ERROR
    assert store.holder("k") == first
    assert store.lease(second) is None


def test_abandon_of_a_fresh_key_leaves_it_unheld(store: Store) -> None:
    task_id = store.new("k", confirm=False)
    store.run(store.scripts.abandon(task_id, "x"))
    assert store.holder("k") is None


def test_abandon_never_takes_a_key_from_a_newer_holder(store: Store) -> None:
    stale = store.new("k", lease_ms=LAPSED, confirm=False)
    newer = store.new("k")  # the stale claim lapsed: ended and replaced
    assert store.holder("k") == newer
    moved = store.run(store.scripts.abandon(stale, "late"))
    assert isinstance(moved, Moved) and moved.record.state == record.REVOKED
    assert store.holder("k") == newer


def test_abandon_after_a_worker_started_the_task_keeps_it(store: Store) -> None:
    task_id = store.new("k", confirm=False)
    store.run(store.scripts.start(task_id, worker="w", run="r", lease_ms=LONG, when=1.0))
    assert isinstance(store.run(store.scripts.abandon(task_id, "slow broker")), Moved)
    assert store.rec(task_id).state == record.STARTED
    assert store.holder("k") == task_id


def test_a_confirm_with_a_message_pushes_it_once_and_only_while_the_claim_waits(
    store: Store,
) -> None:
    queue = f"{store.prefix}:queue"
    task_id = store.new("k", confirm=False)
    call = store.scripts.confirm(task_id, push=(queue, "message"))
    assert store.run(call) == Confirmed()
    assert isinstance(store.run(call), Moved)  # a retry pushes nothing more
    assert store.client.lrange(queue, 0, -1) == ["message"]
    assert store.lease(task_id) is None
    ended = store.new("j", confirm=False)
    store.run(store.scripts.abandon(ended, "given up"))
    assert isinstance(store.run(store.scripts.confirm(ended, push=(queue, "late"))), Moved)
    assert store.client.llen(queue) == 1  # an abandoned claim never enqueues


def test_withdraw_ends_a_confirmed_queued_task_and_gives_its_key_back(store: Store) -> None:
    task_id = store.new("k")  # confirmed: its message is in the broker
    assert isinstance(store.run(store.scripts.abandon(task_id, "x")), Moved)
    withdrawn = store.run(store.scripts.abandon(task_id, "replicas", withdraw=True))
    assert isinstance(withdrawn, Abandoned) and withdrawn.record.state == record.REVOKED
    assert store.holder("k") is None
    # The worker that gets the message then refuses it.
    start = store.scripts.start(task_id, worker="w", run="r", lease_ms=LONG, when=1.0)
    assert store.run(start) == Over(record.REVOKED)


def test_withdraw_keeps_a_task_a_worker_started(store: Store) -> None:
    task_id = store.started("k")
    moved = store.run(store.scripts.abandon(task_id, "replicas", withdraw=True))
    assert isinstance(moved, Moved) and moved.record.state == record.STARTED
    assert store.holder("k") == task_id


# -- orphan ------------------------------------------------------------------


def orphan_fields(task_id: str, key: str = "") -> dict[str, str]:
    fields = {"id": task_id, "name": "t", "state": record.LOST, "error_type": "RecordLost"}
    return {**fields, "key": key} if key else fields


def test_orphan_records_a_lost_task_ended_without_touching_its_key(store: Store) -> None:
    holder = store.started("k")
    lost = str(uuid.uuid4())
    changes = store.client.pubsub()
    changes.subscribe(record.events_channel(store.prefix))
    changes.get_message(timeout=1)  # the subscription's confirmation
    written = store.run(store.scripts.orphan(lost, orphan_fields(lost, "k")))
    assert isinstance(written, Changed)
    rec = written.record
    assert (rec.state, rec.exclusivity_key, rec.sequence) == (record.LOST, "k", 1)
    assert rec.error is not None and rec.error.type == "RecordLost" and rec.finished
    assert store.holder("k") == holder  # held by a claim Redis kept
    message = changes.get_message(timeout=1)
    assert message is not None and message["data"].startswith(lost + " ")
    changes.close()
    listed = store.run(
        store.scripts.list_page(record.index_key(store.prefix), after=None, size=10, budget=10)
    )
    assert lost in [r.id for _, r in listed.entries]
    active = record.index_key(store.prefix, active=True)
    assert store.client.zscore(active, lost) is None


def test_orphan_never_overwrites_a_record(store: Store) -> None:
    task_id = store.new("k")
    moved = store.run(store.scripts.orphan(task_id, orphan_fields(task_id)))
    assert isinstance(moved, Moved) and moved.record.state == record.PENDING


# -- start -------------------------------------------------------------------


def test_start_is_idempotent_for_its_own_run_and_refuses_another(store: Store) -> None:
    task_id = store.new()
    call = store.scripts.start(task_id, worker="w", run="r1", lease_ms=LONG, when=1.0)
    assert isinstance(store.run(call), Began)
    sequence = store.rec(task_id).sequence
    assert isinstance(store.run(call), Began)  # a retried write of the same run
    assert store.rec(task_id).sequence == sequence
    other = store.scripts.start(task_id, worker="w2", run="r2", lease_ms=LONG, when=1.0)
    assert store.run(other) == RunningElsewhere("w")


def test_start_of_a_task_whose_running_lease_lapsed_ends_it_lost(store: Store) -> None:
    task_id = store.started(lease_ms=LAPSED)
    other = store.scripts.start(task_id, worker="w2", run="r2", lease_ms=LONG, when=1.0)
    assert store.run(other) == Over(record.LOST)


@pytest.mark.parametrize("end", [record.SUCCESS, record.FAILURE, record.REVOKED, record.LOST])
def test_start_of_an_ended_task_is_refused(store: Store, end: str) -> None:
    task_id = store.started()
    store.run(store.scripts.transition(task_id, record.ACTIVE_STATES, end))
    again = store.scripts.start(task_id, worker="w", run="r9", lease_ms=LONG, when=1.0)
    assert store.run(again) == Over(end)


def test_start_of_a_held_task_whose_lease_lapsed_ends_it_lost(store: Store) -> None:
    task_id = store.new("k")
    store.run(store.scripts.renew([], [task_id], worker="w1", lease_ms=LAPSED))
    call = store.scripts.start(task_id, worker="w1", run="r1", lease_ms=LONG, when=1.0)
    assert store.run(call) == Over(record.LOST)  # never started after its lease lapsed
    assert store.holder("k") == task_id and store.rec(task_id).state == record.LOST


def test_start_of_an_unknown_task_says_missing(store: Store) -> None:
    call = store.scripts.start("nope", worker="w", run="r", lease_ms=LONG, when=1.0)
    assert store.run(call) == Missing()


# -- transition and cancel ---------------------------------------------------


def test_transition_refuses_a_state_it_does_not_allow(store: Store) -> None:
    task_id = store.new()
    rejected = store.run(store.scripts.transition(task_id, {record.STARTED}, "", {"a": "b"}))
    assert rejected == Rejected(record.PENDING)
    assert store.rec(task_id).sequence == 1


def test_an_outcome_ends_the_lease_and_publishes_the_record(store: Store) -> None:
    task_id = store.started()
    pubsub = store.client.pubsub()
    pubsub.subscribe(record.events_channel(store.prefix))
    assert pubsub.get_message(timeout=1) is not None  # subscribed
    store.run(store.scripts.transition(task_id, record.ACTIVE_STATES, record.SUCCESS))
    message = pubsub.get_message(timeout=1)
    pubsub.close()
    assert message is not None
    published_id, _, payload = message["data"].partition(" ")
    assert published_id == task_id
    assert json.loads(payload)["state"] == record.SUCCESS
    assert store.lease(task_id) is None


def test_cancel_ends_a_queued_task_at_once(store: Store) -> None:
    task_id = store.new("k")
    cancelled = store.run(store.scripts.cancel(task_id, "GRACEFUL", when=2.0))
    assert isinstance(cancelled, CancelledQueued) and cancelled.record.state == record.REVOKED


def test_cancel_escalates_and_never_softens(store: Store) -> None:
    task_id = store.started()
    for mode, expected in [
        ("GRACEFUL", "GRACEFUL"),
        ("KILL", "KILL"),
        ("TERMINATE", "KILL"),
        ("GRACEFUL", "KILL"),
    ]:
        requested = store.run(store.scripts.cancel(task_id, mode, when=2.0))
        assert isinstance(requested, CancelRequested) and requested.record.cancel == expected


def test_a_task_whose_cancel_was_requested_ends_cancelled_keeping_its_result(
    store: Store,
) -> None:
    task_id = store.started()
    store.run(store.scripts.cancel(task_id, "GRACEFUL", when=2.0))
    store.run(
        store.scripts.transition(task_id, record.ACTIVE_STATES, record.SUCCESS, {"result": "7"})
    )
    ended = store.rec(task_id)
    assert (ended.state, ended.result) == (record.REVOKED, 7)


def test_cancel_of_a_finished_task_says_ended(store: Store) -> None:
    task_id = store.started()
    store.run(store.scripts.transition(task_id, record.ACTIVE_STATES, record.FAILURE))
    assert isinstance(store.run(store.scripts.cancel(task_id, "KILL", when=2.0)), Finished)


# -- leases: read, renew, release, sweep -------------------------------------


def test_read_ends_a_task_whose_lease_lapsed(store: Store) -> None:
    task_id = store.started(lease_ms=LAPSED)
    read = store.run(store.scripts.read(task_id))
    assert read is not None and read.state == record.LOST
    assert store.run(store.scripts.read("nope")) is None


def test_a_claim_never_confirmed_ends_not_enqueued_when_its_lease_lapses(store: Store) -> None:
    task_id = store.new("k", lease_ms=LAPSED, confirm=False)
    ended = store.run(store.scripts.read(task_id))
    assert ended is not None and ended.state == record.REVOKED
    assert ended.error is not None and ended.error.type == record.NOT_ENQUEUED_ERROR
    assert store.holder("k") is None


def test_renew_covers_only_what_the_worker_runs_or_holds(store: Store) -> None:
    mine = store.started(worker="w1")
    theirs = store.started(worker="w2")
    held = store.new()
    unconfirmed = store.new(confirm=False)
    done = store.started(worker="w1")
    store.run(store.scripts.transition(done, record.ACTIVE_STATES, record.SUCCESS))
    retrying = store.started(worker="w1")
    store.run(store.scripts.transition(retrying, {record.STARTED}, record.PENDING))
    store.run(store.scripts.release([retrying]))
    lost = store.started(worker="w1")
    store.run(store.scripts.transition(lost, record.ACTIVE_STATES, record.LOST))
    held_lost = store.new()
    store.run(store.scripts.transition(held_lost, record.ACTIVE_STATES, record.LOST))
    before = {task_id: store.lease(task_id) for task_id in (theirs, unconfirmed)}
    call = store.scripts.renew(
        [mine, theirs, done, retrying, lost, "gone-1"],
        [held, unconfirmed, held_lost],
        worker="w1",
        lease_ms=LONG * 2,
    )
    renewed = store.run(call)
    # What the worker must stop or drop: no longer its own.
    assert sorted(renewed.gone) == sorted([theirs, lost, held_lost])
    assert renewed.unknown == ["gone-1"]  # not taskservice's (or expired): left alone
    assert store.lease(mine) is not None and store.lease(held) is not None
    assert {t: store.lease(t) for t in before} == before  # not renewed by w1
    assert store.lease(retrying) is None  # back in the broker: no lease
    assert store.lease(done) is None


def test_renew_never_revives_a_lapsed_lease(store: Store) -> None:
    running = store.started(worker="w1", lease_ms=LAPSED)
    held = store.new()
    store.run(store.scripts.renew([], [held], worker="w1", lease_ms=LAPSED))
    call = store.scripts.renew([running], [held], worker="w1", lease_ms=LONG)
    assert sorted(store.run(call).gone) == sorted([running, held])
    assert {store.rec(running).state, store.rec(held).state} == {record.LOST}
    assert store.lease(running) is None and store.lease(held) is None


def test_release_drops_only_the_leases_of_unstarted_tasks(store: Store) -> None:
    held = store.new()
    store.run(store.scripts.renew([], [held], worker="w", lease_ms=LONG))
    running = store.started()
    assert store.run(store.scripts.release([held, running])) == 1
    assert store.lease(held) is None and store.lease(running) is not None


def test_sweep_ends_each_lapsed_task_once(store: Store) -> None:
    lapsed = [store.started("swept", lease_ms=LAPSED)]
    lapsed += [store.started(lease_ms=LAPSED) for _ in range(2)]
    alive = store.started()
    first = store.run(store.scripts.sweep(2))
    assert (first.seen, len(first.expired)) == (2, 2)  # bounded batch
    second = store.run(store.scripts.sweep(100))
    assert (second.seen, len(second.expired)) == (1, 1)
    third = store.run(store.scripts.sweep(100))
    assert (third.seen, third.expired) == (0, [])  # a second sweeper finds nothing
    assert {store.rec(t).state for t in lapsed} == {record.LOST}
    # Each end is reported: id, name, key, state, error type.
    ends = first.expired + second.expired
    assert sorted(end.task_id for end in ends) == sorted(lapsed)
    assert {(end.task_name, end.state, end.error_type) for end in ends} == {
        ("t", record.LOST, record.WORKER_LOST_ERROR)
    }
    assert sorted(end.exclusivity_key for end in ends) == ["", "", "swept"]
    assert store.rec(alive).state == record.STARTED


# -- the broker's unacknowledged messages: unacked, unvouched -----------------


def test_unacked_reads_the_messages_taken_before_the_age_oldest_first_in_bounded_batches(
    store: Store,
) -> None:
    index, messages = f"{store.prefix}:unacked_index", f"{store.prefix}:unacked"
    now = float(store.client.time()[0])
    # As kombu's Redis transport keeps them: tag -> when taken (s), tag -> message.
    taken = {"old-1": now - 100, "old-2": now - 50, "old-3": now - 20, "new": now - 1}
    store.client.zadd(index, taken)
    store.client.hset(messages, mapping={tag: f'[{{"tag": "{tag}"}}, "", "q"]' for tag in taken})
    store.client.hdel(messages, "old-2")  # acknowledged between kombu's two writes
    call = store.scripts.unacked(index, messages, age_ms=10_000, skip=0, limit=2)
    first = store.run(call)
    assert first.seen == 2
    assert first.messages == [("old-1", '[{"tag": "old-1"}, "", "q"]')]
    rest = store.run(store.scripts.unacked(index, messages, age_ms=10_000, skip=2, limit=2))
    assert (rest.seen, [tag for tag, _ in rest.messages]) == (1, ["old-3"])
    # It only reads.
    assert store.client.zcard(index) == 4 and store.client.hlen(messages) == 3


def test_unvouched_names_only_queued_tasks_without_a_lease(store: Store) -> None:
    unleased = store.new()  # confirmed in the broker, taken by no one alive
    publishing = store.new(confirm=False)  # its provisional lease
    held = store.new()
    store.run(store.scripts.renew([], [held], worker="w", lease_ms=LONG))
    lapsed = store.new()
    store.run(store.scripts.renew([], [lapsed], worker="w", lease_ms=LAPSED))  # not swept yet
    running = store.started()
    ended = store.new()
    finish(store, ended)
    ids = [unleased, publishing, held, lapsed, running, ended, "not-taskservice"]
    assert store.run(store.scripts.unvouched(ids)) == [unleased]
    assert store.rec(lapsed).state == record.PENDING  # it only reads


# -- list --------------------------------------------------------------------


def page(store: Store, index: str, after: tuple[str, str] | None = None, **kw: Any) -> Any:
    found = store.run(
        store.scripts.list_page(index, after=after, size=kw.pop("size", 2), budget=100, **kw)
    )
    ids = [rec.id for _, rec in found.entries]
    return found.more, (found.score, found.last_id), ids


def test_list_pages_newest_first_without_repeats(store: Store) -> None:
    made = [store.new() for _ in range(5)]  # several may share a millisecond
    index = record.index_key(store.prefix)
    seen: list[str] = []
    after = None
    for _ in range(10):
        more, after, ids = page(store, index, after)
        seen += ids
        if not more:
            break
    assert sorted(seen) == sorted(made)
    assert len(seen) == len(set(seen))
    created = [store.client.zscore(index, task_id) for task_id in seen]
    assert created == sorted(created, reverse=True)


def test_list_filters_by_state_name_and_key_and_drops_ended_from_active(store: Store) -> None:
    queued = store.new("k1")
    running = store.started("k2")
    ended = store.new()
    assert isinstance(store.run(store.scripts.cancel(ended, "KILL", when=1.0)), CancelledQueued)
    active = record.index_key(store.prefix, active=True)
    _, _, ids = page(store, active, size=10, states={"STARTED"})
    assert ids == [running]
    _, _, ids = page(store, active, size=10)
    assert sorted(ids) == sorted([queued, running])  # the cancelled one left the index
    _, _, ids = page(store, record.index_key(store.prefix, key="k1"), size=10)
    assert ids == [queued]
    _, _, ids = page(store, record.index_key(store.prefix), size=10, name="other")
    assert ids == []


def test_list_looks_at_most_budget_entries_and_prunes_expired_records(store: Store) -> None:
    ids = [store.new() for _ in range(30)]
    for task_id in ids[:25]:  # their records expired
        store.client.delete(record.task_key(store.prefix, task_id))
    index = record.index_key(store.prefix)
    call = store.scripts.list_page(index, after=None, size=50, budget=10)
    found = store.run(call)
    assert found.more and len(found.entries) <= 10  # stopped at the budget
    assert store.client.zcard(index) < 30  # what it met without a record is gone
    while found.more:
        found = store.run(call)
    assert store.client.zcard(index) == 5


# -- the scripts themselves --------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_script_loads_into_a_real_redis_under_its_sha(store: Store, name: str) -> None:
    loaded = script(name)
    assert store.client.script_load(loaded.source) == loaded.sha


def test_every_lua_file_is_a_script() -> None:
    folder = Path(scripts_module.__file__).parent / "lua"
    files = {path.stem for path in folder.glob("*.lua")}
    assert files == {*NAMES, "prelude"}


def test_a_changed_transition_reports_the_record_it_wrote(store: Store) -> None:
    task_id = store.started("k")
    changed = store.run(
        store.scripts.transition(task_id, {record.STARTED}, "", {"progress": '{"current": 1}'})
    )
    assert isinstance(changed, Changed)
    assert changed.record.id == task_id and changed.record.exclusivity_key == "k"
    assert changed.record.sequence == store.rec(task_id).sequence


def _waiting(store: Store, key: str, policy: str, *, message: str = "") -> tuple[str, Any]:
    """A Start under `policy` on `key`: its id and the claim's answer. With
    `message`, its message is one the scripts push (on list `<prefix>:q`)."""
    task_id = str(uuid.uuid4())
    fields = record.new_record_fields(task_id, "t", exclusivity_key=key, queue="q", scheduled=None)
    push = (f"{store.prefix}:q", message) if message else None
    answer = store.run(
        store.scripts.claim(
            fields,
            exclusivity_key=key,
            provisional_ms=LONG,
            push=push,
            policy=policy,
            line_limit=2,
            delivery="" if message else '{"kept": true}',
        )
    )
    return task_id, answer


def test_a_lapsed_holder_hands_its_key_to_the_waiting_task_in_the_sweep_itself(
    store: Store,
) -> None:
    holder = store.started("k", lease_ms=LONG)
    waiter, answer = _waiting(store, "k", "QUEUE_LATEST", message="waiter's message")
    assert isinstance(answer, Deferred) and answer.waiting_for == holder
    assert store.client.llen(f"{store.prefix}:q") == 0, "sent while it waits"
    store.client.zadd(record.leases_key(store.prefix), {holder: 0})  # its worker died
    swept = store.run(store.scripts.sweep(10))
    assert [e.task_id for e in swept.expired] == [holder]
    assert store.client.lrange(f"{store.prefix}:q", 0, -1) == ["waiter's message"]
    handed = store.rec(waiter)
    assert handed.waiting_for == "" and handed.fencing_token > store.rec(holder).fencing_token
    assert store.client.get(record.holder_key(store.prefix, "k")) == waiter


def test_an_abandoned_start_hands_the_key_to_the_waiting_task(store: Store) -> None:
    holder = store.new("k", confirm=False)  # its publish is under way
    waiter, _ = _waiting(store, "k", "QUEUE", message="m")
    assert isinstance(store.run(store.scripts.abandon(holder, "broker down")), Abandoned)
    assert store.client.lrange(f"{store.prefix}:q", 0, -1) == ["m"]
    assert store.rec(waiter).waiting_for == ""


def test_superseded_and_cancelled_waiting_tasks_leave_the_line_and_never_send(
    store: Store,
) -> None:
    holder = store.started("k")
    first, _ = _waiting(store, "k", "QUEUE", message="first")
    second, answer = _waiting(store, "k", "QUEUE_LATEST", message="second")
    assert isinstance(answer, Deferred) and answer.superseded == (first,)
    superseded = store.rec(first)
    assert superseded.state == record.REVOKED and superseded.error is not None
    assert superseded.error.type == "Superseded" and second in superseded.error.message
    assert isinstance(store.run(store.scripts.cancel(second, "KILL", when=1.0)), CancelledQueued)
    store.run(store.scripts.transition(holder, ["STARTED"], "SUCCESS", {"finished": "2"}))
    assert store.client.llen(f"{store.prefix}:q") == 0
    assert store.client.exists(record.holder_key(store.prefix, "k").replace(":key:", ":line:")) == 0


def test_queue_refuses_past_its_line_limit(store: Store) -> None:
    store.started("k")
    for _ in range(2):
        assert isinstance(_waiting(store, "k", "QUEUE")[1], Deferred)
    assert _waiting(store, "k", "QUEUE")[1] == LineFull(2)


def test_a_holder_claimed_before_slots_existed_still_holds_its_key(store: Store) -> None:
    # Only the holder string names it, as a claim of an earlier version left it.
    holder = store.started("k")
    store.client.delete(record.holder_key(store.prefix, "k").replace(":key:", ":holders:"))
    _, answer = _waiting(store, "k", "REJECT")
    assert isinstance(answer, Held) and answer.holder.id == holder


def test_a_due_task_is_handed_out_again_until_sent(store: Store) -> None:
    task_id = str(uuid.uuid4())
    fields = record.new_record_fields(task_id, "t", exclusivity_key="", queue="q", scheduled=None)
    claim = store.scripts.claim(
        fields, exclusivity_key="", provisional_ms=LONG, delivery='{"d": 1}', delay_ms=1
    )
    assert isinstance(store.run(claim), Deferred)
    time.sleep(0.01)
    assert store.run(store.scripts.due(10, retry_ms=LAPSED)).deliveries == [(task_id, '{"d": 1}')]
    # Not sent (the server stopped): handed out again.
    assert store.run(store.scripts.due(10, retry_ms=LONG)).deliveries == [(task_id, '{"d": 1}')]
    assert store.run(store.scripts.due(10, retry_ms=LONG)).deliveries == []
    store.run(store.scripts.sent(task_id))
    assert store.client.zcard(record.due_key(store.prefix)) == 0


def test_the_quiet_period_follows_only_a_task_that_ran(store: Store) -> None:
    def quiet_claim() -> tuple[str, Any]:
        task_id = str(uuid.uuid4())
        fields = record.new_record_fields(
            task_id, "t", exclusivity_key="k", queue="q", scheduled=None
        )
        fields["quiet"] = "60000"
        return task_id, store.run(
            store.scripts.claim(
                fields, exclusivity_key="k", provisional_ms=LONG, push=(f"{store.prefix}:q", "m")
            )
        )

    queued, _ = quiet_claim()
    store.run(store.scripts.cancel(queued, "KILL", when=1.0))
    ran, answer = quiet_claim()
    assert isinstance(answer, Claimed), "a task cancelled while queued leaves no quiet period"
    store.run(store.scripts.start(ran, worker="w", run="r", lease_ms=LONG, when=1.0))
    store.run(store.scripts.transition(ran, ["STARTED"], "FAILURE", {"finished": "2"}))
    _, refused = quiet_claim()
    assert isinstance(refused, Quiet) and refused.last is not None and refused.last.id == ran
    assert 59 < refused.free_in <= 60
