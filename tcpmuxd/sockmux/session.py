"""The asyncio driver of a SockMux tunnel: :class:`Hub`, one tunnel across its links.

The protocol itself is :class:`~tcpmuxd.sockmux.connection.SockMuxConnection` (sans-I/O); the
driver moves bytes between it, the link transport (from :mod:`tcpmuxd.sockmux.links`) and the
local sockets. Its parts, each in its own module:

=================  =========================================================================
``session.py``     :class:`Hub`: the tunnel. Its entrances, the session streams are opened
                   on (the newest *ready* one: a newer link from the peer replaces the old
                   one only once it has authenticated, so a stray connection to a receptor
                   cannot cut a working link), the exits, the daemon's hooks, STATUS=
``linksession.py`` :class:`Session`: one link (its transport's protocol), its output batching
                   and the bound on control frames a peer leaves unread; with resumption,
                   a lost link's session is suspended and a new link's Session adopts it
``stream.py``      :class:`Stream`: one forwarded connection, its data path and its phases
``holds.py``       streams held before they open (no link yet, first bytes awaited) and EOFs
                   held until a server goes quiet; ``waits.py``, the waits they use
``linkgate.py``    which links a receptor lets in, holds of failed links, the link records
``streamlog.py``   the counters and the per-stream records, at a bounded rate
=================  =========================================================================
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable, Final, Mapping

from ..common.addresses import host_port, ip_address_of, peer_host
from ..common.systemd import EventLog
from ..common.words import counted
from .connection import SockMuxConfig
from .holds import Holds
from .linkgate import LinkGate
from .linksession import LINK_WRITE_HIGH, LINK_WRITE_LOW, Session
from .stream import Stream, reset_transport
from .streamlog import HubStats, StreamLog, human_bytes
from .tunnel import Exit

__all__ = [
    "Hub", "Session", "Stream", "HubStats", "LINK_WRITE_HIGH", "LINK_WRITE_LOW",
    "ENTRANCE_BACKLOG", "FIRST_DATA_WAIT", "REPLY_WAIT", "format_address",
]

#: Default for Hub.send_timeout: how long reading may stay paused so before the link is cut.
SEND_TIMEOUT: Final = 30.0
#: How long a new entrance connection may wait for its first bytes before its stream opens
#: without them (see Holds.first_data_wait). Measured on loopback: the client's first bytes come
#: 0.1-1 ms after the accept; riding in CONNECT they save a tunnel round trip (connections/s
#: +15-20 % with request/response clients); server-first protocols open 1 ms later.
FIRST_DATA_WAIT: Final = 0.001
#: Towards a peer without half-close (DeleGate), how long a server's answer may take to
#: start (an exit answering CONNECTED) and to keep coming (an entrance whose client sent EOF).
#: See holds.py. DeleGate itself waits 1 ms for the first; live, 1 ms let 9 to 17 of
#: 20 answers from a Python test server through between two DeleGates.
REPLY_WAIT: Final = 0.05
#: listen() backlog of entrances (ssh -L's 128 overflows under a burst of connections).
ENTRANCE_BACKLOG: Final = 4096


def format_address(addr: Any) -> str:
    """``HOST:PORT`` / ``[V6]:PORT`` for a socket address; ``localhost:0`` for unix sockets.

    These texts go into CONNECT/CONNECTED, where DeleGate expects ``HOST:PORT``.
    """
    if isinstance(addr, tuple) and len(addr) >= 2:
        return host_port(peer_host(str(addr[0])), addr[1])
    return "localhost:0"


def _source_of(peername: Any) -> str | None:
    """The IP address of a TCP peer (an IPv4-mapped one as IPv4), the key of the receptor's
    per-address penalties and records; None for other links."""
    ip = ip_address_of(peername[0]) if isinstance(peername, tuple) and peername else None
    return None if ip is None else str(ip)


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
                 send_timeout: float = SEND_TIMEOUT, failure_delay: float = 0.0,
                 redials: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.exits = dict(exits or {})
        self.opener = opener
        self.log = log
        self.name = name
        #: A link must be up (handshake and authentication done) this long after it connects.
        self.handshake_timeout = handshake_timeout
        self.gate = LinkGate(self.loop, self.log_event, max_pending_links=max_pending_links,
                             failure_delay=failure_delay)
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
        self.stream_log = StreamLog(self.loop, log, name, stream_log_rate)
        self.debug_enabled = debug
        self.sessions: set[Session] = set()
        self.current: Session | None = None
        #: This side opens the links again when they are lost (a connector, a FIFO pair...):
        #: its new link carries on the suspended session (resumption). A receptor's new link
        #: starts fresh and is taken over by the session it names.
        self.redials = redials
        #: The session whose link was lost and that waits for a new one (resumption).
        self.suspended: Session | None = None
        self.stats = HubStats()
        self.servers: list[asyncio.AbstractServer] = []
        self.closing = False
        self.finished_streams: list[Stream] | None = None  # tests may collect them
        self.holds = Holds(self, hold_timeout, first_data_wait, reply_wait)

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
        is being held, or ``max_pending_links`` links (``handshakes``: TLS handshakes in
        progress, plus the sessions not up yet) are being set up already."""
        peername = transport.get_extra_info("peername")
        source = _source_of(peername)
        pending = handshakes + sum(1 for s in self.sessions if not s.ever_ready)
        why = self.gate.refusal(source, pending)
        if why is None:
            return True
        self.stats.links_refused += 1
        reset_transport(transport)
        self.gate.refused(source, format_address(peername), why)
        return False

    def _link_made(self, session: Session) -> bool:
        """A link's transport is made: name it, and take it on (False: the tunnel stops)."""
        if self.closing:
            session.closed = True
            session.transport.abort()
            return False
        peername = session.transport.get_extra_info("peername")
        if isinstance(peername, tuple):
            session.peer = format_address(peername)
            session.source = _source_of(peername)
        elif isinstance(peername, str) and peername:
            session.peer = peername
        else:
            session.peer = "(socket)"
        self.sessions.add(session)
        session.quiet = self.gate.quiet(session.source)
        text = f"link {session.peer}: connected, handshake starts"
        if session.quiet:  # failed links from there are summed up (linkgate.py)
            self.debug(text)
        else:
            self.log_event(text, SOCKMUX_EVENT="link-connected", SOCKMUX_LINK=session.peer)
        return True

    def _link_ready(self, session: Session) -> None:
        self.current = session
        self.stats.links_up += 1
        self.gate.link_up(session.source)
        auth = "authenticated" if session.authenticated else "NOT authenticated"
        self.log_event(f"link {session.peer}: up ({auth}), peer {session.peer_hello!r}",
                       SOCKMUX_EVENT="link-up", SOCKMUX_LINK=session.peer,
                       SOCKMUX_PEER_HELLO=session.peer_hello,
                       SOCKMUX_AUTHENTICATED="yes" if session.authenticated else "no")
        for other in list(self.sessions):
            if other is not session and other.ever_ready and not other.closed:
                other.close("replaced by a newer link from the peer")
        self.holds.link_ready(session)
        if self.on_ready is not None:
            self.on_ready(session)
        self._changed()

    def _link_suspended(self, session: Session, reason: str) -> None:
        """A link is lost, its session (and streams) kept for a new link (resumption)."""
        if self.current is session:
            self.current = None
        self.suspended = session
        timeout = self.config.resume_timeout
        self.log_event(f"link {session.peer} lost ({reason}): {len(session.streams)} streams "
                       f"suspended, for a new link to resume within {timeout:g} s",
                       priority=4, SOCKMUX_EVENT="link-suspended", SOCKMUX_LINK=session.peer,
                       SOCKMUX_REASON=reason, SOCKMUX_STREAMS=len(session.streams))
        self._changed()

    def session_for(self, session_id: bytes, asking: Session) -> Session | None:
        """Resumption: the session (other than ``asking``) whose id a new link names."""
        for other in self.sessions:
            if other is not asking and other.conn.resumable and \
                    other.conn.session_id == session_id:
                return other
        return None

    def _link_unready(self, session: Session) -> None:
        if self.current is session:
            self.current = None
        self._changed()

    def _link_down(self, session: Session, reason: str, streams: int, priority: int,
                   penalise: bool = False, may_hold: bool = True) -> float:
        """Log the end of a link; returns how long to hold it before the reset (a failed
        link from an address with failures on record: see linkgate.py), 0 for no hold."""
        self.sessions.discard(session)
        if self.current is session:
            self.current = None
        if self.suspended is session:
            self.suspended = None
        if session.ever_ready:
            self.stats.links_down += 1
        hold = self.gate.link_down(session, reason, streams, priority, penalise, may_hold)
        if self.on_down is not None:
            self.on_down(session, reason)
        self._changed()
        return hold

    # -- entrances and exits ---------------------------------------------------------------

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

    def _connection_made(self, stream: Stream) -> None:
        """A stream's local connection is made: an entrance connection is admitted; an exit's
        ends are named for CONNECTED (``connected_as``: None is the transport's own, as
        DeleGate's CONNECTED names the server and the local end of the connection to it)."""
        transport = stream.transport
        if stream.outbound:
            stream.client = format_address(transport.get_extra_info("peername"))
            if not stream.entrance:
                stream.entrance = format_address(transport.get_extra_info("sockname"))
            self.stats.total += 1
            self.holds.admit(stream, wait=True)
            return
        assert stream.connected_as is not None
        server_addr, local_addr, target = stream.connected_as
        if server_addr is None:
            server_addr = format_address(transport.get_extra_info("peername"))
        if local_addr is None:
            local_addr = format_address(transport.get_extra_info("sockname"))
        stream.exit_connected(server_addr, local_addr, target)

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
        self.stream_log.finished(stream)
        self._changed()

    def open_streams(self) -> int:
        return sum(len(s.streams) for s in self.sessions)

    def bytes_totals(self) -> tuple[int, int]:
        up, down = self.stats.bytes_up, self.stats.bytes_down
        for session in self.sessions:
            for stream in session.streams.values():
                up += stream.up
                down += stream.down
        return up, down

    def status(self, idle: str = "link down") -> str:
        """One line for STATUS=: link state, streams, bytes. ``idle`` is the state while no
        link is up or being set up (the daemon's "waiting for the peer on ...")."""
        s = self.current
        held = self.suspended
        if s is not None and s.ready:
            rtt = f", rtt {s.rtt * 1000:.1f} ms" if s.rtt is not None else ""
            auth = "" if s.authenticated else ", unauthenticated"
            link = f"link up to {s.peer_hello.split()[-1] if s.peer_hello else s.peer}{auth}{rtt}"
        elif held is not None:
            # (``idle`` says what the link's upkeep does meanwhile: re-dialling, waiting)
            link = (f"{idle}; {counted(len(held.streams), 'stream')} suspended until the link "
                    "is resumed")
        elif self.sessions:
            link = "link handshaking"
        else:
            link = idle
        up, down = self.bytes_totals()
        return (f"{link}; {counted(self.open_streams(), 'stream')} open, {self.stats.total} "
                f"total; {human_bytes(up)} sent, {human_bytes(down)} received")

    # -- shutdown --------------------------------------------------------------------------

    def close(self, reason: str = "shutting down") -> None:
        """Stop accepting at the entrances and close every link (streams are reset)."""
        self.closing = self.gate.closing = self.stream_log.closing = True
        for server in self.servers:
            server.close()
        self.holds.close(reason)
        for session in list(self.sessions):
            session.close(reason)
        self.gate.close()
        if self._change_timer is not None:
            self._change_timer.cancel()
            self._change_timer = None
        self.stream_log.close()
