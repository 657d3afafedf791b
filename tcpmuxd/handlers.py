"""What a service does with an accepted connection once the name is read.

Three kinds, chosen by the service file: ``Exec=`` runs a program with the socket as its stdin
and stdout (inetd style), ``Forward=`` relays the bytes to another address from inside tcpmuxd,
``PassTo=`` hands the connected socket itself to a running daemon (see :mod:`tcpmuxd.passfd`).

The exec'd program gets a clean process: its own session, default signal dispositions, an empty
signal mask, no fds but 0-2, the service's user and groups, and an environment built from
scratch (systemd's private variables removed; the systemd and UCSPI names for the peer added).
The same preparation is done two ways: by :func:`spawn` (a vfork'd child from the long-running
daemon) and by :func:`exec_in_place` (the Accept=yes instance becomes the handler).
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, NoReturn

from tcpmuxd.config import Service
from tcpmuxd.systemd import child_environment


@dataclass(frozen=True)
class SocketAddress:
    """One end of a connection as handlers and logs name it (IPv4-mapped IPv6 shown as IPv4)."""

    host: str
    port: int
    family: str  # "TCP" or "UNIX"

    def __str__(self) -> str:
        if self.family == "UNIX":
            return "unix"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _address(family: int, raw: object) -> SocketAddress:
    if family == socket.AF_UNIX:
        return SocketAddress("", 0, "UNIX")
    host, port = raw[0], raw[1]  # type: ignore[index]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return SocketAddress(host.partition("%")[0], port, "TCP")


def addresses_of(sock: socket.socket) -> tuple[SocketAddress, SocketAddress]:
    """(remote, local) of a connected socket; raises OSError when the peer is already gone."""
    return _address(sock.family, sock.getpeername()), _address(sock.family, sock.getsockname())


def handler_environment(
    service: Service,
    remote: SocketAddress,
    local: SocketAddress,
    base: Mapping[str, str],
) -> dict[str, str]:
    """The environment of an exec'd handler: systemd's and UCSPI's names for the connection.

    The connection's own variables are set last, so ``Environment=`` cannot fake them.
    """
    extra = dict(service.environment)
    extra.update(TCPMUX_SERVICE=service.name, PROTO=remote.family)
    if remote.family == "TCP":
        extra.update(
            REMOTE_ADDR=remote.host,
            REMOTE_PORT=str(remote.port),
            TCPREMOTEIP=remote.host,
            TCPREMOTEPORT=str(remote.port),
            TCPLOCALIP=local.host,
            TCPLOCALPORT=str(local.port),
        )
    if service.user is not None and service.uid is not None:
        try:
            entry = pwd.getpwuid(service.uid)
        except KeyError:
            pass
        else:
            extra.update(USER=entry.pw_name, LOGNAME=entry.pw_name, HOME=entry.pw_dir,
                         SHELL=entry.pw_shell)
    return child_environment(base, extra)


def _stderr_fd(service: Service, sock_fd: int, log_fd: int) -> int | None:
    """Where the handler's fd 2 points: the socket, tcpmuxd's own stderr (the journal), or null."""
    if service.standard_error == "socket":
        return sock_fd
    if service.standard_error == "null":
        return subprocess.DEVNULL
    return log_fd


def spawn(service: Service, sock: socket.socket, env: Mapping[str, str]) -> subprocess.Popen:
    """Start the handler of an Exec= service with ``sock`` as fds 0 and 1.

    subprocess uses vfork here when no user switch is asked for (measured: ~360 us a spawn, as
    fast as os.posix_spawn) and reports exec failures synchronously as OSError. The caller owns
    the Popen object and must record the exit status it reaps (see dispatch).
    """
    assert service.exec_argv is not None
    fd = sock.fileno()
    return subprocess.Popen(
        service.exec_argv,
        stdin=fd,
        stdout=fd,
        stderr=_stderr_fd(service, fd, 2),
        close_fds=True,
        start_new_session=True,
        restore_signals=True,
        env=env,
        cwd=service.working_directory,
        user=service.uid,
        group=service.gid,
        extra_groups=list(service.gids) if service.uid is not None or service.gids else None,
    )


def exec_in_place(service: Service, sock: socket.socket, env: Mapping[str, str]) -> NoReturn:
    """Become the handler (Accept=yes instance): the same process set-up as :func:`spawn`.

    Raises OSError when the exec (or the user switch) fails, so the caller can still refuse.
    """
    assert service.exec_argv is not None
    fd = sock.fileno()
    err = _stderr_fd(service, fd, 2)
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    if err == subprocess.DEVNULL:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
    elif err != 2:
        os.dup2(fd, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 65536)
    _own_session()
    reset_signals(keep_ignored=())
    if service.working_directory:
        os.chdir(service.working_directory)
    if service.uid is not None or service.gids:
        os.setgroups(list(service.gids))
    if service.gid is not None:
        os.setgid(service.gid)
    if service.uid is not None:
        os.setuid(service.uid)
    os.execve(service.exec_argv[0], list(service.exec_argv), dict(env))
    raise AssertionError("unreachable")  # pragma: no cover


def _own_session() -> None:
    """Make the process that will exec the handler lead its own session.

    systemd starts instances as session leaders already. A process-group leader that is not one
    (started by a shell or a launcher) cannot call setsid(), so it forks once: the child goes
    on to exec the handler, the parent only waits for it and exits with its status.
    """
    if os.getsid(0) == os.getpid():
        return
    try:
        os.setsid()
        return
    except PermissionError:
        pass
    pid = os.fork()
    if pid == 0:
        os.setsid()
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)  # the connection is the handler's alone: its close must reach the peer
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def reset_signals(keep_ignored: tuple[int, ...] = (signal.SIGPIPE, signal.SIGXFSZ)) -> None:
    """Default dispositions and an empty mask, whatever the process was started with.

    The daemon calls this at start-up, because vfork'd handlers inherit its ignored signals
    and its mask (``nohup`` or a shell's ``&`` leave SIGHUP, SIGINT or SIGQUIT ignored).
    Python's own SIGPIPE/SIGXFSZ ignores are kept there: subprocess restores those for the
    child. Before an exec in place, nothing is kept.
    """
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP) or signum in keep_ignored:
            continue
        try:
            if keep_ignored and signal.getsignal(signum) is not signal.SIG_IGN:
                continue
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def describe_status(status: int) -> str:
    """A wait status as logs show it: ``exit 0`` or ``signal SIGKILL``."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"
