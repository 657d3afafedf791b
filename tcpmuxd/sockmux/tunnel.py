"""Tunnel files: ``sockmux.d/NAME.conf``, one SockMux tunnel per file (sockmuxd.conf(5)).

``sockmuxd NAME`` (the unit ``sockmuxd@NAME.service``) runs the tunnel of ``NAME.conf``, found
along :data:`SEARCH_PATH` with the rules tcpmuxd's ``conf.d`` follows (they share
:mod:`tcpmuxd.common.dropins`): the highest file of that name wins whole, an empty file or a symlink
to ``/dev/null`` masks it. The file has one ``[Tunnel]`` section with systemd-style keys.

Unlike tcpmuxd, which serves every good file and reports the bad ones, a tunnel is all or
nothing: :func:`load_tunnel` returns a complete :class:`Tunnel` or raises
:class:`TunnelConfigError` carrying every problem with file and line. A tunnel with half its
settings would be worse than none: it might run without the authentication or TLS the admin
wrote down. For the same reason a directory above the file that cannot be searched is an error
(it may hold an override or a mask), and the secret is read and its permissions checked when
the file is loaded, not when the first peer shows up.

What the protocol layer enforces (:class:`tcpmuxd.sockmux.SockMuxConfig`) is checked here too,
with the key and line, so that ``sockmuxd --check`` finds what the daemon would refuse.
:func:`parse_entrance`, :func:`parse_exit` and :func:`read_secret` are public because the
command-line flags ``--entrance``, ``--exit`` and ``--secret`` mean the same as the keys.
"""

from __future__ import annotations

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
    split_words,
)
from .frames import MAX_FRAME_SIZE, MIN_FRAME_SIZE
from .tls import TLSSettings

__all__ = [
    "SEARCH_PATH",
    "Entrance",
    "Exit",
    "TLSSettings",
    "Tunnel",
    "TunnelConfigError",
    "format_tunnel",
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

#: The link kinds and their keys, in the order the messages list them.
LINK_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "Accept": "accept",
        "Connect": "connect",
        "FIFO": "fifo",
        "Device": "device",
        "Stdio": "stdio",
        "Command": "command",
    }
)
LINKS = tuple(LINK_KEYS.values())
TCP_LINKS = ("accept", "connect")
#: Links sockmuxd establishes again when they are lost, with a backoff up to ReconnectMaxSec=
#: (a receptor just waits for the peer; stdio is there once).
REDIALED_LINKS = ("connect", "command", "fifo", "device")
EXIT_KINDS = ("tcp", "unix", "exec", "tcpmux")
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


def _overlap(a: Entrance, b: Entrance) -> bool:
    """:meth:`Entrance.overlaps` (kept for callers written against the first version)."""
    return a.overlaps(b)


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
    path = parse_absolute_path(text)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    return Path(path)


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

    ``link`` is one of :data:`LINKS`; its fields: ``address`` (accept, connect), ``fifo_in``
    and ``fifo_out`` (fifo), ``device`` (device), ``command`` (command), none for stdio.
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
    description: str = ""

    @property
    def role(self) -> str:
        """``"receptor"`` (waits for the peer), ``"connector"`` (dials, re-dials) or
        ``"pipe"`` (neither listens nor dials: FIFOs, a device, stdio, a command)."""
        return {"accept": "receptor", "connect": "connector"}.get(self.link, "pipe")

    @property
    def link_target(self) -> str:
        """The link as written after its key."""
        if self.link in TCP_LINKS:
            return str(self.address)
        if self.link == "fifo":
            return f"{self.fifo_in} {self.fifo_out}"
        if self.link == "device":
            return str(self.device)
        if self.link == "command":
            assert self.command is not None
            return shlex.join(self.command)
        return "yes"

    def exit_for(self, entrance_port: int | None) -> Exit | None:
        """The exit for a stream that entered the peer at ``entrance_port`` (``None``: the
        peer did not say): the exit for that port, else the default, else ``None`` (refuse)."""
        if entrance_port is not None and entrance_port in self.exits:
            return self.exits[entrance_port]
        return self.exits.get(None)


