"""``sockmuxd``: the SockMux tunnel daemon (sockmuxd(8)).

``sockmuxd NAME`` runs the tunnel of ``NAME.conf`` from the sockmux.d search path
(sockmuxd.conf(5)); flags build a tunnel without a file; DeleGate's own parameters
(``-Phost:port``, ``SERVER=sockmux://host:port``, ``PORT=8080``, ``SERVER=host:port,-in`` ...)
are translated into the flags. The work is done by :class:`~tcpmuxd.sockmux.session.Hub`
(streams, links) and :class:`~tcpmuxd.sockmux.exits.ExitOpener` (exits); this module builds
them, opens the entrances, keeps the link up in the tunnel's role, and talks to systemd:

* ``Type=notify``: ``READY=1`` once the link is up (authenticated) the first time, or, so that
  neither boot nor ``systemctl start`` waits forever for a peer that is away, once
  ``--ready-timeout`` has passed without a link (logged; ``0`` waits for the link however
  long it takes). ``STATUS=`` with the link state, streams and bytes (at most once a second,
  and every few seconds while bytes move); ``STOPPING=1`` on SIGTERM/SIGINT.
* ``WATCHDOG=1`` from the same timer that runs the links' keep-alive ticks, so a stuck event
  loop stops both and systemd restarts the daemon.
* Logs through :class:`tcpmuxd.common.systemd.EventLog`: journal fields when stderr is the journal,
  one line on stderr otherwise. One record per stream, one per link event.

Roles: a connector (``Connect=``) dials and re-dials forever with
:class:`~tcpmuxd.sockmux.links.Backoff` (capped by ``ReconnectMaxSec=``, reset after a link
that stayed up); FIFO, device and command links are re-opened the same way; a receptor
(``Accept=``) listens, and a newer link from the peer replaces the old one once it has
authenticated; a stdio link is used once and the daemon exits when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Sequence

from .. import __version__
from ..common import systemd
from ..common.addresses import Endpoint, parse_endpoint
from ..common.dropins import parse_size, parse_timespan
from . import tunnel as tconfig
from . import links, native, pipelink, tls
from .tunnel import Entrance, Exit, Tunnel, TunnelConfigError
from .connection import SockMuxConfig
from .exits import ExitOpener
from .frames import MAX_FRAME_SIZE, MIN_FRAME_SIZE
from .session import ENTRANCE_BACKLOG, FIRST_DATA_WAIT, REPLY_WAIT, Hub, Session

__all__ = ["main", "build_parser", "translate_delegate", "tunnel_from_args", "run"]

PROG = "sockmuxd"
#: STATUS= is refreshed at most this often on changes, and this often while bytes move.
STATUS_MIN_INTERVAL = 1.0
STATUS_REFRESH = 5.0
#: How often links tick when systemd asks for no watchdog (their own timers run anyway).
TICK_INTERVAL = 5.0
#: Default for --ready-timeout: READY=1 at the latest after this long (TimeoutStartSec=90s).
DEFAULT_READY_TIMEOUT = 60.0
#: How long shutdown waits for the links to close (and a command link's process to exit).
SHUTDOWN_TIMEOUT = 6.0

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: The tunnel's configuration is wrong (EX_CONFIG): the unit does not restart on it.
EXIT_CONFIG = 78
#: Default for --hold: how long an entrance connection waits for a link that is down.
DEFAULT_HOLD = 3.0


class UsageError(Exception):
    """Bad command line: printed as ``sockmuxd: error: ...``, exit status 2."""


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


# ------------------------------------------------------------------------ the command line


def _timespan(text: str) -> float:
    try:
        value = parse_timespan(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be greater than zero")
    return value


def _ready_timeout(text: str) -> float:
    if text.strip() in ("0", "infinity"):
        return 0.0
    return _timespan(text)


def _zero_or_timespan(text: str) -> float:
    return 0.0 if text.strip() == "0" else _timespan(text)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= tconfig.MAX_STREAMS_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a number of streams from 1 to {tconfig.MAX_STREAMS_LIMIT}")
    return int(text)


def _pending_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= tconfig.MAX_PENDING_LINKS_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a number of links from 1 to {tconfig.MAX_PENDING_LINKS_LIMIT}")
    return int(text)


def _log_rate(text: str) -> int:
    if not text.isdigit() or int(text) > tconfig.STREAM_LOG_RATE_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text!r}: records per second from 0 to {tconfig.STREAM_LOG_RATE_LIMIT}")
    return int(text)


LINK_FLAGS = ("accept", "connect", "fifo", "comm", "stdio", "command")
TUNNEL_FLAGS = LINK_FLAGS + (
    "entrance", "exit", "secret", "no_auth", "no_extensions", "tls", "tls_cert", "tls_key",
    "tls_ca", "tls_server_name", "tls_no_verify", "max_streams", "keepalive", "dead_peer",
    "connect_timeout", "reconnect_max", "window", "frame_size", "stream_log_rate",
    "send_timeout", "handshake_timeout", "max_pending_links", "failure_delay", "name")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s [--check] [--config-dir DIR]... NAME\n"
              "       %(prog)s [--check] LINK [--entrance [HOST:]PORT]... "
              "[--exit [PORT=]TARGET]... (--secret FILE | --no-auth) [OPTIONS]",
        description="SockMux tunnel (DeleGate-compatible): many TCP connections over one "
                    "persistent link. NAME runs the tunnel of NAME.conf (sockmuxd.conf(5)); "
                    "without NAME, the flags below describe the tunnel. DeleGate's "
                    "-Phost:port, SERVER=sockmux://host:port, SERVER=sockmux:commin@PATH / "
                    "commout@PATH / comm@PATH, PORT=LIST and SERVER=host:port,-in[:-:-PPORT] "
                    "are accepted too.",
        epilog="See sockmuxd(8) and sockmuxd.conf(5).")
    p.add_argument("name", metavar="NAME", nargs="?",
                   help="tunnel name: runs NAME.conf from the sockmux.d directories")
    p.add_argument("--config-dir", metavar="DIR", action="append", type=Path, default=[],
                   help="tunnel directory, highest precedence first (repeatable); replaces the "
                        "default search path " + ", ".join(map(str, tconfig.SEARCH_PATH)))
    p.add_argument("--check", action="store_true",
                   help="print the tunnel as it would run and exit (status 1 on any error)")

    g = p.add_argument_group("link (exactly one, without NAME)")
    g.add_argument("--accept", metavar="HOST:PORT",
                   help="be the receptor: wait for the peer on HOST:PORT ([::]:PORT for every "
                        "IPv6 and IPv4 address)")
    g.add_argument("--connect", metavar="HOST:PORT",
                   help="be the connector: dial the receptor, and re-dial whenever the link is "
                        "lost")
    g.add_argument("--fifo", metavar="IN,OUT",
                   help="read the link from FIFO IN and write it to FIFO OUT (the peer uses "
                        "OUT,IN)")
    g.add_argument("--comm", metavar="DEVICE",
                   help="read and write the link on one character device (serial line, pty)")
    g.add_argument("--stdio", action="store_true",
                   help="the link is standard input and output (ssh HOST sockmuxd --stdio); "
                        "exit when it ends")
    g.add_argument("--command", metavar="CMD",
                   help="run CMD (split like a shell would, no shell) and use its standard "
                        "input and output as the link; run it again when it ends")

    g = p.add_argument_group("streams")
    g.add_argument("--entrance", metavar="[HOST:]PORT", action="append", default=[],
                   help="forward connections accepted here to the peer (repeatable; PORT "
                        "alone listens on 127.0.0.1 and ::1 only; fd:NAME is a socket passed "
                        "by systemd with FileDescriptorName=NAME)")
    g.add_argument("--exit", metavar="[PORT=]TARGET", action="append", default=[],
                   help="where streams from the peer go: HOST:PORT, unix:PATH, "
                        "exec:/PROGRAM ARGS... or tcpmux; with PORT=, only streams that "
                        "entered the peer at PORT (repeatable)")

    g = p.add_argument_group("security")
    g.add_argument("--secret", metavar="FILE",
                   help="shared secret (at least 16 bytes, mode 0600) for mutual "
                        "authentication; the peer needs the same")
    g.add_argument("--no-auth", action="store_true",
                   help="no authentication: anyone who reaches the link can use this side's "
                        "exits (for a DeleGate peer; a warning is logged)")
    g.add_argument("--no-extensions", action="store_true",
                   help="speak plain DeleGate SockMux only (needs --no-auth)")
    g.add_argument("--tls", action="store_true",
                   help="TLS on a --accept/--connect link (implied by the other --tls-* flags)")
    g.add_argument("--tls-cert", metavar="FILE", help="this side's certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="this side's private key (PEM)")
    g.add_argument("--tls-ca", metavar="FILE",
                   help="CA certificates for the peer's certificate (a receptor then requires "
                        "client certificates)")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="the name the receptor's certificate must carry (default: the "
                        "--connect host)")
    g.add_argument("--tls-no-verify", action="store_true",
                   help="do not verify the peer's certificate (connector) or require one "
                        "(receptor)")

    g = p.add_argument_group("limits and timing")
    g.add_argument("--max-streams", metavar="N", type=_count,
                   help=f"concurrent streams, both directions (default "
                        f"{tconfig.DEFAULT_MAX_STREAMS})")
    g.add_argument("--keepalive", metavar="TIME", type=_timespan,
                   help="send a keep-alive after this long without traffic (default 30s)")
    g.add_argument("--dead-peer", metavar="TIME", type=_timespan,
                   help="drop the link after this long without traffic (default 60s)")
    g.add_argument("--connect-timeout", metavar="TIME", type=_timespan,
                   help="for the link and for TCP/unix exits (default 10s)")
    g.add_argument("--reconnect-max", metavar="TIME", type=_timespan,
                   help="longest wait between two attempts to re-establish the link "
                        "(default 30s)")
    g.add_argument("--window", metavar="SIZE", type=_size,
                   help="per-stream receive window (default 1M)")
    g.add_argument("--frame-size", metavar="SIZE", type=_size,
                   help="largest frame, header included (default 65536)")
    g.add_argument("--stream-log-rate", metavar="N", type=_log_rate,
                   help=f"at most N per-stream log records per second; streams beyond are "
                        f"counted in a summary record (default "
                        f"{tconfig.DEFAULT_STREAM_LOG_RATE}; 0: summaries only)")
    g.add_argument("--send-timeout", metavar="TIME", type=_timespan,
                   help="a peer that leaves over 1 MiB of this side's control frames (answers "
                        "to its own: ECHOOK, CLOSED, SENT...) unread is no longer read, and the "
                        "link is reset when it has not read them within TIME (default 30s)")
    g.add_argument("--handshake-timeout", metavar="TIME", type=_timespan,
                   help="a link must be up (handshake and authentication done) this long after "
                        "it connected, else it is reset (default 10s)")
    g.add_argument("--max-pending-links", metavar="N", type=_pending_count,
                   help="--accept: links being set up at once, TLS handshakes included; more "
                        "are reset when accepted (default 8)")
    g.add_argument("--failure-delay", metavar="TIME", type=_zero_or_timespan,
                   help="--accept: hold a link that failed before it was up (authentication, "
                        "handshake deadline, protocol error) before the reset: 1s after its "
                        "address's first failure, doubling up to TIME (default 60s; 0: reset "
                        "at once); a DeleGate that cannot authenticate then re-dials once per "
                        "delay instead of at once")
    g.add_argument("--name", dest="tunnel_name", metavar="LABEL",
                   help="the tunnel's name in logs (default: the link)")

    g = p.add_argument_group("daemon")
    g.add_argument("--tcpmux-config-dir", metavar="DIR", action="append", type=Path,
                   default=[],
                   help="tcpmuxd service directory for 'tcpmux' exits (repeatable; default: "
                        "tcpmuxd's conf.d search path)")
    g.add_argument("--hold", metavar="TIME", type=_zero_or_timespan, default=DEFAULT_HOLD,
                   help="an entrance connection that arrives while the link is down waits "
                        "this long for it, then is reset (default 3s; 0: reset at once)")
    g.add_argument("--first-data-wait", metavar="TIME", type=_zero_or_timespan,
                   default=FIRST_DATA_WAIT,
                   help="open a stream once the client's first bytes are there (they ride "
                        "along, saving a round trip), or after this long (default 1ms; 0: "
                        "at once)")
    g.add_argument("--reply-wait", metavar="TIME", type=_zero_or_timespan,
                   default=REPLY_WAIT,
                   help="with a peer that has no half-close (DeleGate): how long a server's "
                        "answer may take to start, to ride in CONNECTED, and how long a "
                        "client's EOF waits for the server to go quiet (default 50ms; 0: "
                        "no wait)")
    g.add_argument("--ready-timeout", metavar="TIME", type=_ready_timeout,
                   default=DEFAULT_READY_TIMEOUT,
                   help="tell systemd READY=1 after this long even without a link (default "
                        "60s; 0: only once the link is up)")
    g.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop (default auto: uvloop when installed)")
    g.add_argument("--debug", action="store_true", help="log ignored frames and exit programs")
    g.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _given(args: argparse.Namespace) -> list[str]:
    """The tunnel flags given on the command line (as --flag names)."""
    given = []
    for key in TUNNEL_FLAGS:
        dest = "tunnel_name" if key == "name" else key
        value = getattr(args, dest, None)
        if value is not None and value is not False and value != []:  # 0 is given
            given.append("--" + key.replace("_", "-"))
    return given


def _abspath(text: str) -> str:
    return os.path.abspath(os.path.expanduser(text))


def _pem(flag: str, text: str) -> Path:
    path = Path(_abspath(text))
    if not path.is_file():
        raise UsageError(f"{flag} {text}: no such file")
    return path


def tunnel_from_args(args: argparse.Namespace) -> Tunnel:
    """A :class:`Tunnel` from the flags, checked as strictly as a tunnel file."""
    links_given = [f for f in LINK_FLAGS if getattr(args, f) not in (None, False)]
    if not links_given:
        raise UsageError("no tunnel: give NAME (a sockmux.d/NAME.conf) or a link: --accept, "
                         "--connect, --fifo, --comm, --stdio or --command")
    if len(links_given) > 1:
        raise UsageError("a tunnel has exactly one link, got "
                         + " and ".join("--" + f for f in links_given))
    flag = links_given[0]
    link = "device" if flag == "comm" else flag  # Tunnel.link names the Device= key
    fields: dict[str, Any] = {}
    try:
        if link == "accept":
            spec = args.accept
            if spec.isdigit():
                raise UsageError(f"--accept {spec}: give the address too: [::]:{spec} or "
                                 f"0.0.0.0:{spec} for every address, 127.0.0.1:{spec} for "
                                 "this host only")
            fields["address"] = parse_endpoint(spec, allow_unix=False)
            label = f"accept {spec}"
        elif link == "connect":
            fields["address"] = parse_endpoint(args.connect, allow_unix=False)
            label = f"connect {args.connect}"
        elif link == "fifo":
            parts = args.fifo.split(",")
            if len(parts) != 2 or not all(parts):
                raise UsageError(f"--fifo {args.fifo}: expected IN,OUT (the FIFO to read, "
                                 "then the FIFO to write)")
            fields["fifo_in"], fields["fifo_out"] = (_abspath(x) for x in parts)
            if fields["fifo_in"] == fields["fifo_out"]:
                raise UsageError("--fifo: IN and OUT are the same file; for one bidirectional "
                                 "device use --comm")
            label = "fifo"
        elif link == "device":
            fields["device"] = _abspath(args.comm)
            label = f"comm {args.comm}"
        elif link == "command":
            try:
                argv = shlex.split(args.command)
            except ValueError as exc:
                raise UsageError(f"--command: bad quoting: {exc}") from None
            if not argv:
                raise UsageError("--command: empty command")
            program = argv[0] if "/" in argv[0] else shutil.which(argv[0])
            if program is None or not os.access(program, os.X_OK) or os.path.isdir(program):
                raise UsageError(f"--command: {argv[0]}: no such program (or not executable)")
            argv[0] = _abspath(program)
            fields["command"] = tuple(argv)
            label = f"command {argv[0]}"
        else:
            label = "stdio"
    except ValueError as exc:
        raise UsageError(f"--{flag}: {exc}") from None

    # TLS
    tls_flags = [f for f in ("tls_cert", "tls_key", "tls_ca", "tls_server_name")
                 if getattr(args, f)]
    use_tls = args.tls or bool(tls_flags) or args.tls_no_verify
    if use_tls:
        if link not in tconfig.TCP_LINKS:
            raise UsageError("TLS is for --accept and --connect links only")
        cert = _pem("--tls-cert", args.tls_cert) if args.tls_cert else None
        key = _pem("--tls-key", args.tls_key) if args.tls_key else None
        ca = _pem("--tls-ca", args.tls_ca) if args.tls_ca else None
        if link == "accept" and (cert is None or key is None):
            raise UsageError("TLS on --accept needs --tls-cert and --tls-key")
        if (cert is None) != (key is None):
            raise UsageError("--tls-cert and --tls-key go together")
        if args.tls_server_name and link != "connect":
            raise UsageError("--tls-server-name is for --connect")
        if link == "accept":
            require = ca is not None and not args.tls_no_verify
        else:
            require = not args.tls_no_verify
            if ca is not None and not require:
                raise UsageError("--tls-no-verify with --tls-ca: the CA would not be used")
        server_name = args.tls_server_name or (fields["address"].host if link == "connect"
                                               else None)
        fields["tls"] = tconfig.TLSSettings(cert, key, ca, server_name, require)

    # authentication
    if args.no_auth and args.secret:
        raise UsageError("--secret and --no-auth contradict each other: choose one")
    if args.no_extensions and not args.no_auth:
        raise UsageError("--no-extensions speaks plain DeleGate SockMux, which cannot "
                         "authenticate: add --no-auth too, knowingly")
    if args.secret:
        try:
            fields["secret"] = tconfig.read_secret(_abspath(args.secret))
        except ValueError as exc:
            raise UsageError(f"--secret: {exc}") from None
        fields["secret_path"] = Path(_abspath(args.secret))
    elif not args.no_auth:
        raise UsageError("give --secret FILE (the same secret on both peers; make one with "
                         "'umask 077; head -c 32 /dev/urandom | base64 > FILE'), or --no-auth "
                         "for a peer that cannot authenticate (DeleGate)")
    fields["require_auth"] = not args.no_auth
    fields["extensions"] = not args.no_extensions

    # entrances and exits
    entrances: list[Entrance] = []
    for text in args.entrance:
        try:
            entrance = tconfig.parse_entrance(text)
        except ValueError as exc:
            raise UsageError(f"--entrance {text}: {exc}") from None
        if any(tconfig._overlap(entrance, other) for other in entrances):
            raise UsageError(f"--entrance {text}: overlaps another --entrance")
        entrances.append(entrance)
    exits: dict[int | None, Exit] = {}
    for text in args.exit:
        try:
            exit_ = tconfig.parse_exit(text)
        except ValueError as exc:
            raise UsageError(f"--exit {text}: {exc}") from None
        if exit_.entrance_port in exits:
            which = ("a second default exit (give the others a PORT= prefix)"
                     if exit_.entrance_port is None
                     else f"entrance port {exit_.entrance_port} has an exit already")
            raise UsageError(f"--exit {text}: {which}")
        exits[exit_.entrance_port] = exit_
    if not entrances and not exits:
        raise UsageError("the tunnel would carry nothing: add --entrance (a local port "
                         "forwarded to the peer) or --exit (where the peer's streams go)")

    # limits
    keepalive = args.keepalive or tconfig.DEFAULT_KEEPALIVE
    dead_peer = args.dead_peer or tconfig.DEFAULT_DEAD_PEER
    if dead_peer <= keepalive:
        raise UsageError(f"--dead-peer ({dead_peer:g}s) must be longer than --keepalive "
                         f"({keepalive:g}s)")
    window = args.window or tconfig.DEFAULT_WINDOW_SIZE
    if not tconfig.WINDOW_SIZE_RANGE[0] <= window <= tconfig.WINDOW_SIZE_RANGE[1]:
        raise UsageError("--window: from 4K to 1G")
    frame = args.frame_size or tconfig.DEFAULT_FRAME_SIZE
    if not MIN_FRAME_SIZE <= frame <= MAX_FRAME_SIZE:
        raise UsageError(f"--frame-size: from {MIN_FRAME_SIZE} to {MAX_FRAME_SIZE}")
    if args.reconnect_max and link not in ("connect", "command", "fifo", "device"):
        raise UsageError("--reconnect-max is for links that are re-established: --connect, "
                         "--command, --fifo, --comm")
    for flag in ("max_pending_links", "failure_delay"):
        if getattr(args, flag) is not None and link != "accept":
            raise UsageError(f"--{flag.replace('_', '-')} is for a receptor (--accept): it "
                             "limits the links that come in")
    return Tunnel(
        name=args.tunnel_name or label, link=link, entrances=tuple(entrances),
        exits=MappingProxyType(exits),
        max_streams=args.max_streams or tconfig.DEFAULT_MAX_STREAMS,
        keepalive_interval=keepalive, dead_peer_timeout=dead_peer,
        connect_timeout=args.connect_timeout or tconfig.DEFAULT_CONNECT_TIMEOUT,
        reconnect_max=args.reconnect_max or tconfig.DEFAULT_RECONNECT_MAX,
        stream_window=window, max_frame_size=frame,
        stream_log_rate=(tconfig.DEFAULT_STREAM_LOG_RATE if args.stream_log_rate is None
                         else args.stream_log_rate),
        send_timeout=args.send_timeout or tconfig.DEFAULT_SEND_TIMEOUT,
        handshake_timeout=args.handshake_timeout or tconfig.DEFAULT_HANDSHAKE_TIMEOUT,
        max_pending_links=args.max_pending_links or tconfig.DEFAULT_MAX_PENDING_LINKS,
        failure_delay=(tconfig.DEFAULT_FAILURE_DELAY if args.failure_delay is None
                       else args.failure_delay), **fields)


def protocol_config(t: Tunnel) -> SockMuxConfig:
    host = re.sub(r"[^A-Za-z0-9._-]", "", socket.gethostname())[:64] or PROG
    return SockMuxConfig(
        secret=t.secret, require_auth=t.require_auth, hostname=host, extensions=t.extensions,
        max_streams=t.max_streams, plain_max_streams=min(60, t.max_streams),
        max_frame_size=t.max_frame_size, stream_window=t.stream_window,
        keepalive_interval=t.keepalive_interval, dead_peer_timeout=t.dead_peer_timeout)


def tls_context(t: Tunnel) -> ssl.SSLContext | None:
    """The link's TLS context (None without TLS); ValueError for files that do not load."""
    if t.tls is None:
        return None
    return tls.context(t.tls, server_side=t.link == "accept")


