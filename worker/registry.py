"""The registry of task types that may be started over gRPC.

Celery registers every task it knows (its own `celery.*` tasks included);
taskservice starts only the tasks a module marked with `expose`.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Task

EXCLUSIVITY_KEY_PATTERN = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")

T = TypeVar("T", bound=Task)  # type: ignore[type-arg]


@dataclass(frozen=True, slots=True)
class TaskType:
    """A task that may be started, with what a caller needs to start it."""

    name: str
    module: str
    task: Task  # type: ignore[type-arg]
    signature: inspect.Signature
    description: str
    default_exclusivity_key: str

    def bind(self, args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise TypeError, naming the problem, if the arguments do not fit."""
        self.signature.bind(*args, **kwargs)


class TaskRegistry:
    """The exposed task types, by name."""

    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}
        self._modules: frozenset[str] | None = None

    def expose(self, *, exclusivity_key: str = "") -> Callable[[T], T]:
        """Mark a Celery task as startable over gRPC.

        `exclusivity_key` is the key a Start uses when the caller gives none:
        tasks sharing it run one at a time. Empty means no exclusivity unless
        the caller asks for it.
        """
        if exclusivity_key and not EXCLUSIVITY_KEY_PATTERN.fullmatch(exclusivity_key):
            raise ValueError(f"invalid exclusivity key {exclusivity_key!r}")

        def register(task: T) -> T:
            name = task.name
            if name is None or name.startswith("celery."):
                raise ValueError(f"cannot expose task {name!r}")
            # For bind=True tasks `run` is already bound, so `self` is not
            # among the parameters callers must pass.
            signature = inspect.signature(task.run)
            self._types[name] = TaskType(
                name=name,
                module=task.run.__module__,
                task=task,
                signature=signature,
                description=inspect.cleandoc(task.run.__doc__ or ""),
                default_exclusivity_key=exclusivity_key,
            )
            return task

        return register

    def get(self, name: str) -> TaskType | None:
        task_type = self._types.get(name)
        if task_type is None or not self._allowed(task_type):
            return None
        return task_type

    def types(self) -> list[TaskType]:
        return [t for name, t in sorted(self._types.items()) if self._allowed(t)]

    def load(self, modules: Iterable[str]) -> None:
        """Import the modules that expose tasks, and from then on offer only
        their tasks (a module imported for another reason exposes nothing)."""
        modules = tuple(modules)
        for module in modules:
            importlib.import_module(module)
        self._modules = frozenset(modules)

    def _allowed(self, task_type: TaskType) -> bool:
        return self._modules is None or task_type.module in self._modules
