"""The link-level half of a SockMux connection: :class:`LinkCore`.

What a link does whatever its streams: the output queue, the clock the driver passes in, the
HELLO exchange, the option block (SETOPT) and its negotiation, mutual authentication, and
keep-alive (ECHO, dead-peer detection). Sans-I/O like the whole protocol layer: no socket, no
timer; the driver passes the monotonic time in, and the two other inputs a link needs come
from callables it may replace, ``wall_clock`` (the local time written into HELLO, as DeleGate
does: ``datetime.now`` by default) and ``random_bytes`` (authentication nonces:
``os.urandom``). :class:`~tcpmuxd.sockmux.connection.SockMuxConnection` adds the streams.
"""

from __future__ import annotations

import os
import struct
from datetime import datetime
from typing import Callable, Final

from . import auth as _auth
from .events import (
    Authenticated, AuthenticationFailed, DeadPeer, Event, FrameIgnored, HandshakeComplete,
    LinkClosed, LinkReady, PeerRestarted, Pong,
)
from .frames import (
    AUTH, CONNDATA_ON, ECHO, ECHOOK, HEADER, HEADER_SIZE, HELLO, HELLOOK,
    INITIAL_FRAME_SIZE, NO_STREAM, OPT_AUTH, OPT_CONNDATA, OPT_EXTENSIONS, OPT_PACKSIZE,
    OPTION_NAMES, SETOPT, SHUT, VERSION, Chunk, Frame, FrameDecoder, LocalProtocolError,
    RemoteProtocolError, c_string, concat, echo_payload, encode_frame, encode_header,
    hello_text, parse_conndata, parse_echo, parse_hello, parse_packsize, parse_setopt,
    packsize_data, setopt_payload, split_c_string,
)
from .negotiation import ExtensionOffer, Features, SockMuxConfig, negotiate
from .states import CONNECTION_TRANSITIONS, AuthState, ConnectionState

__all__ = ["LinkCore"]

_pack_header: Final = HEADER.pack
_MAX_PINGS: Final = 16


