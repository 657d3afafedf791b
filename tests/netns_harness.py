"""Test hosts in network namespaces made by the test: create and delete them, run threads and
processes inside, and read those processes' output as it comes.

Used by the tests that need more than one "host", or a private loopback (a DeleGate peer
resolves names at start-up and must not see the machine's network). Only namespaces made here
are touched, never the host's own interfaces or routes; each is deleted by its test, and at exit
as a last resort. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN): :func:`add_namespace` returns
the reason to skip where that is not allowed.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

NETNS_DIR = Path("/var/run/netns")
ROOT = Path(__file__).resolve().parents[1]
CLONE_NEWNET = 0x40000000

_T = TypeVar("_T")
_LIVE_NAMESPACES: set[str] = set()
_SEQ = iter(range(1, 1 << 30))
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out


def namespace_name(prefix: str) -> str:
    """A name no other test run uses: ``PREFIX-PID-N``."""
    return f"{prefix}-{os.getpid()}-{next(_SEQ)}"


def add_namespace(name: str, loopback: bool = True) -> str | None:
    """Create namespace ``name`` (its loopback up); the reason to skip if that is not
    possible here, else None. Delete it with :func:`delete_namespace`."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    out = ip("netns", "add", name, check=False)
    if out.returncode != 0:
        return (f"cannot create a network namespace (needs root / CAP_SYS_ADMIN and "
                f"CAP_NET_ADMIN): ip netns add {name}: {out.stderr.strip()}")
    _LIVE_NAMESPACES.add(name)
    if loopback:
        ip("-n", name, "link", "set", "lo", "up")
    try:
        in_netns(name, socket.if_nameindex)
    except OSError as exc:
        return f"cannot enter a network namespace from a thread (setns): {exc}"
    return None


def delete_namespace(name: str) -> None:
    if name in _LIVE_NAMESPACES:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=15)
        _LIVE_NAMESPACES.discard(name)


@atexit.register
def _delete_leftover_namespaces() -> None:  # belt and braces: a test's finalizer does it
    for name in list(_LIVE_NAMESPACES):
        delete_namespace(name)


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace ``name``."""
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "setns"):  # Python 3.12
            os.setns(fd, CLONE_NEWNET)
        elif _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(name: str, fn: Callable[[], _T], timeout: float = 10.0) -> _T:
    """Run ``fn()`` in a fresh thread inside namespace ``name``; its result or exception.
    (A socket keeps the namespace it was made in: one made here can be used anywhere.)"""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            enter_netns(name)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if "error" in box:
        raise box["error"]
    if "value" not in box:
        raise TimeoutError(f"in_netns({name}) did not finish within {timeout} s")
    return box["value"]


def wait_for_port(ns: str, port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> bool:
    """True once something accepts connections on ``host:port`` inside ``ns``."""
    def probe() -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    return in_netns(ns, probe, timeout + 5)


class NsProc:
    """A process run with ``ip netns exec NS`` in its own session; its output lines
    time-stamped (monotonic) as they come, and kept in a log file."""

    def __init__(self, name: str, ns: str, argv: list[str], log: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.ns = ns
        self.argv = argv
        self.log = log
        self.lines: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("LISTEN_", "WATCHDOG_"))
                   and k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
        environ.update(env or {})
        self.p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  start_new_session=True, env=environ, cwd=cwd or ROOT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log, "a", encoding="utf-8", errors="replace") as out:
            for raw in self.p.stdout:  # type: ignore[union-attr]
                line = raw.decode(errors="replace").rstrip("\n")
                now = time.monotonic()
                out.write(f"{now:.3f} {line}\n")
                out.flush()
                with self.cond:
                    self.lines.append((now, line))
                    self.cond.notify_all()
                self.on_line(now, line)

    def on_line(self, now: float, line: str) -> None:
        pass

    def wait_line(self, pattern: str, after: float, timeout: float):
        """(time, match) of the first line after ``after`` that matches; None on timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, line in self.lines:
                    if t >= after and (m := rx.search(line)):
                        return t, m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.2))

    def wait_matches(self, pattern: str, after: float, count: int,
                     timeout: float) -> list[re.Match]:
        """Every line after ``after`` that matches, once there are ``count`` of them or the
        timeout has passed. A daemon writes a link's loss before the streams it ended, and
        the reader thread may hand the test the first line before the others."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for t, line in self.lines if t >= after and (m := rx.search(line))]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self.cond.wait(min(left, 0.2))

    def matches(self, pattern: str, after: float = 0.0) -> list[re.Match]:
        """Every line so far (after ``after``) that matches, without waiting."""
        rx = re.compile(pattern)
        with self.cond:
            return [m for t, line in self.lines if t >= after and (m := rx.search(line))]

    def text(self) -> str:
        with self.cond:
            return "\n".join(f"{t:.3f} {line}" for t, line in self.lines)

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        """SIGKILL to its process group (``ip netns exec`` execs the program: same pid), so
        that children it forked (a DeleGate receptor forks one per link) go too."""
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.reader.join(5)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to its process group, SIGKILL after ``timeout``."""
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.p.returncode
