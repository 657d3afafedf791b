"""The link-level half of a SockMux connection: :class:`LinkCore`.

What a link does whatever its streams: the output queue, the clock the driver passes in, the
HELLO exchange, the option block (SETOPT) and its negotiation, mutual authentication, and
keep-alive (ECHO, dead-peer detection), and resumption (the session stream kept for resending,
suspend / reattach / take_over: docs/sockmux-protocol.md, section 12). Sans-I/O like the whole protocol layer: no socket, no
timer; the driver passes the monotonic time in, and the two other inputs a link needs come
from callables it may replace, ``wall_clock`` (the local time written into HELLO, as DeleGate
does: ``datetime.now`` by default) and ``random_bytes`` (authentication nonces:
``os.urandom``). :class:`~tcpmuxd.sockmux.connection.SockMuxConnection` adds the streams.
"""

from __future__ import annotations

import hmac as _hmac
import os
import struct
from datetime import datetime
from typing import Callable, Final

from . import auth as _auth
from .events import (
    Authenticated, AuthenticationFailed, DeadPeer, Event, FrameIgnored, HandshakeComplete,
    LinkClosed, LinkReady, LinkResumed, LinkSuspended, PeerRestarted, Pong, ResumeExpired,
    ResumeRefused, ResumeRequested, SessionEnded,
)
from .frames import (
    AUTH, CONNDATA_ON, ECHO, ECHOOK, HEADER, HEADER_SIZE, HELLO, HELLOOK,
    INITIAL_FRAME_SIZE, NO_STREAM, OPT_AUTH, OPT_CONNDATA, OPT_EXTENSIONS, OPT_PACKSIZE,
    OPTION_NAMES, RESUME, RESUME_ACCEPT, RESUME_ACK, RESUME_END, RESUME_NEW, RESUME_REQUEST,
    RESUME_UNKNOWN, SETOPT, SHUT, VERSION, Chunk, Frame, FrameDecoder, LocalProtocolError,
    RemoteProtocolError, ResumeMessage, c_string, concat, echo_payload, encode_frame, encode_header,
    hello_text, parse_conndata, parse_echo, parse_hello, parse_packsize, parse_resume,
    parse_setopt, packsize_data, resume_payload, setopt_payload, split_c_string,
)
from .negotiation import ExtensionOffer, Features, SockMuxConfig, negotiate
from .states import CONNECTION_TRANSITIONS, AuthState, ConnectionState

__all__ = ["LinkCore"]

_pack_header: Final = HEADER.pack
_MAX_PINGS: Final = 16
#: Resumption: acknowledge (RESUME K) at least every this many bytes decoded. The peer keeps
#: what it sent until then: acknowledging often keeps what it holds, on a fast link, to about
#: this much (and its buffers reused while still in the CPU's caches), for a 17-byte frame.
ACK_INTERVAL_MAX: Final = 256 << 10


