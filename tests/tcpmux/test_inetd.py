"""inetd.py, directly: the Accept=yes flow, one connection per process.

tcpmuxd runs as a real process with one end of a socketpair as its stdin and stdout, as systemd
starts it with StandardInput=socket (what ``systemd-socket-activate --accept --inetd`` does, in
test_activation.py, over TCP): it reads the name, decides, and the service's handler kind runs
in place. The name reader itself is also driven in-process over a socketpair.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tcpmuxd_harness import PYTHON, ROOT, read_all, write_service

from tcpmuxd import passfd
from tcpmuxd.tcpmux import protocol
from tcpmuxd.tcpmux.inetd import read_name
from tcpmuxd.tcpmux.policy import Limits

WAIT = 10.0  # bound of every wait


# --------------------------------------------------------------------------- the name reader


def test_read_name_takes_exactly_the_line():
    """The bytes behind the name stay in the socket for the handler, however the line came."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(b"ec")
        sender = threading.Thread(target=ours.sendall, args=(b"ho\r\nbehind the name",))
        sender.start()  # the rest of the line arrives while the reader waits for it
        via, event = read_name(theirs, Limits(name_timeout=WAIT))
        sender.join(WAIT)
        assert (via, event) == ("tcpmux", protocol.NameReceived("echo"))
        theirs.settimeout(WAIT)
        assert theirs.recv(100) == b"behind the name"


@pytest.mark.parametrize("sent, event", [
    (b"", protocol.BadName("connection closed before a service name was sent")),
    (b"ec", protocol.BadName("connection closed before end of service name line")),
    (b"x" * 300 + b"\r\n", protocol.BadName("service name too long (limit 256 bytes)")),
    (b"HELP\r\n", protocol.HelpRequested()),
])
def test_read_name_events(sent: bytes, event: protocol.Event):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(sent)
        ours.shutdown(socket.SHUT_WR)
        assert read_name(theirs, Limits(name_timeout=WAIT))[1] == event


def test_read_name_deadline_covers_the_whole_line():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(b"partial")
        _via, event = read_name(theirs, Limits(name_timeout=0.2))
        assert event == protocol.BadName("timed out waiting for end of service name line")


# --------------------------------------------------------------------------- the instance


class Instance:
    """``tcpmuxd --config-dir DIR`` with a socketpair end as stdin and stdout; ``client`` is
    the other end."""

    def __init__(self, config: Path, *args: str) -> None:
        self.client, theirs = socket.socketpair()
        self.client.settimeout(WAIT)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
        env["PYTHONPATH"] = str(ROOT)
        with theirs:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "tcpmuxd", "--config-dir", str(config), *args],
                stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, env=env, cwd=ROOT)

    def talk(self, data: bytes) -> bytes:
        self.client.sendall(data)
        self.client.shutdown(socket.SHUT_WR)
        return read_all(self.client)

    def end(self) -> tuple[int, str]:
        """Its exit status and its log (stderr)."""
        try:
            _, err = self.proc.communicate(timeout=WAIT)
        finally:
            self.client.close()
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, err.decode()


@pytest.fixture
def instance():
    started: list[Instance] = []

    def start(config: Path, *args: str) -> Instance:
        started.append(Instance(config, *args))
        return started[-1]

    yield start
    for i in started:
        if i.proc.poll() is None:
            i.proc.kill()
            i.proc.wait()
        i.client.close()


def test_exec_becomes_the_handler(services: Path, instance):
    """No extra process: the handler runs as the instance's own pid, with the bytes that came
    behind the name, and the record is written before the exec."""
    write_service(services, "svc.conf",
                  "[Service]\nExec=/bin/sh -c 'echo $$ $TCPMUX_SERVICE $PROTO; exec cat'\n")
    i = instance(services)
    reply = i.talk(b"SVC\r\nbehind")
    status, log = i.end()
    assert reply == f"+\r\n{i.proc.pid} svc UNIX\nbehind".encode(), reply
    assert status == 0
    assert f"unix SVC: accepted, exec /bin/sh as pid {i.proc.pid}, " in log, log


def wait_for_the_name(pid: int) -> None:
    """Until the instance waits in poll() for the name line, its configuration read."""
    deadline = time.monotonic() + WAIT
    while "poll" not in Path(f"/proc/{pid}/wchan").read_text():
        assert time.monotonic() < deadline, "the instance did not wait for the name"
        time.sleep(0.01)


