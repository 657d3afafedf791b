"""``tcpmuxd-handler``: runs a ``Unit=`` service's handlers inside the service's own unit.

systemd starts it as ``tcpmuxd-handler@NAME.service`` with the listening unix socket of
``tcpmuxd-handler@NAME.socket`` (LISTEN_FDS, Accept=no); the unit's drop-in gives the command
(``ExecStart=/usr/bin/tcpmuxd-handler /usr/bin/date``) and the user, sandbox and resource
limits it runs with. For each connection tcpmuxd hands over (tcpmuxd.passfd's message, the
client's TCP socket attached), it starts the command the way an ``Exec=`` service's handler
starts (handlers/process.py: the socket on fds 0 and 1, its own session, Exec='s environment
with TCPMUX_SERVICE, REMOTE_ADDR and the UCSPI variables), a child of this process and so in
this unit's control group, and answers tcpmuxd (tcpmuxd.passfd: ``+PID`` from the handler's
process before its ``+``, ``-REASON`` when it did not start, ``=STATUS`` when it ended).

Only tcpmuxd may hand connections over: the socket is open to every local user (a dynamic user
has no fixed user or group to give it to), so the peer's credentials (SO_PEERCRED) are checked
before anything is read: root, this unit's own user, or a user named with ``--allow-user``
(by default tcpmuxd's dynamic users, ``tcpmuxd`` and ``tcpmuxd-inetd``, which nss-systemd
resolves while they exist). Anyone else gets ``-`` and is logged, and their message is not
read, so a local user cannot run the handler with a connection and addresses of their making.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import shlex
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping, Sequence

from tcpmuxd import __version__, passfd
from tcpmuxd.common import systemd
from tcpmuxd.common.addresses import SocketAddress
from tcpmuxd.common.children import Child, exit_text, reset_signals
from tcpmuxd.common.dropins import parse_exec
from tcpmuxd.tcpmux import relay
from tcpmuxd.tcpmux.protocol import negative
from tcpmuxd.tcpmux.cli import _positive_float, _positive_int
from tcpmuxd.tcpmux.handlers import Exec, StartError
from tcpmuxd.tcpmux.handlers.process import spawn

IDENTIFIER = "tcpmuxd-handler"
#: The users of the shipped tcpmuxd units (DynamicUser=yes): tcpmuxd.service's and the
#: tcpmuxd-inetd@ instances'.
DEFAULT_ALLOWED_USERS = ("tcpmuxd", "tcpmuxd-inetd")
DEFAULT_MAX_HANDLERS = 256
DEFAULT_HANDOVER_TIMEOUT = 5.0
#: How often a handler is polled for its exit where no pidfd can be opened.
CHILD_POLL_INTERVAL = 0.5
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=IDENTIFIER,
        description="Run the handlers of a tcpmuxd Unit= service in this unit: started by "
                    "tcpmuxd-handler@NAME.socket, it takes each connection tcpmuxd hands over "
                    "and starts COMMAND with the connection on its standard input and output, "
                    "as tcpmuxd starts an Exec= handler.",
        epilog="COMMAND is an absolute program and its arguments (no shell). See "
               "tcpmuxd-handler(8) and tcpmuxd.conf(5), Unit=.")
    p.add_argument("--max-handlers", metavar="N", type=_positive_int,
                   default=DEFAULT_MAX_HANDLERS,
                   help="handlers running at once in this unit; past it a connection is refused "
                        f"(default: {DEFAULT_MAX_HANDLERS})")
    p.add_argument("--handover-timeout", metavar="SEC", type=_positive_float,
                   default=DEFAULT_HANDOVER_TIMEOUT,
                   help="how long tcpmuxd's message may take to arrive once it connected "
                        f"(default: {DEFAULT_HANDOVER_TIMEOUT:g})")
    p.add_argument("--allow-user", metavar="USER", action="append", default=[],
                   help="a user that may hand connections over (repeatable; replaces the "
                        f"default {' and '.join(DEFAULT_ALLOWED_USERS)}); root and this "
                        "unit's own user always may")
    p.add_argument("--version", action="version", version=f"{IDENTIFIER} {__version__}")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="the handler: an absolute program and its arguments")
    return p


def command_problem(command: Sequence[str]) -> tuple[Exec | None, str | None]:
    """The handler to run, or why there is none (the ``-`` reply for every connection)."""
    if not command:
        return None, ("no command: give it after tcpmuxd-handler in ExecStart= of the unit's "
                      "drop-in")
    try:
        parse_exec(shlex.join(command))
    except ValueError as e:
        return None, f"bad command: {e}"
    return Exec(argv=tuple(command)), None


def peer_uid(channel: socket.socket) -> int:
    """The user of the process that connected (SO_PEERCRED: as it was at connect time)."""
    _pid, uid, _gid = _UCRED.unpack(
        channel.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


def _address(text: str) -> SocketAddress:
    """A hand-over's ``remote=``/``local=`` value (``ADDR PORT``) as handlers see it."""
    host, _, port = text.rpartition(" ")
    if not host or not port.isdigit():
        return SocketAddress("", 0, "UNIX")
    return SocketAddress(host, int(port), "TCP")


