"""Streams that each wait the same short time for something from their local socket.

Three such waits exist (:class:`~tcpmuxd.sockmux.session.Hub` holds them): a new entrance
connection waits for its client's first bytes (they ride in CONNECT), an exit towards a peer
without half-close waits for its server's first bytes (they ride in CONNECTED), and a
client's EOF towards such a peer waits for its server to go quiet. See
:class:`~tcpmuxd.sockmux.stream.Stream` for when each starts and ends.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .stream import Stream

__all__ = ["Waits"]


class Waits:
    """Streams that each wait the same time for something from their local socket.

    They all wait ``delay`` seconds, so insertion order is deadline order and one timer for
    the oldest serves them all: a timer per stream, set and cancelled thousands of times a
    second, costs more than the wait saves. :meth:`add` (re)starts a stream's wait;
    ``expired(stream)`` is called for each one whose time is up; :meth:`discard` ends a wait
    early (the awaited thing came, or the stream is over).
    """

    __slots__ = ("loop", "delay", "expired", "deadlines", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float,
                 expired: Callable[[Stream], None]) -> None:
        self.loop = loop
        self.delay = delay
        self.expired = expired
        self.deadlines: dict[Stream, float] = {}
        self.timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.deadlines)

    def add(self, stream: Stream) -> None:
        deadlines = self.deadlines
        deadlines.pop(stream, None)  # to the end: its deadline is the newest
        deadlines[stream] = self.loop.time() + self.delay
        if self.timer is None:
            self.timer = self.loop.call_later(self.delay, self._due)

    def discard(self, stream: Stream) -> bool:
        """End ``stream``'s wait; whether it was waiting."""
        return self.deadlines.pop(stream, None) is not None

    def _due(self) -> None:
        self.timer = None
        deadlines = self.deadlines
        now = self.loop.time()
        while deadlines:
            stream, deadline = next(iter(deadlines.items()))
            if deadline > now:
                self.timer = self.loop.call_at(deadline, self._due)
                return
            del deadlines[stream]
            self.expired(stream)

    def clear(self) -> list[Stream]:
        """Stop waiting for all; the streams that were waiting."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        streams = list(self.deadlines)
        self.deadlines.clear()
        return streams
