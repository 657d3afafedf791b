"""The SockMux session state machine, sans-I/O: one :class:`SockMuxConnection` per link.

The connection is fed the bytes read from the link and returns events; it queues the bytes to
write. It never touches a socket, a clock or a timer: the driver (``session.py``) does the I/O,
passes the monotonic time in, and acts on the events. It speaks DeleGate 9.9.11's SockMux
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
---------------------------------------------------------------------------------------
Not frozen: a frozen dataclass sets each field through ``object.__setattr__``, which doubles
the cost of the events every data frame produces.

Compiled
--------
This module, frames.py and windows.py (and the session driver) are compiled with mypyc where
script/build-native ran (pyproject.toml ``[tool.sockmuxd-native]``), so they must type-check
cleanly: the compiled code checks every declared type at run time. No dataclass here is
frozen (mypyc's frozen dataclasses fail when built from compiled code), and the frame
handler tables are module-level dicts after the class (a compiled class body cannot refer to
its own methods).

``HandshakeComplete(peer_hello, features)``, ``Authenticated()``, ``LinkReady(authenticated)``,
``AuthenticationFailed(reason, closed_stream_ids)``, ``StreamRequested(stream_id, client_addr,
entrance_addr, first_data)``, ``StreamAccepted(stream_id, first_data, server_addr,
local_addr)``, ``StreamRefused(peer_stream_id, client_addr, entrance_addr, reason)``,
``DataReceived(stream_id, data, urgent)``, ``WindowUpdated(stream_id, available)``,
``StreamEnded(stream_id)``, ``StreamClosed(stream_id, reason)``,
``PeerRestarted(closed_stream_ids)``, ``Pong(rtt)``, ``DeadPeer(idle, closed_stream_ids)``,
``LinkClosed(reason, closed_stream_ids)``, ``FrameIgnored(frame_type, sender, receiver,
reason)``.

Errors
------
:class:`RemoteProtocolError` (the peer's fault, link must close; carries ``events``),
:class:`LocalProtocolError` (the driver's misuse; link unaffected), and its subclasses
:class:`StreamClosedError` (the stream is gone, e.g. closed by the peer a moment ago) and
:class:`TooManyStreams` (the negotiated stream limit is reached; refuse the local client).
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Final

from . import auth as _auth
from .frames import (
    AUTH, CLOSE, CLOSED, CONNDATA_ON, CONNECT, CONNECTED, CRYPTON, ECHO, ECHOOK,
    EXTENSION_TYPES, HEADER, HEADER_SIZE, HELLO, HELLOOK, INITIAL_FRAME_SIZE, MAX_FRAME_SIZE,
    MIN_FRAME_SIZE, NO_STREAM, NOOP, OPT_AUTH, OPT_CONNDATA, OPT_EXTENSIONS, OPT_PACKSIZE,
    OPTION_NAMES, PLAIN_FRAME_SIZE, PLAIN_WINDOW, SEND, SENDOOB, SENT, SENTOOB, SETOPT, SHUT,
    VERSION, Chunk, Frame, FrameDecoder, LocalProtocolError, RemoteProtocolError, connect_text,
    count_payload, echo_payload, encode_frame, encode_header, hello_text, parse_connect,
    parse_count, parse_echo, parse_hello, parse_packsize, parse_reason, parse_setopt,
    parse_conndata, reason_payload, setopt_payload, packsize_data, split_c_string, type_name,
    c_string,
)
from .windows import ReceiveWindow, SendWindow, lazy_threshold, plain_receive_window

_pack_header: Final = HEADER.pack

__all__ = [
    "SockMuxConfig", "Features", "ExtensionOffer", "ConnectionState", "StreamState",
    "AuthState", "LinkStats", "SockMuxConnection", "CONNECTION_TRANSITIONS",
    "STREAM_TRANSITIONS", "EXTENSIONS_MAGIC",
    "StreamClosedError", "TooManyStreams",
    "Event", "HandshakeComplete", "Authenticated", "LinkReady", "AuthenticationFailed",
    "StreamRequested", "StreamAccepted", "StreamRefused", "DataReceived", "WindowUpdated",
    "StreamEnded", "StreamClosed", "PeerRestarted", "Pong", "DeadPeer", "LinkClosed",
    "FrameIgnored",
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
# Configuration and negotiated features


@dataclass  # read-only by convention: see "Compiled" above
class SockMuxConfig:
    """Everything the protocol layer needs, with every limit explicit.

    ``require_auth`` defaults to True and then needs a ``secret``: talking to a peer that cannot
    authenticate (DeleGate) takes an explicit ``require_auth=False`` (the ``--no-auth`` flag).
    """

    #: Shared secret for mutual authentication (None: we cannot authenticate).
    secret: bytes | None = None
    #: Refuse to open any stream unless the peer proved knowledge of ``secret``.
    require_auth: bool = True
    #: Host name written into our HELLO text.
    hostname: str = "localhost"
    #: Announce tcpmuxd's extensions (False: behave exactly like a plain DeleGate peer).
    extensions: bool = True
    #: Offer half-close (with ``extensions``).
    half_close: bool = True
    #: Most concurrent streams (both directions together) when the peer has the extension.
    max_streams: int = 1024
    #: Most concurrent streams with a plain peer (DeleGate has a 64-slot table).
    plain_max_streams: int = 60
    #: Largest frame we accept and offer, header included. Towards a plain peer PACKSIZE
    #: announces min(this, 16384). This is also the decoder's buffer bound.
    max_frame_size: int = MAX_FRAME_SIZE
    #: Per-stream receive window we grant a peer with the extension (a plain peer: 64 KiB).
    stream_window: int = 1024 * 1024
    #: Longest text accepted or sent (HELLO, CONNECT text, CLOSE reason, extension offer).
    max_text_length: int = 512
    #: Send ECHO after this many seconds without reading anything.
    keepalive_interval: float = 30.0
    #: Declare the peer dead after this many seconds without reading anything.
    dead_peer_timeout: float = 60.0
    #: SEND frames awaiting their SENT per stream before their counts are merged.
    max_sent_records: int = 64

    def __post_init__(self) -> None:
        if self.require_auth and not self.secret:
            raise ValueError("require_auth needs a secret; to talk to a peer that cannot "
                             "authenticate (DeleGate), set require_auth=False (--no-auth)")
        if self.require_auth and not self.extensions:
            raise ValueError("authentication is an extension: require_auth needs extensions")
        if self.secret is not None and len(self.secret) < 16:
            raise ValueError("secret must be at least 16 bytes")
        if not 1 <= self.max_streams <= 0xFFFF - 2:
            raise ValueError("max_streams must be within 1..65533")
        if not 1 <= self.plain_max_streams <= 64:
            raise ValueError("plain_max_streams must be within 1..64 (DeleGate's table)")
        if not MIN_FRAME_SIZE <= self.max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be within {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}")
        if not 4096 <= self.stream_window <= 1 << 30:
            raise ValueError("stream_window must be within 4096..2**30")
        if not 64 <= self.max_text_length <= 4096:
            raise ValueError("max_text_length must be within 64..4096")
        if not 0 < self.keepalive_interval < self.dead_peer_timeout:
            raise ValueError("need 0 < keepalive_interval < dead_peer_timeout")
        if self.max_sent_records < 1:
            raise ValueError("max_sent_records must be positive")
        c_string(self.hostname)  # ASCII, no NUL
        if not self.hostname or " " in self.hostname:
            raise ValueError("hostname must be a non-empty word")

    @property
    def packsize(self) -> int:
        """The PACKSIZE we announce: what DeleGate understands."""
        return min(self.max_frame_size, PLAIN_FRAME_SIZE)


#: First word of the extension announcement (SETOPT option 0x58).
EXTENSIONS_MAGIC: Final = "sockmuxd/1"


#: The numeric words of an extension announcement, and their accepted ranges.
_OFFER_RANGES: Final = {"frame": (MIN_FRAME_SIZE, MAX_FRAME_SIZE), "window": (4096, 1 << 30),
                 "streams": (1, 0xFFFF - 2)}


@dataclass  # read-only by convention: see "Compiled" above
class ExtensionOffer:
    """What one side announced in its SETOPT EXTENSIONS text.

    Wire form (NUL-terminated ASCII): ``sockmuxd/1 [halfclose] [auth] frame=N window=N
    streams=N``; unknown words are ignored so that later versions can add more.
    """

    half_close: bool = False
    auth: bool = False
    frame_size: int | None = None
    window: int | None = None
    max_streams: int | None = None

    def encode(self) -> bytes:
        words = [EXTENSIONS_MAGIC]
        if self.half_close:
            words.append("halfclose")
        if self.auth:
            words.append("auth")
        for key, value in (("frame", self.frame_size), ("window", self.window),
                           ("streams", self.max_streams)):
            if value is not None:
                words.append(f"{key}={value}")
        return c_string(" ".join(words))

    @classmethod
    def parse(cls, data: bytes, max_length: int) -> ExtensionOffer | None:
        """The offer in ``data``, or None when it is not ours (another magic word)."""
        text = split_c_string(data, max_length, "extension announcement")[0]
        words = text.split()
        if not words or not words[0].startswith("sockmuxd/"):
            return None
        values: dict[str, int] = {}
        flags = set()
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if not eq:
                flags.add(word)
                continue
            if key not in _OFFER_RANGES:
                continue
            low, high = _OFFER_RANGES[key]
            if not value.isdigit() or not low <= int(value) <= high:
                raise RemoteProtocolError(f"bad extension value {word!r}")
            values[key] = int(value)
        return cls(half_close="halfclose" in flags, auth="auth" in flags,
                   frame_size=values.get("frame"), window=values.get("window"),
                   max_streams=values.get("streams"))


@dataclass  # read-only by convention: see "Compiled" above
class Features:
    """What this link uses, fixed when the handshake completes (and again after a restart)."""

    #: Both sides announced tcpmuxd's extensions.
    extensions: bool
    #: Half-close (SHUT) in use; otherwise end_stream() closes the whole stream.
    half_close: bool
    #: Mutual authentication in use on this link.
    authentication: bool
    #: First data may travel inside CONNECT / CONNECTED (the peer sent CONNDATA).
    conndata: bool
    #: Largest frame either way, header included.
    max_frame_size: int
    #: Per-stream credit we have towards the peer.
    send_window: int
    #: Per-stream credit the peer has towards us.
    receive_window: int
    #: Most concurrent streams on this link (both directions).
    max_streams: int
    #: The peer's extension announcement as text ("" for a plain peer), for logs.
    peer_extensions: str = ""

    @property
    def max_payload(self) -> int:
        return self.max_frame_size - HEADER_SIZE


# ---------------------------------------------------------------------------------------------
# States and their transition tables


class _FastEnum(enum.Enum):
    """Members hash by identity: Enum's own ``__hash__`` is Python code (``hash(name)``), and
    the state tables and frozensets below are looked up several times per frame."""

    __hash__ = object.__hash__


class ConnectionState(_FastEnum):
    IDLE = "IDLE"
    HELLO = "HELLO"
    SETUP = "SETUP"
    AUTH = "AUTH"
    OPEN = "OPEN"
    CLOSED = "CLOSED"


class StreamState(_FastEnum):
    CONNECTING = "CONNECTING"  # we sent CONNECT, waiting for CONNECTED / CLOSE
    CANCELLING = "CANCELLING"  # closed by us while CONNECTING (plain peer): CLOSE on CONNECTED
    REQUESTED = "REQUESTED"  # the peer sent CONNECT, the driver has to accept or refuse
    OPEN = "OPEN"
    LOCAL_ENDED = "LOCAL_ENDED"  # we sent SHUT (half-close)
    REMOTE_ENDED = "REMOTE_ENDED"  # the peer sent SHUT
    CLOSING = "CLOSING"  # we sent CLOSE, waiting for CLOSED
    CLOSED = "CLOSED"  # gone from the table


class AuthState(_FastEnum):
    NOT_STARTED = "NOT_STARTED"  # handshake not complete yet
    PENDING = "PENDING"  # nonces / proofs under way (the driver's auth timeout runs)
    SUCCEEDED = "SUCCEEDED"
    NOT_USED = "NOT_USED"  # no authentication on this link (allowed by require_auth=False)
    FAILED = "FAILED"


_C: Final = ConnectionState
#: Link transitions: state -> {input: next state}. "fail" covers authentication failure,
#: dead peer, a remote protocol error and close_link().
CONNECTION_TRANSITIONS: Final[dict[ConnectionState, dict[str, ConnectionState]]] = {
    _C.IDLE: {"initiate": _C.HELLO, "fail": _C.CLOSED},
    _C.HELLO: {"HELLO": _C.HELLO, "first HELLOOK": _C.SETUP, "fail": _C.CLOSED},
    _C.SETUP: {"peer setup done": _C.OPEN, "peer setup done, auth": _C.AUTH,
               "HELLO (peer restarted)": _C.HELLO, "fail": _C.CLOSED},
    _C.AUTH: {"peer proof good": _C.OPEN, "HELLO (peer restarted)": _C.HELLO,
              "fail": _C.CLOSED},
    _C.OPEN: {"HELLO (peer restarted)": _C.HELLO, "fail": _C.CLOSED},
    _C.CLOSED: {},
}

_S: Final = StreamState
#: Stream transitions: state -> {input: next state}. "recv X" is a frame from the peer, the
#: others are driver calls. Inputs missing from a row are refused: a LocalProtocolError for a
#: driver call, and for frames see the per-frame rules in SockMuxConnection (stale frames of a
#: closing stream are dropped, contradictions are a RemoteProtocolError).
STREAM_TRANSITIONS: Final[dict[StreamState, dict[str, StreamState]]] = {
    _S.CONNECTING: {"recv CONNECTED": _S.OPEN, "recv CLOSE": _S.CLOSED,
                    "recv CONNECTED without an id": _S.CLOSED,  # the peer's table is full
                    "close": _S.CANCELLING, "end": _S.CONNECTING,  # end: SHUT after CONNECTED
                    "cancel": _S.CLOSING},  # extension: CLOSE at once, to the peer's 0x00FF
    _S.CANCELLING: {"recv CONNECTED": _S.CLOSING, "recv CLOSE": _S.CLOSED,
                    "recv CONNECTED without an id": _S.CLOSED},
    _S.REQUESTED: {"accept": _S.OPEN, "refuse": _S.CLOSING, "close": _S.CLOSING,
                   "recv CLOSE": _S.CLOSED},
    _S.OPEN: {"end": _S.LOCAL_ENDED, "recv SHUT": _S.REMOTE_ENDED, "close": _S.CLOSING,
              "recv CLOSE": _S.CLOSED},
    _S.LOCAL_ENDED: {"recv SHUT": _S.CLOSING, "close": _S.CLOSING, "recv CLOSE": _S.CLOSED},
    _S.REMOTE_ENDED: {"end": _S.CLOSING, "close": _S.CLOSING, "recv CLOSE": _S.CLOSED},
    _S.CLOSING: {"recv CLOSED": _S.CLOSED, "recv CLOSE": _S.CLOSED},
    _S.CLOSED: {},
}
#: Where incoming data is delivered; in other states it is dropped (a stream being closed)
#: except REMOTE_ENDED, where it is a protocol error (data after SHUT).
_RECEIVING: Final = frozenset({_S.OPEN, _S.LOCAL_ENDED})
#: Where send_data() takes data.
_SENDING: Final = frozenset({_S.OPEN, _S.REMOTE_ENDED})
#: States in which the driver has already let go of the stream.
_LET_GO: Final = frozenset({_S.CLOSING, _S.CANCELLING})


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(slots=True)
class Event:
    """Base class of everything :class:`SockMuxConnection` reports.

    The events made for every stream or data frame write their ``__init__`` out
    (``init=False``): compiled, that is a native constructor, where a dataclass's generated
    one is interpreted Python reached through a generic call (see frames.Frame)."""


@dataclass(slots=True)
class HandshakeComplete(Event):
    """HELLO exchange and option negotiation done; ``features`` are fixed for this session."""

    peer_hello: str
    features: Features


@dataclass(slots=True)
class Authenticated(Event):
    """The peer proved it holds the shared secret."""


@dataclass(slots=True)
class LinkReady(Event):
    """Streams may be opened now (sd_notify READY=1 time). ``authenticated``: auth was used."""

    authenticated: bool


@dataclass(slots=True)
class AuthenticationFailed(Event):
    """Wrong proof, peer refused ours, or the peer cannot authenticate while we require it.

    Terminal: flush data_to_send() (a failure notice may be queued), close the link, log
    ``reason``.
    """

    reason: str
    closed_stream_ids: tuple[int, ...] = ()


@dataclass(slots=True, init=False)
class StreamRequested(Event):
    """The peer opened a stream; call accept_stream() or refuse_stream() (e.g. "No server")."""

    stream_id: int
    client_addr: str
    entrance_addr: str
    first_data: bytes

    def __init__(self, stream_id: int, client_addr: str, entrance_addr: str,
                 first_data: bytes = b"") -> None:
        self.stream_id = stream_id
        self.client_addr = client_addr
        self.entrance_addr = entrance_addr
        self.first_data = first_data


@dataclass(slots=True, init=False)
class StreamAccepted(Event):
    """The peer connected our stream to its server; the send window is open now."""

    stream_id: int
    first_data: bytes
    server_addr: str
    local_addr: str

    def __init__(self, stream_id: int, first_data: bytes = b"", server_addr: str = "",
                 local_addr: str = "") -> None:
        self.stream_id = stream_id
        self.first_data = first_data
        self.server_addr = server_addr
        self.local_addr = local_addr


@dataclass(slots=True)
class StreamRefused(Event):
    """Informational: the connection itself refused a CONNECT (limit, not authenticated)."""

    peer_stream_id: int
    client_addr: str
    entrance_addr: str
    reason: str


@dataclass(slots=True, init=False)
class DataReceived(Event):
    """Data for the stream's destination; acknowledge() it once written there."""

    stream_id: int
    data: bytes
    urgent: bool

    def __init__(self, stream_id: int, data: bytes, urgent: bool = False) -> None:
        self.stream_id = stream_id
        self.data = data
        self.urgent = urgent


