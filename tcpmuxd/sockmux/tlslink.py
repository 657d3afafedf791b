"""TLS links over ``ssl.SSLSocket``: OpenSSL does the socket I/O, the loop only says when.

The event loops' own TLS (asyncio's and uvloop's ``SSLProtocol``) passes every record through
memory BIOs and a Python-level state machine. A link carries every frame of every stream, and
``bench/tls_records.py`` puts that at 9.7 us of CPU per round trip (a record in, a record out)
above plain TCP, against 3.6 us through a non-blocking ``SSLSocket`` that reads and writes the
socket itself from the loop's readiness callbacks. So sockmuxd's TLS links are that:

* :func:`handshake` wraps a connected TCP socket (non-blocking) and drives the handshake with
  ``add_reader``/``add_writer``; the caller bounds it in time. OpenSSL sends its alerts itself,
  so a peer refused for its certificate learns why.
* :class:`TLSTransport` is an ``asyncio.Transport`` over the handshaken socket, for a Protocol
  or a BufferedProtocol. A readiness event reads records until the socket has no more, at most
  :data:`READS_PER_EVENT` (OpenSSL reads a record's header and body with a read(2) each);
  writes go out at once when the socket takes them, the rest is buffered with
  ``pause_writing``/``resume_writing`` at the marks, and a write of several records is corked
  into one segment. ``close()`` stops reading, flushes, sends
  close_notify and closes; ``abort()`` drops the buffer. A peer's close_notify or TCP EOF is
  ``eof_received``; a TLS or socket error aborts the link and is ``connection_lost``'s argument,
  which is called exactly once, after which the socket is closed. There is no half-close
  (``can_write_eof()`` is False), as with the loops' TLS.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, Iterable

__all__ = ["handshake", "link_info", "TLSTransport", "takes_buffers"]

#: Write-buffer marks (asyncio's defaults).
WRITE_BUFFER_HIGH = 64 * 1024
WRITE_BUFFER_LOW = 16 * 1024
#: The read buffer: more than a TLS record holds (16 KiB), so one recv takes a whole record.
READ_SIZE = 64 * 1024
#: Records read per readiness event at most (then the loop's other callbacks get their turn;
#: the socket stays readable, so the rest comes on the next pass).
READS_PER_EVENT = 8
#: A write longer than this makes several records, each its own write(2): corked, the kernel
#: sends them as one segment (as one write of them all would), not one segment per record.
CORK_ABOVE = 16 * 1024


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()
    if write:
        loop.add_writer(fd, _set, fut)
    else:
        loop.add_reader(fd, _set, fut)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def handshake(sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                    server_hostname: str | None = None) -> ssl.SSLSocket:
    """The TLS handshake on connected ``sock``, which the returned SSLSocket takes over (it
    is closed if the handshake fails or is cancelled). Raises ``ssl.SSLError`` (e.g.
    ``SSLCertVerificationError``) or ``OSError`` as the handshake does."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    tls = context.wrap_socket(sock, server_side=server_side, server_hostname=server_hostname,
                              do_handshake_on_connect=False)
    try:
        while True:
            try:
                tls.do_handshake()
                return tls
            except ssl.SSLWantReadError:
                await _ready(loop, tls.fileno(), write=False)
            except ssl.SSLWantWriteError:
                await _ready(loop, tls.fileno(), write=True)
    except BaseException:
        tls.close()
        raise


def link_info(sock: ssl.SSLSocket) -> dict[str, Any]:
    """``get_extra_info``'s answers for a handshaken socket (OSError if it is gone already)."""
    return {"socket": sock, "ssl_object": sock, "peercert": sock.getpeercert(),
            "cipher": sock.cipher(), "compression": sock.compression(),
            "peername": sock.getpeername(), "sockname": sock.getsockname()}


