"""ListTasks: newest first, filtered, paged with tokens tied to their filters."""

from __future__ import annotations

import base64
import json

import grpc
import pytest

from taskservice._proto.taskservice.v1 import task_service_pb2 as pb
from taskservice._proto.taskservice.v1 import task_service_pb2_grpc as pb_grpc
from tests.support.client import finished, start, violations, wait_until


async def listing(stub: pb_grpc.TaskServiceStub, **request: object) -> list[list[str]]:
    """The ids of every page, following the tokens to the end."""
    pages: list[list[str]] = []
    token = ""
    while True:
        answer = await stub.ListTasks(pb.ListTasksRequest(page_token=token, **request))
        pages.append([task.id for task in answer.tasks])
        token = answer.next_page_token
        if not token:
            return pages
        assert len(pages) < 20


async def test_tasks_under_a_key_come_newest_first_in_pages(
    stub: pb_grpc.TaskServiceStub, key: str
) -> None:
    ids = []
    for number in range(5):
        task = await start(stub, "test.echo", number, key=key)
        await finished(stub, task.id)
        ids.append(task.id)
    pages = await listing(stub, exclusivity_key=key, page_size=2)
    assert pages[:3] == [ids[4:2:-1], ids[2:0:-1], ids[:1]]
    assert all(page == [] for page in pages[3:])
    answer = await stub.ListTasks(pb.ListTasksRequest(exclusivity_key=key))
    assert [t.state for t in answer.tasks] == [pb.TASK_STATE_SUCCEEDED] * 5
    assert answer.tasks[0].result.number_value == 4


async def test_what_runs_now_is_listed_by_state(stub: pb_grpc.TaskServiceStub, key: str) -> None:
    task = await start(stub, "test.sleep", 30, key=key)
    try:
        await wait_until(stub, task.id, lambda t: t.state == pb.TASK_STATE_RUNNING)
        running = await listing(stub, states=[pb.TASK_STATE_RUNNING], page_size=500)
        assert any(task.id in page for page in running)
        mine = await stub.ListTasks(
            pb.ListTasksRequest(task_name="test.sleep", exclusivity_key=key)
        )
        assert [(t.id, t.state) for t in mine.tasks] == [(task.id, pb.TASK_STATE_RUNNING)]
        done = await stub.ListTasks(
            pb.ListTasksRequest(exclusivity_key=key, states=[pb.TASK_STATE_SUCCEEDED])
        )
        assert list(done.tasks) == []
    finally:
        await stub.Cancel(pb.CancelRequest(task_id=task.id))
    cancelled = await stub.ListTasks(
        pb.ListTasksRequest(exclusivity_key=key, states=[pb.TASK_STATE_CANCELLED])
    )
    assert [t.id for t in cancelled.tasks] == [task.id]
    assert await listing(stub, exclusivity_key=key, task_name="test.echo") == [[]]


async def test_a_listed_failure_carries_no_traceback(
    stub: pb_grpc.TaskServiceStub, key: str
) -> None:
    task = await start(stub, "demo.fail", "listed", key=key)
    assert (await finished(stub, task.id)).error.traceback
    (listed,) = (await stub.ListTasks(pb.ListTasksRequest(exclusivity_key=key))).tasks
    assert (listed.error.type, listed.error.message) == ("ValueError", "listed")
    assert listed.error.traceback == ""


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_size": -1}, "page_size"),
        ({"page_token": "not-a-token"}, "page_token"),
        ({"states": [pb.TASK_STATE_UNSPECIFIED]}, "states"),
        ({"exclusivity_key": "no spaces"}, "exclusivity_key"),
    ],
)
async def test_bad_listing_requests_are_invalid(
    stub: pb_grpc.TaskServiceStub, request_fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.ListTasks(pb.ListTasksRequest(**request_fields))  # type: ignore[arg-type]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (error.value.details() or "")


async def test_a_page_token_only_continues_its_own_filter(
    stub: pb_grpc.TaskServiceStub, key: str
) -> None:
    for _ in range(2):
        await finished(stub, (await start(stub, "test.echo", 1, key=key)).id)
    first = await stub.ListTasks(pb.ListTasksRequest(exclusivity_key=key, page_size=1))
    assert first.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.ListTasks(
            pb.ListTasksRequest(page_token=first.next_page_token, task_name="test.echo")
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "other filters" in (error.value.details() or "")


def tampered(token: str, score: str) -> str:
    """`token` (as page_tokens writes it) with its score replaced, and nothing else."""

    def encoded(parts: list[str]) -> str:
        text = json.dumps(parts, separators=(",", ":"))
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    parts = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    assert encoded(parts) == token  # so the only difference is the score
    return encoded([score, *parts[1:]])


async def test_page_tokens_the_server_never_wrote_are_invalid_not_internal(
    stub: pb_grpc.TaskServiceStub, key: str
) -> None:
    for _ in range(2):
        await finished(stub, (await start(stub, "test.echo", 1, key=key)).id)
    first = await stub.ListTasks(pb.ListTasksRequest(exclusivity_key=key, page_size=1))
    assert first.next_page_token
    tokens = {
        # json.loads of this raised RecursionError: INTERNAL.
        "nested": base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode(),
        # float() takes these; Redis then refused them: INTERNAL.
        **{score: tampered(first.next_page_token, score) for score in ("nan", "NaN", "1_000")},
        "spaces": tampered(first.next_page_token, " 1 "),
    }
    for label, token in tokens.items():
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.ListTasks(pb.ListTasksRequest(exclusivity_key=key, page_token=token))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        assert violations(error.value) == {"page_token": "not a token ListTasks returned"}
    # The untouched token still continues.
    second = await stub.ListTasks(
        pb.ListTasksRequest(exclusivity_key=key, page_size=1, page_token=first.next_page_token)
    )
    assert len(second.tasks) == 1 and second.tasks[0].id != first.tasks[0].id
