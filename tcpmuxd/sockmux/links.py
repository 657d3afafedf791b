"""SockMux links: the one reliable, ordered, bidirectional byte pipe between two peers.

A link is presented the way asyncio presents a TCP connection: the caller supplies a protocol
factory (``asyncio.Protocol`` or ``asyncio.BufferedProtocol``) and gets ``(transport,
protocol)`` back; the protocol sees ``connection_made``, ``data_received`` (or ``get_buffer`` /
``buffer_updated``), ``eof_received``, ``pause_writing`` / ``resume_writing`` and exactly one
``connection_lost``. ``connection_made`` is called before the opening coroutine returns, and
only once the link is fully set up (TLS handshake done), so a protocol may write its greeting
there; if it raises, the link is aborted and the exception propagates. Kinds:

==============  =====================  ==========================================================
kind            DeleGate               opened by
==============  =====================  ==========================================================
TCP connector   SERVER=sockmux://h:p   :func:`connect_tcp` (one attempt; :class:`Backoff` paces
                                       the driver's re-dials)
TCP receptor    -Ph:p                  :func:`listen_tcp` (the factory is called per link)
FIFO pair       commin + commout       :func:`open_fifos`
comm device     comm                   :func:`open_comm` (a serial line, a pty)
stdio           (``--stdio``)          :func:`open_stdio` (``ssh host sockmuxd --stdio``)
command         (``--command``)        :func:`open_command` (its stdout + stdin)
two open fds    -                      :func:`connect_fds`
==============  =====================  ==========================================================

TCP links are the loop's own TCP transports, with TCP_NODELAY and SO_KEEPALIVE set; with TLS,
the socket is taken over by a :class:`~tcpmuxd.sockmux.tlslink.TLSTransport` (OpenSSL over
memory BIOs with lean socket I/O instead of the loop's TLS machinery: see that module).
The other kinds are a :class:`PipePairTransport`: a read transport from
``loop.connect_read_pipe`` and a write transport, combined. The combination adds no Python call
per chunk: the read transport calls the link protocol's own bound ``data_received`` (or
``get_buffer``/``buffer_updated``), and ``write``/``writelines`` *are* the write transport's
bound methods. The write transport is ``loop.connect_write_pipe`` for pipes and FIFOs, and a
small transport of this module (:class:`_FdWriteTransport`) for ttys and sockets: uvloop's write
pipe transport reads from its descriptor to notice the reader going away, which on a tty or
socket steals the bytes meant for the read side, and asyncio's closes itself on them.

Semantics of a :class:`PipePairTransport` (also in its docstring): EOF on the read side calls
``eof_received``; a false return closes the link, a true one keeps the write side open
(half-close). ``write_eof()`` closes the write side, which is the peer's EOF (not on a comm
device: a serial line has no EOF). ``close()`` stops reading at once and closes the write side
once its buffer is flushed; ``abort()`` drops the buffer. An error on either side aborts both.
On a tty, EIO from a read (the other end hung up) counts as EOF. ``connection_lost`` is called
once both sides are gone and everything the link owned is released: descriptors closed, a
stdio tty's settings restored, a command's process reaped.

Loop notes (asyncio and uvloop are both supported and tested):

* Bytes that arrive while a link is being handed to its protocol are held and delivered
  right after ``connection_made``, even if that paused reading (with TLS, what OpenSSL read
  with the handshake is delivered on the loop's next pass).
* asyncio's pipe transports have no BufferedProtocol support: under asyncio a BufferedProtocol
  gets pipe bytes copied into its buffer (uvloop reads straight into it).
* A ``pause_reading()`` inside ``connection_made`` is honoured for every kind (both loops'
  transports would start reading after their first ``connection_made`` regardless; the link
  protocol's ``connection_made`` is called only after that).

Resource handling:

* Every descriptor a link opens is O_CLOEXEC and closed when ``connection_lost`` is delivered,
  or before the opening coroutine raises. Descriptors passed in by number are duplicated; the
  caller keeps (and closes) its own.
* A receptor's failed TLS handshakes (bad certificate, wrong CA, timeout) are logged on
  ``tcpmuxd.sockmux.links`` at WARNING and the socket is closed; the listener keeps serving.
  EMFILE/ENFILE while accepting are handled by the loop's own accept loop (it logs and pauses
  accepting briefly). :func:`listen_tcp`'s ``admit`` callback may refuse a connection as soon
  as it is accepted (the hub caps the links being set up; it resets and logs them itself).
* A command is spawned without a shell and with ``close_fds``; its stderr is ours. Its exit is
  noticed through a pidfd (or by polling where pidfds are unavailable) and it is reaped at once;
  when the link closes it gets ``terminate_timeout`` seconds to exit on its own (stdin is at EOF
  by then), then SIGTERM, then after ``kill_timeout`` SIGKILL. ``connection_lost`` waits for the
  reaping, so no zombie outlives a link.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import random
import shlex
import socket
import ssl
import stat
import subprocess
import termios
from typing import Any, Callable, Iterable, Sequence

from tcpmuxd.common.children import ExitWatch
from tcpmuxd.sockmux.tlslink import TLSConnection, TLSTransport, handshake, takes_buffers
from tcpmuxd.sockmux.writebuf import BufferedWrites

__all__ = [
    "bind_tcp", "connect_tcp", "listen_tcp", "open_fifos", "open_comm", "open_stdio", "open_command",
    "connect_fds", "PipePairTransport", "Backoff", "set_raw",
]

log = logging.getLogger(__name__)

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
#: listen_tcp's admission check: (accepted transport, TLS handshakes in progress) -> admit?
Admit = Callable[[Any, int], bool]

#: TCP keep-alive: first probe after this many idle seconds, then every INTERVAL, give up after
#: COUNT unanswered probes (~2 min). SockMux's own keep-alive notices a dead peer sooner; this
#: is the backstop for a peer that vanished while the link was idle and unpaced.
TCP_KEEPALIVE_IDLE = 60
TCP_KEEPALIVE_INTERVAL = 15
TCP_KEEPALIVE_COUNT = 4

#: How often a command's exit is polled for when pidfds are unavailable.
CHILD_POLL_INTERVAL = 0.05

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16


# --- shared helpers -------------------------------------------------------------------------

def _feed_buffered(protocol: Any, data: bytes) -> None:
    """Copy *data* into a BufferedProtocol's buffers (only for bytes a transport handed us)."""
    view = memoryview(data)
    while view:
        buf = memoryview(protocol.get_buffer(len(view))).cast("B")
        n = min(len(buf), len(view))
        if not n:
            raise RuntimeError("get_buffer() returned an empty buffer")
        buf[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


def _feed(protocol: Any, data: bytes) -> None:
    if takes_buffers(protocol):
        _feed_buffered(protocol, data)
    else:
        protocol.data_received(data)


def _tune_tcp(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY and SO_KEEPALIVE (with the probe timing above) on a TCP link's socket."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", TCP_KEEPALIVE_IDLE),
                            ("TCP_KEEPINTVL", TCP_KEEPALIVE_INTERVAL),
                            ("TCP_KEEPCNT", TCP_KEEPALIVE_COUNT)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError as exc:  # the peer may already have reset it
        log.debug("could not set TCP options: %s", exc)


def _fmt_addr(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return str(addr)


# --- TCP ------------------------------------------------------------------------------------

class _Handoff(asyncio.Protocol):
    """A fresh TCP transport's first protocol: holds it (and any early bytes) until the link is
    set up, then gives it to the real protocol with :meth:`hand_over`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.held: list[bytes] = []
        self.eof = False
        self.lost = False
        self.exc: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        _tune_tcp(transport)
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.held.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exc = exc

    def hand_over(self, transport: asyncio.Transport,
                  protocol_factory: ProtocolFactory) -> asyncio.BaseProtocol:
        """Call the factory, attach its protocol, replay held bytes. Raises ConnectionResetError
        if the link already died during setup (the factory is then not called)."""
        if self.lost or transport.is_closing():
            raise ConnectionResetError("the link closed while it was being set up") from self.exc
        protocol = protocol_factory()
        transport.set_protocol(protocol)
        # Resume before connection_made so that a pause there wins; no bytes can be delivered
        # before this function returns to the loop.
        transport.resume_reading()
        protocol.connection_made(transport)
        held, self.held = self.held, []
        for data in held:
            _feed(protocol, data)
        if self.eof and not transport.is_closing():
            if not protocol.eof_received():  # type: ignore[attr-defined]
                transport.close()
        return protocol


async def connect_tcp(host: str, port: int, protocol_factory: ProtocolFactory, *,
                      tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                      timeout: float | None = 10.0
                      ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Dial a receptor once: TCP connect, then the TLS handshake if *tls* is given.

    *timeout* bounds the whole attempt (name lookup, connect, handshake) and raises
    TimeoutError. Connection errors propagate as OSError (ConnectionRefusedError, ...); a failed
    certificate check as ``ssl.SSLCertVerificationError``. The name checked against the
    receptor's certificate is *server_hostname*, else *host*. *protocol_factory* is called only
    once the link is up. Re-dialling is the caller's business (see :class:`Backoff`).
    """
    loop = asyncio.get_running_loop()
    transport: asyncio.Transport | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                transport, handoff = await loop.create_connection(_Handoff, host, port)
                if tls is not None:
                    # the receptor speaks only after our ClientHello: nothing was read yet
                    sock = _take_socket(transport)
                    transport = None
                    tls_conn = await handshake(sock, tls, server_side=False,
                                               server_hostname=server_hostname or host)
        except TimeoutError:
            raise TimeoutError(f"connecting to {_fmt_addr((host, port))} timed out "
                               f"after {timeout} s") from None
        if tls is None:
            assert transport is not None
            return transport, handoff.hand_over(transport, protocol_factory)
        return _start_tls_link(loop, tls_conn, protocol_factory)
    except BaseException:
        if transport is not None:
            transport.abort()
        raise


def _take_socket(transport: Any) -> socket.socket:
    """The connection of a fresh plain transport, as a socket of its own: its descriptor is
    duplicated and the transport aborted (which closes only the transport's descriptor)."""
    try:
        return socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    finally:
        transport.abort()


def _start_tls_link(loop: asyncio.AbstractEventLoop, conn: TLSConnection,
                    protocol_factory: ProtocolFactory) -> tuple[TLSTransport, asyncio.BaseProtocol]:
    """A handshaken connection's transport, its protocol made and told (closed if that
    fails; the factory is not called for a link that is gone already)."""
    try:
        extra = conn.info()
        protocol = protocol_factory()
        transport = TLSTransport(loop, conn, protocol, extra)
    except BaseException:
        conn.sock.close()
        raise
    try:
        transport.start()
    except BaseException:
        transport.abort()
        raise
    return transport, protocol


class _Acceptor:
    """The receptor's per-listener state: hands each accepted, handshaken link to the factory.

    With TLS, no byte of an accepted connection is ever read outside the TLS layer: the loop's
    plain transport is only a vehicle for the accept. In its ``connection_made`` (which both
    loops call before they start reading) the socket is duplicated and that transport aborted,
    and the duplicate is the TLS layer's, which reads it from its first byte on. (Letting a
    plain transport read first loses a ClientHello that arrived in between: the handshake then
    stalls until it times out.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol_factory: ProtocolFactory,
                 tls: ssl.SSLContext | None, handshake_timeout: float,
                 admit: Admit | None = None) -> None:
        self.loop = loop
        self.factory = protocol_factory
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.admit = admit
        self.server: asyncio.AbstractServer | None = None
        self.handshakes: set[asyncio.Task[None]] = set()

    def new_protocol(self) -> asyncio.BaseProtocol:
        if self.tls is None:
            return _AcceptedHandoff(self)
        return _TLSAccept(self)

    def admitted(self, transport: asyncio.BaseTransport) -> bool:
        """Ask ``admit`` (it resets what it refuses) before anything is read or written."""
        return self.admit is None or self.admit(transport, len(self.handshakes))

    def accepted(self, handoff: _Handoff) -> None:
        assert handoff.transport is not None
        if not self.admitted(handoff.transport):
            return
        # Not from inside connection_made: both loops (re)start reading after it returns,
        # which would override a pause_reading() in the link protocol's connection_made.
        self.loop.call_soon(self.deliver, handoff, handoff.transport)

    def accepted_tls(self, raw: asyncio.BaseTransport) -> None:
        """Called from the plain transport's connection_made, before anything was read: take
        the socket over for TLS and drop that transport."""
        if not self.admitted(raw):
            return
        peer = _fmt_addr(raw.get_extra_info("peername"))
        try:
            sock = _take_socket(raw)
        except OSError as exc:  # EMFILE, ENFILE: refuse this one, keep serving
            log.warning("link from %s refused: %s", peer, exc)
            return
        task = self.loop.create_task(self.handshake(sock, peer))
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    async def handshake(self, sock: socket.socket, peer: str) -> None:
        assert self.tls is not None
        try:
            async with asyncio.timeout(self.handshake_timeout):
                tls_conn = await handshake(sock, self.tls, server_side=True)
        except Exception as exc:  # the socket is closed
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"no handshake within {self.handshake_timeout:g} s")
            log.warning("link from %s refused: TLS handshake failed: %s",
                        peer, str(exc) or type(exc).__name__)
            return
        if self.server is not None and not self.server.is_serving():
            log.info("link from %s dropped: the listener has been closed", peer)
            tls_conn.sock.close()
            return
        try:
            _start_tls_link(self.loop, tls_conn, self.factory)
        except OSError as exc:  # reset right after the handshake (the socket is closed)
            log.info("link from %s lost during setup: %s", peer, exc)
        except Exception:
            log.exception("link from %s: the protocol factory failed", peer)

    def deliver(self, handoff: _Handoff, transport: asyncio.Transport) -> None:
        peer = _fmt_addr(transport.get_extra_info("peername"))
        if self.server is not None and not self.server.is_serving():
            log.info("link from %s dropped: the listener has been closed", peer)
            transport.abort()
            return
        try:
            handoff.hand_over(transport, self.factory)
        except ConnectionError as exc:
            log.info("link from %s lost during setup: %s", peer, exc)
            transport.abort()
        except Exception:
            log.exception("link from %s: the protocol factory failed", peer)
            transport.abort()


class _AcceptedHandoff(_Handoff):
    def __init__(self, acceptor: _Acceptor) -> None:
        super().__init__()
        self.acceptor = acceptor

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.acceptor.accepted(self)


class _TLSAccept(asyncio.Protocol):
    """First protocol of an accepted TLS connection; gives the socket up in connection_made,
    so it never sees a byte."""

    def __init__(self, acceptor: _Acceptor) -> None:
        self.acceptor = acceptor

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _tune_tcp(transport)
        self.acceptor.accepted_tls(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - aborted before reading
        raise AssertionError("bytes read outside TLS")


def bind_tcp(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for HOST:PORT, one per address the name resolves to.

    ``::`` (written ``[::]``) is one dual-stack socket (``IPV6_V6ONLY`` off): every IPv6 and
    IPv4 address, as the man pages promise and as systemd's ``ListenStream=PORT`` binds. The
    loops' own ``create_server`` would make it IPv6-only, and an IPv4 peer would be refused.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, type_, proto, _canon, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr)
            sock.listen(backlog)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def listen_tcp(host: str | Sequence[str] | None, port: int,
                     protocol_factory: ProtocolFactory, *, tls: ssl.SSLContext | None = None,
                     backlog: int = 1024, handshake_timeout: float = 10.0,
                     admit: Admit | None = None) -> asyncio.Server:
    """Listen for links; call *protocol_factory* once per incoming link that completed setup.

    With *tls* the handshake (including the client-certificate check) must finish within
    *handshake_timeout* before the factory is called; a failure is logged and the socket closed.
    Whether a new link replaces an existing one is the protocol's (the driver's) decision.
    ``server.close()`` stops accepting; links already handed up stay open, and a handshake still
    in flight is dropped when it completes. *host* None or "" listens on every address (a
    socket per family); ``"::"`` too, with one dual-stack socket (:func:`bind_tcp`).
    *admit(transport, handshakes)* is asked first, for each accepted connection, with the
    number of TLS handshakes in progress: False drops it (admit resets and logs it itself).
    """
    loop = asyncio.get_running_loop()
    acceptor = _Acceptor(loop, protocol_factory, tls, handshake_timeout, admit)
    if host == "::":
        [sock] = bind_tcp("::", port, backlog)
        server = await loop.create_server(acceptor.new_protocol, sock=sock, backlog=backlog,
                                          start_serving=False)
    else:
        server = await loop.create_server(acceptor.new_protocol, host or None, port,
                                          backlog=backlog, reuse_address=True,
                                          start_serving=False)
    acceptor.server = server
    await server.start_serving()
    return server


# --- pairs of descriptors -------------------------------------------------------------------

class _ReadSide(asyncio.BaseProtocol):
    """Protocol of a pair's read transport.

    Until the link is live it holds whatever arrives. Then the link protocol's bound
    data_received (or get_buffer/buffer_updated) become attributes of this object, so the
    transport calls them directly. Deliberately neither a Protocol nor a BufferedProtocol
    subclass: uvloop picks its read path from ``hasattr(p, "get_buffer")``.
    """

    def __init__(self, pair: PipePairTransport) -> None:
        self._pair = pair
        self.held: list[bytes] = []
        self.data_received = self.held.append

    def go_live(self, protocol: Any) -> None:
        for name in ("get_buffer", "buffer_updated"):
            self.__dict__.pop(name, None)
        if takes_buffers(protocol):
            self.get_buffer = protocol.get_buffer
            self.buffer_updated = protocol.buffer_updated
            # asyncio's read pipe transport only knows data_received
            self.data_received = functools.partial(_feed_buffered, protocol)
        else:
            self.data_received = protocol.data_received

    def eof_received(self) -> bool:
        self._pair._read_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._pair._read_lost(exc)


class _WriteSide(asyncio.BaseProtocol):
    """Protocol of a pair's write transport: flow control goes straight to the link protocol."""

    def __init__(self, pair: PipePairTransport, protocol: Any) -> None:
        self._pair = pair
        self.bind(protocol)

    def bind(self, protocol: Any) -> None:
        self.pause_writing = protocol.pause_writing
        self.resume_writing = protocol.resume_writing

    def data_received(self, data: bytes) -> None:
        pass  # uvloop polls a write pipe for readability; a pipe's write end never has data

    def eof_received(self) -> bool:
        return False  # uvloop: the reader went away; let the write transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._pair._write_lost(exc)


_UNSET: Any = object()


def _discard(data: object) -> None:
    pass


def _write_after_eof(data: object) -> None:
    raise RuntimeError("Cannot call write() after write_eof()")


class PipePairTransport(asyncio.Transport):
    """One link made of a read transport and a write transport (pipes, FIFOs, a tty, ...).

    Implements the asyncio.Transport API by delegation:

    * ``write``/``writelines`` are the write transport's own methods (no extra call), and
      ``pause_writing``/``resume_writing`` reach the protocol straight from it;
      ``get_write_buffer_size``/``set_write_buffer_limits``/``get_write_buffer_limits`` are its.
    * ``pause_reading``/``resume_reading``/``is_reading`` act on the read transport.
    * EOF on the read side -> ``protocol.eof_received()``; a false return closes the link, a true
      one keeps the write side open until ``close()``. On a tty, EIO from a read (hang-up) is EOF.
    * ``write_eof()`` closes the write side (the peer's EOF). Not available when both sides are
      the same file (a comm device): ``can_write_eof()`` is then False.
    * If the peer stops reading (the write side reports the reader gone) the read side carries
      on until its EOF; later writes are dropped, as a socket transport drops them.
    * ``close()``: reading stops now, the write side closes after flushing. ``abort()``: the
      write buffer is dropped. An error on either side aborts both and is the argument of
      ``connection_lost``.
    * ``connection_lost`` is called exactly once, when both sides are closed and the link's
      other resources (a command's process, a stdio tty's settings) are released.

    ``get_extra_info``: ``peername`` (a description such as ``"fifo:IN,OUT"``),
    ``read_transport``, ``write_transport``, and per kind ``device`` or ``subprocess``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol, *,
                 extra: dict[str, Any] | None = None, can_write_eof: bool = True) -> None:
        super().__init__(extra)
        self._loop = loop
        self._protocol = protocol
        self._rt: asyncio.ReadTransport | None = None
        self._wt: asyncio.WriteTransport | None = None
        self._reader = _ReadSide(self)
        self._writer = _WriteSide(self, protocol)
        self._can_write_eof = can_write_eof
        self._live = False
        self._closing = False
        self._read_done = False
        self._write_done = False
        self._eof_seen = False
        self._eof_sent = False
        self._held_eof = False
        self._held_lost: Any = _UNSET
        self._exc: BaseException | None = None
        self._reading_paused = False  # asyncio 3.11's read pipe transport has no is_reading()
        self._finished = False
        self._cleanups: list[Callable[[], None]] = []
        self._finalizer: Callable[[Callable[[], None]], None] | None = None

    # setup (used by _open_pair)

    def _attach(self, rt: asyncio.ReadTransport, wt: asyncio.WriteTransport) -> None:
        self._rt, self._wt = rt, wt
        self._extra["read_transport"] = rt
        self._extra["write_transport"] = wt
        if not self._write_done:
            self.write = wt.write  # type: ignore[method-assign]
            self.writelines = wt.writelines  # type: ignore[method-assign]

    def _go_live(self) -> None:
        self._live = True
        self._reader.go_live(self._protocol)
        assert self._rt is not None
        if not self._read_done and self._held_lost is _UNSET:
            self._rt.set_protocol(self._reader)  # uvloop caches the protocol's bound methods
        self._protocol.connection_made(self)
        held, self._reader.held = self._reader.held, []
        for data in held:
            _feed(self._protocol, data)
        if self._held_eof:
            self._held_eof = False
            self._read_eof()
        if self._held_lost is not _UNSET:
            exc, self._held_lost = self._held_lost, _UNSET
            self._read_lost(exc)
        if self._exc is not None and not self._read_done:
            self._rt.close()  # the write side failed before the link went live
        self._maybe_finish()

    # events from the two sides

    def _read_eof(self) -> None:
        if not self._live:
            self._held_eof = True
            return
        if self._eof_seen:
            return
        self._eof_seen = True
        if not self._protocol.eof_received():  # type: ignore[attr-defined]
            self.close()

    def _read_lost(self, exc: BaseException | None) -> None:
        if not self._live:
            self._held_lost = exc
            return
        self._read_done = True
        if exc is not None and isinstance(exc, OSError) and exc.errno == errno.EIO:
            exc = None  # a tty whose other end hung up
            self._read_eof()
        if exc is not None:
            self._fail(exc)
        self._maybe_finish()

    def _write_lost(self, exc: BaseException | None) -> None:
        self._write_done = True
        if not self._eof_sent:
            self.write = self.writelines = _discard  # type: ignore[method-assign]
        if exc is not None:
            self._fail(exc)
        self._maybe_finish()

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._closing = True
        if not self._read_done and self._rt is not None:
            self._rt.close()
        if not self._write_done and self._wt is not None:
            self._wt.abort()

    def _maybe_finish(self) -> None:
        if self._finished or not self._live or not (self._read_done and self._write_done):
            return
        self._finished = True
        self._closing = True
        for cleanup in self._cleanups:
            try:
                cleanup()
            except Exception:
                log.exception("cleaning up after a link")
        if self._finalizer is not None:
            self._finalizer(self._deliver_lost)
        else:
            self._deliver_lost()

    def _deliver_lost(self) -> None:
        self._protocol.connection_lost(self._exc)

    # asyncio.Transport API

    def write(self, data: bytes | bytearray | memoryview) -> None:  # replaced in _attach
        raise RuntimeError("the link is not set up yet")

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        raise RuntimeError("the link is not set up yet")

    def can_write_eof(self) -> bool:
        return self._can_write_eof

    def write_eof(self) -> None:
        if not self._can_write_eof:
            raise NotImplementedError("a link over one device has no EOF to send")
        if self._eof_sent or self._closing:
            return
        self._eof_sent = True
        self.write = self.writelines = _write_after_eof  # type: ignore[method-assign]
        if not self._write_done and self._wt is not None:
            self._wt.close()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._read_done and self._rt is not None:
            self._rt.close()
        if not self._write_done and self._wt is not None:
            self._wt.close()

    def abort(self) -> None:
        self._closing = True
        if not self._read_done and self._rt is not None:
            self._rt.close()
        if not self._write_done and self._wt is not None:
            self._wt.abort()

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        if not self._read_done and self._rt is not None:
            self._reading_paused = True
            self._rt.pause_reading()

    def resume_reading(self) -> None:
        if not self._read_done and self._rt is not None:
            self._reading_paused = False
            self._rt.resume_reading()

    def is_reading(self) -> bool:
        return not (self._read_done or self._closing or self._reading_paused)

    def get_write_buffer_size(self) -> int:
        if self._write_done or self._wt is None:
            return 0
        return self._wt.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        assert self._wt is not None
        return self._wt.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if not self._write_done and self._wt is not None:
            self._wt.set_write_buffer_limits(high, low)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._writer.bind(protocol)
        if self._live:
            self._reader.go_live(protocol)
            if not self._read_done and self._rt is not None:
                self._rt.set_protocol(self._reader)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def __repr__(self) -> str:
        state = "closed" if self._finished else "closing" if self._closing else "open"
        return f"<PipePairTransport {self._extra.get('peername', '?')} {state}>"


class _FdWriteTransport(BufferedWrites, asyncio.WriteTransport):
    """Write transport over a non-blocking descriptor, driven by ``loop.add_writer``.

    Used for ttys and sockets, where the loop's write-pipe transport would read from the
    descriptor (see the module docstring). Writes go out at once when the descriptor takes
    them; the rest is buffered, with pause_writing/resume_writing at the high/low marks
    (:class:`~tcpmuxd.sockmux.writebuf.BufferedWrites`). ``writelines`` uses writev. Owns
    *fd* and closes it after ``connection_lost``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 protocol: asyncio.BaseProtocol, extra: dict[str, Any] | None = None) -> None:
        asyncio.WriteTransport.__init__(self, extra)
        os.set_blocking(fd, False)
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._init_writes()
        protocol.connection_made(self)

    def _raw_write(self, data: bytes | bytearray | memoryview) -> int:
        return os.write(self._fd, data)

    def _release(self) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        self._send(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._closing:
            return
        chunks = [d for d in list_of_data if d]
        if not chunks:
            return
        if self._buffer or len(chunks) > _IOV_MAX:
            for data in chunks:
                self._send(data)
            return
        try:
            n = os.writev(self._fd, chunks)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._force_close(exc)
            return
        for data in chunks:
            view = memoryview(data).cast("B")
            if n >= len(view):
                n -= len(view)
                continue
            self._keep(view[n:])
            n = 0

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol


def _check_streamable(fd: int) -> int:
    """The descriptor's st_mode, if a link can use it; ValueError otherwise."""
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        kind = "regular file" if stat.S_ISREG(mode) else "directory" if stat.S_ISDIR(mode) \
            else "file of this type"
        raise ValueError(f"a link needs a pipe, FIFO, socket or character device, "
                         f"not a {kind} (fd {fd})")
    return mode


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


async def _open_pair(read_fd: int, write_fd: int, protocol_factory: ProtocolFactory, *,
                     extra: dict[str, Any], can_write_eof: bool,
                     cleanups: Sequence[Callable[[], None]] = (),
                     finalizer: Callable[[Callable[[], None]], None] | None = None,
                     ) -> tuple[PipePairTransport, asyncio.BaseProtocol]:
    """Build a PipePairTransport. Owns *read_fd* and *write_fd* from the call on (closes them
    if it raises). *cleanups* and *finalizer* are only attached on success."""
    loop = asyncio.get_running_loop()
    wt: asyncio.WriteTransport | None = None
    rt: asyncio.ReadTransport | None = None
    try:
        _check_streamable(read_fd)
        write_mode = _check_streamable(write_fd)
        protocol = protocol_factory()
        pair = PipePairTransport(loop, protocol, extra=extra, can_write_eof=can_write_eof)
        if stat.S_ISFIFO(write_mode):
            wfile = open(write_fd, "wb", buffering=0)
            write_fd = -1
            try:
                wt, _ = await loop.connect_write_pipe(lambda: pair._writer, wfile)
            except BaseException:
                _close_quietly(wfile)
                raise
        else:
            fd, write_fd = write_fd, -1
            wt = _FdWriteTransport(loop, fd, pair._writer)
        rfile = open(read_fd, "rb", buffering=0)
        read_fd = -1
        try:
            rt, _ = await loop.connect_read_pipe(lambda: pair._reader, rfile)
        except BaseException:
            _close_quietly(rfile)
            raise
    except BaseException:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        if wt is not None:
            wt.abort()
        raise
    pair._cleanups.extend(cleanups)
    pair._finalizer = finalizer
    pair._attach(rt, wt)
    try:
        pair._go_live()
    except BaseException:  # connection_made raised: nobody holds the link, so end it
        pair.abort()
        raise
    return pair, protocol


def _close_quietly(f: Any) -> None:
    try:
        f.close()
    except OSError:  # uvloop may already have closed the descriptor
        pass


async def connect_fds(read_fd: int, write_fd: int, protocol_factory: ProtocolFactory, *,
                      peername: str | None = None
                      ) -> tuple[PipePairTransport, asyncio.BaseProtocol]:
    """A link over two open descriptors (pipes, FIFOs, sockets or character devices; the same
    one twice for a bidirectional file). Both are duplicated: the caller keeps its own.
    ``write_eof`` is available when they are different files."""
    r = os.dup(read_fd)
    try:
        w = os.dup(write_fd)
    except BaseException:
        os.close(r)
        raise
    try:
        same = _same_file(r, w)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return await _open_pair(r, w, protocol_factory, can_write_eof=not same,
                            extra={"peername": peername or f"fds:{read_fd},{write_fd}"})


# --- FIFO pair ------------------------------------------------------------------------------

async def _open_fifo_for_writing(path: str, timeout: float) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.005
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"nobody opened {path} for reading within {timeout} s")
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.1)


