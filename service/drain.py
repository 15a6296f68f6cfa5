"""The drain gate: how a stopping server answers every call it receives,
OK or UNAVAILABLE/SHUTTING_DOWN, and never lets gRPC answer one CANCELLED.

gRPC's own stop (`grpc.aio.Server.stop`, grpc core's
`grpc_server_shutdown_and_notify`) cancels two kinds of calls without a
word to the application: those it has received but not yet handed to a
handler (its pending queue), and those that arrive after the stop began but
before their client has read the GOAWAY the stop sends (a network round
trip). Their clients see CANCELLED, which no client retries. So the server
must call gRPC's stop only at a moment when no call is on its way to it, and
only a client can make that moment, by not sending. The gate makes it:

1. REFUSING. Health is NOT_SERVING already (clients with client-side health
   checking, such as taskservice's own with several addresses, stop sending
   here); every new call is answered UNAVAILABLE/SHUTTING_DOWN at once, so a
   round-robin client goes to another server, while the calls admitted
   before the drain finish (watch streams are ended by the server).
2. HOLDING. Once they have (or the grace is running out), new calls are
   held, unanswered: a client waiting for its answer sends nothing more. The
   gate waits until no call has arrived for HOLD_QUIET seconds while the
   event loop was free to take them (so gRPC's pending queue is empty), and
   until RETRY_WINDOW seconds after the last refusal of step 1 (a client
   refused then retries within it, and is held); at most HOLD_LIMIT seconds,
   and never past the grace. A held call whose deadline comes first is
   answered just before it.
3. CLOSED. The server calls gRPC's stop, which stops listening and sends
   every connection a GOAWAY; then the gate answers the held calls
   UNAVAILABLE/SHUTTING_DOWN. gRPC writes those answers after the GOAWAY, so
   a client that retries does so on a new connection, to another server.

What remains: a client that keeps sending new calls without waiting for
the earlier ones' answers, and without checking health, can have one reach
the server at the very moment of step 3 (within a round trip), and gRPC
cancels it.
"""

from __future__ import annotations

import asyncio
import enum
import math

from taskservice.core.errors import ShuttingDown

HOLD_QUIET = 0.1
"""Seconds without a new call (and the event loop free) before gRPC's stop."""

RETRY_WINDOW = 1.0
"""Seconds after the last immediate refusal during which the gate still
holds calls, so that clients retrying after a refusal are held, not cut off."""

HOLD_LIMIT = 2.0
"""Seconds the gate holds calls at most: calls that keep coming all along
come from clients that do not wait for answers, whom holding cannot quiet."""

DEADLINE_MARGIN = 0.1
"""Seconds before its deadline at which a held call is answered anyway."""

_TICK = 0.01
_STALL = 0.05
"""A tick this late means the loop was busy: calls may wait inside gRPC, unseen."""


class Phase(enum.Enum):
    """Where a server is in its drain (see the module docstring)."""

    OPEN = "open"
    REFUSING = "refusing"
    HOLDING = "holding"
    CLOSED = "closed"


class Gate:
    """Counts the admitted calls of one server and decides, during a drain,
    whether a new call is refused at once or held until the port closes."""

    def __init__(self) -> None:
        self._phase = Phase.OPEN
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = asyncio.Event()
        self._last_arrival = -math.inf
        self._last_refusal = -math.inf

    @property
    def phase(self) -> Phase:
        """The drain's current phase."""
        return self._phase

    @property
    def draining(self) -> bool:
        """True once the server stops accepting calls."""
        return self._phase is not Phase.OPEN

    @property
    def in_flight(self) -> int:
        """Admitted calls not yet finished."""
        return self._in_flight

    def enter(self) -> None:
        """Count an admitted call in (only while not draining)."""
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        """Count an admitted call out."""
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def arrive(self, time_remaining: float | None) -> None:
        """For a call that arrives while draining: returns at once, or, while
        the gate holds calls, once the port is closing (or just before the
        call's deadline, `time_remaining` seconds away; None: no deadline)."""
        self._last_arrival = asyncio.get_running_loop().time()
        if self._phase is not Phase.HOLDING:
            return
        if time_remaining is None:
            await self._closed.wait()
        elif time_remaining > DEADLINE_MARGIN:
            try:
                await asyncio.wait_for(self._closed.wait(), time_remaining - DEADLINE_MARGIN)
            except TimeoutError:
                pass

    async def turn_away(self, time_remaining: float | None) -> ShuttingDown:
        """For a call that arrives while draining: `arrive`, then the error
        to answer it with."""
        if self._phase is Phase.REFUSING:
            self._last_refusal = asyncio.get_running_loop().time()
        await self.arrive(time_remaining)
        return shutting_down()

    async def closing(self) -> None:
        """Wait until the port is closing: long-lived streams (health
        watches, reflection) end then, after gRPC's GOAWAY."""
        await self._closed.wait()

    def refuse(self) -> None:
        """Step 1: refuse new calls at once."""
        if self._phase is Phase.OPEN:
            self._phase = Phase.REFUSING

    async def idle(self, until: float) -> bool:
        """Wait until no admitted call is left, or until the loop time
        `until`; True if none is left."""
        remaining = until - asyncio.get_running_loop().time()
        if remaining > 0 and not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except TimeoutError:
                pass
        return self._idle.is_set()

    def hold(self) -> None:
        """Step 2: hold new calls until `close`."""
        if self._phase in (Phase.OPEN, Phase.REFUSING):
            self._phase = Phase.HOLDING

    async def quiet(self, until: float) -> bool:
        """Wait until no call can be on its way (see the module docstring),
        or HOLD_LIMIT seconds, or until the loop time `until`; True if quiet."""
        loop = asyncio.get_running_loop()
        last_tick = stalled = loop.time()
        until = min(until, last_tick + HOLD_LIMIT)
        while True:
            now = loop.time()
            if now - last_tick > _STALL:
                stalled = now
            last_tick = now
            if (
                now - max(self._last_arrival, stalled) >= HOLD_QUIET
                and now - self._last_refusal >= RETRY_WINDOW
            ):
                return True
            if now >= until:
                return False
            await asyncio.sleep(min(_TICK, until - now))

    def close(self) -> None:
        """Step 3, once gRPC's stop has begun: answer the held calls and end
        the long-lived streams."""
        self._phase = Phase.CLOSED
        self._closed.set()


def shutting_down() -> ShuttingDown:
    """The answer to a call that arrives while the server drains."""
    return ShuttingDown(
        "the server is shutting down; call again: another server, or this one once restarted"
    )
