"""What a service does with an accepted connection once the name is read.

Three kinds, chosen by the service file: ``Exec=`` runs a program with the socket as its stdin
and stdout (inetd style), ``Forward=`` relays the bytes to another address from inside tcpmuxd,
``PassTo=`` hands the connected socket itself to a running daemon (see :mod:`tcpmuxd.passfd`).

The exec'd program gets a clean process: its own session, default signal dispositions, an empty
signal mask, no fds but 0-2, the service's user and groups, and an environment built from
scratch (systemd's private variables removed; the systemd and UCSPI names for the peer added).
The same preparation is done two ways: by :func:`spawn` (a child of the long-running daemon) and
by :func:`exec_in_place` (the Accept=yes instance becomes the handler).

The ``+`` reply (``Acknowledge=yes``) is written by the process that becomes the handler, after
every step that can fail for want of resources (the fork, the user switch, the process limit
of the new user) and right before the exec, never by the daemon before it: a client that gets
``+`` has a handler, one whose handler could not be started gets ``-handler failed to start``.
The handler's output cannot overtake the ``+``, because the ``+`` is written before the program
runs, and the client's bytes behind the name stay unread in the socket for the program. Only the
exec itself can still fail after the ``+`` (the program was checked to be executable; what is
left is, for instance, a script whose interpreter is missing): such a connection is reset and
logged (:class:`StartError` with ``replied``).
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from typing import Callable, Mapping, NoReturn

from tcpmuxd.common.addresses import SocketAddress
from tcpmuxd.common.children import reset_signals
from tcpmuxd.common.systemd import child_environment
from tcpmuxd.tcpmux.config import Service
from tcpmuxd.tcpmux.protocol import positive

#: PF_NPROC_EXCEEDED, a flag of the task in /proc/self/stat (include/linux/sched.h): setuid()
#: to a user already at RLIMIT_NPROC succeeds but sets it, and the next execve() then fails
#: with EAGAIN. Checked before the ``+`` so that such a client is refused instead.
PF_NPROC_EXCEEDED = 0x00001000


class StartError(Exception):
    """The handler did not start: ``reason`` is for the ``-`` reply and the log.

    ``replied``: the ``+`` had already been sent (the exec itself failed after it), so the
    client can no longer be told with a ``-`` line.
    """

    def __init__(self, reason: str, replied: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.replied = replied


def oserror_text(e: OSError) -> str:
    """The errno's own words ("Connection refused"), not a wrapper's text."""
    return os.strerror(e.errno) if e.errno else str(e)


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


def _over_process_limit() -> bool:
    """Whether the user switch just flagged this process as over RLIMIT_NPROC (see
    :data:`PF_NPROC_EXCEEDED`); False when /proc cannot tell."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[6]) & PF_NPROC_EXCEEDED != 0
    except (OSError, ValueError, IndexError):
        return False


def _process_limit_reason(service: Service) -> str:
    return f"user {service.user} is at its process limit (RLIMIT_NPROC)"


def _acknowledge_in_child(service: Service) -> Callable[[], None]:
    """The ``preexec_fn`` that answers ``+`` from the child: subprocess runs it after the fork,
    the new session and the user switch, right before closing descriptors and exec'ing.

    It raises (and subprocess reports that to the parent as SubprocessError) only when the new
    user is over its process limit, before anything is sent. A client that is gone already is
    not its concern: the handler finds that out by itself, as it would a moment later.
    """
    switches_user = service.uid is not None

    def acknowledge() -> None:
        if switches_user and _over_process_limit():
            raise OSError("process limit")
        out = socket.socket(fileno=1)  # the connection; MSG_NOSIGNAL: SIGPIPE is default here
        try:
            out.send(positive(), socket.MSG_NOSIGNAL)
        except OSError:
            pass
        finally:
            out.detach()

    return acknowledge


def spawn(service: Service, sock: socket.socket, env: Mapping[str, str]) -> subprocess.Popen:
    """Start the handler of an Exec= service with ``sock`` (blocking) as fds 0 and 1; with
    ``Acknowledge=yes`` the child sends the ``+`` just before its exec (module docstring).

    Raises :class:`StartError`. With Acknowledge=no and no user switch, subprocess uses vfork
    (measured: ~360 us a spawn, as fast as os.posix_spawn); the ``+`` from the child needs a
    preexec_fn, and so a fork of the whole daemon, which costs: bench/dispatch.py, Exec=/bin/date,
    3 rounds of 500 on the 2-vCPU test VM, before -> after this change: 608 -> 324 conn/s
    sequential, 1036 -> 435 with 4 clients, daemon CPU 403 -> 1020 us per connection. Exec
    failures are reported synchronously. The caller owns the Popen object and must record the
    exit status it reaps (see dispatch).
    """
    assert service.exec_argv is not None
    fd = sock.fileno()
    preexec = _acknowledge_in_child(service) if service.acknowledge else None
    try:
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
            preexec_fn=preexec,
        )
    except subprocess.SubprocessError:  # only our preexec_fn raises, before sending anything
        raise StartError(_process_limit_reason(service)) from None
    except OSError as e:
        # subprocess names the program in the error only when the exec itself failed, which is
        # after the preexec_fn, i.e. after the "+" (a chdir or user switch failure names the
        # working directory, a failed pipe or fork nothing).
        replied = preexec is not None and e.filename == service.exec_argv[0]
        raise StartError(oserror_text(e), replied) from None


def exec_in_place(service: Service, sock: socket.socket, env: Mapping[str, str]) -> NoReturn:
    """Become the handler (Accept=yes instance): the same process set-up as :func:`spawn`,
    and with ``Acknowledge=yes`` the ``+`` sent after the last step that can fail but the exec.

    The connection is fds 0 and 1 from the start (``sock`` itself is closed with every other
    descriptor). Raises :class:`StartError` when a step fails, so the caller can still refuse
    (on fd 1) when ``replied`` is false.
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
    try:
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
    except OSError as e:
        raise StartError(oserror_text(e)) from None
    if service.uid is not None and _over_process_limit():
        raise StartError(_process_limit_reason(service))
    replied = False
    if service.acknowledge:
        out = socket.socket(fileno=1)
        try:
            out.sendall(positive(), socket.MSG_NOSIGNAL)
            replied = True
        except OSError:
            pass  # the client is gone; the handler finds out by itself
        finally:
            out.detach()
    try:
        os.execve(service.exec_argv[0], list(service.exec_argv), dict(env))
    except OSError as e:
        raise StartError(oserror_text(e), replied) from None
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