class LinkCore:
    """A link's own protocol state, under its streams (see the module docstring).

    A subclass keeps the streams: it implements :meth:`_handle` (every frame received) and
    :meth:`_drop_streams` (the link restarts or ends: every stream is gone).
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
                max_streams=config.max_streams).encode()
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
        self._reset_session()

    # -- what the streams' half provides ------------------------------------------------------

    def _handle(self, frame: Frame, events: list[Event]) -> None:
        """One frame received (the subclass dispatches it)."""
        raise NotImplementedError

    def _drop_streams(self) -> tuple[int, ...]:
        """Forget every stream; their ids, sorted."""
        raise NotImplementedError

    # -- session-scoped state -------------------------------------------------------------

    def _reset_session(self) -> tuple[int, ...]:
        """Forget everything negotiated (initially, and when the peer restarts)."""
        closed = self._drop_streams()
        self._peer_hello: str | None = None
        self._peer_hello_raw = b""
        self._peer_packsize: int | None = None
        self._peer_conndata = False
        self._peer_offer: ExtensionOffer | None = None
        self._peer_ext = b""
        self._features: Features | None = None
        self._auth_state = AuthState.NOT_STARTED
        self._local_nonce = b""
        self._peer_nonce: bytes | None = None
        self._send_frame_size = INITIAL_FRAME_SIZE
        self._decoder.limit = self.config.max_frame_size
        return closed

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
        self._enter_closed()
        return closed

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
        """
        out, self._out, self._out_bytes = self._out, [], 0
        self._urgent = False
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
        self._queue(HELLO, 0, 0, concat(self._local_hello, b"\0"))
        self._transition("initiate")

    def _send_setup(self) -> None:
        self._queue(SETOPT, NO_STREAM, NO_STREAM,
                    setopt_payload(OPT_PACKSIZE, packsize_data(self.config.packsize)))
        if self._local_ext:  # before CONNDATA: the peer takes CONNDATA as the end of our block
            self._queue(SETOPT, NO_STREAM, NO_STREAM,
                        setopt_payload(OPT_EXTENSIONS, self._local_ext))
        self._queue(SETOPT, NO_STREAM, NO_STREAM, setopt_payload(OPT_CONNDATA, CONNDATA_ON))

    def _note_peer_hello(self, frame: Frame) -> None:
        if self._peer_hello is None:
            text = parse_hello(frame.payload, self.config.max_text_length)
            self._peer_hello = text
            self._peer_hello_raw = frame.payload.split(b"\0", 1)[0]

    def _on_hello(self, frame: Frame, events: list[Event]) -> None:
        if self._state in (ConnectionState.SETUP, ConnectionState.AUTH, ConnectionState.OPEN):
            closed = self._reset_session()
            self._transition("HELLO (peer restarted)")
            events.append(PeerRestarted(closed))
        else:
            self._transition("HELLO")
        self._note_peer_hello(frame)
        # DeleGate's HELLOOK copies the ids of the frame it answers (they mean nothing).
        self._queue(HELLOOK, frame.sender, frame.receiver, concat(self._local_hello, b"\0"))

    def _on_hellook(self, frame: Frame) -> None:
        if self._state is not ConnectionState.HELLO:
            return  # a HELLOOK answering our HELLOOK: the exchange is over, no reply
        self._note_peer_hello(frame)
        self._queue(HELLOOK, frame.sender, frame.receiver, concat(self._local_hello, b"\0"))
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
        self._send_frame_size = size
        self._decoder.limit = size

    def _finish_setup(self, events: list[Event]) -> None:
        features = negotiate(self.config, self._peer_offer, self._peer_conndata,
                             self._send_frame_size, self._peer_ext)
        self._features = features
        self._decoder.limit = features.max_frame_size
        events.append(HandshakeComplete(self._peer_hello or "", features))
        if features.authentication:
            self._transition("peer setup done, auth")
            self._auth_state = AuthState.PENDING
            self._local_nonce = self._random_bytes(_auth.NONCE_SIZE)
            self._queue(AUTH, NO_STREAM, NO_STREAM, concat(bytes((_auth.OP_NONCE,)), self._local_nonce))
        elif self.config.require_auth:
            if not features.extensions:
                reason = ("peer cannot authenticate (a plain SockMux peer such as DeleGate); "
                          "allowing it needs an explicit --no-auth")
            else:
                reason = "peer has no shared secret configured, and we require authentication"
            self._auth_failed(events, reason, notify=features.extensions)
        else:
            self._transition("peer setup done")
            self._auth_state = AuthState.NOT_USED
            events.append(LinkReady(authenticated=False))

    # -- authentication -----------------------------------------------------------------------


    def _auth_failed(self, events: list[Event], reason: str, notify: bool) -> None:
        if notify:
            self._queue(AUTH, NO_STREAM, NO_STREAM,
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
            self._queue(AUTH, NO_STREAM, NO_STREAM, concat(bytes((_auth.OP_PROOF,)), proof))
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
            self._transition("peer proof good")
            events.append(Authenticated())
            events.append(LinkReady(authenticated=True))
        else:
            raise RemoteProtocolError(f"unknown AUTH operation 0x{op:02x}")

    def _extension_ok(self, frame_type: int) -> bool:
        f = self._features
        if f is None or not f.extensions:
            return False
        return frame_type != SHUT or f.half_close

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
        if state is ConnectionState.CLOSED or not data:
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
        self._queue(ECHO, NO_STREAM, NO_STREAM, echo_payload(value))

    def _on_echo(self, frame: Frame) -> None:
        self._queue(ECHOOK, frame.receiver, frame.sender, frame.payload)

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
        if self._last_received is None:
            self._last_received = now
        idle = now - self._last_received
        cfg = self.config
        if idle >= cfg.dead_peer_timeout:
            return [DeadPeer(idle, self._fail())]
        if idle >= cfg.keepalive_interval and (
                self._last_echo is None or now - self._last_echo >= cfg.keepalive_interval):
            self._send_echo()
        return []

    def next_deadline(self) -> float | None:
        """When tick() has something to do next (None before initiate / after CLOSED)."""
        if self._state in (ConnectionState.IDLE, ConnectionState.CLOSED):
            return None
        if self._last_received is None:
            return None
        cfg = self.config
        echo_at = self._last_received + cfg.keepalive_interval
        if self._last_echo is not None:
            echo_at = max(echo_at, self._last_echo + cfg.keepalive_interval)
        return min(echo_at, self._last_received + cfg.dead_peer_timeout)

    def close_link(self, reason: str = "link closed") -> list[Event]:
        """The driver is closing the link (EOF, error, shutdown): every stream dies.

        Returns ``[LinkClosed(reason, closed_stream_ids)]``; the connection is CLOSED. The
        driver may flush data_to_send() first. Closing an already closed link lists nothing.
        """
        return [LinkClosed(reason, self._fail())]
