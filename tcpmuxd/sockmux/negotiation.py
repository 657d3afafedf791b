"""What a SockMux link may use: the configuration, the extension offer and the features.

:class:`SockMuxConfig` is everything the protocol layer needs, every limit explicit.
:class:`ExtensionOffer` is the sockmuxd announcement (SETOPT option 0x58) one side makes;
:func:`negotiate` computes the :class:`Features` of a link from our configuration and what
the peer announced, the same on both sides (docs/sockmux-protocol.md, "Negotiated features").
A plain peer (DeleGate) announces nothing, and gets DeleGate's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .frames import (
    HEADER_SIZE, MAX_FRAME_SIZE, MIN_FRAME_SIZE, PLAIN_FRAME_SIZE, PLAIN_WINDOW,
    RemoteProtocolError, c_string, split_c_string,
)
from .windows import plain_receive_window

__all__ = ["SockMuxConfig", "ExtensionOffer", "Features", "EXTENSIONS_MAGIC", "negotiate",
           "RESUME_BUFFER_RANGE"]


# ---------------------------------------------------------------------------------------------
# Configuration and negotiated features


@dataclass  # read-only by convention (mypyc: no frozen dataclasses)
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
    #: Resumption (with authentication, between sockmuxd peers): keep a lost link's streams
    #: suspended this many seconds for a new link to carry them on; 0 turns it off.
    resume_timeout: float = 0.0
    #: Resumption: the unacknowledged frames we keep for resending (stream data waits above
    #: it; a peer leaving twice as much unacknowledged is a protocol error).
    resume_buffer: int = 16 << 20

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
        if not 0 <= self.resume_timeout <= 86400:
            raise ValueError("resume_timeout must be within 0..86400 seconds")
        if not RESUME_BUFFER_RANGE[0] <= self.resume_buffer <= RESUME_BUFFER_RANGE[1]:
            raise ValueError(f"resume_buffer must be within {RESUME_BUFFER_RANGE[0]}.."
                             f"{RESUME_BUFFER_RANGE[1]}")
        c_string(self.hostname)  # ASCII, no NUL
        if not self.hostname or " " in self.hostname:
            raise ValueError("hostname must be a non-empty word")

    @property
    def resumable(self) -> bool:
        """We offer resumption (it also needs authentication on the link)."""
        return self.extensions and self.resume_timeout > 0 and self.secret is not None

    @property
    def packsize(self) -> int:
        """The PACKSIZE we announce: what DeleGate understands."""
        return min(self.max_frame_size, PLAIN_FRAME_SIZE)


#: First word of the extension announcement (SETOPT option 0x58).
EXTENSIONS_MAGIC: Final = "sockmuxd/1"


#: Accepted values of ``resume_buffer`` (and of the ``resume=`` word).
RESUME_BUFFER_RANGE: Final = (1 << 16, 1 << 30)
#: The numeric words of an extension announcement, and their accepted ranges.
_OFFER_RANGES: Final = {"frame": (MIN_FRAME_SIZE, MAX_FRAME_SIZE), "window": (4096, 1 << 30),
                 "streams": (1, 0xFFFF - 2), "resume": RESUME_BUFFER_RANGE}


@dataclass  # read-only by convention (mypyc: no frozen dataclasses)
class ExtensionOffer:
    """What one side announced in its SETOPT EXTENSIONS text.

    Wire form (NUL-terminated ASCII): ``sockmuxd/1 [halfclose] [auth] frame=N window=N
    streams=N [resume=N]``; unknown words are ignored so that later versions can add more.
    """

    half_close: bool = False
    auth: bool = False
    frame_size: int | None = None
    window: int | None = None
    max_streams: int | None = None
    #: Resumption offered, with this replay bound (None: not offered).
    resume: int | None = None

    def encode(self) -> bytes:
        words = [EXTENSIONS_MAGIC]
        if self.half_close:
            words.append("halfclose")
        if self.auth:
            words.append("auth")
        for key, value in (("frame", self.frame_size), ("window", self.window),
                           ("streams", self.max_streams), ("resume", self.resume)):
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
                   max_streams=values.get("streams"), resume=values.get("resume"))


@dataclass  # read-only by convention (mypyc: no frozen dataclasses)
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
    #: Resumption in use (both offered it, and authentication is on).
    resumption: bool = False
    #: The peer's replay bound (``resume=``): we acknowledge every quarter of it.
    peer_resume_buffer: int = 0

    @property
    def max_payload(self) -> int:
        return self.max_frame_size - HEADER_SIZE

    def carries(self, other: Features) -> bool:
        """Whether a link with these features can carry on a session that had ``other``:
        every frame and window of the session must fit as before."""
        return (self.resumption and other.resumption and self.half_close == other.half_close
                and self.conndata == other.conndata
                and self.max_frame_size == other.max_frame_size
                and self.send_window == other.send_window
                and self.receive_window == other.receive_window
                and self.max_streams == other.max_streams)



def negotiate(config: SockMuxConfig, offer: ExtensionOffer | None, conndata: bool,
              frame_size: int, peer_ext: bytes) -> Features:
    """The features of a link: ``offer`` is the peer's announcement (None: a plain peer),
    ``conndata`` whether it sent CONNDATA, ``frame_size`` the frame size agreed so far
    (PACKSIZE or the offer), ``peer_ext`` its raw announcement (for logs)."""
    if not config.extensions:
        offer = None  # plain SockMux
    if offer is not None and offer.window is not None:
        send_window, recv_window = offer.window, config.stream_window
    else:  # DeleGate's window: we keep to 64 KiB, it sends up to one frame beyond
        send_window = PLAIN_WINDOW
        recv_window = plain_receive_window(frame_size)
    if offer is not None and offer.max_streams is not None:
        max_streams = min(config.max_streams, offer.max_streams)
    else:
        max_streams = min(config.max_streams, config.plain_max_streams)
    authentication = offer is not None and config.secret is not None and offer.auth
    peer_buffer = offer.resume if offer is not None and offer.resume is not None else 0
    resumption = authentication and peer_buffer > 0 and config.resumable
    return Features(
        extensions=offer is not None,
        half_close=offer is not None and config.half_close and offer.half_close,
        authentication=authentication,
        conndata=conndata,
        max_frame_size=frame_size,
        send_window=send_window,
        receive_window=recv_window,
        max_streams=max_streams,
        peer_extensions=peer_ext.split(b"\0", 1)[0].decode("ascii", "replace"),
        resumption=resumption,
        peer_resume_buffer=peer_buffer if resumption else 0,
    )
