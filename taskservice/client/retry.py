"""When and how long the clients retry a failed call: the policy, the errors
worth another attempt, and the schedule of one call's attempts. No I/O here:
`Client` sleeps with `time.sleep`, `AsyncClient` with `asyncio.sleep`, both
by what these objects say."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from taskservice.core.errors import (
    PublishBacklog,
    RedisPoolExhausted,
    TaskServiceError,
    Unavailable,
)

BACKLOGS = (PublishBacklog, RedisPoolExhausted)
"""The RESOURCE_EXHAUSTED errors that say "busy, try again shortly": a queue
of this server's own that drains within moments (Starts waiting for the
broker, calls waiting for a Redis connection). The others are no backlog:
KeyLineFull waits for tasks to end (minutes, maybe hours), RedisOutOfMemory
for records to expire or an operator, and one without our reason (a message
over gRPC's size limits, say) is the same every time: retrying any of them
only adds load."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a client retries a call that failed in a way another attempt can
    mend: UNAVAILABLE (a server restarting or draining, a connection cut,
    Redis or the broker unreachable for a moment) and the RESOURCE_EXHAUSTED
    backlogs (`PublishBacklog`, `RedisPoolExhausted`), never anything else.

    The n-th retry waits a random time between 0 and
    min(`max_backoff`, `initial_backoff` * `multiplier` ** (n - 1)) seconds
    ("full jitter"); all of one call's attempts, waits included, fit in
    `deadline` seconds, which also bounds each attempt's own gRPC timeout (the
    time left, or the client's `timeout` if that is less). A watch re-opens a
    dropped stream for up to `deadline` seconds from the drop; each change it
    receives starts that count afresh.

    Start and Cancel are retried with one request_id for every attempt (the
    client makes one when the caller gives none), so the server answers a
    repeat as it answered the first. Reads are retried as they are, and so is
    CancelTasks when it is to cancel every match (`cancel_all` without a
    limit): a repeat finds the tasks a lost answer ended no longer active,
    so every match still ends. A bounded CancelTasks (`cancel_tasks`, a
    `limit`) is made once: a repeat could cancel a page more than asked.
    """

    initial_backoff: float = 0.1
    """Seconds: the most the first retry waits."""
    max_backoff: float = 5.0
    """Seconds: the most any retry waits."""
    multiplier: float = 2.0
    """How much the longest wait grows from one retry to the next."""
    deadline: float = 30.0
    """Seconds all of one call's attempts may take together."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError(
                f"need 0 < initial_backoff <= max_backoff, not {self.initial_backoff} "
                f"and {self.max_backoff}"
            )
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier must be at least 1, not {self.multiplier}")
        if not self.deadline > 0:
            raise ValueError(f"deadline must be positive, not {self.deadline}")

    def backoffs(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits before the first, second, ... retry (endless), drawn
        from `rng` (default: the module's own generator)."""
        draw = (rng or _RANDOM).uniform
        ceiling = self.initial_backoff
        while True:
            # Full jitter, as gRPC's own retries (gRFC A6) and AWS's "Exponential
            # Backoff And Jitter" have it: clients that failed together (every
            # client of a server that restarts) spread their retries over the
            # whole window instead of coming back in a wave; AWS measured the
            # fewest calls and the soonest completion with it. Equal jitter
            # keeps half of each wait fixed, so the waves stay half as tall.
            yield draw(0, ceiling)
            ceiling = min(self.max_backoff, ceiling * self.multiplier)

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC channel options that make a channel try to reconnect on the
        policy's schedule. By default a channel that lost its server waits
        1 s, then 1.6 times longer each time, up to 120 s, before it tries to
        connect again, and an attempt made meanwhile fails at once: a server
        back after 10 s would be reached only after some 16 s."""
        return [
            ("grpc.initial_reconnect_backoff_ms", max(1, round(self.initial_backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, round(self.max_backoff * 1000))),
        ]


_RANDOM = random.Random()


def retryable(error: TaskServiceError) -> bool:
    """Whether another attempt may succeed where this one failed: UNAVAILABLE
    (any reason) or a backlog; not when the client's hint explains the
    failure (a TLS mismatch fails the same way every time)."""
    if error.hint:
        return False
    return isinstance(error, (Unavailable, *BACKLOGS))


class Attempts:
    """The attempts of one call under a policy: the timeout of each, and how
    long to wait before the next one, if any.

    `timeout` is the client's own timeout for one call (None: none)."""

    def __init__(
        self,
        policy: RetryPolicy,
        timeout: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._ends = clock() + policy.deadline
        self._backoffs = policy.backoffs(rng)

    def timeout(self) -> float:
        """The gRPC timeout of the next attempt: the time left, or the
        client's timeout if that is less."""
        left = max(0.0, self._ends - self._clock())
        return left if self._timeout is None else min(left, self._timeout)

    def wait(self, error: TaskServiceError) -> float | None:
        """Seconds to wait before trying again after `error`; None to give
        up and raise it: an error no retry mends, or a wait that would use up
        the time left (the attempt after it would have none)."""
        if not retryable(error):
            return None
        pause = next(self._backoffs)
        if pause >= self._ends - self._clock():
            return None
        return pause


class WatchAttempts:
    """Re-opening one watch: what the next WatchStatus asks, and how long to
    wait after a drop.

    The watch resumes after the last change it delivered (by that task's id,
    even if it was opened by key: the key may have moved on to another task),
    so each change reaches the caller once, in order. The policy's deadline
    counts from the first drop after a change; a change received, or a
    stream that stayed open for a whole deadline, starts it afresh."""

    def __init__(
        self,
        policy: RetryPolicy | None,
        selector: dict[str, str],
        after_sequence: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._rng = rng
        self.selector = selector
        """task_id or exclusivity_key, as WatchStatusRequest takes them."""
        self.after_sequence = after_sequence
        self._attempts: Attempts | None = None
        self._opened = clock()

    def opening(self) -> dict[str, Any]:
        """The fields of the next WatchStatusRequest (noting when it opens)."""
        self._opened = self._clock()
        return {**self.selector, "after_sequence": self.after_sequence}

    def fresh(self, task_id: str, sequence: int) -> bool:
        """Whether a change is one the caller has not seen; if so it is noted
        as the point to resume from, and the retry budget starts afresh."""
        if sequence <= self.after_sequence:
            return False
        self.selector = {"task_id": task_id}
        self.after_sequence = sequence
        self._attempts = None
        return True

    def wait(self, error: TaskServiceError) -> float | None:
        """Seconds to wait before re-opening the watch after `error`; None to
        raise it (retries off, an error no retry mends, the deadline spent)."""
        if self._policy is None:
            return None
        if self._attempts is None or self._clock() - self._opened >= self._policy.deadline:
            self._attempts = Attempts(self._policy, None, clock=self._clock, rng=self._rng)
        return self._attempts.wait(error)
