"""A TCP relay of the tests' own between two sockmuxd, which a test can kill (both sockets of
every connection reset) and start again: the link's outage, for the resumption tests."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

from netns_harness import enter_netns

__all__ = ["Relay"]


class Relay:
    """A TCP relay of the test's own, ``listen`` -> ``target`` (in network namespace ``ns``, or
    where the test runs), between two sockmuxd: the link's middlebox. A half-close passes on
    as one. ``kill()`` resets both sockets of every connection (RST), as a restarted relay or
    a NAT that forgot the mapping would, and stops listening; a new Relay takes its place.
    ``recorded`` keeps the bytes the client of the first connection sent (for replaying
    them). It runs in a thread of its own, not as a Thread subclass: Python 3.13's Thread has
    private attributes (``_handle``) that a subclass's methods would shadow."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int],
                 ns: str | None = None) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True, name="relay")
        self.listen, self.target, self.ns = listen, target, ns
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.connections = 0
        self.recorded = bytearray()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None
        self._done: asyncio.Future[None] | None = None

    def _run(self) -> None:
        try:
            if self.ns is not None:
                enter_netns(self.ns)
            self.loop = asyncio.new_event_loop()
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to the test by start_listening()
            self.error = exc
            self.started.set()

    async def _main(self) -> None:
        self._done = asyncio.get_running_loop().create_future()
        self._server = await asyncio.start_server(self._handle, *self.listen,
                                                  reuse_address=True)
        self.started.set()
        await self._done
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection(*self.target)
        except OSError:
            w1.transport.abort()
            return
        self.connections += 1
        self._writers += [w1, w2]
        await asyncio.gather(self._pipe(r1, w2, self.connections == 1),
                             self._pipe(r2, w1, False))
        for w in (w1, w2):
            w.close()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    record: bool) -> None:
        try:
            while data := await r.read(1 << 16):
                if record and len(self.recorded) < 1 << 16:
                    self.recorded += data
                w.write(data)
                await w.drain()
            w.write_eof()  # a half-close passes on as one, as through a TCP relay or a NAT
        except (OSError, asyncio.CancelledError):
            w.transport.abort()

    def _kill(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            sock = w.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            w.transport.abort()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def kill(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._kill)
        if self.thread.is_alive():
            self.thread.join(10)

    def start_listening(self) -> None:
        """Start it, and wait until it listens (or raise what stopped it)."""
        self.thread.start()
        assert self.started.wait(10) and self.error is None, self.error
