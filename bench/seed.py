"""The seed: the FastAPI + Celery HTTP service taskservice replaces, as a team
typically writes one, for bench/run.py to measure beside taskservice.

    uvicorn bench.seed:app --host 127.0.0.1 --port 8000

One uvicorn worker process (uvicorn[standard]: uvloop and httptools), its
defaults otherwise. Plain `def` endpoints, which FastAPI runs in its thread
pool, since redis-py and Celery block. The Celery app is the bench's plain
baseline (bench/plain.py: taskservice's Celery settings, no hooks), so the
messages go to the same Redis broker the taskservice scenarios use.

- POST /tasks/{name}, body {"args": [...], "kwargs": {...}, "exclusivity_key":
  optional}: with a key, takes the key's lock (`SET lock task-id NX EX ttl`,
  the value being the task holding it), then `apply_async` with that id.
  201 {"task_id": ...}; 409 {"detail": {"message": ..., "task_id": holder}}
  while the key is held. The lock lapses after LOCK_TTL (what a seed like
  this does when a task never releases it).
- GET /tasks/{task_id}: `AsyncResult(task_id).state`, and the result (or the
  error) once the task has ended.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import redis
from celery.result import AsyncResult
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from bench.plain import app as celery_app
from bench.plain import noop

LOCK_TTL = 3600
"""Seconds a key stays locked: longer than any task is expected to run."""

TASKS = {noop.name: noop}
"""The tasks a client may start, by name."""

locks = redis.Redis.from_url(os.environ["TASKSERVICE_REDIS_URL"], decode_responses=True)
app = FastAPI(title="tasks")


class StartTask(BaseModel):
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    exclusivity_key: str | None = None


class Started(BaseModel):
    task_id: str


class TaskStatus(BaseModel):
    task_id: str
    state: str
    result: Any = None
    error: str | None = None


@app.post("/tasks/{name}", status_code=201)
def start_task(name: str, body: StartTask) -> Started:
    task = TASKS.get(name)
    if task is None:
        raise HTTPException(status_code=404, detail=f"no task named {name!r}")
    task_id = str(uuid.uuid4())
    lock = f"seed:lock:{body.exclusivity_key}" if body.exclusivity_key is not None else None
    if lock is not None and not locks.set(lock, task_id, nx=True, ex=LOCK_TTL):
        raise HTTPException(
            status_code=409,
            detail={"message": "a task already runs for this key", "task_id": locks.get(lock)},
        )
    try:
        task.apply_async(args=tuple(body.args), kwargs=body.kwargs, task_id=task_id)
    except Exception:
        if lock is not None:  # not sent: free the key for the next try
            locks.delete(lock)
        raise
    return Started(task_id=task_id)


@app.get("/tasks/{task_id}")
def task_status(task_id: str) -> TaskStatus:
    result: AsyncResult[Any] = AsyncResult(task_id, app=celery_app)
    status = TaskStatus(task_id=task_id, state=result.state)
    if status.state == "SUCCESS":
        status.result = result.result
    elif status.state == "FAILURE":
        status.error = repr(result.result)
    return status
