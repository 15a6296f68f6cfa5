"""WatchStatus: snapshot first, every change in order, ends after terminal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import redis.asyncio

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from taskservice.core.scripts import Scripts
from taskservice.core.settings import Settings
from taskservice.server.server import Server, events_client_name
from tests.support.client import TERMINAL, error_info, finished, start, watch_all


async def test_watch_delivers_every_change_in_order_and_ends(stub: pb_grpc.TaskServiceStub) -> None:
    task = await start(stub, "demo.progress", steps=4, seconds_per_step=0.05)
    messages = await watch_all(stub, task.id)
    sequences = [m.sequence for m in messages]
    assert sequences == list(range(sequences[0], sequences[0] + len(messages))), sequences
    # Nothing was skipped after the snapshot: created (1), started (2),
    # four progress reports, finished: 7 changes in all.
    assert sequences[-1] == 7
    states = [m.state for m in messages]
    assert states[-1] == pb.TASK_STATE_SUCCEEDED
    assert all(s not in TERMINAL for s in states[:-1])
    progress = [m.progress.current for m in messages if m.HasField("progress")]
    assert progress == sorted(progress) and progress[-1] == 4
    assert messages[-1].result.struct_value.fields["steps"].number_value == 4


async def test_watch_from_creation_sees_queued_then_running(stub: pb_grpc.TaskServiceStub) -> None:
    task = await start(stub, "test.sleep", seconds=0.3)
    messages = await watch_all(stub, task.id)
    states = [m.state for m in messages]
    if messages[0].sequence == 1:
        assert states == [pb.TASK_STATE_QUEUED, pb.TASK_STATE_RUNNING, pb.TASK_STATE_SUCCEEDED]
    else:
        assert states == [pb.TASK_STATE_RUNNING, pb.TASK_STATE_SUCCEEDED]


async def test_watch_of_a_finished_task_gives_one_message(stub: pb_grpc.TaskServiceStub) -> None:
    task = await start(stub, "test.echo", "x")
    done = await finished(stub, task.id)
    messages = await watch_all(stub, task.id)
    assert messages == [done]


async def test_watch_by_key(stub: pb_grpc.TaskServiceStub, key: str) -> None:
    task = await start(stub, "test.echo", "k", key=key)
    call = stub.WatchStatus(pb.WatchStatusRequest(exclusivity_key=key))
    messages = [m.task async for m in call]
    assert {m.id for m in messages} == {task.id}
    assert messages[-1].state == pb.TASK_STATE_SUCCEEDED


async def test_many_watchers_all_see_the_same_sequence(
    stub: pb_grpc.TaskServiceStub, server: Server
) -> None:
    task = await start(stub, "demo.progress", steps=3, seconds_per_step=0.1)
    results = await asyncio.gather(*(watch_all(stub, task.id) for _ in range(20)))
    ends = {r[-1].sequence for r in results}
    assert ends == {6}
    for messages in results:
        assert [m.sequence for m in messages] == list(range(messages[0].sequence, 7))
    await asyncio.sleep(0.1)
    assert server.operations.hub.watcher_count == 0  # every stream cleaned up


async def test_a_dropped_watcher_leaves_nothing_behind(
    stub: pb_grpc.TaskServiceStub, server: Server
) -> None:
    task = await start(stub, "test.sleep", seconds=1)
    call = stub.WatchStatus(pb.WatchStatusRequest(task_id=task.id))
    await call.read()
    assert server.operations.hub.watcher_count >= 1
    call.cancel()
    for _ in range(100):
        if server.operations.hub.watcher_count == 0:
            break
        await asyncio.sleep(0.02)
    assert server.operations.hub.watcher_count == 0
    await finished(stub, task.id)


async def test_watch_unknown_task_or_key_is_not_found(stub: pb_grpc.TaskServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch_all(stub, "00000000-0000-4000-8000-000000000000")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchStatus(pb.WatchStatusRequest(exclusivity_key="never-used-key")):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "KEY_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.WatchStatus(pb.WatchStatusRequest()):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_retried_task_goes_back_to_queued_then_runs_again(
    stub: pb_grpc.TaskServiceStub, tmp_path: Path
) -> None:
    task = await start(stub, "test.retry_once", str(tmp_path / "marker"))
    messages = await watch_all(stub, task.id)
    expected = {
        1: pb.TASK_STATE_QUEUED,
        2: pb.TASK_STATE_RUNNING,
        3: pb.TASK_STATE_QUEUED,  # the retry sends it back to the queue
        4: pb.TASK_STATE_RUNNING,
        5: pb.TASK_STATE_SUCCEEDED,
    }
    assert [m.sequence for m in messages] == list(range(messages[0].sequence, 6))
    assert [m.state for m in messages] == [expected[m.sequence] for m in messages]
    assert messages[-1].result.string_value == "second try"


async def test_a_watch_hears_a_change_made_while_its_server_was_not_subscribed(
    stub: pb_grpc.TaskServiceStub, settings: Settings
) -> None:
    task = await start(stub, "test.sleep", 4)
    call = stub.WatchStatus(pb.WatchStatusRequest(task_id=task.id))
    while (await call.read()).task.state != pb.TASK_STATE_RUNNING:
        pass
    client = redis.asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        # Drop the server's subscription, then change the task at once: the
        # change is published while nobody listens.
        for entry in await client.client_list():
            if entry["name"] == events_client_name(settings):
                await client.client_kill_filter(_id=entry["id"])
        change = Scripts(settings.key_prefix, settings.record_ttl).transition(
            task.id, {"STARTED"}, "", {"progress": '{"message": "during the gap"}'}
        )
        await client.register_script(change.script.source)(keys=change.keys, args=change.args)
    finally:
        await client.aclose()
    # The server resubscribes and re-reads the task: the change arrives now,
    # not only with the task's end.
    seen = await asyncio.wait_for(call.read(), 2)
    assert seen.task.state == pb.TASK_STATE_RUNNING
    assert seen.task.progress.message == "during the gap"
    call.cancel()


async def test_a_dropped_watch_resumes_from_its_last_sequence_without_gaps_or_repeats(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    task = await start(stub, "test.flood", 12, pause=0.05)
    first = stub.WatchStatus(pb.WatchStatusRequest(task_id=task.id))
    seen = []
    async for message in first:
        seen.append(message.task)
        if message.task.sequence >= 5:
            break
    first.cancel()
    await asyncio.sleep(0.2)  # changes happen while nobody watches
    resumed = stub.WatchStatus(
        pb.WatchStatusRequest(task_id=task.id, after_sequence=seen[-1].sequence)
    )
    seen += [m.task async for m in resumed]
    sequences = [t.sequence for t in seen]
    assert sequences == list(range(sequences[0], sequences[-1] + 1)), sequences
    assert seen[-1].state == pb.TASK_STATE_SUCCEEDED
    # Resuming after the end yields nothing; the stream just ends.
    again = stub.WatchStatus(
        pb.WatchStatusRequest(task_id=task.id, after_sequence=seen[-1].sequence)
    )
    assert [m async for m in again] == []


async def test_a_watch_resumed_from_changes_no_longer_kept_gets_the_current_state(
    stub: pb_grpc.TaskServiceStub,
) -> None:
    task = await start(stub, "test.flood", 400)
    done = await finished(stub, task.id)
    resumed = [
        m.task
        async for m in stub.WatchStatus(pb.WatchStatusRequest(task_id=task.id, after_sequence=2))
    ]
    assert resumed == [done]
