"""The server name of a TLS ClientHello (SNI), as a sans-I/O reader.

A connection whose first byte is a TLS handshake record (content type 0x16: never the first
byte of a TCPMUX name line, which is visible ASCII) is routed by the ``server_name`` extension
of its ClientHello (RFC 6066, section 3) instead of a name line. tcpmuxd never terminates TLS:
the handler must get the ClientHello untouched, so nothing is consumed here at all. The caller
peeks at everything that has arrived since the connection started and feeds all of it every
time; :class:`HelloReader` answers whether the ClientHello is complete, and if not, how many
bytes from the start of the connection it needs before it can say more (:attr:`HelloReader.
wanted`, what the caller sets SO_RCVLOWAT to, so that a peek that consumes nothing does not
wake it again until they are there).

Rules (tcpmuxd(8), docs/tcpmuxd.8.scd):

* the ClientHello may be spread over several handshake records (RFC 8446, section 5.1), every
  one of them of content type 22 with a record version 3.x, none empty, none over 2^14 bytes;
* the records that hold it may take at most ``max_size`` bytes from the start of the
  connection, headers included; what cannot fit is refused as soon as its lengths say so;
* the ClientHello is checked field by field as far as the extensions, every extension at most
  once; the server_name list must hold exactly one host_name, a host name (:func:`
  host_name_problem`), matched case-insensitively (:func:`server_name_key`);
* every refusal carries the TLS alert that tells the client (:func:`alert_record`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from tcpmuxd.tcpmux.protocol import NeedData

__all__ = [
    "ACCESS_DENIED",
    "DECODE_ERROR",
    "DEFAULT_MAX_HELLO_SIZE",
    "HANDSHAKE_FAILURE",
    "MAX_RECORD_LENGTH",
    "UNRECOGNIZED_NAME",
    "BadHello",
    "HelloReader",
    "ServerNameReceived",
    "alert_record",
    "host_name_problem",
    "is_tls_start",
    "server_name_key",
]

DEFAULT_MAX_HELLO_SIZE = 16384
#: Largest TLSPlaintext fragment (RFC 8446, section 5.1).
MAX_RECORD_LENGTH = 2**14
RECORD_HEADER = 5
HANDSHAKE_HEADER = 4
CONTENT_HANDSHAKE = 0x16
CONTENT_ALERT = 0x15
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
NAME_TYPE_HOST_NAME = 0
#: Longest host name: 253 characters in text (255 bytes on the wire, RFC 1035).
MAX_HOST_NAME = 253

# Alert descriptions (RFC 8446, section 6; RFC 6066 for unrecognized_name).
UNEXPECTED_MESSAGE = 10
RECORD_OVERFLOW = 22
HANDSHAKE_FAILURE = 40
ILLEGAL_PARAMETER = 47
ACCESS_DENIED = 49
DECODE_ERROR = 50
UNRECOGNIZED_NAME = 112

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z", re.IGNORECASE)


def is_tls_start(first: bytes) -> bool:
    """Whether a connection that starts with ``first`` (at least one byte) speaks TLS."""
    return first[:1] == bytes([CONTENT_HANDSHAKE])


def server_name_key(name: str) -> str:
    """The case-insensitive lookup key of a host name (ASCII only, as DNS compares them)."""
    return name.lower()


def host_name_problem(name: str) -> str | None:
    """Why ``name`` is not a host name (letters, digits and hyphens in dot-separated labels of
    1..63 characters, no hyphen at either end of one, 253 characters at most, and not an IPv4
    address, which SNI never carries), or None. Used for configured names and received ones."""
    if not name:
        return "empty host name"
    if len(name) > MAX_HOST_NAME:
        return f"host name longer than {MAX_HOST_NAME} characters"
    labels = name.split(".")
    for label in labels:
        if not label:
            return f"empty label in host name {name!r}"
        if not _LABEL.match(label):
            return (f"host name {name!r} has the label {label!r}: letters, digits and inner "
                    "hyphens only, at most 63")
    if labels[-1].isdigit():
        return f"{name!r} is an address, not a host name"
    return None


def alert_record(description: int) -> bytes:
    """A fatal TLS alert record: what a refused TLS client is told instead of a ``-`` line."""
    return bytes([CONTENT_ALERT, 3, 3, 0, 2, 2, description])


@dataclass(frozen=True)
class ServerNameReceived:
    """A complete ClientHello naming ``name`` (as sent, without a final dot); ``size`` is how
    many bytes from the start of the connection its records take."""

    name: str
    size: int

    @property
    def key(self) -> str:
        return server_name_key(self.name)


@dataclass(frozen=True)
class BadHello:
    """The connection cannot be routed by its ClientHello: ``reason`` for the log, ``alert``
    the TLS alert description the client is sent."""

    reason: str
    alert: int = HANDSHAKE_FAILURE


Event = Union[NeedData, ServerNameReceived, BadHello]


class _Malformed(Exception):
    def __init__(self, reason: str, alert: int = DECODE_ERROR) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alert = alert


class _Fields:
    """Reads the ClientHello's fields front to back; running past the end is malformed."""

    def __init__(self, data: bytes | memoryview, what: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._what = what

    @property
    def left(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left:
            raise _Malformed(f"malformed TLS ClientHello: {what} runs past the end of "
                             f"{self._what}")
        out = self._data[self._pos:self._pos + n]
        self._pos += n
        return out

    def number(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> _Fields:
        return _Fields(self.take(self.number(length_size, f"the length of {what}"), what), what)


def _headers(hello_length: int) -> int:
    """The fewest record headers a handshake message of ``hello_length`` bytes needs."""
    return -(-hello_length // MAX_RECORD_LENGTH) * RECORD_HEADER


def _server_name(body: memoryview) -> str:
    """The host name in a ClientHello body (the handshake message without its header)."""
    hello = _Fields(body, "the ClientHello")
    version = hello.number(2, "the version")
    if version >> 8 != 3:
        raise _Malformed(f"not a TLS ClientHello: version {version >> 8}.{version & 0xFF}")
    hello.take(32, "the random")
    if hello.vector(1, "the session id").left > 32:
        raise _Malformed("malformed TLS ClientHello: session id longer than 32 bytes")
    suites = hello.vector(2, "the cipher suites").left
    if suites < 2 or suites % 2:
        raise _Malformed(f"malformed TLS ClientHello: cipher suites of {suites} bytes")
    if hello.vector(1, "the compression methods").left < 1:
        raise _Malformed("malformed TLS ClientHello: no compression method")
    if not hello.left:
        raise _Malformed("no server name in the TLS ClientHello (it has no extensions)",
                         HANDSHAKE_FAILURE)
    extensions = hello.vector(2, "the extensions")
    if hello.left:
        raise _Malformed("malformed TLS ClientHello: bytes after the extensions")
    seen: set[int] = set()
    server_names: _Fields | None = None
    while extensions.left:
        kind = extensions.number(2, "an extension type")
        data = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise _Malformed(f"malformed TLS ClientHello: extension {kind} appears twice",
                             ILLEGAL_PARAMETER)
        seen.add(kind)
        if kind == EXTENSION_SERVER_NAME:
            server_names = data.vector(2, "the server name list")
            if data.left:
                raise _Malformed("malformed TLS ClientHello: bytes after the server name list")
    if server_names is None:
        raise _Malformed("no server name in the TLS ClientHello", HANDSHAKE_FAILURE)
    host: str | None = None
    while server_names.left:
        name_type = server_names.number(1, "a server name type")
        name = server_names.take(server_names.number(2, "the length of a server name"),
                                 "a server name")
        if name_type != NAME_TYPE_HOST_NAME:
            continue
        if host is not None:
            raise _Malformed("malformed TLS ClientHello: two host names in server_name")
        host = _host_name(bytes(name))
    if host is None:
        raise _Malformed("no host name in the TLS ClientHello's server_name", HANDSHAKE_FAILURE)
    return host


def _host_name(raw: bytes) -> str:
    """The received host name, checked; a final dot (which RFC 6066 forbids, but DNS allows) is
    dropped, so that it names the same service."""
    text = raw.decode("ascii", "replace")
    name = text[:-1] if text.endswith(".") else text
    problem = host_name_problem(name)
    if problem is not None:
        raise _Malformed(f"bad server name in the TLS ClientHello: {problem}", UNRECOGNIZED_NAME)
    return name


def parse(data: bytes, max_size: int = DEFAULT_MAX_HELLO_SIZE) -> tuple[Event, int]:
    """The event for ``data``, every byte from the start of a connection whose first byte is a
    handshake record's, and how many bytes from the start are wanted before it can change
    (for :class:`NeedData`; else ``len(data)``). A pure function: the same for any split."""
    try:
        return _parse(memoryview(data), max_size)
    except _Malformed as e:
        return BadHello(e.reason, e.alert), len(data)


def _too_large(max_size: int) -> _Malformed:
    return _Malformed(f"TLS ClientHello too large (limit {max_size} bytes)", HANDSHAKE_FAILURE)


def _parse(data: memoryview, max_size: int) -> tuple[Event, int]:
    hello = bytearray()  # the handshake bytes of the records complete so far
    need: int | None = None  # the handshake message's length with its header, once known
    pos = 0
    while need is None or len(hello) < need:
        if len(data) < pos + RECORD_HEADER:
            return NeedData(), min(pos + RECORD_HEADER, max_size)
        kind, major, minor = data[pos], data[pos + 1], data[pos + 2]
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if kind != CONTENT_HANDSHAKE:
            raise _Malformed(f"TLS record of content type {kind} inside the ClientHello",
                             UNEXPECTED_MESSAGE)
        if major != 3 or minor > 4:
            raise _Malformed(f"not a TLS record: version {major}.{minor}")
        if length == 0:
            raise _Malformed("empty TLS handshake record")
        if length > MAX_RECORD_LENGTH:
            raise _Malformed(f"TLS record of {length} bytes, over 2^14", RECORD_OVERFLOW)
        start, end = pos + RECORD_HEADER, pos + RECORD_HEADER + length
        if need is None:
            # the handshake header may be known before its record is complete: a hello that
            # cannot fit is refused at once, not after max_size bytes have been waited for
            header = bytes(hello + data[start:min(end, start + HANDSHAKE_HEADER)])
            if len(header) >= 1 and header[0] != HANDSHAKE_CLIENT_HELLO:
                raise _Malformed(f"TLS handshake message of type {header[0]}, not a "
                                 "ClientHello", UNEXPECTED_MESSAGE)
            if len(header) >= HANDSHAKE_HEADER:
                need = HANDSHAKE_HEADER + int.from_bytes(header[1:4], "big")
                headers = max(_headers(need), pos - len(hello) + RECORD_HEADER)
                if headers + need > max_size:
                    raise _too_large(max_size)
        if end > max_size:
            raise _too_large(max_size)
        if len(data) < end:
            return NeedData(), end
        hello += data[start:end]
        pos = end
    return ServerNameReceived(_server_name(memoryview(hello)[HANDSHAKE_HEADER:need]), pos), pos


class HelloReader:
    """The ClientHello phase of one connection, driven as the name line's
    :class:`~tcpmuxd.tcpmux.protocol.NameReader` is (``peek_size``, ``feed``, ``eof``,
    ``timeout``), except that :meth:`feed` is always given every byte from the start of the
    connection and never has any consumed (it answers ``(0, event)``). After a final event it
    must not be fed again.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_HELLO_SIZE) -> None:
        if max_size < RECORD_HEADER + HANDSHAKE_HEADER:
            raise ValueError(f"max_size must be at least {RECORD_HEADER + HANDSHAKE_HEADER}")
        self.max_size = max_size
        #: Bytes from the start of the connection needed before feeding again can help.
        self.wanted = RECORD_HEADER
        self._seen = 0
        self._done = False

    @property
    def seen(self) -> int:
        """How many bytes the last :meth:`feed` was shown."""
        return self._seen

    def peek_size(self) -> int:
        return self.max_size

    def feed(self, available: bytes) -> tuple[int, Event]:
        if self._done:
            raise RuntimeError("HelloReader fed after a final event")
        self._seen = len(available)
        event, self.wanted = parse(available, self.max_size)
        self._done = not isinstance(event, NeedData)
        return 0, event

    def eof(self) -> BadHello:
        """The client closed (or half-closed) before the ClientHello was complete."""
        self._done = True
        return BadHello("connection closed before the end of the TLS ClientHello")

    def timeout(self) -> BadHello:
        """The name deadline passed before the ClientHello was complete."""
        self._done = True
        return BadHello(f"timed out waiting for the end of the TLS ClientHello "
                        f"({self._seen} bytes received)")
