"""Child processes of an asyncio daemon: their exit noticed and reaped at once, their end.

Every child either daemon starts and keeps an eye on goes through here: tcpmuxd's Exec=
handlers (dispatch), sockmuxd's exec exits and command links. A child is watched through a
pidfd (readable once the process exits) and reaped by its own pid with ``Popen.poll()``, never
with a SIGCHLD handler and ``waitpid(-1)``: a handler is process-wide and would reap children
that other code waits for (sockmuxd embeds tcpmuxd's dispatcher and has children of its own;
subprocess in a thread), and some loops refuse one (uvloop). Where no pidfd can be opened (out
of descriptors, a kernel before 5.3) the process is polled instead.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from typing import Any, Callable

__all__ = ["Child", "ExitWatch", "exit_text", "reset_signals"]


class ExitWatch:
    """Calls ``on_exit()`` once, after ``proc`` has exited and ``proc.poll()`` reaped it.

    ``poll_interval`` is how often the process is polled when no pidfd could be opened.
    :meth:`cancel` stops watching (idempotent; also done before ``on_exit`` runs).
    """

    __slots__ = ("loop", "proc", "on_exit", "poll_interval", "_pidfd", "_poll")

    def __init__(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[Any],
                 on_exit: Callable[[], None], poll_interval: float) -> None:
        self.loop = loop
        self.proc = proc
        self.on_exit = on_exit
        self.poll_interval = poll_interval
        self._pidfd = -1
        self._poll: asyncio.TimerHandle | None = None
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self._poll = loop.call_later(poll_interval, self._check)
        else:
            loop.add_reader(self._pidfd, self._check)

    def _check(self) -> None:
        self._poll = None
        # poll() waits for this pid only; it also copes with a child already reaped by someone
        # else (ECHILD: the status is lost, subprocess reports 0)
        if self.proc.poll() is None:
            if self._pidfd < 0:
                self._poll = self.loop.call_later(self.poll_interval, self._check)
            return
        self.cancel()
        self.on_exit()

    def cancel(self) -> None:
        if self._pidfd >= 0:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None


class Child:
    """One child process, reaped the moment it exits and, when asked, made to end.

    ``on_exit(child)`` runs once, after the process has exited and been reaped (``returncode``
    is set), unless :meth:`cancel` or :meth:`kill_now` came first. :meth:`end` asks it to end
    after a grace period (SIGTERM, then SIGKILL); with ``process_group`` the signals go to its
    process group (a child started in its own session: whatever it started ends with it).
    ``on_signal(signum)`` runs before either signal is sent, for the caller's log.
    """

    __slots__ = ("loop", "proc", "process_group", "on_exit", "on_signal", "_watch", "_timer",
                 "_waiters", "_over")

    def __init__(self, loop: asyncio.AbstractEventLoop, proc: subprocess.Popen[Any], *,
                 poll_interval: float, on_exit: Callable[[Child], None] | None = None,
                 process_group: bool = False,
                 on_signal: Callable[[int], None] | None = None) -> None:
        self.loop = loop
        self.proc = proc
        self.process_group = process_group
        self.on_exit = on_exit
        self.on_signal = on_signal
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: list[Callable[[], None]] = []
        self._over = False  # exited and reported, or no longer ours to watch
        self._watch = ExitWatch(loop, proc, self._exited, poll_interval)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; the exit status, or -SIGNUM when a signal ended it."""
        return self.proc.returncode

    def _exited(self) -> None:
        if self._over:
            return
        self.cancel()
        if self.on_exit is not None:
            self.on_exit(self)
        waiters, self._waiters = self._waiters, []
        for then in waiters:
            then()

    def cancel(self) -> None:
        """Stop watching and signalling (idempotent): the process, if it still runs, goes on
        without us (tcpmuxd's handlers outlive a stopping daemon in their own sessions)."""
        self._over = True
        self._watch.cancel()
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()  # harmless for the timer that is running this call
            self._timer = None

    def end(self, grace: float, kill_grace: float,
            then: Callable[[], None] | None = None) -> None:
        """Give it ``grace`` seconds to exit by itself, then SIGTERM, and ``kill_grace`` seconds
        after that SIGKILL; ``then()`` once it has been reaped (at once if it has been). Asking
        again adds ``then`` and keeps the first deadline."""
        if self._reaped_now():
            if then is not None:
                then()
            return
        if then is not None:
            self._waiters.append(then)
        if self._timer is None:
            self._timer = self.loop.call_later(grace, self.terminate, kill_grace)

    def terminate(self, kill_grace: float) -> None:
        """SIGTERM now, and SIGKILL ``kill_grace`` seconds later unless it has exited."""
        self._cancel_timer()
        if self._reaped_now():
            return
        self._signal(signal.SIGTERM)
        self._timer = self.loop.call_later(kill_grace, self._kill)

    def _kill(self) -> None:
        self._cancel_timer()
        if not self._reaped_now():
            self._signal(signal.SIGKILL)  # the watch reaps it

    def _reaped_now(self) -> bool:
        """Whether it has exited (reporting it now if the watch has not yet)."""
        if self._over:
            return True
        if self.proc.poll() is None:
            return False
        self._exited()
        return True

    def _signal(self, signum: int) -> None:
        if self.on_signal is not None:
            self.on_signal(signum)
        if self.process_group:
            try:
                os.killpg(self.proc.pid, signum)
                return
            except OSError:
                pass  # its group is gone or not its own: the process itself, then
        try:
            self.proc.send_signal(signum)
        except OSError:
            pass

    def kill_now(self) -> None:
        """Error and shut-down path: SIGKILL and reap before returning (bounded: a process that
        SIGKILL does not end within 5 s, stuck in the kernel, is left). ``on_exit`` does not
        run: the caller, which is ending it, knows."""
        self.cancel()
        if self.proc.returncode is None:
            self._signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9; the number, as text, for one Python does not name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def exit_text(returncode: int) -> str:
    """How logs write a child's end: ``exit 0``, or ``signal SIGKILL`` (``Popen.returncode``)."""
    return f"exit {returncode}" if returncode >= 0 else f"signal {signal_name(-returncode)}"


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
