"""``tcpmuxd``: the command line, the choice of mode, and the daemon's life cycle.

Modes, picked from what the process was given (tcpmuxd(8), docs/tcpmuxd.8.scd):

* listening sockets from systemd (Accept=no) or ``--listen``: the long-running dispatcher;
* one connection from systemd (Accept=yes: LISTEN_FDS with a connected socket, or a socket on
  stdin with StandardInput=socket): read the name and become the handler;
* ``--check``: load the configuration, print the service table, exit non-zero on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from tcpmuxd import __version__
from tcpmuxd.common import systemd
from tcpmuxd.common.children import reset_signals
from tcpmuxd.common.dropins import show_path
from tcpmuxd.common.words import counted
from tcpmuxd.tcpmux import clienthello, config, inetd, protocol
from tcpmuxd.common.addresses import host_port, parse_listen
from tcpmuxd.tcpmux.dispatch import Dispatcher
from tcpmuxd.tcpmux.policy import Limits

#: How often STATUS= may be refreshed: live counters without a notify per connection.
STATUS_INTERVAL = 1.0
LISTEN_BACKLOG = 4096
N = TypeVar("N", int, float)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tcpmuxd",
        description="TCPMUX (RFC 1078) superserver: reads a service name on each connection "
                    "and starts that service's handler. Under systemd it takes its sockets from "
                    "tcpmuxd.socket (Accept=no) or is started once per connection "
                    "(tcpmuxd-inetd.socket, Accept=yes); standalone it binds --listen addresses.",
        epilog="Services are files NAME.conf in the configuration directories; see "
               "tcpmuxd.conf(5). SIGHUP reloads them without dropping a connection.",
    )
    p.add_argument("--listen", metavar="ADDR:PORT", action="append", default=[],
                   help="listen here (repeatable); PORT alone means [::]:PORT, both IPv4 and IPv6")
    p.add_argument("--config-dir", metavar="DIR", action="append", type=Path, default=[],
                   help="service directory, highest precedence first (repeatable); replaces "
                        "the default search path "
                        + ", ".join(str(d) for d in config.DEFAULT_SEARCH_PATH))
    p.add_argument("--check", action="store_true",
                   help="validate the configuration, print the service table and exit "
                        "(status 1 on any error)")
    p.add_argument("--name-timeout", metavar="SEC", type=_positive_float, default=10.0,
                   help="total time a client has to send the name line (default: 10)")
    p.add_argument("--max-name-length", metavar="N", type=_positive_int,
                   default=protocol.DEFAULT_MAX_NAME_LENGTH,
                   help="longest service name accepted, in bytes (default: 256)")
    p.add_argument("--max-hello-size", metavar="N", type=_hello_size,
                   default=clienthello.DEFAULT_MAX_HELLO_SIZE,
                   help="largest TLS ClientHello a TLS client's service is found by "
                        "(ServerName=), in bytes of its records from the first byte on, "
                        f"{MIN_HELLO_SIZE} to {MAX_HELLO_SIZE}; it must arrive within "
                        "--name-timeout too (default: "
                        f"{clienthello.DEFAULT_MAX_HELLO_SIZE})")
    p.add_argument("--max-connections", metavar="N", type=_positive_int, default=1024,
                   help="connections open at once, all services together (default: 1024)")
    p.add_argument("--max-pending-per-source", metavar="N", type=_positive_int,
                   default=Limits.max_pending_per_source,
                   help="connections from one address (an IPv6 /64) still to send their name; "
                        "past it a new one is refused at once, so that one address cannot hold "
                        "every slot (default: 64)")
    p.add_argument("--stop-timeout", metavar="SEC", type=_non_negative_float,
                   default=Limits.stop_timeout,
                   help="on SIGTERM, how long relays and hand-overs in progress may go on "
                        "before they are reset (default: 30)")
    p.add_argument("--version", action="version", version=f"tcpmuxd {__version__}")
    return p


def _number(convert: Callable[[str], N], what: str, ok: Callable[[N], bool],
            must: str) -> Callable[[str], N]:
    """An argparse ``type`` that converts with ``convert`` and checks with ``ok``: errors
    "not WHAT: 'TEXT'" and "MUST: 'TEXT'"."""
    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{must}: {text!r}")
        return value
    return parse


_positive_float = _number(float, "a number", lambda v: v > 0, "must be greater than 0")
_non_negative_float = _number(float, "a number", lambda v: 0 <= v < float("inf"),
                              "must be 0 or more seconds")
_positive_int = _number(int, "a whole number", lambda v: v >= 1, "must be at least 1")
#: The ClientHello is peeked at, never read off: all of it must fit the socket's receive
#: buffer (Linux's default is 128 KiB), and its first record header and handshake header.
MIN_HELLO_SIZE, MAX_HELLO_SIZE = 9, 65536
_hello_size = _number(int, "a whole number", lambda v: MIN_HELLO_SIZE <= v <= MAX_HELLO_SIZE,
                      f"must be from {MIN_HELLO_SIZE} to {MAX_HELLO_SIZE}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    search_path = tuple(args.config_dir) or config.DEFAULT_SEARCH_PATH
    limits = Limits(name_timeout=args.name_timeout, max_name_length=args.max_name_length,
                    max_hello_size=args.max_hello_size,
                    max_connections=args.max_connections,
                    max_pending_per_source=args.max_pending_per_source,
                    stop_timeout=args.stop_timeout)
    environ = dict(os.environ)
    log = systemd.EventLog(environ, "tcpmuxd")
    if args.check:
        switch_users, judged = _user_switching(environ)
        cfg = config.load(search_path, max_name_length=limits.max_name_length,
                          switch_users=switch_users)
        print(f"Handlers as other users (User=, Group=, SupplementaryGroups=): "
              f"{'possible' if switch_users else 'not possible'}: {judged}\n")
        print(config.format_table(cfg))
        return 0 if cfg.ok else 1
    cfg = config.load(search_path, max_name_length=limits.max_name_length)
    for error in cfg.errors:
        log.record(f"configuration: {error}", priority=3)

    try:
        passed = systemd.passed_sockets(environ)
    except (OSError, RuntimeError) as e:
        print(f"tcpmuxd: cannot use the sockets systemd passed: {e}", file=sys.stderr)
        return 1
    connection = passed.connection
    if connection is None and not passed.listeners and not args.listen:
        connection = systemd.stdin_connection()
    if connection is not None:
        return inetd.serve_connection(connection, cfg, limits, log, environ)

    listeners = list(passed.listeners)
    try:
        for spec in args.listen:
            sock = _bind(spec)
            listeners.append((sock, _bound_name(sock)))
    except (OSError, ValueError) as e:
        print(f"tcpmuxd: {e}", file=sys.stderr)
        return 1
    if not listeners:
        print("tcpmuxd: nothing to serve: start it from tcpmuxd.socket (systemctl enable --now "
              "tcpmuxd.socket), or give --listen ADDR:PORT to run standalone", file=sys.stderr)
        return 2
    reset_signals()
    return asyncio.run(_serve(listeners, cfg, search_path, limits, log, environ))


#: The units that run tcpmuxd, by mode, and the socket unit that starts each.
UNITS = (("tcpmuxd.socket", "tcpmuxd.service"), ("tcpmuxd-inetd.socket", "tcpmuxd-inetd@.service"))
#: systemctl shows a template's settings through an instance (the template itself is not loaded).
_TEMPLATE_INSTANCE = "check"
_CREDENTIAL_PROPERTIES = ("LoadState", "MainPID", "DynamicUser", "User", "PrivateUsers",
                          "CapabilityBoundingSet", "AmbientCapabilities")
_SWITCH_CAPABILITY_NAMES = {"cap_setuid", "cap_setgid"}


def _user_switching(environ: Mapping[str, str]) -> tuple[bool, str]:
    """For --check: whether the tcpmuxd that will serve the services may run handlers as other
    users, and whose credentials that was judged by. Not this shell's: an administrator's root
    shell can switch users, the shipped units' dynamic user cannot.

    Run by systemd (INVOCATION_ID: ExecStartPre=, systemd-run), this process has its unit's
    credentials. Else, where systemd manages tcpmuxd, the unit of the mode in use (the one
    whose socket is active, else enabled; Accept=no when neither is): its main process's
    capabilities while it runs, else what its settings give. Else this process's own.
    """
    if environ.get("INVOCATION_ID"):
        return config.can_switch_users(), "judged for this process, which systemd started"
    sockets = [systemd.unit_properties(socket_unit, ("LoadState", "ActiveState",
                                                     "UnitFileState"))
               for socket_unit, _service in UNITS]
    unit = UNITS[0][1]
    for state in ("active", "enabled"):
        used = [p is not None and state in (p.get("ActiveState"), p.get("UnitFileState"))
                for p in sockets]
        if any(used):
            unit = UNITS[used.index(True)][1]
            break
    shown = unit.replace("@.", f"@{_TEMPLATE_INSTANCE}.")
    props = systemd.unit_properties(shown, _CREDENTIAL_PROPERTIES)
    if props is None:
        return (config.can_switch_users(),
                f"judged for this process (uid {os.geteuid()}): systemd does not run tcpmuxd here")
    return _unit_user_switching(unit, props)


def _unit_user_switching(unit: str, props: Mapping[str, str]) -> tuple[bool, str]:
    """Whether ``unit``'s processes may switch users, from ``systemctl show`` properties."""
    pid = int(props.get("MainPID") or 0)
    if pid:
        try:
            possible = config.can_switch_users(pid)
        except OSError:
            pass
        else:
            return possible, (f"{unit} is running (pid {pid}) "
                              f"{'with' if possible else 'without'} CAP_SETUID and CAP_SETGID")
    if props.get("PrivateUsers") == "yes":
        return False, f"{unit} has PrivateUsers=yes: no other users exist in its namespace"
    bounding = set(props.get("CapabilityBoundingSet", "").split())
    ambient = set(props.get("AmbientCapabilities", "").split())
    dynamic = props.get("DynamicUser") == "yes"
    user = props.get("User", "")
    as_root = not dynamic and user in ("", "root", "0")
    caps = bounding if as_root else bounding & ambient
    possible = _SWITCH_CAPABILITY_NAMES <= caps
    who = ("a dynamic user (DynamicUser=yes)" if dynamic
           else "root" if as_root else f"user {user}")
    return possible, (f"{unit} runs tcpmuxd as {who}, "
                      f"{'with' if possible else 'without'} CAP_SETUID and CAP_SETGID")


