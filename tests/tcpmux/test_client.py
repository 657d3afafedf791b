"""The ``tcpmux`` client, run as a real child process against small TCPMUX servers in threads.

Every server here is a :class:`MiniServer`: a listening socket on a loopback address and an
ephemeral port, an accept thread, and a thread per connection that reads the name line byte by
byte (so nothing behind it is consumed) and then runs the test's handler. Every socket has a
timeout, every child process runs under ``subprocess`` timeouts and is killed on the way out, and
every thread is joined at teardown, so no test can hang.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from tcpmuxd import __version__
from tcpmuxd.common.addresses import host_port
from tcpmuxd.tcpmux import client

ROOT = Path(__file__).resolve().parents[2]
MAN_PAGE = ROOT / "docs" / "tcpmux.1.scd"
#: Upper bound for any child process; the tests expect far less.
PROC_TIMEOUT = 30.0
#: Upper bound for any blocking socket operation in a test server.
IO_TIMEOUT = 10.0

Handler = Callable[["MiniServer", socket.socket, bytes], None]


# --- helpers --------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


CLIENT = [sys.executable, "-m", "tcpmuxd.tcpmux.client"]


def run_client(*args: str, input: bytes = b"", stdin=None, timeout: float = PROC_TIMEOUT):
    """Run tcpmux to completion; ``subprocess.run`` kills it if it outlives ``timeout``."""
    kwargs = {"stdin": stdin} if stdin is not None else {"input": input}
    return subprocess.run(
        [*CLIENT, *args], capture_output=True, timeout=timeout, cwd=ROOT, env=_env(), **kwargs
    )


def assert_no_traceback(proc) -> None:
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")


def read_line(conn: socket.socket) -> bytes:
    """The name line, byte by byte: whatever follows it stays in the socket."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def read_to_eof(conn: socket.socket) -> bytes:
    data = bytearray()
    while chunk := conn.recv(65536):
        data += chunk
    return bytes(data)


class MiniServer:
    """A TCPMUX server under the test's control (see the module docstring)."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.handler = handler
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.host = host
        self.lines: list[bytes] = []
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.line_seen = threading.Event()
        self._workers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, name="mini-accept", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return host_port(self.host, self.port)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            worker = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._workers.append(worker)
            worker.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(IO_TIMEOUT)
            try:
                line = read_line(conn)
                self.lines.append(line)
                self.line_seen.set()
                self.handler(self, conn, line)
            except BaseException as exc:  # reported at teardown
                self.errors.append(exc)

    def close(self) -> None:
        self.stopping.set()
        self._thread.join(IO_TIMEOUT)
        self.listener.close()
        for worker in self._workers:
            worker.join(IO_TIMEOUT + 1)
        assert not self._thread.is_alive(), "accept thread did not end"
        assert not any(w.is_alive() for w in self._workers), "handler thread did not end"


@pytest.fixture
def serve():
    """``serve(handler, host=...)`` starts a MiniServer; all are stopped and checked at the end."""
    servers: list[MiniServer] = []

    def start(handler: Handler, host: str = "127.0.0.1") -> MiniServer:
        server = MiniServer(handler, host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
    errors = [exc for server in servers for exc in server.errors]
    assert not errors, f"server handler failed: {errors!r}"


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on: bound, then closed."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# handlers ------------------------------------------------------------------------------------


def reply(data: bytes) -> Handler:
    """Send ``data`` (reply line and whatever follows) in one piece, then close."""

    def handler(server: MiniServer, conn: socket.socket, line: bytes) -> None:
        conn.sendall(data)

    return handler


def echo_then_trailer(server: MiniServer, conn: socket.socket, line: bytes) -> None:
    """``+``, echo everything until the client's EOF, then a trailer only EOF can trigger."""
    conn.sendall(b"+go ahead\r\n")
    total, digest = 0, hashlib.sha256()
    while chunk := conn.recv(256 * 1024):
        total += len(chunk)
        digest.update(chunk)
        conn.sendall(chunk)
    time.sleep(0.2)  # the client must still be there after its stdin ended
    conn.sendall(b"EOF after %d bytes %s\n" % (total, digest.hexdigest().encode()))


def silent(server: MiniServer, conn: socket.socket, line: bytes) -> None:
    """Never reply; let go when the test ends or the client closes."""
    conn.settimeout(0.05)
    while not server.stopping.is_set():
        try:
            if not conn.recv(1):
                return
        except TimeoutError:
            continue
        except ConnectionError:
            return


