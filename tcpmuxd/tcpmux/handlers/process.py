"""The handler's process for Exec=: made by the daemon (:func:`spawn`) or in place of an
Accept=yes instance (:func:`exec_in_place`), the same way.

The exec'd program gets a clean process: its own session, default signal dispositions, an empty
signal mask, no fds but 0-2, the service's user and groups, and an environment built from
scratch (:meth:`~tcpmuxd.tcpmux.handlers.exec.Exec.environment`).

The ``+`` reply (``Acknowledge=yes``) is written by the process that becomes the handler, after
every step that can fail for want of resources (the fork, the user switch, the process limit
of the new user) and right before the exec, never by the daemon before it: a client that gets
``+`` has a handler, one whose handler could not be started gets ``-handler failed to start``.
The handler's output cannot overtake the ``+``, because the ``+`` is written before the program
runs, and the client's bytes behind the name stay unread in the socket for the program. Only the
exec itself can still fail after the ``+`` (the program was checked to be executable; what is
left is, for instance, a script whose interpreter is missing): such a connection is reset and
logged (:class:`~tcpmuxd.tcpmux.handlers.base.StartError` with ``replied``).

tcpmuxd-handler(8), which runs a ``Unit=`` service's handlers in their own unit, also passes a
``commit`` channel to :func:`spawn`: the same process writes ``+PID`` there (tcpmuxd.passfd)
right before its ``+``, and gives up before the ``+`` when that write fails (tcpmuxd no longer
waits, and may have answered ``-`` already), so tcpmuxd knows for certain whether a ``+`` can
have gone out.
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import TYPE_CHECKING, Callable, Mapping, NoReturn

from tcpmuxd import passfd
from tcpmuxd.common.children import reset_signals
from tcpmuxd.tcpmux.handlers.base import StartError, oserror_text
from tcpmuxd.tcpmux.protocol import positive

if TYPE_CHECKING:
    from tcpmuxd.tcpmux.handlers.exec import Exec

#: PF_NPROC_EXCEEDED, a flag of the task in /proc/self/stat (include/linux/sched.h): setuid()
#: to a user already at RLIMIT_NPROC succeeds but sets it, and the next execve() then fails
#: with EAGAIN. Checked before the ``+`` so that such a client is refused instead.
PF_NPROC_EXCEEDED = 0x00001000


def _stderr_fd(handler: Exec, sock_fd: int, log_fd: int) -> int | None:
    """Where the handler's fd 2 points: the socket, tcpmuxd's own stderr (the journal), or null."""
    if handler.standard_error == "socket":
        return sock_fd
    if handler.standard_error == "null":
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


def _process_limit_reason(handler: Exec) -> str:
    return f"user {handler.user} is at its process limit (RLIMIT_NPROC)"


def _acknowledge_in_child(handler: Exec, acknowledge: bool,
                          commit: int | None) -> Callable[[], None]:
    """The ``preexec_fn`` that answers ``+`` from the child: subprocess runs it after the fork,
    the new session and the user switch, right before closing descriptors and exec'ing. With
    ``commit`` (a channel to tcpmuxd), it first writes ``+PID`` there.

    It raises (and subprocess reports that to the parent as SubprocessError) only before
    anything is sent to the client: when the new user is over its process limit, or when the
    commit cannot be written. A client that is gone already is not its concern: the handler
    finds that out by itself, as it would a moment later.
    """
    switches_user = handler.uid is not None

    def before_exec() -> None:
        if switches_user and _over_process_limit():
            raise OSError("process limit")
        if commit is not None:
            line = passfd.answer(passfd.COMMITTED, str(os.getpid()))
            channel = socket.socket(fileno=commit)
            try:
                channel.send(line, socket.MSG_NOSIGNAL)  # raises: no "+" for this client
            finally:
                channel.detach()
        if not acknowledge:
            return
        out = socket.socket(fileno=1)  # the connection; MSG_NOSIGNAL: SIGPIPE is default here
        try:
            out.send(positive(), socket.MSG_NOSIGNAL)
        except OSError:
            pass
        finally:
            out.detach()

    return before_exec


def spawn(handler: Exec, acknowledge: bool, sock: socket.socket,
          env: Mapping[str, str], commit: int | None = None) -> subprocess.Popen[bytes]:
    """Start the handler of an Exec= service with ``sock`` (blocking) as fds 0 and 1; with
    ``Acknowledge=yes`` the child sends the ``+`` just before its exec (module docstring), and
    with ``commit`` writes ``+PID`` to that descriptor before (``replied`` then also means
    "committed").

    Raises :class:`StartError`. With Acknowledge=no and no user switch, subprocess uses vfork
    (measured: ~360 us a spawn, as fast as os.posix_spawn); the ``+`` from the child needs a
    preexec_fn, and so a fork of the whole daemon, which costs: bench/dispatch.py, Exec=/bin/date,
    3 rounds of 500 on the 2-vCPU test VM, before -> after this change: 608 -> 324 conn/s
    sequential, 1036 -> 435 with 4 clients, daemon CPU 403 -> 1020 us per connection. Exec
    failures are reported synchronously. The caller owns the Popen object and must record the
    exit status it reaps (Exec.start: the connection watches it).
    """
    fd = sock.fileno()
    preexec = (_acknowledge_in_child(handler, acknowledge, commit)
               if acknowledge or commit is not None else None)
    try:
        return subprocess.Popen(
            handler.argv,
            stdin=fd,
            stdout=fd,
            stderr=_stderr_fd(handler, fd, 2),
            close_fds=True,
            start_new_session=True,
            restore_signals=True,
            env=env,
            cwd=handler.working_directory,
            user=handler.uid,
            group=handler.gid,
            extra_groups=list(handler.gids) if handler.uid is not None or handler.gids else None,
            preexec_fn=preexec,
        )
    except subprocess.SubprocessError:  # only our preexec_fn raises, before sending anything
        if handler.uid is None:  # no user switch, so no process limit: the commit failed
            raise StartError("tcpmuxd stopped waiting before the handler started") from None
        raise StartError(_process_limit_reason(handler)) from None
    except OSError as e:
        # subprocess names the program in the error only when the exec itself failed, which is
        # after the preexec_fn, i.e. after the "+" (a chdir or user switch failure names the
        # working directory, a failed pipe or fork nothing).
        replied = preexec is not None and e.filename == handler.argv[0]
        raise StartError(oserror_text(e), replied) from None


def exec_in_place(handler: Exec, acknowledge: bool, sock: socket.socket,
                  env: Mapping[str, str]) -> NoReturn:
    """Become the handler (Accept=yes instance): the same process set-up as :func:`spawn`,
    and with ``Acknowledge=yes`` the ``+`` sent after the last step that can fail but the exec.

    The connection is fds 0 and 1 from the start (``sock`` itself is closed with every other
    descriptor). Raises :class:`StartError` when a step fails, so the caller can still refuse
    (on fd 1) when ``replied`` is false.
    """
    fd = sock.fileno()
    err = _stderr_fd(handler, fd, 2)
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
        if handler.working_directory:
            os.chdir(handler.working_directory)
        if handler.uid is not None or handler.gids:
            os.setgroups(list(handler.gids))
        if handler.gid is not None:
            os.setgid(handler.gid)
        if handler.uid is not None:
            os.setuid(handler.uid)
    except OSError as e:
        raise StartError(oserror_text(e)) from None
    if handler.uid is not None and _over_process_limit():
        raise StartError(_process_limit_reason(handler))
    replied = False
    if acknowledge:
        out = socket.socket(fileno=1)
        try:
            out.sendall(positive(), socket.MSG_NOSIGNAL)
            replied = True
        except OSError:
            pass  # the client is gone; the handler finds out by itself
        finally:
            out.detach()
    try:
        os.execve(handler.argv[0], list(handler.argv), dict(env))
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
