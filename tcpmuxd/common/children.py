"""Noticing that a child process exited, inside an asyncio loop, and reaping it at once.

Through a pidfd (readable once the process exits), so no SIGCHLD handler is needed: a handler
is process-wide and would race with other code that waits for its own children (tcpmuxd's
dispatcher, subprocess in a thread). Where no pidfd can be opened (out of descriptors, a kernel
before 5.3) the process is polled instead. sockmuxd's exec exits and command links use it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from typing import Any, Callable

__all__ = ["ExitWatch", "reset_signals"]


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
        # poll() also tolerates a child someone else reaped (tcpmuxd's dispatcher reaps with -1)
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