# --- the positive path ----------------------------------------------------------------------


def test_bytes_behind_positive_reply_go_to_stdout(serve):
    behind = b"HELLO\x00\xff\r\nbinary \x1b tail"
    server = serve(reply(b"+welcome\r\n" + behind))
    proc = run_client(server.target, "greet")
    assert proc.returncode == client.EXIT_OK
    assert proc.stdout == behind
    assert proc.stderr == b""  # the + message only with -v
    assert server.lines == [b"greet\r\n"]


def test_verbose_prints_positive_message(serve):
    server = serve(reply(b"+welcome aboard\r\n"))
    proc = run_client("-v", server.target, "greet")
    assert proc.returncode == 0
    assert b"greet: accepted: welcome aboard" in proc.stderr
    assert proc.stdout == b""


def test_echo_binary_round_trip_and_half_close(serve):
    data = bytes(range(256)) * 8192 + os.urandom(1 << 21)  # 4 MiB: every byte value, and noise
    server = serve(echo_then_trailer)
    started = time.monotonic()
    proc = run_client(server.target, "echo", input=data)
    elapsed = time.monotonic() - started
    trailer = b"EOF after %d bytes %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode())
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) == len(data) + len(trailer)
    assert proc.stdout[: len(data)] == data
    # The trailer is sent only after the server read EOF: the half-close reached it, and the
    # client kept reading afterwards.
    assert proc.stdout[len(data) :] == trailer
    assert elapsed < 15, f"4 MiB round trip took {elapsed:.1f} s"
    assert proc.stderr == b""


def test_reply_after_stdin_eof_still_reaches_stdout(serve):
    seen = {}

    def answer_after_eof(server, conn, line):
        conn.sendall(b"+\r\n")
        seen["question"] = read_to_eof(conn)  # returns only on the client's half-close
        time.sleep(0.3)
        conn.sendall(b"the answer is 42\n")

    server = serve(answer_after_eof)
    proc = run_client(server.target, "ask", input=b"what is the answer?\n")
    assert proc.returncode == 0, proc.stderr
    assert seen["question"] == b"what is the answer?\n"
    assert proc.stdout == b"the answer is 42\n"


