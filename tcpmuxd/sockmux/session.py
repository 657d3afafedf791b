"""The asyncio driver of a SockMux tunnel: :class:`Hub` (one tunnel), :class:`Session` (one
link), :class:`Stream` (one forwarded connection).

The protocol itself is :class:`~tcpmuxd.sockmux.connection.SockMuxConnection` (sans-I/O); this
module moves bytes between it, the link transport (from :mod:`tcpmuxd.sockmux.links`) and the
local sockets, with Protocol-style callbacks only: no asyncio Streams, no task per stream on the
data path (an exit's connect is the one short-lived task, since opening a connection is a
coroutine).

Where the bytes go
------------------
::

    client --TCP--> entrance ---Stream.data_received---> conn.send_data() ---> link writelines
                                                                                   |
    server <--TCP-- exit <--Stream._deliver (write)--- DataReceived <--- conn.receive_data()

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
  docs/sockmux-protocol.md.) Credit goes back to the peer only for bytes
  that reached the socket, so a client that reads nothing stalls its own stream only: the
  peer stops sending to it once its window is used up, and every other stream goes on.
* **Link congestion.** The link transport has write-buffer limits :data:`LINK_WRITE_HIGH` /
  :data:`LINK_WRITE_LOW`. Above the high mark a stream that delivers data pauses itself after
  queueing it (``Session.link_blocked``), and pending data is held back; below the low mark
  they all resume. (Lazily: only streams that have something to send are paused, so a
  congestion episode costs nothing for the idle ones, however many there are.) Reading
  *the link* is never paused for data (two peers that both stopped reading while both had
  full buffers would deadlock), only for control frames: see Memory.
* **Half-close.** EOF from a local socket becomes ``end_stream`` (SHUT with the extension,
  else CLOSE, as DeleGate does) once the data before it has been handed over; ``StreamEnded``
  becomes ``write_eof()`` on the local socket after what is buffered. When both directions have
  ended the local socket is closed.

Memory (what bounds what)
-------------------------
Per stream, towards the local socket: the transport buffer holds only bytes not yet
acknowledged, which the peer may not exceed: ``receive window + 2 frames`` (first data, urgent
data). Towards the link: ``Stream.pending`` holds at most one read (256 KiB, the loops' read
size: reading stops as soon as something is pending), and the frames of a stream queued for the
link never exceed its send window, because everything in the link's buffer is unacknowledged
by definition. So the streams of one link hold at most
``max_streams * (2 * window + 256 KiB + 2 frames)``: with the defaults (1024 streams, 1 MiB
windows, 64 KiB frames) about 2.4 GiB, a worst case that needs every stream stalled in both
directions at once (OpenSSH's channels have 2 MiB windows and no stream limit at all);
``MaxStreams=`` and ``WindowSize=`` bound it further. On top of that: the decoder's one
incomplete frame, and the control frames in the link's write buffer. Those are mostly
answers the connection gives by itself to the peer's frames (ECHOOK to ECHO, HELLOOK to
HELLO, CLOSED to CLOSE, a CLOSE refusing a CONNECT, SENT for data written), so a peer that
sends such frames and reads nothing would make this side queue answers without limit: no
window bounds them. The session counts them (``conn.control_bytes_queued``: everything but
stream data) into :attr:`Session.unread_control`, an upper bound of the control bytes still
in the buffer (cut to the buffer's size, which FIFO order allows). Above
:attr:`Session.control_limit` (:data:`MAX_UNREAD_CONTROL`, at least ``link_high``) reading
the link pauses, until the buffer drains below ``link_low`` (``resume_writing``); if the
peer has not read by then within :attr:`Hub.send_timeout` seconds, the link is reset and
the record says why. Between two checks one read is answered at most: 256 KiB of the
peer's smallest frames, which HELLOOK (the largest answer to the smallest frame) turns
into about 1.5 MiB. Data never pauses the link: two peers with full buffers both go on
reading, so they cannot deadlock; control frames pile up only at a peer that does not read
them. An idle stream costs its two sockets' transports and two small objects: 2-4 KiB
measured per side (RSS, uvloop).

Link life
---------
A :class:`Session` is the link's protocol. It sends HELLO in ``connection_made``, runs a timer
at ``next_deadline()`` for keep-alive and dead-peer detection, and gives the handshake
(authentication included) :attr:`Hub.handshake_timeout` seconds. ``DeadPeer``,
``AuthenticationFailed``, a :class:`RemoteProtocolError`, EOF or an error on the link close it
with a logged reason; every stream it carried is reset on the local side (RST for TCP, so
neither end mistakes the cut for a complete transfer), and nothing waits for a peer that is
gone. A new link makes a new Session (and a new connection object).

A receptor admits links at accept (:meth:`Hub.admit_link`, before a byte is read): at most
:attr:`Hub.max_pending_links` being set up (TLS handshakes included), none from an address
whose failed link is being held. A link this side cuts before it was up (authentication,
handshake deadline, protocol error) may be held, unread, before its reset, longer after
each failure of its address, and only the first failure of an address per minute gets its
records (:mod:`tcpmuxd.sockmux.admission`): a peer that is refused and dials again at once,
as DeleGate does, costs little work and little log.

The :class:`Hub` is the tunnel across links: its entrances, the session streams are opened on
(the newest *ready* one: a newer link from the peer replaces the old one only once it has
authenticated, so a stray connection to a receptor cannot cut a working link), the exits, the
counters and the per-stream log records. Entrance connections that arrive while no link is up
are refused at once (reset), or, with ``hold_timeout``, held (not read; at most ``max_streams``
of them) until a link is up or the time is over, then reset: never queued without bound.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any, Callable, Final, Mapping, Protocol

from ..common.addresses import host_port, ip_address_of, peer_host
from ..common.systemd import EventLog
from .admission import MAX_HELD, WINDOW, Penalties, RecordWindows, Suppressed
from .tunnel import Exit
from .connection import (
    REASON_CLOSE,
    REASON_NO_SERVER,
    Authenticated,
    AuthenticationFailed,
    DataReceived,
    DeadPeer,
    FrameIgnored,
    HandshakeComplete,
    LinkClosed,
    LinkReady,
    PeerRestarted,
    Pong,
    SockMuxConfig,
    SockMuxConnection,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    TooManyStreams,
    WindowUpdated,
)
from .frames import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Hub", "Session", "Stream", "HubStats", "LINK_WRITE_HIGH", "LINK_WRITE_LOW",
    "ENTRANCE_BACKLOG", "format_address",
]

#: Link write buffer: above HIGH, streams stop reading their clients; below LOW they resume.
LINK_WRITE_HIGH: Final = 1 << 20
LINK_WRITE_LOW: Final = 256 << 10
#: Control frames (ECHOOK, HELLOOK, SENT, CLOSE, CLOSED...: everything but stream data) that
#: may wait unread in the link's write buffer; above it reading the link pauses (see Memory).
MAX_UNREAD_CONTROL: Final = 1 << 20
#: flush_now joins the chunks when there are more than SMALL_CHUNKS of them, on average
#: smaller than SMALL_CHUNK bytes (copying them costs less than buffering them one by one).
SMALL_CHUNKS: Final = 64
SMALL_CHUNK: Final = 128
#: Default for Hub.send_timeout: how long reading may stay paused so before the link is cut.
SEND_TIMEOUT: Final = 30.0
#: How long a new entrance connection may wait for its first bytes before its stream opens
#: without them (see Hub.first_data_wait). Measured on loopback: the client's first bytes come
#: 0.1-1 ms after the accept; riding in CONNECT they save a tunnel round trip (connections/s
#: +15-20 % with request/response clients); server-first protocols open 1 ms later.
FIRST_DATA_WAIT: Final = 0.001
#: Towards a peer without half-close (DeleGate), how long a server's answer may take to
#: start (an exit answering CONNECTED) and to keep coming (an entrance whose client sent EOF).
#: See Hub.reply_wait. DeleGate itself waits 1 ms for the first; live, 1 ms let 9 to 17 of
#: 20 answers from a Python test server through between two DeleGates.
REPLY_WAIT: Final = 0.05
#: How long CLOSED answers may wait for other frames to share a write with (they only free
#: the peer's slot; under load the next CONNECT or data takes them along well before this).
CLOSED_DELAY: Final = 0.005
#: Streams beyond Hub.stream_log_rate are summed up in one record this often.
STREAM_LOG_SUMMARY = 10.0
#: A local socket being closed gracefully is reset after this long without write progress.
CLOSE_LINGER: Final = 10.0
#: A link being closed gets this long to flush (an AUTH failure notice, CLOSEs) before abort.
LINK_CLOSE_LINGER: Final = 2.0
#: listen() backlog of entrances (ssh -L's 128 overflows under a burst of connections).
ENTRANCE_BACKLOG: Final = 4096
#: Read size of the event loops' socket transports, the most one data_received delivers.
READ_CHUNK: Final = 256 * 1024

_RST: Final = struct.pack("ii", 1, 0)


class Opening(Protocol):
    """An exit being opened (what the exit opener returns): a Task, or its own lighter kind."""

    def done(self) -> bool: ...

    def cancel(self) -> bool: ...


def format_address(addr: Any) -> str:
    """``HOST:PORT`` / ``[V6]:PORT`` for a socket address; ``localhost:0`` for unix sockets.

    These texts go into CONNECT/CONNECTED, where DeleGate expects ``HOST:PORT``.
    """
    if isinstance(addr, tuple) and len(addr) >= 2:
        return host_port(peer_host(str(addr[0])), addr[1])
    return "localhost:0"


def _wire_text(text: str) -> str:
    """A text fit for a CONNECT/CONNECTED address: visible ASCII, no spaces, bounded."""
    if text.isascii() and text.isprintable() and " " not in text and 0 < len(text) <= 200:
        return text
    clean = "".join(c if "!" <= c <= "~" else "_" for c in text)[:200]
    return clean or "-"


def port_of(addr: str) -> int | None:
    """The port of a ``HOST:PORT`` text from the peer (DeleGate's entrance), or None."""
    tail = addr.rpartition(":")[2]
    if tail.isascii() and tail.isdigit() and len(tail) <= 5:
        port = int(tail)
        return port if 0 < port < 65536 else None
    return None


def _reset(transport: Any) -> None:
    """Close with RST where possible (SO_LINGER 0), so the other end sees a reset, not EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        except (OSError, ValueError):
            pass
    transport.abort()


def _source_of(peername: Any) -> str | None:
    """The IP address of a TCP peer (an IPv4-mapped one as IPv4), the key of the receptor's
    per-address penalties and records; None for other links."""
    ip = ip_address_of(peername[0]) if isinstance(peername, tuple) and peername else None
    return None if ip is None else str(ip)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# --------------------------------------------------------------------------------- streams


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


class Stream(asyncio.Protocol):
    """One forwarded connection: the protocol of its local transport, and its state.

    ``outbound``: accepted at one of our entrances (we opened the stream); otherwise the peer
    opened it and we connected an exit. ``sid`` is the connection's stream id while the stream
    is attached to a session, ``None`` once it is over for the protocol (the local socket may
    still be flushing). See the module docstring for the data path.
    """

    __slots__ = (
        "hub", "session", "sid", "number", "outbound", "transport", "label", "client",
        "entrance", "target", "pending", "early", "open", "reading", "write_paused",
        "unacked", "eof_local", "ended", "eof_remote", "up", "down", "started", "reason",
        "linger", "linger_size", "task", "deadline", "connected_as", "finished", "lost",
        "on_finish", "held", "quiet_wait",
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
        self.open = False  # the peer / our exit accepted: send_data() may be called
        self.reading = True
        self.write_paused = False
        self.unacked = 0  # written into the local transport's buffer, not acknowledged yet
        self.eof_local = False  # the local socket sent EOF
        self.ended = False  # end_stream() called
        self.eof_remote = False  # the peer ended its direction (StreamEnded)
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
        self.finished = False
        self.lost = False
        self.on_finish: Callable[[Stream], None] | None = None
        # An entrance connection waiting for the link (Hub.hold_timeout) or for its first
        # bytes (first_data_wait), or an exit for its server's (Hub.reply_wait)
        self.held = False
        self.quiet_wait = False  # the client's EOF waits for the server to go quiet

    # -- the local transport's callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]
        if self.outbound:
            self.hub._entrance_connected(self)
        elif self.connected_as is not None:
            # The exit is up: answer CONNECTED now. The event loop makes the protocol before
            # it resumes the opener's connect coroutine, which would be one iteration later.
            server_addr, local_addr, target = self.connected_as
            self.exit_connected(server_addr, local_addr, target)

    def data_received(self, data: bytes) -> None:
        sid = self.sid
        if sid is None:
            if self.held:  # not opened yet: its first bytes open it (they ride in CONNECT)
                self.pending = data if self.pending is None else self.pending + data
                if self.hub._first_data(self):  # held on (no link) or too big for CONNECT
                    self._pause()
            return
        if self.pending is not None or not self.open:
            self.pending = data if self.pending is None else self.pending + data
            # an exit held for the server's first bytes answers CONNECTED with them now
            if not self.held or self.hub._first_data(self):
                self._pause()
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

    def eof_received(self) -> bool:
        self.eof_local = True
        if self.held:  # an entrance waiting for its first bytes, or an exit for the server's
            self.hub._first_data(self)
            return True
        if self.sid is None:
            return False
        if self.pending is None and self.open:
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
        if self.held:  # (an exit held for its server: the close below refuses the stream)
            self.hub._unhold(self, "the client left before its stream was opened")
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        sid, session = self.sid, self.session
        if sid is not None and session is not None:
            who = "client" if self.outbound else "server"
            if exc is not None:
                reason = f"{who} connection failed: {exc}"
            elif self.eof_local:
                reason = f"closed by the {who}"
            else:
                reason = f"{who} connection closed"
            session.conn.close_stream(sid, REASON_CLOSE)
            self._detach(reason)
            session._flush()
        self._finish()

    # -- link -> local -----------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        """Write bytes from the peer; acknowledge them once they are in the socket."""
        self.down += len(data)
        if self.quiet_wait:  # the server is not quiet yet: the client's EOF waits on
            self.hub.eof_waits.add(self)
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

    def _remote_ended(self) -> None:
        self.eof_remote = True
        t = self.transport
        if t is not None and not t.is_closing():
            try:
                if t.can_write_eof():
                    t.write_eof()
            except (OSError, RuntimeError):
                pass
        if self.ended:  # both directions are over: the connection closed the stream
            self._detach("closed")
            self._close_local(abort=False)

    # -- local -> link -----------------------------------------------------------------------

    def _pause(self) -> None:
        if self.reading:
            self.reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if not self.reading and not self.eof_local:
            self.reading = True
            self.transport.resume_reading()

    def _kick(self) -> None:
        """Credit came back, the stream was accepted or the link drained: send what is
        pending, then read again (or end the stream, if the local side had ended it)."""
        session = self.session
        if self.sid is None or session is None or not self.open:
            return
        if session.link_paused:
            session.link_blocked.add(self)
            return
        p = self.pending
        if p is not None:
            try:
                n = session.conn.send_data(self.sid, p)
            except LocalProtocolError:
                return
            self.up += n
            if n < len(p):
                self.pending = p[n:]
                return
            self.pending = None
        if self.eof_local:
            if not self.ended:
                self._end()
        elif self.transport is not None:
            self._resume()

    def _end(self) -> None:
        """The local side's EOF, passed on (after every byte before it).

        Without half-close (DeleGate) the EOF ends the stream both ways, and the peer drops
        what its server sends after it. So the EOF of a client that got nothing yet waits
        until the server has sent nothing for ``Hub.reply_wait``: the answer to a request the
        client sent with its EOF (``echo request | nc``) still comes through. A server that
        waits for the EOF gets it that much later. A client that got something already is
        most likely done (and its stream's slot is worth more: DeleGate has 60)."""
        session = self.session
        assert session is not None and self.sid is not None
        features = session.conn.features
        plain = features is None or not features.half_close
        if plain and self.outbound and (self.quiet_wait or self.down == 0) \
                and session.hub.reply_wait > 0:
            if not self.quiet_wait:
                self.quiet_wait = True
                session.hub.eof_waits.add(self)
            return
        self._end_now()

    def _end_now(self) -> None:
        session = self.session
        assert session is not None and self.sid is not None
        try:
            session.conn.end_stream(self.sid)
        except LocalProtocolError:
            return
        self.ended = True
        session._flush()
        features = session.conn.features
        who = "client" if self.outbound else "server"
        if features is None or not features.half_close:  # plain SockMux: EOF ends both ways
            waited = session.hub.reply_wait if self.quiet_wait else 0.0
            self.quiet_wait = False
            self._detach(f"closed by the {who}" + (
                f" (its EOF passed on once the server was quiet for {waited:g} s)"
                if waited else ""))
            self._close_local(abort=False)
        elif self.eof_remote:  # the peer had ended already: the stream is closed now
            self._detach("closed")
            self._close_local(abort=False)

    # -- exits -------------------------------------------------------------------------------

    def exit_connected(self, server_addr: str | None, local_addr: str | None,
                       target: str | None = None) -> None:
        """Called once the exit's transport is made (by connection_made, see connected_as).

        An address given as None is the transport's own (a TCP exit: DeleGate's CONNECTED
        names the server and the local end of the connection to it). The peer's first data
        goes to the server at once. Towards a peer without half-close (DeleGate), CONNECTED
        then waits up to ``Hub.reply_wait`` for the server's answer to them and carries its
        first bytes, as DeleGate does (for 1 ms): its entrance reads its client only after
        CONNECTED, and on the client's EOF it closes the whole stream and drops what comes
        later, so the answer to a request sent with the client's EOF reaches it only inside
        CONNECTED."""
        self.task = None
        self._stop_deadline()
        if target is not None:
            self.target = target
        session = self.session
        transport = self.transport
        if self.sid is None or session is None:  # the peer gave up, or the link died
            if transport is not None:
                _reset(transport)
            self._finish()
            return
        if server_addr is None:
            server_addr = format_address(transport.get_extra_info("peername"))
        if local_addr is None:
            local_addr = format_address(transport.get_extra_info("sockname"))
        early, self.early = self.early, None
        if early:
            self._deliver(early)
            hub = session.hub
            f = session.conn.features
            if (hub.reply_wait > 0 and f is not None and f.conndata and not f.half_close
                    and self.pending is None and not self.eof_local):
                self.connected_as = (server_addr, local_addr, None)
                self.held = True
                hub.reply_waits.add(self)
                return
        self._accept(server_addr, local_addr)

    def _accept(self, server_addr: str, local_addr: str) -> None:
        """CONNECTED, with what the server sent so far as its first data if it fits."""
        session = self.session
        assert session is not None and self.sid is not None
        first = b""
        p = self.pending
        if p is not None and len(p) <= session.conn.max_first_data:
            first, self.pending = p, None
            self.up += len(p)
        try:
            session.conn.accept_stream(self.sid, first, server_addr=_wire_text(server_addr),
                                       local_addr=_wire_text(local_addr))
        except LocalProtocolError as exc:
            self._detach(f"cannot accept: {exc}")
            self._close_local(abort=True)
            return
        self.open = True
        session.hub.stats.accepted += 1
        self._kick()
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
            self._detach(f"refused: {reason}")
        if self.transport is None:
            self._finish()

    # -- the end -----------------------------------------------------------------------------

    def _detach(self, reason: str) -> None:
        """The stream is over for the protocol: forget its id (the connection may reuse it)."""
        sid, session = self.sid, self.session
        if sid is None or session is None:
            return
        self.sid = None
        if self.reason is None:
            self.reason = reason
        if self.held and not self.outbound:  # no longer waiting for the server's answer
            self.held = False
            session.hub.reply_waits.discard(self)
        if self.quiet_wait:
            self.quiet_wait = False
            session.hub.eof_waits.discard(self)
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

    def _close_local(self, abort: bool) -> None:
        t = self.transport
        if t is None:
            if self.task is None:
                self._finish()
            return
        if self.lost:
            return
        if abort:
            _reset(t)
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
                self.reason += f"; {size} bytes unread by the {who}"
            _reset(t)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.hub._stream_finished(self)
        if self.on_finish is not None:
            self.on_finish(self)

    def __repr__(self) -> str:
        return (f"<Stream {self.number} {'out' if self.outbound else 'in'} sid={self.sid} "
                f"open={self.open} up={self.up} down={self.down} reason={self.reason!r}>")


# --------------------------------------------------------------------------------- sessions


class Session(asyncio.Protocol):
    """One link: the protocol of the link transport, driving one SockMuxConnection."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.loop = hub.loop
        self.conn: SockMuxConnection = SockMuxConnection(hub.config)
        self.streams: dict[int, Stream] = {}
        self.link_blocked: set[Stream] = set()
        self.transport: Any = None
        self.peer = "?"
        #: The peer's IP address (TCP links), the key of the receptor's penalties and records.
        self.source: str | None = None
        #: Its address has failed links on record: progress records are debug-level.
        self.quiet = False
        self.peer_hello = ""
        self.link_paused: bool = False
        self.read_paused = False  # paused: the peer leaves too many control frames unread
        #: At least the control bytes (not stream data) in the link's write buffer: every
        #: control byte written is added, and it is cut to the buffer's size whenever that is
        #: known to be smaller (the buffer is FIFO: it cannot hold more control than bytes).
        self.unread_control = 0
        self._control_mark = 0  # conn.control_bytes_queued at the last flush
        self.control_limit = max(hub.link_high, MAX_UNREAD_CONTROL)
        self._stall_timer: asyncio.TimerHandle | None = None
        self.ready = False
        self.ever_ready = False
        self.authenticated = False
        self.closed = False
        self.reason: str | None = None
        self.rtt: float | None = None
        self.started = self.loop.time()
        self.ready_at: float | None = None
        self._flush_pending = False
        # Bound once: compiled, calling a stored bound method skips a method lookup (time,
        # per read) and an allocation (the flush callback, per poll round with output).
        self._now = self.loop.time
        self._flush_due_cb = self._flush_due
        self._lazy_timer: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[str] = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    # -- the link transport's callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple):
            self.peer = format_address(peername)
            self.source = _source_of(peername)
        elif isinstance(peername, str) and peername:
            self.peer = peername
        else:
            self.peer = "(socket)"

        transport.set_write_buffer_limits(high=self.hub.link_high,  # type: ignore[attr-defined]
                                          low=self.hub.link_low)
        if not self.hub._link_made(self):
            return
        self.conn.initiate_connection(now=self.loop.time())
        self.flush_now()
        self._arm_timer()
        self._handshake_timer = self.loop.call_later(self.hub.handshake_timeout,
                                                     self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data, self._now())
        except RemoteProtocolError as exc:
            self._handle(exc.events)
            self._fail(f"protocol error from the peer: {exc}", penalise=True)
            return
        if events:
            self._handle(events)
        if self.conn.control_bytes_queued - self._control_mark > LINK_WRITE_LOW:
            # Many control frames within one poll round (libuv reads up to 32 times per round:
            # a flood of ECHO or CLOSE gives 8 MiB of answers): written now, so that the
            # transport's flow control and the count of unread control frames see them at once.
            self.flush_now()
        else:
            self._flush()

    def eof_received(self) -> bool:
        self._fail("the peer closed the link")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        self.hub._unheld(self)
        if not self.closed:
            self._fail(f"link lost: {exc}" if exc else "link closed")
        if not self.done.done():
            self.done.set_result(self.reason or "closed")

    def pause_writing(self) -> None:
        self.link_paused = True

    def resume_writing(self) -> None:
        self.link_paused = False
        low = self.hub.link_low
        if self.unread_control > low:  # the buffer holds at most link_low bytes now
            self.unread_control = low
        if self.read_paused:
            self.read_paused = False
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            if not self.closed:
                self.transport.resume_reading()
        blocked = self.link_blocked
        if blocked:
            self.link_blocked = set()
            for stream in blocked:
                stream._kick()
            self._flush()

    # -- output ----------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write what the connection queued, once per loop iteration: everything the
        callbacks of one poll round produced (data, SENT, CONNECT... of every stream) goes out
        in one writev, before the loop polls again (call_soon), so nothing waits longer.
        Called after every call that may queue frames; with nothing queued (most data just
        received: credit is lazy) it schedules nothing. CLOSED answers alone wait up to
        :data:`CLOSED_DELAY` for company (see SockMuxConnection.output_is_urgent)."""
        if self._flush_pending:
            return
        conn = self.conn
        if conn.output_is_urgent:
            self._flush_pending = True
            self.loop.call_soon(self._flush_due_cb)
        elif conn.outgoing_bytes and self._lazy_timer is None:
            self._lazy_timer = self.loop.call_later(CLOSED_DELAY, self._flush_lazy)

    def _flush_lazy(self) -> None:
        self._lazy_timer = None
        self.flush_now()

    def _flush_due(self) -> None:
        self._flush_pending = False
        self.flush_now()

    def flush_now(self) -> None:
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        conn = self.conn
        queued = conn.outgoing_bytes
        out = conn.data_to_send()
        if out:
            transport = self.transport
            if transport is None or self.closed:
                return
            if len(out) > SMALL_CHUNKS and queued < len(out) * SMALL_CHUNK:
                # Many small frames (answers to a flood of ECHO, CLOSE...): one bytes object.
                # A buffered chunk costs uvloop ~150 bytes of bookkeeping, 12x an ECHOOK.
                out = [b"".join(out)]
            transport.writelines(out)
            control = conn.control_bytes_queued
            unread = self.unread_control + control - self._control_mark
            self._control_mark = control
            if not self.link_paused:
                # write() calls pause_writing() above link_high: below it, so is the buffer
                high = self.hub.link_high
                self.unread_control = high if unread > high else unread
            else:
                size = transport.get_write_buffer_size()
                unread = size if unread > size else unread
                self.unread_control = unread
                if unread > self.control_limit and not self.read_paused:
                    self._stop_reading(unread)

    def _stop_reading(self, unread: int) -> None:
        """The peer leaves more than control_limit bytes of control frames unread (they are
        mostly answers to its own frames): stop reading it until it reads them (resume_writing),
        so that it cannot make this side queue answers without bound; cut the link if it has
        not read them within the hub's send_timeout."""
        self.read_paused = True
        self.transport.pause_reading()
        self.hub.debug(f"link {self.peer}: {unread} bytes of control frames unread by the peer: "
                       "reading paused")
        self._stall_timer = self.loop.call_later(self.hub.send_timeout, self._stalled)

    def _stalled(self) -> None:
        self._stall_timer = None
        if self.read_paused and not self.closed:
            self._fail(f"the peer does not read: {_human(self.unread_control)} of control "
                       f"frames (answers to its own) unread for {self.hub.send_timeout:g} s "
                       f"({_human(self.transport.get_write_buffer_size())} queued in all)",
                       reset=True, penalise=True)

    # -- events ----------------------------------------------------------------------------

    def _handle(self, events: list[Any]) -> None:
        streams = self.streams
        for ev in events:
            # isinstance, not type(ev) is: compiled, it narrows ev to the class, so that its
            # fields are read directly rather than looked up as attributes of an object
            if isinstance(ev, DataReceived):
                stream = streams.get(ev.stream_id)
                if stream is not None:
                    stream._deliver(ev.data)
            elif isinstance(ev, WindowUpdated):
                stream = streams.get(ev.stream_id)
                if stream is not None and stream.pending is not None:
                    stream._kick()
            else:
                self._other(ev)
            if self.closed:
                return

    def _other(self, ev: Any) -> None:
        hub = self.hub
        streams = self.streams
        if isinstance(ev, StreamRequested):
            self._requested(ev)
        elif isinstance(ev, StreamAccepted):
            stream = streams.get(ev.stream_id)
            if stream is not None:
                stream.open = True
                stream.target = ev.server_addr
                hub.stats.accepted += 1
                if ev.first_data:
                    stream._deliver(ev.first_data)
                stream._kick()
        elif isinstance(ev, StreamEnded):
            stream = streams.get(ev.stream_id)
            if stream is not None:
                stream._remote_ended()
        elif isinstance(ev, StreamClosed):
            stream = streams.get(ev.stream_id)
            if stream is not None:
                if not stream.open:
                    hub.stats.refused += 1
                    stream._detach(f"refused by the peer: {ev.reason}")
                elif stream.ended and ev.reason == REASON_CLOSE:
                    stream._detach("closed")  # our EOF went first; the peer's CLOSE is its EOF
                else:
                    stream._detach(f"closed by the peer ({ev.reason})")
                stream._close_local(abort=False)
        elif isinstance(ev, Pong):
            self.rtt = ev.rtt
        elif isinstance(ev, HandshakeComplete):
            f = ev.features
            self.peer_hello = ev.peer_hello
            kind = (f"extensions ({f.peer_extensions})" if f.extensions
                    else "plain SockMux (no extensions)")
            text = (f"link {self.peer}: handshake with {ev.peer_hello!r} done, {kind}, frames "
                    f"{f.max_frame_size}, window {f.send_window}/{f.receive_window}, "
                    f"streams {f.max_streams}, half-close {'on' if f.half_close else 'off'}")
            if self.quiet:  # its address has failed links on record (see Hub._link_made)
                hub.debug(text)
            else:
                hub.log_event(text, SOCKMUX_EVENT="handshake", SOCKMUX_LINK=self.peer,
                              SOCKMUX_PEER_HELLO=ev.peer_hello)
        elif isinstance(ev, Authenticated):
            self.authenticated = True
            hub.log_event(f"link {self.peer}: peer authenticated (shared secret)",
                          SOCKMUX_EVENT="authenticated", SOCKMUX_LINK=self.peer)
        elif isinstance(ev, LinkReady):
            self._ready(ev.authenticated)
        elif isinstance(ev, AuthenticationFailed):
            hub.stats.auth_failures += 1
            self._fail(f"authentication failed: {ev.reason}", priority=3, penalise=True)
        elif isinstance(ev, DeadPeer):
            self._fail(f"peer dead: nothing received for {ev.idle:.0f} s")
        elif isinstance(ev, PeerRestarted):
            self._kill_streams(ev.closed_stream_ids, "link reset: the peer restarted")
            was_ready, self.ready = self.ready, False
            hub.log_event(f"link {self.peer}: the peer restarted (new HELLO); "
                          f"{len(ev.closed_stream_ids)} streams closed, handshake again",
                          priority=4, SOCKMUX_EVENT="peer-restarted", SOCKMUX_LINK=self.peer)
            if was_ready:
                hub._link_unready(self)
            self._rearm_handshake()
        elif isinstance(ev, StreamRefused):
            hub.stats.refused += 1
            if hub.may_log_stream(True):
                hub.log_event(f"link {self.peer}: stream from {ev.client_addr} (entrance "
                              f"{ev.entrance_addr}) refused: {ev.reason}", priority=5,
                              SOCKMUX_EVENT="stream-refused", REMOTE_ADDR=ev.client_addr,
                              SOCKMUX_ENTRANCE=ev.entrance_addr, SOCKMUX_REASON=ev.reason)
        elif isinstance(ev, FrameIgnored):
            hub.debug(f"link {self.peer}: ignored: {ev.reason}")
        elif isinstance(ev, LinkClosed):
            pass

    def _requested(self, ev: StreamRequested) -> None:
        hub = self.hub
        port = port_of(ev.entrance_addr)
        exit_ = hub.exit_for(port)
        stream = Stream(hub, outbound=False)
        stream.session = self
        stream.sid = stream.number = ev.stream_id
        stream.client = ev.client_addr
        stream.entrance = ev.entrance_addr
        hub.stats.total += 1
        if exit_ is None:
            why = ("no exit for entrance port %d" % port) if port else "no default exit"
            try:
                self.conn.refuse_stream(ev.stream_id, REASON_NO_SERVER)
            except LocalProtocolError:
                pass
            hub.stats.refused += 1
            stream.reason = f"refused: {REASON_NO_SERVER} ({why})"
            stream._finish()
            return
        stream.label = stream.target = exit_.target
        if ev.first_data:
            stream.early = ev.first_data
        self.streams[ev.stream_id] = stream
        if hub.opener is None:
            stream.exit_failed(f"{REASON_NO_SERVER} (no exit opener)")
            return
        opening = hub.opener.open(exit_, stream)
        if opening is not None and not opening.done():  # else it failed already, at once
            stream.task = opening

    def _ready(self, authenticated: bool) -> None:
        self.ready = True
        self.authenticated = authenticated
        self.ready_at = self.loop.time()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.ever_ready = True
        self.hub._link_ready(self)

    # -- timers ----------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        deadline = self.conn.next_deadline()
        if deadline is None or self.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.tick()

    def tick(self) -> None:
        """Run the keep-alive timers now (the watchdog path calls this too)."""
        if self.closed:
            return
        events = self.conn.tick(self.loop.time())
        if events:
            self._handle(events)
        self._flush()
        if not self.closed:
            self._arm_timer()

    def _rearm_handshake(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._handshake_timer = self.loop.call_later(self.hub.handshake_timeout,
                                                     self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if not self.ready and not self.closed:
            self._fail(f"handshake not complete after {self.hub.handshake_timeout:g} s "
                       f"(state {self.conn.state.value}, authentication "
                       f"{self.conn.auth_state.value.lower()})", reset=True, penalise=True)

    # -- the end ---------------------------------------------------------------------------

    def _kill_streams(self, ids: Any, reason: str) -> None:
        for sid in ids:
            stream = self.streams.get(sid)
            if stream is not None:
                stream._detach(reason)
                stream._close_local(abort=True)

    def close(self, reason: str) -> None:
        """Close the link (shutdown, replaced by a newer link): every stream is reset."""
        self._fail(reason)

    def _fail(self, reason: str, priority: int = 4, reset: bool = False,
              penalise: bool = False) -> None:
        """Close the link: ``reset`` at once (RST: the peer does not read, there is nothing
        it would get), else after flushing what is queued (at most LINK_CLOSE_LINGER).
        ``penalise``: this side cuts the link for the peer's fault; if it never was up, the
        hub may hold it for a while before the reset (see admission.py)."""
        if self.closed:
            return
        if not reset:
            try:
                self.flush_now()  # an AUTH failure notice, CLOSEs: the peer's log should say why
            except Exception:  # the transport may be gone already
                pass
        self.closed = True
        self.reason = reason
        was_ready, self.ready = self.ready, False
        for timer in (self._timer, self._handshake_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._handshake_timer = self._stall_timer = None
        self.conn.close_link(reason)
        streams = list(self.streams.values())
        for stream in streams:
            stream._detach(f"link down: {reason}")
            stream._close_local(abort=True)
        self.link_blocked.clear()
        transport = self.transport
        # (a link whose peer leaves much unread is not held: its buffer would be held with it)
        may_hold = (transport is not None
                    and transport.get_write_buffer_size() <= self.hub.link_low)
        hold = self.hub._link_down(self, reason, was_ready, len(streams), priority, penalise,
                                   may_hold)
        if transport is not None and not transport.is_closing():
            if hold > 0:  # unread, until the hold is over (or the peer gives up)
                transport.pause_reading()
                self._abort_timer = self.loop.call_later(hold, self.release)
            elif reset:
                _reset(transport)
            else:
                transport.close()
                self._abort_timer = self.loop.call_later(LINK_CLOSE_LINGER, transport.abort)
        if transport is None and not self.done.done():
            self.done.set_result(reason)

    def release(self) -> None:
        """A held link's time is over (or the tunnel stops): reset it."""
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        self.hub._unheld(self)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            _reset(transport)

    def __repr__(self) -> str:
        return (f"<Session {self.peer} ready={self.ready} closed={self.closed} "
                f"streams={len(self.streams)}>")


# --------------------------------------------------------------------------------- the hub


class HubStats:
    """Tunnel-wide counters (over every link), for STATUS= and tests."""

    __slots__ = ("total", "accepted", "refused", "finished", "bytes_up", "bytes_down",
                 "links_up", "links_down", "auth_failures", "entrance_refused", "links_refused")

    def __init__(self) -> None:
        self.total = 0  # streams opened either way (including refused ones)
        self.accepted = 0
        self.refused = 0
        self.finished = 0
        self.bytes_up = 0  # finished streams: local -> link
        self.bytes_down = 0  # finished streams: link -> local
        self.links_up = 0
        self.links_down = 0
        self.auth_failures = 0
        self.entrance_refused = 0  # clients refused because no link was up
        self.links_refused = 0  # links reset at accept (admit_link)


class _Unlogged:
    """Streams that ended without a record of their own (over the rate), for the summary."""

    __slots__ = ("streams", "refused", "up", "down")

    def __init__(self) -> None:
        self.streams = self.refused = self.up = self.down = 0


class Hub:
    """One tunnel across its links: entrances, exits, the current session, counters, logs.

    ``exits`` maps an entrance port (``None``: the default) to an :class:`Exit`; ``opener``
    connects them (:class:`tcpmuxd.sockmux.exits.ExitOpener`, or anything with its ``open``).
    ``on_ready(session)``, ``on_down(session, reason)`` and ``on_change()`` are the
    daemon's hooks (READY=1, STATUS=). ``on_change`` runs ``change_delay`` seconds after a
    change (streams, links), once for all the changes meanwhile: a busy tunnel changes
    thousands of times a second, and STATUS= needs one line a second, not a call each.
    """

    def __init__(self, config: SockMuxConfig, *, exits: Mapping[int | None, Exit] | None = None,
                 opener: Any = None, log: EventLog | None = None, name: str = "sockmux",
                 handshake_timeout: float = 30.0, max_pending_links: int = 8,
                 link_high: int = LINK_WRITE_HIGH, link_low: int = LINK_WRITE_LOW,
                 on_ready: Callable[[Session], None] | None = None,
                 on_down: Callable[[Session, str], None] | None = None,
                 on_change: Callable[[], None] | None = None, change_delay: float = 1.0,
                 stream_log_rate: float | None = None, debug: bool = False,
                 hold_timeout: float = 0.0,
                 first_data_wait: float = FIRST_DATA_WAIT,
                 reply_wait: float = REPLY_WAIT,
                 send_timeout: float = SEND_TIMEOUT, failure_delay: float = 0.0) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.exits = dict(exits or {})
        self.opener = opener
        self.log = log
        self.name = name
        #: A link must be up (handshake and authentication done) this long after it connects.
        self.handshake_timeout = handshake_timeout
        #: Links being set up at once, TLS handshakes included (admit_link, receptors).
        self.max_pending_links = max_pending_links
        #: Failed links from an address are held before the reset, up to this long; and the
        #: records of failed links, one per address and minute (see admission.py).
        self.penalties = Penalties(failure_delay)
        self.link_records = RecordWindows()
        self.held: dict[str, Session] = {}  # by address: the failed link being held
        self._link_summary_timer: asyncio.TimerHandle | None = None
        #: A link whose reading paused because the peer leaves control frames unread (see
        #: Session._stop_reading) is cut after this many seconds without the peer reading.
        self.send_timeout = send_timeout
        self.link_high = link_high
        self.link_low = link_low
        self.on_ready = on_ready
        self.on_down = on_down
        self.on_change = on_change
        self.change_delay = change_delay
        self._change_timer: asyncio.TimerHandle | None = None
        #: Per-stream records: at most this many per second (a token bucket as deep), the
        #: streams beyond are counted and summed up in one record per STREAM_LOG_SUMMARY
        #: seconds (None: every stream gets its record). A busy tunnel would otherwise hit
        #: journald's rate limit, which drops records without saying which.
        self.stream_log_rate = stream_log_rate
        self._log_tokens = float(stream_log_rate or 0)
        self._log_refilled = self.loop.time()
        self._unlogged = _Unlogged()
        self._summary_timer: asyncio.TimerHandle | None = None
        self.debug_enabled = debug
        self.sessions: set[Session] = set()
        self.current: Session | None = None
        self.stats = HubStats()
        self.servers: list[asyncio.AbstractServer] = []
        self.closing = False
        self.finished_streams: list[Stream] | None = None  # tests may collect them
        #: Entrance connections that arrive while no link is up wait this long for one
        #: (0: refused at once). At most max_streams wait; reading them is paused.
        self.hold_timeout = hold_timeout
        self.waiting: dict[Stream, asyncio.TimerHandle] = {}
        #: A new entrance connection is opened once its first bytes are there (they ride in
        #: CONNECT, which saves the peer's exit a round trip for protocols where the client
        #: speaks first: HTTP, TLS, most), or after this long (server-first protocols).
        self.first_wait = Waits(self.loop, first_data_wait, self._release)
        #: Towards a peer without half-close (DeleGate, or --no-extensions): an exit that got
        #: first data answers CONNECTED once its server's first bytes are there, or after
        #: this long; an entrance client's EOF is passed on once the server has sent nothing
        #: for this long (0: neither waits). See Stream.exit_connected and Stream._end.
        self.reply_waits = Waits(self.loop, reply_wait, self._release)
        self.eof_waits = Waits(self.loop, reply_wait, self._pass_eof_on)

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

    # -- logging ---------------------------------------------------------------------------

    def log_event(self, message: str, priority: int = 6, **fields: object) -> None:
        if self.log is not None:
            self.log.record(message, priority=priority, SOCKMUX_TUNNEL=self.name, **fields)

    def debug(self, message: str) -> None:
        if self.debug_enabled:
            self.log_event(message, priority=7)

    # -- links -----------------------------------------------------------------------------

    def new_session(self) -> Session:
        """The protocol factory for links (links.connect_tcp, listen_tcp, open_fifos, ...)."""
        return Session(self)

    def admit_link(self, transport: Any, handshakes: int) -> bool:
        """A receptor's connection was accepted (:func:`links.listen_tcp` asks before any
        byte is read or written): False, and it is reset, when a failed link from its address
        is being held, or :attr:`max_pending_links` links (``handshakes``: TLS handshakes in
        progress, plus the sessions not up yet) are being set up already."""
        peername = transport.get_extra_info("peername")
        source = _source_of(peername)
        if source is not None and source in self.held:
            why = "a failed link from this address is being held"
        else:
            pending = handshakes + sum(1 for s in self.sessions if not s.ever_ready)
            if pending < self.max_pending_links:
                return True
            why = (f"{pending} links are being set up already (the limit, "
                   "--max-pending-links)")
        self.stats.links_refused += 1
        peer = format_address(peername)
        _reset(transport)
        if source is None or self.link_records.take(source, self.loop.time(), why):
            self.log_event(f"link from {peer} refused: {why}", priority=4,
                           SOCKMUX_EVENT="link-refused", SOCKMUX_LINK=peer, SOCKMUX_REASON=why)
        else:
            self._arm_link_summary()
        return False

    def _link_made(self, session: Session) -> bool:
        if self.closing:
            session.closed = True
            session.transport.abort()
            return False
        self.sessions.add(session)
        source = session.source
        session.quiet = (source is not None
                         and self.penalties.failures(source, self.loop.time()) > 0)
        text = f"link {session.peer}: connected, handshake starts"
        if session.quiet:  # failed links from there are summed up (admission.py)
            self.debug(text)
        else:
            self.log_event(text, SOCKMUX_EVENT="link-connected", SOCKMUX_LINK=session.peer)
        return True

    def _link_ready(self, session: Session) -> None:
        self.current = session
        waiting, self.waiting = self.waiting, {}
        self.stats.links_up += 1
        if session.source is not None:
            self.penalties.forgive(session.source)
            suppressed = self.link_records.pop(session.source)
            if suppressed is not None:
                self._log_suppressed(suppressed)
        auth = "authenticated" if session.authenticated else "NOT authenticated"
        self.log_event(f"link {session.peer}: up ({auth}), peer {session.peer_hello!r}",
                       SOCKMUX_EVENT="link-up", SOCKMUX_LINK=session.peer,
                       SOCKMUX_PEER_HELLO=session.peer_hello,
                       SOCKMUX_AUTHENTICATED="yes" if session.authenticated else "no")
        for other in list(self.sessions):
            if other is not session and other.ever_ready and not other.closed:
                other.close("replaced by a newer link from the peer")
        for stream, timer in waiting.items():
            timer.cancel()
            stream.held = False
            if not stream.lost:
                self._open(stream, session)
        if self.on_ready is not None:
            self.on_ready(session)
        self._changed()

    def _link_unready(self, session: Session) -> None:
        if self.current is session:
            self.current = None
        self._changed()

    def _link_down(self, session: Session, reason: str, was_ready: bool, streams: int,
                   priority: int, penalise: bool = False, may_hold: bool = True) -> float:
        """Log the end of a link; returns how long to hold it before the reset (a failed
        link from an address with failures on record: see admission.py), 0 for no hold."""
        self.sessions.discard(session)
        if self.current is session:
            self.current = None
        if session.ever_ready:
            self.stats.links_down += 1
        now = self.loop.time()
        hold = 0.0
        source = session.source
        logged = True
        if source is not None and not session.ever_ready and not self.closing:
            if penalise:
                hold = self.penalties.failed(source, now)
                if hold and (not may_hold or source in self.held or len(self.held) >= MAX_HELD):
                    hold = 0.0
                if hold:
                    self.held[source] = session
            logged = self.link_records.take(source, now, reason)
        if logged:
            uptime = now - (session.ready_at or session.started)
            what = "down" if session.ever_ready else "closed before it was up"
            if hold:
                failures = self.penalties.failures(source or "", now)
                extra = (f"; held {hold:g} s before the reset ({failures} failed link"
                         f"{'s' if failures > 1 else ''} from {source} in a row; further "
                         f"failures from it are summed up every {WINDOW:g} s)")
            elif session.ever_ready:
                extra = f" ({streams} streams reset, up {uptime:.0f} s)"
            else:
                extra = ""
            self.log_event(f"link {session.peer}: {what}: {reason}{extra}",
                           priority=priority if not self.closing else 6,
                           SOCKMUX_EVENT="link-down", SOCKMUX_LINK=session.peer,
                           SOCKMUX_REASON=reason)
        else:
            self._arm_link_summary()
        if self.on_down is not None:
            self.on_down(session, reason)
        self._changed()
        return hold

    def _unheld(self, session: Session) -> None:
        """A held failed link is reset or gone (see Session.release)."""
        source = session.source
        if source is not None and self.held.get(source) is session:
            del self.held[source]

    def _arm_link_summary(self) -> None:
        if self._link_summary_timer is None and not self.closing:
            self._link_summary_timer = self.loop.call_later(WINDOW, self._link_summaries)

    def _link_summaries(self) -> None:
        """One record per address for the failed links that got none of their own."""
        self._link_summary_timer = None
        for suppressed in self.link_records.due(self.loop.time()):
            self._log_suppressed(suppressed)
        if len(self.link_records):
            self._arm_link_summary()

    def _log_suppressed(self, s: Suppressed) -> None:
        seconds = self.loop.time() - s.since
        failures = self.penalties.failures(s.source, self.loop.time())
        held = self.penalties.maximum > 0 and failures > 0
        self.log_event(
            f"links from {s.source}: {s.count} more refused or failed before they were up "
            f"in the last {seconds:.0f} s, without a record each (last: {s.last_reason})"
            + (f"; {failures} failures in a row, each failed link is held up to "
               f"{self.penalties.maximum:g} s before the reset" if held else ""),
            priority=4, SOCKMUX_EVENT="links-unlogged", REMOTE_ADDR=s.source,
            SOCKMUX_LINKS=s.count, SOCKMUX_REASON=s.last_reason)

    # -- entrances -------------------------------------------------------------------------

    async def add_entrance(self, sock: socket.socket, label: str = "") -> asyncio.AbstractServer:
        """Serve a listening socket as an entrance (ours, or one systemd passed)."""
        sock.setblocking(False)
        bound = sock.getsockname()
        label = label or format_address(bound)
        # A listener on one address is the local end of all its connections: no need to ask
        # each accepted socket (getsockname) for the text that goes into CONNECT.
        wildcard = not isinstance(bound, tuple) or bound[0] in ("0.0.0.0", "::")
        entrance = "" if wildcard else format_address(bound)

        def accepted() -> Stream:
            stream = Stream(self, True, label)
            stream.entrance = entrance
            return stream

        server = await self.loop.create_server(accepted, sock=sock, backlog=ENTRANCE_BACKLOG)
        self.servers.append(server)
        return server

    def _entrance_connected(self, stream: Stream) -> None:
        transport = stream.transport
        stream.client = format_address(transport.get_extra_info("peername"))
        if not stream.entrance:
            stream.entrance = format_address(transport.get_extra_info("sockname"))
        self.stats.total += 1
        self._admit(stream, wait=True)

    def _admit(self, stream: Stream, wait: bool) -> None:
        """Open a stream for an entrance connection: after its first bytes (``wait``), now,
        or once a link is up (hold_timeout); else reset it."""
        session = self.current
        if session is not None and session.ready and not session.closed:
            f = session.conn.features
            if (wait and self.first_data_wait > 0 and f is not None and f.conndata
                    and stream.pending is None and not stream.eof_local):
                stream.held = True
                self.first_wait.add(stream)
                return
            self._open(stream, session)
            return
        if (self.hold_timeout > 0 and not self.closing
                and len(self.waiting) < self.config.max_streams):
            stream.held = True
            self.waiting[stream] = self.loop.call_later(
                self.hold_timeout, self._unhold, stream,
                f"no link within {self.hold_timeout:g} s")
            return
        self.stats.entrance_refused += 1
        stream.reason = "refused: the link is down"
        _reset(stream.transport)

    def _first_data(self, stream: Stream) -> bool:
        """The first bytes (or EOF) of a held stream's local socket came: an entrance
        connection's stream opens, an exit's CONNECTED goes. True while the stream still
        holds bytes (no link yet, or too many for CONNECT): the caller pauses its reading. (A
        result rather than a second look at ``stream.pending``: the compiled caller had
        narrowed it to ``bytes``.)"""
        if self.first_wait.discard(stream) or self.reply_waits.discard(stream):
            self._release(stream)
        return stream.pending is not None

    def _release(self, stream: Stream) -> None:
        """A held stream's wait for its local socket's first bytes is over, whether they came
        or not: open it (an entrance connection) or answer CONNECTED (an exit)."""
        stream.held = False
        if stream.outbound:
            if not stream.lost:
                self._admit(stream, wait=False)
        elif stream.sid is not None and stream.connected_as is not None:
            server_addr, local_addr, _ = stream.connected_as
            stream._accept(server_addr or "-", local_addr or "-")

    def _pass_eof_on(self, stream: Stream) -> None:
        """The server of a stream whose client sent EOF was quiet for reply_wait: pass the
        EOF on now (see Stream._end)."""
        if stream.quiet_wait and stream.sid is not None:
            stream._end_now()

    def _unhold(self, stream: Stream, why: str) -> None:
        """Give up on a held entrance connection: reset it. (An exit held for its server's
        first bytes only stops waiting: its stream's close or refusal follows.)"""
        self.first_wait.discard(stream)
        self.reply_waits.discard(stream)
        timer = self.waiting.pop(stream, None)
        if timer is not None:
            timer.cancel()
        if not stream.outbound:
            stream.held = False
        elif stream.held:
            stream.held = False
            self.stats.entrance_refused += 1
            stream.reason = f"refused: {why}"
            if not stream.lost:
                _reset(stream.transport)

    def _open(self, stream: Stream, session: Session) -> None:
        transport = stream.transport
        first = b""
        p = stream.pending
        if p is not None and len(p) <= session.conn.max_first_data:
            first = p
        try:
            sid = session.conn.open_stream(_wire_text(stream.client),
                                           _wire_text(stream.entrance), first)
        except TooManyStreams as exc:
            self.stats.refused += 1
            stream.reason = f"refused: {exc}"
            _reset(transport)
            return
        except LocalProtocolError as exc:
            self.stats.refused += 1
            stream.reason = f"refused: {exc}"
            _reset(transport)
            return
        if first:
            stream.pending = None
            stream.up += len(first)
        stream.session = session
        stream.sid = stream.number = sid
        session.streams[sid] = stream
        session._flush()
        self._changed()

    # -- exits -----------------------------------------------------------------------------

    def exit_for(self, entrance_port: int | None) -> Exit | None:
        exits = self.exits
        if entrance_port is not None and entrance_port in exits:
            return exits[entrance_port]
        return exits.get(None)

    # -- streams ---------------------------------------------------------------------------

    def _changed(self) -> None:
        if self.on_change is not None and self._change_timer is None:
            self._change_timer = self.loop.call_later(self.change_delay, self._report_change)

    def _report_change(self) -> None:
        self._change_timer = None
        if self.on_change is not None:
            self.on_change()

    def _stream_finished(self, stream: Stream) -> None:
        stats = self.stats
        stats.finished += 1
        stats.bytes_up += stream.up
        stats.bytes_down += stream.down
        if self.finished_streams is not None:
            self.finished_streams.append(stream)
        reason = stream.reason or "closed"
        if self.log is not None and self.may_log_stream(reason.startswith("refused"),
                                                        stream.up, stream.down):
            duration = time.monotonic() - stream.started
            if stream.outbound:
                route = (f"{stream.client} -> entrance {stream.entrance} -> peer"
                         + (f" ({stream.target})" if stream.target else ""))
            else:
                route = (f"peer {stream.client} (entrance {stream.entrance}) -> exit "
                         f"{stream.target or '-'}")
            refused = reason.startswith("refused")
            self.log.record(
                f"stream {stream.number}: {route}: {stream.up} bytes sent, {stream.down} "
                f"bytes received, {duration:.3f} s, {reason}",
                priority=5 if refused else 6,
                SOCKMUX_TUNNEL=self.name,
                SOCKMUX_EVENT="stream",
                SOCKMUX_STREAM=stream.number,
                SOCKMUX_DIRECTION="entrance" if stream.outbound else "exit",
                REMOTE_ADDR=stream.client,
                SOCKMUX_ENTRANCE=stream.entrance,
                SOCKMUX_EXIT=None if stream.outbound else stream.target,
                SOCKMUX_BYTES_SENT=stream.up,
                SOCKMUX_BYTES_RECEIVED=stream.down,
                SOCKMUX_DURATION_USEC=int(duration * 1e6),
                SOCKMUX_REASON=reason,
            )
        self._changed()

    def may_log_stream(self, refused: bool, up: int = 0, down: int = 0) -> bool:
        """Take a token for a stream's record, or count the stream for the summary (a peer
        that floods CONNECTs we refuse is bounded by this like any other stream)."""
        rate = self.stream_log_rate
        if rate is None:
            return True
        now = self.loop.time()
        tokens = min(float(rate), self._log_tokens + (now - self._log_refilled) * rate)
        self._log_refilled = now
        if tokens >= 1.0:
            self._log_tokens = tokens - 1.0
            return True
        self._log_tokens = tokens
        unlogged = self._unlogged
        unlogged.streams += 1
        if refused:
            unlogged.refused += 1
        unlogged.up += up
        unlogged.down += down
        if self._summary_timer is None and not self.closing:
            self._summary_timer = self.loop.call_later(STREAM_LOG_SUMMARY, self._log_summary)
        return False

    def _log_summary(self) -> None:
        """One record for the streams that got none since the last summary."""
        self._summary_timer = None
        u, self._unlogged = self._unlogged, _Unlogged()
        if not u.streams or self.log is None:
            return
        self.log.record(
            f"{u.streams} streams ended without a record of their own (over "
            f"{self.stream_log_rate:g} records/s): {u.refused} of them refused, {u.up} bytes "
            f"sent, {u.down} bytes received",
            priority=6, SOCKMUX_TUNNEL=self.name, SOCKMUX_EVENT="streams-unlogged",
            SOCKMUX_STREAMS=u.streams, SOCKMUX_REFUSED=u.refused, SOCKMUX_BYTES_SENT=u.up,
            SOCKMUX_BYTES_RECEIVED=u.down)

    def open_streams(self) -> int:
        return sum(len(s.streams) for s in self.sessions)

    def bytes_totals(self) -> tuple[int, int]:
        up, down = self.stats.bytes_up, self.stats.bytes_down
        for session in self.sessions:
            for stream in session.streams.values():
                up += stream.up
                down += stream.down
        return up, down

    def status(self) -> str:
        """One line for STATUS=: link state, streams, bytes."""
        s = self.current
        if s is not None and s.ready:
            rtt = f", rtt {s.rtt * 1000:.1f} ms" if s.rtt is not None else ""
            auth = "" if s.authenticated else ", unauthenticated"
            link = f"link up to {s.peer_hello.split()[-1] if s.peer_hello else s.peer}{auth}{rtt}"
        elif self.sessions:
            link = "link handshaking"
        else:
            link = "link down"
        up, down = self.bytes_totals()
        return (f"{link}; {self.open_streams()} streams open, {self.stats.total} total; "
                f"{_human(up)} sent, {_human(down)} received")

    # -- shutdown --------------------------------------------------------------------------

    def close(self, reason: str = "shutting down") -> None:
        """Stop accepting at the entrances and close every link (streams are reset)."""
        self.closing = True
        for server in self.servers:
            server.close()
        for stream in list(self.waiting) + self.first_wait.clear():
            self._unhold(stream, reason)
        self.reply_waits.clear()  # exits and entrances of the links closed below
        self.eof_waits.clear()
        for session in list(self.sessions):
            session.close(reason)
        for session in list(self.held.values()):
            session.release()
        if self._link_summary_timer is not None:
            self._link_summary_timer.cancel()
            self._link_summary_timer = None
        for source in self.link_records.sources():
            suppressed = self.link_records.pop(source)
            if suppressed is not None:
                self._log_suppressed(suppressed)
        if self._summary_timer is not None:
            self._summary_timer.cancel()
        if self._change_timer is not None:
            self._change_timer.cancel()
            self._change_timer = None
        self._log_summary()  # now: the tunnel is going away (says nothing if all were logged)
