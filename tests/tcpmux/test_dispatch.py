"""The daemon's handshake and handler kinds over real loopback sockets and real processes."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from tcpmuxd_harness import read_all, talk, write_service
from tcpmuxd import passfd


@pytest.fixture
def basic(services: Path, daemon_factory):
    write_service(services, "echo.conf", "[Service]\nExec=/bin/cat\n")
    write_service(services, "date.conf", "[Service]\nExec=/bin/echo hello from date\n")
    write_service(services, "secret.conf", "[Service]\nExec=/bin/echo hidden\nHidden=yes\n")
    return daemon_factory(services)


def test_exact_positive_reply_then_handler_output(basic):
    assert basic.talk(b"date\r\n") == b"+\r\nhello from date\n"


def test_names_are_case_insensitive_and_bare_lf_accepted(basic):
    assert basic.talk(b"DaTe\n") == b"+\r\nhello from date\n"


def test_help_lists_names_one_per_crlf_line_without_hidden(basic):
    assert basic.talk(b"help\r\n") == b"date\r\necho\r\n"


def test_hidden_service_reachable_by_name(basic):
    assert basic.talk(b"SECRET\r\n") == b"+\r\nhidden\n"


def test_bytes_right_behind_the_name_reach_an_exec_handler(basic):
    payload = bytes(range(256)) * 64
    assert basic.talk(b"echo\r\n" + payload) == b"+\r\n" + payload


def test_name_split_over_many_packets(basic):
    with basic.connect() as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in b"ec", b"h", b"o\r", b"\nafter":
            s.sendall(b)
            time.sleep(0.05)
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b"+\r\nafter"


def test_unknown_service_refused_even_with_pipelined_data(basic):
    # The daemon drains what it does not read, so the client gets the line and no reset.
    reply = basic.talk(b"nosuch\r\n" + b"x" * 200_000, shut=False)
    assert reply == b"-unknown service nosuch\r\n"


@pytest.mark.parametrize("line,reason", [
    (b"\r\n", b"-empty service name\r\n"),
    (b"bad name\r\n", b"-bad characters in service name (visible ASCII only)\r\n"),
    (b"x" * 257 + b"\r\n", b"-service name too long (limit 256 bytes)\r\n"),
])
def test_refusals_have_specific_reasons(basic, line, reason):
    assert basic.talk(line) == reason


def test_name_length_limit_is_configurable_at_its_edge(services, daemon_factory):
    write_service(services, "a.conf", "[Service]\nName=abcde\nExec=/bin/echo ok\n")
    d = daemon_factory(services, "--max-name-length", "5")
    assert d.talk(b"abcde\r\n") == b"+\r\nok\n"
    assert d.talk(b"abcdef\r\n") == b"-service name too long (limit 5 bytes)\r\n"


def test_eof_before_the_name_is_logged(basic):
    with basic.connect() as s:
        s.sendall(b"ech")
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b"-connection closed before end of service name line\r\n"
    basic.wait_for_log("ech" if False else "connection closed before end of service name line")


def test_one_total_deadline_for_the_name_line(services, daemon_factory):
    """A client dripping one byte every 0.2 s is cut off at the deadline, not per read."""
    write_service(services, "a.conf", "[Service]\nExec=/bin/echo ok\n")
    d = daemon_factory(services, "--name-timeout", "1")
    with d.connect(timeout=10) as s:
        start = time.monotonic()
        reply = b""
        for _ in range(40):
            try:
                s.sendall(b"a")
            except OSError:
                break
            s.settimeout(0.2)
            try:
                reply = s.recv(100)
                break
            except socket.timeout:
                continue
        elapsed = time.monotonic() - start
    assert reply == b"-timed out waiting for end of service name line\r\n"
    assert 0.9 <= elapsed < 2.5


def test_silent_client_times_out(services, daemon_factory):
    write_service(services, "a.conf", "[Service]\nExec=/bin/echo ok\n")
    d = daemon_factory(services, "--name-timeout", "0.5")
    with d.connect() as s:
        assert read_all(s) == b"-timed out waiting for service name\r\n"


def test_access_rules_apply_to_the_requested_service(services, daemon_factory):
    write_service(services, "open.conf", "[Service]\nExec=/bin/echo open\n")
    write_service(services, "closed.conf",
                  "[Service]\nExec=/bin/echo closed\nIPAddressDeny=any\nIPAddressAllow=10.0.0.0/8\n")
    d = daemon_factory(services)
    assert d.talk(b"open\r\n") == b"+\r\nopen\n"
    assert d.talk(b"closed\r\n") == b"-not allowed from 127.0.0.1\r\n"


def test_service_busy_at_limit_plus_one(services, daemon_factory):
    write_service(services, "one.conf", "[Service]\nExec=/bin/cat\nMaxConnections=1\n")
    d = daemon_factory(services)
    with d.connect() as first:
        first.sendall(b"one\r\n")
        assert first.recv(3) == b"+\r\n"
        assert d.talk(b"one\r\n") == b"-service busy (1 connection)\r\n"
        first.shutdown(socket.SHUT_WR)
        read_all(first)
    deadline = time.monotonic() + 5
    while d.talk(b"one\r\n") != b"+\r\n":
        assert time.monotonic() < deadline, "slot not freed after the handler exited"
        time.sleep(0.05)


def test_acknowledge_no_leaves_the_reply_to_the_handler(services, daemon_factory):
    write_service(services, "own.conf",
                  "[Service]\nExec=/bin/echo +Welcome, handler speaking\nAcknowledge=no\n")
    d = daemon_factory(services)
    assert d.talk(b"own\r\n") == b"+Welcome, handler speaking\n"


def test_handler_not_executable_is_refused_before_plus(services, daemon_factory, tmp_path):
    prog = tmp_path / "prog"
    prog.write_text("#!/bin/sh\necho hi\n")
    prog.chmod(0o755)
    write_service(services, "p.conf", f"[Service]\nExec={prog}\n")
    d = daemon_factory(services)
    assert d.talk(b"p\r\n") == b"+\r\nhi\n"
    prog.chmod(0o644)
    assert d.talk(b"p\r\n") == f"-handler failed to start: {prog} is not executable\r\n".encode()


def test_exit_status_and_pid_are_logged(basic):
    basic.talk(b"date\r\n")
    log = basic.wait_for_log("date: accepted, pid ")
    assert "exit 0" in log.split("date: accepted", 1)[1].splitlines()[0]


class Upstream:
    """A TCP server that echoes with a prefix, counting connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            t.start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"upstream:")
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