class Helper:
    """The accept loop: one hand-over at a time (each is a few system calls and a fork), the
    handlers watched until they exit, their end reported to tcpmuxd and logged."""

    def __init__(self, listener: socket.socket, command: Sequence[str], *,
                 allowed_users: Sequence[str], max_handlers: int, handover_timeout: float,
                 environ: Mapping[str, str], log: systemd.EventLog) -> None:
        self.listener = listener
        self.handler, self.problem = command_problem(command)
        self.allowed_users = tuple(allowed_users)
        self.max_handlers = max_handlers
        self.handover_timeout = handover_timeout
        self.environ = dict(environ)
        self.log = log
        self.loop = asyncio.get_running_loop()
        self.running: dict[int, Child] = {}

    def start(self) -> None:
        if self.problem is not None:
            self.log.record(f"every connection will be refused: {self.problem}", priority=3)
        self.listener.setblocking(False)
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def stop(self) -> None:
        """Stop taking connections; handlers go on (systemd's stop ends the unit's cgroup)."""
        self.loop.remove_reader(self.listener.fileno())
        for child in self.running.values():
            child.cancel()

    # -- one hand-over ---------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            channel, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE and the like: the next readable event retries
            self.log.record(f"cannot accept: {e.strerror or e}", priority=4)
            return
        try:
            self._serve(channel)
        except OSError as e:
            self.log.record(f"hand-over failed: {e.strerror or e}", priority=4)
            channel.close()

    def _allowed(self, uid: int) -> str | None:
        """Why the user ``uid`` may not hand connections over, or None."""
        if uid in (0, os.getuid()):
            return None
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            return (f"uid {uid} has no user name here (tcpmuxd's dynamic users are named by "
                    "nss-systemd: 'systemd' in /etc/nsswitch.conf)")
        if name in self.allowed_users:
            return None
        return f"user {name} (uid {uid}) may not hand connections over (--allow-user)"

    def _serve(self, channel: socket.socket) -> None:
        uid = peer_uid(channel)
        refusal = self._allowed(uid)
        if refusal is not None:
            self.log.record(f"refused: {refusal}", priority=4)
            self._answer(channel, passfd.REFUSED, "not allowed to hand connections to this unit")
            channel.close()
            return
        channel.settimeout(self.handover_timeout)
        try:
            client, info = passfd.receive_connection(channel)
        except (OSError, passfd.HandoverError) as e:
            why = "timed out" if isinstance(e, TimeoutError) else str(e)
            self.log.record(f"no hand-over from uid {uid}: {why}", priority=4)
            channel.close()
            return
        channel.setblocking(True)
        started = time.monotonic()
        service = info.get("service", "")
        remote, local = _address(info.get("remote", "")), _address(info.get("local", ""))
        where = f"{remote} {service}"
        with client:
            refusal = self.problem or self._over_limit()
            if refusal is None:
                assert self.handler is not None
                env = self.handler.environment_for(service, remote, local, self.environ)
                refusal = self._spawn(channel, client, info, env, where, started)
            if refusal is not None:
                self.log.record(f"{where}: refused: {refusal}", priority=5,
                                TCPMUX_SERVICE=service, REMOTE_ADDR=remote.host or None)
                self._answer(channel, passfd.REFUSED, refusal)
                channel.close()

    def _over_limit(self) -> str | None:
        if len(self.running) < self.max_handlers:
            return None
        return (f"too many handlers running in this unit ({self.max_handlers}, "
                "tcpmuxd-handler --max-handlers)")

    def _spawn(self, channel: socket.socket, client: socket.socket, info: Mapping[str, str],
               env: Mapping[str, str], where: str, started: float) -> str | None:
        """Start the handler; its process commits to tcpmuxd before its ``+``. Returns why it
        did not start when nothing was sent to the client (tcpmuxd answers ``-``)."""
        assert self.handler is not None
        # A TLS client (via=sni) is answered nothing: its handler speaks TLS from the start.
        tls = info.get("via") == "sni"
        acknowledge = info.get("acknowledged") != "no" and not tls
        client.setblocking(True)  # the handler gets it as accept() would give it
        try:
            proc = spawn(self.handler, acknowledge, client, env, commit=channel.fileno())
        except StartError as e:
            if not e.replied:
                return f"handler failed to start: {e.reason}"
            # Committed, so tcpmuxd has let go: the client is ours to end.
            self.log.record(f"{where}: handler failed to start after its commit: {e.reason}",
                            priority=4)
            if acknowledge or tls:
                relay.reset(client)  # the "+" went out (or no line may): only a cut is left
            else:
                client.sendall(negative(f"handler failed to start: {e.reason}"))
            self._answer(channel, passfd.ENDED, f"failed to start: {e.reason}")
            channel.close()
            return None
        self.log.record(f"{where}: accepted, pid {proc.pid}", TCPMUX_SERVICE=info.get("service"),
                        TCPMUX_HANDLER_PID=proc.pid)
        self.running[proc.pid] = Child(
            self.loop, proc, poll_interval=CHILD_POLL_INTERVAL,
            on_exit=lambda child: self._ended(child, channel, where, started))
        return None

    def _ended(self, child: Child, channel: socket.socket, where: str, started: float) -> None:
        del self.running[child.pid]
        assert child.returncode is not None
        status = exit_text(child.returncode)
        self.log.record(f"{where}: pid {child.pid} {status}, "
                        f"{time.monotonic() - started:.3f}s", TCPMUX_HANDLER_PID=child.pid,
                        TCPMUX_EXIT_STATUS=status)
        self._answer(channel, passfd.ENDED, status)
        channel.close()

    @staticmethod
    def _answer(channel: socket.socket, kind: str, text: str) -> None:
        """One answer line to tcpmuxd; it may be gone (it gave up waiting): nothing to do."""
        try:
            channel.send(passfd.answer(kind, text), socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
        except OSError:
            pass


async def _serve(listener: socket.socket, args: argparse.Namespace,
                 environ: Mapping[str, str], log: systemd.EventLog) -> None:
    helper = Helper(listener, args.command, allowed_users=args.allow_user or
                    DEFAULT_ALLOWED_USERS, max_handlers=args.max_handlers,
                    handover_timeout=args.handover_timeout, environ=environ, log=log)
    helper.start()
    notifier = systemd.Notifier(environ)
    notifier.ready(f"serving {' '.join(args.command) or 'nothing (no command)'}")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        helper.loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    notifier.stopping()
    helper.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    environ = dict(os.environ)
    log = systemd.EventLog(environ, IDENTIFIER)
    try:
        listeners = systemd.passed_sockets(environ).listeners
    except (OSError, RuntimeError) as e:
        print(f"{IDENTIFIER}: cannot use the sockets systemd passed: {e}", file=sys.stderr)
        return 1
    if len(listeners) != 1 or listeners[0][0].family != socket.AF_UNIX:
        print(f"{IDENTIFIER}: expects one listening unix socket from systemd "
              "(tcpmuxd-handler@NAME.socket, Accept=no; or systemd-socket-activate -l PATH), "
              f"got {len(listeners)} listening sockets", file=sys.stderr)
        return 2
    reset_signals()
    asyncio.run(_serve(listeners[0][0], args, environ, log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