class TLSTransport(asyncio.Transport):
    """A link's transport over a handshaken non-blocking SSLSocket (see the module docstring).
    Call :meth:`start` to give the protocol ``connection_made`` and begin reading."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                 protocol: asyncio.BaseProtocol, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol: Any = protocol
        self._buffered = takes_buffers(protocol)
        self._read_buffer = bytearray(READ_SIZE)
        self._read_view = memoryview(self._read_buffer)
        self._buffer = bytearray()
        self._high = WRITE_BUFFER_HIGH
        self._low = WRITE_BUFFER_LOW
        self._write_paused = False
        self._read_paused = False
        self._reading = False     # registered with the loop for readability
        self._writing = False     # registered with the loop for writability
        self._closing = False
        self._lost = False        # connection_lost scheduled

    def start(self) -> None:
        """``connection_made`` (it may pause reading, or write), then reading; a first look at
        what OpenSSL may already hold comes on the next pass of the loop."""
        self._protocol.connection_made(self)
        if not self._read_paused and not self._closing:
            self._start_reading()
            self._loop.call_soon(self._read_ready)

    # -- reading ---------------------------------------------------------------------------

    def _start_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def _read_ready(self) -> None:
        sock = self._sock
        protocol = self._protocol
        for _ in range(READS_PER_EVENT):
            if self._read_paused or self._closing:
                return
            try:
                if self._buffered:
                    buf = protocol.get_buffer(-1)
                    if not len(buf):
                        raise RuntimeError("get_buffer() returned an empty buffer")
                    n = sock.recv_into(buf)
                    data = b""
                else:
                    n = sock.recv_into(self._read_buffer)
                    data = self._read_view[:n].tobytes()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except OSError as exc:  # ssl.SSLError included
                self._fatal(exc)
                return
            if not n:
                self._eof()
                return
            if self._buffered:
                protocol.buffer_updated(n)
            else:
                protocol.data_received(data)
        if sock.pending() and not (self._read_paused or self._closing):
            self._loop.call_soon(self._read_ready)  # decrypted already: no readiness to come

    def _eof(self) -> None:
        self._stop_reading()
        try:
            keep_open = self._protocol.eof_received()
        except BaseException:
            self.abort()
            raise
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        self._read_paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        if not self._read_paused:
            return
        self._read_paused = False
        if not self._closing:
            self._start_reading()
            if self._sock.pending():
                self._loop.call_soon(self._read_ready)

    def is_reading(self) -> bool:
        return self._reading

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                n = self._send(data)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                n = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
            self._start_writing()
        self._buffer += data
        self._maybe_pause()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        # one buffer, so that a few small frames make one record, not a record each
        self.write(b"".join(list_of_data))

    def _send(self, data: bytes | bytearray | memoryview) -> int:
        if len(data) <= CORK_ABOVE:
            return self._sock.send(data)
        sock = self._sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            return sock.send(data)
        finally:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    def _start_writing(self) -> None:
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _write_ready(self) -> None:
        # a retry after WANT_WRITE starts with the same bytes (the buffer only grows at its
        # end), as OpenSSL requires; the ssl module allows the buffer to move
        try:
            n = self._send(self._buffer)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        del self._buffer[:n]
        self._maybe_resume()
        if not self._buffer:
            self._stop_writing()
            if self._closing:
                self._shutdown()

    def _maybe_pause(self) -> None:
        if not self._write_paused and len(self._buffer) > self._high:
            self._write_paused = True
            self._protocol.pause_writing()

    def _maybe_resume(self) -> None:
        if self._write_paused and len(self._buffer) <= self._low:
            self._write_paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = WRITE_BUFFER_HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS links have no half-close")

    # -- closing ---------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._buffer:
            self._shutdown()

    def abort(self) -> None:
        self._force_close(None)

    def _shutdown(self) -> None:
        """close_notify (best effort: the peer's is not waited for), then connection_lost."""
        try:
            self._sock.unwrap()
        except (OSError, ValueError):
            pass  # SSLWantReadError (the peer's close_notify not there yet), or a dead socket
        self._schedule_lost(None)

    def _fatal(self, exc: BaseException) -> None:
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        self._closing = True
        self._buffer.clear()
        self._stop_reading()
        self._stop_writing()
        self._schedule_lost(exc)

    def _schedule_lost(self, exc: BaseException | None) -> None:
        if not self._lost:
            self._lost = True
            self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()

    # -- protocol --------------------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered = takes_buffers(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]


def takes_buffers(protocol: object) -> bool:
    """Whether a protocol takes bytes through get_buffer/buffer_updated (uvloop's test)."""
    return isinstance(protocol, asyncio.BufferedProtocol) or (
        hasattr(protocol, "get_buffer") and not isinstance(protocol, asyncio.Protocol))