def _parse_accept(text: str) -> Endpoint:
    if text.isascii() and text.isdigit():
        raise ValueError(
            f"give the address to listen on too: [::]:{text} or 0.0.0.0:{text} for every "
            f"address, or one address such as 192.0.2.1:{text}"
        )
    return parse_endpoint(text, allow_unix=False)


def _parse_fifo(text: str) -> tuple[str, str]:
    words = split_words(text)
    if len(words) != 2:
        raise ValueError(
            f"expected two paths, the FIFO to read and the FIFO to write, got {len(words)}"
        )
    inbound, outbound = (parse_absolute_path(word) for word in words)
    if inbound == outbound:
        raise ValueError(f"both FIFOs are {inbound}: for one bidirectional device use Device=")
    return inbound, outbound


def _parse_choice(choices: Sequence[str]) -> KeySpec:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(
                f"{text!r} is not one of {', '.join(choices)}{did_you_mean(text, choices)}"
            )
        return text

    return KeySpec(parse)


def _one(parse: Callable[[str], Any]) -> Callable[[str], tuple[Any]]:
    """A list key's parser: the parsed value as a 1-tuple, so assignments concatenate."""
    return lambda text: (parse(text),)


_TCP = TCP_LINKS
_KEYS: dict[str, KeySpec] = {
    "Description": KeySpec(str),
    "Accept": KeySpec(_parse_accept),
    "Connect": KeySpec(lambda text: parse_endpoint(text, allow_unix=False)),
    "FIFO": KeySpec(_parse_fifo),
    "Device": KeySpec(parse_absolute_path),
    "Stdio": KeySpec(parse_bool),
    "Command": KeySpec(parse_exec),
    "TLS": KeySpec(parse_bool, _TCP),
    "TLSCertificate": KeySpec(_parse_pem_file, _TCP),
    "TLSKey": KeySpec(_parse_pem_file, _TCP),
    "TLSCA": KeySpec(_parse_pem_file, _TCP),
    "TLSServerName": KeySpec(_parse_server_name, ("connect",)),
    "TLSRequirePeerCertificate": KeySpec(parse_bool, _TCP),
    "Secret": KeySpec(lambda text: (Path(parse_absolute_path(text)), read_secret(text))),
    "Authentication": _parse_choice(AUTHENTICATION),
    "Extensions": KeySpec(parse_bool),
    "Entrance": KeySpec(_one(parse_entrance), is_list=True),
    "Exit": KeySpec(_one(parse_exit), is_list=True),
    "MaxStreams": KeySpec(bounded(parse_count, 1, MAX_STREAMS_LIMIT)),
    "KeepAliveSec": KeySpec(parse_timeout),
    "DeadPeerSec": KeySpec(parse_timeout),
    "ConnectTimeoutSec": KeySpec(parse_timeout),
    "ReconnectMaxSec": KeySpec(parse_timeout, REDIALED_LINKS),
    "WindowSize": KeySpec(bounded(parse_size, *WINDOW_SIZE_RANGE)),
    "FrameSize": KeySpec(bounded(parse_size, MIN_FRAME_SIZE, MAX_FRAME_SIZE)),
    "StreamLogRate": KeySpec(bounded(parse_count, 0, STREAM_LOG_RATE_LIMIT)),
    "SendTimeoutSec": KeySpec(parse_timeout),
    "HandshakeTimeoutSec": KeySpec(parse_timeout),
    "MaxPendingLinks": KeySpec(bounded(parse_count, 1, MAX_PENDING_LINKS_LIMIT), ("accept",)),
    "FailureDelaySec": KeySpec(parse_timespan, ("accept",)),
}
_TLS_DETAIL_KEYS = (
    "TLSCertificate",
    "TLSKey",
    "TLSCA",
    "TLSServerName",
    "TLSRequirePeerCertificate",
)


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


