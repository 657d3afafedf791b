"""sockmuxd: a SockMux tunnel (DeleGate-compatible) multiplexing TCP streams over one link.

The protocol layer is sans-I/O and standard-library only:

* :mod:`tcpmuxd.sockmux.frames`: the wire codec (8-byte header, frame types, texts,
  streaming decoder with a bounded buffer) and the error classes.
* :mod:`tcpmuxd.sockmux.connection`: :class:`SockMuxConnection`, the state machine of one link
  (handshake, extension negotiation, authentication, streams, flow control, keep-alive),
  with its :class:`SockMuxConfig`, events and transition tables. Its module docstring is the
  driver's manual.
* :mod:`tcpmuxd.sockmux.windows`: per-stream flow-control windows.
* :mod:`tcpmuxd.sockmux.auth`: the HMAC-SHA256 challenge-response.

The asyncio driver is ``session.py`` (with ``exits.py``, where streams from the peer go). A
tunnel's settings are ``tunnel.py`` (files; the command line, ``flags.py``, gives the same
settings; ``--check`` is ``check.py``). Each kind of link is one object in ``linkkinds.py``:
its key and flag, how it is opened and kept up; the openers and transports are ``links.py``
(TCP, stdio, a command), ``pipelink.py`` (descriptor pairs: FIFOs, a device), ``tlslink.py``
(TLS), ``tls.py`` (TLS settings and contexts) and ``writebuf.py`` (the write side and the close
of sockmuxd's own transports); ``admission.py`` what a receptor remembers about failed links.
``daemon.py`` runs a tunnel. The protocol, including tcpmuxd's extensions and how a plain
DeleGate peer falls back, is written down in ``docs/sockmux-protocol.md``.

Everything a driver needs is re-exported here::

    from tcpmuxd.sockmux import SockMuxConnection, SockMuxConfig, DataReceived, ...

The per-stream modules may run compiled (mypyc); :mod:`tcpmuxd.sockmux.native` picks the
build before anything else is imported.
"""

from .native import select_build

select_build()

from .connection import (  # noqa: E402 (after the build is selected)
    CONNECTION_TRANSITIONS,
    EXTENSIONS_MAGIC,
    REASON_CLOSE,
    REASON_CLOSED,
    REASON_NO_SERVER,
    REASON_NOT_AUTHENTICATED,
    REASON_TOO_MANY_STREAMS,
    STREAM_TRANSITIONS,
    Authenticated,
    AuthenticationFailed,
    AuthState,
    ConnectionState,
    DataReceived,
    DeadPeer,
    Event,
    ExtensionOffer,
    Features,
    FrameIgnored,
    HandshakeComplete,
    LinkClosed,
    LinkReady,
    LinkStats,
    PeerRestarted,
    Pong,
    SockMuxConfig,
    SockMuxConnection,
    StreamAccepted,
    StreamClosed,
    StreamClosedError,
    StreamEnded,
    StreamRefused,
    StreamRequested,
    StreamState,
    TooManyStreams,
    WindowUpdated,
)
from .frames import (  # noqa: E402
    Frame,
    FrameDecoder,
    LocalProtocolError,
    RemoteProtocolError,
    SockMuxError,
)

__all__ = [
    "CONNECTION_TRANSITIONS", "EXTENSIONS_MAGIC", "REASON_CLOSE", "REASON_CLOSED",
    "REASON_NO_SERVER", "REASON_NOT_AUTHENTICATED", "REASON_TOO_MANY_STREAMS",
    "STREAM_TRANSITIONS", "Authenticated", "AuthenticationFailed", "AuthState",
    "ConnectionState", "DataReceived", "DeadPeer", "Event", "ExtensionOffer", "Features",
    "Frame", "FrameDecoder", "FrameIgnored", "HandshakeComplete", "LinkClosed", "LinkReady",
    "LinkStats", "LocalProtocolError", "PeerRestarted", "Pong", "RemoteProtocolError",
    "SockMuxConfig", "SockMuxConnection", "SockMuxError", "StreamAccepted", "StreamClosed",
    "StreamClosedError", "StreamEnded", "StreamRefused", "StreamRequested", "StreamState",
    "TooManyStreams", "WindowUpdated",
]