@dataclass(slots=True, init=False)
class WindowUpdated(Event):
    """Credit came back (SENT); ``available`` bytes may be passed to send_data() now."""

    stream_id: int
    available: int

    def __init__(self, stream_id: int, available: int) -> None:
        self.stream_id = stream_id
        self.available = available


@dataclass(slots=True, init=False)
class StreamEnded(Event):
    """The peer half-closed: no more data will come on this stream (shut down writing)."""

    stream_id: int

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


@dataclass(slots=True, init=False)
class StreamClosed(Event):
    """The stream is over (peer's CLOSE or refusal): flush what you hold, close the socket."""

    stream_id: int
    reason: str

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


@dataclass(slots=True)
class PeerRestarted(Event):
    """A HELLO arrived on an established link: these streams died, the handshake restarts."""

    closed_stream_ids: tuple[int, ...]


@dataclass(slots=True)
class Pong(Event):
    """An ECHOOK answered one of our ECHOs after ``rtt`` seconds."""

    rtt: float


@dataclass(slots=True)
class DeadPeer(Event):
    """Nothing read for ``idle`` seconds (>= dead_peer_timeout): close the link. Terminal."""

    idle: float
    closed_stream_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class LinkClosed(Event):
    """Returned by close_link(): these streams died with the link."""

    reason: str
    closed_stream_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class FrameIgnored(Event):
    """Informational: a frame or option we do not use was ignored (log it at debug level)."""

    frame_type: int
    sender: int
    receiver: int
    reason: str