def test_forward_relays_both_ways_with_half_close(services, daemon_factory, upstream):
    write_service(services, "fwd.conf", f"[Service]\nForward=127.0.0.1:{upstream.port}\n")
    d = daemon_factory(services)
    payload = os.urandom(3 << 20)
    assert d.talk(b"fwd\r\n" + payload) == b"+\r\nupstream:" + payload
    d.wait_for_log(f"fwd: accepted, {len(payload)} bytes in")


def test_forward_target_down_is_refused_with_reason(services, daemon_factory):
    from tcpmuxd_harness import free_port
    write_service(services, "fwd.conf", f"[Service]\nForward=127.0.0.1:{free_port()}\n")
    d = daemon_factory(services)
    assert d.talk(b"fwd\r\n") == b"-service unavailable: Connection refused\r\n"


def test_forward_to_unix_socket(services, daemon_factory, tmp_path):
    path = tmp_path / "up.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.sendall(read_all(conn).upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    write_service(services, "u.conf", f"[Service]\nForward=unix:{path}\n")
    d = daemon_factory(services)
    assert d.talk(b"u\r\nshout") == b"+\r\nSHOUT"
    srv.close()


def test_pass_to_hands_over_the_socket_with_unread_bytes(services, daemon_factory, tmp_path):
    path = tmp_path / "pass.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()
    got: dict = {}

    def serve():
        channel, _ = srv.accept()
        with channel:
            conn, info = passfd.receive_connection(channel)
        got.update(info)
        with conn:
            conn.sendall(b"daemon saw: " + read_all(conn))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    write_service(services, "p.conf", f"[Service]\nPassTo=unix:{path}\n")
    d = daemon_factory(services)
    assert d.talk(b"P\r\nearly bytes") == b"+\r\ndaemon saw: early bytes"
    t.join(5)
    assert got["service"] == "p" and got["remote"].startswith("127.0.0.1 ")
    assert got["acknowledged"] == "yes"
    srv.close()


