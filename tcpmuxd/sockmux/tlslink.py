"""TLS links: OpenSSL over memory BIOs, with the socket I/O and the bookkeeping kept lean.

The event loops' own TLS (asyncio's and uvloop's ``SSLProtocol``) passes every record through
memory BIOs too, but inside a general state machine with several Python-level steps per
record, and a link carries every frame of every stream. ``bench/tls_records.py`` puts that at
about 10 us of CPU per round trip (a record in, a record out) above plain TCP, against about
2 us for this module, and 3.6 us through a non-blocking ``SSLSocket``. An SSLSocket, though, makes a write(2) per 16 KiB record
and two read(2)s per record (header, then body), which bulk transfers feel. So a link's TLS is
an ``ssl.SSLObject`` between two ``MemoryBIO``\\ s, and this module does the socket I/O: one
recv(2) takes whatever records have arrived, one send(2) carries whatever records a write
made.

* :func:`handshake` drives the handshake over a connected non-blocking TCP socket with the
  loop's readiness callbacks; the caller bounds it in time. The alert of a failed handshake is
  sent before the error is raised, so a peer refused for its certificate learns why.
* :class:`TLSTransport` is an ``asyncio.Transport`` over the handshaken connection, for a
  Protocol or a BufferedProtocol. A readiness event reads the socket once and delivers every
  complete record; writes go out at once when the socket takes them, the rest is buffered
  (encrypted) with ``pause_writing``/``resume_writing`` at the marks. ``close()`` stops
  reading, flushes, sends close_notify and closes; ``abort()`` drops the buffer. The peer's
  close_notify or TCP EOF is ``eof_received``; a TLS or socket error aborts the link and is
  ``connection_lost``'s argument, which is called exactly once, after which the socket is
  closed. There is no half-close (``can_write_eof()`` is False), as with the loops' TLS.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from typing import Any, Iterable

from tcpmuxd.sockmux.writebuf import BufferedWrites

__all__ = ["TLSConnection", "handshake", "TLSTransport", "takes_buffers"]

#: Bytes one recv(2) may take (uvloop's read size).
READ_SIZE = 256 * 1024
#: recv(2)s one readiness call makes at most while the socket is full (8 MiB: more than the
#: kernel's largest default receive buffer, 6 MiB), so that other connections get their turn.
MAX_READS = 32
#: The most plaintext one TLS record holds: what one SSLObject.read() can return (asking for
#: more only makes it allocate more before it shrinks the result).
RECORD_SIZE = 16 * 1024


class TLSConnection:
    """A connected TCP socket (non-blocking) and the TLS state over it."""

    __slots__ = ("sock", "obj", "incoming", "outgoing")

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self.sock = sock
        self.obj = obj
        self.incoming = incoming
        self.outgoing = outgoing

    def info(self) -> dict[str, Any]:
        """``get_extra_info``'s answers (OSError if the connection is gone already)."""
        obj = self.obj
        return {"socket": self.sock, "ssl_object": obj, "peercert": obj.getpeercert(),
                "cipher": obj.cipher(), "compression": obj.compression(),
                "peername": self.sock.getpeername(), "sockname": self.sock.getsockname()}


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


