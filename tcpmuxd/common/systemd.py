"""The one place that talks to systemd: passed sockets, sd_notify, the watchdog, the journal.

Everything here reads the environment only from the mapping it is given, never from the
process's own (C) environment, so tests drive it with a dict and a daemon decides once what
it was started with (as nobodd's adapter does). The passed sockets (LISTEN_FDS, LISTEN_FDNAMES,
LISTEN_PID) and the notification socket (NOTIFY_SOCKET) are therefore read here rather than
through libsystemd, whose sd_listen_fds() and sd_notify() read the C environment; python-systemd
is used for the journal only. ``os.environ`` is left as it is, and children get an environment
built from scratch instead (:func:`child_environment`), which is why nothing of
LISTEN_*/NOTIFY_SOCKET/WATCHDOG_* leaks. Without systemd, every piece degrades to a no-op (or to
stderr, for logs).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from systemd import journal as _journal

#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3

#: Variables of tcpmuxd's own relation with systemd, which must not reach handlers: whole
#: families, since systemd adds members over time (LISTEN_FDNAMES came later than LISTEN_FDS).
PRIVATE_PREFIXES = ("LISTEN_", "WATCHDOG_")
PRIVATE_VARIABLES = frozenset({"NOTIFY_SOCKET", "MAINPID", "JOURNAL_STREAM"})


def is_private(name: str) -> bool:
    """True for a variable that describes tcpmuxd's process, not the handler's."""
    return name in PRIVATE_VARIABLES or name.startswith(PRIVATE_PREFIXES)


@dataclass
class PassedSockets:
    """Sockets systemd passed: listeners (Accept=no) or one connection (Accept=yes)."""

    listeners: list[tuple[socket.socket, str]] = field(default_factory=list)
    connection: socket.socket | None = None


def passed_sockets(environ: Mapping[str, str]) -> PassedSockets:
    """Collect LISTEN_FDS sockets, telling listeners from an accepted connection.

    Listening sockets report SO_ACCEPTCONN; anything else passed is the single connection of an
    Accept=yes instance. Sockets are made non-inheritable: only the handler fds we set up
    deliberately may cross an exec.
    """
    result = PassedSockets()
    for fd, name in listen_fds(environ).items():
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            result.listeners.append((sock, name or "unknown"))
        elif result.connection is None:
            result.connection = sock
        else:
            raise RuntimeError("more than one connected socket passed (Accept=yes passes one)")
    return result


def listen_fds(environ: Mapping[str, str]) -> dict[int, str]:
    """The descriptors systemd passed to this process and their names (FileDescriptorName=,
    "unknown" where none is given), as sd_listen_fds_with_names() reads them: only when
    LISTEN_PID names this process, so that a child that inherited the variables takes nothing.
    Raises RuntimeError for a LISTEN_FDS that is not a count."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    text = environ.get("LISTEN_FDS", "0")
    if not (text.isascii() and text.isdigit()):
        raise RuntimeError(f"LISTEN_FDS={text!r} is not a number of descriptors")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    return {LISTEN_FDS_START + i: (names[i] if i < len(names) and names[i] else "unknown")
            for i in range(int(text))}


def stdin_connection() -> socket.socket | None:
    """The connection on stdin when systemd started us with StandardInput=socket (inetd style)."""
    try:
        if not stat.S_ISSOCK(os.fstat(0).st_mode):
            return None
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        return None
    try:
        sock.getpeername()
    except OSError:
        sock.close()
        return None
    return sock


def child_environment(environ: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """A handler's environment: ours without systemd's private variables, plus ``extra``."""
    env = {k: v for k, v in environ.items() if not is_private(k)}
    env.update(extra)
    return env


class Notifier:
    """sd_notify messages; silent when there is no NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.address = self._address(environ.get("NOTIFY_SOCKET", ""))
        self.enabled = self.address is not None
        self.watchdog_interval = self._watchdog_interval(environ)

    @staticmethod
    def _address(value: str) -> str | None:
        """NOTIFY_SOCKET as connect() takes it: a path, or ``@name`` for an abstract socket.
        Other forms (``vsock:``, for virtual machines) are not for services: None."""
        if value.startswith("/"):
            return value
        if value.startswith("@") and len(value) > 1:
            return "\0" + value[1:]
        return None

    @staticmethod
    def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
        """Half of WatchdogSec=, as sd_watchdog_enabled() advises; None when not asked for."""
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2e6
        except ValueError:
            return None

    def send(self, *lines: str) -> None:
        """Best effort: a notification that cannot be sent (say, out of descriptors) must not
        break the caller; the next one, or the watchdog's next ping, gets through."""
        if self.address is None:
            return
        # A socket per message, as sd_notify() does: nothing held between messages.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        usec = int(_monotonic_usec())
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=Reloading configuration")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=Shutting down")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def _monotonic_usec() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6


def journal_is_stderr(environ: Mapping[str, str]) -> bool:
    """True when stderr is connected to the journal (systemd's JOURNAL_STREAM=dev:inode check)."""
    value = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class EventLog:
    """Structured records: journal fields when stderr is the journal, else one line on stderr.

    A record the journal refuses is written to stderr instead, so nothing is silently lost.
    """

    def __init__(self, environ: Mapping[str, str], identifier: str,
                 stream: Callable[[], object] = lambda: sys.stderr) -> None:
        self.to_journal = journal_is_stderr(environ)
        self.identifier = identifier
        self._stream = stream

    def record(self, message: str, priority: int = 6, **fields: object) -> None:
        if self.to_journal:
            try:
                _journal.send(
                    message,
                    PRIORITY=str(priority),
                    SYSLOG_IDENTIFIER=self.identifier,
                    **{k.upper(): str(v) for k, v in fields.items() if v is not None},
                )
                return
            except OSError:
                pass
        stream = self._stream()
        try:
            stream.write(f"{self.identifier}: {message}\n")  # type: ignore[attr-defined]
            stream.flush()  # type: ignore[attr-defined]
        except (OSError, ValueError):
            pass


#: Where systemd, as the init system, keeps its runtime state (sd_booted()'s test).
SYSTEMD_RUNTIME = "/run/systemd/system"


def unit_properties(unit: str, names: Sequence[str],
                    runtime_dir: str = SYSTEMD_RUNTIME) -> dict[str, str] | None:
    """``systemctl show UNIT`` for the properties ``names``; None when systemd does not manage
    ``unit`` here (not the init system, no systemctl, or no such unit loaded)."""
    systemctl = shutil.which("systemctl")
    if systemctl is None or not os.path.isdir(runtime_dir):
        return None
    try:
        out = subprocess.run([systemctl, "show", unit, "--property=" + ",".join(names)],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if out.returncode != 0 or props.get("LoadState", "loaded") != "loaded":
        return None
    return props