def test_pass_to_missing_daemon_is_refused(services, daemon_factory, tmp_path):
    write_service(services, "p.conf", f"[Service]\nPassTo=unix:{tmp_path}/absent.sock\n")
    d = daemon_factory(services)
    assert d.talk(b"p\r\n") == b"-service unavailable: No such file or directory\r\n"


def test_ipv6_loopback(services, daemon_factory, tmp_path):
    from tcpmuxd_harness import Daemon, free_port
    write_service(services, "a.conf", "[Service]\nExec=/bin/sh -c 'echo $REMOTE_ADDR'\n")
    port = free_port("::1")
    d = daemon_factory(services, "--listen", f"[::1]:{port}")
    assert talk(port, b"a\r\n", host="::1") == b"+\r\n::1\n"
    assert d.talk(b"a\r\n") == b"+\r\n127.0.0.1\n"


def test_many_concurrent_clients_all_served(basic):
    results: list[bytes] = []

    def client(i: int) -> None:
        results.append(basic.talk(b"echo\r\n" + str(i).encode()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(results) == sorted(b"+\r\n" + str(i).encode() for i in range(50))


def test_bad_service_file_reported_while_others_serve(services, daemon_factory):
    write_service(services, "good.conf", "[Service]\nExec=/bin/echo good\n")
    write_service(services, "bad.conf", "[Service]\nExec=/bin/echo x\nMaxConnections=lots\n")
    d = daemon_factory(services)
    assert d.talk(b"good\r\n") == b"+\r\ngood\n"
    assert d.talk(b"bad\r\n") == b"-unknown service bad\r\n"
    assert "bad.conf:3:" in d.output()


def test_handler_is_polled_for_when_no_pidfd_can_be_opened(services, monkeypatch):
    """Out of descriptors right after the spawn, the handler is still reaped and logged.

    The real condition cannot be produced on purpose: Popen's own pipes need descriptors before
    pidfd_open does, so running out exactly in between is a race. This is the one test here that
    substitutes a function (os.pidfd_open raising EMFILE); the rest is real: an in-process
    Dispatcher on a loopback listener, a real client and a real /bin/echo handler.
    """
    import asyncio
    import errno

    from tcpmuxd.tcpmux import config, dispatch, policy
    from tcpmuxd.common.systemd import EventLog

    write_service(services, "e.conf", "[Service]\nExec=/bin/echo polled\n")
    records: list[str] = []

    class Log(EventLog):
        def record(self, message, priority=6, **fields):
            records.append(message)

    def no_pidfd(pid):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)

    async def run() -> bytes:
        d = dispatch.Dispatcher(config.load([services]), policy.Limits(), Log({}, "t"), {})
        listener = socket.create_server(("127.0.0.1", 0))
        d.add_listener(listener, "test")
        port = listener.getsockname()[1]
        reply = await asyncio.to_thread(talk, port, b"e\r\n")
        for _ in range(100):
            if any("e: accepted" in r and "exit 0" in r for r in records):
                break
            await asyncio.sleep(0.05)
        d.close()
        return reply

    assert asyncio.run(run()) == b"+\r\npolled\n"
    assert any("e: accepted" in r and "exit 0" in r for r in records), records