def _check_tls(s: Settings, link: str) -> TLSSettings | None:
    values = s.values
    if not values.get("TLS", False):
        for key in _TLS_DETAIL_KEYS:
            kinds = _KEYS[key].kinds
            if key in values and (kinds is None or link in kinds):
                s.error(s.lines[key], f"{key}= has no effect without TLS=yes")
        return None
    cert, key = values.get("TLSCertificate"), values.get("TLSKey")
    ca = values.get("TLSCA")
    if link == "accept" and (cert is None or key is None):
        if not s.failed & {"TLSCertificate", "TLSKey"}:
            s.error(
                s.lines["TLS"],
                "TLS=yes on an Accept= tunnel needs TLSCertificate= and TLSKey= "
                "(this side's certificate and its private key)",
            )
    elif (cert is None) != (key is None):
        have, need = ("TLSCertificate", "TLSKey")
        if cert is None:
            have, need = need, have
        if need not in s.failed:
            s.error(s.lines[have], f"{have}= needs {need}= too (a certificate and its key)")
    require = values.get("TLSRequirePeerCertificate")
    if require is None:
        require = ca is not None if link == "accept" else True
    elif require and link == "accept" and ca is None and "TLSCA" not in s.failed:
        s.error(
            s.lines["TLSRequirePeerCertificate"],
            "TLSRequirePeerCertificate=yes needs TLSCA= (the CA that signs the peers' "
            "certificates) to check them against",
        )
    elif not require and link == "connect" and ca is not None:
        s.error(
            s.lines["TLSRequirePeerCertificate"],
            "TLSRequirePeerCertificate=no with TLSCA= on a Connect= tunnel: the server's "
            "certificate would not be checked against the CA; remove one of the two",
        )
    server_name = values.get("TLSServerName")
    if server_name is None and link == "connect":
        server_name = values["Connect"].host
    return TLSSettings(cert, key, ca, server_name, require)


def _check_auth(s: Settings, name: str) -> tuple[bool, Path | None, bytes | None]:
    values = s.values
    auth = values.get("Authentication", "secret")
    extensions = values.get("Extensions", True)
    secret = values.get("Secret")
    if auth == "none":
        if secret is not None:
            s.error(
                s.lines["Secret"],
                "Secret= is not used with Authentication=none: remove one of the two",
            )
        return False, None, None
    if not extensions:
        s.error(
            s.lines["Extensions"],
            "Extensions=no speaks plain DeleGate SockMux, which cannot authenticate: "
            "set Authentication=none too, knowingly (anyone who reaches the link can use it)",
        )
    elif secret is None and "Secret" not in s.failed and s.section_line is not None:
        s.error(
            s.line("Authentication") or s.section_line,
            "Authentication=secret (the default) needs Secret=FILE, the same secret on both "
            "peers: create it with 'umask 077; head -c 32 /dev/urandom | base64 > "
            f"/etc/tcpmuxd/sockmux.d/{name}.secret' and copy it to the peer; "
            "for a DeleGate peer in plain mode set Authentication=none instead",
        )
    if secret is None:
        return True, None, None
    return True, secret[0], secret[1]


def _check_entrances(s: Settings) -> tuple[Entrance, ...]:
    seen: list[tuple[int, Entrance]] = []
    for line, (entrance,) in s.items.get("Entrance", []):
        for other_line, other in seen:
            if entrance.overlaps(other):
                what = (
                    f"is given twice (first on line {other_line})"
                    if entrance == other
                    else f"overlaps Entrance={other} on line {other_line}"
                )
                s.error(line, f"Entrance={entrance} {what}")
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
                    f"a second default Exit= (the first is on line {where[port]}): "
                    "give the others an ENTRANCEPORT= prefix",
                )
            else:
                s.error(line, f"entrance port {port} already has an Exit= on line {where[port]}")
            continue
        exits[port], where[port] = exit_, line
    return exits


