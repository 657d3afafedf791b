"""One forwarded connection: :class:`Stream`, the protocol of its local socket's transport.

A stream joins a local TCP connection (a client accepted at an entrance, or the server an exit
connected to) to one stream of the link's
:class:`~tcpmuxd.sockmux.connection.SockMuxConnection`, with Protocol-style callbacks only: no
asyncio Streams, no task per stream on the data path.

Where the bytes go
------------------
::

    client --TCP--> entrance ---Stream.data_received---> conn.send_data() ---> link writelines
                                                                                   |
    server <--TCP-- exit <--Stream.deliver (write)--- DataReceived <--- conn.receive_data()

* **Local -> link.** ``Stream.data_received`` hands the chunk to ``send_data``, which takes at
  most the stream's send window (zero-copy: the chunk's ``bytes`` become the frame payload,
  or memoryviews of it when it takes several frames or more than the window). The session
  flushes ``data_to_send()`` once per loop iteration, before the loop polls again: what every
  callback of one poll round queued (data, SENT, CONNECT... of every stream) goes out in one
  ``writelines`` (one writev). What the window did not take stays in ``Stream.pending`` (one
  read's worth at most) and the local transport stops reading until ``WindowUpdated`` (the
  peer's SENT) gives credit back.
* **Link -> local.** ``DataReceived`` is written to the local transport at once. Local
  transports have ``set_write_buffer_limits(high=0)``: if the socket took everything the bytes
  are acknowledged to the connection right away; if anything stayed in the transport's buffer,
  ``pause_writing`` has been called, the count waits in ``Stream.unacked`` and is acknowledged
  by ``resume_writing``, when the buffer is empty. (The connection turns acknowledgements into
  SENT frames: one per SEND towards DeleGate, one per half window between sockmuxd peers; see
  docs/sockmux-protocol.md.) Credit goes back to the peer only for bytes that reached the
  socket, so a client that reads nothing stalls its own stream only: the peer stops sending to
  it once its window is used up, and every other stream goes on.
* **Link congestion.** Above the link's write-buffer high mark a stream that delivers data
  pauses itself after queueing it (``Session.link_blocked``), and pending data is held back;
  below the low mark they all resume (lazily: only streams that have something to send are
  paused, so a congestion episode costs nothing for the idle ones).
* **Half-close.** EOF from a local socket becomes ``end_stream`` (SHUT with the extension,
  else CLOSE, as DeleGate does) once the data before it has been handed over; ``StreamEnded``
  becomes ``write_eof()`` on the local socket after what is buffered. When both directions have
  ended the local socket is closed.

Memory: towards the local socket the transport buffer holds only bytes not yet acknowledged,
which the peer may not exceed (``receive window + 2 frames``: first data, urgent data);
towards the link ``Stream.pending`` holds at most one read (256 KiB, the loops' read size:
reading stops as soon as something is pending), and the frames of a stream queued for the link
never exceed its send window. An idle stream costs its two sockets' transports and two small
objects: 2-4 KiB measured per side (RSS, uvloop).

States
------
A stream's life is :class:`Phase` (the table is :data:`PHASES`); its local direction is
:class:`LocalEnd`, and ``eof_remote`` says whether the peer ended its direction.

==========  ================================================================================
NEW         made: an entrance connection accepted, or a CONNECT from the peer
LINK_WAIT   entrance: held, not read, until a link is up (``Holds.hold_timeout``)
FIRST_DATA  entrance: waiting up to ``Holds.first_data_wait`` for its client's first bytes,
            which ride in CONNECT
CONNECTING  entrance: CONNECT sent, waiting for CONNECTED; exit: its server being connected
REPLY_WAIT  exit towards a peer without half-close: connected, waiting up to
            ``Holds.reply_wait`` for its server's first bytes, which ride in CONNECTED
OPEN        accepted both ways: the data flows
CLOSED      over for the protocol (its id is forgotten); the local socket may still flush
FINISHED    counted and logged (terminal)
==========  ================================================================================

Only LINK_WAIT, FIRST_DATA, CONNECTING, REPLY_WAIT and OPEN streams hold a stream id
(``sid``) of a session, except the waits of an entrance (LINK_WAIT, FIRST_DATA), which have no
link yet.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Callable, Final, Protocol

from ..common.words import counted
from .connection import REASON_CLOSE
from .frames import LocalProtocolError, concat

if TYPE_CHECKING:
    from .linksession import Session
    from .session import Hub

__all__ = ["Stream", "Phase", "LocalEnd", "PHASES", "NEW", "LINK_WAIT", "FIRST_DATA",
           "CONNECTING", "REPLY_WAIT", "OPEN", "CLOSED", "FINISHED", "Opening", "reset_transport",
           "wire_text", "CLOSE_LINGER"]

#: A local socket being closed gracefully is reset after this long without write progress.
CLOSE_LINGER: Final = 10.0

_RST: Final = struct.pack("ii", 1, 0)


def reset_transport(transport: Any) -> None:
    """Close with RST where possible (SO_LINGER 0), so the other end sees a reset, not EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        except (OSError, ValueError):
            pass
    transport.abort()


