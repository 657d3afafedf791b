"""What :class:`~tcpmuxd.sockmux.connection.SockMuxConnection` reports: its events.

Slotted dataclasses, all subclasses of :class:`Event`, read-only by convention. Not frozen: a
frozen dataclass sets each field through ``object.__setattr__``, which doubles the cost of the
events every data frame produces (and mypyc's frozen dataclasses fail when built from compiled
code).

``HandshakeComplete(peer_hello, features)``, ``Authenticated()``, ``LinkReady(authenticated)``,
``AuthenticationFailed(reason, closed_stream_ids)``, ``StreamRequested(stream_id, client_addr,
entrance_addr, first_data)``, ``StreamAccepted(stream_id, first_data, server_addr,
local_addr)``, ``StreamRefused(peer_stream_id, client_addr, entrance_addr, reason)``,
``DataReceived(stream_id, data, urgent)``, ``WindowUpdated(stream_id, available)``,
``StreamEnded(stream_id)``, ``StreamClosed(stream_id, reason)``,
``PeerRestarted(closed_stream_ids)``, ``Pong(rtt)``, ``DeadPeer(idle, closed_stream_ids)``,
``LinkClosed(reason, closed_stream_ids)``, ``FrameIgnored(frame_type, sender, receiver,
reason)``; with resumption (docs/sockmux-protocol.md, section 12) ``LinkSuspended(reason,
stream_ids)``, ``ResumeRequested(session_id)``, ``LinkResumed(stream_ids, resent)``,
``ResumeRefused(reason, closed_stream_ids)``, ``ResumeExpired(closed_stream_ids)``; and :class:`LinkStats`, what ``SockMuxConnection.stats()`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from .negotiation import Features

__all__ = [
    "Event", "HandshakeComplete", "Authenticated", "LinkReady", "AuthenticationFailed",
    "StreamRequested", "StreamAccepted", "StreamRefused", "DataReceived", "WindowUpdated",
    "StreamEnded", "StreamClosed", "PeerRestarted", "Pong", "DeadPeer", "LinkClosed",
    "FrameIgnored", "LinkStats", "LinkSuspended", "ResumeRequested", "LinkResumed",
    "ResumeRefused", "ResumeExpired", "SessionEnded",
]


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
class LinkSuspended(Event):
    """Resumption: the link is lost (``reason``), its streams are kept for a new link. Close
    the link transport; keep the streams; the connector re-dials and calls reattach()."""

    reason: str
    stream_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class ResumeRequested(Event):
    """Resumption, on a new link: the peer asks to resume session ``session_id``. Call
    take_over(this connection) on the connection of that session, or refuse_resume()."""

    session_id: bytes


@dataclass(slots=True)
class LinkResumed(Event):
    """Resumption: the session goes on over the new link; ``resent`` bytes of frames were
    sent again. Every stream may send again (their windows are as before the loss)."""

    stream_ids: tuple[int, ...]
    resent: int


@dataclass(slots=True)
class ResumeRefused(Event):
    """Resumption: the peer no longer has our session (it restarted, or the session expired
    or changed): these streams are gone; the link goes on as a fresh session (LinkReady)."""

    reason: str
    closed_stream_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class SessionEnded(Event):
    """Resumption: the peer ends the session (it is stopping: RESUME E) rather than leaving
    it to wait for a link that will not come: these streams are gone (reset them now, not
    when the resume timeout passes). Close the link: the peer waits for that (reading until
    then, so that nothing it sent is lost to a reset). The next link starts a fresh session;
    were the link lost instead, that would be a plain LinkClosed."""

    reason: str
    closed_stream_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class ResumeExpired(Event):
    """Resumption: no link resumed the session within resume_timeout: these streams died
    (reset them, as for a lost link). Terminal."""

    closed_stream_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class FrameIgnored(Event):
    """Informational: a frame or option we do not use was ignored (log it at debug level)."""

    frame_type: int
    sender: int
    receiver: int
    reason: str


@dataclass  # read-only by convention
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