def inherited_fd(device: str | None) -> str | int:
    """``/dev/fd/N`` (or ``/proc/self/fd/N``) as the descriptor number N, so that a device
    handed down open (a pty master: re-opening its path would make a new pty) is used as it
    is; any other path as it is."""
    assert device is not None
    match = re.fullmatch(r"/(?:dev|proc/self)/fd/(\d+)", device)
    return int(match.group(1)) if match else device


# ------------------------------------------------------------------------ entrances


def open_entrances(t: Tunnel, passed: list[tuple[socket.socket, str]]
                   ) -> list[tuple[socket.socket, str]]:
    """Bind (or pick from systemd's sockets) every entrance; OSError/ValueError on failure."""
    result: list[tuple[socket.socket, str]] = []
    try:
        for entrance in t.entrances:
            if entrance.fd_name is not None:
                socks = [s for s, name in passed if name == entrance.fd_name]
                if not socks:
                    names = sorted({name for _s, name in passed})
                    raise ValueError(
                        f"entrance fd:{entrance.fd_name}: systemd passed no socket named "
                        f"{entrance.fd_name!r} (got: {', '.join(names) or 'none'}); set "
                        f"FileDescriptorName={entrance.fd_name} in the socket unit")
                result += [(s, str(entrance)) for s in socks]
                continue
            bound_any = False
            for host in entrance.hosts:
                try:
                    result += [(s, str(entrance))
                               for s in links.bind_tcp(host, entrance.port, ENTRANCE_BACKLOG)]
                    bound_any = True
                except OSError as exc:
                    # A bare PORT listens on both loopbacks; a host without IPv6 has no ::1.
                    if (entrance.host is None and host == "::1"
                            and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)):
                        continue
                    raise OSError(exc.errno, f"entrance {entrance}: cannot listen on "
                                  f"{Endpoint(host=host, port=entrance.port)}: "
                                  f"{exc.strerror}") from None
            if not bound_any:
                raise OSError(errno.EADDRNOTAVAIL, f"entrance {entrance}: no address to "
                              "listen on")
    except BaseException:
        for sock, _label in result:
            if all(sock is not s for s, _n in passed):
                sock.close()
        raise
    return result


