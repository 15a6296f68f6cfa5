"""Imported as a task module, it makes the worker's consumer fail at start:
an "Unrecoverable error", as kombu's reconnect crash once was."""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from taskservice.worker.app import app


class Crash(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        raise RuntimeError("crashing on purpose")


app.steps["consumer"].add(Crash)