def _parse_tunnel(name: str, path: Path, text: str, overrides: tuple[Path, ...]) -> Tunnel:
    s = read_settings(path, text, section=SECTION, keys=_KEYS, what="a tunnel file")
    values = s.values
    if values.get("Stdio") is False:  # Stdio=no: this key gives no link
        del values["Stdio"]
    link = s.select_kind(
        LINK_KEYS,
        conflict="a tunnel has exactly one link: Accept=, Connect=, FIFO=, Device=, Stdio= "
        "or Command=",
        missing="no link: set one of Accept=, Connect=, FIFO=, Device=, Stdio=yes or Command=",
        plural="tunnels",
    )
    tls = _check_tls(s, link) if link in TCP_LINKS else None
    require_auth, secret_path, secret = _check_auth(s, name)
    entrances = _check_entrances(s)
    exits = _check_exits(s)
    if s.section_line is not None and not (
        "Entrance" in values or "Exit" in values or s.failed & {"Entrance", "Exit"}
    ):
        s.error(
            s.section_line,
            "the tunnel has neither Entrance= nor Exit=, so it would carry nothing: add an "
            "Entrance= (a local port forwarded to the peer) or an Exit= (where the peer's "
            "streams go)",
        )
    keepalive = values.get("KeepAliveSec", DEFAULT_KEEPALIVE)
    dead_peer = values.get("DeadPeerSec", DEFAULT_DEAD_PEER)
    if dead_peer <= keepalive:
        s.error(
            s.line("DeadPeerSec") or s.line("KeepAliveSec"),
            f"DeadPeerSec= ({format_timespan(dead_peer)}) must be longer than KeepAliveSec= "
            f"({format_timespan(keepalive)}), or a quiet but healthy link is declared dead "
            "before a keep-alive could show it is alive",
        )
    if s.errors or link is None:
        raise TunnelConfigError(
            f"tunnel {name}: {_count(len(s.errors))} in {show_path(path)}", s.sorted_errors()
        )
    fifo = values.get("FIFO", (None, None))
    return Tunnel(
        name=name,
        link=link,
        source=path,
        overrides=overrides,
        address=values.get("Accept") or values.get("Connect"),
        fifo_in=fifo[0],
        fifo_out=fifo[1],
        device=values.get("Device"),
        command=values.get("Command"),
        tls=tls,
        secret=secret,
        secret_path=secret_path,
        require_auth=require_auth,
        extensions=values.get("Extensions", True),
        entrances=entrances,
        exits=MappingProxyType(exits),
        max_streams=values.get("MaxStreams", DEFAULT_MAX_STREAMS),
        keepalive_interval=keepalive,
        dead_peer_timeout=dead_peer,
        connect_timeout=values.get("ConnectTimeoutSec", DEFAULT_CONNECT_TIMEOUT),
        reconnect_max=values.get("ReconnectMaxSec", DEFAULT_RECONNECT_MAX),
        stream_window=values.get("WindowSize", DEFAULT_WINDOW_SIZE),
        max_frame_size=values.get("FrameSize", DEFAULT_FRAME_SIZE),
        stream_log_rate=values.get("StreamLogRate", DEFAULT_STREAM_LOG_RATE),
        send_timeout=values.get("SendTimeoutSec", DEFAULT_SEND_TIMEOUT),
        handshake_timeout=values.get("HandshakeTimeoutSec", DEFAULT_HANDSHAKE_TIMEOUT),
        max_pending_links=values.get("MaxPendingLinks", DEFAULT_MAX_PENDING_LINKS),
        failure_delay=values.get("FailureDelaySec", DEFAULT_FAILURE_DELAY),
        description=values.get("Description", ""),
    )


def _count(n: int) -> str:
    return "1 error" if n == 1 else f"{n} errors"


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
    return _parse_tunnel(name, found.path, text, found.shadowed)


# --------------------------------------------------------------------------- --check


