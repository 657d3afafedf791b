"""Test helpers: a real tcpmuxd process on loopback, service files, a notify socket, a client.

Everything here uses real processes and sockets on 127.0.0.1/::1 with ephemeral ports; every
process started is stopped (and its process group killed) when the test ends.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def native_modules() -> list[str]:
    """The modules mypyc compiles (pyproject.toml, [tool.sockmuxd-native]), as sorted dotted
    names: what the compiled build, from the tree or a package, must consist of."""
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["sockmuxd-native"]
    return sorted("tcpmuxd.sockmux." + Path(m).stem for m in listed["modules"])


def native_mypy() -> str:
    """The requirement ``mypy==VERSION`` that pyproject.toml's native extra pins: the one
    mypy that compiles sockmuxd here, in the development virtualenv and the package builds
    of tests/packaging alike."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["native"]
    (pin,) = [r for r in extra if r.startswith("mypy")]
    if not re.fullmatch(r"mypy==\d+(\.\d+)+", pin):
        raise ValueError(f"the native extra must pin one mypy (mypy==VERSION), not {pin!r}")
    return pin


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_service(directory: Path, filename: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def talk(port: int, data: bytes, host: str = "127.0.0.1", shut: bool = True,
         timeout: float = 5.0) -> bytes:
    """Connect, send ``data``, optionally half-close, read until EOF."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class NotifySocket:
    """A real sd_notify datagram socket, to read what tcpmuxd tells systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, field: str, timeout: float = 10.0) -> str:
        """Return the first message (old or new) that has the line ``field``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if field in message.split("\n"):
                    self.messages.remove(message)
                    return message
            seen = 0
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {field} within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue

    def close(self) -> None:
        self.sock.close()


class Notify:
    """A NOTIFY_SOCKET collected by a thread: every datagram, time-stamped, so that a test can
    wait for one that came after a moment (a path socket works across network namespaces)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.cond:
                self.messages.append((time.monotonic(), data.decode(errors="replace")))
                self.cond.notify_all()

    def wait(self, text: str, after: float, timeout: float) -> tuple[float, str] | None:
        """The first datagram since ``after`` (time.monotonic()) that contains ``text``, with
        when it came; None when none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, m in self.messages:
                    if t >= after and text in m:
                        return t, m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.2))

    def close(self) -> None:
        self.closed = True
        self.thread.join(2)
        self.sock.close()


class LogFile:
    """What a process under test wrote to ``log_path`` (its standard error), and a bounded
    wait for a text in it."""

    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.output()}")
            time.sleep(0.02)
        return self.output()

    def wait_for_match(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """The first match of the regular expression ``pattern`` in the output, waited for."""
        deadline = time.monotonic() + timeout
        while (hit := re.search(pattern, self.output())) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not logged within {timeout}s:\n"
                                     f"{self.output()}")
            time.sleep(0.02)
        return hit


class Daemon(LogFile):
    """tcpmuxd running standalone on loopback.

    Without ``port`` it binds port 0 and reads the port the kernel chose from its start-up line,
    so no other process can take the port between choosing and binding it. ``python`` and
    ``cwd`` (with PYTHONPATH in ``env``) run it from elsewhere, e.g. as another user
    (privileges.python_for_any_user).
    """

    _ids = itertools.count()

    def __init__(self, config_dir: Path, tmp: Path, args: list[str] | None = None,
                 env: dict[str, str] | None = None, preexec_fn=None, notify: bool = True,
                 port: int | None = None, python: str = PYTHON,
                 cwd: Path | str = ROOT) -> None:
        self.config_dir = config_dir
        self.port = port or 0
        ident = f"{os.getpid()}-{next(self._ids)}"
        self.log_path = tmp / f"tcpmuxd-{ident}.log"
        self.notify = NotifySocket(tmp / f"notify-{ident}") if notify else None
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))}
        if self.notify:
            environ["NOTIFY_SOCKET"] = str(self.notify.path)
        environ.update(env or {})
        argv = [python, "-m", "tcpmuxd", "--config-dir", str(config_dir),
                "--listen", f"127.0.0.1:{self.port}", *(args or [])]
        self.log = open(self.log_path, "w+b")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=environ,
                                     cwd=cwd, start_new_session=True, preexec_fn=preexec_fn)
        self.ready_message = ""
        try:
            if self.notify:
                self.ready_message = self.notify.wait_for("READY=1")
            started = self.wait_for_log("tcpmuxd: serving ", timeout=10)
            if not self.port:
                self.port = int(re.search(r"tcpmuxd: serving \d+ services? on 127\.0\.0\.1:(\d+)",
                                          started).group(1))
        except BaseException:
            self.stop()
            raise

    def talk(self, data: bytes, **kw) -> bytes:
        return talk(self.port, data, **kw)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def reload(self) -> None:
        assert self.notify is not None, "reload() needs the notify socket to know when it is done"
        self.signal(signal.SIGHUP)
        self.notify.wait_for("RELOADING=1")
        self.notify.wait_for("READY=1")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        if self.notify:
            self.notify.close()
        return self.proc.returncode


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes each connection, passes the client's EOF on after the last byte."""

    daemon_threads = True
    allow_reuse_address = True

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            s = self.request
            s.settimeout(60)
            try:
                while chunk := s.recv(1 << 16):
                    s.sendall(chunk)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), self.Handler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
