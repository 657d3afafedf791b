"""The RFC 1078 handshake as a sans-I/O state machine.

No sockets here: the server side is fed the bytes that are *available* on the connection and
answers how many of them belong to the name line, so the caller can consume exactly that many
(``recv`` after ``MSG_PEEK``) and leave every later byte in the kernel for the handler. That is
what lets bytes sent right behind the name reach an exec'd handler, which every classic inetd
loses. The client side parses the one-line ``+``/``-`` reply the same way.

Rules (RFC 1078 and tcpmuxd(8), docs/tcpmuxd.8.scd):

* a name line ends at LF; one CR right before it is dropped (CRLF is the standard, a bare LF is
  what clients in the wild send); spaces and tabs around the name are ignored;
* a name is 1..``max_length`` visible ASCII characters (0x21-0x7E); anything else is refused with
  a specific reason;
* names are matched case-insensitively: :func:`name_key` gives the lookup key;
* replies are exactly ``+`` or ``-``, an optional one-line message, CRLF; HELP is the names one
  per line, CRLF each, and then the server closes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Union

__all__ = [
    "DEFAULT_MAX_NAME_LENGTH",
    "HELP",
    "BadName",
    "HelpRequested",
    "NameReader",
    "NameReceived",
    "NeedData",
    "Reply",
    "ReplyReader",
    "ReplyError",
    "help_listing",
    "is_valid_name",
    "name_key",
    "negative",
    "positive",
]

DEFAULT_MAX_NAME_LENGTH = 256
HELP = "help"
#: Replies longer than this are a broken server, not a TCPMUX one.
MAX_REPLY_LENGTH = 1024


def name_key(name: str) -> str:
    """The case-insensitive lookup key of a service name (ASCII only, so no locale surprises)."""
    return name.lower()


def is_valid_name(name: str, max_length: int = DEFAULT_MAX_NAME_LENGTH) -> bool:
    """True when ``name`` could be sent as a TCPMUX service name (used for configured names too)."""
    return 0 < len(name) <= max_length and all("!" <= c <= "~" for c in name)


@dataclass(frozen=True)
class NeedData:
    """The name line is not complete yet: read more (within the deadline)."""


@dataclass(frozen=True)
class NameReceived:
    """A well-formed service name; ``key`` is what to look it up by."""

    name: str

    @property
    def key(self) -> str:
        return name_key(self.name)


@dataclass(frozen=True)
class HelpRequested:
    """The client sent the reserved name HELP: list the names and close."""


@dataclass(frozen=True)
class BadName:
    """The client sent something that is not a name; ``reason`` goes into the ``-`` reply."""

    reason: str


Event = Union[NeedData, NameReceived, HelpRequested, BadName]


class NameReader:
    """Server side: find the end of the name line in the bytes available on the connection.

    Feed it what ``recv(..., MSG_PEEK)`` returns. :meth:`feed` answers ``(consume, event)``:
    ``consume`` bytes must be read off the connection for real (they are part of the name line,
    now held here), and nothing beyond them. After a final event (anything but :class:`NeedData`)
    the reader must not be fed again.

    Bounds: at most :attr:`line_limit` bytes (``max_length`` name bytes plus CR, LF and
    surrounding blanks) are ever held or consumed, and never a byte past the first LF; the event
    does not depend on how the bytes were split into reads (tests/tcpmux/test_protocol_properties.py).
    :meth:`peek_size` says how much to peek so that a too-long line is seen as such at once.
    """

    #: Spaces and tabs tolerated around the name, beyond ``max_length``.
    SLACK = 16

    def __init__(self, max_length: int = DEFAULT_MAX_NAME_LENGTH) -> None:
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.max_length = max_length
        self._held = bytearray()
        self._done = False

    @property
    def held(self) -> int:
        """How many bytes of the line are held here (never more than :attr:`line_limit`)."""
        return len(self._held)

    @property
    def line_limit(self) -> int:
        """Longest acceptable line, terminator included."""
        return self.max_length + self.SLACK + 2

    def peek_size(self) -> int:
        """How many bytes to peek: one more than could still complete an acceptable line."""
        return self.line_limit - len(self._held) + 1

    def feed(self, available: bytes) -> tuple[int, Event]:
        if self._done:
            raise RuntimeError("NameReader fed after a final event")
        end = available.find(b"\n")
        # The line is too long as soon as it cannot end within line_limit bytes, however the
        # bytes were split into reads; what is known to be too long is neither held nor
        # consumed (the refusal drains the connection anyway).
        if end < 0:
            if len(self._held) + len(available) >= self.line_limit:
                return self._final(0, BadName(self._too_long()))
            self._held += available
            return len(available), NeedData()
        if len(self._held) + end + 1 > self.line_limit:
            return self._final(0, BadName(self._too_long()))
        self._held += available[: end + 1]
        return self._final(end + 1, self._parse(bytes(self._held)))

    def eof(self) -> BadName:
        """The client closed (or half-closed) before ending the line."""
        self._done = True
        if self._held:
            return BadName("connection closed before end of service name line")
        return BadName("connection closed before a service name was sent")

    def timeout(self) -> BadName:
        """The name deadline passed; the reason names what was missing."""
        self._done = True
        if self._held:
            return BadName("timed out waiting for end of service name line")
        return BadName("timed out waiting for service name")

    def _final(self, consume: int, event: Event) -> tuple[int, Event]:
        self._done = True
        return consume, event

    def _too_long(self) -> str:
        return f"service name too long (limit {self.max_length} bytes)"

    def _parse(self, line: bytes) -> Event:
        body = line[:-1]
        if body.endswith(b"\r"):
            body = body[:-1]
        body = body.strip(b" \t")
        if not body:
            return BadName("empty service name")
        if len(body) > self.max_length:
            return BadName(self._too_long())
        if not all(0x21 <= b <= 0x7E for b in body):
            return BadName("bad characters in service name (visible ASCII only)")
        name = body.decode("ascii")
        if name_key(name) == HELP:
            return HelpRequested()
        return NameReceived(name)


def _reply_text(message: str) -> bytes:
    """One line of printable ASCII: a reply message must never break the reply framing."""
    text = "".join(c if " " <= c <= "~" else "?" for c in message)
    return text[: MAX_REPLY_LENGTH - 3].encode("ascii")


def positive(message: str = "") -> bytes:
    """The ``+`` reply line."""
    return b"+" + _reply_text(message) + b"\r\n"


def negative(reason: str) -> bytes:
    """The ``-`` reply line carrying ``reason``."""
    return b"-" + _reply_text(reason) + b"\r\n"


def help_listing(names: Iterable[str]) -> bytes:
    """HELP's answer: the names, one per CRLF-terminated line."""
    return b"".join(name.encode("ascii") + b"\r\n" for name in names)


