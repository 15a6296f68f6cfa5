"""A task of another Celery app than the one taskservice sends to: it must
be refused at startup, never accepted and left QUEUED."""

from __future__ import annotations

from celery import Celery

from taskservice import expose

other = Celery("other", set_as_current=False)


@expose()
@other.task(name="other.add")
def add(a: int, b: int) -> int:
    return a + b