async def open_fifos(in_path: str, out_path: str, protocol_factory: ProtocolFactory, *,
                     timeout: float = 10.0) -> tuple[PipePairTransport, asyncio.BaseProtocol]:
    """A link over two FIFOs (DeleGate's commin/commout): read *in_path*, write *out_path*.

    The peer uses the same two FIFOs the other way round. *in_path* is opened first
    (O_RDONLY|O_NONBLOCK never waits), so two peers starting at once cannot deadlock. Opening
    *out_path* non-blocking for writing fails with ENXIO while the peer has not opened it for
    reading yet; it is retried (5 ms doubling to 100 ms) until *timeout*, then TimeoutError.
    O_RDWR is not used: holding a read end of our own output would hide the peer's departure
    and, with the loops' write-pipe transports, read back our own bytes.

    The link ends (EOF) when the peer closes its end of *in_path*. Bytes a previous session
    left in a FIFO are not discarded. The FIFOs are not created here (``os.mkfifo``).
    """
    rfd = os.open(in_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        wfd = await _open_fifo_for_writing(out_path, timeout)
    except BaseException:
        os.close(rfd)
        raise
    return await _open_pair(rfd, wfd, protocol_factory, can_write_eof=True,
                            extra={"peername": f"fifo:{in_path},{out_path}"})


# --- comm device ----------------------------------------------------------------------------

def set_raw(fd: int, speed: int | None = None) -> None:
    """Put a tty in raw mode for a binary link, right away (TCSANOW).

    8 data bits, no parity, receiver on, modem control lines ignored (CLOCAL); no input
    translation (CR/LF, parity marking, stripping), no XON/XOFF flow control; no output
    processing; no echo, no canonical mode, no signal characters. VMIN=1, VTIME=0: a read
    returns what is there, and the descriptor polls readable as soon as one byte is (VMIN=0
    would make it poll readable always). Stop bits and RTS/CTS flow control are left as they
    are. *speed* sets both directions' baud rate (a number such as 115200).
    """
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = termios.tcgetattr(fd)
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON | termios.IXOFF
               | termios.IXANY | termios.INPCK | getattr(termios, "IUCLC", 0)
               | getattr(termios, "IMAXBEL", 0))
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag &= ~(termios.CSIZE | termios.PARENB)
    cflag |= termios.CS8 | termios.CREAD | termios.CLOCAL
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    if speed is not None:
        code = getattr(termios, f"B{speed}", None)
        if not isinstance(code, int):
            raise ValueError(f"unsupported line speed {speed!r}")
        ispeed = ospeed = code
    termios.tcsetattr(fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])