def ack_interval(peer_buffer: int) -> int:
    """How often we acknowledge: a quarter of the peer's bound, at most ACK_INTERVAL_MAX."""
    return max(1, min(peer_buffer // 4, ACK_INTERVAL_MAX))


_OPEN: Final = ConnectionState.OPEN
_RESUME: Final = ConnectionState.RESUME
_SUSPENDED: Final = ConnectionState.SUSPENDED


class LinkCore:
    """A link's own protocol state, under its streams (see the module docstring).

    A subclass keeps the streams: it implements :meth:`_handle` (every frame received),
    :meth:`_drop_streams` (the link restarts or ends: every stream is gone) and
    :meth:`_room_freed` (resumption: acknowledgements made room for data again).
    """

    def __init__(self, config: SockMuxConfig, *,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 wall_clock: Callable[[], datetime] = datetime.now) -> None:
        self.config = config
        self._random_bytes = random_bytes
        self._wall_clock = wall_clock
        self._state = ConnectionState.IDLE
        self._decoder = FrameDecoder(config.max_frame_size)
        self._out: list[Chunk] = []
        self._out_bytes = 0
        self._urgent = False  # something but CLOSED answers is queued
        self._local_hello = b""
        if config.extensions:
            self._local_ext = ExtensionOffer(
                half_close=config.half_close, auth=config.secret is not None,
                frame_size=config.max_frame_size, window=config.stream_window,
                max_streams=config.max_streams,
                resume=config.resume_buffer if config.resumable else None).encode()
        else:
            self._local_ext = b""
        # clock (all monotonic seconds as given by the driver)
        self._now: float | None = None
        self._last_received: float | None = None
        self._last_echo: float | None = None
        self._echo_origin: float | None = None
        self._pings: dict[int, float] = {}
        self._rtt: float | None = None
        # counters
        self._bytes_sent = self._bytes_received = 0
        self._frames_sent = self._frames_received = 0
        self._data_sent = self._data_received = 0
        # resumption (see _reset_resumption for the session's part)
        self._link_out: list[Chunk] = []  # handshake frames of a reattached session's link
        self._link_out_bytes = 0
        self._detached = False
        self._reset_session()

    # -- what the streams' half provides ------------------------------------------------------

    def _handle(self, frame: Frame, events: list[Event]) -> None:
        """One frame received (the subclass dispatches it)."""
        raise NotImplementedError

    def _drop_streams(self) -> tuple[int, ...]:
        """Forget every stream; their ids, sorted."""
        raise NotImplementedError

    def _room_freed(self, events: list[Event]) -> None:
        """Resumption: the peer acknowledged frames, so data held back by the replay bound
        may go now (WindowUpdated for the streams that waited)."""
        raise NotImplementedError

    # -- session-scoped state -------------------------------------------------------------

    def _reset_session(self) -> tuple[int, ...]:
        """Forget everything negotiated (initially, and when the peer restarts)."""
        closed = self._drop_streams()
        self._end_session()
        self._reset_link()
        self._features: Features | None = None
        self._send_frame_size = INITIAL_FRAME_SIZE
        return closed

    def _reset_resumption(self) -> None:
        """Forget the session's resumption state: its identity and the frames kept."""
        self._session_id = b""
        self._resume_key = b""
        #: Attached to no link (SUSPENDED, or reattached and not resumed yet): the stream
        #: frames queued go into the replay only, the handshake's into _link_out.
        self._detached = False
        self._suspended_at: float | None = None
        #: Frames of the session stream sent (or queued while detached), not acknowledged:
        #: their chunks from _replay_head on. A list, not a deque: list.append() is a C call
        #: from compiled code where deque.extend() is a method lookup (2 % of a round trip),
        #: and the chunks of one write are not kept as a list of their own (every kept list
        #: is a container the garbage collector walks: another 2 %).
        self._replay: list[Chunk] = []
        self._replay_head = 0
        self._replay_bytes = 0
        self._replay_start = 0  # session position of the first kept byte: the peer's last K
        self._replay_limit = 0  # our resume_buffer once resumption is on, else 0: off
        self._replay_cap = 0  # twice that: a peer leaving more unacknowledged loses its link
        self._capture = False  # data_to_send() keeps what it returns (from _capture_from)
        self._capture_from = 0  # index in _out of the first session frame
        self._skip_bytes = 0  # bytes in _out before it
        self._rx_offset = 0  # our position in the peer's session stream when this link began
        self._rx_link_start = 0  # _bytes_received - undecoded at that point
        self._rx_acked = 0  # the last position we acknowledged (K)
        self._ack_every = 0
        #: _bytes_received from which the next K may be due (_after_read's cheap pre-check;
        #: 0 when the peer leaves too much unacknowledged)
        self._ack_due = 0

    def _reset_link(self) -> None:
        """Forget the handshake of the link (a reattached session keeps the rest)."""
        self._peer_hello: str | None = None
        self._peer_hello_raw = b""
        self._peer_packsize: int | None = None
        self._peer_conndata = False
        self._peer_offer: ExtensionOffer | None = None
        self._peer_ext = b""
        self._auth_state = AuthState.NOT_STARTED
        self._local_nonce = b""
        self._peer_nonce: bytes | None = None
        self._decoder.limit = self.config.max_frame_size
        self._link_features: Features | None = None  # a reattached session's new link
        self._resume_sent = 0  # RESUME op we sent on this link (0: none yet)
        self._peer_resume: ResumeMessage | None = None  # an R awaiting take_over()
        self._rx_mark = 0  # _bytes_received - undecoded after the peer's last RESUME frame

    def _transition(self, event: str) -> None:
        try:
            self._state = CONNECTION_TRANSITIONS[self._state][event]
        except KeyError:  # a bug in this module, not in the peer or the driver
            raise AssertionError(f"no link transition {self._state} --{event}->") from None

    def _enter_closed(self) -> None:
        if self._state is not ConnectionState.CLOSED:
            self._transition("fail")

    def _fail(self) -> tuple[int, ...]:
        """Terminal: the link is CLOSED, every stream is gone; returns their ids."""
        closed = self._drop_streams()
        self._end_session()
        self._enter_closed()
        return closed

    def _end_session(self) -> None:
        """The session's streams are gone: drop what resumption kept, and keep only the
        link's own frames queued (an AUTH failure notice may be among them)."""
        if self._detached:
            self._out, self._out_bytes = self._link_out, self._link_out_bytes
            self._link_out, self._link_out_bytes = [], 0
        self._reset_resumption()

    # -- public state -----------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def is_ready(self) -> bool:
        """Streams may be opened (state OPEN)."""
        return self._state is ConnectionState.OPEN

    @property
    def auth_state(self) -> AuthState:
        """For the driver's authentication timeout: still PENDING/NOT_STARTED after N s?"""
        return self._auth_state

    @property
    def authenticated(self) -> bool:
        return self._auth_state is AuthState.SUCCEEDED

    @property
    def features(self) -> Features | None:
        """Negotiated features, None until HandshakeComplete."""
        return self._features

    @property
    def peer_hello(self) -> str | None:
        return self._peer_hello

    @property
    def local_hello(self) -> str:
        return self._local_hello.decode("ascii")

    @property
    def outgoing_bytes(self) -> int:
        """Bytes queued for data_to_send()."""
        return self._out_bytes

    @property
    def undecoded_bytes(self) -> int:
        """Bytes received and not yet decoded: less than one frame between two calls."""
        return self._decoder.buffered

    @property
    def control_bytes_queued(self) -> int:
        """Bytes queued so far (all time) that were not stream data: every control frame
        (HELLOOK, ECHOOK, SENT, CLOSE, CLOSED...) and every header. The windows bound the data
        in flight; these the driver must bound itself (session.py pauses reading the link)."""
        return self._bytes_sent - self._data_sent

    @property
    def output_is_urgent(self) -> bool:
        """Something queued should go now; false when only CLOSED answers are queued."""
        return self._urgent

    @property
    def rtt(self) -> float | None:
        """Last measured ECHO round trip."""
        return self._rtt

    # -- output -----------------------------------------------------------------------------


    def data_to_send(self) -> list[Chunk]:
        """Everything queued, as chunks for ``writelines()``; the queue is emptied.

        Chunks may be the ``bytes`` passed to send_data()/open_stream(), or memoryviews of them.
        With resumption the frames of the session stream are also kept (the same objects)
        until the peer acknowledges them; while the session is detached from a link only the
        link's own frames are returned (the session's wait in the replay).
        """
        out, self._out = self._out, []
        self._urgent = False
        if self._capture:
            self._keep(out, self._out_bytes - self._link_out_bytes)
            if self._detached:
                out, self._link_out, self._link_out_bytes = self._link_out, [], 0
        self._out_bytes = 0
        return out

    def bytes_to_send(self) -> bytes:
        """Like data_to_send(), joined into one ``bytes`` (tests, simple drivers)."""
        return b"".join(self.data_to_send())

    def _queue(self, ftype: int, sender: int, receiver: int, payload: bytes = b"",
               urgent: bool = True) -> None:
        if urgent:
            self._urgent = True
        try:
            raw = concat(_pack_header(VERSION, ftype, sender, receiver, len(payload)), payload)
        except struct.error:  # encode_header() says what is out of range
            raw = encode_frame(ftype, sender, receiver, payload)
        self._out.append(raw)
        n = len(raw)
        self._out_bytes += n
        self._frames_sent += 1
        self._bytes_sent += n

    def _queue_link(self, ftype: int, sender: int, receiver: int,
                    payload: bytes = b"") -> None:
        """A frame of the link itself (handshake, keep-alive, RESUME): while the session is
        detached it goes to the link's own queue, not into the session stream."""
        if not self._detached:
            self._queue(ftype, sender, receiver, payload)
            return
        raw = encode_frame(ftype, sender, receiver, payload)
        self._link_out.append(raw)
        self._link_out_bytes += len(raw)
        self._out_bytes += len(raw)
        self._frames_sent += 1
        self._bytes_sent += len(raw)
        self._urgent = True

    def _queue_data(self, ftype: int, sender: int, receiver: int, head: bytes,
                    body: memoryview | bytes) -> None:
        """A frame whose payload is ``head`` (small, copied) + ``body`` (not copied)."""
        self._urgent = True
        n = len(head) + len(body)
        try:
            first = _pack_header(VERSION, ftype, sender, receiver, n)
        except struct.error:
            first = encode_header(ftype, sender, receiver, n)
        if head:  # (a SEND has none: its header goes out as it is, nothing is copied)
            first = concat(first, head)
        out = self._out
        out.append(first)
        if body:
            out.append(body)
        self._out_bytes += HEADER_SIZE + n
        self._frames_sent += 1
        self._bytes_sent += HEADER_SIZE + n

    # -- the handshake ------------------------------------------------------------------------


    def initiate_connection(self, now: float | None = None,
                            hello_time: datetime | None = None) -> None:
        """Queue our HELLO. ``hello_time`` (default: the wall clock's now) goes into its
        text."""
        if self._state is not ConnectionState.IDLE:
            raise LocalProtocolError("initiate_connection() called twice")
        self._clock(now)
        self._last_received = self._now
        when = hello_time if hello_time is not None else self._wall_clock()
        self._local_hello = hello_text(when, self.config.hostname).encode("ascii")
        # DeleGate leaves HELLO's ids uninitialised; we send zeros.
        self._queue_link(HELLO, 0, 0, concat(self._local_hello, b"\0"))
        self._transition("initiate")

    def _send_setup(self) -> None:
        self._queue_link(SETOPT, NO_STREAM, NO_STREAM,
                    setopt_payload(OPT_PACKSIZE, packsize_data(self.config.packsize)))
        if self._local_ext:  # before CONNDATA: the peer takes CONNDATA as the end of our block
            self._queue_link(SETOPT, NO_STREAM, NO_STREAM,
                        setopt_payload(OPT_EXTENSIONS, self._local_ext))
        self._queue_link(SETOPT, NO_STREAM, NO_STREAM, setopt_payload(OPT_CONNDATA, CONNDATA_ON))

    def _note_peer_hello(self, frame: Frame) -> None:
        if self._peer_hello is None:
            text = parse_hello(frame.payload, self.config.max_text_length)
            self._peer_hello = text
            self._peer_hello_raw = frame.payload.split(b"\0", 1)[0]

    def _on_hello(self, frame: Frame, events: list[Event]) -> None:
        if self._state in (ConnectionState.SETUP, ConnectionState.AUTH, ConnectionState.OPEN,
                           _RESUME):
            closed = self._reset_session()
            self._transition("HELLO (peer restarted)")
            events.append(PeerRestarted(closed))
        else:
            self._transition("HELLO")
        self._note_peer_hello(frame)
        # DeleGate's HELLOOK copies the ids of the frame it answers (they mean nothing).
        self._queue_link(HELLOOK, frame.sender, frame.receiver, concat(self._local_hello, b"\0"))

    def _on_hellook(self, frame: Frame) -> None:
        if self._state is not ConnectionState.HELLO:
            return  # a HELLOOK answering our HELLOOK: the exchange is over, no reply
        self._note_peer_hello(frame)
        self._queue_link(HELLOOK, frame.sender, frame.receiver, concat(self._local_hello, b"\0"))
        self._transition("first HELLOOK")
        self._send_setup()

    def _on_setopt(self, frame: Frame, events: list[Event]) -> None:
        option, data = parse_setopt(frame.payload)
        name = OPTION_NAMES.get(option, f"0x{option:02x}")
        if self._state is not ConnectionState.SETUP:
            events.append(FrameIgnored(SETOPT, frame.sender, frame.receiver,
                                       f"SETOPT {name} outside the handshake"))
            return
        if option == OPT_PACKSIZE:
            self._peer_packsize = parse_packsize(data)
            self._update_frame_sizes()
        elif option == OPT_EXTENSIONS and self.config.extensions:
            if self._peer_offer is None:
                offer = ExtensionOffer.parse(data, self.config.max_text_length)
                if offer is None:
                    events.append(FrameIgnored(SETOPT, frame.sender, frame.receiver,
                                               "SETOPT 0x58 is not a sockmuxd announcement"))
                    return
                self._peer_offer, self._peer_ext = offer, data
                self._update_frame_sizes()
        elif option == OPT_CONNDATA:
            self._peer_conndata = parse_conndata(data)
            self._finish_setup(events)  # CONNDATA ends a DeleGate (and our) SETOPT block
        else:
            why = ("DeleGate's AUTH option is not supported" if option == OPT_AUTH
                   else f"unknown SETOPT option {name}")
            events.append(FrameIgnored(SETOPT, frame.sender, frame.receiver, why))

    def _update_frame_sizes(self) -> None:
        offer = self._peer_offer
        if offer is not None and offer.frame_size is not None:
            size = min(self.config.max_frame_size, offer.frame_size)
        elif self._peer_packsize is not None:
            size = min(self.config.packsize, self._peer_packsize)
        else:
            return
        if not self._detached:  # a detached session's frames keep the session's size
            self._send_frame_size = size
        self._decoder.limit = size

    def _finish_setup(self, events: list[Event]) -> None:
        frame_size = self._decoder.limit if self._detached else self._send_frame_size
        features = negotiate(self.config, self._peer_offer, self._peer_conndata,
                             frame_size, self._peer_ext)
        if self._detached:
            self._link_features = features
        else:
            self._features = features
        self._decoder.limit = features.max_frame_size
        events.append(HandshakeComplete(self._peer_hello or "", features))
        if features.authentication:
            self._transition("peer setup done, auth")
            self._auth_state = AuthState.PENDING
            self._local_nonce = self._random_bytes(_auth.NONCE_SIZE)
            self._queue_link(AUTH, NO_STREAM, NO_STREAM,
                             concat(bytes((_auth.OP_NONCE,)), self._local_nonce))
        elif self.config.require_auth:
            if not features.extensions:
                reason = ("peer cannot authenticate (a plain SockMux peer such as DeleGate); "
                          "allowing it needs an explicit --no-auth")
            else:
                reason = "peer has no shared secret configured, and we require authentication"
            self._auth_failed(events, reason, notify=features.extensions)
        else:
            if self._detached:
                self._abandon(events, "the new link does not authenticate, so it cannot "
                              "resume the session")
            self._transition("peer setup done")
            self._auth_state = AuthState.NOT_USED
            events.append(LinkReady(authenticated=False))

    # -- authentication -----------------------------------------------------------------------


    def _auth_failed(self, events: list[Event], reason: str, notify: bool) -> None:
        if self._detached:  # a reattached session's new link: the session stays suspended
            events.append(AuthenticationFailed(reason))
            events.extend(self.suspend(f"authentication failed: {reason}"))
            return
        if notify:
            self._queue_link(AUTH, NO_STREAM, NO_STREAM,
                             concat(bytes((_auth.OP_FAIL,)), c_string(reason[:200])))
        self._auth_state = AuthState.FAILED
        events.append(AuthenticationFailed(reason, self._fail()))

    def _on_auth(self, frame: Frame, events: list[Event]) -> None:
        payload = frame.payload
        if not payload:
            raise RemoteProtocolError("empty AUTH frame")
        op, body = payload[0], payload[1:]
        if op == _auth.OP_FAIL:
            text = split_c_string(body, self.config.max_text_length, "AUTH failure")[0]
            self._auth_failed(events, f"peer refused authentication: {text}", notify=False)
            return
        if self._state is not ConnectionState.AUTH:
            raise RemoteProtocolError(f"unexpected AUTH {chr(op)!r} in state {self._state.value}")
        secret = self.config.secret
        assert secret is not None
        if op == _auth.OP_NONCE:
            if self._peer_nonce is not None:
                raise RemoteProtocolError("second AUTH nonce")
            problem = _auth.check_peer_nonce(self._local_nonce, body)
            if problem:
                self._auth_failed(events, problem, notify=True)
                return
            self._peer_nonce = body
            proof = _auth.make_proof(secret, self._local_nonce, body, self._local_hello,
                                     self._peer_hello_raw, self._local_ext, self._peer_ext)
            self._queue_link(AUTH, NO_STREAM, NO_STREAM, concat(bytes((_auth.OP_PROOF,)), proof))
        elif op == _auth.OP_PROOF:
            if self._peer_nonce is None:
                raise RemoteProtocolError("AUTH proof before nonce")
            good = len(body) == _auth.PROOF_SIZE and _auth.check_proof(
                secret, body, self._peer_nonce, self._local_nonce, self._peer_hello_raw,
                self._local_hello, self._peer_ext, self._local_ext)
            if not good:
                self._auth_failed(events, "peer's authentication proof is wrong "
                                  "(different shared secret, or tampering)", notify=True)
                return
            self._auth_state = AuthState.SUCCEEDED
            events.append(Authenticated())
            self._link_authenticated(events)
        else:
            raise RemoteProtocolError(f"unknown AUTH operation 0x{op:02x}")

    def _extension_ok(self, frame_type: int) -> bool:
        f = self._link_features if self._detached else self._features
        if f is None or not f.extensions:
            return False
        if frame_type == RESUME:
            return f.resumption
        return frame_type != SHUT or f.half_close

    # -- resumption (docs/sockmux-protocol.md, section 12) ----------------------------------

    @property
    def resumable(self) -> bool:
        """The session has resumption: a lost link suspends it (see :meth:`suspend`)."""
        return bool(self._session_id) and self._state is not ConnectionState.CLOSED

    @property
    def session_id(self) -> bytes:
        """The session's public handle (b"" without resumption)."""
        return self._session_id

    @property
    def suspended(self) -> bool:
        """No link carries the session now (SUSPENDED, or reattached and not resumed yet)."""
        return self._detached

    @property
    def replay_bytes(self) -> int:
        """Bytes of frames kept for resending (sent, not acknowledged by the peer)."""
        return self._replay_bytes

    def _session_received(self) -> int:
        """Our position in the peer's session stream: bytes of whole frames decoded."""
        return self._rx_offset + (self._bytes_received - self._decoder.buffered
                                  - self._rx_link_start)

    def _mark_rx(self) -> None:
        """The peer's session stream starts on this link right after the frame just decoded."""
        self._rx_mark = self._bytes_received - self._decoder.buffered

    def _keep(self, out: list[Chunk], n: int) -> None:
        """Keep the session frames of ``out`` (``n`` bytes with what precedes the session's
        first frame, _capture_from) for resending."""
        skip = self._capture_from
        if skip:
            out = out[skip:]
            n -= self._skip_bytes
            self._capture_from = self._skip_bytes = 0
        if out:
            replay = self._replay
            for chunk in out:  # compiled: a C loop of PyList_Append, half what extend() costs
                replay.append(chunk)
            self._replay_bytes += n
            if self._replay_bytes > self._replay_cap:  # the next read refuses the peer
                self._ack_due = 0

    def _sent_position(self) -> int:
        """Session position after the last frame kept: all we sent of the session stream."""
        return self._replay_start + self._replay_bytes

    def _trim(self, position: int) -> None:
        """Forget the kept frames before session position ``position`` (acknowledged)."""
        drop = position - self._replay_start
        replay, head = self._replay, self._replay_head
        while drop > 0 and head < len(replay):
            chunk = replay[head]
            n = len(chunk)
            if n <= drop:
                replay[head] = b""  # its memory goes now, the slot with the next compaction
                head += 1
            else:
                replay[head] = memoryview(chunk)[drop:]
                n = drop
            drop -= n
            self._replay_bytes -= n
            self._replay_start += n
        if head > 64 and 2 * head > len(replay):  # amortized: each slot moves at most once
            del replay[:head]
            head = 0
        self._replay_head = head

    def _kept_chunks(self) -> list[Chunk]:
        """The kept frames, in order, from the peer's last K on: what a resumed link resends."""
        return self._replay[self._replay_head:]

    def _replay_room(self) -> int:
        """Bytes of stream data that may still be sent under the replay bound."""
        pending = self._out_bytes - self._link_out_bytes - self._skip_bytes
        return self._replay_limit - self._replay_bytes - pending

    def _after_read(self) -> None:
        """Resumption, after a read on an open link that may have made a K due, or once the
        peer leaves too much unacknowledged (_keep() makes _ack_due 0 then): acknowledge every
        quarter of the peer's bound, and refuse a peer that leaves twice our bound."""
        position = self._session_received()
        if position - self._rx_acked >= self._ack_every:
            self._rx_acked = position
            self._queue(RESUME, NO_STREAM, NO_STREAM,
                        resume_payload(ResumeMessage(RESUME_ACK, count=position)))
        self._schedule_ack()
        if self._replay_bytes > self._replay_cap:
            raise RemoteProtocolError(
                f"the peer leaves {self._replay_bytes} bytes of frames unacknowledged "
                f"(RESUME K), more than twice the bound of {self._replay_limit}")

    def _schedule_ack(self) -> None:
        """The least _bytes_received at which our position in the peer's stream can be a
        K interval past the last K (it is less by the bytes still undecoded); 0 while the peer
        leaves too much unacknowledged."""
        if self._replay_bytes > self._replay_cap:
            self._ack_due = 0
        else:
            self._ack_due = (self._rx_acked + self._ack_every - self._rx_offset
                             + self._rx_link_start)

    def _begin_session(self, rx_offset: int) -> None:
        """The session stream starts (again) on this link, after what is queued now: from
        here on data_to_send() keeps the frames it returns, and reads count toward K."""
        f = self._features
        assert f is not None
        self._replay_limit = self.config.resume_buffer
        self._replay_cap = 2 * self._replay_limit
        self._ack_every = ack_interval(f.peer_resume_buffer)
        self._rx_offset = self._rx_acked = rx_offset
        self._rx_link_start = self._rx_mark
        self._schedule_ack()
        self._capture = True
        self._capture_from = len(self._out)
        self._skip_bytes = self._out_bytes

    def _link_authenticated(self, events: list[Event]) -> None:
        """Both proofs verified: open the link, or start the RESUME exchange."""
        f = self._link_features if self._detached else self._features
        assert f is not None
        if not f.resumption:
            if self._detached:
                self._abandon(events, "the new link has no resumption (the peer's "
                              "configuration changed)")
            self._transition("peer proof good")
            events.append(LinkReady(authenticated=True))
            return
        self._transition("peer proof good, resume")
        session = self._features
        if self._detached and session is not None and not f.carries(session):
            self._abandon(events, "the new link's features differ from the session's "
                          "(the peer's configuration changed)")
        if self._detached:
            self._send_resume(RESUME_REQUEST)
        else:
            self._resume_sent = RESUME_NEW
            self._queue_link(RESUME, NO_STREAM, NO_STREAM,
                             resume_payload(ResumeMessage(RESUME_NEW)))

    def _send_resume(self, op: int) -> None:
        """RESUME R or A: our session, our position in the peer's stream, the mac."""
        assert self._peer_nonce is not None
        count = self._rx_offset
        mac = _auth.resume_mac(self._resume_key, op, self._session_id, count,
                               self._local_nonce, self._peer_nonce)
        self._resume_sent = op
        self._queue_link(RESUME, NO_STREAM, NO_STREAM, resume_payload(
            ResumeMessage(op, session_id=self._session_id, count=count, mac=mac)))

    def _abandon(self, events: list[Event], reason: str) -> None:
        """A detached session cannot go on over this link: its streams are gone, the link
        goes on as a fresh session."""
        closed = self._drop_streams()
        self._end_session()
        self._features = self._link_features
        self._link_features = None
        if self._features is not None:
            self._send_frame_size = self._features.max_frame_size
        events.append(ResumeRefused(reason, closed))

    def _start_fresh(self, events: list[Event]) -> None:
        """A new session with resumption: its identity from this link's nonces."""
        secret = self.config.secret
        assert secret is not None and self._peer_nonce is not None
        self._session_id, self._resume_key = _auth.session_keys(
            secret, self._local_nonce, self._peer_nonce)
        self._begin_session(0)
        self._transition("fresh session")
        events.append(LinkReady(authenticated=True))

    def _check_resume(self, msg: ResumeMessage, local_nonce: bytes,
                      peer_nonce: bytes | None) -> str | None:
        """Why the peer's RESUME R/A does not resume this session, or None."""
        if not self._session_id or not _hmac.compare_digest(msg.session_id, self._session_id):
            return "RESUME names another session"
        if peer_nonce is None or not _auth.check_resume_mac(
                self._resume_key, msg.mac, msg.op, msg.session_id, msg.count, peer_nonce,
                local_nonce):
            return "the peer's resumption proof is wrong (not the session's peer, or tampering)"
        if not self._replay_start <= msg.count <= self._sent_position():
            return (f"the peer resumes from byte {msg.count} of our session stream, outside "
                    f"{self._replay_start}..{self._sent_position()}")
        return None

    def _on_resume(self, frame: Frame, events: list[Event]) -> None:
        msg = parse_resume(frame.payload, self.config.max_text_length)
        op = msg.op
        if op == RESUME_ACK:
            if self._state is not _OPEN or not self._replay_limit:
                raise RemoteProtocolError(f"RESUME K in state {self._state.value}")
            if msg.count > self._sent_position():
                raise RemoteProtocolError(f"RESUME K for byte {msg.count}, beyond the "
                                          f"{self._sent_position()} bytes sent")
            if msg.count > self._replay_start:
                self._trim(msg.count)
                self._room_freed(events)
            return
        if op == RESUME_END:
            if self._state is not _OPEN or not self._replay_limit:
                raise RemoteProtocolError(
                    f"RESUME E in state {self._state.value}, no session to end")
            closed = self._drop_streams()
            self._end_session()
            events.append(SessionEnded(msg.reason, closed))
            return
        if self._state is not _RESUME:
            raise RemoteProtocolError(f"RESUME {chr(op)!r} in state {self._state.value}")
        sent = self._resume_sent
        if op == RESUME_NEW:
            if sent == RESUME_NEW:  # both fresh
                self._mark_rx()
                self._start_fresh(events)
            return  # it crossed our R: the answer follows
        if op == RESUME_REQUEST and sent == RESUME_NEW:
            if self._peer_resume is not None:
                raise RemoteProtocolError("second RESUME R")
            self._mark_rx()
            self._peer_resume = msg
            events.append(ResumeRequested(msg.session_id))
            return
        if sent != RESUME_REQUEST:
            raise RemoteProtocolError(f"RESUME {chr(op)!r} answers no RESUME R of ours")
        self._mark_rx()
        if op == RESUME_UNKNOWN:
            self._abandon(events, f"the peer no longer has the session: {msg.reason}")
            self._start_fresh(events)
            return
        # A (or R: both sides resumed the same session)
        problem = self._check_resume(msg, self._local_nonce, self._peer_nonce)
        if problem is not None:
            self._auth_state = AuthState.FAILED
            events.append(AuthenticationFailed(problem))
            events.extend(self.suspend(f"resumption refused: {problem}"))
            return
        resent = self._attach(msg.count)
        self._transition("resumed")
        events.append(LinkResumed(self._live_stream_ids(), resent))

    def _attach(self, peer_position: int) -> int:
        """The session goes on over this link: what is queued for the link, then the kept
        frames from the peer's position on; returns the bytes resent."""
        self._keep(self._out, self._out_bytes - self._link_out_bytes)
        self._trim(peer_position)
        out, queued = self._link_out, self._link_out_bytes
        resent = self._replay_bytes
        out.extend(self._kept_chunks())
        self._out, self._out_bytes = out, queued + resent
        self._link_out, self._link_out_bytes = [], 0
        self._detached = False
        self._link_features = None
        self._suspended_at = None
        f = self._features
        assert f is not None
        self._decoder.limit = f.max_frame_size
        self._begin_session(self._rx_offset)
        self._urgent = True
        return resent

    def end_session(self, reason: str) -> bool:
        """This side stops for good (shutdown): tell the peer, so that it resets the session's
        streams at once instead of holding them for a link that will not come (RESUME E;
        the peer reports SessionEnded). Queue it, flush, then close_link(). Nothing happens
        without resumption or on a link that does not carry the session (the peer's resume
        timeout ends a suspended session then). True when RESUME E is queued: the driver
        should half-close the link after it and read until the peer closes (a close with
        input unread resets the link, and the reset may destroy RESUME E on its way)."""
        if self._state is _OPEN and self._replay_limit and not self._detached:
            self._queue(RESUME, NO_STREAM, NO_STREAM,
                        resume_payload(ResumeMessage(RESUME_END, reason=reason)))
            return True
        return False

    def suspend(self, reason: str, now: float | None = None) -> list[Event]:
        """The link is lost (EOF, reset, an error; tick() calls it for a dead peer). With
        resumption the session is kept for :data:`SockMuxConfig.resume_timeout` seconds:
        ``[LinkSuspended(reason, stream ids)]``; close the link transport, keep the streams
        (calls on them go on), and re-dial (connector: :meth:`reattach`). Without it this is
        :meth:`close_link`. Nothing happens when already suspended or closed."""
        if self._state is ConnectionState.CLOSED or self._state is _SUSPENDED:
            return []
        if not self.resumable:
            return self.close_link(reason)
        self._clock(now)
        if self._capture:  # frames never written count as sent: they are resent
            self._keep(self._out, self._out_bytes - self._link_out_bytes)
        if not self._detached:
            self._rx_offset = self._session_received()
            self._detached = self._capture = True
        self._out, self._out_bytes, self._urgent = [], 0, False
        self._link_out, self._link_out_bytes = [], 0
        self._capture_from = self._skip_bytes = 0
        self._decoder = FrameDecoder(self.config.max_frame_size)
        if self._suspended_at is None:
            self._suspended_at = self._now if self._now is not None else 0.0
        self._transition("suspend")
        return [LinkSuspended(reason, self._live_stream_ids())]

    def reattach(self, now: float | None = None, hello_time: datetime | None = None) -> None:
        """Connector: a new link for the suspended session; queue our HELLO. The handshake and
        authentication run as on a first link, then the RESUME exchange (LinkResumed, or
        ResumeRefused and a fresh session)."""
        if self._state is not _SUSPENDED:
            raise LocalProtocolError(f"reattach() needs a suspended session "
                                     f"(state {self._state.value})")
        self._clock(now)
        self._last_received = self._now
        self._last_echo = None
        self._pings.clear()
        self._reset_link()
        when = hello_time if hello_time is not None else self._wall_clock()
        self._local_hello = hello_text(when, self.config.hostname).encode("ascii")
        self._queue_link(HELLO, 0, 0, concat(self._local_hello, b"\0"))
        self._transition("reattach")

    def take_over(self, new: LinkCore) -> list[Event]:
        """Receptor: ``new`` (a fresh connection on a new link) reported ResumeRequested for
        this session: carry the session on over that link. Returns this connection's events
        (LinkSuspended first if its old link still looked alive, then LinkResumed); from now
        on feed this connection what the new link reads, and write what it queues. ``new`` is
        CLOSED, handed over (its queued frames move here).

        If the request does not resume this session (another id, a wrong mac, an impossible
        position, different features) this session is untouched, ``new`` fails as an
        authentication failure (AUTH F queued there), and the events are
        ``[AuthenticationFailed(reason)]``: close the new link.
        """
        msg = new._peer_resume
        if msg is None or new._state is not _RESUME:
            raise LocalProtocolError("that connection has no resumption request pending")
        if self._state is not _OPEN and self._state is not _SUSPENDED:
            raise LocalProtocolError(f"cannot take a link over in state {self._state.value}")
        problem = self._check_resume(msg, new._local_nonce, new._peer_nonce)
        nf, f = new._features, self._features
        if problem is None and (nf is None or f is None or not nf.carries(f)):
            problem = "the new link's features differ from the session's"
        if problem is not None:
            failed: list[Event] = []
            new._auth_failed(failed, problem, notify=True)
            return failed
        events = self.suspend("the peer resumed the session over a new link")
        # the new link's state becomes ours
        self._decoder = new._decoder
        self._rx_mark = self._bytes_received + new._rx_mark
        self._bytes_received += new._bytes_received
        self._bytes_sent += new._bytes_sent
        self._frames_received += new._frames_received
        self._frames_sent += new._frames_sent
        self._clock(new._now)
        self._last_received, self._last_echo = new._last_received, None
        self._local_hello, self._peer_hello_raw = new._local_hello, new._peer_hello_raw
        self._local_nonce, self._peer_nonce = new._local_nonce, new._peer_nonce
        self._auth_state = AuthState.SUCCEEDED
        # the new link's handshake, queued before what we queued while suspended (which
        # stays in _out and counted in _out_bytes: _attach() keeps it for the session)
        pending = new.data_to_send()
        queued = sum(len(chunk) for chunk in pending)
        self._out_bytes += queued - self._link_out_bytes
        self._link_out, self._link_out_bytes = pending, queued
        self._send_resume(RESUME_ACCEPT)
        resent = self._attach(msg.count)
        self._transition("resumed")
        new._peer_resume = None
        new._transition("taken over")
        events.append(LinkResumed(self._live_stream_ids(), resent))
        return events

    def refuse_resume(self, reason: str = "no such session") -> list[Event]:
        """Receptor: the session a ResumeRequested names is not here (restarted, expired):
        answer RESUME U (the peer resets its streams) and go on as a fresh session."""
        if self._peer_resume is None or self._state is not _RESUME:
            raise LocalProtocolError("no resumption request pending")
        self._peer_resume = None
        self._resume_sent = RESUME_UNKNOWN
        self._queue_link(RESUME, NO_STREAM, NO_STREAM,
                         resume_payload(ResumeMessage(RESUME_UNKNOWN, reason=reason)))
        events: list[Event] = []
        self._start_fresh(events)
        return events

    def _live_stream_ids(self) -> tuple[int, ...]:
        """The ids of the session's streams, sorted (the subclass has them)."""
        raise NotImplementedError


    # -- input --------------------------------------------------------------------------------


    def _clock(self, now: float | None) -> float | None:
        if now is not None:
            if self._echo_origin is None:
                self._echo_origin = now
            self._now = now
        return self._now

    def receive_data(self, data: bytes | bytearray | memoryview,
                     now: float | None = None) -> list[Event]:
        """Feed bytes read from the link; returns the events they caused, in order.

        ``now`` is the monotonic time (needed for the dead-peer timer and RTTs; without it the
        last time given to tick() counts). Raises :class:`RemoteProtocolError` when the peer
        broke the protocol: the connection is CLOSED then, the error's ``events`` holds what
        came before, and close_link() lists the streams that died. After CLOSED, input is
        ignored.
        """
        state = self._state
        if state is ConnectionState.IDLE:
            raise LocalProtocolError("call initiate_connection() before receive_data()")
        if state is ConnectionState.CLOSED or state is _SUSPENDED or not data:
            return []
        if now is not None:
            self._clock(now)
        self._last_received = self._now
        self._bytes_received += len(data)
        events: list[Event] = []
        decoder = self._decoder
        try:
            decoder.feed(data)
            while self._state is not ConnectionState.CLOSED:
                frame = decoder.next_frame()  # called, not bound first: compiled, a direct call
                if frame is None:
                    break
                self._frames_received += 1
                self._handle(frame, events)
            if self._replay_limit and self._bytes_received >= self._ack_due:
                if self._state is _OPEN:
                    self._after_read()
        except RemoteProtocolError as exc:
            self._enter_closed()  # streams stay listed until close_link() reports them
            exc.events = events
            raise
        return events

    # -- link-level calls -------------------------------------------------------------------------


    def ping(self, now: float | None = None) -> None:
        """Queue an ECHO now; its ECHOOK gives a Pong with the round-trip time."""
        if self._state in (ConnectionState.IDLE, ConnectionState.CLOSED):
            raise LocalProtocolError(f"cannot ping in state {self._state.value}")
        if self._clock(now) is None:
            raise LocalProtocolError("ping() needs the current time")
        self._send_echo()

    def _send_echo(self) -> None:
        now = self._now
        assert now is not None and self._echo_origin is not None
        value = int((now - self._echo_origin) * 1000) & 0x7FFFFFFF  # fits DeleGate's int
        self._pings[value] = now
        while len(self._pings) > _MAX_PINGS:
            del self._pings[next(iter(self._pings))]
        self._last_echo = now
        self._queue_link(ECHO, NO_STREAM, NO_STREAM, echo_payload(value))

    def _on_echo(self, frame: Frame) -> None:
        self._queue_link(ECHOOK, frame.receiver, frame.sender, frame.payload)

    def _on_echook(self, frame: Frame, events: list[Event]) -> None:
        value = parse_echo(frame.payload)
        sent = self._pings.pop(value, None) if value is not None else None
        if sent is not None and self._now is not None:
            self._rtt = max(0.0, self._now - sent)
            events.append(Pong(self._rtt))

    def tick(self, now: float) -> list[Event]:
        """Run the keep-alive timers: queue ECHO when idle, report DeadPeer when silent.

        Call it regularly (every second, or at :meth:`next_deadline`). ``now`` is monotonic.
        """
        if self._state in (ConnectionState.IDLE, ConnectionState.CLOSED):
            return []
        self._clock(now)
        cfg = self.config
        if (self._suspended_at is not None
                and now - self._suspended_at >= cfg.resume_timeout):
            return [ResumeExpired(self._fail())]
        if self._state is _SUSPENDED:
            return []
        if self._last_received is None:
            self._last_received = now
        idle = now - self._last_received
        if idle >= cfg.dead_peer_timeout:
            if self.resumable:
                return [DeadPeer(idle)] + self.suspend(
                    f"peer dead: nothing received for {idle:.0f} s")
            return [DeadPeer(idle, self._fail())]
        if self._state is _RESUME:
            return []  # nothing but the RESUME exchange on the link now (section 12)
        if idle >= cfg.keepalive_interval and (
                self._last_echo is None or now - self._last_echo >= cfg.keepalive_interval):
            self._send_echo()
        return []

    def next_deadline(self) -> float | None:
        """When tick() has something to do next (None before initiate / after CLOSED)."""
        if self._state in (ConnectionState.IDLE, ConnectionState.CLOSED):
            return None
        cfg = self.config
        expiry = (None if self._suspended_at is None
                  else self._suspended_at + cfg.resume_timeout)
        if self._last_received is None or self._state is _SUSPENDED:
            return expiry
        echo_at = self._last_received + cfg.keepalive_interval
        if self._last_echo is not None:
            echo_at = max(echo_at, self._last_echo + cfg.keepalive_interval)
        deadline = min(echo_at, self._last_received + cfg.dead_peer_timeout)
        return deadline if expiry is None else min(deadline, expiry)

    def close_link(self, reason: str = "link closed") -> list[Event]:
        """The driver is closing the link (EOF, error, shutdown): every stream dies.

        Returns ``[LinkClosed(reason, closed_stream_ids)]``; the connection is CLOSED. The
        driver may flush data_to_send() first. Closing an already closed link lists nothing.
        """
        return [LinkClosed(reason, self._fail())]
