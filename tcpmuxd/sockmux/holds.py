"""Streams held before they open, and EOFs held until a server goes quiet.

* An entrance connection that arrives while no link is up is refused at once (reset), or,
  with ``hold_timeout``, held (not read; at most ``max_streams`` of them) until a link is up
  or the time is over, then reset: never queued without bound.
* A new entrance connection waits up to ``first_data_wait`` for its client's first bytes:
  they ride in CONNECT, which saves the peer's exit a round trip for protocols where the
  client speaks first (HTTP, TLS, most); server-first protocols open that much later.
* Towards a peer without half-close (DeleGate, or ``--no-extensions``) an exit that got first
  data answers CONNECTED once its server's first bytes are there, or after ``reply_wait``; and
  an entrance client's EOF is passed on once the server has sent nothing for ``reply_wait``
  (0: neither waits). See :meth:`Stream.exit_connected <tcpmuxd.sockmux.stream.Stream>` and
  ``Stream._end``.

:class:`Holds` keeps these waits for the :class:`~tcpmuxd.sockmux.session.Hub` and opens an
entrance connection's stream when its wait is over.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .frames import LocalProtocolError
from .stream import (
    CONNECTING, FIRST_DATA, LINK_WAIT, LocalEnd, Stream, reset_transport, wire_text,
)
from .waits import Waits

if TYPE_CHECKING:
    from .linksession import Session
    from .session import Hub

__all__ = ["Holds"]


class Holds:
    """The streams of one tunnel that wait before they open (see the module docstring)."""

    def __init__(self, hub: Hub, hold_timeout: float, first_data_wait: float,
                 reply_wait: float) -> None:
        self.hub = hub
        loop = hub.loop
        #: Entrance connections that arrive while no link is up wait this long for one
        #: (0: refused at once). At most max_streams wait; reading them is paused.
        self.hold_timeout = hold_timeout
        self.waiting: dict[Stream, asyncio.TimerHandle] = {}
        self.first_wait: Waits = Waits(loop, first_data_wait, self.release)
        self.reply_waits: Waits = Waits(loop, reply_wait, self.release)
        self.eof_waits: Waits = Waits(loop, reply_wait, self._pass_eof_on)

    @property
    def first_data_wait(self) -> float:
        return self.first_wait.delay

    @first_data_wait.setter
    def first_data_wait(self, seconds: float) -> None:
        self.first_wait.delay = seconds

    @property
    def reply_wait(self) -> float:
        return self.reply_waits.delay

    @reply_wait.setter
    def reply_wait(self, seconds: float) -> None:
        self.reply_waits.delay = self.eof_waits.delay = seconds

    def admit(self, stream: Stream, wait: bool) -> None:
        """Open a stream for an entrance connection: after its first bytes (``wait``), now,
        or once a link is up (hold_timeout); else reset it."""
        hub = self.hub
        session = hub.current
        if session is not None and session.ready and not session.closed:
            f = session.conn.features
            if (wait and self.first_data_wait > 0 and f is not None and f.conndata
                    and stream.pending is None and stream.local_end is LocalEnd.READING):
                stream.enter(FIRST_DATA)
                self.first_wait.add(stream)
                return
            self.open(stream, session)
            return
        if (self.hold_timeout > 0 and not hub.closing
                and len(self.waiting) < hub.config.max_streams):
            stream.enter(LINK_WAIT)
            self.waiting[stream] = hub.loop.call_later(
                self.hold_timeout, self.unhold, stream,
                f"no link within {self.hold_timeout:g} s")
            return
        hub.stats.entrance_refused += 1
        stream.refused("refused: the link is down")
        reset_transport(stream.transport)

    def first_data(self, stream: Stream) -> bool:
        """The first bytes (or EOF) of a held stream's local socket came: an entrance
        connection's stream opens, an exit's CONNECTED goes. True while the stream still
        holds bytes (no link yet, or too many for CONNECT): the caller pauses its reading. (A
        result rather than a second look at ``stream.pending``: the compiled caller had
        narrowed it to ``bytes``.)"""
        if self.first_wait.discard(stream) or self.reply_waits.discard(stream):
            self.release(stream)
        return stream.pending is not None

    def release(self, stream: Stream) -> None:
        """A held stream's wait for its local socket's first bytes is over, whether they came
        or not: open it (an entrance connection) or answer CONNECTED (an exit)."""
        if stream.outbound:
            if not stream.lost:
                self.admit(stream, wait=False)
        elif stream.sid is not None and stream.connected_as is not None:
            server_addr, local_addr, _ = stream.connected_as
            stream.accept(server_addr or "-", local_addr or "-")

    def _pass_eof_on(self, stream: Stream) -> None:
        """The server of a stream whose client sent EOF was quiet for reply_wait: pass the
        EOF on now (see Stream._end)."""
        if stream.local_end is LocalEnd.DEFERRED and stream.sid is not None:
            stream.end_now()

    def unhold(self, stream: Stream, why: str) -> None:
        """Give up on a held entrance connection: reset it. (An exit held for its server's
        first bytes only stops waiting: its stream's close or refusal follows.)"""
        self.first_wait.discard(stream)
        self.reply_waits.discard(stream)
        timer = self.waiting.pop(stream, None)
        if timer is not None:
            timer.cancel()
        if stream.outbound and (stream.phase is LINK_WAIT
                                or stream.phase is FIRST_DATA):
            self.hub.stats.entrance_refused += 1
            stream.refused(f"refused: {why}")
            if not stream.lost:
                reset_transport(stream.transport)

    def open(self, stream: Stream, session: Session) -> None:
        """CONNECT for an entrance connection, with its first bytes if they fit."""
        hub = self.hub
        first = b""
        p = stream.pending
        if p is not None and len(p) <= session.conn.max_first_data:
            first = p
        try:
            sid = session.conn.open_stream(wire_text(stream.client),
                                           wire_text(stream.entrance), first)
        except LocalProtocolError as exc:  # TooManyStreams among them
            hub.stats.refused += 1
            stream.refused(f"refused: {exc}")
            reset_transport(stream.transport)
            return
        if first:
            stream.pending = None
            stream.up += len(first)
        stream.session = session
        stream.sid = stream.number = sid
        stream.enter(CONNECTING)
        session.streams[sid] = stream
        session._flush()
        hub._changed()

    def link_ready(self, session: Session) -> None:
        """A link is up: the connections held for one open their streams."""
        waiting, self.waiting = self.waiting, {}
        for stream, timer in waiting.items():
            timer.cancel()
            if not stream.lost:
                self.open(stream, session)

    def close(self, reason: str) -> None:
        """The tunnel stops: held connections are reset, the waits end."""
        for stream in list(self.waiting) + self.first_wait.clear():
            self.unhold(stream, reason)
        self.reply_waits.clear()  # exits and entrances of the links closed next
        self.eof_waits.clear()