async def open_comm(device: str | int, protocol_factory: ProtocolFactory, *,
                    speed: int | None = None, raw: bool = True
                    ) -> tuple[PipePairTransport, asyncio.BaseProtocol]:
    """A link over one bidirectional character device (DeleGate's comm): a serial line, a pty.

    *device* is a path (opened O_RDWR|O_NOCTTY|O_NONBLOCK|O_CLOEXEC, so a serial line without
    carrier does not block the open) or an open descriptor (duplicated; the caller keeps its
    own). A tty is put in raw mode with :func:`set_raw` (*speed* optional) and left that way
    when the link closes. Reads and writes use separate duplicates of the descriptor. A serial
    line has no EOF: ``can_write_eof()`` is False, and a dead peer is noticed by the SockMux
    keep-alive; on a pty, the other end closing reads as EOF.
    """
    if isinstance(device, int):
        fd = os.dup(device)
        name = f"fd {device}"
    else:
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        name = device
    try:
        if os.isatty(fd):
            if raw:
                set_raw(fd, speed)
        elif speed is not None:
            raise ValueError(f"{name} is not a tty: no line speed to set")
        rfd = os.dup(fd)
    except BaseException:
        os.close(fd)
        raise
    return await _open_pair(rfd, fd, protocol_factory, can_write_eof=False,
                            extra={"peername": f"comm:{name}", "device": device})


