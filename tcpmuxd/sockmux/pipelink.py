"""Links over a pair of descriptors: :class:`PipePairTransport`, and the kinds that are files
opened by path: a pair of FIFOs (:func:`open_fifos`) and a character device (:func:`open_comm`).
Stdio and command links (:mod:`tcpmuxd.sockmux.links`) use the same transport
(:func:`open_pair`); so does :func:`connect_fds`, for two descriptors the caller has open.

A :class:`PipePairTransport` is a read transport from ``loop.connect_read_pipe`` and a write
transport, combined. The combination adds no Python call per chunk: the read transport calls
the link protocol's own bound ``data_received`` (or ``get_buffer``/``buffer_updated``), and
``write``/``writelines`` *are* the write transport's bound methods. The write transport is
``loop.connect_write_pipe`` for pipes and FIFOs, and :class:`FdWriteTransport` for ttys and
sockets: uvloop's write pipe transport reads from its descriptor to notice the reader going
away, which on a tty or socket steals the bytes meant for the read side, and asyncio's closes
itself on them.

Semantics (also in the class docstring): EOF on the read side calls ``eof_received``; a false
return closes the link, a true one keeps the write side open (half-close). ``write_eof()``
closes the write side, which is the peer's EOF (not on a comm device: a serial line has no
EOF). ``close()`` stops reading at once and closes the write side once its buffer is flushed;
``abort()`` drops the buffer. An error on either side aborts both. On a tty, EIO from a read
(the other end hung up) counts as EOF. ``connection_lost`` is called once both sides are gone
and everything the link owned is released: descriptors closed, a stdio tty's settings
restored, a command's process reaped.

asyncio's pipe transports have no BufferedProtocol support: under asyncio a BufferedProtocol
gets pipe bytes copied into its buffer (uvloop reads straight into it). Every descriptor is
O_CLOEXEC and owned by the transport from :func:`open_pair` on; descriptors passed in by number
are duplicated, the caller keeps (and closes) its own. Log records go to the link layer's
logger, ``tcpmuxd.sockmux.links``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import stat
import termios
from typing import Any, Callable, Iterable, Sequence

from tcpmuxd.sockmux.tlslink import takes_buffers
from tcpmuxd.sockmux.writebuf import BufferedWrites

__all__ = [
    "PipePairTransport", "FdWriteTransport", "ProtocolFactory", "open_pair", "connect_fds",
    "open_fifos", "open_comm", "set_raw", "feed", "same_file", "dup_pair",
]

log = logging.getLogger("tcpmuxd.sockmux.links")

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16


# --- handing bytes to a protocol --------------------------------------------------------------

def feed_buffered(protocol: Any, data: bytes) -> None:
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


def feed(protocol: Any, data: bytes) -> None:
    """Hand *data* to a protocol the way a transport would (bytes held during a link's
    setup, delivered once its protocol is there)."""
    if takes_buffers(protocol):
        feed_buffered(protocol, data)
    else:
        protocol.data_received(data)


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
            self.data_received = functools.partial(feed_buffered, protocol)
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

    # setup (used by open_pair)

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
            feed(self._protocol, data)
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
        self._end(flush=False)

    def _end(self, *, flush: bool) -> None:
        """Stop reading, and close the write side (after its buffer, with ``flush``)."""
        self._closing = True
        if not self._read_done and self._rt is not None:
            self._rt.close()
        if not self._write_done and self._wt is not None:
            if flush:
                self._wt.close()
            else:
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
        if not self._closing:
            self._end(flush=True)

    def abort(self) -> None:
        self._end(flush=False)

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


class FdWriteTransport(BufferedWrites, asyncio.WriteTransport):
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


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


async def open_pair(read_fd: int, write_fd: int, protocol_factory: ProtocolFactory, *,
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
        fd, write_fd = write_fd, -1
        if stat.S_ISFIFO(write_mode):
            wt = await _pipe_transport(loop.connect_write_pipe, pair._writer, fd, "wb")
        else:
            wt = FdWriteTransport(loop, fd, pair._writer)
        fd, read_fd = read_fd, -1
        rt = await _pipe_transport(loop.connect_read_pipe, pair._reader, fd, "rb")
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


async def _pipe_transport(connect: Any, protocol: asyncio.BaseProtocol, fd: int,
                          mode: str) -> Any:
    """The loop's read or write pipe transport (``connect``) over ``fd``, which it owns from
    the call on (closed if that fails)."""
    pipe = open(fd, mode, buffering=0)
    try:
        transport, _ = await connect(lambda: protocol, pipe)
    except BaseException:
        try:
            pipe.close()
        except OSError:  # uvloop may already have closed the descriptor
            pass
        raise
    return transport


def dup_pair(read_fd: int, write_fd: int) -> tuple[int, int]:
    """Duplicates of two descriptors (neither is left open if the second dup fails)."""
    r = os.dup(read_fd)
    try:
        return r, os.dup(write_fd)
    except BaseException:
        os.close(r)
        raise


async def connect_fds(read_fd: int, write_fd: int, protocol_factory: ProtocolFactory, *,
                      peername: str | None = None
                      ) -> tuple[PipePairTransport, asyncio.BaseProtocol]:
    """A link over two open descriptors (pipes, FIFOs, sockets or character devices; the same
    one twice for a bidirectional file). Both are duplicated: the caller keeps its own.
    ``write_eof`` is available when they are different files."""
    r, w = dup_pair(read_fd, write_fd)
    try:
        same = same_file(r, w)
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return await open_pair(r, w, protocol_factory, can_write_eof=not same,
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
    return await open_pair(rfd, wfd, protocol_factory, can_write_eof=True,
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
    return await open_pair(rfd, fd, protocol_factory, can_write_eof=False,
                            extra={"peername": f"comm:{name}", "device": device})