def _bound_name(sock: socket.socket) -> str:
    """The address as bound (port 0 becomes the port the kernel chose), for logs."""
    host, port = sock.getsockname()[:2]
    return host_port(host, port)


def _bind(spec: str) -> socket.socket:
    endpoint = parse_listen(spec)
    family = socket.AF_INET6 if ":" in (endpoint.host or "::") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((endpoint.host or "::", endpoint.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {spec}: {e.strerror}") from None
    return sock


async def _serve(listeners, cfg, search_path, limits: Limits, log: systemd.EventLog,
                 environ) -> int:
    loop = asyncio.get_running_loop()
    notifier = systemd.Notifier(environ)
    stopped = loop.create_future()
    status_pending = False

    def push_status() -> None:
        nonlocal status_pending
        status_pending = False
        notifier.status(dispatcher.status())

    def on_change() -> None:
        nonlocal status_pending
        if notifier.enabled and not status_pending:
            status_pending = True
            loop.call_later(STATUS_INTERVAL, push_status)

    dispatcher = Dispatcher(cfg, limits, log, environ, on_change)
    for sock, name in listeners:
        dispatcher.add_listener(sock, name)

    def reload() -> None:
        notifier.reloading()
        new = config.load(search_path, previous=dispatcher.config,
                          max_name_length=limits.max_name_length)
        for error in new.errors:
            log.record(f"configuration: {error}", priority=3)
        dispatcher.config = new
        kept = [f"{service.name} ({show_path(path)} has errors)" for service, path in new.kept()]
        log.record(f"reloaded: {counted(len(new.services), 'service')}, "
                   f"{counted(len(new.errors), 'error')}"
                   + (f"; kept the previous definition of {', '.join(kept)}" if kept else ""),
                   priority=4 if kept else 6)
        notifier.ready(dispatcher.status())

    hurry = asyncio.Event()

    def stop(signum: int) -> None:
        if not stopped.done():
            stopped.set_result(signum)
        else:  # asked again while stopping: cut what is left now
            hurry.set()

    loop.add_signal_handler(signal.SIGHUP, reload)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)

    if notifier.watchdog_interval:
        def feed_watchdog() -> None:
            loop.call_later(notifier.watchdog_interval, feed_watchdog)
            notifier.watchdog()
        feed_watchdog()

    names = ", ".join(name for _sock, name in listeners)
    log.record(f"serving {counted(len(cfg.services), 'service')} on {names}")
    notifier.ready(dispatcher.status())
    signum = await stopped
    notifier.stopping()
    log.record(f"stopping ({signal.Signals(signum).name}): no longer accepting")
    await dispatcher.stop(limits.stop_timeout, hurry)
    log.record("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
