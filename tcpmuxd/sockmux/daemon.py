"""``sockmuxd``: the SockMux tunnel daemon (sockmuxd(8)).

``sockmuxd NAME`` runs the tunnel of ``NAME.conf`` from the sockmux.d search path
(sockmuxd.conf(5)); flags build a tunnel without a file; DeleGate's own parameters
(``-Phost:port``, ``SERVER=sockmux://host:port``, ``PORT=8080``, ``SERVER=host:port,-in`` ...)
are translated into the flags. The work is done by :class:`~tcpmuxd.sockmux.session.Hub`
(streams, links) and :class:`~tcpmuxd.sockmux.exits.ExitOpener` (exits); this module builds
them, opens the entrances, keeps the link up in the tunnel's role, and talks to systemd:

* ``Type=notify``: ``READY=1`` once the entrances are open and the link is being kept up (a
  receptor listens, a connector dials): a tunnel is up then, whether or not the peer is, so
  that ``systemctl enable --now`` on either end returns at once, in any order. ``STATUS=``
  says the link's state (waiting for the peer, re-dialling with the failures so far, up),
  streams and bytes (at most once a second, and every few seconds while bytes move); the
  journal has a record for each change of the link. ``STOPPING=1`` on SIGTERM/SIGINT.
* ``WATCHDOG=1`` from the same timer that runs the links' keep-alive ticks, so a stuck event
  loop stops both and systemd restarts the daemon.
* Logs through :class:`tcpmuxd.common.systemd.EventLog`: journal fields when stderr is the journal,
  one line on stderr otherwise. One record per stream, one per link event.

How the link is opened and kept up is its kind's (:mod:`tcpmuxd.sockmux.linkkinds`): a
connector (``Connect=``) dials and re-dials forever with
:class:`~tcpmuxd.sockmux.links.Backoff` (capped by ``ReconnectMaxSec=``, reset after a link
that stayed up); FIFO, device and command links are re-opened the same way; a receptor
(``Accept=``) listens, and a newer link from the peer replaces the old one once it has
authenticated; a stdio link is used once and the daemon exits when it ends. The command line
is :mod:`tcpmuxd.sockmux.flags`, ``--check`` :mod:`tcpmuxd.sockmux.check`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..common import systemd
from ..common.addresses import Endpoint, host_port
from . import check, flags, links, native
from .connection import SockMuxConfig
from .exits import ExitOpener
from .flags import UsageError
from .linkkinds import RECEPTOR, REDIAL, LinkContext
from .session import ENTRANCE_BACKLOG, Hub
from .tunnel import SEARCH_PATH, Tunnel, TunnelConfigError, load_tunnel

__all__ = ["main", "build_parser", "Daemon"]

PROG = "sockmuxd"
#: STATUS= is refreshed at most this often on changes, and this often while bytes move.
STATUS_MIN_INTERVAL = 1.0
STATUS_REFRESH = 5.0
#: How often links tick when systemd asks for no watchdog (their own timers run anyway).
TICK_INTERVAL = 5.0
#: How long shutdown waits for the links to close (and a command link's process to exit).
SHUTDOWN_TIMEOUT = 6.0

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: The tunnel's configuration is wrong (EX_CONFIG): the unit does not restart on it.
EXIT_CONFIG = 78


# ------------------------------------------------------------------------ the command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        usage="%(prog)s [--check] [--config-dir DIR]... NAME\n"
              "       %(prog)s [--check] LINK [--entrance [HOST:]PORT]... "
              "[--exit [PORT=]TARGET]... (--secret FILE | --no-auth) [OPTIONS]",
        description="SockMux tunnel (DeleGate-compatible): many TCP connections over one "
                    "persistent link. NAME runs the tunnel of NAME.conf (sockmuxd.conf(5)); "
                    "without NAME, the flags below describe the tunnel, each one a key of "
                    "sockmuxd.conf(5). DeleGate's -Phost:port, SERVER=sockmux://host:port, "
                    "SERVER=sockmux:commin@PATH / commout@PATH / comm@PATH, PORT=LIST and "
                    "SERVER=host:port,-in[:-:-PPORT] are accepted too.",
        epilog="See sockmuxd(8) and sockmuxd.conf(5).")
    p.add_argument("name", metavar="NAME", nargs="?",
                   help="tunnel name: runs NAME.conf from the sockmux.d directories")
    p.add_argument("--config-dir", metavar="DIR", action="append", type=Path, default=[],
                   help="tunnel directory, highest precedence first (repeatable); replaces the "
                        "default search path " + ", ".join(map(str, SEARCH_PATH)))
    p.add_argument("--check", action="store_true",
                   help="print the tunnel as it would run and exit (status 1 on any error)")
    flags.add_tunnel_flags(p)
    g = p.add_argument_group("daemon")
    g.add_argument("--tcpmux-config-dir", metavar="DIR", action="append", type=Path,
                   default=[],
                   help="tcpmuxd service directory for 'tcpmux' exits (repeatable; default: "
                        "tcpmuxd's conf.d search path)")
    flags.add_override_flags(g)
    g.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="event loop (default auto: uvloop when installed)")
    g.add_argument("--debug", action="store_true", help="log ignored frames and exit programs")
    g.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def protocol_config(t: Tunnel) -> SockMuxConfig:
    host = re.sub(r"[^A-Za-z0-9._-]", "", socket.gethostname())[:64] or PROG
    return SockMuxConfig(
        secret=t.secret, require_auth=t.require_auth, hostname=host, extensions=t.extensions,
        max_streams=t.max_streams, plain_max_streams=min(60, t.max_streams),
        max_frame_size=t.max_frame_size, stream_window=t.stream_window,
        keepalive_interval=t.keepalive_interval, dead_peer_timeout=t.dead_peer_timeout,
        resume_timeout=t.resume_timeout, resume_buffer=t.resume_buffer)


# ------------------------------------------------------------------------ entrances


def socket_unit_order(name: str | None) -> str:
    """The commands that add a tunnel's socket unit (sockmuxd@NAME.socket) to a tunnel that
    runs without it. systemd refuses to start a socket unit whose service is running ("already
    active, refusing"), and a service started without its socket unit gets no sockets, so the
    service must be stopped around it. ``name``: the tunnel's (None: not run from a file)."""
    unit = f"sockmuxd@{name}" if name else "sockmuxd@NAME"
    return (f"systemctl stop {unit}.service && systemctl enable --now {unit}.socket && "
            f"systemctl start {unit}.service")


def _missing_fd_entrance(fd_name: str, passed: list[tuple[socket.socket, str]],
                         tunnel_file: str | None) -> TunnelConfigError:
    """Why no socket named ``fd_name`` came, and what to do about it."""
    names = sorted({name for _s, name in passed})
    if names:  # the socket unit ran, but names its sockets otherwise
        return TunnelConfigError(
            f"entrance fd:{fd_name}: systemd passed sockets named {', '.join(names)}, none "
            f"named {fd_name!r}: set FileDescriptorName={fd_name} in the socket unit (as "
            f"sockmuxd@.socket does), or write Entrance=fd:{names[0]}")
    return TunnelConfigError(
        f"entrance fd:{fd_name}: systemd passed no sockets: the socket unit was not running "
        "when this service started (a socket unit cannot start while its service runs: "
        "'already active, refusing'). Stop the tunnel around it: "
        f"{socket_unit_order(tunnel_file)} (sockmuxd(8), THE UNITS)")


def open_entrances(t: Tunnel, passed: list[tuple[socket.socket, str]],
                   tunnel_file: str | None = None) -> list[tuple[socket.socket, str]]:
    """Bind (or pick from systemd's sockets) every entrance. OSError when one cannot be bound,
    TunnelConfigError for an ``fd:`` entrance systemd did not pass (``tunnel_file``: the
    tunnel's name when it runs from its file, for the units named in the message)."""
    result: list[tuple[socket.socket, str]] = []
    try:
        for entrance in t.entrances:
            if entrance.fd_name is not None:
                socks = [s for s, name in passed if name == entrance.fd_name]
                if not socks:
                    raise _missing_fd_entrance(entrance.fd_name, passed, tunnel_file)
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


def _entrances_text(entrances: list[tuple[socket.socket, str]]) -> str:
    """The start-up record's entrances: each once, with the addresses it listens on (a bare
    port has a socket on each loopback address, a socket unit may pass several)."""
    grouped: dict[str, list[str]] = {}
    for sock, label in entrances:
        name = sock.getsockname()
        where = (name or "(unnamed)") if sock.family == socket.AF_UNIX else host_port(*name[:2])
        grouped.setdefault(label, []).append(str(where))
    return ", ".join(f"{label} ({', '.join(where)})" for label, where in grouped.items()) \
        or "none"


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
        #: The link's state while none is up (LinkContext.state): the idle part of STATUS=.
        self.link_state = "starting"
        self.stop: asyncio.Future[str] = self.loop.create_future()
        self.exit_code = EXIT_OK
        self._last_status = ""
        self.hub: Hub

    def record(self, message: str, priority: int = 6, **fields: object) -> None:
        self.log.record(message, priority=priority, SOCKMUX_TUNNEL=self.tunnel.name, **fields)

    # -- systemd ---------------------------------------------------------------------------

    def _link_state(self, text: str) -> None:
        """The upkeep says what the link is doing: the first time, it listens or dials, and
        the tunnel is ready (its entrances are open already); later, STATUS= follows."""
        self.link_state = text
        if not self.ready_sent:
            self.ready_sent = True
            self._last_status = self.hub.status(self.link_state)
            self.notifier.ready(self._last_status)
        else:
            self._push_status()

    def _push_status(self) -> None:
        text = self.hub.status(self.link_state)
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

    # -- life cycle ------------------------------------------------------------------------

    def _make_hub(self) -> tuple[Hub, ExitOpener]:
        t, args = self.tunnel, self.args
        opener = ExitOpener(connect_timeout=t.connect_timeout, environ=self.environ,
                            log=self.log, tunnel=t.name,
                            tcpmux_search_path=tuple(args.tcpmux_config_dir) or None)
        opener.debug_enabled = args.debug
        hub = Hub(
            protocol_config(t), exits=t.exits, opener=opener, log=self.log, name=t.name,
            handshake_timeout=t.handshake_timeout, max_pending_links=t.max_pending_links,
            failure_delay=t.failure_delay if t.kind.upkeep is RECEPTOR else 0.0,
            on_ready=lambda session: self._push_status(), debug=args.debug,
            on_change=self._push_status if self.notifier.enabled else None,
            change_delay=STATUS_MIN_INTERVAL,
            hold_timeout=t.hold, first_data_wait=t.first_data_wait, reply_wait=t.reply_wait,
            stream_log_rate=t.stream_log_rate, send_timeout=t.send_timeout,
            redials=t.kind.upkeep is REDIAL)
        return hub, opener

    async def _start(self, opener: ExitOpener) -> None:
        """Entrances (bound here or passed by systemd), the tcpmux exit's dispatcher, the
        start-up record. OSError when the tunnel cannot start now (a port in use),
        TunnelConfigError when it cannot start as configured (restarting would not help)."""
        t = self.tunnel
        if not t.require_auth:
            self.record("authentication is OFF (--no-auth / Authentication=none): anyone who "
                        "can reach the link can open streams to this side's exits", priority=4)
        try:
            passed = systemd.passed_sockets(self.environ).listeners
        except (OSError, RuntimeError) as exc:
            raise TunnelConfigError(f"cannot use the sockets systemd passed: {exc}") from None
        entrances = open_entrances(t, passed, self.args.name)
        for sock, label in passed:
            if all(sock is not s for s, _l in entrances):
                self.record(f"socket {label!r} from systemd is not an entrance of this tunnel "
                            "(Entrance=fd:NAME); closed", priority=4)
                sock.close()
        for sock, label in entrances:
            await self.hub.add_entrance(sock, label)
        if any(e.kind == "tcpmux" for e in t.exits.values()):
            try:  # conf.d problems show at start-up, not at the first stream
                opener.dispatcher()
            except (RuntimeError, OSError) as exc:
                raise TunnelConfigError(
                    f"tcpmux exit: cannot start tcpmuxd's dispatcher: {exc}") from None
        shown = _entrances_text(entrances)
        exits = ", ".join(str(e) for e in t.exits.values()) or "none"
        self.record(f"tunnel {t.name}: {t.link} link ({t.role}); entrances {shown}; exits "
                    f"{exits}", SOCKMUX_EVENT="start")

    async def run(self) -> int:
        t = self.tunnel
        self.hub, opener = self._make_hub()
        link = LinkContext(factory=self.hub.new_session, admit=self.hub.admit_link,
                           tls=t.kind.tls_context(t), environ=self.environ, record=self.record,
                           state=self._link_state,
                           suspended=lambda: self.hub.suspended is not None)
        await self._start(opener)
        loop = self.loop
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop, signum)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.record(
            "SIGHUP: sockmuxd does not reload; restart it to apply changes", priority=5))
        self._heartbeat(self.notifier.watchdog_interval or TICK_INTERVAL)
        if self.notifier.enabled:
            self._status_refresh()

        upkeep = loop.create_task(t.kind.upkeep.run(t.kind, t, link))
        done, _ = await asyncio.wait({upkeep, self.stop}, return_when=asyncio.FIRST_COMPLETED)
        if upkeep in done:
            exc = upkeep.exception()
            if exc is not None:
                self.record(f"link failed: {exc}", priority=3)
                self.exit_code = EXIT_FAILURE
            else:
                self.record("the link ended", SOCKMUX_EVENT="stop")
        else:
            self.record(f"stopping ({self.stop.result()})", SOCKMUX_EVENT="stop")
            upkeep.cancel()
        await self._shut_down(upkeep, opener)
        return self.exit_code

    async def _shut_down(self, upkeep: asyncio.Task[None], opener: ExitOpener) -> None:
        self.notifier.stopping()
        sessions = [s.done for s in self.hub.sessions]
        self.hub.close("sockmuxd is shutting down")
        if sessions:
            await asyncio.wait(sessions, timeout=SHUTDOWN_TIMEOUT)
        if not upkeep.done():
            upkeep.cancel()
        await asyncio.gather(upkeep, return_exceptions=True)
        await opener.close()
        await asyncio.sleep(0)

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
        given = flags.given(args)
        if given:
            raise UsageError(f"NAME ({args.name}) and tunnel flags ({', '.join(given)}) "
                             "exclude each other: the tunnel comes from NAME.conf, or from "
                             "the flags")
        loaded = load_tunnel(args.name, tuple(args.config_dir) or SEARCH_PATH)
    elif args.config_dir:
        raise UsageError("--config-dir needs NAME")
    else:
        loaded = flags.tunnel_from_args(args)
    return flags.apply_overrides(loaded, args)


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(flags.translate_delegate(raw))
        t = _load(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        for message in exc.args:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except TunnelConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILURE if args.check else EXIT_CONFIG
    if args.check:
        print(check.format_tunnel(t))
        problems = check.runtime_problems(t, args.tcpmux_config_dir)
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
        return asyncio.run(_run(t, args, environ, loop_name))
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        root.removeHandler(bridge)
        logging.getLogger("asyncio").removeHandler(bridge)


async def _run(t: Tunnel, args: argparse.Namespace, environ: dict[str, str],
               loop_name: str) -> int:
    daemon = Daemon(t, args, environ)
    daemon.record(f"sockmuxd {__version__} starting ({loop_name} event loop, "
                  f"{native.describe()})", priority=7)
    try:
        try:
            t.kind.tls_context(t)
        except ValueError as exc:  # files that do not load: a configuration error
            raise TunnelConfigError(str(exc)) from None
        return await daemon.run()
    except TunnelConfigError as exc:  # restarting would not help (RestartPreventExitStatus=)
        daemon.record(f"cannot start tunnel {t.name}: {exc}", priority=3,
                      SOCKMUX_EVENT="config-error")
        return EXIT_CONFIG
    except (OSError, ValueError) as exc:
        daemon.record(f"cannot start tunnel {t.name}: {exc}", priority=3)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
