"""The states of a SockMux link and of its streams, and their transition tables.

:data:`CONNECTION_TRANSITIONS` and :data:`STREAM_TRANSITIONS` map a state to ``{input: next
state}``; :class:`~tcpmuxd.sockmux.connection.SockMuxConnection` moves only along them (a
missing link transition is a bug in the module; a missing stream input is refused: a
LocalProtocolError for a driver call, and for frames see the per-frame rules of the
connection). docs/sockmux-protocol.md, section 5, has them as tables.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["FastEnum", "ConnectionState", "StreamState", "AuthState", "CONNECTION_TRANSITIONS",
           "STREAM_TRANSITIONS", "RECEIVING", "SENDING", "LET_GO"]


class FastEnum(enum.Enum):
    """Members hash by identity: Enum's own ``__hash__`` is Python code (``hash(name)``), and
    the state tables and frozensets below are looked up several times per frame."""

    __hash__ = object.__hash__


class ConnectionState(FastEnum):
    IDLE = "IDLE"
    HELLO = "HELLO"
    SETUP = "SETUP"
    AUTH = "AUTH"
    RESUME = "RESUME"  # resumption: the RESUME exchange after authentication
    OPEN = "OPEN"
    SUSPENDED = "SUSPENDED"  # resumption: the link is lost, the streams wait for a new one
    CLOSED = "CLOSED"


class StreamState(FastEnum):
    CONNECTING = "CONNECTING"  # we sent CONNECT, waiting for CONNECTED / CLOSE
    CANCELLING = "CANCELLING"  # closed by us while CONNECTING (plain peer): CLOSE on CONNECTED
    REQUESTED = "REQUESTED"  # the peer sent CONNECT, the driver has to accept or refuse
    OPEN = "OPEN"
    LOCAL_ENDED = "LOCAL_ENDED"  # we sent SHUT (half-close)
    REMOTE_ENDED = "REMOTE_ENDED"  # the peer sent SHUT
    CLOSING = "CLOSING"  # we sent CLOSE, waiting for CLOSED
    CLOSED = "CLOSED"  # gone from the table


class AuthState(FastEnum):
    NOT_STARTED = "NOT_STARTED"  # handshake not complete yet
    PENDING = "PENDING"  # nonces / proofs under way (the driver's auth timeout runs)
    SUCCEEDED = "SUCCEEDED"
    NOT_USED = "NOT_USED"  # no authentication on this link (allowed by require_auth=False)
    FAILED = "FAILED"


_C: Final = ConnectionState
#: Link transitions: state -> {input: next state}. "fail" covers authentication failure,
#: dead peer, a remote protocol error, close_link() and an expired resumption. "suspend" (the
#: link is lost, the session is kept) is only taken by a session with resumption; the states
#: before OPEN have it once the session is reattached to a new link.
CONNECTION_TRANSITIONS: Final[dict[ConnectionState, dict[str, ConnectionState]]] = {
    _C.IDLE: {"initiate": _C.HELLO, "fail": _C.CLOSED},
    _C.HELLO: {"HELLO": _C.HELLO, "first HELLOOK": _C.SETUP, "fail": _C.CLOSED,
               "suspend": _C.SUSPENDED},
    _C.SETUP: {"peer setup done": _C.OPEN, "peer setup done, auth": _C.AUTH,
               "HELLO (peer restarted)": _C.HELLO, "fail": _C.CLOSED,
               "suspend": _C.SUSPENDED},
    _C.AUTH: {"peer proof good": _C.OPEN, "peer proof good, resume": _C.RESUME,
              "HELLO (peer restarted)": _C.HELLO, "fail": _C.CLOSED, "suspend": _C.SUSPENDED},
    _C.RESUME: {"fresh session": _C.OPEN, "resumed": _C.OPEN, "taken over": _C.CLOSED,
                "HELLO (peer restarted)": _C.HELLO, "fail": _C.CLOSED,
                "suspend": _C.SUSPENDED},
    _C.OPEN: {"HELLO (peer restarted)": _C.HELLO, "fail": _C.CLOSED, "suspend": _C.SUSPENDED},
    _C.SUSPENDED: {"reattach": _C.HELLO, "resumed": _C.OPEN, "fail": _C.CLOSED},
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
RECEIVING: Final = frozenset({_S.OPEN, _S.LOCAL_ENDED})
#: Where send_data() takes data.
SENDING: Final = frozenset({_S.OPEN, _S.REMOTE_ENDED})
#: States in which the driver has already let go of the stream.
LET_GO: Final = frozenset({_S.CLOSING, _S.CANCELLING})