@dataclass  # read-only by convention: see "Compiled" above
class LinkStats:
    """Counters for STATUS= and logs (bytes include headers; data is SEND payload)."""

    state: str
    streams: int
    streams_local: int
    streams_remote: int
    streams_opened: int
    streams_requested: int
    streams_refused: int
    bytes_sent: int
    bytes_received: int
    frames_sent: int
    frames_received: int
    data_sent: int
    data_received: int
    rtt: float | None


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
_MAX_PINGS: Final = 16
#: The id of the placeholder agent DeleGate 9.9.11 uses once its 64-agent table is full
#: (sox.c newAgent returns a static, zeroed agent): a CONNECT or CONNECTED from it has no
#: stream behind it, and a CLOSE to id 0 would reach DeleGate's link writer (its agent 0)
#: and end its whole link. sockmuxd never uses id 0 for a stream.
_DELEGATE_PLACEHOLDER_ID: Final = 0
_FULL_TABLE: Final = f"{REASON_TOO_MANY_STREAMS} (the peer's stream table is full"


class SockMuxConnection:
    """One SockMux link's protocol state. See the module docstring for the whole picture.

    ``random_bytes`` supplies nonces (tests pass a deterministic one); ``first_stream_id`` is
    where our id allocation starts (DeleGate replays in tests).
    """

    def __init__(self, config: SockMuxConfig, *,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 first_stream_id: int = 1) -> None:
        if not 0 < first_stream_id <= _ID_LIMIT or first_stream_id == NO_STREAM:
            raise ValueError("first_stream_id must be within 1..65535 and not 0x00FF")
        self.config = config
        self._random_bytes = random_bytes
        self._state = ConnectionState.IDLE
        self._decoder = FrameDecoder(config.max_frame_size)
        self._out: list[Chunk] = []
        self._out_bytes = 0
        self._urgent = False  # something but CLOSED answers is queued
        self._streams: dict[int, _Stream] = {}
        self._by_peer: dict[int, int] = {}
        self._next_id = first_stream_id
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
        self._streams_opened = self._streams_requested = self._streams_refused = 0
        self._reset_session()

    # -- session-scoped state -------------------------------------------------------------

    def _reset_session(self) -> tuple[int, ...]:
        """Forget everything negotiated (initially, and when the peer restarts)."""
        closed = tuple(sorted(self._streams))
        self._streams.clear()
        self._by_peer.clear()
        self._peer_hello: str | None = None
        self._peer_hello_raw = b""
        self._peer_packsize: int | None = None
        self._peer_conndata = False
        self._peer_offer: ExtensionOffer | None = None
        self._peer_ext = b""
        self._features: Features | None = None
        #: What _handle() dispatches to without further checks once the link is OPEN: the
        #: frames valid there, the extension types only when negotiated. The rest (HELLO of
        #: a restarting peer, SETOPT, unknown types...) takes the general path.
        self._open_handlers: dict[int, _Handler] = {}
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
        closed = tuple(sorted(self._streams))
        self._streams.clear()
        self._by_peer.clear()
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
        if s is None or s.state not in _SENDING:
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
            raw = _pack_header(VERSION, ftype, sender, receiver, len(payload)) + payload
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
            first = _pack_header(VERSION, ftype, sender, receiver, n) + head
        except struct.error:
            first = encode_header(ftype, sender, receiver, n) + head
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
        """Queue our HELLO. ``hello_time`` (default: local time now) goes into its text."""
        if self._state is not ConnectionState.IDLE:
            raise LocalProtocolError("initiate_connection() called twice")
        self._clock(now)
        self._last_received = self._now
        when = hello_time if hello_time is not None else datetime.now()
        self._local_hello = hello_text(when, self.config.hostname).encode("ascii")
        # DeleGate leaves HELLO's ids uninitialised; we send zeros.
        self._queue(HELLO, 0, 0, self._local_hello + b"\0")
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
        self._queue(HELLOOK, frame.sender, frame.receiver, self._local_hello + b"\0")

    def _on_hellook(self, frame: Frame, events: list[Event]) -> None:
        if self._state is not ConnectionState.HELLO:
            return  # a HELLOOK answering our HELLOOK: the exchange is over, no reply
        self._note_peer_hello(frame)
        self._queue(HELLOOK, frame.sender, frame.receiver, self._local_hello + b"\0")
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

    def _negotiate(self) -> Features:
        cfg = self.config
        offer = self._peer_offer if cfg.extensions else None  # None: plain SockMux
        if offer is not None and offer.window is not None:
            send_window, recv_window = offer.window, cfg.stream_window
        else:  # DeleGate's window: we keep to 64 KiB, it sends up to one frame beyond
            send_window = PLAIN_WINDOW
            recv_window = plain_receive_window(self._send_frame_size)
        if offer is not None and offer.max_streams is not None:
            max_streams = min(cfg.max_streams, offer.max_streams)
        else:
            max_streams = min(cfg.max_streams, cfg.plain_max_streams)
        return Features(
            extensions=offer is not None,
            half_close=offer is not None and cfg.half_close and offer.half_close,
            authentication=offer is not None and cfg.secret is not None and offer.auth,
            conndata=self._peer_conndata,
            max_frame_size=self._send_frame_size,
            send_window=send_window,
            receive_window=recv_window,
            max_streams=max_streams,
            peer_extensions=self._peer_ext.split(b"\0", 1)[0].decode("ascii", "replace"),
        )

    def _finish_setup(self, events: list[Event]) -> None:
        features = self._negotiate()
        self._features = features
        self._open_handlers = {t: h for t, h in _HANDLERS.items()
                               if t not in EXTENSION_TYPES or self._extension_ok(t)}
        self._open_handlers.update(_LINK_HANDLERS)
        self._decoder.limit = features.max_frame_size
        events.append(HandshakeComplete(self._peer_hello or "", features))
        if features.authentication:
            self._transition("peer setup done, auth")
            self._auth_state = AuthState.PENDING
            self._local_nonce = self._random_bytes(_auth.NONCE_SIZE)
            self._queue(AUTH, NO_STREAM, NO_STREAM, bytes((_auth.OP_NONCE,)) + self._local_nonce)
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
                        bytes((_auth.OP_FAIL,)) + c_string(reason[:200]))
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
            self._queue(AUTH, NO_STREAM, NO_STREAM, bytes((_auth.OP_PROOF,)) + proof)
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

    def _handle(self, frame: Frame, events: list[Event]) -> None:
        t = frame.type
        if self._state is ConnectionState.OPEN:  # the data path: one lookup, no checks
            # The types every stream sees by name (compiled, a direct call), the others (and
            # the extension types, present only once negotiated) by the table
            if t == SEND:
                self._on_send(frame, events)
                return
            if t == SENT:
                self._on_sent(frame, events)
                return
            if t == CONNECT:
                self._on_connect(frame, events)
                return
            if t == CONNECTED:
                self._on_connected(frame, events)
                return
            if t == CLOSE:
                self._on_close(frame, events)
                return
            if t == CLOSED:
                self._on_closed(frame, events)
                return
            handler = self._open_handlers.get(t)
            if handler is not None:
                handler(self, frame, events)
                return
        if t == HELLO:
            self._on_hello(frame, events)
            return
        if t == HELLOOK:
            self._on_hellook(frame, events)
            return
        if t == SETOPT:
            self._on_setopt(frame, events)
            return
        if t == CRYPTON:
            raise RemoteProtocolError("peer started DeleGate's cipher (CRYPTON); not supported, "
                                      "use TLS around the link")
        if self._state is ConnectionState.SETUP:
            # Any frame but SETOPT ends the peer's option block (for a peer without CONNDATA).
            self._finish_setup(events)
            if self._state is ConnectionState.CLOSED:
                return
        if t == NOOP:
            return
        if t == ECHO:
            self._on_echo(frame, events)
            return
        if t == ECHOOK:
            self._on_echook(frame, events)
            return
        if self._state is ConnectionState.HELLO:
            events.append(FrameIgnored(t, frame.sender, frame.receiver,
                                       f"{type_name(t)} before the HELLO exchange finished"))
            return
        handler = _HANDLERS.get(t)
        if handler is not None and t in EXTENSION_TYPES and not self._extension_ok(t):
            handler = None
        if handler is None:
            events.append(FrameIgnored(t, frame.sender, frame.receiver,
                                       f"frame type {type_name(t)} not supported"))
        else:
            handler(self, frame, events)

    def _extension_ok(self, frame_type: int) -> bool:
        f = self._features
        if f is None or not f.extensions:
            return False
        return frame_type != SHUT or f.half_close

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
            let_go = s.state in _LET_GO
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

    def _on_send(self, frame: Frame, events: list[Event], urgent: bool = False) -> None:
        s = self._stream_for(frame)
        if s is None:
            return  # data racing with a close: dropped
        if s.state is StreamState.REMOTE_ENDED:
            raise RemoteProtocolError(f"data on stream {s.id} after the peer ended it")
        if s.state not in _RECEIVING or not frame.payload:
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

    def _on_sendoob(self, frame: Frame, events: list[Event]) -> None:
        self._on_send(frame, events, urgent=True)

    def _on_sent(self, frame: Frame, events: list[Event]) -> None:
        count = parse_count(frame.payload)
        s = self._stream_for(frame)
        if s is None or s.state in _LET_GO:
            return
        s.send.acknowledge(count)
        if s.state in _SENDING:
            events.append(WindowUpdated(s.id, s.send.available))

    def _on_sentoob(self, frame: Frame, events: list[Event]) -> None:
        pass  # we never send SENDOOB

    def _on_close(self, frame: Frame, events: list[Event]) -> None:
        reason = parse_reason(frame.payload, self.config.max_text_length)
        s = self._stream_for(frame)
        # Always answer, also for a stream we do not know, so the peer can free its slot.
        self._queue(CLOSED, frame.receiver if s is None else s.id, frame.sender,
                    _CLOSED_PAYLOAD, urgent=False)
        if s is None:
            return
        let_go = s.state in _LET_GO
        self._step(s, "recv CLOSE")
        if not let_go:
            events.append(StreamClosed(s.id, reason))

    def _on_closed(self, frame: Frame, events: list[Event]) -> None:
        s = self._stream_for(frame)
        if s is not None:
            self._step(s, "recv CLOSED")  # only CLOSING has this input; others: stale, ignored

    def _on_shut(self, frame: Frame, events: list[Event]) -> None:
        s = self._stream_for(frame)
        if s is None or s.state in _LET_GO:
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
        if self._state is not ConnectionState.OPEN:
            raise LocalProtocolError(f"streams need an open link (state {self._state.value})")
        assert self._features is not None
        return self._features

    def _get(self, stream_id: int) -> _Stream:
        if self._state is ConnectionState.CLOSED:
            raise StreamClosedError(stream_id, f"stream {stream_id}: the link is closed")
        s = self._streams.get(stream_id)
        if s is None or s.state in _LET_GO:
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
            raise TooManyStreams(f"stream limit reached ({f.max_streams} streams)")
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
        if s.state not in _SENDING:
            raise LocalProtocolError(f"cannot send on stream {stream_id} ({s.state.value})")
        n = min(len(data), s.send.available)
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
        if s is None or s.state in _LET_GO or n == 0 or self._state is ConnectionState.CLOSED:
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
        if s is None or s.state in _LET_GO or self._state is ConnectionState.CLOSED:
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

    def _on_echo(self, frame: Frame, events: list[Event]) -> None:
        self._queue(ECHOOK, frame.receiver, frame.sender, frame.payload)

    def _on_noop(self, frame: Frame, events: list[Event]) -> None:
        pass

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


_Handler = Callable[[SockMuxConnection, Frame, list[Event]], None]

#: The handler of each stream frame type (see ``_handle``).
_HANDLERS: Final[dict[int, _Handler]] = {
    CONNECT: SockMuxConnection._on_connect, CONNECTED: SockMuxConnection._on_connected,
    SEND: SockMuxConnection._on_send, SENT: SockMuxConnection._on_sent,
    SENDOOB: SockMuxConnection._on_sendoob, SENTOOB: SockMuxConnection._on_sentoob,
    CLOSE: SockMuxConnection._on_close, CLOSED: SockMuxConnection._on_closed,
    SHUT: SockMuxConnection._on_shut, AUTH: SockMuxConnection._on_auth,
}

#: Link-level frames, answered in any state past HELLO (see ``_handle``).
_LINK_HANDLERS: Final[dict[int, _Handler]] = {
    NOOP: SockMuxConnection._on_noop, ECHO: SockMuxConnection._on_echo, ECHOOK: SockMuxConnection._on_echook,
}
