"""One link: :class:`Session`, the protocol of the link transport, driving one
:class:`~tcpmuxd.sockmux.connection.SockMuxConnection`.

The link transports themselves (TCP, TLS, FIFOs, a serial line, a command's pipes) are made by
:mod:`tcpmuxd.sockmux.links`; a session is their protocol. It feeds what it reads to the
connection, acts on the events (each stream's to its :class:`~tcpmuxd.sockmux.stream.Stream`,
the link's own here), and writes what the connection queued, batched per poll round.

Link life
---------
A :class:`Session` sends HELLO in ``connection_made``, runs a timer at ``next_deadline()`` for
keep-alive and dead-peer detection, and gives the handshake (authentication included)
:attr:`Hub.handshake_timeout` seconds. ``DeadPeer``, ``AuthenticationFailed``, a
:class:`RemoteProtocolError`, EOF or an error on the link close it with a logged reason; every
stream it carried is reset on the local side (RST for TCP, so neither end mistakes the cut for
a complete transfer), and nothing waits for a peer that is gone. A new link makes a new
Session (and a new connection object). A link this side cuts before it was up may be held
before its reset (:mod:`tcpmuxd.sockmux.linkgate`).

Resumption (between authenticated sockmuxd peers, ``SockMuxConfig.resume_timeout``; see
docs/sockmux-protocol.md, section 12): a link that is lost rather than failed (EOF, a reset,
a dead peer, a new link that failed before it resumed) *suspends* its session instead: the
transport is reset, the connection and every stream are kept (the streams go on reading
and writing their local sockets within their windows), the hub records it
(``Hub.suspended``) and a timer runs to the resume deadline. The next link's Session adopts
the suspended one: a side that re-dials (``Hub.redials``) reattaches the connection to its
new link; a receptor's new link starts with a fresh connection, and when the peer asks to
resume (``ResumeRequested``) the session it names takes that link over. Then the streams go
on where they were (``LinkResumed``). A peer that no longer has the session, or a deadline
that passes, resets the streams as a lost link did before. A protocol error, a failed
authentication of an established link, and shutdown end the session as before.

Output and memory
-----------------
Everything the callbacks of one poll round queued goes out in one ``writelines`` (one writev)
before the loop polls again (:meth:`Session._flush`). The link transport has write-buffer
limits :data:`LINK_WRITE_HIGH` / :data:`LINK_WRITE_LOW`: above the high mark streams that have
something to send pause (``link_blocked``), below the low mark they resume. Reading *the link*
is never paused for data (two peers that both stopped reading while both had full buffers
would deadlock), only for control frames. Those are mostly answers the connection gives by
itself to the peer's frames (ECHOOK to ECHO, HELLOOK to HELLO, CLOSED to CLOSE, a CLOSE
refusing a CONNECT, SENT for data written), so a peer that sends such frames and reads nothing
would make this side queue answers without limit: no window bounds them. The session counts
them (``conn.control_bytes_queued``: everything but stream data) into
:attr:`Session.unread_control`, an upper bound of the control bytes still in the buffer (cut
to the buffer's size, which FIFO order allows). Above :attr:`Session.control_limit`
(:data:`MAX_UNREAD_CONTROL`, at least ``link_high``) reading the link pauses, until the buffer
drains below ``link_low`` (``resume_writing``); if the peer has not read by then within
:attr:`Hub.send_timeout` seconds, the link is reset and the record says why. Between two
checks one read is answered at most: 256 KiB of the peer's smallest frames, which HELLOOK (the
largest answer to the smallest frame) turns into about 1.5 MiB. So the streams of one link
hold at most ``max_streams * (2 * window + 256 KiB + 2 frames)`` (about 2.4 GiB with the
defaults, a worst case that needs every stream stalled in both directions at once; OpenSSH's
channels have 2 MiB windows and no stream limit at all); ``MaxStreams=`` and ``WindowSize=``
bound it further.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

from ..common.words import counted
from .connection import (
    REASON_NO_SERVER,
    Authenticated,
    AuthenticationFailed,
    ConnectionState,
    DataReceived,
    DeadPeer,
    FrameIgnored,
    HandshakeComplete,
    LinkClosed,
    LinkReady,
    LinkResumed,
    LinkSuspended,
    PeerRestarted,
    Pong,
    ResumeExpired,
    ResumeRefused,
    ResumeRequested,
    SessionEnded,
    SockMuxConnection,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    WindowUpdated,
)
from .frames import LocalProtocolError, RemoteProtocolError
from .stream import CONNECTING, Stream, reset_transport
from .streamlog import human_bytes

if TYPE_CHECKING:
    from .session import Hub

__all__ = ["Session", "LINK_WRITE_HIGH", "LINK_WRITE_LOW", "MAX_UNREAD_CONTROL", "port_of"]

#: Link write buffer: above HIGH, streams stop reading their clients; below LOW they resume.
LINK_WRITE_HIGH: Final = 1 << 20
LINK_WRITE_LOW: Final = 256 << 10
#: Control frames (ECHOOK, HELLOOK, SENT, CLOSE, CLOSED...: everything but stream data) that
#: may wait unread in the link's write buffer; above it reading the link pauses (see above).
MAX_UNREAD_CONTROL: Final = 1 << 20
#: flush_now joins the chunks when there are more than SMALL_CHUNKS of them, on average
#: smaller than SMALL_CHUNK bytes (copying them costs less than buffering them one by one).
SMALL_CHUNKS: Final = 64
SMALL_CHUNK: Final = 128
#: How long CLOSED answers may wait for other frames to share a write with (they only free
#: the peer's slot; under load the next CONNECT or data takes them along well before this).
CLOSED_DELAY: Final = 0.005
#: A link being closed gets this long to flush (an AUTH failure notice, CLOSEs) before abort.
LINK_CLOSE_LINGER: Final = 2.0


def port_of(addr: str) -> int | None:
    """The port of a ``HOST:PORT`` text from the peer (DeleGate's entrance), or None."""
    tail = addr.rpartition(":")[2]
    if tail.isascii() and tail.isdigit() and len(tail) <= 5:
        port = int(tail)
        return port if 0 < port < 65536 else None
    return None


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
        #: Resumption: the link is lost, the session (connection, streams) waits for another.
        self.suspended = False
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
        transport.set_write_buffer_limits(high=self.hub.link_high,  # type: ignore[attr-defined]
                                          low=self.hub.link_low)
        hub = self.hub
        if not hub._link_made(self):  # (it names the link: peer, source)
            return
        held = hub.suspended if hub.redials else None
        if held is not None and held.conn.state is ConnectionState.SUSPENDED:
            self._adopt(held)
            held._retire("its session goes on over a new link")
            hub.log_event(f"link {self.peer}: resuming the lost link's session "
                          f"({len(self.streams)} streams)", SOCKMUX_EVENT="link-resuming",
                          SOCKMUX_LINK=self.peer)
            self.conn.reattach(now=self.loop.time())
        else:
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
        self.hub.gate.unheld(self)
        if self.suspended:  # (the transport _suspend reset)
            return
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
                stream.kick()
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
            self._fail(f"the peer does not read: {human_bytes(self.unread_control)} of control "
                       f"frames (answers to its own) unread for {self.hub.send_timeout:g} s "
                       f"({human_bytes(self.transport.get_write_buffer_size())} queued in all)",
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
                    stream.deliver(ev.data)
            elif isinstance(ev, WindowUpdated):
                stream = streams.get(ev.stream_id)
                if stream is not None and stream.pending is not None:
                    stream.kick()
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
                stream.accepted(ev.server_addr, ev.first_data)
        elif isinstance(ev, StreamEnded):
            stream = streams.get(ev.stream_id)
            if stream is not None:
                stream.remote_ended()
        elif isinstance(ev, StreamClosed):
            stream = streams.get(ev.stream_id)
            if stream is not None:
                stream.closed_by_peer(ev.reason)
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
                          f"{counted(len(ev.closed_stream_ids), 'stream')} closed, handshake "
                          "again",
                          priority=4, SOCKMUX_EVENT="peer-restarted", SOCKMUX_LINK=self.peer)
            if was_ready:
                hub._link_unready(self)
            self._rearm_handshake()
        elif isinstance(ev, StreamRefused):
            hub.stats.refused += 1
            if hub.stream_log.may_log(True):
                hub.log_event(f"link {self.peer}: stream from {ev.client_addr} (entrance "
                              f"{ev.entrance_addr}) refused: {ev.reason}", priority=5,
                              SOCKMUX_EVENT="stream-refused", REMOTE_ADDR=ev.client_addr,
                              SOCKMUX_ENTRANCE=ev.entrance_addr, SOCKMUX_REASON=ev.reason)
        elif isinstance(ev, FrameIgnored):
            hub.debug(f"link {self.peer}: ignored: {ev.reason}")
        elif isinstance(ev, ResumeRequested):
            self._resume_requested(ev.session_id)
        elif isinstance(ev, LinkResumed):
            self._resumed(ev)
        elif isinstance(ev, ResumeRefused):
            self._kill_streams(ev.closed_stream_ids, f"link reset: {ev.reason}")
            hub.log_event(f"link {self.peer}: session not resumed ({ev.reason}): "
                          f"{len(ev.closed_stream_ids)} suspended streams reset, a fresh "
                          "session starts", priority=4, SOCKMUX_EVENT="resume-refused",
                          SOCKMUX_LINK=self.peer, SOCKMUX_REASON=ev.reason)
        elif isinstance(ev, SessionEnded):
            self._kill_streams(ev.closed_stream_ids, f"link reset: the peer ended the session "
                               f"({ev.reason})")
            hub.log_event(f"link {self.peer}: the peer ended the session ({ev.reason}): "
                          f"{counted(len(ev.closed_stream_ids), 'stream')} reset",
                          priority=4, SOCKMUX_EVENT="session-ended", SOCKMUX_LINK=self.peer,
                          SOCKMUX_REASON=ev.reason)
            # the peer is stopping and waits for this side to close the link
            self._fail(f"the peer ended the session ({ev.reason})", final=True)
        elif isinstance(ev, ResumeExpired):
            self._fail(f"no link resumed the session within "
                       f"{hub.config.resume_timeout:g} s (resume timeout)", final=True)
        elif isinstance(ev, (LinkClosed, LinkSuspended)):
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
            stream.refused(f"refused: {REASON_NO_SERVER} ({why})")
            stream.finish()
            return
        stream.label = stream.target = exit_.target
        if ev.first_data:
            stream.early = ev.first_data
        stream.enter(CONNECTING)
        self.streams[ev.stream_id] = stream
        if hub.opener is None:
            stream.exit_failed(f"{REASON_NO_SERVER} (no exit opener)")
            return
        opening = hub.opener.open(exit_, stream)
        if opening is not None and not opening.done():  # else it failed already, at once
            stream.task = opening

    # -- resumption --------------------------------------------------------------------------

    def _adopt(self, old: Session) -> None:
        """Carry on ``old``'s session over this link: its connection and its streams. ``old``
        gets an unused connection: a flush it still has scheduled must not take this one's
        output."""
        self.conn, old.conn = old.conn, SockMuxConnection(self.hub.config)
        self.streams, old.streams = old.streams, {}
        self.link_blocked, old.link_blocked = old.link_blocked, set()
        for stream in self.streams.values():
            stream.session = self
        self._control_mark = self.conn.control_bytes_queued

    def _retire(self, reason: str) -> None:
        """This Session's session goes on in another one (_adopt): end it without touching
        the streams or the connection; its link, if it still has one, is reset."""
        self._cancel_timers()
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        self.closed = True
        self.suspended = self.ready = False
        self.reason = reason
        hub = self.hub
        hub.sessions.discard(self)
        if hub.current is self:
            hub.current = None
        if hub.suspended is self:
            hub.suspended = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            reset_transport(transport)
        if not self.done.done():
            self.done.set_result(reason)

    def _cancel_timers(self) -> None:
        """The link's timers: keep-alive (or the resume deadline), handshake, stall."""
        for timer in (self._timer, self._handshake_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._handshake_timer = self._stall_timer = None

    def _suspend(self, reason: str) -> None:
        """The link is lost: keep the session for a new link (see the module docstring)."""
        self.conn.suspend(reason, self.loop.time())
        self.suspended = True
        self.ready = False
        self._cancel_timers()
        self.link_paused = self.read_paused = False
        transport, self.transport = self.transport, None
        if transport is not None and not transport.is_closing():
            reset_transport(transport)
        self.hub._link_suspended(self, reason)
        if not self.done.done():
            self.done.set_result(reason)
        self._arm_timer()  # the resume deadline

    def _resume_requested(self, session_id: bytes) -> None:
        """Receptor: the peer asks this new link to carry on one of our sessions."""
        hub = self.hub
        old = hub.session_for(session_id, self)
        if old is None:
            hub.log_event(f"link {self.peer}: the peer asks to resume a session this side does "
                          "not have (restarted, or expired): a fresh session starts",
                          priority=4, SOCKMUX_EVENT="resume-unknown", SOCKMUX_LINK=self.peer)
            self._handle(self.conn.refuse_resume("no such session (restarted, or expired)"))
            return
        new = self.conn
        events = old.conn.take_over(new)
        if new.state is ConnectionState.CLOSED and any(
                isinstance(ev, AuthenticationFailed) for ev in events):
            self._handle(events)  # the new link fails; the session stays where it was
            return
        self._adopt(old)
        old._retire("its session goes on over a newer link")
        self._handle(events)

    def _resumed(self, ev: LinkResumed) -> None:
        self.hub.log_event(f"link {self.peer}: session resumed, {len(ev.stream_ids)} streams "
                           f"carried on ({human_bytes(ev.resent)} resent)",
                           SOCKMUX_EVENT="link-resumed", SOCKMUX_LINK=self.peer,
                           SOCKMUX_STREAMS=len(ev.stream_ids))
        self._ready(True)
        blocked, self.link_blocked = self.link_blocked, set()
        for stream in list(self.streams.values()):
            if stream in blocked or stream.pending is not None:
                stream.kick()
        self._flush()

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
                stream.detach(reason)
                stream.close_local(abort=True)

    def close(self, reason: str) -> None:
        """Close the link (shutdown, replaced by a newer link): every stream is reset, a
        suspended session's too. A resumable session is ended on the link first (RESUME E,
        flushed by _fail()), so the peer resets its streams now, not after its resume
        timeout."""
        ending = not self.closed and not self.suspended and self.conn.end_session(reason)
        self._fail(reason, final=True, ending=ending)

    def _fail(self, reason: str, priority: int = 4, reset: bool = False,
              penalise: bool = False, final: bool = False, ending: bool = False) -> None:
        """Close the link: ``reset`` at once (RST: the peer does not read, there is nothing
        it would get), else after flushing what is queued (at most LINK_CLOSE_LINGER).
        ``penalise``: this side cuts the link for the peer's fault; if it never was up, the
        hub may hold it for a while before the reset (see admission.py). With resumption a
        link that is lost (not ``penalise``d, or one carrying a suspended session) suspends
        the session instead, unless ``final`` (shutdown, expiry, replaced). ``ending``: the
        link carries RESUME E (close()), which must reach the peer before the link ends."""
        if self.closed:
            return
        conn = self.conn
        if self.suspended:
            if not final:
                return
            self.suspended = False
        elif not final and conn.resumable and (not penalise or conn.suspended):
            self._suspend(reason)
            return
        if not reset:
            try:
                self.flush_now()  # an AUTH failure notice, CLOSEs: the peer's log should say why
            except Exception:  # the transport may be gone already
                pass
        self.closed = True
        self.reason = reason
        self.ready = False
        self._cancel_timers()
        self.conn.close_link(reason)
        streams = list(self.streams.values())
        for stream in streams:
            stream.detach(f"link down: {reason}")
            stream.close_local(abort=True)
        self.link_blocked.clear()
        transport = self.transport
        # (a link whose peer leaves much unread is not held: its buffer would be held with it)
        may_hold = (transport is not None
                    and transport.get_write_buffer_size() <= self.hub.link_low)
        hold = self.hub._link_down(self, reason, len(streams), priority, penalise, may_hold)
        if transport is not None and not transport.is_closing():
            if hold > 0:  # unread, until the hold is over (or the peer gives up)
                transport.pause_reading()
                self._abort_timer = self.loop.call_later(hold, self.release)
            elif reset:
                reset_transport(transport)
            elif ending:
                # RESUME E queued: the peer closes the link once it has read it; until then
                # its input is read (and dropped), since closing with input unread would
                # reset the link, and the reset could destroy RESUME E on its way
                if transport.can_write_eof():
                    transport.write_eof()
                transport.resume_reading()
                self._abort_timer = self.loop.call_later(LINK_CLOSE_LINGER, transport.abort)
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
        self.hub.gate.unheld(self)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            reset_transport(transport)

    def __repr__(self) -> str:
        return (f"<Session {self.peer} ready={self.ready} closed={self.closed} "
                f"streams={len(self.streams)}>")
