"""The registry of task types that may be started over gRPC.

Celery registers every task it knows (its own `celery.*` tasks included);
taskservice starts only the tasks a module marked with `expose`
(taskservice.worker.app), which adds them to `EXPOSED`. Celery-free: a task is
read through what every Celery task has (`name`, `run`, `app`).
"""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

from taskservice.core.states import CancelMode

EXCLUSIVITY_KEY_PATTERN = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")


class NotTrackable(Exception):
    """An exposed task taskservice could start but not follow: refused at
    startup, so that no Start of it is ever accepted."""


class ArgumentsInvalid(ValueError):
    """Arguments that do not fit a task type; `violations` are (field, why)
    pairs, fields named like `args[0]` or `kwargs.seconds`."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {why}" for field, why in violations))
        self.violations = violations


@dataclass(frozen=True, slots=True)
class KeyRules:
    """What a task type declares about its exclusivity keys (`expose`)."""

    slots: int = 0
    """Tasks of the type that may run at once under one key; 0: the server's
    TASKSERVICE_KEY_SLOTS for the key (1 unless set)."""
    line_limit: int = 0
    """The longest line waiting for a key (QUEUE); 0: TASKSERVICE_KEY_LINE_LIMIT."""
    quiet_period: float = 0.0
    """Seconds a key refuses Starts after a task of the type ended (0: none)."""
    quiet_after_success: bool = False
    """The quiet period follows only a task that succeeded."""
    replace_mode: CancelMode = CancelMode.TERMINATE
    """How REPLACE cancels a running task of the type when the Start names no mode."""

    def __post_init__(self) -> None:
        if self.slots < 0 or self.line_limit < 0:
            raise ValueError("key_slots and key_line_limit must not be negative")
        if not 0 <= self.quiet_period < 10**9:
            raise ValueError(
                f"quiet_period must be a non-negative number of seconds, not {self.quiet_period!r}"
            )
        if self.replace_mode is CancelMode.UNSPECIFIED:
            raise ValueError("replace_mode must be GRACEFUL, TERMINATE or KILL")


@dataclass(frozen=True, slots=True)
class TaskType:
    """A task that may be started, with what a caller needs to start it."""

    name: str
    module: str
    task: Any
    """The Celery task."""
    signature: inspect.Signature
    description: str
    default_exclusivity_key: str
    validators: Mapping[str, TypeAdapter[Any]] = field(default_factory=dict)
    """Per annotated parameter, what checks (and converts) its JSON value."""
    key_rules: KeyRules = KeyRules()

    def check(self, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """The arguments as the task should receive them, converted to its
        annotations (`"10"` for a float becomes 10.0); ArgumentsInvalid naming
        each parameter that does not fit."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise ArgumentsInvalid([(_bind_field(str(error)), _cut(str(error)))]) from None
        violations: list[tuple[str, str]] = []
        checked_args: list[Any] = []
        checked_kwargs: dict[str, Any] = {}
        position = 0
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                for item in value:
                    checked_args.append(self._convert(name, item, f"args[{position}]", violations))
                    position += 1
            elif kind is inspect.Parameter.VAR_KEYWORD:
                for key, item in value.items():
                    where = f"kwargs.{_cut(key, 60)}"
                    checked_kwargs[key] = self._convert(name, item, where, violations)
            elif name in kwargs:
                where = f"kwargs.{name}"
                checked_kwargs[name] = self._convert(name, value, where, violations)
            else:
                checked_args.append(self._convert(name, value, f"args[{position}]", violations))
                position += 1
        if violations:
            raise ArgumentsInvalid(violations)
        return checked_args, checked_kwargs

    def _convert(self, name: str, value: Any, where: str, violations: list[tuple[str, str]]) -> Any:
        validator = self.validators.get(name)
        if validator is None:
            return value
        try:
            return validator.dump_python(validator.validate_python(value), mode="json")
        except ValidationError as error:
            detail = error.errors()[0]
            inside = "".join(f"[{p!r}]" for p in detail["loc"])
            annotation = annotation_text(self.signature.parameters[name].annotation)
            violations.append((where + inside, f"{detail['msg']} (annotation: {annotation})"))
            return value


_NAMED = re.compile(r"argument:? '([^']{1,60})'")


def _bind_field(message: str) -> str:
    """The field a binding error is about: `kwargs.<name>` for an unexpected
    keyword or a missing argument, else `args` (too many positionals)."""
    named = _NAMED.search(message)
    return f"kwargs.{named.group(1)}" if named else "args"


def _cut(text: str, limit: int = 300) -> str:
    """Never echo unbounded input back in an error."""
    return text if len(text) <= limit else text[:limit] + "..."


def annotation_text(annotation: Any) -> str:
    """An annotation as written in the source, e.g. "float" or
    "dict[str, int]", never quoted; "" if none."""
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):
        # What `from __future__ import annotations` leaves: the source text.
        return annotation
    return inspect.formatannotation(annotation)


def signature_text(signature: inspect.Signature) -> str:
    """`signature` as Python prints it, but with annotations as
    `annotation_text` gives them: `(name: str = 'Bob') -> str`, where
    str(signature) would quote string annotations (`name: 'str'`)."""

    def shown(annotation: Any) -> Any:
        if annotation is inspect.Parameter.empty:
            return annotation
        return _Shown(annotation_text(annotation))

    parameters = [p.replace(annotation=shown(p.annotation)) for p in signature.parameters.values()]
    return str(
        signature.replace(
            parameters=parameters, return_annotation=shown(signature.return_annotation)
        )
    )


class _Shown:
    """An annotation that inspect prints as the text it holds."""

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text


def _validators(function: Callable[..., Any], signature: inspect.Signature) -> dict[str, Any]:
    """A pydantic validator per parameter whose annotation pydantic can check
    (a class it cannot, or a name it cannot resolve, is taken as it comes)."""
    try:
        hints = typing.get_type_hints(function)
    except Exception:
        hints = {}
    validators: dict[str, Any] = {}
    for name in signature.parameters:
        if name not in hints:
            continue
        try:
            validators[name] = TypeAdapter(hints[name])
        except PydanticSchemaGenerationError:
            continue
    return validators


class TaskRegistry:
    """The exposed task types, by name."""

    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}
        self._modules: frozenset[str] | None = None

    def add(
        self, task: Any, *, exclusivity_key: str = "", key_rules: KeyRules = KeyRules()
    ) -> None:
        """Make Celery task `task` startable; `exclusivity_key` is the key a
        Start uses when the caller gives none (empty: none)."""
        check_default_key(exclusivity_key)
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
            validators=_validators(task.run, signature),
            key_rules=key_rules,
        )

    def get(self, name: str) -> TaskType | None:
        """The task type named `name`, if it is exposed by a loaded module."""
        task_type = self._types.get(name)
        if task_type is None or not self._allowed(task_type):
            return None
        return task_type

    def types(self) -> list[TaskType]:
        """Every task type that may be started, by name."""
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


def check_default_key(exclusivity_key: str) -> None:
    """ValueError unless `exclusivity_key` is empty or a valid key."""
    if exclusivity_key and not EXCLUSIVITY_KEY_PATTERN.fullmatch(exclusivity_key):
        raise ValueError(f"invalid exclusivity key {exclusivity_key!r}")


EXPOSED = TaskRegistry()
"""The task types `expose` marked in this process."""