def wire_text(text: str) -> str:
    """A text fit for a CONNECT/CONNECTED address: visible ASCII, no spaces, bounded."""
    if text.isascii() and text.isprintable() and " " not in text and 0 < len(text) <= 200:
        return text
    clean = "".join(c if "!" <= c <= "~" else "_" for c in text)[:200]
    return clean or "-"


class Opening(Protocol):
    """An exit being opened (what the exit opener returns): a Task, or its own lighter kind."""

    def done(self) -> bool: ...

    def cancel(self) -> bool: ...


class Phase(enum.Enum):
    """The life of a stream (see the module docstring)."""

    __hash__ = object.__hash__  # identity, as connection.py's states: looked up per stream

    NEW = "NEW"
    LINK_WAIT = "LINK_WAIT"
    FIRST_DATA = "FIRST_DATA"
    CONNECTING = "CONNECTING"
    REPLY_WAIT = "REPLY_WAIT"
    OPEN = "OPEN"
    CLOSED = "CLOSED"
    FINISHED = "FINISHED"


class LocalEnd(enum.Enum):
    """The local socket's direction: how far its EOF has come."""

    __hash__ = object.__hash__

    READING = "READING"  # no EOF yet
    EOF = "EOF"  # EOF read, not passed on yet (data before it pending, or not open yet)
    DEFERRED = "DEFERRED"  # passed on once the server is quiet (Holds.reply_wait, Stream._end)
    ENDED = "ENDED"  # passed on: end_stream() called


_P: Final = Phase
#: Phase transitions: phase -> the phases it may go to.
PHASES: Final[dict[Phase, frozenset[Phase]]] = {
    _P.NEW: frozenset({_P.LINK_WAIT, _P.FIRST_DATA, _P.CONNECTING, _P.CLOSED}),
    _P.LINK_WAIT: frozenset({_P.CONNECTING, _P.CLOSED}),
    _P.FIRST_DATA: frozenset({_P.LINK_WAIT, _P.CONNECTING, _P.CLOSED}),
    _P.CONNECTING: frozenset({_P.OPEN, _P.REPLY_WAIT, _P.CLOSED}),
    _P.REPLY_WAIT: frozenset({_P.OPEN, _P.CLOSED}),
    _P.OPEN: frozenset({_P.CLOSED}),
    _P.CLOSED: frozenset({_P.FINISHED}),
    _P.FINISHED: frozenset(),
}
# The phases as C statics once compiled (a class attribute of the enum would be looked up
# at every use).
NEW: Final = Phase.NEW
LINK_WAIT: Final = Phase.LINK_WAIT
FIRST_DATA: Final = Phase.FIRST_DATA
CONNECTING: Final = Phase.CONNECTING
REPLY_WAIT: Final = Phase.REPLY_WAIT
OPEN: Final = Phase.OPEN
CLOSED: Final = Phase.CLOSED
FINISHED: Final = Phase.FINISHED
_READING: Final = LocalEnd.READING
_EOF: Final = LocalEnd.EOF
_DEFERRED: Final = LocalEnd.DEFERRED
_ENDED: Final = LocalEnd.ENDED


