"""What SIGTERM (systemctl stop, and the stop half of a restart) does to connections in flight.

tcpmuxd(8), SIGNALS: it stops accepting; a client still sending its name gets
``-server shutting down``; relays (Forward=) and connections on their way to a Forward=/PassTo=
target may finish for up to ``--stop-timeout`` seconds; what is left then is reset (RST) on both
ends and logged as cut, with its byte counts. Nothing ends as if it had ended normally.

A restart (what a package upgrade does) is a stop and a start with the listening socket kept by
systemd: connections that arrive meanwhile wait in its backlog and are served by the new
process. Here the test holds the listening socket, as systemd would, and passes it to both
processes (LISTEN_FDS).

Real sockets on loopback, real daemons; every wait is bounded and waits for an event (a log
line, a reply, a process exit), never a fixed sleep.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tcpmuxd_harness import PYTHON, ROOT, read_all, write_service

pytestmark = pytest.mark.timeout(90)

IO_TIMEOUT = 10.0
STOP_TIMEOUT = 1.5
#: How long after its deadline a cut may come (a loaded machine, the log being written).
SLACK = 3.0


class Upstream:
    """A Forward= target: per connection, sends ``size`` bytes (None: until the peer goes),
    then closes; records how each connection ended and how much it sent."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.sent = 0
        self.ended: str | None = None
        self.done = threading.Event()
        self.payload = os.urandom(1 << 20)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.settimeout(60)
        with conn:
            try:
                while self.size is None or self.sent < self.size:
                    chunk = self.payload if self.size is None else \
                        self.payload[: min(len(self.payload), self.size - self.sent)]
                    conn.sendall(chunk)
                    self.sent += len(chunk)
                conn.shutdown(socket.SHUT_WR)
                self.ended = "eof sent"
            except (ConnectionResetError, BrokenPipeError):
                self.ended = "reset"
            except OSError as e:
                self.ended = f"error {e}"
        self.done.set()

    def expected(self) -> bytes:
        assert self.size is not None
        whole, rest = divmod(self.size, len(self.payload))
        return self.payload * whole + self.payload[:rest]

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def wait_quiet(read_counter, settle: float = 0.3, timeout: float = IO_TIMEOUT) -> int:
    """Wait until a growing counter stops growing (a relay backed up); its value then."""
    deadline = time.monotonic() + timeout
    last, since = read_counter(), time.monotonic()
    while time.monotonic() - since < settle:
        assert time.monotonic() < deadline, "the transfer never backed up"
        time.sleep(0.02)
        now = read_counter()
        if now != last:
            last, since = now, time.monotonic()
    return last


def read_until_end(s: socket.socket) -> tuple[int, str, bytes]:
    """(bytes read, "eof" or "reset", the bytes) reading everything that arrives."""
    data = bytearray()
    s.settimeout(IO_TIMEOUT)
    try:
        while chunk := s.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        return len(data), "reset", bytes(data)
    return len(data), "eof", bytes(data)


def relay_record(log: str, client_port: int) -> str:
    """The one record of the Forward= connection from ``client_port``."""
    lines = [line for line in log.splitlines() if f"127.0.0.1:{client_port} fwd: " in line]
    assert len(lines) == 1, log
    return lines[0]


def counts(record: str) -> tuple[int, int]:
    """(bytes in, bytes out) of a relay's record."""
    m = re.search(r"(\d+) bytes in, (\d+) bytes out", record)
    assert m, record
    return int(m.group(1)), int(m.group(2))


def forward_client(d, name: bytes = b"fwd") -> socket.socket:
    s = d.connect(timeout=IO_TIMEOUT)
    s.sendall(name + b"\r\n")
    assert s.recv(3) == b"+\r\n"
    return s


def test_backlogged_relay_is_reset_on_both_ends_at_the_stop_timeout(services: Path,
                                                                     daemon_factory):
    upstream = Upstream(size=None)  # sends until it is stopped
    try:
        write_service(services, "fwd.conf", f"[Service]\nForward=127.0.0.1:{upstream.port}\n")
        d = daemon_factory(services, "--stop-timeout", str(STOP_TIMEOUT))
        with forward_client(d) as client:
            port = client.getsockname()[1]
            wait_quiet(lambda: upstream.sent)  # the client reads nothing: the relay backs up
            stopped_at = time.monotonic()
            d.signal(signal.SIGTERM)
            d.wait_for_log("stopping: waiting up to 1.5s for 1 connection in flight")
            d.wait_for_log("cut (reset) at stop after 1.5s", timeout=STOP_TIMEOUT + SLACK)
            cut_after = time.monotonic() - stopped_at
            received, how, _data = read_until_end(client)
        assert STOP_TIMEOUT <= cut_after <= STOP_TIMEOUT + SLACK, cut_after
        assert how == "reset", "the client must see the cut as a reset, not an EOF"
        assert upstream.done.wait(IO_TIMEOUT) and upstream.ended == "reset", upstream.ended
        assert d.proc.wait(SLACK) == 0
        record = relay_record(d.output(), port)
        assert "accepted" in record and "cut (reset) at stop after 1.5s" in record, record
        bytes_in, bytes_out = counts(record)
        assert bytes_in == 0  # the client sent nothing behind its name
        # the client got at most what the relay had delivered, which is at most what was sent
        assert 0 < received <= bytes_out <= upstream.sent, (received, bytes_out, upstream.sent)
    finally:
        upstream.close()


