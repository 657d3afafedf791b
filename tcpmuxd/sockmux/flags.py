"""sockmuxd's command line: the tunnel flags, which are tunnel-file keys spelled for the shell,
and DeleGate's own parameters, which are translated into them.

Every tunnel flag assigns one key of sockmuxd.conf(5) (``--connect HOST:PORT`` is
``Connect=HOST:PORT``, ``--no-auth`` is ``Authentication=none``; the link flags come from the
link kinds, :mod:`tcpmuxd.sockmux.linkkinds`). :func:`tunnel_from_args` reads them into
:class:`FlagSettings`, the same :class:`~tcpmuxd.common.dropins.Settings` a file gives, and
:func:`tcpmuxd.sockmux.tunnel.build_tunnel` validates them as it validates a file: one set of
rules, and ``--check`` shows what the flags mean in the file's terms. What is particular to
the command line is only the spelling: a relative path is taken from the working directory,
``--command`` looks its program up in PATH, ``--fifo`` takes ``IN,OUT``, the ``--tls-*``
flags imply ``--tls``, and messages name the flags.

``--hold``, ``--first-data-wait`` and ``--reply-wait`` go with a tunnel file too: they replace
its ``HoldSec=``, ``FirstDataWaitSec=`` and ``ReplyWaitSec=`` (:func:`apply_overrides`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.dropins import Assignment, Settings
from .linkkinds import KINDS
from .tunnel import (
    DEFAULT_FAILURE_DELAY,
    DEFAULT_MAX_PENDING_LINKS,
    DEFAULT_MAX_STREAMS,
    DEFAULT_STREAM_LOG_RATE,
    KEYS,
    MAX_PENDING_LINKS_LIMIT,
    MAX_STREAMS_LIMIT,
    SECTION,
    STREAM_LOG_RATE_LIMIT,
    Tunnel,
    TunnelConfigError,
    build_tunnel,
)

__all__ = ["UsageError", "add_tunnel_flags", "add_override_flags", "given", "tunnel_from_args",
           "apply_overrides", "translate_delegate"]


class UsageError(Exception):
    """Bad command line: each argument printed as ``sockmuxd: error: ...``, exit status 2."""


def _abspath(text: str) -> str:
    """A path from the command line: relative to the working directory, ``~`` expanded."""
    return os.path.abspath(os.path.expanduser(text))


@dataclass(frozen=True)
class Flag:
    """One tunnel flag: ``--NAME`` assigns ``KEY=`` its argument (``convert``-ed: relative
    paths made absolute...), or, for a switch (``metavar`` None), the value ``switch``.
    ``otherwise`` is how messages name the key's default when only a switch sets it.
    """

    name: str
    key: str
    group: str
    help: str
    metavar: str | None = None
    switch: str | None = None
    convert: Callable[[str], str] = str
    repeat: bool = False
    otherwise: str | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


LINK = "link (exactly one, without NAME)"
STREAMS = "streams"
SECURITY = "security"
LIMITS = "limits and timing"

#: The tunnel flags, in --help's order (and the order they count as given in).
FLAGS: tuple[Flag, ...] = (
    *(Flag(kind.flag, kind.key, LINK, kind.help, kind.metavar, kind.switch, kind.from_flag)
      for kind in KINDS),
    Flag("entrance", "Entrance", STREAMS,
         "forward connections accepted here to the peer (repeatable; PORT alone listens on "
         "127.0.0.1 and ::1 only; fd:NAME is a socket passed by systemd with "
         "FileDescriptorName=NAME)", "[HOST:]PORT", repeat=True),
    Flag("exit", "Exit", STREAMS,
         "where streams from the peer go: HOST:PORT, unix:PATH, exec:/PROGRAM ARGS... or "
         "tcpmux; with PORT=, only streams that entered the peer at PORT (repeatable)",
         "[PORT=]TARGET", repeat=True),
    Flag("secret", "Secret", SECURITY,
         "shared secret (at least 16 bytes, mode 0600) for mutual authentication; the peer "
         "needs the same", "FILE", convert=_abspath),
    Flag("no-auth", "Authentication", SECURITY,
         "no authentication: anyone who reaches the link can use this side's exits (for a "
         "DeleGate peer; a warning is logged)", switch="none", otherwise="authentication"),
    Flag("no-extensions", "Extensions", SECURITY,
         "speak plain DeleGate SockMux only (needs --no-auth)", switch="no"),
    Flag("tls", "TLS", SECURITY,
         "TLS on a --accept/--connect link (implied by the other --tls-* flags)", switch="yes"),
    Flag("tls-cert", "TLSCertificate", SECURITY, "this side's certificate (PEM)", "FILE",
         convert=_abspath),
    Flag("tls-key", "TLSKey", SECURITY, "this side's private key (PEM)", "FILE",
         convert=_abspath),
    Flag("tls-ca", "TLSCA", SECURITY,
         "CA certificates for the peer's certificate (a receptor then requires client "
         "certificates)", "FILE", convert=_abspath),
    Flag("tls-server-name", "TLSServerName", SECURITY,
         "the name the receptor's certificate must carry (default: the --connect host)",
         "NAME"),
    Flag("tls-no-verify", "TLSRequirePeerCertificate", SECURITY,
         "do not verify the peer's certificate (connector) or require one (receptor)",
         switch="no"),
    Flag("max-streams", "MaxStreams", LIMITS,
         f"concurrent streams, both directions, 1 to {MAX_STREAMS_LIMIT} (default "
         f"{DEFAULT_MAX_STREAMS})", "N"),
    Flag("keepalive", "KeepAliveSec", LIMITS,
         "send a keep-alive after this long without traffic (default 30s)", "TIME"),
    Flag("dead-peer", "DeadPeerSec", LIMITS,
         "drop the link after this long without traffic (default 60s)", "TIME"),
    Flag("connect-timeout", "ConnectTimeoutSec", LIMITS,
         "for the link and for TCP/unix exits (default 10s)", "TIME"),
    Flag("reconnect-max", "ReconnectMaxSec", LIMITS,
         "longest wait between two attempts to re-establish the link (default 30s)", "TIME"),
    Flag("window", "WindowSize", LIMITS, "per-stream receive window (default 1M)", "SIZE"),
    Flag("frame-size", "FrameSize", LIMITS,
         "largest frame, header included (default 65536)", "SIZE"),
    Flag("stream-log-rate", "StreamLogRate", LIMITS,
         f"at most N per-stream log records per second, 0 to {STREAM_LOG_RATE_LIMIT}; streams "
         f"beyond are counted in a summary record (default {DEFAULT_STREAM_LOG_RATE}; 0: "
         "summaries only)", "N"),
    Flag("send-timeout", "SendTimeoutSec", LIMITS,
         "a peer that leaves over 1 MiB of this side's control frames (answers to its own: "
         "ECHOOK, CLOSED, SENT...) unread is no longer read, and the link is reset when it "
         "has not read them within TIME (default 30s)", "TIME"),
    Flag("handshake-timeout", "HandshakeTimeoutSec", LIMITS,
         "a link must be up (handshake and authentication done) this long after it "
         "connected, else it is reset (default 10s)", "TIME"),
    Flag("max-pending-links", "MaxPendingLinks", LIMITS,
         f"--accept: links being set up at once, TLS handshakes included, 1 to "
         f"{MAX_PENDING_LINKS_LIMIT}; more are reset when accepted (default "
         f"{DEFAULT_MAX_PENDING_LINKS})", "N"),
    Flag("resume-timeout", "ResumeTimeoutSec", LIMITS,
         "between authenticated sockmuxd peers: a lost link's streams wait this long for a new "
         "link to carry them on, byte-exact (default 60s; 0: off, they are reset at once; up "
         "to 1d)", "TIME"),
    Flag("resume-buffer", "ResumeBuffer", LIMITS,
         "with --resume-timeout: frames kept for resending until the peer confirms them, per "
         "link; stream data waits above it (default 16M, 64K to 1G)", "SIZE"),
    Flag("failure-delay", "FailureDelaySec", LIMITS,
         "--accept: hold a link that failed before it was up (authentication, handshake "
         "deadline, protocol error) before the reset: 1s after its address's first failure, "
         f"doubling up to TIME (default {DEFAULT_FAILURE_DELAY:g}s; 0: reset at once); a "
         "DeleGate that cannot authenticate then re-dials once per delay instead of at once",
         "TIME"),
)
#: Flags that also go with NAME, replacing the file's key: (flag, key, Tunnel field, help).
OVERRIDES: tuple[tuple[str, str, str, str], ...] = (
    ("hold", "HoldSec", "hold",
     "an entrance connection that arrives while the link is down waits this long for it, "
     "then is reset (default 3s; 0: reset at once; HoldSec=)"),
    ("first-data-wait", "FirstDataWaitSec", "first_data_wait",
     "open a stream once the client's first bytes are there (they ride along, saving a round "
     "trip), or after this long (default 1ms; 0: at once; FirstDataWaitSec=)"),
    ("reply-wait", "ReplyWaitSec", "reply_wait",
     "with a peer that has no half-close (DeleGate): how long a server's answer may take to "
     "start, to ride in CONNECTED, and how long a client's EOF waits for the server to go "
     "quiet (default 50ms; 0: no wait; ReplyWaitSec=)"),
)
_BY_KEY: dict[str, list[Flag]] = {}
for _flag in FLAGS:
    _BY_KEY.setdefault(_flag.key, []).append(_flag)


# ------------------------------------------------------------------------ flags as settings


@dataclass
class FlagSettings(Settings):
    """The tunnel flags as the Settings of a tunnel file, each flag an assignment whose
    "line" is its place on the command line; messages name the flags, not the keys."""

    origins: dict[int, str] = field(default_factory=dict)  # line -> "--exit 8080=h:80"

    def spell(self, key: str, value: str | None = None) -> str:
        flags = _BY_KEY.get(key, [])
        for flag in flags:
            if value is None or flag.switch == value:
                return f"--{flag.name}"
            if flag.metavar is not None:
                return f"--{flag.name} {value}"
        for flag in flags:
            if flag.otherwise is not None:
                return flag.otherwise
        return super().spell(key, value)

    def at(self, line: int) -> str:
        return " given earlier"

    def label(self, key: str, line: int) -> str:
        return self.origins[line]


def _assignments(args: argparse.Namespace) -> Iterable[tuple[Flag, str]]:
    """Every tunnel flag given, with its argument (a switch's value), in FLAGS order."""
    tls_implied = bool(args.tls)
    for flag in FLAGS:
        value = getattr(args, flag.dest)
        if flag.switch is not None:
            texts = [flag.switch] if value else []
        elif flag.repeat:
            texts = value
        else:
            texts = [] if value is None else [value]
        yield from ((flag, text) for text in texts)
        if texts and flag.key.startswith("TLS") and not tls_implied:
            tls_implied = True  # the other --tls-* flags imply --tls
            yield next(f for f in FLAGS if f.key == "TLS"), "yes"


def flag_settings(args: argparse.Namespace) -> FlagSettings:
    """The tunnel flags of ``args`` read into settings, each value parsed by its key."""
    s = FlagSettings(Path("the command line"), SECTION, 0, KEYS)
    assignments = []
    for line, (flag, text) in enumerate(_assignments(args), start=1):
        s.origins[line] = f"--{flag.name} {text}" if flag.repeat else f"--{flag.name}"
        try:
            value = flag.convert(text) if text else text
        except ValueError as exc:
            s.error(line, f"{s.origins[line]}: {exc}")
            s.failed.add(flag.key)
            continue
        assignments.append(Assignment(SECTION, flag.key, value, line))
    s.apply(assignments)
    return s


def tunnel_from_args(args: argparse.Namespace) -> Tunnel:
    """The tunnel the flags describe, validated as a tunnel file is; UsageError with every
    problem otherwise."""
    if not given(args):
        kinds = [f"--{kind.flag}" for kind in KINDS]
        raise UsageError("no tunnel: give NAME (a sockmux.d/NAME.conf) or a link: "
                         + ", ".join(kinds[:-1]) + " or " + kinds[-1])
    try:
        return build_tunnel(flag_settings(args), args.tunnel_name, secret_file="FILE")
    except TunnelConfigError as exc:
        raise UsageError(*(e.message for e in exc.errors)) from None


def given(args: argparse.Namespace) -> list[str]:
    """The tunnel flags given on the command line (as --flag names)."""
    names = [f"--{f.name}" for f in FLAGS
             if getattr(args, f.dest) not in (None, False, [])]
    return names + (["--name"] if args.tunnel_name is not None else [])


def apply_overrides(tunnel: Tunnel, args: argparse.Namespace) -> Tunnel:
    """``--hold``, ``--first-data-wait`` and ``--reply-wait``, when given, over the tunnel's
    HoldSec=, FirstDataWaitSec= and ReplyWaitSec=."""
    changes = {field_: getattr(args, field_) for _flag, _key, field_, _help in OVERRIDES
               if getattr(args, field_) is not None}
    return dataclasses.replace(tunnel, **changes) if changes else tunnel


# ------------------------------------------------------------------------ argparse


def add_tunnel_flags(parser: argparse.ArgumentParser) -> None:
    """The tunnel flags, in their groups, and ``--name``."""
    groups: dict[str, Any] = {}
    for flag in FLAGS:
        group = groups.get(flag.group) or groups.setdefault(
            flag.group, parser.add_argument_group(flag.group))
        if flag.switch is not None:
            group.add_argument(f"--{flag.name}", action="store_true", help=flag.help)
        else:
            group.add_argument(f"--{flag.name}", metavar=flag.metavar, help=flag.help,
                               action="append" if flag.repeat else "store",
                               default=[] if flag.repeat else None)
    groups[LIMITS].add_argument("--name", dest="tunnel_name", metavar="LABEL",
                                help="the tunnel's name in logs (default: the link)")


def _key_type(key: str) -> Callable[[str], Any]:
    """argparse's type for a flag that takes a key's value: the key's own parser."""
    parse = KEYS[key].parse

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def add_override_flags(group: Any) -> None:
    """``--hold``, ``--first-data-wait``, ``--reply-wait``: with NAME or with the flags."""
    for name, key, field_, help_ in OVERRIDES:
        group.add_argument(f"--{name}", dest=field_, metavar="TIME", type=_key_type(key),
                           help=help_)


# ------------------------------------------------------------------------ DeleGate spelling

#: Default ports of DeleGate's protocol names in SERVER=proto://host,-in.
_DELEGATE_PORTS = {
    "tcp": None, "tcprelay": None, "telnet": 23, "ftp": 21, "smtp": 25, "http": 80,
    "https": 443, "pop": 110, "pop3": 110, "imap": 143, "nntp": 119, "ssh": 22, "ldap": 389,
    "socks": 1080, "whois": 43, "finger": 79, "gopher": 70,
}
_DELEGATE_PARAM = re.compile(r"[A-Z][A-Z0-9_]*=")


def _delegate_exit(value: str) -> str:
    """``URL,-in[:-:-PPORT]`` -> ``[PORT=]HOST:PORT`` for --exit."""
    target, _, mods = value.partition(",")
    if not mods.startswith("-in"):
        raise UsageError(f"SERVER={value}: sockmuxd understands SERVER=sockmux://HOST:PORT, "
                         "SERVER=sockmux:comm...@PATH and SERVER=URL,-in[:-:-PPORT]")
    rest = mods[3:]
    if rest.startswith("("):
        raise UsageError(f"SERVER={value}: -in(...) starts a DeleGate proxy, which sockmuxd "
                         "does not have; name the server (HOST:PORT) instead")
    entrance = ""
    if rest:
        match = re.fullmatch(r":-:-P(?:[^:]*:)?(\d+)", rest)
        if not match:
            raise UsageError(f"SERVER={value}: expected ,-in or ,-in:-:-PPORT after the server")
        entrance = match.group(1) + "="
    proto, sep, hostport = target.partition("://")
    if not sep:
        proto, hostport = "tcp", target
    proto = proto.lower()
    if proto not in _DELEGATE_PORTS:
        raise UsageError(f"SERVER={value}: protocol {proto!r} is not supported (sockmuxd "
                         "forwards plain TCP: tcp://HOST:PORT, or HOST:PORT)")
    hostport = hostport.rstrip("/")
    if not re.search(r":\d+$", hostport):
        port = _DELEGATE_PORTS[proto]
        if port is None:
            raise UsageError(f"SERVER={value}: give the port (HOST:PORT)")
        hostport = f"{hostport}:{port}"
    return entrance + hostport


def _delegate_ports(value: str) -> list[str]:
    """``PORT=8080,8081,9000-9002,host:7000`` -> --entrance values."""
    result = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        prefix = f"{host}:" if sep else ""
        low, dash, high = port.partition("-")
        if dash and low.isdigit() and high.isdigit() and int(low) <= int(high):
            if int(high) - int(low) > 1000:
                raise UsageError(f"PORT={value}: the range {port} is too large")
            result += [f"{prefix}{p}" for p in range(int(low), int(high) + 1)]
        else:
            result.append(item)
    return result


def translate_delegate(argv: Sequence[str]) -> list[str]:
    """DeleGate's parameters, as far as SockMux goes, turned into sockmuxd flags.

    ``-Phost:port`` (``-Pport``: every address) -> ``--accept``;
    ``SERVER=sockmux://host:port`` -> ``--connect``; ``SERVER=sockmux:commin@IN`` with
    ``SERVER=sockmux:commout@OUT`` -> ``--fifo IN,OUT``; ``SERVER=sockmux:comm@DEV`` ->
    ``--comm``; ``PORT=LIST`` -> ``--entrance`` each; ``SERVER=URL,-in[:-:-PPORT]`` ->
    ``--exit [PORT=]HOST:PORT``. Everything else is left alone; an unknown ``NAME=value``
    parameter is an error.
    """
    out: list[str] = []
    fifo_in = fifo_out = None
    for arg in argv:
        if arg.startswith("-P") and len(arg) > 2 and not arg.startswith("--"):
            spec = arg[2:]
            if spec.isdigit():
                spec = f"0.0.0.0:{spec}"
            out += ["--accept", spec]
        elif arg.startswith("SERVER="):
            value = arg[len("SERVER="):]
            low = value.lower()
            if low.startswith("sockmux://"):
                out += ["--connect", value[len("sockmux://"):].rstrip("/")]
            elif low.startswith("sockmux:"):
                kind, at, path = value[len("sockmux:"):].partition("@")
                if not at or not path:
                    raise UsageError(f"{arg}: expected sockmux:commin@PATH, "
                                     "sockmux:commout@PATH or sockmux:comm@PATH")
                if kind == "commin":
                    fifo_in = path
                elif kind == "commout":
                    fifo_out = path
                elif kind == "comm":
                    out += ["--comm", path]
                else:
                    raise UsageError(f"{arg}: unknown link type {kind!r} (commin, commout, comm)")
            else:
                out += ["--exit", _delegate_exit(value)]
        elif arg.startswith("PORT="):
            for entrance in _delegate_ports(arg[len("PORT="):]):
                out += ["--entrance", entrance]
        elif _DELEGATE_PARAM.match(arg):
            name = arg.split("=", 1)[0]
            raise UsageError(f"DeleGate parameter {name}= is not supported by sockmuxd "
                             "(it takes -P, SERVER= and PORT=; see sockmuxd(8))")
        else:
            out.append(arg)
    if (fifo_in is None) != (fifo_out is None):
        raise UsageError("SERVER=sockmux:commin@PATH and SERVER=sockmux:commout@PATH go "
                         "together (a FIFO to read and one to write)")
    if fifo_in is not None:
        out += ["--fifo", f"{fifo_in},{fifo_out}"]
    return out