class Stream(asyncio.Protocol):
    """One forwarded connection: the protocol of its local transport, and its state.

    ``outbound``: accepted at one of our entrances (we opened the stream); otherwise the peer
    opened it and we connected an exit. ``sid`` is the connection's stream id while the stream
    is attached to a session, ``None`` once it is over for the protocol (the local socket may
    still be flushing). See the module docstring for the data path and the phases.
    """

    __slots__ = (
        "hub", "session", "sid", "number", "outbound", "transport", "label", "client",
        "entrance", "target", "pending", "early", "phase", "local_end", "eof_remote",
        "reading", "write_paused", "unacked", "up", "down", "started", "reason", "linger",
        "linger_size", "task", "deadline", "connected_as", "lost", "on_finish",
    )

    def __init__(self, hub: Hub, outbound: bool, label: str = "") -> None:
        self.hub = hub
        self.session: Session | None = None
        self.sid: int | None = None
        self.number = 0  # the stream id, kept for the log record
        self.outbound = outbound
        self.transport: Any = None
        self.label = label  # entrance label (outbound) or exit target (inbound)
        self.client = ""  # the client's HOST:PORT (ours for outbound, the peer's for inbound)
        self.entrance = ""  # the entrance HOST:PORT the client came in at
        self.target = ""  # where it went: the peer's server (outbound) or our exit (inbound)
        self.pending: bytes | None = None  # local bytes the window did not take yet
        self.early: bytes | None = None  # peer's first data, to write once the exit is up
        self.phase = NEW
        self.local_end = _READING
        self.eof_remote = False  # the peer ended its direction (StreamEnded)
        self.reading = True
        self.write_paused = False
        self.unacked = 0  # written into the local transport's buffer, not acknowledged yet
        self.up = 0  # bytes local -> link
        self.down = 0  # bytes link -> local
        self.started = time.monotonic()
        self.reason: str | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.linger_size = 0
        self.task: Opening | None = None  # the exit opener's, while it connects
        self.deadline: asyncio.TimerHandle | None = None  # ends the task after connect_timeout
        # What CONNECTED reports once the exit's transport is made (the exit opener sets it):
        # server and local address (None: the transport's), and the target for the log.
        self.connected_as: tuple[str | None, str | None, str | None] | None = None
        self.lost = False  # the local transport is gone (connection_lost)
        self.on_finish: Callable[[Stream], None] | None = None

    def waiting(self) -> bool:
        """Held for a link or for the local socket's first bytes."""
        phase = self.phase
        return phase is LINK_WAIT or phase is FIRST_DATA or phase is REPLY_WAIT

    def enter(self, phase: Phase) -> None:
        """Go to ``phase``; a move the table does not have is a bug in the driver."""
        if phase not in PHASES[self.phase]:
            raise AssertionError(f"no stream transition {self.phase} -> {phase}")
        self.phase = phase

    # -- the local transport's callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]
        # An entrance connection is admitted; an exit answers CONNECTED now (the event loop
        # makes the protocol before it resumes the opener's connect coroutine, which would be
        # one iteration later).
        if self.outbound or self.connected_as is not None:
            self.hub._connection_made(self)

    def data_received(self, data: bytes) -> None:
        sid = self.sid
        if sid is None or self.phase is not OPEN or self.pending is not None:
            self._hold(data)
            return
        session = self.session
        assert session is not None
        try:
            n = session.conn.send_data(sid, data)
        except LocalProtocolError:  # closed under us; its event detaches it
            return
        self.up += n
        session._flush()
        if n < len(data):
            self.pending = data[n:]
            self._pause()
        elif session.link_paused:
            self._pause()
            session.link_blocked.add(self)

    def _hold(self, data: bytes) -> None:
        """Local bytes that cannot be sent now: the stream is not open yet, or bytes before
        them are still pending. Kept (reading pauses); the first bytes of a stream waiting for
        them open it (they ride in CONNECT / CONNECTED)."""
        phase = self.phase
        if phase is CLOSED or phase is FINISHED:
            return
        self.pending = data if self.pending is None else concat(self.pending, data)
        if not self.waiting() or self.hub.holds.first_data(self):  # held on: no link yet, or
            self._pause()  # too many for CONNECT, or the stream is not open yet

    def eof_received(self) -> bool:
        self.local_end = _EOF
        phase = self.phase
        if self.waiting():  # an entrance waiting for its first bytes, or an exit for the server's
            self.hub.holds.first_data(self)
            return True
        if self.sid is None:
            return False
        if self.pending is None and phase is OPEN:
            self._end()
        return True  # the transport stays open for the other direction (or _end closed it)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        n = self.unacked
        if n and self.sid is not None:
            self.unacked = 0
            session = self.session
            assert session is not None
            session.conn.acknowledge(self.sid, n)
            session._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiting():  # (an exit held for its server: the close below refuses it)
            self.hub.holds.unhold(self, "the client left before its stream was opened")
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        sid, session = self.sid, self.session
        if sid is not None and session is not None:
            who = "client" if self.outbound else "server"
            if exc is not None:
                reason = f"{who} connection failed: {exc}"
            elif self.local_end is not _READING:
                reason = f"closed by the {who}"
            else:
                reason = f"{who} connection closed"
            session.conn.close_stream(sid, REASON_CLOSE)
            self.detach(reason)
            session._flush()
        self.finish()

    # -- link -> local -----------------------------------------------------------------------

    def deliver(self, data: bytes) -> None:
        """Write bytes from the peer; acknowledge them once they are in the socket."""
        self.down += len(data)
        if self.local_end is _DEFERRED:  # the server is not quiet yet: the client's EOF waits on
            self.hub.holds.eof_waits.add(self)
        transport = self.transport
        if self.write_paused:
            self.unacked += len(data)
            transport.write(data)
            return
        transport.write(data)
        if self.write_paused:  # pause_writing() ran inside write(): part of it is buffered
            self.unacked += len(data)
        else:
            session, sid = self.session, self.sid
            assert session is not None and sid is not None  # attached: data comes on a stream
            session.conn.acknowledge(sid, len(data))

    def accepted(self, server_addr: str, first_data: bytes) -> None:
        """The peer connected this (entrance) stream to its server (StreamAccepted)."""
        self.enter(OPEN)
        self.target = server_addr
        self.hub.stats.accepted += 1
        if first_data:
            self.deliver(first_data)
        self.kick()

    def remote_ended(self) -> None:
        """The peer ended its direction (StreamEnded): EOF to the local socket."""
        self.eof_remote = True
        t = self.transport
        if t is not None and not t.is_closing():
            try:
                if t.can_write_eof():
                    t.write_eof()
            except (OSError, RuntimeError):
                pass
        if self.local_end is _ENDED:  # both directions are over: the connection closed it
            self.detach("closed")
            self.close_local(abort=False)

    def closed_by_peer(self, reason: str) -> None:
        """The peer closed or refused the stream (StreamClosed)."""
        if self.phase is not OPEN:
            self.hub.stats.refused += 1
            self.detach(f"refused by the peer: {reason}")
        elif self.local_end is _ENDED and reason == REASON_CLOSE:
            self.detach("closed")  # our EOF went first; the peer's CLOSE is its EOF
        else:
            self.detach(f"closed by the peer ({reason})")
        self.close_local(abort=False)

    # -- local -> link -----------------------------------------------------------------------

    def _pause(self) -> None:
        if self.reading:
            self.reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if not self.reading and self.local_end is _READING:
            self.reading = True
            self.transport.resume_reading()

    def kick(self) -> None:
        """Credit came back, the stream was accepted or the link drained: send what is
        pending, then read again (or end the stream, if the local side had ended it)."""
        session = self.session
        sid = self.sid
        if sid is None or session is None or self.phase is not OPEN:
            return
        if session.link_paused:
            session.link_blocked.add(self)
            return
        p = self.pending
        if p is not None:
            try:
                n = session.conn.send_data(sid, p)
            except LocalProtocolError:
                return
            self.up += n
            if n < len(p):
                self.pending = p[n:]
                return
            self.pending = None
        local_end = self.local_end
        if local_end is _READING:
            if self.transport is not None:
                self._resume()
        elif local_end is not _ENDED:
            self._end()

    def _end(self) -> None:
        """The local side's EOF, passed on (after every byte before it).

        Without half-close (DeleGate) the EOF ends the stream both ways, and the peer drops
        what its server sends after it. So the EOF of a client that got nothing yet waits
        until the server has sent nothing for ``Holds.reply_wait``: the answer to a request the
        client sent with its EOF (``echo request | nc``) still comes through. A server that
        waits for the EOF gets it that much later. A client that got something already is
        most likely done (and its stream's slot is worth more: DeleGate has 60)."""
        session = self.session
        assert session is not None and self.sid is not None
        features = session.conn.features
        plain = features is None or not features.half_close
        deferred = self.local_end is _DEFERRED
        if plain and self.outbound and (deferred or self.down == 0) \
                and session.hub.holds.reply_wait > 0:
            if not deferred:
                self.local_end = _DEFERRED
                session.hub.holds.eof_waits.add(self)
            return
        self.end_now()

    def end_now(self) -> None:
        """Pass the local side's EOF on now (end_stream)."""
        session = self.session
        assert session is not None and self.sid is not None
        try:
            session.conn.end_stream(self.sid)
        except LocalProtocolError:
            return
        deferred = self.local_end is _DEFERRED
        self.local_end = _ENDED
        session._flush()
        features = session.conn.features
        who = "client" if self.outbound else "server"
        if features is None or not features.half_close:  # plain SockMux: EOF ends both ways
            waited = session.hub.holds.reply_wait if deferred else 0.0
            self.detach(f"closed by the {who}" + (
                f" (its EOF passed on once the server was quiet for {waited:g} s)"
                if waited else ""))
            self.close_local(abort=False)
        elif self.eof_remote:  # the peer had ended already: the stream is closed now
            self.detach("closed")
            self.close_local(abort=False)

    # -- exits -------------------------------------------------------------------------------

    def exit_connected(self, server_addr: str, local_addr: str, target: str | None) -> None:
        """The exit's transport is made (the hub names its ends: see connected_as).

        The peer's first data goes to the server at once. Towards a peer without half-close
        (DeleGate), CONNECTED then waits up to ``Holds.reply_wait`` for the server's answer to
        them and carries its first bytes, as DeleGate does (for 1 ms): its entrance reads its
        client only after CONNECTED, and on the client's EOF it closes the whole stream and
        drops what comes later, so the answer to a request sent with the client's EOF reaches
        it only inside CONNECTED."""
        self.task = None
        self._stop_deadline()
        if target is not None:
            self.target = target
        session = self.session
        if self.sid is None or session is None:  # the peer gave up, or the link died
            reset_transport(self.transport)
            self.finish()
            return
        early, self.early = self.early, None
        if early:
            self.deliver(early)
            holds = session.hub.holds
            f = session.conn.features
            if (holds.reply_wait > 0 and f is not None and f.conndata and not f.half_close
                    and self.pending is None and self.local_end is _READING):
                self.connected_as = (server_addr, local_addr, None)
                self.enter(REPLY_WAIT)
                holds.reply_waits.add(self)
                return
        self.accept(server_addr, local_addr)

    def accept(self, server_addr: str, local_addr: str) -> None:
        """CONNECTED, with what the server sent so far as its first data if it fits."""
        session = self.session
        assert session is not None and self.sid is not None
        first = b""
        p = self.pending
        if p is not None and len(p) <= session.conn.max_first_data:
            first, self.pending = p, None
            self.up += len(p)
        try:
            session.conn.accept_stream(self.sid, first, server_addr=wire_text(server_addr),
                                       local_addr=wire_text(local_addr))
        except LocalProtocolError as exc:
            self.detach(f"cannot accept: {exc}")
            self.close_local(abort=True)
            return
        self.enter(OPEN)
        session.hub.stats.accepted += 1
        self.kick()
        session._flush()

    def exit_failed(self, reason: str) -> None:
        """Called by the exit opener when the exit cannot be reached: refuse the stream."""
        self.task = None
        self._stop_deadline()
        session = self.session
        if self.sid is not None and session is not None:
            try:
                session.conn.refuse_stream(self.sid, reason[:400])
            except LocalProtocolError:
                pass
            session._flush()
            session.hub.stats.refused += 1
            self.detach(f"refused: {reason}")
        if self.transport is None:
            self.finish()

    # -- the end -----------------------------------------------------------------------------

    def refused(self, reason: str) -> None:
        """Never opened (no link, no exit, a limit): CLOSED with ``reason``, nothing to detach."""
        self.reason = reason
        self.enter(CLOSED)

    def detach(self, reason: str) -> None:
        """The stream is over for the protocol: forget its id (the connection may reuse it)."""
        sid, session = self.sid, self.session
        if sid is None or session is None:
            return
        self.sid = None
        if self.reason is None:
            self.reason = reason
        holds = session.hub.holds
        if self.phase is REPLY_WAIT:  # no longer waiting for the server's answer
            holds.reply_waits.discard(self)
        self.enter(CLOSED)
        if self.local_end is _DEFERRED:
            self.local_end = _EOF
            holds.eof_waits.discard(self)
        if session.streams.get(sid) is self:
            del session.streams[sid]
        session.link_blocked.discard(self)
        self.pending = self.early = None
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
        self._stop_deadline()

    def _stop_deadline(self) -> None:
        deadline = self.deadline
        if deadline is not None:
            self.deadline = None
            deadline.cancel()

    def close_local(self, abort: bool) -> None:
        t = self.transport
        if t is None:
            if self.task is None:
                self.finish()
            return
        if self.lost:
            return
        if abort:
            reset_transport(t)
            return
        t.close()
        if t.get_write_buffer_size() and self.linger is None:
            self.linger_size = t.get_write_buffer_size()
            self.linger = self.hub.loop.call_later(CLOSE_LINGER, self._linger_check)

    def _linger_check(self) -> None:
        self.linger = None
        t = self.transport
        if t is None or self.lost:
            return
        size = t.get_write_buffer_size()
        if size and size < self.linger_size:  # progress: wait some more
            self.linger_size = size
            self.linger = self.hub.loop.call_later(CLOSE_LINGER, self._linger_check)
        elif size:
            if self.reason is not None and "unread" not in self.reason:
                who = "client" if self.outbound else "server"
                self.reason += f"; {counted(size, 'byte')} unread by the {who}"
            reset_transport(t)

    def finish(self) -> None:
        """Counted and logged, once (the local socket is gone, or never was)."""
        phase = self.phase
        if phase is FINISHED:
            return
        if phase is not CLOSED:  # never opened (refused, given up): closed as it finishes
            self.enter(CLOSED)
        self.enter(FINISHED)
        self.hub._stream_finished(self)
        if self.on_finish is not None:
            self.on_finish(self)

    def __repr__(self) -> str:
        return (f"<Stream {self.number} {'out' if self.outbound else 'in'} sid={self.sid} "
                f"{self.phase.value} up={self.up} down={self.down} reason={self.reason!r}>")
