"""The buffered write side, and the close, of sockmuxd's own link transports (ttys and
sockets: :class:`~tcpmuxd.sockmux.pipelink.FdWriteTransport`; TLS:
:class:`~tcpmuxd.sockmux.tlslink.TLSTransport`).

Both write at once what the descriptor takes and keep the rest, call the protocol's
``pause_writing``/``resume_writing`` at the high/low marks, drain the rest from a writability
callback, and end the same way: ``close()`` finishes once the buffer is flushed, ``abort()``
(or a write error) drops it, and ``connection_lost`` is called exactly once, on the loop's
next pass, after which the transport releases its descriptor. :class:`BufferedWrites` is
that, once. A transport supplies ``_raw_write`` (one write system call, which may raise
BlockingIOError) and ``_release`` (close its descriptor), may extend ``_finish_close`` (what
a close does once the buffer is flushed: TLS sends close_notify) and ``_stop_reading`` (a
transport that reads stops when it closes), and sets ``_loop``, ``_fd`` and ``_protocol``
before calling :meth:`_init_writes`.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["BufferedWrites", "WRITE_BUFFER_HIGH", "WRITE_BUFFER_LOW"]

#: Default write-buffer marks (asyncio's).
WRITE_BUFFER_HIGH = 64 * 1024
WRITE_BUFFER_LOW = 16 * 1024


class BufferedWrites:
    _loop: asyncio.AbstractEventLoop
    _fd: int
    _protocol: Any

    def _init_writes(self) -> None:
        self._buffer = bytearray()
        self._high = WRITE_BUFFER_HIGH
        self._low = WRITE_BUFFER_LOW
        self._write_paused = False
        self._writing = False     # registered with the loop for writability
        self._closing = False
        self._lost = False        # connection_lost scheduled

    def _raw_write(self, data: bytes | bytearray | memoryview) -> int:
        raise NotImplementedError

    def _release(self) -> None:
        """Close the descriptor (after ``connection_lost``)."""
        raise NotImplementedError

    def _stop_reading(self) -> None:
        """A transport that reads stops here when it closes."""

    def _finish_close(self) -> None:
        """``close()`` and the buffer is flushed: the end."""
        self._schedule_lost(None)

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        """Write what the descriptor takes now (after what is already buffered), keep the rest."""
        if self._buffer:
            self._buffer += data
            self._maybe_pause()
            return
        try:
            n = self._raw_write(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._force_close(exc)
            return
        if n < len(data):
            self._keep(memoryview(data)[n:])

    def _keep(self, rest: bytes | bytearray | memoryview) -> None:
        """Buffer bytes the descriptor did not take; they go out when it is writable."""
        self._buffer += rest
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)
        self._maybe_pause()

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _write_ready(self) -> None:
        try:
            n = self._raw_write(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._force_close(exc)
            return
        del self._buffer[:n]
        self._maybe_resume()
        if not self._buffer:
            self._stop_writing()
            if self._closing:
                self._finish_close()

    def _maybe_pause(self) -> None:
        if not self._write_paused and len(self._buffer) > self._high:
            self._write_paused = True
            self._call_protocol("pause_writing")

    def _maybe_resume(self) -> None:
        if self._write_paused and len(self._buffer) <= self._low:
            self._write_paused = False
            self._call_protocol("resume_writing")

    def _call_protocol(self, name: str) -> None:
        try:
            getattr(self._protocol, name)()
        except Exception as exc:
            self._loop.call_exception_handler({
                "message": f"protocol.{name}() failed", "exception": exc,
                "transport": self, "protocol": self._protocol})

    # -- closing ---------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._buffer:
            self._finish_close()

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        """An error (``exc``) or abort: drop the buffer, stop, and report the end."""
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
            self._release()

    def get_protocol(self) -> Any:
        return self._protocol

    # -- write buffer limits ---------------------------------------------------------------

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
