"""Tunnel settings: what a tunnel is, read from ``sockmux.d/NAME.conf`` (sockmuxd.conf(5)) or
from the command line, and validated once, here.

``sockmuxd NAME`` (the unit ``sockmuxd@NAME.service``) runs the tunnel of ``NAME.conf``, found
along :data:`SEARCH_PATH` with the rules tcpmuxd's ``conf.d`` follows (they share
:mod:`tcpmuxd.common.dropins`): the highest file of that name wins whole, an empty file or a symlink
to ``/dev/null`` masks it. The file has one ``[Tunnel]`` section with systemd-style keys.
Command-line flags (:mod:`tcpmuxd.sockmux.flags`) are assignments to the same keys: they are
read into the same :class:`~tcpmuxd.common.dropins.Settings` and checked by the same
:func:`build_tunnel`, so ``sockmuxd --check`` and the flags agree by construction; only the
messages spell the keys as flags.

Unlike tcpmuxd, which serves every good file and reports the bad ones, a tunnel is all or
nothing: :func:`load_tunnel` returns a complete :class:`Tunnel` or raises
:class:`TunnelConfigError` carrying every problem with file and line. A tunnel with half its
settings would be worse than none: it might run without the authentication or TLS the admin
wrote down. For the same reason a directory above the file that cannot be searched is an error
(it may hold an override or a mask), and the secret is read and its permissions checked when
the file is loaded, not when the first peer shows up.

What the protocol layer enforces (:class:`tcpmuxd.sockmux.SockMuxConfig`) is checked here too,
with the key and line, so that ``sockmuxd --check`` finds what the daemon would refuse. The
link's key and which keys apply to which link come from the link kinds
(:mod:`tcpmuxd.sockmux.linkkinds`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..common.addresses import Endpoint, is_host_name, parse_endpoint
from ..common.dropins import (
    SUFFIX,
    ConfigError,
    DropInError,
    KeySpec,
    Settings,
    bounded,
    did_you_mean,
    existing_file,
    find_drop_in,
    format_timespan,
    parse_absolute_path,
    parse_bool,
    parse_count,
    parse_exec,
    parse_size,
    parse_timeout,
    parse_timespan,
    read_drop_in,
    read_settings,
    show_path,
)
from ..common.words import counted
from .frames import MAX_FRAME_SIZE, MIN_FRAME_SIZE
from .negotiation import RESUME_BUFFER_RANGE
from .linkkinds import BY_NAME, KINDS, RECEPTOR, REDIAL, LinkKind, kinds_where
from .tls import TLSSettings

__all__ = [
    "SEARCH_PATH",
    "KEYS",
    "Entrance",
    "Exit",
    "TLSSettings",
    "Tunnel",
    "TunnelConfigError",
    "build_tunnel",
    "load_tunnel",
    "parse_entrance",
    "parse_exit",
    "read_secret",
]

#: Highest precedence first, as systemd orders /etc, /run, /usr/local/lib, /usr/lib.
SEARCH_PATH: tuple[Path, ...] = (
    Path("/etc/tcpmuxd/sockmux.d"),
    Path("/run/tcpmuxd/sockmux.d"),
    Path("/usr/local/lib/tcpmuxd/sockmux.d"),
    Path("/usr/lib/tcpmuxd/sockmux.d"),
)
SECTION = "Tunnel"

AUTHENTICATION = ("secret", "none")
#: A bare ``Entrance=PORT`` listens here only: forwarding a port to another host must not
#: quietly open it to the network.
LOOPBACK = ("127.0.0.1", "::1")

DEFAULT_MAX_STREAMS = 1024
DEFAULT_KEEPALIVE = 30.0
DEFAULT_DEAD_PEER = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RECONNECT_MAX = 30.0
#: Per-stream window. Measured with bench/tunnel.py on loopback: 1 MiB moves one stream
#: 35-40 % faster than 256 KiB (plain 7.4 -> 10.1 Gbit/s, TLS 4.7 -> 6.6) at less CPU per
#: byte (fewer SENT frames); 2 MiB (OpenSSH's channel window) gave no more.
DEFAULT_WINDOW_SIZE = 1024 * 1024
DEFAULT_FRAME_SIZE = 65536
#: Per-stream log records per second (a token bucket of as many); the rest are summarized.
#: Well under journald's default rate limit (10000 per 30 s per service).
DEFAULT_STREAM_LOG_RATE = 100
#: A peer that leaves this side's control frames (answers to its own) unread is cut after
#: this long without reading them (reading it paused meanwhile; see session.py, Memory).
DEFAULT_SEND_TIMEOUT = 30.0
#: A link must be up (HELLO exchange, options, authentication: a few round trips) this long
#: after it connected; junk or a half frame from a stranger holds a slot no longer.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Receptor: links being set up at once (TLS handshakes included); more are reset at accept.
DEFAULT_MAX_PENDING_LINKS = 8
MAX_PENDING_LINKS_LIMIT = 1024
#: Receptor: the longest a failed link from an address is held before its reset (the delay
#: doubles from 1 s with each failure in a row; see admission.py).
DEFAULT_FAILURE_DELAY = 60.0
#: HoldSec=: how long an entrance connection waits, unread, for a link that is down: covers a
#: reconnect after a peer restart and the first connection of a socket-activated tunnel.
DEFAULT_HOLD = 3.0
#: FirstDataWaitSec= and ReplyWaitSec=: the measurements behind them are at
#: session.FIRST_DATA_WAIT and session.REPLY_WAIT (the Hub's defaults, the same values).
DEFAULT_FIRST_DATA_WAIT = 0.001
DEFAULT_REPLY_WAIT = 0.05
#: ResumeTimeoutSec=: how long a lost link's streams wait for a new link (resumption, between
#: authenticated sockmuxd peers; docs/sockmux-protocol.md section 12). 0 turns it off.
DEFAULT_RESUME_TIMEOUT = 60.0
RESUME_TIMEOUT_LIMIT = 86400.0
#: ResumeBuffer=: the frames kept for resending, per session (SockMuxConfig.resume_buffer).
DEFAULT_RESUME_BUFFER = 16 << 20
STREAM_LOG_RATE_LIMIT = 1_000_000
# The protocol layer's limits (SockMuxConfig): stream ids are 16 bit with two reserved.
MAX_STREAMS_LIMIT = 0xFFFF - 2
WINDOW_SIZE_RANGE = (4096, 1 << 30)
#: HMAC-SHA256 keys shorter than this are guessable; SockMuxConfig refuses them too.
MIN_SECRET_LENGTH = 16
#: A secret is a line of random characters; a bigger file is the wrong file.
MAX_SECRET_SIZE = 4096
#: systemd's FileDescriptorName=: printable ASCII without ":" (sd_notify's FDNAME= separator).
_FD_NAME = re.compile(r"[!-9;-~]{1,255}")
_TUNNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9:_.-]*")


class TunnelConfigError(Exception):
    """The tunnel cannot be run as configured: ``message`` says why, ``errors`` has every
    problem found in the file as ``path:line: message`` (empty for "not found" or "masked")."""

    def __init__(self, message: str, errors: Iterable[ConfigError] = ()) -> None:
        self.message = message
        self.errors: tuple[ConfigError, ...] = tuple(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join([self.message, *(str(e) for e in self.errors)])


# --------------------------------------------------------------------------- entrances, exits


@dataclass(frozen=True)
class Entrance:
    """A local port whose accepted connections are forwarded to the peer (DeleGate's PORT=).

    ``host`` is ``None`` for a bare ``PORT``: listen on :data:`LOOPBACK` only. ``fd_name`` is
    set instead of a port for ``fd:NAME``, a listening socket systemd passes with
    ``FileDescriptorName=NAME``; its port is whatever that socket is bound to.
    """

    port: int | None = None
    host: str | None = None
    fd_name: str | None = None

    @property
    def hosts(self) -> tuple[str, ...]:
        """The addresses to listen on (none for ``fd:NAME``: the socket exists already)."""
        if self.fd_name is not None:
            return ()
        return LOOPBACK if self.host is None else (self.host,)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(Endpoint(host=host, port=self.port) for host in self.hosts)

    def overlaps(self, other: Entrance) -> bool:
        """Whether the two would fight over one socket (the second bind would fail, or the
        same passed socket would be served twice)."""
        if self.fd_name is not None or other.fd_name is not None:
            return self.fd_name == other.fd_name
        if self.port != other.port:
            return False
        mine, theirs = set(self.hosts), set(other.hosts)
        return bool(mine & theirs) or bool((mine | theirs) & {"0.0.0.0", "::"})

    def __str__(self) -> str:
        if self.fd_name is not None:
            return f"fd:{self.fd_name}"
        if self.host is None:
            return str(self.port)
        return str(Endpoint(host=self.host, port=self.port))


def _parse_port(text: str) -> int:
    """A port number 1-65535, with the messages every other address in the project uses."""
    port = parse_endpoint(text, default_host="::").port
    assert port is not None
    return port


def parse_entrance(text: str) -> Entrance:
    """``PORT`` (loopback only), ``HOST:PORT``, ``[V6]:PORT`` or ``fd:NAME``."""
    text = text.strip()
    if text.startswith("fd:"):
        name = text[3:]
        if not _FD_NAME.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a file descriptor name "
                "(1-255 printable ASCII characters, no ':' or spaces)"
            )
        return Entrance(fd_name=name)
    if text.startswith("unix:"):
        raise ValueError(f"entrances are TCP ports, not unix sockets: {text!r}")
    if text.isascii() and text.isdigit():
        return Entrance(port=_parse_port(text))
    if text.startswith(":"):
        raise ValueError(f"write {text[1:]!r} for the loopback addresses, or give a HOST")
    endpoint = parse_endpoint(text, allow_unix=False)
    return Entrance(port=endpoint.port, host=endpoint.host)


@dataclass(frozen=True)
class Exit:
    """Where this side connects a stream that arrives from the peer.

    ``kind`` is ``"tcp"`` or ``"unix"`` (``endpoint``), ``"exec"`` (``argv``: a program with
    the stream on stdin/stdout) or ``"tcpmux"`` (tcpmuxd's dispatcher reads a service name from
    the stream and serves it). ``entrance_port`` limits it to streams that entered the peer at
    that port (DeleGate's ``-in:-:-Pxxxx``); ``None`` is the default exit.
    """

    kind: str
    endpoint: Endpoint | None = None
    argv: tuple[str, ...] | None = None
    entrance_port: int | None = None

    @cached_property
    def target(self) -> str:
        """The target as written in the file (without the entrance port). Cached: every
        stream to this exit asks for it (its log record, CONNECTED's text)."""
        if self.kind == "tcpmux":
            return "tcpmux"
        if self.kind == "exec":
            assert self.argv is not None
            return "exec:" + shlex.join(self.argv)
        return str(self.endpoint)

    def __str__(self) -> str:
        prefix = "" if self.entrance_port is None else f"{self.entrance_port}="
        return prefix + self.target


_PORT_PREFIX = re.compile(r"([^:=\s]*)=")


def parse_exit(text: str) -> Exit:
    """``[ENTRANCEPORT=]TARGET`` with TARGET ``HOST:PORT``, ``unix:PATH``, ``exec:ARGV...`` or
    ``tcpmux``. An exec program must be an absolute path to an executable; it is checked now."""
    text = text.strip()
    port = None
    prefix = _PORT_PREFIX.match(text)
    if prefix and not text.startswith(("exec:", "unix:")):
        word = prefix.group(1)
        if not (word.isascii() and word.isdigit()):
            raise ValueError(f"{word!r} is not an entrance port number (PORT=TARGET)")
        port = _parse_port(word)
        text = text[prefix.end() :]
    if not text:
        raise ValueError("missing target (HOST:PORT, unix:PATH, exec:COMMAND or tcpmux)")
    if text == "tcpmux":
        return Exit("tcpmux", entrance_port=port)
    if text.startswith("exec:"):
        return Exit("exec", argv=parse_exec(text[len("exec:") :]), entrance_port=port)
    if text.startswith("unix:"):
        return Exit("unix", endpoint=parse_endpoint(text), entrance_port=port)
    if "://" in text:
        raise ValueError(f"write the target as HOST:PORT, not as a URL: {text!r}")
    if ":" not in text and not text.startswith("/") and did_you_mean(text, ["tcpmux", "exec"]):
        raise ValueError(f"unknown exit {text!r}{did_you_mean(text, ['tcpmux', 'exec'])}")
    return Exit("tcp", endpoint=parse_endpoint(text, allow_unix=False), entrance_port=port)


# --------------------------------------------------------------------------- secret, TLS


def read_secret(path: Path | str) -> bytes:
    """The shared secret in ``path``: its bytes, one trailing newline (LF or CRLF) removed.

    Refused like ssh refuses a private key: a file that group or others may read or write
    (anyone who can read it can impersonate either peer), or one owned by another user than
    root or the one reading it (its owner could replace it). Also refused: not a regular file,
    empty, shorter than 16 bytes, larger than 4 KiB. Raises :class:`ValueError` whose message
    starts with the path.
    """
    shown = show_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise ValueError(f"{shown}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{shown}: not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ValueError(
                f"{shown}: permissions {mode:04o} are too open, the secret must not be "
                f"accessible by group or others (chmod 600 {shown})"
            )
        if st.st_uid not in (0, os.geteuid()):
            raise ValueError(
                f"{shown}: owned by uid {st.st_uid}, must be owned by root "
                "or by the user sockmuxd runs as"
            )
        with os.fdopen(os.dup(fd), "rb") as stream:
            data = stream.read(MAX_SECRET_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_SIZE:
        raise ValueError(f"{shown}: too large for a secret (the limit is {MAX_SECRET_SIZE} bytes)")
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ValueError(f"{shown}: the secret is empty")
    if len(data) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"{shown}: the secret is {len(data)} bytes, at least {MIN_SECRET_LENGTH} are needed"
        )
    return data



def _parse_pem_file(text: str) -> Path:
    return Path(existing_file(parse_absolute_path(text)))


def _parse_server_name(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not is_host_name(text):
        raise ValueError(f"{text!r} is not a host name or IP address")
    return text


# --------------------------------------------------------------------------- the tunnel


@dataclass(frozen=True)
class Tunnel:
    """One validated tunnel (the keys are documented in sockmuxd.conf(5)).

    ``link`` names its kind (:attr:`kind`, one of :data:`~tcpmuxd.sockmux.linkkinds.KINDS`),
    whose value is in the link fields: ``address`` (accept, connect), ``fifo_in`` and
    ``fifo_out`` (fifo), ``device`` (device), ``command`` (command), none for stdio.
    The secret is never shown by ``repr()``: tunnels end up in logs and tracebacks.
    """

    name: str
    link: str
    source: Path | None = None  # None: built from command-line flags
    overrides: tuple[Path, ...] = ()  # lower files of the same name that this one replaces
    address: Endpoint | None = None
    fifo_in: str | None = None
    fifo_out: str | None = None
    device: str | None = None
    command: tuple[str, ...] | None = None
    tls: TLSSettings | None = None
    secret: bytes | None = field(default=None, repr=False)
    secret_path: Path | None = None
    require_auth: bool = True
    extensions: bool = True
    entrances: tuple[Entrance, ...] = ()
    exits: Mapping[int | None, Exit] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    max_streams: int = DEFAULT_MAX_STREAMS
    keepalive_interval: float = DEFAULT_KEEPALIVE
    dead_peer_timeout: float = DEFAULT_DEAD_PEER
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    reconnect_max: float = DEFAULT_RECONNECT_MAX
    stream_window: int = DEFAULT_WINDOW_SIZE
    max_frame_size: int = DEFAULT_FRAME_SIZE
    stream_log_rate: int = DEFAULT_STREAM_LOG_RATE
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_pending_links: int = DEFAULT_MAX_PENDING_LINKS
    failure_delay: float = DEFAULT_FAILURE_DELAY
    hold: float = DEFAULT_HOLD
    first_data_wait: float = DEFAULT_FIRST_DATA_WAIT
    reply_wait: float = DEFAULT_REPLY_WAIT
    resume_timeout: float = DEFAULT_RESUME_TIMEOUT
    resume_buffer: int = DEFAULT_RESUME_BUFFER
    description: str = ""

    @property
    def kind(self) -> LinkKind:
        return BY_NAME[self.link]

    @property
    def role(self) -> str:
        """``"receptor"`` (waits for the peer), ``"connector"`` (dials, re-dials) or
        ``"pipe"`` (neither listens nor dials: FIFOs, a device, stdio, a command)."""
        return self.kind.role

    @property
    def link_target(self) -> str:
        """The link as written after its key."""
        return self.kind.target(self)

    def exit_for(self, entrance_port: int | None) -> Exit | None:
        """The exit for a stream that entered the peer at ``entrance_port`` (``None``: the
        peer did not say): the exit for that port, else the default, else ``None`` (refuse)."""
        if entrance_port is not None and entrance_port in self.exits:
            return self.exits[entrance_port]
        return self.exits.get(None)


# --------------------------------------------------------------------------- the keys


def _parse_choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(
                f"{text!r} is not one of {', '.join(choices)}{did_you_mean(text, choices)}"
            )
        return text

    return parse


def _one(parse: Callable[[str], Any]) -> Callable[[str], tuple[Any]]:
    """A list key's parser: the parsed value as a 1-tuple, so assignments concatenate."""
    return lambda text: (parse(text),)


def _parse_secret(text: str) -> tuple[Path, bytes]:
    return Path(parse_absolute_path(text)), read_secret(text)


# Which keys apply to which links, from what the kinds are.
_TLS_LINKS = kinds_where(lambda kind: kind.tls is not None)
_TLS_CLIENTS = kinds_where(lambda kind: kind.tls == "client")
_REDIALED = kinds_where(lambda kind: kind.upkeep is REDIAL)
_RECEPTORS = kinds_where(lambda kind: kind.upkeep is RECEPTOR)

#: Every key of a tunnel file: its parser, and the links it applies to (None: all).
KEYS: Mapping[str, KeySpec] = MappingProxyType({
    "Description": KeySpec(str),
    **{kind.key: KeySpec(kind.parse) for kind in KINDS},
    "TLS": KeySpec(parse_bool, _TLS_LINKS),
    "TLSCertificate": KeySpec(_parse_pem_file, _TLS_LINKS),
    "TLSKey": KeySpec(_parse_pem_file, _TLS_LINKS),
    "TLSCA": KeySpec(_parse_pem_file, _TLS_LINKS),
    "TLSServerName": KeySpec(_parse_server_name, _TLS_CLIENTS),
    "TLSRequirePeerCertificate": KeySpec(parse_bool, _TLS_LINKS),
    "Secret": KeySpec(_parse_secret),
    "Authentication": KeySpec(_parse_choice(AUTHENTICATION)),
    "Extensions": KeySpec(parse_bool),
    "Entrance": KeySpec(_one(parse_entrance), is_list=True),
    "Exit": KeySpec(_one(parse_exit), is_list=True),
    "MaxStreams": KeySpec(bounded(parse_count, 1, MAX_STREAMS_LIMIT)),
    "KeepAliveSec": KeySpec(parse_timeout),
    "DeadPeerSec": KeySpec(parse_timeout),
    "ConnectTimeoutSec": KeySpec(parse_timeout),
    "ReconnectMaxSec": KeySpec(parse_timeout, _REDIALED),
    "WindowSize": KeySpec(bounded(parse_size, *WINDOW_SIZE_RANGE)),
    "FrameSize": KeySpec(bounded(parse_size, MIN_FRAME_SIZE, MAX_FRAME_SIZE)),
    "StreamLogRate": KeySpec(bounded(parse_count, 0, STREAM_LOG_RATE_LIMIT)),
    "SendTimeoutSec": KeySpec(parse_timeout),
    "HandshakeTimeoutSec": KeySpec(parse_timeout),
    "MaxPendingLinks": KeySpec(bounded(parse_count, 1, MAX_PENDING_LINKS_LIMIT), _RECEPTORS),
    "FailureDelaySec": KeySpec(parse_timespan, _RECEPTORS),
    "HoldSec": KeySpec(parse_timespan),
    "FirstDataWaitSec": KeySpec(parse_timespan),
    "ReplyWaitSec": KeySpec(parse_timespan),
    "ResumeTimeoutSec": KeySpec(bounded(parse_timespan, 0, RESUME_TIMEOUT_LIMIT)),
    "ResumeBuffer": KeySpec(bounded(parse_size, *RESUME_BUFFER_RANGE)),
})
_TLS_DETAIL_KEYS = (
    "TLSCertificate",
    "TLSKey",
    "TLSCA",
    "TLSServerName",
    "TLSRequirePeerCertificate",
)
#: Tunnel fields set straight from a key (or its default): the rest are checked together.
_PLAIN_FIELDS: Mapping[str, tuple[str, Any]] = MappingProxyType({
    "max_streams": ("MaxStreams", DEFAULT_MAX_STREAMS),
    "connect_timeout": ("ConnectTimeoutSec", DEFAULT_CONNECT_TIMEOUT),
    "reconnect_max": ("ReconnectMaxSec", DEFAULT_RECONNECT_MAX),
    "stream_window": ("WindowSize", DEFAULT_WINDOW_SIZE),
    "max_frame_size": ("FrameSize", DEFAULT_FRAME_SIZE),
    "stream_log_rate": ("StreamLogRate", DEFAULT_STREAM_LOG_RATE),
    "send_timeout": ("SendTimeoutSec", DEFAULT_SEND_TIMEOUT),
    "handshake_timeout": ("HandshakeTimeoutSec", DEFAULT_HANDSHAKE_TIMEOUT),
    "max_pending_links": ("MaxPendingLinks", DEFAULT_MAX_PENDING_LINKS),
    "failure_delay": ("FailureDelaySec", DEFAULT_FAILURE_DELAY),
    "hold": ("HoldSec", DEFAULT_HOLD),
    "first_data_wait": ("FirstDataWaitSec", DEFAULT_FIRST_DATA_WAIT),
    "reply_wait": ("ReplyWaitSec", DEFAULT_REPLY_WAIT),
    "resume_timeout": ("ResumeTimeoutSec", DEFAULT_RESUME_TIMEOUT),
    "resume_buffer": ("ResumeBuffer", DEFAULT_RESUME_BUFFER),
    "extensions": ("Extensions", True),
    "description": ("Description", ""),
})


def _tunnel_name_problem(name: str) -> str | None:
    if not name:
        return "the name is empty"
    if len(name) > 250:
        return f"the name is {len(name)} characters long, the limit is 250"
    if not _TUNNEL_NAME.fullmatch(name):
        return (
            "names are letters, digits and ':', '_', '.', '-' (as in a systemd unit name), "
            "starting with a letter or digit"
        )
    return None


# --------------------------------------------------------------------------- checks across keys
#
# Each takes the Settings of a file or of the command line and reports through s.error(),
# naming keys with s.spell() and earlier assignments with s.at(), so that the messages read
# right in both.


def _select_link(s: Settings) -> LinkKind | None:
    values = s.values
    for kind in KINDS:
        if kind.key in values and not kind.present(values[kind.key]):
            del values[kind.key]  # Stdio=no: this key gives no link
    keys = [s.spell(kind.key) for kind in KINDS]
    one_of = ", ".join(keys[:-1]) + " or " + keys[-1]
    switched = [s.spell(kind.key, kind.switch) if kind.switch else s.spell(kind.key)
                for kind in KINDS]
    name = s.select_kind(
        {kind.key: kind.name for kind in KINDS},
        conflict=f"a tunnel has exactly one link: {one_of}",
        missing="no link: set one of " + ", ".join(switched[:-1]) + " or " + switched[-1],
        plural="tunnels",
    )
    return None if name is None else BY_NAME[name]


def _check_tls(s: Settings, kind: LinkKind) -> TLSSettings | None:
    values = s.values
    if not values.get("TLS", False):
        for key in _TLS_DETAIL_KEYS:
            kinds = KEYS[key].kinds
            if key in values and (kinds is None or kind.name in kinds):
                s.error(s.lines[key], f"{s.spell(key)} has no effect without "
                                      f"{s.spell('TLS', 'yes')}")
        return None
    cert, private_key = values.get("TLSCertificate"), values.get("TLSKey")
    ca = values.get("TLSCA")
    if kind.tls == "server" and (cert is None or private_key is None):
        if not s.failed & {"TLSCertificate", "TLSKey"}:
            s.error(
                s.lines["TLS"],
                f"{s.spell('TLS', 'yes')} on an {s.spell(kind.key)} tunnel needs "
                f"{s.spell('TLSCertificate')} and {s.spell('TLSKey')} "
                "(this side's certificate and its private key)",
            )
    elif (cert is None) != (private_key is None):
        have, need = (("TLSCertificate", "TLSKey") if private_key is None
                      else ("TLSKey", "TLSCertificate"))
        if need not in s.failed:
            s.error(s.lines[have], f"{s.spell(have)} needs {s.spell(need)} too "
                                   "(a certificate and its key)")
    require = values.get("TLSRequirePeerCertificate")
    if require is None:
        require = ca is not None if kind.tls == "server" else True
    elif require and kind.tls == "server" and ca is None and "TLSCA" not in s.failed:
        s.error(
            s.lines["TLSRequirePeerCertificate"],
            f"{s.spell('TLSRequirePeerCertificate', 'yes')} needs {s.spell('TLSCA')} (the CA "
            "that signs the peers' certificates) to check them against",
        )
    elif not require and kind.tls == "client" and ca is not None:
        s.error(
            s.lines["TLSRequirePeerCertificate"],
            f"{s.spell('TLSRequirePeerCertificate', 'no')} with {s.spell('TLSCA')} on a "
            f"{s.spell(kind.key)} tunnel: the server's certificate would not be checked "
            "against the CA; remove one of the two",
        )
    server_name = values.get("TLSServerName") or kind.server_name(values.get(kind.key))
    return TLSSettings(cert, private_key, ca, server_name, require)


def _check_auth(s: Settings, secret_file: str) -> dict[str, Any]:
    """``require_auth``, ``secret`` and ``secret_path``; ``secret_file`` is the file the
    message about a missing secret suggests."""
    values = s.values
    secret = values.get("Secret")
    if values.get("Authentication", "secret") == "none":
        if secret is not None:
            s.error(s.lines["Secret"], f"{s.spell('Secret')} is not used with "
                                       f"{s.spell('Authentication', 'none')}: remove one of the two")
        return {"require_auth": False}
    if not values.get("Extensions", True):
        s.error(
            s.lines["Extensions"],
            f"{s.spell('Extensions', 'no')} speaks plain DeleGate SockMux, which cannot "
            f"authenticate: set {s.spell('Authentication', 'none')} too, knowingly (anyone who "
            "reaches the link can use it)",
        )
    elif secret is None and "Secret" not in s.failed and s.section_line is not None:
        s.error(
            s.line("Authentication") or s.section_line,
            f"{s.spell('Authentication', 'secret')} (the default) needs "
            f"{s.spell('Secret', 'FILE')}, the same secret on both peers: create it with "
            f"'umask 077; head -c 32 /dev/urandom | base64 > {secret_file}' and copy it to "
            f"the peer; for a DeleGate peer in plain mode set {s.spell('Authentication', 'none')} "
            "instead",
        )
    if secret is None:
        return {"require_auth": True}
    return {"require_auth": True, "secret_path": secret[0], "secret": secret[1]}


def _check_entrances(s: Settings) -> tuple[Entrance, ...]:
    seen: list[tuple[int, Entrance]] = []
    for line, (entrance,) in s.items.get("Entrance", []):
        for other_line, other in seen:
            if entrance.overlaps(other):
                what = (
                    f"is given twice (first{s.at(other_line)})"
                    if entrance == other
                    else f"overlaps {s.spell('Entrance', str(other))}{s.at(other_line)}"
                )
                s.error(line, f"{s.spell('Entrance', str(entrance))} {what}")
                break
        else:
            seen.append((line, entrance))
    return tuple(entrance for _, entrance in seen)


def _check_exits(s: Settings) -> dict[int | None, Exit]:
    exits: dict[int | None, Exit] = {}
    where: dict[int | None, int] = {}
    for line, (exit_,) in s.items.get("Exit", []):
        port = exit_.entrance_port
        if port in exits:
            if port is None:
                s.error(
                    line,
                    f"a second default {s.spell('Exit')} (the first is{s.at(where[port])}): "
                    "give the others an ENTRANCEPORT= prefix",
                )
            else:
                s.error(line, f"entrance port {port} already has an "
                              f"{s.spell('Exit')}{s.at(where[port])}")
            continue
        exits[port], where[port] = exit_, line
    return exits


def _check_carries_something(s: Settings) -> None:
    if s.section_line is not None and not (
        "Entrance" in s.values or "Exit" in s.values or s.failed & {"Entrance", "Exit"}
    ):
        entrance, exit_ = s.spell("Entrance"), s.spell("Exit")
        s.error(
            s.section_line,
            f"the tunnel has neither {entrance} nor {exit_}, so it would carry nothing: add "
            f"an {entrance} (a local port forwarded to the peer) or an {exit_} (where the "
            "peer's streams go)",
        )


def _check_keepalive(s: Settings) -> dict[str, float]:
    keepalive = s.values.get("KeepAliveSec", DEFAULT_KEEPALIVE)
    dead_peer = s.values.get("DeadPeerSec", DEFAULT_DEAD_PEER)
    if dead_peer <= keepalive:
        s.error(
            s.line("DeadPeerSec") or s.line("KeepAliveSec"),
            f"{s.spell('DeadPeerSec')} ({format_timespan(dead_peer)}) must be longer than "
            f"{s.spell('KeepAliveSec')} ({format_timespan(keepalive)}), or a quiet but "
            "healthy link is declared dead before a keep-alive could show it is alive",
        )
    return {"keepalive_interval": keepalive, "dead_peer_timeout": dead_peer}


def build_tunnel(s: Settings, name: str | None, *, secret_file: str,
                 source: Path | None = None, overrides: tuple[Path, ...] = ()) -> Tunnel:
    """The tunnel the settings of a file or of the command line describe, every rule across
    keys checked here; ``name`` None: the link's label (flags without ``--name``).

    Raises :class:`TunnelConfigError` with every problem (the settings' own, from reading each
    value, and these), in line order.
    """
    kind = _select_link(s)
    fields: dict[str, Any] = {}
    if kind is not None and kind.tls is not None:
        fields["tls"] = _check_tls(s, kind)
    fields.update(_check_auth(s, secret_file))
    fields["entrances"] = _check_entrances(s)
    fields["exits"] = MappingProxyType(_check_exits(s))
    _check_carries_something(s)
    fields.update(_check_keepalive(s))
    if s.errors or kind is None:
        raise TunnelConfigError(
            f"tunnel {name or 'on the command line'}: {counted(len(s.errors), 'error')}"
            f" in {show_path(s.path)}", s.sorted_errors())
    fields.update(kind.fields(s.values[kind.key]))
    for attribute, (key, default) in _PLAIN_FIELDS.items():
        fields[attribute] = s.values.get(key, default)
    tunnel = Tunnel(name=name or "", link=kind.name, source=source, overrides=overrides,
                    **fields)
    return tunnel if name else dataclasses.replace(tunnel, name=kind.label(tunnel))


def load_tunnel(name: str, search_path: Iterable[Path | str] = SEARCH_PATH) -> Tunnel:
    """Find ``NAME.conf`` on ``search_path`` (highest precedence first), read and validate it.

    Raises :class:`TunnelConfigError` when the name is not a valid tunnel name, no directory
    has the file, the winning file masks it, a directory above the file cannot be searched,
    or the file has any error (all of them are in ``errors``, in line order).
    """
    problem = _tunnel_name_problem(name)
    if problem:
        raise TunnelConfigError(f"invalid tunnel name {name!r}: {problem}")
    found = find_drop_in(name + SUFFIX, search_path)
    if found.errors:
        raise TunnelConfigError(
            f"tunnel {name}: cannot search every directory, one of them may override or mask "
            f"{found.filename}",
            found.errors,
        )
    if found.path is None:
        raise TunnelConfigError(
            f"tunnel {name} not found: no {found.filename} in "
            + ", ".join(show_path(d) for d in found.searched)
        )
    try:
        text = read_drop_in(found.path)
    except DropInError as exc:
        raise TunnelConfigError(f"tunnel {name}: cannot use {show_path(found.path)}", [exc.error])
    if text is None:
        raise TunnelConfigError(f"tunnel {name} is masked by {show_path(found.path)}")
    s = read_settings(found.path, text, section=SECTION, keys=KEYS, what="a tunnel file")
    return build_tunnel(s, name, secret_file=f"/etc/tcpmuxd/sockmux.d/{name}.secret",
                        source=found.path, overrides=found.shadowed)