async def _send_all(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await _ready(loop, sock.fileno(), write=True)


async def handshake(sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                    server_hostname: str | None = None) -> TLSConnection:
    """The TLS handshake on connected ``sock`` (closed if the handshake fails or is
    cancelled). Raises ``ssl.SSLError`` (e.g. ``SSLCertVerificationError``) or ``OSError``
    (``ConnectionResetError`` when the peer closes mid-handshake) as the handshake goes."""
    loop = asyncio.get_running_loop()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        sock.setblocking(False)
        obj = context.wrap_bio(incoming, outgoing, server_side=server_side,
                               server_hostname=server_hostname)
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError:
                try:  # the alert, if the socket takes it now: tell the peer why
                    sock.send(outgoing.read())
                except OSError:
                    pass
                raise
            await _send_all(loop, sock, outgoing.read())
            if done:
                return TLSConnection(sock, obj, incoming, outgoing)
            while True:
                try:
                    data = sock.recv(READ_SIZE)
                    break
                except BlockingIOError:
                    await _ready(loop, sock.fileno(), write=False)
            if not data:
                raise ConnectionResetError("the peer closed the connection during the TLS "
                                           "handshake")
            incoming.write(data)
    except BaseException:
        sock.close()
        raise


class TLSTransport(BufferedWrites, asyncio.Transport):
    """A link's transport over a handshaken :class:`TLSConnection` (see the module docstring).
    Call :meth:`start` to give the protocol ``connection_made`` and begin reading."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: TLSConnection,
                 protocol: asyncio.BaseProtocol, extra: dict[str, Any]) -> None:
        asyncio.Transport.__init__(self, extra)
        self._loop = loop
        self._sock = conn.sock
        self._obj = conn.obj
        self._incoming = conn.incoming
        self._outgoing = conn.outgoing
        self._fd = conn.sock.fileno()
        self._protocol: Any = protocol
        self._buffered = takes_buffers(protocol)
        self._read_buffer = bytearray(READ_SIZE)
        self._read_view = memoryview(self._read_buffer)
        self._init_writes()       # the buffer holds encrypted bytes
        self._read_paused = False
        self._reading = False     # registered with the loop for readability
        self._at_eof = False      # eof_received given (close_notify, or TCP EOF)

    def start(self) -> None:
        """``connection_made`` (it may pause reading, or write), then reading; what came with
        the handshake's last read is delivered on the loop's next pass."""
        self._protocol.connection_made(self)
        if not self._read_paused and not self._closing:
            self._start_reading()
            if self._incoming.pending:
                self._loop.call_soon(self._deliver)

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
        """Read until the socket is drained (at most MAX_READS reads), then look for a socket
        error once. uvloop reports an error on the fd (a reset that came after data) with one
        last readiness call and then stops polling it: the reset has to be found in this call,
        or the link would hang until the dead-peer time."""
        for _ in range(MAX_READS):
            try:
                n = self._sock.recv_into(self._read_buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._force_close(exc)
                return
            if not n:
                self._deliver()
                self._eof()  # TCP EOF without close_notify: the link ends all the same
                return
            self._incoming.write(self._read_view[:n])
            self._deliver()
            if not self._reading:  # paused, closing, or at close_notify
                return
            if n < READ_SIZE:  # drained: one getsockopt, cheaper than a recv that fails
                err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._force_close(OSError(err, os.strerror(err)))  # its errno's subclass
                return

    def _deliver(self) -> None:
        """Every complete record the incoming BIO holds, while the protocol reads."""
        obj = self._obj
        incoming = self._incoming
        protocol = self._protocol
        while (incoming.pending or obj.pending()) and not (self._read_paused or self._closing):
            try:
                if self._buffered:
                    buf = protocol.get_buffer(-1)
                    if not len(buf):
                        raise RuntimeError("get_buffer() returned an empty buffer")
                    n: int = obj.read(len(buf), buf)  # type: ignore[assignment]
                    data = b""
                else:
                    data = obj.read(RECORD_SIZE)
                    n = len(data)
            except ssl.SSLWantReadError:
                break  # the rest of a record is still on its way
            except ssl.SSLError as exc:
                self._force_close(exc)
                return
            if not n:
                self._eof()  # close_notify
                return
            if self._buffered:
                protocol.buffer_updated(n)
            else:
                protocol.data_received(data)
        if self._outgoing.pending:
            self._send_outgoing()  # a TLS 1.3 post-handshake answer (KeyUpdate)

    def _eof(self) -> None:
        self._stop_reading()
        if self._at_eof:
            return
        self._at_eof = True
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
            if self._incoming.pending or self._obj.pending():
                self._loop.call_soon(self._deliver)

    def is_reading(self) -> bool:
        return self._reading

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        try:
            self._obj.write(data)  # into the outgoing BIO, as many records as it takes
        except ssl.SSLError as exc:
            self._force_close(exc)
            return
        self._send_outgoing()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        # one buffer, so that a few small frames make one record, not a record each
        self.write(b"".join(list_of_data))

    def _send_outgoing(self) -> None:
        data = self._outgoing.read()
        if data:
            self._send(data)

    def _raw_write(self, data: bytes | bytearray | memoryview) -> int:
        return self._sock.send(data)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS links have no half-close")

    # -- closing ---------------------------------------------------------------------------

    def _finish_close(self) -> None:
        """close_notify if the socket takes it now (the peer's is not waited for), then
        connection_lost."""
        try:
            self._obj.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: the peer's close_notify is not there (nor awaited)
        try:
            self._sock.send(self._outgoing.read())
        except OSError:
            pass
        self._schedule_lost(None)

    def _release(self) -> None:
        self._sock.close()

    # -- protocol --------------------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered = takes_buffers(protocol)


def takes_buffers(protocol: object) -> bool:
    """Whether a protocol takes bytes through get_buffer/buffer_updated (uvloop's test)."""
    return isinstance(protocol, asyncio.BufferedProtocol) or (
        hasattr(protocol, "get_buffer") and not isinstance(protocol, asyncio.Protocol))