def test_relay_that_ends_within_the_stop_timeout_delivers_everything(services: Path,
                                                                     daemon_factory):
    size = 48 << 20  # more than the socket buffers hold: the relay is busy when the stop comes
    upstream = Upstream(size=size)
    try:
        write_service(services, "fwd.conf", f"[Service]\nForward=127.0.0.1:{upstream.port}\n")
        d = daemon_factory(services, "--stop-timeout", "20")
        with forward_client(d) as client:
            port = client.getsockname()[1]
            wait_quiet(lambda: upstream.sent)
            assert upstream.sent < size, "the relay finished before the stop"
            d.signal(signal.SIGTERM)
            d.wait_for_log("stopping: waiting up to 20s for 1 connection in flight")
            # no new connections once stopping
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", d.port), timeout=IO_TIMEOUT).close()
            client.shutdown(socket.SHUT_WR)
            received, how, data = read_until_end(client)
        assert (received, how) == (size, "eof")
        assert hashlib.sha256(data).digest() == hashlib.sha256(upstream.expected()).digest()
        assert d.proc.wait(SLACK) == 0  # it exits as soon as the relay is over, not at 20 s
        record = relay_record(d.output(), port)
        assert "cut" not in record and counts(record) == (0, size), record
        assert d.output().rstrip().endswith("stopped")
    finally:
        upstream.close()


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_accepted(pid: int, before: int) -> None:
    """Wait until the daemon holds one more descriptor: it has accepted the connection."""
    deadline = time.monotonic() + IO_TIMEOUT
    while fd_count(pid) <= before:
        assert time.monotonic() < deadline, "the daemon did not accept the connection"
        time.sleep(0.01)


def test_a_client_still_sending_its_name_is_told_the_server_is_shutting_down(services: Path,
                                                                             daemon_factory):
    write_service(services, "echo.conf", "[Service]\nExec=/bin/cat\n")
    d = daemon_factory(services, "--stop-timeout", str(STOP_TIMEOUT), notify=False)
    before = fd_count(d.proc.pid)
    with d.connect(timeout=IO_TIMEOUT) as s:
        s.sendall(b"ec")  # part of a name: in the name phase
        wait_accepted(d.proc.pid, before)
        d.signal(signal.SIGTERM)
        assert read_all(s) == b"-server shutting down\r\n"
    assert d.proc.wait(SLACK) == 0
    assert "refused: server shutting down" in d.output()


def connecting_to(port: int) -> int:
    """How many sockets here are connecting (SYN_SENT) to 127.0.0.1:``port``."""
    needle = f"0100007F:{port:04X} 02"
    return sum(needle in line for line in Path("/proc/net/tcp").read_text().splitlines())


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + IO_TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_connect_to_the_target_unfinished_at_the_stop_timeout_is_refused(services: Path,
                                                                          daemon_factory):
    # A target whose accept queue is full: SYNs to it are dropped, connects hang.
    target = socket.socket()
    fillers: list[socket.socket] = []
    try:
        target.bind(("127.0.0.1", 0))
        target.listen(0)
        port = target.getsockname()[1]
        while connecting_to(port) == 0:
            assert len(fillers) < 8, "the target's accept queue does not fill up"
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
            time.sleep(0.05)
        hanging = connecting_to(port)
        write_service(services, "slow.conf",
                      f"[Service]\nForward=127.0.0.1:{port}\nConnectTimeoutSec=60\n")
        d = daemon_factory(services, "--stop-timeout", str(STOP_TIMEOUT))
        with d.connect(timeout=IO_TIMEOUT) as s:
            s.sendall(b"slow\r\n")
            wait_until(lambda: connecting_to(port) > hanging, "the daemon is not connecting")
            stopped_at = time.monotonic()
            d.signal(signal.SIGTERM)
            assert read_all(s) == b"-server shutting down\r\n"
            waited = time.monotonic() - stopped_at
        assert STOP_TIMEOUT <= waited <= STOP_TIMEOUT + SLACK, waited
        assert d.proc.wait(SLACK) == 0
        assert "slow: refused: server shutting down" in d.output(), d.output()
    finally:
        for f in fillers:
            f.close()
        target.close()


