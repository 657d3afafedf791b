"""SockMux frames: the wire codec, sans-I/O.

SockMux (DeleGate's "simple socket tunneling multiplexer protocol, version 0.3") moves frames over
one byte stream. A frame is an 8-byte big-endian header and a payload::

    offset  size  field
    0       1     version   0x03 (0x83 once DeleGate's own cipher is on: never with us)
    1       1     type      see the constants below; a reply is ``type | 0x40``
    2       2     sender's stream id
    4       2     receiver's stream id (0x00FF: none / control)
    6       2     payload length

This module knows frames and the small texts inside them, nothing about sessions (that is
:mod:`tcpmuxd.sockmux.connection`). It does no I/O and keeps no clock.

Encoding
    :func:`encode_header` packs a header into an 8-byte ``bytes`` with a precompiled
    :class:`struct.Struct`; payloads are never concatenated onto it by the connection. A frame
    to send is a list of *chunks* (``[header, payload]``, the payload often the caller's
    ``bytes`` or a ``memoryview`` of them) meant for ``transport.writelines()``. :func:`encode_frame` gives a
    single ``bytes`` for small control frames and tests.

Decoding
    :class:`FrameDecoder` is fed bytes as they arrive and hands out one :class:`Frame` at a
    time, so that a caller can change the frame-size limit between two frames (SockMux
    negotiates the frame size in-band). It raises :class:`RemoteProtocolError` for a version
    other than 0x03 and for a frame longer than its current limit, as soon as the header is
    complete. *Buffer bound*: between calls it holds at most ``limit - 1`` bytes (one
    incomplete frame), plus, for the duration of one call, the chunk being fed.

Texts
    HELLO, CONNECT, SENT, CLOSE and ECHO carry NUL-terminated ASCII texts; SETOPT carries an
    option byte and option data. ``*_payload`` functions build them, ``parse_*`` functions read
    them and raise :class:`RemoteProtocolError` for anything malformed or longer than the limit
    they are given. Building a text from bad local input raises :class:`LocalProtocolError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Iterator, Union

__all__ = [
    # errors
    "SockMuxError", "LocalProtocolError", "RemoteProtocolError",
    # header
    "HEADER", "HEADER_SIZE", "VERSION", "VERSION_ENCRYPTED", "NO_STREAM", "REPLY_BIT",
    "MAX_PAYLOAD", "MAX_FRAME_SIZE", "INITIAL_FRAME_SIZE", "PLAIN_FRAME_SIZE", "MIN_FRAME_SIZE",
    "PLAIN_WINDOW", "PLAIN_PENDING_FRAMES", "CONNECT_TAG",
    # types
    "NOOP", "HELLO", "HELLOOK", "CONNECT", "CONNECTED", "BIND", "BINDOK", "SEND", "SENT",
    "SENDOOB", "SENTOOB", "CLOSE", "CLOSED", "ECHO", "ECHOOK", "SETOPT", "CRYPTON",
    "SHUT", "AUTH", "RESUME", "DELEGATE_TYPES", "EXTENSION_TYPES", "TYPE_NAMES", "type_name", "reply_type",
    # options
    "OPT_CONNDATA", "OPT_PACKSIZE", "OPT_AUTH", "OPT_EXTENSIONS", "OPTION_NAMES", "CONNDATA_ON",
    # frames
    "Frame", "Chunk", "concat", "encode_header", "encode_frame", "FrameDecoder", "decode_all",
    # texts
    "c_string", "split_c_string", "hello_text", "hello_payload", "parse_hello",
    "Addresses", "connect_text", "parse_connect", "count_payload", "parse_count",
    "reason_payload", "parse_reason", "echo_payload", "parse_echo",
    "setopt_payload", "parse_setopt", "packsize_data", "parse_packsize", "parse_conndata",
    # resumption
    "RESUME_NEW", "RESUME_REQUEST", "RESUME_ACCEPT", "RESUME_UNKNOWN", "RESUME_ACK",
    "RESUME_END",
    "SESSION_ID_SIZE", "RESUME_MAC_SIZE", "ResumeMessage", "resume_payload", "parse_resume",
]


# ---------------------------------------------------------------------------------------------
# Errors (shared by the whole sockmux package)


class SockMuxError(Exception):
    """Base class of every error raised by the sockmux protocol layer."""


class LocalProtocolError(SockMuxError):
    """The caller (the driver) asked for something the protocol or the state does not allow.

    A bug or a race in the driver, never caused by the peer; the link itself is still usable.
    """


class RemoteProtocolError(SockMuxError):
    """The peer broke the protocol (or a configured limit): the link must be closed.

    ``events`` holds the events produced by the same ``receive_data`` call before the bad frame,
    so that the driver can still act on them (deliver data, log) before closing.
    """

    def __init__(self, message: str, events: list | None = None) -> None:
        super().__init__(message)
        self.events: list = list(events or ())


# ---------------------------------------------------------------------------------------------
# Header and sizes
#
# Module constants here and in the other compiled modules are Final: compiled, a Final literal
# is inlined and any other Final is a C static, where a plain module global costs a dictionary
# lookup at every use (about 90 instructions; 7 % of a round trip's before they were Final).

HEADER: Final = struct.Struct(">BBHHH")
HEADER_SIZE: Final = 8  # a literal, so that the compiled modules inline it
assert HEADER.size == HEADER_SIZE
VERSION: Final = 0x03
#: DeleGate sets this version once its own cipher ("Credhy") is on. We never agree to that.
VERSION_ENCRYPTED: Final = 0x83
#: Receiver id meaning "no stream / control" (CONNECT and control frames carry it).
NO_STREAM: Final = 0x00FF
REPLY_BIT: Final = 0x40
MAX_PAYLOAD: Final = 0xFFFF
#: Sizes below are frame sizes, header included (as DeleGate's PACKSIZE counts them).
MAX_FRAME_SIZE: Final = HEADER_SIZE + MAX_PAYLOAD  # 65543
#: What DeleGate sends until the frame size is negotiated.
INITIAL_FRAME_SIZE: Final = 512
#: DeleGate's largest frame (its PACKSIZE).
PLAIN_FRAME_SIZE: Final = 16384
#: Smallest frame size we accept in a PACKSIZE or configuration (room for texts).
MIN_FRAME_SIZE: Final = 512
#: Unacknowledged SEND bytes per stream we send to a plain peer: DeleGate's own window at
#: 16 KiB frames (PLAIN_PENDING_FRAMES * PLAIN_FRAME_SIZE).
PLAIN_WINDOW: Final = 65536
#: DeleGate 9.9.11 (sox.c, MAXPENDING) stops sending on a stream once *more than* this many
#: frames' worth (its PackSize each) is unacknowledged: see plain_receive_window().
PLAIN_PENDING_FRAMES: Final = 4
#: The number DeleGate puts first in CONNECT / CONNECTED texts.
CONNECT_TAG: Final = 98304

# ---------------------------------------------------------------------------------------------
# Types. A reply is the request's type | 0x40, with the two stream ids swapped.

NOOP: Final = 0x00
HELLO: Final = 0x01
HELLOOK: Final = HELLO | REPLY_BIT  # 0x41
CONNECT: Final = 0x02
CONNECTED: Final = CONNECT | REPLY_BIT  # 0x42
BIND: Final = 0x04
BINDOK: Final = BIND | REPLY_BIT  # 0x44
SEND: Final = 0x06
SENT: Final = SEND | REPLY_BIT  # 0x46
SENDOOB: Final = 0x07
SENTOOB: Final = SENDOOB | REPLY_BIT  # 0x47
CLOSE: Final = 0x08
CLOSED: Final = CLOSE | REPLY_BIT  # 0x48
ECHO: Final = 0x09
ECHOOK: Final = ECHO | REPLY_BIT  # 0x49
SETOPT: Final = 0x0A
CRYPTON: Final = 0x0C

# Extension types (tcpmuxd). Chosen so that a DeleGate peer can never mistake them for one of
# its own: bit 0x40 (reply) and 0x80 clear; neither the type, nor type|0x40, nor its low nibble
# (0x0D, 0x0E, 0x0F) is a DeleGate type. They are only ever sent to a peer that announced the
# extensions (see connection.py), so a plain peer never even sees them.
SHUT: Final = 0x3D  # half-close: the sender sends no more data on this stream
AUTH: Final = 0x3E  # mutual authentication: op byte 'N' nonce / 'P' proof / 'F' failure + data
RESUME: Final = 0x3F  # resumption: op byte 'N' / 'R' / 'A' / 'U' / 'K' + data (ResumeMessage)

DELEGATE_TYPES: Final = frozenset(
    {NOOP, HELLO, HELLOOK, CONNECT, CONNECTED, BIND, BINDOK, SEND, SENT, SENDOOB, SENTOOB,
     CLOSE, CLOSED, ECHO, ECHOOK, SETOPT, CRYPTON}
)
EXTENSION_TYPES: Final = frozenset({SHUT, AUTH, RESUME})

TYPE_NAMES: Final = {
    NOOP: "NOOP", HELLO: "HELLO", HELLOOK: "HELLOOK", CONNECT: "CONNECT",
    CONNECTED: "CONNECTED", BIND: "BIND", BINDOK: "BINDOK", SEND: "SEND", SENT: "SENT",
    SENDOOB: "SENDOOB", SENTOOB: "SENTOOB", CLOSE: "CLOSE", CLOSED: "CLOSED", ECHO: "ECHO",
    ECHOOK: "ECHOOK", SETOPT: "SETOPT", CRYPTON: "CRYPTON", SHUT: "SHUT", AUTH: "AUTH",
    RESUME: "RESUME",
}


def type_name(frame_type: int) -> str:
    """``"CONNECT"``, or ``"0x5a"`` for a type we do not know."""
    return TYPE_NAMES.get(frame_type, f"0x{frame_type:02x}")


def reply_type(frame_type: int) -> int:
    return frame_type | REPLY_BIT


# SETOPT options (first payload byte). DeleGate's own use small numbers; it also has CRYPT,
# whose number we never need (we never send it and ignore it).
OPT_CONNDATA: Final = 0x02
OPT_PACKSIZE: Final = 0x03
OPT_AUTH: Final = 0x04  # DeleGate's one-way "user:pass" (ignored by us)
#: tcpmuxd's extension announcement: far from DeleGate's 1..4, body starts with a magic word.
OPT_EXTENSIONS: Final = 0x58
OPTION_NAMES: Final = {OPT_CONNDATA: "CONNDATA", OPT_PACKSIZE: "PACKSIZE", OPT_AUTH: "AUTH",
                OPT_EXTENSIONS: "EXTENSIONS"}
#: The option data DeleGate 9.9.11 sends with CONNDATA (``0a`` frame payload ``02 01 00``).
CONNDATA_ON: Final = b"\x01\x00"


# ---------------------------------------------------------------------------------------------
# Frames

Chunk = Union[bytes, memoryview]


@dataclass(slots=True, init=False)
class Frame:
    """One decoded frame. ``payload`` is an independent ``bytes`` (safe to keep).

    Read-only by convention, not frozen: the decoder makes one per frame received. The
    ``__init__`` is written out: compiled, it is a native constructor, where the dataclass's
    generated one is interpreted Python reached through a generic call (args tuple, kwargs
    dict), which cost more than decoding the header."""

    type: int
    sender: int
    receiver: int
    payload: bytes
    version: int

    def __init__(self, type: int, sender: int, receiver: int, payload: bytes = b"",
                 version: int = VERSION) -> None:
        self.type = type
        self.sender = sender
        self.receiver = receiver
        self.payload = payload
        self.version = version

    @property
    def name(self) -> str:
        return type_name(self.type)

    def encode(self) -> bytes:
        return encode_frame(self.type, self.sender, self.receiver, self.payload, self.version)

    def __repr__(self) -> str:  # short and readable in test failures and logs
        body = self.payload if len(self.payload) <= 48 else concat(self.payload[:45], b"...")
        return (f"Frame({self.name}, {self.sender:#06x}->{self.receiver:#06x}, "
                f"{len(self.payload)}B {body!r})")


def concat(*parts: bytes) -> bytes:
    """``first + second + ...``, written so that compiled code frees ``first``: mypyc up to at
    least 1.15 (Debian 13's, which builds our packages) leaks the left operand of
    ``bytes + bytes`` (mypyc/mypyc#1192, fixed by python/mypy#21469), so every frame header
    and every held buffer would stay allocated (measured: 42 MiB more per flood of 9 MB of
    ECHO frames, tests/sockmux/test_compiled_leaks.py). The compiled modules concatenate
    bytes only through this function."""
    return b"".join(parts)


def encode_header(frame_type: int, sender: int, receiver: int, length: int,
                  version: int = VERSION) -> bytes:
    """The 8 header bytes. Raises :class:`LocalProtocolError` for a field out of range."""
    if not 0 <= length <= MAX_PAYLOAD:
        raise LocalProtocolError(f"payload of {length} bytes does not fit a SockMux frame")
    try:
        return HEADER.pack(version, frame_type, sender, receiver, length)
    except struct.error as exc:
        raise LocalProtocolError(f"frame header field out of range: {exc}") from None


def encode_frame(frame_type: int, sender: int, receiver: int, payload: bytes = b"",
                 version: int = VERSION) -> bytes:
    """Header and payload as one ``bytes`` (for small frames; data frames use chunks)."""
    return concat(encode_header(frame_type, sender, receiver, len(payload), version), payload)


class FrameDecoder:
    """Streaming decoder: :meth:`feed` bytes, then call :meth:`next_frame` until ``None``.

    ``limit`` is the largest acceptable frame, header included; the owner may change it between
    two frames (it must be within ``HEADER_SIZE + 1 .. MAX_FRAME_SIZE``). Errors are raised as
    soon as a header is complete, so a bad length is refused before its payload is buffered.
    After an error the decoder is unusable (the link must be closed anyway).

    Buffer bound: after :meth:`next_frame` has returned ``None``, at most ``limit - 1`` bytes
    are held.
    """

    __slots__ = ("_buf", "_pos", "_limit", "_failed")

    def __init__(self, limit: int = MAX_FRAME_SIZE) -> None:
        # ``_buf[_pos:]`` is what is not decoded yet. An immutable ``bytes``, not a growing
        # bytearray: a read that holds whole frames (the common case) is decoded in place,
        # each payload sliced out once, and nothing is copied into a buffer first.
        self._buf = b""
        self._pos = 0
        self._failed = False
        self.limit = limit

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        if not HEADER_SIZE < value <= MAX_FRAME_SIZE:
            raise ValueError(f"frame size limit {value} out of range")
        self._limit = value

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._failed:
            raise LocalProtocolError("decoder already failed; the link must be closed")
        buf, pos = self._buf, self._pos
        if pos == len(buf):
            self._buf = bytes(data)  # no copy for bytes, the usual type
        else:
            self._buf = buf[pos:] + data
        self._pos = 0

    def next_frame(self) -> Frame | None:
        """The next complete frame, or ``None`` when more bytes are needed."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            self._keep_rest()
            return None
        # Indexing, not HEADER.unpack_from: compiled, a byte index is a plain C read, where
        # unpack_from builds a tuple of five ints for every frame.
        version = buf[pos]
        ftype = buf[pos + 1]
        sender = (buf[pos + 2] << 8) | buf[pos + 3]
        receiver = (buf[pos + 4] << 8) | buf[pos + 5]
        length = (buf[pos + 6] << 8) | buf[pos + 7]
        if version != VERSION:
            self._failed = True
            if version == VERSION_ENCRYPTED:
                raise RemoteProtocolError(
                    "peer sent an encrypted frame (version 0x83): DeleGate's CRYPT is not "
                    "supported, use TLS around the link instead")
            raise RemoteProtocolError(f"bad SockMux version 0x{version:02x} (expected 0x03)")
        if HEADER_SIZE + length > self._limit:
            self._failed = True
            raise RemoteProtocolError(
                f"{type_name(ftype)} frame of {HEADER_SIZE + length} bytes exceeds the "
                f"negotiated maximum of {self._limit}")
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            self._keep_rest()
            return None
        self._pos = end
        return Frame(ftype, sender, receiver, buf[pos + HEADER_SIZE:end], version)

    def _keep_rest(self) -> None:
        """Keep only the incomplete frame (not the whole read it came in), so that at most
        ``limit - 1`` bytes stay held between reads."""
        if self._pos:
            self._buf = self._buf[self._pos:]
            self._pos = 0
        return None

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame


def decode_all(data: bytes, limit: int = MAX_FRAME_SIZE) -> list[Frame]:
    """Every frame in ``data``, which must end on a frame boundary (for tests and tools)."""
    decoder = FrameDecoder(limit)
    decoder.feed(data)
    frames = list(decoder)
    if decoder.buffered:
        raise RemoteProtocolError(f"{decoder.buffered} bytes of a truncated frame at the end")
    return frames


# ---------------------------------------------------------------------------------------------
# Texts


def c_string(text: str) -> bytes:
    """``text`` as NUL-terminated ASCII; :class:`LocalProtocolError` if that is impossible."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"SockMux texts are ASCII: {text!r}") from None
    if b"\0" in raw:
        raise LocalProtocolError(f"NUL inside a SockMux text: {text!r}")
    return concat(raw, b"\0")


def split_c_string(payload: bytes, max_length: int, what: str = "text") -> tuple[str, bytes]:
    """Split ``payload`` into its NUL-terminated text and the bytes after the NUL.

    A missing NUL is tolerated (the whole payload is the text). A text longer than
    ``max_length`` bytes is a :class:`RemoteProtocolError`. Non-ASCII bytes are replaced, so
    the result is always printable-safe for logs.
    """
    end = payload.find(b"\0", 0, max_length + 1)
    if end < 0:
        if len(payload) > max_length:
            raise RemoteProtocolError(f"{what} longer than {max_length} bytes")
        end = len(payload)
        rest = b""
    else:
        rest = payload[end + 1:]
    return payload[:end].decode("ascii", "replace"), rest


def hello_text(when: datetime, hostname: str) -> str:
    """DeleGate's HELLO text: ``YYYYmmdd-HHMMSS.uuuuuu hostname``."""
    return f"{when:%Y%m%d-%H%M%S.%f} {hostname}"


def hello_payload(when: datetime, hostname: str) -> bytes:
    return c_string(hello_text(when, hostname))


def parse_hello(payload: bytes, max_length: int) -> str:
    """The text of a HELLO or HELLOOK (both carry the sender's own hello text)."""
    return split_c_string(payload, max_length, "HELLO text")[0]


@dataclass(slots=True, init=False)  # read-only by convention (see connection.py, "Compiled")
class Addresses:
    """The text of CONNECT (``client``, ``entrance``) or CONNECTED (``server``, ``local``).

    DeleGate writes ``98304 PEER LOCAL`` of the socket concerned: for CONNECT the accepted
    client and the entrance it came in at, for CONNECTED the server connected to and the
    local end of that connection. ``first`` and ``second`` are kept as the ``HOST:PORT`` texts.
    One per stream: ``__init__`` written out, as for :class:`Frame`.
    """

    first: str
    second: str
    tag: int

    def __init__(self, first: str, second: str, tag: int = CONNECT_TAG) -> None:
        self.first = first
        self.second = second
        self.tag = tag


def _check_address(addr: str, max_length: int) -> None:
    # visible ASCII: isprintable() already refuses controls and DEL, the space is left
    if (not addr or len(addr) > max_length or not addr.isascii() or not addr.isprintable()
            or " " in addr):
        raise LocalProtocolError(
            f"bad address for a SockMux text (visible ASCII, no spaces, 1..{max_length}): "
            f"{addr!r}")


def connect_text(first: str, second: str, tag: int = CONNECT_TAG,
                 max_length: int = 512) -> bytes:
    """NUL-terminated ``TAG FIRST SECOND`` for CONNECT / CONNECTED (first data goes after)."""
    text = f"{tag} {first} {second}"
    # One check of the whole text on the path every stream takes (both addresses non-empty,
    # visible ASCII, exactly the two separating spaces); the addresses one by one only to
    # say which is wrong.
    if (not first or not second or len(text) > max_length or not text.isascii()
            or not text.isprintable() or text.count(" ") != 2):
        _check_address(first, max_length)
        _check_address(second, max_length)
        raise LocalProtocolError(f"CONNECT text longer than {max_length} bytes")
    return concat(text.encode("ascii"), b"\0")


def parse_connect(payload: bytes, max_length: int) -> tuple[Addresses, bytes]:
    """``(Addresses, first_data)`` from a CONNECT or CONNECTED payload."""
    text, first_data = split_c_string(payload, max_length, "CONNECT text")
    fields = text.split()
    if len(fields) < 3:
        raise RemoteProtocolError(f"malformed CONNECT text {text!r}")
    try:
        tag = int(fields[0])
    except ValueError:
        raise RemoteProtocolError(f"malformed CONNECT text {text!r}") from None
    return Addresses(fields[1], fields[2], tag), first_data


def count_payload(count: int) -> bytes:
    """SENT / SENTOOB: the decimal byte count, NUL-terminated."""
    return b"%d\0" % count


def parse_count(payload: bytes) -> int:
    text = payload.split(b"\0", 1)[0]
    if not text.isdigit() or len(text) > 10:
        raise RemoteProtocolError(f"malformed SENT count {payload[:20]!r}")
    return int(text)


def reason_payload(reason: str, max_length: int = 512) -> bytes:
    """CLOSE / CLOSED reason, NUL-terminated (``DO close``, ``OK closed``, ``No server``...)."""
    raw = c_string(reason)
    if len(raw) - 1 > max_length:
        raise LocalProtocolError(f"close reason longer than {max_length} bytes")
    return raw


def parse_reason(payload: bytes, max_length: int) -> str:
    return split_c_string(payload, max_length, "CLOSE reason")[0]


def echo_payload(clock_ms: int) -> bytes:
    """ECHO: a decimal millisecond clock, NUL-terminated (DeleGate's may be negative)."""
    return b"%d\0" % clock_ms


def parse_echo(payload: bytes) -> int | None:
    """The clock in an ECHO / ECHOOK, or ``None`` if it is not a number (not an error)."""
    text = payload.split(b"\0", 1)[0]
    try:
        return int(text) if len(text) <= 24 else None
    except ValueError:
        return None


def setopt_payload(option: int, data: bytes = b"") -> bytes:
    return concat(bytes((option,)), data)


def parse_setopt(payload: bytes) -> tuple[int, bytes]:
    if not payload:
        raise RemoteProtocolError("empty SETOPT frame")
    return payload[0], payload[1:]


def packsize_data(size: int) -> bytes:
    """PACKSIZE option data: the frame size as a big-endian u16 (``40 00`` = 16384)."""
    if not MIN_FRAME_SIZE <= size <= 0xFFFF:
        raise LocalProtocolError(f"PACKSIZE {size} out of range")
    return size.to_bytes(2, "big")


def parse_packsize(data: bytes) -> int:
    if len(data) < 2:
        raise RemoteProtocolError("truncated PACKSIZE option")
    size = int.from_bytes(data[:2], "big")
    if size < MIN_FRAME_SIZE:
        raise RemoteProtocolError(f"PACKSIZE {size} is too small to carry SockMux texts")
    return size


def parse_conndata(data: bytes) -> bool:
    """CONNDATA option data: DeleGate sends ``01 00``; a first byte of 0 would mean off."""
    return bool(data[:1]) and data[0] != 0


# ---------------------------------------------------------------------------------------------
# RESUME (resumption extension, docs/sockmux-protocol.md section 12)

#: Op bytes of a RESUME frame.
RESUME_NEW: Final = ord("N")  # no session to resume: a fresh one
RESUME_REQUEST: Final = ord("R")  # resume session id; I decoded count bytes of yours; mac
RESUME_ACCEPT: Final = ord("A")  # the answer to R: resumed (same fields)
RESUME_UNKNOWN: Final = ord("U")  # the answer to R: no such session here; reason text
RESUME_ACK: Final = ord("K")  # I decoded count bytes of your session stream
RESUME_END: Final = ord("E")  # the session ends here (the sender stops); reason text
SESSION_ID_SIZE: Final = 16
RESUME_MAC_SIZE: Final = 32
_COUNT_LIMIT: Final = 1 << 64


@dataclass(slots=True)
class ResumeMessage:
    """One RESUME frame's content: ``op``, and the fields that op has (the others empty)."""

    op: int
    session_id: bytes = b""
    count: int = 0
    mac: bytes = b""
    reason: str = ""


def resume_payload(message: ResumeMessage) -> bytes:
    """The payload of a RESUME frame. Raises :class:`LocalProtocolError` for bad fields."""
    op = message.op
    if op == RESUME_NEW:
        return bytes((op,))
    if not 0 <= message.count < _COUNT_LIMIT:
        raise LocalProtocolError(f"RESUME count {message.count} out of range")
    if op == RESUME_ACK:
        return concat(bytes((op,)), message.count.to_bytes(8, "big"))
    if op == RESUME_UNKNOWN or op == RESUME_END:
        return concat(bytes((op,)), c_string(message.reason[:200]))
    if op in (RESUME_REQUEST, RESUME_ACCEPT):
        if len(message.session_id) != SESSION_ID_SIZE or len(message.mac) != RESUME_MAC_SIZE:
            raise LocalProtocolError("RESUME session id or mac of the wrong size")
        return concat(bytes((op,)), message.session_id, message.count.to_bytes(8, "big"),
                      message.mac)
    raise LocalProtocolError(f"unknown RESUME op 0x{op:02x}")


def parse_resume(payload: bytes, max_length: int) -> ResumeMessage:
    """A RESUME frame's content; :class:`RemoteProtocolError` for anything malformed."""
    if not payload:
        raise RemoteProtocolError("empty RESUME frame")
    op, body = payload[0], payload[1:]
    if op == RESUME_NEW:
        if body:
            raise RemoteProtocolError("RESUME N with data")
        return ResumeMessage(op)
    if op == RESUME_ACK:
        if len(body) != 8:
            raise RemoteProtocolError(f"RESUME K of {len(body)} bytes, expected 8")
        return ResumeMessage(op, count=int.from_bytes(body, "big"))
    if op == RESUME_UNKNOWN or op == RESUME_END:
        return ResumeMessage(op, reason=split_c_string(body, max_length, "RESUME reason")[0])
    if op == RESUME_REQUEST or op == RESUME_ACCEPT:
        if len(body) != SESSION_ID_SIZE + 8 + RESUME_MAC_SIZE:
            raise RemoteProtocolError(f"RESUME {chr(op)} of {len(body)} bytes, expected "
                                      f"{SESSION_ID_SIZE + 8 + RESUME_MAC_SIZE}")
        return ResumeMessage(op, session_id=body[:SESSION_ID_SIZE],
                             count=int.from_bytes(body[SESSION_ID_SIZE:SESSION_ID_SIZE + 8],
                                                  "big"),
                             mac=body[SESSION_ID_SIZE + 8:])
    raise RemoteProtocolError(f"unknown RESUME op 0x{op:02x}")
