"""Moving bytes between two sockets inside the event loop, for Forward= services.

Plain callbacks on raw non-blocking sockets (``add_reader``/``add_writer``), not asyncio
transports: a Forward= connection is mostly set-up and tear-down, and two transports plus their
protocol objects cost more than the whole relay below (measured with bench/dispatch.py). Each
direction reads a chunk and writes it straight on; what the destination does not take at once
waits, with reading from the source stopped, until the destination is writable again, so memory
per relay is bounded by one chunk per direction. EOF is passed on as a half-close, the way
systemd-socket-proxyd does it; the relay ends when both directions have ended, or at the first
error on either side (then both sockets are closed at once). A relay that is cut
(:meth:`Relay.abort`, the daemon stopping) resets both sockets, so that neither end mistakes
the cut for a normal end. The byte counts are what reached each destination. In an Accept=yes
instance, :func:`until_stopped` runs one relay as the whole of the process's work.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
from typing import Callable

#: Bytes read at once, and so the most a direction holds while its destination is full.
CHUNK = 256 * 1024
#: SO_LINGER on, timeout 0: close() sends a reset (RST) and drops what is unsent.
_RESET = struct.pack("ii", 1, 0)


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset, so that the peer sees a cut, never a normal end (EOF)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    except OSError:
        pass  # not TCP (a unix socket): a close is all there is
    sock.close()


class _Direction:
    """Bytes from ``src`` to ``dst``."""

    __slots__ = ("src", "dst", "pending", "eof", "done", "count")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src = src
        self.dst = dst
        self.pending: memoryview | None = None
        self.eof = False
        self.done = False
        self.count = 0


class Relay:
    """Both directions of one connection pair; ``on_done(a_to_b, b_to_a, error)`` at the end.

    Ownership of both sockets passes to the relay, which closes them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket,
                 on_done: Callable[[int, int, OSError | None], None]) -> None:
        self._loop = loop
        self._on_done = on_done
        self._finished = False
        a.setblocking(False)
        b.setblocking(False)
        self._forth = _Direction(a, b)
        self._back = _Direction(b, a)
        for d in (self._forth, self._back):
            loop.add_reader(d.src.fileno(), self._readable, d)

    def _readable(self, d: _Direction) -> None:
        try:
            data = d.src.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._finish(e)
            return
        if not data:
            self._loop.remove_reader(d.src.fileno())
            d.eof = True
            self._end_direction(d)
            return
        try:
            sent = d.dst.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:
            self._finish(e)
            return
        d.count += sent
        if sent < len(data):
            d.pending = memoryview(data)[sent:]
            self._loop.remove_reader(d.src.fileno())
            self._loop.add_writer(d.dst.fileno(), self._writable, d)

    def _writable(self, d: _Direction) -> None:
        assert d.pending is not None
        try:
            sent = d.dst.send(d.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._finish(e)
            return
        d.count += sent
        d.pending = d.pending[sent:] if sent < len(d.pending) else None
        if d.pending is not None:
            return
        self._loop.remove_writer(d.dst.fileno())
        if d.eof:
            self._end_direction(d)
        else:
            self._loop.add_reader(d.src.fileno(), self._readable, d)

    def _end_direction(self, d: _Direction) -> None:
        """The source said EOF: once its bytes are out, half-close the destination."""
        if d.pending is not None:
            return  # _writable comes back here when the rest is sent
        d.done = True
        try:
            d.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the other side is gone already; its own direction will say so
        if self._forth.done and self._back.done:
            self._finish(None)

    def _finish(self, error: OSError | None, cut: bool = False) -> None:
        if self._finished:
            return
        self._finished = True
        for d in (self._forth, self._back):
            fd = d.src.fileno()
            if fd >= 0:
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
        for d in (self._forth, self._back):
            if cut:
                reset(d.src)
            else:
                d.src.close()
        self._on_done(self._forth.count, self._back.count, error)

    def abort(self) -> None:
        """Cut both sides now (the daemon stopping): each gets a reset, not an EOF."""
        self._finish(None, cut=True)


async def until_stopped(client: socket.socket, upstream: socket.socket,
                        stop_timeout: float) -> tuple[int, int, OSError | None, str]:
    """Relay in a process of its own (an Accept=yes instance) until both directions end:
    (bytes in, bytes out, error, why it was cut or "").

    SIGTERM (the instance being stopped) lets the relay go on for up to ``stop_timeout``
    seconds, as in the daemon, a second one not; then both ends are reset, so that neither
    takes the cut for a normal end.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, int, OSError | None]] = loop.create_future()
    cut = ""

    def on_done(forth: int, back: int, error: OSError | None) -> None:
        if not done.done():
            done.set_result((forth, back, error))

    r = Relay(loop, client, upstream, on_done)

    timer: asyncio.TimerHandle | None = None

    def cut_now(why: str) -> None:
        nonlocal cut
        if not done.done():
            cut = why
            r.abort()

    def stopping() -> None:
        nonlocal timer
        if timer is None:
            timer = loop.call_later(stop_timeout, cut_now,
                                    f"cut (reset) at stop after {stop_timeout:g}s")
        else:
            cut_now("cut (reset) at stop, asked again to stop")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping)
    forth, back, error = await done
    return forth, back, error, cut