#: Started with the listening socket as fd 3 and LISTEN_FDS, as systemd starts tcpmuxd.service.
WITH_LISTEN_FD = r"""
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="tcpmux")
os.execv(sys.executable, [sys.executable, "-m", "tcpmuxd", *sys.argv[2:]])
"""


class Activated:
    """tcpmuxd given a listening socket the test holds (systemd's part in a restart)."""

    def __init__(self, listener: socket.socket, config: Path, log: Path, *args: str) -> None:
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [PYTHON, "-c", WITH_LISTEN_FD, str(listener.fileno()), "--config-dir",
                 str(config), *args], pass_fds=(listener.fileno(),), stdout=out, stderr=out,
                env=env, cwd=ROOT, start_new_session=True)
        self.wait_for_log("tcpmuxd: serving ")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = IO_TIMEOUT) -> str:
        wait_until(lambda: text in self.output(), f"{text!r} not logged:\n{self.output()}")
        return self.output()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def test_restart_finishes_relays_and_the_new_process_serves_who_came_meanwhile(
        services: Path, tmp_path: Path):
    """What a package upgrade does (systemctl restart tcpmuxd: stop, then start, the socket
    staying with systemd): the relay in flight is delivered whole, the client still sending
    its name is told, and a client that connects during the stop is served by the new
    process."""
    size = 48 << 20
    upstream = Upstream(size=size)
    listener = socket.socket()
    started: list[Activated] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        write_service(services, "fwd.conf", f"[Service]\nForward=127.0.0.1:{upstream.port}\n")
        write_service(services, "echo.conf", "[Service]\nExec=/bin/cat\n")
        old = Activated(listener, services, tmp_path / "old.log", "--stop-timeout", "20")
        started.append(old)

        relayed = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        naming = meanwhile = None
        try:
            relayed.sendall(b"fwd\r\n")
            assert relayed.recv(3) == b"+\r\n"
            wait_quiet(lambda: upstream.sent)
            before = fd_count(old.proc.pid)
            naming = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
            naming.sendall(b"ec")
            wait_accepted(old.proc.pid, before)
            old.proc.send_signal(signal.SIGTERM)
            old.wait_for_log("stopping: waiting up to 20s")
            assert read_all(naming) == b"-server shutting down\r\n"

            # The new client is queued by the kernel on the socket the test (systemd) holds.
            meanwhile = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
            meanwhile.sendall(b"echo\r\nserved by the new process")
            meanwhile.shutdown(socket.SHUT_WR)

            relayed.shutdown(socket.SHUT_WR)
            received, how, data = read_until_end(relayed)
            assert (received, how) == (size, "eof")
            assert hashlib.sha256(data).digest() == hashlib.sha256(upstream.expected()).digest()
            assert old.proc.wait(SLACK) == 0

            new = Activated(listener, services, tmp_path / "new.log")
            started.append(new)
            assert read_all(meanwhile) == b"+\r\nserved by the new process"
        finally:
            for s in (relayed, naming, meanwhile):
                if s is not None:
                    s.close()
        assert "cut" not in old.output(), old.output()
    finally:
        for a in started:
            a.kill()
        listener.close()
        upstream.close()


def test_accept_yes_instance_relay_is_cut_at_the_stop_timeout(services: Path, tmp_path: Path):
    """Accept=yes: the instance relaying a Forward= connection does the same on SIGTERM."""
    from test_exec_environment import socket_activate

    upstream = Upstream(size=None)
    try:
        write_service(services, "fwd.conf", f"[Service]\nForward=127.0.0.1:{upstream.port}\n")
        options = f"import sys; sys.argv += ['--stop-timeout', '{STOP_TIMEOUT}']\n"
        with socket_activate("accept", services, tmp_path, before_exec=options) as srv:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=IO_TIMEOUT) as client:
                client.sendall(b"fwd\r\n")
                assert client.recv(3) == b"+\r\n"
                wait_quiet(lambda: upstream.sent)
                children = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children")
                (instance,) = map(int, children.read_text().split())
                stopped_at = time.monotonic()
                os.kill(instance, signal.SIGTERM)
                srv.wait_for_log("cut (reset) at stop after 1.5s", timeout=STOP_TIMEOUT + SLACK)
                cut_after = time.monotonic() - stopped_at
                received, how, _data = read_until_end(client)
        assert STOP_TIMEOUT <= cut_after <= STOP_TIMEOUT + SLACK, cut_after
        assert how == "reset"
        assert upstream.done.wait(IO_TIMEOUT) and upstream.ended == "reset", upstream.ended
        record = next(line for line in srv.output().splitlines() if " fwd: accepted" in line)
        assert 0 < received <= counts(record)[1] <= upstream.sent, (record, received)
    finally:
        upstream.close()