# --- stdio ----------------------------------------------------------------------------------

def _raw_until_cleanup(fd: int) -> Callable[[], None]:
    """Make the tty behind *fd* raw; return the function that restores its settings and
    blocking mode. Holds a duplicate until then, so the restore never hits a reused number."""
    guard = os.dup(fd)
    try:
        saved = termios.tcgetattr(guard)
        blocking = os.get_blocking(guard)
        set_raw(guard)
    except BaseException:
        os.close(guard)
        raise

    done = False

    def restore() -> None:
        nonlocal done
        if done:
            return
        done = True
        try:
            termios.tcsetattr(guard, termios.TCSANOW, saved)
            os.set_blocking(guard, blocking)
        except (OSError, termios.error) as exc:  # hung up: there is nothing left to restore
            log.debug("could not restore the terminal: %s", exc)
        finally:
            os.close(guard)
    return restore


def _detach(*fds: int) -> None:
    """Point *fds* at /dev/null, so the link holds the only references to what they were."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in fds:
            os.dup2(null, fd)
    finally:
        os.close(null)


async def open_stdio(protocol_factory: ProtocolFactory, *, stdin: int = 0, stdout: int = 1,
                     detach: bool = True) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """A link over this process's stdin and stdout (``ssh host sockmuxd --stdio``).

    Both descriptors are duplicated for the link. With *detach* (the default), once the link
    is up *stdin* and *stdout* are pointed at /dev/null: a stray ``print`` cannot corrupt the
    link, and closing the link really closes the pipes, so the peer sees EOF before this
    process exits.

    * Pipes (or anything but the cases below): a :class:`PipePairTransport`.
    * The same socket on both (sshd's socketpair, inetd, systemd ``StandardInput=socket``):
      the loop's socket transport, with a real half-close through ``write_eof``.
    * A tty: raw mode (see :func:`set_raw`) while the link is up; its settings and blocking
      mode are restored when the link closes (``ssh -t`` or a manual run stay usable).
    """
    loop = asyncio.get_running_loop()
    st_in, st_out = os.fstat(stdin), os.fstat(stdout)
    if ((st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino)
            and stat.S_ISSOCK(st_in.st_mode)):
        sock = socket.socket(fileno=os.dup(stdin))
        try:
            transport, protocol = await loop.connect_accepted_socket(protocol_factory, sock)
        except BaseException:
            sock.close()
            raise
        _tune_tcp(transport)
        if detach:
            _detach(stdin, stdout)
        return transport, protocol

    cleanups: list[Callable[[], None]] = []
    rfd = os.dup(stdin)
    try:
        wfd = os.dup(stdout)
    except BaseException:
        os.close(rfd)
        raise
    try:
        if os.isatty(rfd):
            cleanups.append(_raw_until_cleanup(rfd))
        if os.isatty(wfd) and not _same_file(rfd, wfd):
            cleanups.append(_raw_until_cleanup(wfd))
        same = _same_file(rfd, wfd)
    except BaseException:
        for restore in cleanups:
            restore()
        os.close(rfd)
        os.close(wfd)
        raise
    try:
        pair, protocol = await _open_pair(rfd, wfd, protocol_factory, can_write_eof=not same,
                                          extra={"peername": "stdio"}, cleanups=cleanups)
    except BaseException:
        for restore in cleanups:
            restore()
        raise
    if detach:
        _detach(stdin, stdout)
    return pair, protocol


# --- command --------------------------------------------------------------------------------

class _Child:
    """Watches a command's process: reaps it the moment it exits (pidfd, else polling), and on
    :meth:`finish` waits for it, escalating to SIGTERM and SIGKILL."""

    def __init__(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[bytes],
                 name: str, terminate_timeout: float, kill_timeout: float) -> None:
        self.loop = loop
        self.proc = proc
        self.name = name
        self.terminate_timeout = terminate_timeout
        self.kill_timeout = kill_timeout
        self._waiters: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._watch = ExitWatch(loop, proc, self._exited, CHILD_POLL_INTERVAL)

    def _exited(self) -> None:
        self._stop_watching()
        code = self.proc.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        log.log(logging.INFO if code else logging.DEBUG, "command %s (pid %d) %s",
                self.name, self.proc.pid, how)
        waiters, self._waiters = self._waiters, []
        for callback in waiters:
            callback()

    def _stop_watching(self) -> None:
        self._watch.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def finish(self, callback: Callable[[], None]) -> None:
        """Call *callback* once the process is reaped; make it exit if it does not by itself."""
        if self.proc.returncode is not None:
            self._stop_watching()
            callback()
            return
        self._waiters.append(callback)
        if self._timer is None:
            self._timer = self.loop.call_later(self.terminate_timeout, self._terminate)

    def _terminate(self) -> None:
        if self.proc.returncode is None:
            log.info("command %s (pid %d) still running after its link closed: SIGTERM",
                     self.name, self.proc.pid)
            self.proc.terminate()
        self._timer = self.loop.call_later(self.kill_timeout, self._kill)

    def _kill(self) -> None:
        self._timer = None
        if self.proc.returncode is None:
            log.warning("command %s (pid %d) ignored SIGTERM: SIGKILL",
                        self.name, self.proc.pid)
            self.proc.kill()

    def kill_now(self) -> None:
        """Error path: kill and reap synchronously (SIGKILL makes the wait short)."""
        self._stop_watching()
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait()


async def open_command(argv: Sequence[str], protocol_factory: ProtocolFactory, *,
                       terminate_timeout: float = 2.0, kill_timeout: float = 3.0,
                       env: dict[str, str] | None = None, cwd: str | None = None
                       ) -> tuple[PipePairTransport, asyncio.BaseProtocol]:
    """A link over a command's stdout (read) and stdin (write), e.g. ``["ssh", "host",
    "sockmuxd", "--stdio"]``. No shell; other descriptors are not inherited; its stderr is ours.

    The command ending closes its stdout: EOF on the link. Closing the link closes its stdin;
    ``connection_lost`` comes once the process has been reaped, after at most
    *terminate_timeout* + *kill_timeout* seconds (see the module docstring).
    ``get_extra_info("subprocess")`` is the ``subprocess.Popen`` (``returncode`` is set once
    reaped). Raises OSError (FileNotFoundError, PermissionError) if it cannot be started.
    """
    argv = [os.fspath(a) for a in argv]
    if not argv:
        raise ValueError("empty command")
    loop = asyncio.get_running_loop()
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    try:
        proc = subprocess.Popen(argv, stdin=to_child_r, stdout=from_child_w, stderr=None,
                                close_fds=True, env=env, cwd=cwd)
    except BaseException:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            os.close(fd)
        raise
    os.close(to_child_r)
    os.close(from_child_w)
    name = shlex.join(argv)
    child = _Child(loop, proc, name, terminate_timeout, kill_timeout)
    try:
        return await _open_pair(from_child_r, to_child_w, protocol_factory, can_write_eof=True,
                                extra={"peername": f"command:{name}", "subprocess": proc},
                                finalizer=child.finish)
    except BaseException:
        child.kill_now()
        raise


# --- re-dial pacing -------------------------------------------------------------------------

class Backoff:
    """Delays between a connector's dial attempts: exponential, capped, jittered. Pure (no
    clock, no I/O); *rng* (``random.Random``-like, only ``random()`` is used) makes it
    deterministic for tests.

    The n-th delay since the last reset (n = 0, 1, ...) is drawn uniformly from
    ``(b * (1 - jitter), b]`` with ``b = min(maximum, initial * factor**n)``: never above
    *maximum*, and peers that lost a link together do not re-dial in lockstep. A driver::

        backoff = Backoff()
        while True:
            try:
                transport, protocol = await connect_tcp(host, port, factory, tls=ctx)
            except OSError:                     # includes TimeoutError and SSL errors
                await asyncio.sleep(backoff.next_delay())
                continue
            up = loop.time()
            await protocol.closed               # however the driver learns of connection_lost
            backoff.link_closed(loop.time() - up)
            await asyncio.sleep(backoff.next_delay())

    :meth:`link_closed` resets the sequence when the link had stayed up for *stable_after*
    seconds, so a link that lived for hours is re-dialled promptly, while one the peer keeps
    dropping straight after setup is paced like a failed dial.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0,
                 jitter: float = 0.2, *, stable_after: float = 10.0,
                 rng: Any = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("need 0 < initial <= maximum")
        if factor < 1:
            raise ValueError("factor must be >= 1")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.stable_after = stable_after
        self._rng = rng if rng is not None else random.Random()
        self._base = initial

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; advances the sequence."""
        base = self._base
        self._base = min(self.maximum, base * self.factor)
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """Start again from *initial* (after a link that worked)."""
        self._base = self.initial

    def link_closed(self, uptime: float) -> None:
        """Report that a link ended after *uptime* seconds; resets if it had been stable."""
        if uptime >= self.stable_after:
            self.reset()