def test_exec_not_executable_is_refused(services: Path, instance, tmp_path: Path):
    """A program that was executable when the configuration was read and no longer is when
    the connection comes: ``-`` with the reason, exit status 1."""
    program = tmp_path / "prog"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    write_service(services, "svc.conf", f"[Service]\nExec={program}\n")
    i = instance(services)
    wait_for_the_name(i.proc.pid)
    program.chmod(0o644)
    reason = f"handler failed to start: {program} is not executable"
    assert i.talk(b"svc\r\n") == f"-{reason}\r\n".encode()
    status, log = i.end()
    assert status == 1
    assert f"unix svc: refused: {reason}" in log, log


def test_unknown_name_and_help(services: Path, instance):
    write_service(services, "b.conf", "[Service]\nExec=/bin/true\n")
    write_service(services, "a.conf", "[Service]\nExec=/bin/true\nHidden=yes\n")
    i = instance(services)
    assert i.talk(b"nope\r\n") == b"-unknown service nope\r\n"
    status, log = i.end()
    assert status == 0 and "unix nope: refused: unknown service nope" in log, log
    i = instance(services)
    assert i.talk(b"help\r\n") == b"b\r\n"
    status, log = i.end()
    assert status == 0 and "unix HELP: help" in log, log


class Upstream:
    """A TCP server that reads to EOF and only then answers ``up:`` and what it read: the
    client's half-close has to come through for it to answer at all."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.settimeout(WAIT)
            conn.sendall(b"up:" + read_all(conn))

    def close(self) -> None:
        self.thread.join(WAIT)
        self.server.close()


def test_forward_relays_in_place_with_half_close(services: Path, instance):
    up = Upstream()
    try:
        write_service(services, "fwd.conf", f"[Service]\nForward=127.0.0.1:{up.port}\n")
        i = instance(services)
        assert i.talk(b"fwd\r\nhello") == b"+\r\nup:hello"
        status, log = i.end()
    finally:
        up.close()
    assert status == 0
    assert "unix fwd: accepted, 5 bytes in, 8 bytes out, " in log, log


def test_forward_to_nothing_is_refused(services: Path, instance):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed again: nothing listens there
    write_service(services, "fwd.conf", f"[Service]\nForward=127.0.0.1:{port}\n")
    i = instance(services)
    assert i.talk(b"fwd\r\n") == b"-service unavailable: Connection refused\r\n"
    status, log = i.end()
    assert status == 0 and "unix fwd: refused: service unavailable: Connection refused" in log


def test_forward_cut_at_once_when_asked_twice_to_stop(services: Path, instance):
    """SIGTERM leaves the relay its --stop-timeout; a second one cuts it now: both ends get
    a reset and the record says why."""
    held = socket.create_server(("127.0.0.1", 0))
    try:
        write_service(services, "fwd.conf",
                      f"[Service]\nForward=127.0.0.1:{held.getsockname()[1]}\n")
        i = instance(services, "--stop-timeout", "600")
        i.client.sendall(b"fwd\r\n")
        assert i.client.recv(3) == b"+\r\n"
        held.settimeout(WAIT)
        upstream, _ = held.accept()
        with upstream:
            upstream.settimeout(WAIT)
            i.client.sendall(b"x")
            assert upstream.recv(1) == b"x"  # the relay runs
            i.proc.send_signal(signal.SIGTERM)
            i.client.sendall(b"y")
            assert upstream.recv(1) == b"y"  # and goes on after the first SIGTERM
            i.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionResetError):
                upstream.recv(1)
        status, log = i.end()
    finally:
        held.close()
    assert status == 0
    assert "unix fwd: accepted, 2 bytes in, 0 bytes out, cut (reset) at stop, asked again " \
           "to stop" in log, log


def test_pass_to_hands_over_in_place(services: Path, instance, tmp_path: Path):
    """Acknowledge=no: the receiving daemon gets the socket, the bytes behind the name and
    the word that the ``+`` is its to send."""
    path = tmp_path / "recv.sock"
    receiver = socket.socket(socket.AF_UNIX)
    receiver.bind(str(path))
    receiver.listen()
    receiver.settimeout(WAIT)
    got: dict[str, str] = {}

    def daemon() -> None:
        channel, _ = receiver.accept()
        with channel:
            conn, info = passfd.receive_connection(channel)
        got.update(info)
        with conn:
            conn.settimeout(WAIT)
            conn.sendall(b"+ok\r\n" + read_all(conn).upper())

    thread = threading.Thread(target=daemon, daemon=True)
    thread.start()
    try:
        write_service(services, "pass.conf", f"[Service]\nPassTo=unix:{path}\nAcknowledge=no\n")
        i = instance(services)
        assert i.talk(b"pass\r\nearly bytes") == b"+ok\r\nEARLY BYTES"
        status, log = i.end()
    finally:
        thread.join(WAIT)
        receiver.close()
    assert status == 0 and "unix pass: passed, " in log, log
    assert (got["service"], got["acknowledged"]) == ("pass", "no")