class ReplyError(Exception):
    """The server's answer is not a TCPMUX reply line."""


@dataclass(frozen=True)
class Reply:
    """The server's reply; ``rest`` holds bytes that arrived behind it (the service's own)."""

    positive: bool
    message: str
    rest: bytes = b""


class ReplyReader:
    """Client side: parse the reply line from bytes as they arrive.

    :meth:`feed` returns ``None`` until the line is complete, then the :class:`Reply`; it raises
    :class:`ReplyError` for anything that is not ``+``/``-`` or for a line past
    ``MAX_REPLY_LENGTH``. :meth:`eof` says what a close before the line means.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Reply | None:
        self._buf += data
        if self._buf[:1] not in (b"", b"+", b"-"):
            raise ReplyError(f"not a TCPMUX reply: {bytes(self._buf[:40])!r}")
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > MAX_REPLY_LENGTH:
                raise ReplyError("reply line too long")
            return None
        line = bytes(self._buf[:end]).rstrip(b"\r")
        rest = bytes(self._buf[end + 1 :])
        message = line[1:].decode("ascii", "replace").strip()
        return Reply(line[:1] == b"+", message, rest)

    def eof(self) -> ReplyError:
        if self._buf:
            return ReplyError("connection closed in the middle of the reply line")
        return ReplyError("connection closed without a reply")