def _size(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n} ({n // size}{unit})"
    return str(n)


def _describe_exit(exit_: Exit) -> str:
    if exit_.kind == "tcpmux":
        return "tcpmux (tcpmuxd's dispatcher: the stream names a TCPMUX service)"
    return f"{exit_.kind} {exit_.target.removeprefix('exec:')}"


def format_tunnel(t: Tunnel) -> str:
    """What ``sockmuxd --check`` prints: every setting as it will be used, defaults resolved.

    The secret itself is never printed, only where it comes from and its length.
    """
    rows: list[tuple[str, str]] = [("Tunnel", t.name)]
    if t.source is not None:
        rows.append(("File", show_path(t.source)))
    rows += [("Overrides", show_path(p)) for p in t.overrides]
    if t.description:
        rows.append(("Description", t.description))
    role = {
        "receptor": "receptor, the peer connects here",
        "connector": "connector, re-dials with backoff",
    }.get(t.role, "")
    key = next((k for k, v in LINK_KEYS.items() if v == t.link), t.link)
    rows.append(("Link", f"{key}={t.link_target}" + (f" ({role})" if role else "")))
    if t.link in TCP_LINKS:
        if t.tls is None:
            rows.append(("TLS", "no"))
        else:
            parts = []
            if t.tls.certificate is not None:
                parts.append(f"certificate {show_path(t.tls.certificate)}")
            if t.tls.key is not None:
                parts.append(f"key {show_path(t.tls.key)}")
            parts.append(f"CA {show_path(t.tls.ca)}" if t.tls.ca else "system CAs")
            if t.link == "connect":
                parts.append(f"server name {t.tls.server_name}")
            if t.tls.require_peer_certificate:
                parts.append("peer certificate verified")
            else:
                parts.append("peer certificate NOT verified")
            rows.append(("TLS", "yes: " + ", ".join(parts)))
    if t.require_auth:
        if t.secret_path is not None and t.secret is not None:
            auth = f"secret from {show_path(t.secret_path)} ({len(t.secret)} bytes)"
        else:
            auth = "secret (given elsewhere)" if t.secret else "secret, MISSING"
    else:
        auth = "none: the peer is not authenticated"
    rows.append(("Authentication", auth))
    rows.append(("Extensions", "yes" if t.extensions else "no: plain DeleGate SockMux only"))
    for entrance in t.entrances:
        if entrance.fd_name is not None:
            shown = f"{entrance} (socket from systemd, FileDescriptorName={entrance.fd_name})"
        elif entrance.host is None:
            shown = f"{entrance} (" + " and ".join(str(e) for e in entrance.endpoints) + ")"
        else:
            shown = str(entrance)
        rows.append(("Entrance", shown))
    if not t.entrances:
        rows.append(("Entrance", "none: nothing is forwarded to the peer"))
    ordered = sorted(t.exits.items(), key=lambda item: (item[0] is None, item[0] or 0))
    for port, exit_ in ordered:
        rows.append(("Exit", f"{'default' if port is None else port} -> {_describe_exit(exit_)}"))
    if not t.exits:
        rows.append(("Exit", "none: streams from the peer are refused"))
    elif None not in t.exits:
        rows.append(("Exit", "default -> none: streams from other entrance ports are refused"))
    rows += [
        ("MaxStreams", f"{t.max_streams}" + ("" if t.extensions else " (a plain peer: fewer)")),
        ("KeepAliveSec", format_timespan(t.keepalive_interval)),
        ("DeadPeerSec", format_timespan(t.dead_peer_timeout)),
        ("ConnectTimeoutSec", format_timespan(t.connect_timeout)),
    ]
    if t.link in REDIALED_LINKS:
        rows.append(("ReconnectMaxSec", format_timespan(t.reconnect_max)))
    rows += [("WindowSize", _size(t.stream_window)), ("FrameSize", _size(t.max_frame_size)),
             ("StreamLogRate", f"{t.stream_log_rate}/s" + (
                 " (no per-stream records, summaries only)" if not t.stream_log_rate else "")),
             ("SendTimeoutSec", format_timespan(t.send_timeout)),
             ("HandshakeTimeoutSec", format_timespan(t.handshake_timeout))]
    if t.link == "accept":
        rows += [("MaxPendingLinks", str(t.max_pending_links)),
                 ("FailureDelaySec", format_timespan(t.failure_delay) if t.failure_delay
                  else "0 (failed links are reset at once)")]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