# ------------------------------------------------------------------------ logging


class _LogBridge(logging.Handler):
    """Python logging (links.py, asyncio) into the EventLog, with syslog priorities."""

    def __init__(self, log: systemd.EventLog) -> None:
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.levelno >= logging.ERROR:
                message += ": " + (str(record.exc_info[1]) or record.exc_info[0].__name__)
            priority = (3 if record.levelno >= logging.ERROR else
                        4 if record.levelno >= logging.WARNING else
                        6 if record.levelno >= logging.INFO else 7)
            self.log.record(message, priority=priority, CODE_FUNC=record.funcName,
                            LOGGER=record.name)
        except Exception:  # pragma: no cover - logging must never raise
            pass


# ------------------------------------------------------------------------ the daemon


class Daemon:
    """One running tunnel: entrances, link role, systemd notifications."""

    def __init__(self, tunnel: Tunnel, args: argparse.Namespace,
                 environ: dict[str, str]) -> None:
        self.tunnel = tunnel
        self.args = args
        self.environ = environ
        self.loop = asyncio.get_running_loop()
        self.log = systemd.EventLog(environ, PROG)
        self.notifier = systemd.Notifier(environ)
        self.ready_sent = False
        self.stop: asyncio.Future[str] = self.loop.create_future()
        self.exit_code = EXIT_OK
        self._last_status = ""
        self.hub: Hub

    def record(self, message: str, priority: int = 6, **fields: object) -> None:
        self.log.record(message, priority=priority, SOCKMUX_TUNNEL=self.tunnel.name, **fields)

    # -- systemd ---------------------------------------------------------------------------

    def _on_ready(self, session: Session) -> None:
        if not self.ready_sent:
            self.ready_sent = True
            self.notifier.ready(self.hub.status())
            self._last_status = self.hub.status()

    def _ready_timeout(self) -> None:
        if not self.ready_sent:
            self.ready_sent = True
            self.record(f"no link after {self.args.ready_timeout:g} s: telling systemd the "
                        "service is ready anyway; still trying", priority=4)
            self.notifier.ready(self.hub.status())

    def _push_status(self) -> None:
        text = self.hub.status()
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    def _heartbeat(self, interval: float) -> None:
        """The watchdog and keep-alive path: tick every link, then WATCHDOG=1."""
        self.loop.call_later(interval, self._heartbeat, interval)
        for session in list(self.hub.sessions):
            session.tick()
        self.notifier.watchdog()

    def _status_refresh(self) -> None:
        self.loop.call_later(STATUS_REFRESH, self._status_refresh)
        if self.hub.open_streams():
            self._push_status()

    # -- link roles ------------------------------------------------------------------------

    async def _receptor(self, ctx: ssl.SSLContext | None) -> None:
        t = self.tunnel
        assert t.address is not None
        server = await links.listen_tcp(t.address.host, t.address.port, self.hub.new_session,
                                        tls=ctx, handshake_timeout=t.connect_timeout,
                                        admit=self.hub.admit_link)
        self.record(f"waiting for the peer on {t.address}" + (" (TLS)" if ctx else ""),
                    SOCKMUX_EVENT="listening")
        try:
            await asyncio.Future()
        finally:
            server.close()

    async def _redial(self, open_link: Any, what: str) -> None:
        t = self.tunnel
        backoff = links.Backoff(initial=0.5, maximum=max(0.5, t.reconnect_max))
        failures = 0
        while True:
            try:
                _transport, session = await open_link()
            except (OSError, TimeoutError, ValueError) as exc:
                failures += 1
                delay = backoff.next_delay()
                text = str(exc) or type(exc).__name__
                self.record(f"{what} failed: {text}; trying again in {delay:.1f} s",
                            priority=4 if failures == 1 else 6, SOCKMUX_EVENT="link-failed",
                            SOCKMUX_REASON=text)
                await asyncio.sleep(delay)
                continue
            failures = 0
            assert isinstance(session, Session)
            await asyncio.shield(session.done)
            uptime = (self.loop.time() - session.ready_at) if session.ready_at else 0.0
            backoff.link_closed(uptime)
            delay = backoff.next_delay()
            self.record(f"{what}: again in {delay:.1f} s", priority=6,
                        SOCKMUX_EVENT="link-retry")
            await asyncio.sleep(delay)

    async def _once(self, open_link: Any) -> None:
        _transport, session = await open_link()
        await asyncio.shield(session.done)

    def _role(self, ctx: ssl.SSLContext | None) -> Any:
        t = self.tunnel
        hub = self.hub
        if t.link == "accept":
            return self._receptor(ctx)
        if t.link == "connect":
            assert t.address is not None
            host, port = t.address.host, t.address.port
            server_name = t.tls.server_name if t.tls else None
            return self._redial(
                lambda: links.connect_tcp(host, port, hub.new_session, tls=ctx,
                                          server_hostname=server_name,
                                          timeout=t.connect_timeout),
                f"connecting to {t.address}")
        if t.link == "fifo":
            return self._redial(
                lambda: pipelink.open_fifos(t.fifo_in, t.fifo_out, hub.new_session,
                                         timeout=t.connect_timeout),
                f"opening FIFOs {t.fifo_in}, {t.fifo_out}")
        if t.link == "device":
            device = inherited_fd(t.device)
            return self._redial(lambda: pipelink.open_comm(device, hub.new_session),
                                f"opening {t.device}")
        if t.link == "command":
            assert t.command is not None
            env = systemd.child_environment(self.environ, {})
            return self._redial(
                lambda: links.open_command(t.command, hub.new_session, env=env),
                f"running {shlex.join(t.command)}")
        return self._once(lambda: links.open_stdio(hub.new_session))

    # -- life cycle ------------------------------------------------------------------------

    async def run(self) -> int:
        t, args = self.tunnel, self.args
        ctx = tls_context(t)
        opener = ExitOpener(connect_timeout=t.connect_timeout, environ=self.environ,
                            log=self.log, tunnel=t.name,
                            tcpmux_search_path=tuple(args.tcpmux_config_dir) or None)
        opener.debug_enabled = args.debug
        self.hub = hub = Hub(
            protocol_config(t), exits=t.exits, opener=opener, log=self.log, name=t.name,
            handshake_timeout=t.handshake_timeout, max_pending_links=t.max_pending_links,
            failure_delay=t.failure_delay if t.link == "accept" else 0.0,
            on_ready=self._on_ready, debug=args.debug,
            on_change=self._push_status if self.notifier.enabled else None,
            change_delay=STATUS_MIN_INTERVAL,
            hold_timeout=args.hold, first_data_wait=args.first_data_wait,
            reply_wait=args.reply_wait,
            stream_log_rate=t.stream_log_rate, send_timeout=t.send_timeout)
        if not t.require_auth:
            self.record("authentication is OFF (--no-auth / Authentication=none): anyone who "
                        "can reach the link can open streams to this side's exits", priority=4)
        try:
            passed = systemd.passed_sockets(self.environ).listeners
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"cannot use the sockets systemd passed: {exc}") from None
        entrances = open_entrances(t, passed)
        for sock, label in passed:
            if all(sock is not s for s, _l in entrances):
                self.record(f"socket {label!r} from systemd is not an entrance of this tunnel "
                            "(Entrance=fd:NAME); closed", priority=4)
                sock.close()
        for sock, label in entrances:
            await hub.add_entrance(sock, label)
        if any(e.kind == "tcpmux" for e in t.exits.values()):
            try:  # conf.d problems show at start-up, not at the first stream
                opener.dispatcher()
            except (RuntimeError, OSError) as exc:
                raise ValueError(f"tcpmux exit: cannot start tcpmuxd's dispatcher: {exc}") \
                    from None
        shown = ", ".join(
            f"{label} ({'unix' if sock.family == socket.AF_UNIX else sock.getsockname()[1]})"
            for sock, label in entrances) or "none"
        exits = ", ".join(str(e) for e in t.exits.values()) or "none"
        self.record(f"tunnel {t.name}: {t.link} link ({t.role}); entrances {shown}; exits "
                    f"{exits}", SOCKMUX_EVENT="start")

        loop = self.loop
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop, signum)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.record(
            "SIGHUP: sockmuxd does not reload; restart it to apply changes", priority=5))
        self._heartbeat(self.notifier.watchdog_interval or TICK_INTERVAL)
        if self.notifier.enabled:
            self._status_refresh()
        if args.ready_timeout:
            loop.call_later(args.ready_timeout, self._ready_timeout)

        role = loop.create_task(self._role(ctx))
        done, _ = await asyncio.wait({role, self.stop}, return_when=asyncio.FIRST_COMPLETED)
        if role in done:
            exc = role.exception()
            if exc is not None:
                self.record(f"link failed: {exc}", priority=3)
                self.exit_code = EXIT_FAILURE
            else:
                self.record("the link ended", SOCKMUX_EVENT="stop")
        else:
            self.record(f"stopping ({self.stop.result()})", SOCKMUX_EVENT="stop")
            role.cancel()
        self.notifier.stopping()
        sessions = [s.done for s in hub.sessions]
        hub.close("sockmuxd is shutting down")
        if sessions:
            await asyncio.wait(sessions, timeout=SHUTDOWN_TIMEOUT)
        if not role.done():
            role.cancel()
        await asyncio.gather(role, return_exceptions=True)
        await opener.close()
        await asyncio.sleep(0)
        return self.exit_code

    def _stop(self, signum: int) -> None:
        if not self.stop.done():
            self.stop.set_result(signal.Signals(signum).name)


