"""The SockMux session state machine, sans-I/O: one :class:`SockMuxConnection` per link.

The connection is fed the bytes read from the link and returns events; it queues the bytes to
write. It never touches a socket or a timer: the driver (``linksession.py``) does the I/O,
passes the monotonic time in, and acts on the events; the local time written into HELLO and
the nonces come from callables it may pass (``wall_clock``, ``random_bytes``). It speaks DeleGate 9.9.11's SockMux
(``docs/sockmux-protocol.md``) and negotiates tcpmuxd's
extensions (half-close, more streams, larger frames and windows, mutual authentication) so
that a plain DeleGate peer falls back to plain behaviour.

Driving it
----------
::

    conn = SockMuxConnection(SockMuxConfig(secret=key, hostname="gw1"))
    conn.initiate_connection(now=loop.time())          # queues HELLO
    transport.writelines(conn.data_to_send())
    # on every read:
    try:
        events = conn.receive_data(data, now=loop.time())
    except RemoteProtocolError as exc:                 # peer broke the protocol
        handle(exc.events); log(exc); transport.writelines(conn.data_to_send())
        conn.close_link(str(exc)); transport.close()
    for event in events: ...                           # see the events below
    transport.writelines(conn.data_to_send())
    # every second or so (or at conn.next_deadline()):
    events = conn.tick(loop.time())                    # may queue ECHO, may report DeadPeer

Always flush :meth:`SockMuxConnection.data_to_send` after any call, also after a terminal
event (an AUTH failure notice may be queued). A driver may hold back output for a short
while when :attr:`SockMuxConnection.output_is_urgent` is false: then only CLOSED answers are
queued, which nothing waits for (they let the peer reuse a slot), and they can ride along
with the next frames instead of costing a write of their own. Stop reading the link while
the transport's write buffer is high (see :attr:`SockMuxConnection.outgoing_bytes`): the
connection answers some frames (ECHO, CLOSE, HELLO) without asking, and only back-pressure
bounds those replies.

Link life cycle (``ConnectionState``; the table is :data:`CONNECTION_TRANSITIONS`)
----------------------------------------------------------------------------------
``IDLE`` -initiate-> ``HELLO`` (HELLO sent; every HELLO/HELLOOK answered with HELLOOK until a
HELLOOK arrives) -first HELLOOK-> ``SETUP`` (our SETOPTs sent: PACKSIZE, EXTENSIONS, CONNDATA;
reading the peer's until its CONNDATA or any other frame) -> ``AUTH`` (nonces and proofs, only
when both sides announced ``auth``) -> ``OPEN`` (streams allowed). ``HandshakeComplete`` is
emitted on leaving ``SETUP``, ``Authenticated`` on a good proof, ``LinkReady`` on entering
``OPEN``. A HELLO in ``SETUP``/``AUTH``/``OPEN`` means the peer restarted: every stream dies
(``PeerRestarted``) and the handshake starts again from ``HELLO``. ``CLOSED`` is terminal
(``AuthenticationFailed``, ``DeadPeer``, a :class:`RemoteProtocolError`, :meth:`close_link`):
the driver closes the link and, for a connector, makes a new connection object to re-dial.

Streams (``StreamState``; the table is :data:`STREAM_TRANSITIONS`)
----------------------------------------------------------------
Stream ids are ours (16 bit, never 0 or 0x00FF, allocated round-robin so that an id is reused
as late as possible and never while it is in the table); the peer's ids are kept internally.
A stream opened with :meth:`open_stream` is ``CONNECTING`` until the peer's CONNECTED
(``StreamAccepted``) or CLOSE (``StreamClosed``). A stream the peer opens is ``REQUESTED``
(``StreamRequested``) until the driver calls :meth:`accept_stream` or :meth:`refuse_stream`.
Then ``OPEN``; with half-close, ``LOCAL_ENDED`` after :meth:`end_stream` and ``REMOTE_ENDED``
after ``StreamEnded``; ``CLOSING`` after the driver's :meth:`close_stream` (CLOSE sent, waiting
for CLOSED). A stream is over for the driver when it got ``StreamClosed``, when it called
:meth:`close_stream`/:meth:`refuse_stream`, or when it both called :meth:`end_stream` and got
``StreamEnded``, or when a link-level event lists it in ``closed_stream_ids``.

Flow control and memory bounds
------------------------------
* :meth:`send_data` takes at most the stream's credit (64 KiB towards a plain peer, the peer's
  announced window with the extension) and queues it at once, zero-copy for ``bytes``; the
  driver keeps the rest and retries on ``WindowUpdated`` (or, for a ``CONNECTING`` stream,
  on ``StreamAccepted``). So queued outgoing data per stream never exceeds its send window.
* Incoming data is handed over in ``DataReceived`` at once; the peer may not have more than the
  receive window outstanding (else :class:`RemoteProtocolError`), and SENT goes back only when
  the driver calls :meth:`acknowledge` with the bytes it wrote to the destination: one SENT per
  SEND frame towards a plain peer (DeleGate's way), lazily with the extension (one SENT for
  everything written once that reaches half the window, none once the peer's SHUT made it
  useless: see :class:`~.windows.ReceiveWindow`). Outside the
  window there is only first data and urgent (SENDOOB) data, at most two frames together
  (more urgent data unwritten is a :class:`RemoteProtocolError`). So the driver's buffer per
  stream never exceeds the receive window plus two frames:
  ``max_streams * (window + 2 * max_frame_size)`` bytes for the whole link.
* The decoder holds at most one incomplete frame (``< max_frame_size`` bytes) between calls.
* Texts (HELLO, CONNECT, CLOSE, extension announcement) are refused beyond
  ``max_text_length``; frames beyond the negotiated size kill the link.

Events (slotted dataclasses, all subclasses of :class:`Event`; read-only by convention)
The pieces
----------
``negotiation.py`` (configuration, the extension offer, the negotiated features),
``states.py`` (the states and their tables), ``events.py`` (what the connection reports),
``linkcore.py`` (the link's own half: output, clock, handshake, authentication, keep-alive),
and this module: the streams, and :meth:`SockMuxConnection._handle`, the one place that says
which frame goes where in which state. Everything is importable from here.

Compiled
--------
These modules (with frames.py and windows.py and the session driver) are compiled with mypyc
where script/build-native ran (pyproject.toml ``[tool.sockmuxd-native]``), so they must
type-check cleanly: the compiled code checks every declared type at run time. No dataclass is
frozen (mypyc's frozen dataclasses fail when built from compiled code).

Errors
------
:class:`RemoteProtocolError` (the peer's fault, link must close; carries ``events``),
:class:`LocalProtocolError` (the driver's misuse; link unaffected), and its subclasses
:class:`StreamClosedError` (the stream is gone, e.g. closed by the peer a moment ago) and
:class:`TooManyStreams` (the negotiated stream limit is reached; refuse the local client).
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Callable, Final

from ..common.words import counted
from .events import (
    Authenticated, AuthenticationFailed, DataReceived, DeadPeer, Event, FrameIgnored,
    HandshakeComplete, LinkClosed, LinkReady, LinkResumed, LinkStats, LinkSuspended,
    PeerRestarted, Pong, ResumeExpired, ResumeRefused, ResumeRequested, SessionEnded,
    StreamAccepted, StreamClosed, StreamEnded, StreamRefused, StreamRequested, WindowUpdated,
)
from .frames import (
    AUTH, CLOSE, CLOSED, CONNECT, CONNECTED, CRYPTON, ECHO, ECHOOK, HEADER_SIZE, HELLO,
    HELLOOK, NO_STREAM, NOOP, RESUME, SEND, SENDOOB, SENT, SENTOOB, SETOPT, SHUT, Frame,
    LocalProtocolError, RemoteProtocolError, connect_text, count_payload, parse_connect,
    parse_count, parse_reason, reason_payload, type_name,
)
from .linkcore import LinkCore
from .negotiation import EXTENSIONS_MAGIC, ExtensionOffer, Features, SockMuxConfig
from .states import (
    CONNECTION_TRANSITIONS, LET_GO, RECEIVING, SENDING, STREAM_TRANSITIONS, AuthState,
    ConnectionState, StreamState,
)
from .windows import ReceiveWindow, SendWindow, lazy_threshold

__all__ = [
    "SockMuxConfig", "Features", "ExtensionOffer", "ConnectionState", "StreamState",
    "AuthState", "LinkStats", "SockMuxConnection", "CONNECTION_TRANSITIONS",
    "STREAM_TRANSITIONS", "EXTENSIONS_MAGIC",
    "StreamClosedError", "TooManyStreams",
    "Event", "HandshakeComplete", "Authenticated", "LinkReady", "AuthenticationFailed",
    "StreamRequested", "StreamAccepted", "StreamRefused", "DataReceived", "WindowUpdated",
    "StreamEnded", "StreamClosed", "PeerRestarted", "Pong", "DeadPeer", "LinkClosed",
    "FrameIgnored", "LinkSuspended", "ResumeRequested", "LinkResumed", "ResumeRefused",
    "ResumeExpired", "SessionEnded",
    "REASON_CLOSE", "REASON_CLOSED", "REASON_NO_SERVER", "REASON_NOT_AUTHENTICATED",
    "REASON_TOO_MANY_STREAMS",
]

# CLOSE / CLOSED texts as DeleGate writes them.
REASON_CLOSE: Final = "DO close"
REASON_CLOSED: Final = "OK closed"
REASON_NO_SERVER: Final = "No server"
REASON_NOT_AUTHENTICATED: Final = "### Not Authenticated ###"
REASON_TOO_MANY_STREAMS: Final = "Too many streams"
#: The two texts every stream ends with, encoded once.
_CLOSE_PAYLOAD: Final = reason_payload(REASON_CLOSE)
_CLOSED_PAYLOAD: Final = reason_payload(REASON_CLOSED)


# ---------------------------------------------------------------------------------------------
# Errors


class StreamClosedError(LocalProtocolError):
    """The stream is not (or no longer) there; typically the peer closed it a moment ago."""

    def __init__(self, stream_id: int, message: str | None = None) -> None:
        super().__init__(message or f"stream {stream_id} is closed")
        self.stream_id = stream_id


class TooManyStreams(LocalProtocolError):
    """The negotiated stream limit is reached: refuse the local client, try again later."""



# ---------------------------------------------------------------------------------------------
# The connection


class _Stream:
    __slots__ = ("id", "peer_id", "state", "local", "send", "recv", "pending_first",
                 "end_pending", "close_reason", "graceful")

    def __init__(self, stream_id: int, state: StreamState, local: bool, send_window: int,
                 recv_window: int, max_records: int, threshold: int | None = None) -> None:
        self.id = stream_id
        self.peer_id = NO_STREAM  # the peer's id for it, once CONNECT/CONNECTED told us
        self.state = state
        self.local = local  # opened by us
        self.send = SendWindow(send_window)
        self.recv = ReceiveWindow(recv_window, max_records, threshold)
        self.pending_first = b""  # first data to SEND after CONNECTED (peer without CONNDATA)
        self.end_pending = False  # end_stream() while CONNECTING
        self.close_reason = REASON_CLOSE  # for CANCELLING
        self.graceful = False  # CANCELLING came from end_stream(): flush first data first


_ID_LIMIT: Final = 0xFFFF
#: Our highest stream id towards a plain (DeleGate) peer: its ids are one byte, 0xFF is "none".
_PLAIN_ID_LIMIT: Final = 0xFE
#: The id of the placeholder agent DeleGate 9.9.11 uses once its 64-agent table is full
#: (sox.c newAgent returns a static, zeroed agent): a CONNECT or CONNECTED from it has no
#: stream behind it, and a CLOSE to id 0 would reach DeleGate's link writer (its agent 0)
#: and end its whole link. sockmuxd never uses id 0 for a stream.
_DELEGATE_PLACEHOLDER_ID: Final = 0
_FULL_TABLE: Final = f"{REASON_TOO_MANY_STREAMS} (the peer's stream table is full"


# The states the input path tests, as C statics once compiled (an enum's class attribute would
# be looked up at every use).
_HELLO_STATE: Final = ConnectionState.HELLO
_SETUP_STATE: Final = ConnectionState.SETUP
_OPEN_STATE: Final = ConnectionState.OPEN
_CLOSED_STATE: Final = ConnectionState.CLOSED
_RESUME_STATE: Final = ConnectionState.RESUME


class SockMuxConnection(LinkCore):
    """One SockMux link's protocol state. See the module docstring for the whole picture.

    ``random_bytes`` supplies nonces and ``wall_clock`` the time written into HELLO (tests
    pass deterministic ones); ``first_stream_id`` is where our id allocation starts (DeleGate
    replays in tests).
    """

    def __init__(self, config: SockMuxConfig, *,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 wall_clock: Callable[[], datetime] = datetime.now,
                 first_stream_id: int = 1) -> None:
        if not 0 < first_stream_id <= _ID_LIMIT or first_stream_id == NO_STREAM:
            raise ValueError("first_stream_id must be within 1..65535 and not 0x00FF")
        self._streams: dict[int, _Stream] = {}
        self._by_peer: dict[int, int] = {}
        self._next_id = first_stream_id
        self._streams_opened = self._streams_requested = self._streams_refused = 0
        #: Streams that send_data() gave less because of the replay bound (resumption).
        self._room_waiters: set[int] = set()
        super().__init__(config, random_bytes=random_bytes, wall_clock=wall_clock)

    def _drop_streams(self) -> tuple[int, ...]:
        closed = tuple(sorted(self._streams))
        self._streams.clear()
        self._by_peer.clear()
        self._room_waiters.clear()
        return closed

    def _live_stream_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._streams))

    def _room_freed(self, events: list[Event]) -> None:
        waiters = self._room_waiters
        if not waiters:
            return
        room = self._replay_room()
        if room <= 0:
            return
        self._room_waiters = set()
        for sid in sorted(waiters):
            s = self._streams.get(sid)
            if s is not None and s.state in SENDING:
                events.append(WindowUpdated(sid, min(s.send.available, room)))

    # -- public state of the streams ------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        """Streams in the table (every state, CLOSING included: they hold a slot)."""
        return len(self._streams)

    @property
    def stream_ids(self) -> tuple[int, ...]:
        return tuple(self._streams)

    @property
    def max_streams(self) -> int:
        if self._features is not None:
            return self._features.max_streams
        return self.config.max_streams

    @property
    def max_first_data(self) -> int:
        """First data that open_stream()/accept_stream() accept with any address texts."""
        f = self._features
        if f is None or self._state is not ConnectionState.OPEN:
            return 0
        room = f.max_payload - self.config.max_text_length - 1
        return max(0, min(room, f.send_window))

    def stream_state(self, stream_id: int) -> StreamState:
        s = self._streams.get(stream_id)
        return StreamState.CLOSED if s is None else s.state

    def send_window(self, stream_id: int) -> int:
        """Bytes send_data() would take on this stream right now."""
        s = self._streams.get(stream_id)
        if s is None or s.state not in SENDING:
            return 0
        return s.send.available

    def unacknowledged(self, stream_id: int) -> int:
        """Bytes delivered on this stream and not yet acknowledge()d."""
        s = self._streams.get(stream_id)
        return 0 if s is None else s.recv.unacknowledged

    def stats(self) -> LinkStats:
        local = sum(1 for s in self._streams.values() if s.local)
        return LinkStats(
            state=self._state.value, streams=len(self._streams), streams_local=local,
            streams_remote=len(self._streams) - local, streams_opened=self._streams_opened,
            streams_requested=self._streams_requested, streams_refused=self._streams_refused,
            bytes_sent=self._bytes_sent, bytes_received=self._bytes_received,
            frames_sent=self._frames_sent, frames_received=self._frames_received,
            data_sent=self._data_sent, data_received=self._data_received, rtt=self._rtt)

    # -- input: every frame goes through here ----------------------------------------------------

    def _handle(self, frame: Frame, events: list[Event]) -> None:
        """Hand one frame to its handler: the one dispatch of frames, by type, each a direct
        call once compiled (a table of handlers measured 2 % more instructions per round
        trip: a generic call through the table, bench/stream_instructions.sh). Before the
        link is OPEN, :meth:`_admit_early` applies the handshake's rules first."""
        t = frame.type
        if self._state is not _OPEN_STATE and not self._admit_early(t, frame, events):
            return
        if t == SEND:
            self._on_send(frame, events, False)
        elif t == SENT:
            self._on_sent(frame, events)
        elif t == CONNECT:
            self._on_connect(frame, events)
        elif t == CONNECTED:
            self._on_connected(frame, events)
        elif t == CLOSE:
            self._on_close(frame, events)
        elif t == CLOSED:
            self._on_closed(frame, events)
        elif t == SHUT and self._extension_ok(t):
            self._on_shut(frame, events)
        elif t == ECHO:
            self._on_echo(frame)
        elif t == ECHOOK:
            self._on_echook(frame, events)
        elif t == NOOP or t == SENTOOB:  # SENTOOB: we never send SENDOOB
            pass
        elif t == SENDOOB:
            self._on_send(frame, events, True)
        elif t == HELLO:
            self._on_hello(frame, events)
        elif t == HELLOOK:
            self._on_hellook(frame)
        elif t == SETOPT:
            self._on_setopt(frame, events)
        elif t == AUTH and self._extension_ok(t):
            self._on_auth(frame, events)
        elif t == RESUME and self._extension_ok(t):
            self._on_resume(frame, events)
        elif t == CRYPTON:
            raise RemoteProtocolError("peer started DeleGate's cipher (CRYPTON); not supported, "
                                      "use TLS around the link")
        else:
            events.append(FrameIgnored(t, frame.sender, frame.receiver,
                                       f"frame type {type_name(t)} not supported"))

    def _admit_early(self, t: int, frame: Frame, events: list[Event]) -> bool:
        """Whether a frame that arrives before the link is OPEN goes to its handler. The
        handshake's own (HELLO, HELLOOK, SETOPT, CRYPTON) always do. Any other frame ends the
        peer's option block (a peer that sends no CONNDATA); keep-alive frames are answered
        from the start; the rest waits for the HELLO exchange (they are ignored before it)."""
        if t == HELLO or t == HELLOOK or t == SETOPT or t == CRYPTON:
            return True
        if self._state is _RESUME_STATE:
            # Nothing but the RESUME exchange now: positions in the session streams count
            # from its last frame (docs/sockmux-protocol.md, section 12).
            if t == RESUME or t == AUTH:
                return True
            if t == NOOP or t == ECHO or t == ECHOOK:
                return False
            raise RemoteProtocolError(f"{type_name(t)} before the RESUME exchange finished")
        if self._state is _SETUP_STATE:
            self._finish_setup(events)
            if self._state is _CLOSED_STATE:
                return False
        if t == NOOP or t == ECHO or t == ECHOOK:
            return True
        if self._state is _HELLO_STATE:
            events.append(FrameIgnored(t, frame.sender, frame.receiver,
                                       f"{type_name(t)} before the HELLO exchange finished"))
            return False
        return True

    # -- streams: frames from the peer ----------------------------------------------------------

    def _stream_for(self, frame: Frame) -> _Stream | None:
        """The stream a frame is addressed to, if it is ours and from the right peer stream.

        A frame to NO_STREAM is looked up by the sender's id (a peer cancelling its CONNECT
        before our CONNECTED told it our id).
        """
        if frame.receiver == NO_STREAM:
            sid = self._by_peer.get(frame.sender)
            return None if sid is None else self._streams.get(sid)
        s = self._streams.get(frame.receiver)
        if s is None or (s.peer_id != NO_STREAM and s.peer_id != frame.sender):
            return None
        return s

    def _step(self, s: _Stream, event: str) -> StreamState | None:
        new = STREAM_TRANSITIONS[s.state].get(event)
        if new is None:
            return None
        s.state = new
        if new is StreamState.CLOSED:
            self._forget(s)
        return new

    def _forget(self, s: _Stream) -> None:
        self._streams.pop(s.id, None)
        if s.peer_id != NO_STREAM and self._by_peer.get(s.peer_id) == s.id:
            del self._by_peer[s.peer_id]

    def _on_connect(self, frame: Frame, events: list[Event]) -> None:
        addrs, first = parse_connect(frame.payload, self.config.max_text_length)
        peer_id = frame.sender
        if self._state is not ConnectionState.OPEN:
            self._refuse_connect(peer_id, addrs.first, addrs.second, REASON_NOT_AUTHENTICATED,
                                 events)
            return
        if peer_id == NO_STREAM:
            # DeleGate's id allocator returns -1 once its ids are used up, and it sends the
            # CONNECT anyway, from its "no stream" id: refuse that one, keep the link. Our
            # CLOSE to 0x00FF reaches the agent it made for it (its ids are one byte).
            self._refuse_connect(peer_id, addrs.first, addrs.second,
                                 f"{_FULL_TABLE}: CONNECT without a stream id)", events)
            return
        if peer_id == _DELEGATE_PLACEHOLDER_ID:
            # DeleGate's agent table itself is full: nothing to close on its side (and a CLOSE
            # to 0 would end its link). Refused without an answer; its client waits there.
            self._streams_refused += 1
            events.append(StreamRefused(
                peer_id, addrs.first, addrs.second,
                f"{_FULL_TABLE}: CONNECT from its placeholder id 0, left unanswered)"))
            return
        if peer_id in self._by_peer:
            raise RemoteProtocolError(f"CONNECT reuses stream id {peer_id:#06x}, still open")
        f = self._features
        assert f is not None  # set when the link opened
        limit = f.max_streams
        if len(self._streams) >= limit:
            self._refuse_connect(peer_id, addrs.first, addrs.second,
                                 f"{REASON_TOO_MANY_STREAMS} (limit {limit})", events)
            return
        s = self._new_stream(StreamState.REQUESTED, local=False)
        s.peer_id = peer_id
        self._by_peer[peer_id] = s.id
        s.recv.grant_free(len(first))
        self._streams_requested += 1
        events.append(StreamRequested(s.id, addrs.first, addrs.second, first))

    def _refuse_connect(self, peer_id: int, client: str, entrance: str, reason: str,
                        events: list[Event]) -> None:
        # No slot is taken: the CLOSE comes from "no stream" and its CLOSED is ignored.
        self._queue(CLOSE, NO_STREAM, peer_id, reason_payload(reason))
        self._streams_refused += 1
        events.append(StreamRefused(peer_id, client, entrance, reason))

    def _on_connected(self, frame: Frame, events: list[Event]) -> None:
        s = self._streams.get(frame.receiver)
        if s is None:
            # Accepted a stream we no longer know: tell the peer, so its side does not hang.
            self._queue(CLOSE, frame.receiver, frame.sender, _CLOSE_PAYLOAD)
            return
        if s.state is StreamState.CLOSING and s.peer_id == NO_STREAM:
            return  # it crossed the CLOSE of our "cancel": the peer closes on that CLOSE
        if s.state not in (StreamState.CONNECTING, StreamState.CANCELLING):
            raise RemoteProtocolError(f"CONNECTED for stream {s.id} in state {s.state.value}")
        addrs, first = parse_connect(frame.payload, self.config.max_text_length)
        if frame.sender == NO_STREAM or frame.sender == _DELEGATE_PLACEHOLDER_ID:
            # DeleGate connected its server but had no free slot (its table is full, see
            # _on_connect): close that agent (our CLOSE to 0x00FF reaches it; a placeholder
            # has nothing to close), and give the stream up.
            let_go = s.state in LET_GO
            if frame.sender == NO_STREAM:
                self._queue(CLOSE, s.id, NO_STREAM, reason_payload(REASON_TOO_MANY_STREAMS))
            self._step(s, "recv CONNECTED without an id")
            if not let_go:
                events.append(StreamClosed(
                    s.id, f"{_FULL_TABLE}: CONNECTED without a stream id)"))
            return
        if frame.sender in self._by_peer:
            raise RemoteProtocolError(f"CONNECTED reuses stream id {frame.sender:#06x}")
        s.peer_id = frame.sender
        self._by_peer[s.peer_id] = s.id
        s.recv.grant_free(len(first))
        if self._step(s, "recv CONNECTED") is StreamState.CLOSING:  # we cancelled meanwhile
            if s.graceful and s.pending_first:
                self._send_frames(s, s.pending_first)
            self._queue(CLOSE, s.id, s.peer_id, reason_payload(s.close_reason))
            return
        events.append(StreamAccepted(s.id, first, addrs.first, addrs.second))
        if s.pending_first:
            self._send_frames(s, s.pending_first)
            s.pending_first = b""
        if s.end_pending:
            self._end(s)

    def _on_send(self, frame: Frame, events: list[Event], urgent: bool) -> None:
        s = self._stream_for(frame)
        if s is None:
            return  # data racing with a close: dropped
        if s.state is StreamState.REMOTE_ENDED:
            raise RemoteProtocolError(f"data on stream {s.id} after the peer ended it")
        if s.state not in RECEIVING or not frame.payload:
            return
        n = len(frame.payload)
        if urgent:  # DeleGate acknowledges out-of-band data at once, outside the window
            f = self._features
            assert f is not None  # streams exist only on an open link
            if s.recv.free + n > 2 * f.max_payload:
                raise RemoteProtocolError(
                    f"urgent data flood on stream {s.id}: more than two frames unwritten")
            self._queue(SENTOOB, s.id, frame.sender, count_payload(n))
            s.recv.grant_free(n)  # the driver acknowledges it like any data: no SENT for it
        else:
            s.recv.receive(n)
        self._data_received += n
        events.append(DataReceived(s.id, frame.payload, urgent))

    def _on_sent(self, frame: Frame, events: list[Event]) -> None:
        count = parse_count(frame.payload)
        s = self._stream_for(frame)
        if s is None or s.state in LET_GO:
            return
        s.send.acknowledge(count)
        if s.state in SENDING:
            events.append(WindowUpdated(s.id, s.send.available))

    def _on_close(self, frame: Frame, events: list[Event]) -> None:
        reason = parse_reason(frame.payload, self.config.max_text_length)
        s = self._stream_for(frame)
        # Always answer, also for a stream we do not know, so the peer can free its slot.
        self._queue(CLOSED, frame.receiver if s is None else s.id, frame.sender,
                    _CLOSED_PAYLOAD, urgent=False)
        if s is None:
            return
        let_go = s.state in LET_GO
        self._step(s, "recv CLOSE")
        if not let_go:
            events.append(StreamClosed(s.id, reason))

    def _on_closed(self, frame: Frame, events: list[Event]) -> None:
        s = self._stream_for(frame)
        if s is not None:
            self._step(s, "recv CLOSED")  # only CLOSING has this input; others: stale, ignored

    def _on_shut(self, frame: Frame, events: list[Event]) -> None:
        s = self._stream_for(frame)
        if s is None or s.state in LET_GO:
            return
        if s.state is StreamState.REMOTE_ENDED:
            raise RemoteProtocolError(f"second SHUT on stream {s.id}")
        new = self._step(s, "recv SHUT")
        if new is None:
            raise RemoteProtocolError(f"SHUT on stream {s.id} in state {s.state.value}")
        events.append(StreamEnded(s.id))
        if new is StreamState.CLOSING:  # both directions ended: close it
            self._queue(CLOSE, s.id, s.peer_id, _CLOSE_PAYLOAD)

    # -- streams: calls from the driver ---------------------------------------------------------

    def _require_open(self) -> Features:
        if self._state is not ConnectionState.OPEN and not self._detached:
            raise LocalProtocolError(f"streams need an open link (state {self._state.value})")
        assert self._features is not None
        return self._features

    def _get(self, stream_id: int) -> _Stream:
        if self._state is ConnectionState.CLOSED:
            raise StreamClosedError(stream_id, f"stream {stream_id}: the link is closed")
        s = self._streams.get(stream_id)
        if s is None or s.state in LET_GO:
            raise StreamClosedError(stream_id)
        return s

    def _new_stream(self, state: StreamState, local: bool) -> _Stream:
        f = self._features
        assert f is not None
        sid = self._allocate_id()
        # Lazy credit (one SENT per half window written) needs both sides on sockmuxd/1, whose
        # decoder takes any SENT count as a delta; a plain peer gets one SENT per SEND frame.
        threshold = lazy_threshold(f.receive_window) if f.extensions else None
        s = _Stream(sid, state, local, f.send_window, f.receive_window,
                    self.config.max_sent_records, threshold)
        self._streams[sid] = s
        return s

    def _allocate_id(self) -> int:
        f = self._features
        # DeleGate keeps the peer's id of a stream in one byte (sox.c: typedef unsigned char
        # Aid) and addresses its frames to what is left of it: towards a plain peer our ids
        # must fit in 1..254, or stream 256 would be answered as stream 0 (seen live).
        limit = _ID_LIMIT if f is not None and f.extensions else _PLAIN_ID_LIMIT
        for _ in range(limit + 1):
            sid = self._next_id
            self._next_id = sid + 1 if sid < limit else 1
            if sid > limit:
                continue
            if sid != NO_STREAM and sid not in self._streams:
                return sid
        raise TooManyStreams("no free stream id")  # not reachable: max_streams < the ids

    @staticmethod
    def _check_first_data(text: bytes, first_data: bytes, f: Features) -> None:
        if f.conndata:
            room = f.max_payload - len(text)
            if len(first_data) > room:
                raise LocalProtocolError(f"{len(first_data)} bytes of first data do not fit "
                                         f"one frame ({room} bytes left)")
        elif len(first_data) > min(f.send_window, f.max_payload):
            raise LocalProtocolError("first data larger than the stream's send window")

    def open_stream(self, client_addr: str, entrance_addr: str,
                    first_data: bytes = b"") -> int:
        """Open a stream for a client accepted at an entrance; returns its stream id.

        ``client_addr`` / ``entrance_addr`` are ``HOST:PORT`` texts (the peer picks the server
        by the entrance). ``first_data`` (at most :attr:`max_first_data`) rides inside CONNECT
        when the peer allows it, otherwise it is sent right after CONNECTED. Raises
        :class:`TooManyStreams` at the negotiated limit.
        """
        f = self._require_open()
        if len(self._streams) >= f.max_streams:
            raise TooManyStreams(f"stream limit reached ({counted(f.max_streams, 'stream')})")
        text = connect_text(client_addr, entrance_addr, max_length=self.config.max_text_length)
        first_data = bytes(first_data)
        self._check_first_data(text, first_data, f)
        s = self._new_stream(StreamState.CONNECTING, local=True)
        if f.conndata:
            self._queue_data(CONNECT, s.id, NO_STREAM, text, first_data)
        else:
            self._queue(CONNECT, s.id, NO_STREAM, text)
            s.pending_first = first_data
        self._streams_opened += 1
        return s.id

    def accept_stream(self, stream_id: int, first_data: bytes = b"", *,
                      server_addr: str = "0.0.0.0:0", local_addr: str = "0.0.0.0:0") -> None:
        """Answer a StreamRequested with CONNECTED (the driver has connected to the server).

        ``server_addr`` / ``local_addr`` fill DeleGate's CONNECTED text; ``first_data`` (e.g.
        a server greeting read meanwhile) rides along like open_stream()'s.
        """
        f = self._require_open()
        s = self._get(stream_id)
        if s.state is not StreamState.REQUESTED:
            raise LocalProtocolError(f"stream {stream_id} is {s.state.value}, not REQUESTED")
        text = connect_text(server_addr, local_addr, max_length=self.config.max_text_length)
        first_data = bytes(first_data)
        self._check_first_data(text, first_data, f)
        self._step(s, "accept")
        if f.conndata:
            self._queue_data(CONNECTED, s.id, s.peer_id, text, first_data)
        else:
            self._queue(CONNECTED, s.id, s.peer_id, text)
            if first_data:
                self._send_frames(s, first_data)

    def refuse_stream(self, stream_id: int, reason: str = REASON_NO_SERVER) -> None:
        """Answer a StreamRequested with CLOSE ``reason`` (e.g. "No server")."""
        s = self._get(stream_id)
        payload = reason_payload(reason, self.config.max_text_length)
        if self._step(s, "refuse") is None:
            raise LocalProtocolError(f"stream {stream_id} is {s.state.value}, not REQUESTED")
        self._queue(CLOSE, s.id, s.peer_id, payload)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue up to the stream's credit of ``data``; returns how many bytes were taken.

        ``bytes`` are not copied (the frames hold them, or memoryviews of them); other buffers
        are copied once. 0 means no credit now: keep the rest and retry after WindowUpdated (or
        StreamAccepted for a stream still CONNECTING). Raises StreamClosedError for a stream
        that is gone, LocalProtocolError after end_stream().
        """
        s = self._get(stream_id)
        if s.state is StreamState.CONNECTING:
            return 0
        if s.state not in SENDING:
            raise LocalProtocolError(f"cannot send on stream {stream_id} ({s.state.value})")
        n = min(len(data), s.send.available)
        # Resumption: what is kept for resending is bounded too. Kept and queued bytes are at
        # least what _replay_room() counts: below the bound, that call is not needed.
        if self._replay_limit and self._replay_bytes + self._out_bytes + n > self._replay_limit:
            room = self._replay_room()
            if room < n:
                self._room_waiters.add(s.id)
                n = room
        if n <= 0:
            return 0
        body: bytes | memoryview
        if isinstance(data, bytes):
            body = data if n == len(data) else memoryview(data)[:n]
        else:
            body = bytes(memoryview(data)[:n])
        self._send_frames(s, body)
        return n

    def _send_frames(self, s: _Stream, body: bytes | memoryview) -> None:
        n = len(body)
        s.send.consume(n)
        step = self._send_frame_size - HEADER_SIZE
        if n <= step:  # one frame: most writes of an interactive stream
            self._queue_data(SEND, s.id, s.peer_id, b"", body)
        else:
            view = memoryview(body)
            for start in range(0, n, step):
                self._queue_data(SEND, s.id, s.peer_id, b"", view[start:start + step])
        self._data_sent += n

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The driver wrote ``n`` more bytes of this stream's data to the destination.

        Acknowledge everything written, first data included. This is what returns credit to
        the peer (SENT), so a destination that does not read stalls only its own stream:
        one SENT per SEND frame towards a plain peer; with the extension, one SENT for all
        bytes written once they reach half the window (lazy credit, see ReceiveWindow).
        Unknown or closing streams are ignored (the close raced with the write); so is
        credit after the peer's SHUT with the extension (it will send nothing more).
        """
        s = self._streams.get(stream_id)
        if s is None or s.state in LET_GO or n == 0 or self._state is ConnectionState.CLOSED:
            return
        counts = s.recv.acknowledge(n)
        if s.recv.threshold is not None and s.state is StreamState.REMOTE_ENDED:
            return  # the peer sent SHUT: credit would be of no use to it
        for count in counts:
            self._queue(SENT, s.id, s.peer_id, count_payload(count))

    def end_stream(self, stream_id: int) -> None:
        """The local side reached EOF: half-close (SHUT) when negotiated, else close."""
        s = self._get(stream_id)
        f = self._features
        if f is None or not f.half_close:
            self._close(s, REASON_CLOSE, graceful=True)
            return
        if s.state is StreamState.CONNECTING:
            s.end_pending = True
            return
        if s.state not in (StreamState.OPEN, StreamState.REMOTE_ENDED):
            raise LocalProtocolError(f"cannot end stream {stream_id} ({s.state.value})")
        self._end(s)

    def _end(self, s: _Stream) -> None:
        if self._step(s, "end") is StreamState.CLOSING:  # the peer had ended already
            self._queue(CLOSE, s.id, s.peer_id, _CLOSE_PAYLOAD)
        else:
            self._queue(SHUT, s.id, s.peer_id)

    def close_stream(self, stream_id: int, reason: str = REASON_CLOSE) -> None:
        """Close both directions (CLOSE ``reason``). A stream already gone is ignored."""
        s = self._streams.get(stream_id)
        if s is None or s.state in LET_GO or self._state is ConnectionState.CLOSED:
            return
        self._close(s, reason, graceful=False)

    def _close(self, s: _Stream, reason: str, graceful: bool) -> None:
        payload = reason_payload(reason, self.config.max_text_length)
        f = self._features
        if (s.state is StreamState.CONNECTING and f is not None and f.extensions
                and not (graceful and s.pending_first)):
            # A sockmuxd peer finds the stream by our id (receiver 0x00FF), so it can stop
            # connecting its exit now instead of finishing the connect for nothing.
            self._step(s, "cancel")
            self._queue(CLOSE, s.id, NO_STREAM, payload)
            return
        if self._step(s, "close") is StreamState.CANCELLING:
            s.close_reason, s.graceful = reason, graceful
            return
        self._queue(CLOSE, s.id, s.peer_id, payload)
