"""Moving bytes between two sockets inside the event loop, for Forward= services.

Protocol-style code (no Streams): each side's ``data_received`` writes straight into the other
transport, and the transports' own flow control is wired across (when one side's write buffer
passes its high-water mark, the other side stops reading), so memory per relay is bounded by two
write buffers. EOF is passed on as a half-close, the way systemd-socket-proxyd does it, and the
relay ends when both directions have ended or either side fails.
"""

from __future__ import annotations

import asyncio
import socket

#: Per-direction write buffer bound; reading from the other side pauses above it.
WRITE_BUFFER_HIGH = 256 * 1024


class _Side(asyncio.Protocol):
    """One socket of the pair; ``other`` is the side its bytes go to.

    The two transports are made one after the other, so a side may hear from its socket before
    the other side exists: those bytes (and an EOF) wait in ``early`` with reading paused, and
    are passed on from the other side's ``connection_made``. (Pausing in ``connection_made``
    itself is ignored by CPython 3.11's selector transport, hence this.)
    """

    def __init__(self, done: asyncio.Future[int]) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.done = done
        self.received = 0
        self.eof = False
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) and self.other is not None
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        other = self.other
        if other.transport is not None and (other.early or other.eof):
            for chunk in other.early:
                transport.write(chunk)
            other.early.clear()
            if other.eof:
                other._pass_eof()
            elif not other.transport.is_closing():
                other.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        assert self.other is not None and self.transport is not None
        if self.other.transport is None:
            self.early.append(data)
            self.transport.pause_reading()
            return
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        assert self.other is not None
        if self.other.transport is None:
            return True  # passed on when the other side is made
        return self._pass_eof()

    def _pass_eof(self) -> bool:
        """Half-close the other side; close both once both directions have ended."""
        other = self.other
        assert other is not None and other.transport is not None and self.transport is not None
        if other.eof or not other.transport.can_write_eof():
            other.transport.close()
            self.transport.close()
            return False
        other.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        assert self.other is not None and self.other.transport is not None
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.other is not None and self.other.transport is not None
        if not self.other.transport.is_closing():
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            if exc is None:
                other.transport.close()
            else:
                other.transport.abort()
        if not self.done.done() and (other is None or other.transport is None
                                     or other.transport.is_closing()):
            self.done.set_result(0)


async def relay(client: socket.socket, upstream: socket.socket) -> tuple[int, int]:
    """Relay between two connected sockets until both directions end.

    Returns (bytes from client, bytes from upstream). Ownership of both sockets passes here.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    a, b = _Side(done), _Side(done)
    a.other, b.other = b, a
    try:
        await loop.connect_accepted_socket(lambda: a, sock=client)
    except BaseException:
        client.close()
        upstream.close()
        raise
    try:
        await loop.connect_accepted_socket(lambda: b, sock=upstream)
    except BaseException:
        assert a.transport is not None
        a.transport.abort()
        upstream.close()
        raise
    try:
        await done
        # Both transports are closing; let them finish flushing before reporting.
        for side in (a, b):
            assert side.transport is not None
            side.transport.close()
    except asyncio.CancelledError:
        for side in (a, b):
            assert side.transport is not None
            side.transport.abort()
        raise
    return a.received, b.received
