"""The buffered write side of sockmuxd's own link transports (ttys and sockets, TLS).

Both write at once what the descriptor takes and keep the rest, call the protocol's
``pause_writing``/``resume_writing`` at the high/low marks, and drain the rest from a
writability callback. :class:`BufferedWrites` is that, once: a transport supplies
``_raw_write`` (one write system call, which may raise BlockingIOError), ``_write_failed``
(an error: abort) and ``_drained`` (the buffer has emptied: e.g. finish a close), and sets
``_loop``, ``_fd`` and ``_protocol`` before calling :meth:`_init_writes`.
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

    def _raw_write(self, data: bytes | bytearray | memoryview) -> int:
        raise NotImplementedError

    def _write_failed(self, exc: OSError) -> None:
        raise NotImplementedError

    def _drained(self) -> None:
        """The buffer has just been emptied by the writability callback."""

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
            self._write_failed(exc)
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
            self._write_failed(exc)
            return
        del self._buffer[:n]
        self._maybe_resume()
        if not self._buffer:
            self._stop_writing()
            self._drained()

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