def test_stdin_from_regular_file(serve, tmp_path):
    data = bytes(range(256)) * 1000
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    server = serve(echo_then_trailer)
    with path.open("rb") as stdin:
        proc = run_client(server.target, "echo", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(data)
    assert proc.stdout[len(data) :].startswith(b"EOF after %d bytes" % len(data))


def test_stdin_waits_for_positive_reply(serve):
    early = {}

    def slow_yes(server, conn, line):
        conn.settimeout(0.5)
        try:
            early["bytes"] = conn.recv(100)
        except TimeoutError:
            early["bytes"] = b""
        conn.settimeout(IO_TIMEOUT)
        conn.sendall(b"+\r\n")
        conn.sendall(b"got " + read_to_eof(conn))

    server = serve(slow_yes)
    proc = run_client(server.target, "svc", input=b"payload")
    assert proc.returncode == 0, proc.stderr
    assert early["bytes"] == b"", "the client sent data before the server said +"
    assert proc.stdout == b"got payload"


# --- refusals and listings ------------------------------------------------------------------


def test_negative_reply(serve):
    server = serve(reply(b"-unknown service\r\n"))
    proc = run_client(server.target, "nope", input=b"never sent")
    assert proc.returncode == client.EXIT_REFUSED == 1
    assert proc.stderr == b"tcpmux: 127.0.0.1: nope: refused: unknown service\n"
    assert proc.stdout == b""


def test_negative_reply_reason_is_made_printable(serve):
    server = serve(reply(b"-bad \x1b[31mred\x07 reason\r\n"))
    proc = run_client(server.target, "nope")
    assert proc.returncode == 1
    assert proc.stderr == b"tcpmux: 127.0.0.1: nope: refused: bad ?[31mred? reason\n"


def test_negative_reply_without_reason(serve):
    server = serve(reply(b"-\r\n"))
    proc = run_client(server.target, "nope")
    assert proc.returncode == 1
    assert proc.stderr == b"tcpmux: 127.0.0.1: nope: refused: no reason given\n"


@pytest.mark.parametrize("how", ["--list", "-l", "service named help"])
def test_list(serve, how):
    server = serve(reply(b"echo\r\ndaytime\r\nssh\r\n"))
    argv = [server.target, "Help"] if how == "service named help" else [how, server.target]
    proc = run_client(*argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"echo\ndaytime\nssh\n"
    assert proc.stderr == b""
    assert server.lines == [b"HELP\r\n"]


def test_list_accepts_bare_lf_and_missing_final_newline(serve):
    server = serve(reply(b"one\ntwo\r\nthree"))
    proc = run_client("--list", server.target)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"one\ntwo\nthree\n"


def test_list_empty(serve):
    """An empty HELP listing is a server with no services, which the client says (issue 13,
    item 5): not the silence and status 0 of a list that was printed."""
    server = serve(reply(b""))
    proc = run_client("--list", server.target)
    assert (proc.returncode, proc.stdout) == (client.EXIT_NO_SERVICES, b"")
    assert proc.stderr == b"tcpmux: 127.0.0.1: the server lists no services\n"
    assert client.EXIT_NO_SERVICES == 6


def test_list_of_a_tcpmuxd_with_no_services(daemon_factory, tmp_path):
    """The same against a real tcpmuxd whose conf.d is empty, as right after installation."""
    empty = tmp_path / "conf.d"
    empty.mkdir()
    d = daemon_factory(empty)
    proc = run_client("--list", f"127.0.0.1:{d.port}")
    assert (proc.returncode, proc.stdout) == (6, b""), proc.stderr
    assert proc.stderr == b"tcpmux: 127.0.0.1: the server lists no services\n"


def test_list_refused(serve):
    server = serve(reply(b"-not allowed from this address\r\n"))
    proc = run_client("--list", server.target)
    assert proc.returncode == 1
    assert proc.stderr == b"tcpmux: 127.0.0.1: refused: not allowed from this address\n"
    assert proc.stdout == b""


def test_list_garbage(serve):
    server = serve(reply(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    proc = run_client("--list", server.target)
    assert proc.returncode == client.EXIT_PROTOCOL == 5
    assert b"not a TCPMUX HELP listing" in proc.stderr
    assert proc.stdout == b""


# --- failures of the server -----------------------------------------------------------------


def test_silent_server_hits_the_deadline(serve):
    server = serve(silent)
    started = time.monotonic()
    proc = run_client("-t", "0.5", server.target, "svc", timeout=10)
    elapsed = time.monotonic() - started
    assert proc.returncode == client.EXIT_TIMEOUT == 4
    assert proc.stderr == b"tcpmux: 127.0.0.1: svc: no reply within 0.5 s\n"
    assert elapsed < 3, f"took {elapsed:.1f} s"


def test_deadline_is_total_not_per_read(serve):
    def trickle(server, conn, line):
        conn.sendall(b"+")
        for _ in range(50):  # one byte every 0.1 s, never a line end
            if server.stopping.wait(0.1):
                return
            try:
                conn.sendall(b"x")
            except OSError:
                return

    server = serve(trickle)
    started = time.monotonic()
    proc = run_client("-t", "1", server.target, "svc", timeout=10)
    elapsed = time.monotonic() - started
    assert proc.returncode == 4
    assert proc.stderr == b"tcpmux: 127.0.0.1: svc: reply line not complete within 1 s\n"
    assert elapsed < 3.5, f"took {elapsed:.1f} s: the deadline restarted on each read"


def test_server_closes_without_reply(serve):
    server = serve(reply(b""))
    proc = run_client(server.target, "svc")
    assert proc.returncode == 5
    assert proc.stderr == b"tcpmux: 127.0.0.1: svc: connection closed without a reply\n"


def test_server_closes_in_the_middle_of_the_reply(serve):
    server = serve(reply(b"+almost"))
    proc = run_client(server.target, "svc")
    assert proc.returncode == 5
    assert b"in the middle of the reply line" in proc.stderr


def test_garbage_reply(serve):
    server = serve(reply(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"))
    proc = run_client(server.target, "svc")
    assert proc.returncode == 5
    assert proc.stderr.startswith(b"tcpmux: 127.0.0.1: svc: not a TCPMUX reply: ")
    assert proc.stdout == b""


def test_connection_lost_mid_session(serve):
    def reset(server, conn, line):
        conn.sendall(b"+\r\n")
        time.sleep(0.2)
        # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    server = serve(reset)
    with subprocess.Popen(
        [*CLIENT, server.target, "svc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=ROOT, env=_env(),
    ) as proc:
        try:
            out, err = proc.communicate(timeout=PROC_TIMEOUT)  # stdin stays open: no EOF
        finally:
            proc.kill()
    assert proc.returncode == client.EXIT_NETWORK == 3, err
    assert err == b"tcpmux: 127.0.0.1: svc: connection lost: Connection reset by peer\n"


# --- failures to connect --------------------------------------------------------------------


def test_connection_refused():
    port = free_port()
    proc = run_client(f"127.0.0.1:{port}", "svc")
    assert proc.returncode == client.EXIT_NETWORK == 3
    assert proc.stderr == (
        f"tcpmux: cannot connect to 127.0.0.1 port {port}: Connection refused\n".encode()
    )


def test_unresolvable_host():
    proc = run_client("no-such-host.invalid:7", "svc")
    assert proc.returncode == 3
    assert proc.stderr.startswith(b"tcpmux: cannot resolve no-such-host.invalid: ")
    assert_no_traceback(proc)


@pytest.fixture
def full_backlog():
    """A listener whose accept queue is full: further connection attempts go unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(16):
            sock = socket.socket()
            sock.settimeout(0.3)
            fillers.append(sock)
            try:
                sock.connect(listener.getsockname())
            except TimeoutError:
                break
        else:
            pytest.skip("this network stack answers connections beyond the backlog")
        yield listener.getsockname()
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def test_connect_timeout(full_backlog):
    host, port = full_backlog
    started = time.monotonic()
    proc = run_client("-t", "0.5", f"{host}:{port}", "svc", timeout=10)
    elapsed = time.monotonic() - started
    assert proc.returncode == 4
    assert proc.stderr == (
        f"tcpmux: timed out connecting to 127.0.0.1 port {port} "
        f"(no answer within 0.5 s)\n".encode()
    )
    assert elapsed < 3


def _addrinfo(host: str, port: int) -> tuple:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockaddr = (host, port, 0, 0) if family == socket.AF_INET6 else (host, port)
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)


def test_connect_tries_every_address(serve):
    server = serve(reply(b"+\r\n"))
    addrs = [_addrinfo("127.0.0.1", free_port()), _addrinfo("127.0.0.1", server.port)]
    with client.connect(addrs, time.monotonic() + 5) as sock:
        assert sock.getpeername() == ("127.0.0.1", server.port)
        assert sock.gettimeout() is None


def test_connect_does_not_wait_out_an_unanswering_address(serve, full_backlog):
    server = serve(reply(b"+\r\n"))
    addrs = [_addrinfo(*full_backlog), _addrinfo("127.0.0.1", server.port)]
    started = time.monotonic()
    with client.connect(addrs, started + 5) as sock:
        assert sock.getpeername() == ("127.0.0.1", server.port)
    assert time.monotonic() - started < 2


def test_connect_reports_every_failure():
    ports = [free_port(), free_port()]
    with pytest.raises(client.ClientError) as info:
        client.connect([_addrinfo("127.0.0.1", p) for p in ports], time.monotonic() + 5)
    assert info.value.status == client.EXIT_NETWORK
    assert str(info.value).count("Connection refused") == 2


# --- addresses and families -----------------------------------------------------------------


@pytest.mark.skipif(not ipv6_loopback_available(), reason="::1 is not available here")
def test_ipv6_bracketed_address(serve):
    server = serve(reply(b"+hi\r\nv6 data"), host="::1")
    proc = run_client(f"[::1]:{server.port}", "svc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"v6 data"
    assert server.lines == [b"svc\r\n"]


@pytest.mark.skipif(not ipv6_loopback_available(), reason="::1 is not available here")
def test_ipv6_refusal_names_the_host_in_brackets(serve):
    server = serve(reply(b"-busy\r\n"), host="::1")
    proc = run_client("-6", f"[::1]:{server.port}", "svc")
    assert proc.returncode == 1
    assert proc.stderr == b"tcpmux: [::1]: svc: refused: busy\n"


def _resolves(name: str, family: int) -> set[str]:
    try:
        return {ai[4][0] for ai in socket.getaddrinfo(name, 1, family, socket.SOCK_STREAM)}
    except OSError:
        return set()


def test_family_flags_restrict_addresses(serve):
    if "127.0.0.1" not in _resolves("localhost", socket.AF_INET):
        pytest.skip("localhost does not resolve to 127.0.0.1 here")
    server = serve(reply(b"+\r\nv4"))
    proc = run_client("-4", "-v", f"localhost:{server.port}", "svc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"v4"
    assert b"connecting to 127.0.0.1" in proc.stderr
    assert b"connecting to [" not in proc.stderr  # no IPv6 address was tried

    proc = run_client("-6", "-t", "2", f"localhost:{server.port}", "svc")
    assert proc.returncode in (3, 4), proc.stderr  # no IPv6 address, or none that listens
    assert server.accepted == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["-4", "[::1]:7", "svc"], b"[::1] is an IPv6 address, but -4 was given"),
        (["-6", "127.0.0.1:7", "svc"], b"127.0.0.1 is an IPv4 address, but -6 was given"),
    ],
)
def test_family_flag_contradicts_literal(args, message):
    proc = run_client(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_parse_target():
    parse = client.parse_target
    assert parse("example.org") == client.Target("example.org", 1)
    assert parse("example.org:7001") == client.Target("example.org", 7001)
    assert parse("192.0.2.7:9") == client.Target("192.0.2.7", 9)
    assert parse("[2001:db8::1]:7001") == client.Target("2001:db8::1", 7001)
    assert parse("[::1]") == client.Target("::1", 1)
    assert parse("[fe80::1%lo]:5").host == "fe80::1%lo"
    with pytest.raises(ValueError, match="in brackets"):
        parse("::1")  # ::1:80 would be ambiguous


# --- usage errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["bad name", "", "x" * 257, "caf\u00e9", "tab\there", "line\nbreak"]
)
def test_invalid_service_name_rejected_before_connecting(serve, name):
    server = serve(reply(b"+\r\n"))
    proc = run_client(server.target, name)
    assert proc.returncode == client.EXIT_USAGE == 2
    assert proc.stderr.startswith(b"tcpmux: invalid service name ")
    # The client has exited, so a connection it made would stand in the accept queue before
    # this probe's: once the probe's line is seen, the probe is all that came.
    with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT) as probe:
        probe.sendall(b"probe\r\n")
        assert server.line_seen.wait(IO_TIMEOUT)
    assert (server.accepted, server.lines) == (1, [b"probe\r\n"])


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x", "127.0.0.1:", "127.0.0.1:+5",
     "[::1", "[::1]x", "[]:5", ":5", "::1:5", "[127.0.0.1]:5", "bad host:5", "unix:/run/x"],
)
def test_bad_address_or_port(target):
    proc = run_client(target, "svc")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"tcpmux: bad address {target!r}: ".encode()), proc.stderr
    assert_no_traceback(proc)


@pytest.mark.parametrize(
    "args",
    [[], ["127.0.0.1"], ["--list", "127.0.0.1", "svc"], ["-4", "-6", "127.0.0.1", "svc"],
     ["-t", "0", "127.0.0.1", "svc"], ["-t", "soon", "127.0.0.1", "svc"],
     ["-t", "nan", "127.0.0.1", "svc"], ["-t", "1e300", "127.0.0.1", "svc"],
     ["--bogus", "127.0.0.1", "svc"], ["127.0.0.1", "svc", "extra"]],
)
def test_usage_errors(args):
    proc = run_client(*args)
    assert proc.returncode == 2
    assert b"usage: tcpmux" in proc.stderr or proc.stderr.startswith(b"tcpmux: ")
    assert proc.stdout == b""
    assert_no_traceback(proc)


def test_version():
    proc = run_client("--version")
    assert (proc.returncode, proc.stdout) == (0, f"tcpmux {__version__}\n".encode())


# --- signals --------------------------------------------------------------------------------


def interruptible() -> None:
    """SIGINT as in a terminal's foreground: where the test itself runs in the background of
    a non-interactive shell (``script/test &``, some CI runners), it inherits SIGINT ignored,
    and Python keeps it ignored, as a program started with ``&`` should."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_without_traceback(serve):
    server = serve(silent)
    with subprocess.Popen(
        [*CLIENT, server.target, "svc"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=ROOT, env=_env(), preexec_fn=interruptible,
    ) as proc:
        try:
            assert server.line_seen.wait(IO_TIMEOUT), "the client never sent its name"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == client.EXIT_INTERRUPTED == 130
    assert err == b"" and out == b""


def test_closed_stdout_ends_quietly(serve):
    def firehose(server, conn, line):
        conn.sendall(b"+\r\n")
        chunk = b"y" * 65536
        deadline = time.monotonic() + IO_TIMEOUT
        try:
            while time.monotonic() < deadline and not server.stopping.is_set():
                conn.sendall(chunk)
        except OSError:
            pass  # the client went away, as intended

    server = serve(firehose)
    with subprocess.Popen(
        [*CLIENT, server.target, "svc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=ROOT, env=_env(),
    ) as proc:
        try:
            assert proc.stdout.read(100000) == b"y" * 100000
            proc.stdout.close()
            err = proc.stderr.read()  # EOF when the client exits
            proc.wait(timeout=10)
        finally:
            proc.kill()
    assert proc.returncode == client.EXIT_BROKEN_PIPE == 141
    assert err == b""


@pytest.mark.skipif(not shutil.which("ssh"), reason="needs the ssh client")
def test_ssh_proxycommand(serve, tmp_path):
    """ssh runs tcpmux as its ProxyCommand: the banners cross in both directions."""
    got = {}

    def fake_sshd(server, conn, line):
        conn.sendall(b"+\r\nSSH-2.0-FakeServer_1.0\r\n")
        got["banner"] = read_line(conn)

    server = serve(fake_sshd)
    proxy = f"{shlex.quote(sys.executable)} -m tcpmuxd.tcpmux.client %h:{server.port} ssh"
    proc = subprocess.run(
        ["ssh", "-F", "/dev/null", "-v", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
         "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path}/known_hosts",
         "-o", f"ProxyCommand={proxy}", "127.0.0.1", "true"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=PROC_TIMEOUT, cwd=ROOT,
        env={**_env(), "HOME": str(tmp_path)},
    )
    assert server.lines == [b"ssh\r\n"], proc.stderr.decode(errors="replace")[-2000:]
    assert got["banner"].startswith(b"SSH-2.0-"), proc.stderr
    assert b"remote software version FakeServer_1.0" in proc.stderr


# --- documentation --------------------------------------------------------------------------


def _man_section(title: str) -> str:
    return MAN_PAGE.read_text().split(f"\n# {title}\n", 1)[1].split("\n# ", 1)[0]


def _man_options() -> set[str]:
    """The options named in the term lines (those starting with ``*``) of OPTIONS."""
    terms = [line for line in _man_section("OPTIONS").splitlines() if line.startswith("*")]
    return set(re.findall(r"\*(-{1,2}[\w-]+)\*", "\n".join(terms)))


def _man_exit_codes() -> set[int]:
    return {int(code) for code in re.findall(r"^\*(\d+)\*$", _man_section("EXIT STATUS"), re.M)}


def test_help_agrees_with_man_page():
    proc = run_client("--help")
    assert proc.returncode == 0
    help_text = proc.stdout.decode()
    options_part = help_text.split("\noptions:\n")[1].split("\nexit status:\n")[0]
    status_part = help_text.split("\nexit status:\n")[1].split("\nexamples:\n")[0]
    help_options = set(re.findall(r"(?<![\w-])(--?[a-z0-9][\w-]*)", options_part))
    help_codes = {int(code) for code in re.findall(r"^  (\d+) ", status_part, re.M)}
    assert _man_options() == help_options
    assert _man_exit_codes() == help_codes == {
        client.EXIT_OK, client.EXIT_REFUSED, client.EXIT_USAGE, client.EXIT_NETWORK,
        client.EXIT_TIMEOUT, client.EXIT_PROTOCOL, client.EXIT_NO_SERVICES, client.EXIT_INTERRUPTED,
        client.EXIT_BROKEN_PIPE,
    }
    assert "ProxyCommand tcpmux %h ssh" in help_text
    assert "ProxyCommand tcpmux %h ssh" in MAN_PAGE.read_text()


@pytest.mark.skipif(not (shutil.which("scdoc") and shutil.which("man")), reason="needs scdoc, man")
def test_man_page_renders_cleanly(tmp_path):
    rendered = tmp_path / "tcpmux.1"
    with MAN_PAGE.open("rb") as source, rendered.open("wb") as out:
        subprocess.run(["scdoc"], stdin=source, stdout=out, check=True, timeout=30)
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(rendered)], capture_output=True, timeout=30,
        env={**os.environ, "MANPAGER": "cat", "PAGER": "cat"},
    )
    assert proc.returncode == 0
    assert proc.stderr == b""
    text = rendered.read_text()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "EXAMPLES",
                    "SEE ALSO"):
        assert f'.SH {section}\n' in text or f'.SH "{section}"\n' in text, section
    assert r"\fBtcpmuxd\fR(8)" in text and r"\fBtcpmuxd.\&conf\fR(5)" in text
