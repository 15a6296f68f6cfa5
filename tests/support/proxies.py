"""TCP proxies in front of Redis or RabbitMQ that misbehave the way brokers do."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self
from urllib.parse import urlsplit, urlunsplit


def with_port(url: str, port: int) -> str:
    """`url` (any broker URL, credentials and all) aimed at 127.0.0.1:`port`."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    address = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{credentials}@{address}" if credentials else address))


class _Proxy:
    """A listener on 127.0.0.1 and a free port; subclasses say what it does."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        """A Redis URL that goes through this proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    def in_place_of(self, url: str) -> str:
        """`url` (any broker URL) with this proxy's address instead of its own."""
        return with_port(url, self.port)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    def cut(self) -> int:
        """Reset every connection open now, both sides (a network that drops
        them); later ones go through. How many connections it cut."""
        cut = 0
        for writer in self._writers:
            if not writer.transport.is_closing():
                writer.transport.abort()
                cut += 1
        self._writers = []
        return cut

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await self._handle(reader, writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class SlowProxy(_Proxy):
    """Forwards to Redis, delaying everything sent to it (a slow broker)."""

    def __init__(self, target_port: int, delay: float) -> None:
        super().__init__()
        self.target_port = target_port
        self.delay = delay

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            try:
                while data := await src.read(65536):
                    await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, self.delay), pump(up_reader, writer, 0))


class BlackholeProxy(_Proxy):
    """Accepts connections, reads everything, never answers (a hung broker)."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass


class StallingProxy(_Proxy):
    """Forwards to a server until `stall()`; from then on it swallows whatever
    either side sends, on connections old and new (a broker that hangs with
    its connections open, or a network that drops packets)."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port
        self.stalled = False

    def stall(self) -> None:
        self.stalled = True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.append(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if not self.stalled:
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


class _GatedProxy(_Proxy):
    """Forwards to a server, held back between `hold()` and `release()` in a
    way each subclass's `_handle` says (waiting on `_flowing`)."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port
        self._flowing = asyncio.Event()
        self._flowing.set()

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def __aexit__(self, *exc: object) -> None:
        self.release()  # nothing stays held back for ever
        await super().__aexit__(*exc)


class HoldingProxy(_GatedProxy):
    """Forwards to a server; between `hold()` and `release()` it forwards
    nothing, on connections old and new, and then delivers everything held
    back, in order (a link that stalls and recovers: TCP delivers late what
    was sent meanwhile, even by a client that has given up and closed)."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.append(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await self._flowing.wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                await self._flowing.wait()
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


class LateConnectionsProxy(_GatedProxy):
    """Forwards to a server; a connection opened between `hold()` and
    `release()` gets nothing through until `release()`, while connections
    opened before keep flowing (a client whose established connections work
    but whose pool cannot open a new one: a connection limit, a SYN flood)."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()  # what the client sends meanwhile waits in the socket
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.append(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