def _install_loop(choice: str) -> str:
    """uvloop when installed (measured: less CPU per byte, more throughput; see sockmuxd(8))."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError("--loop uvloop: uvloop is not installed") from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _tune_malloc(environ: dict[str, str]) -> None:
    """Keep glibc from returning heap to the kernel after every large read buffer.

    The loops read up to 256 KiB at a time; with glibc's dynamic thresholds those buffers end
    up at the top of the heap and every free trims it: one brk() per read, measured at a third
    of the connector's system time under load. Fixed thresholds (buffers below 1 MiB from the
    heap, trim only beyond 16 MiB free) remove that; at most 16 MiB of freed heap is kept.
    An administrator's GLIBC_TUNABLES wins. Nothing happens on other C libraries.
    """
    if "GLIBC_TUNABLES" in environ:
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 1 << 20)
    mallopt(m_trim_threshold, 16 << 20)


def _load(args: argparse.Namespace) -> Tunnel:
    if args.name:
        given = _given(args)
        if given:
            raise UsageError(f"NAME ({args.name}) and tunnel flags ({', '.join(given)}) "
                             "exclude each other: the tunnel comes from NAME.conf, or from "
                             "the flags")
        return tconfig.load_tunnel(args.name, tuple(args.config_dir) or tconfig.SEARCH_PATH)
    if args.config_dir:
        raise UsageError("--config-dir needs NAME")
    return tunnel_from_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(translate_delegate(raw))
        tunnel = _load(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TunnelConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE if args.check else EXIT_CONFIG
    if args.check:
        print(tconfig.format_tunnel(tunnel))
        problems = _check_runtime(tunnel, args)
        for problem in problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        return EXIT_FAILURE if problems else EXIT_OK
    try:
        loop_name = _install_loop(args.loop)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    environ = dict(os.environ)
    _tune_malloc(environ)
    bridge = _LogBridge(systemd.EventLog(environ, PROG))
    root = logging.getLogger("tcpmuxd")
    root.addHandler(bridge)
    root.setLevel(logging.DEBUG if args.debug else logging.INFO)
    logging.getLogger("asyncio").addHandler(bridge)
    from ..common.children import reset_signals
    reset_signals()
    try:
        return asyncio.run(_run(tunnel, args, environ, loop_name))
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        root.removeHandler(bridge)
        logging.getLogger("asyncio").removeHandler(bridge)


async def _run(tunnel: Tunnel, args: argparse.Namespace, environ: dict[str, str],
               loop_name: str) -> int:
    daemon = Daemon(tunnel, args, environ)
    daemon.record(f"sockmuxd {__version__} starting ({loop_name} event loop, "
                  f"{native.describe()})", priority=7)
    try:
        try:
            tls_context(tunnel)
        except ValueError as exc:  # files that do not load: a configuration error
            daemon.record(f"cannot start tunnel {tunnel.name}: {exc}", priority=3)
            return EXIT_CONFIG
        return await daemon.run()
    except (OSError, ValueError) as exc:
        daemon.record(f"cannot start tunnel {tunnel.name}: {exc}", priority=3)
        return EXIT_FAILURE


def _check_runtime(t: Tunnel, args: argparse.Namespace) -> list[str]:
    """What --check can find beyond the file: TLS files that do not load, tcpmuxd's conf.d."""
    problems = []
    try:
        tls_context(t)
    except ValueError as exc:
        problems.append(str(exc))
    if any(e.kind == "tcpmux" for e in t.exits.values()):
        from ..tcpmux import config as tcpmux_config
        path = tuple(args.tcpmux_config_dir) or tcpmux_config.DEFAULT_SEARCH_PATH
        cfg = tcpmux_config.load(path)
        print(f"{'TCPMUX':<17} {len(cfg.services)} services from "
              + ", ".join(str(p) for p in path))
        problems += [f"tcpmux exit: {e}" for e in cfg.errors]
    return problems


if __name__ == "__main__":
    raise SystemExit(main())
