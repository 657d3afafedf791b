"""TLS clients routed by the server name of their ClientHello (ServerName=), end to end: real TLS
clients (Python's ssl, openssl s_client, curl) over loopback to a standalone tcpmuxd, through
Forward= to a real TLS server, through Exec= to a program that speaks TLS on its stdin and
stdout, and through PassTo= to a receiving daemon. tcpmuxd never terminates TLS: the clients
verify the backend's certificate for the name they asked for, and the backend sees that name.

The certificate is a throwaway self-signed one made with the openssl command (skipped with the
reason without it), for *.example.test and example.test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tcpmuxd import passfd
from tcpmuxd.tcpmux.clienthello import RECORD_HEADER, alert_record
from tcpmuxd_harness import Daemon, read_all, talk, write_service
from test_activation import ACTIVATE, Activator
from test_clienthello_properties import real_hello

pytestmark = pytest.mark.timeout(120)

IO_TIMEOUT = 10.0
UNRECOGNIZED_NAME, HANDSHAKE_FAILURE, ACCESS_DENIED = 112, 40, 49
REQUEST = b"GET / HTTP/1.0\r\nHost: test\r\n\r\n"


@dataclass(frozen=True)
class Cert:
    cert: str
    key: str


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificate")
    d = tmp_path_factory.mktemp("sni-pki")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2",
         "-subj", "/CN=example.test",
         "-addext", "subjectAltName=DNS:example.test,DNS:*.example.test,DNS:*.apps.example.test",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        cwd=d, check=True, timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Cert(str(d / "cert.pem"), str(d / "key.pem"))


def server_context(cert: Cert, seen: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    ctx.sni_callback = lambda _tls, name, _ctx: seen.append(name or "-")
    return ctx


def client_context(cert: Cert, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cert.cert)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def answer(who: str, name: str) -> bytes:
    body = f"{who} {name}\n".encode()
    return (b"HTTP/1.0 200 OK\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n" + body)


class TLSBackend:
    """A TLS server on loopback that answers each request with "backend NAME" (the server name
    it saw in the ClientHello) as HTTP, and keeps the first bytes of every connection."""

    def __init__(self, cert: Cert) -> None:
        self.seen: list[str] = []
        self.ctx = server_context(cert, self.seen)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(IO_TIMEOUT)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                tls.sendall(answer("backend", self.seen[-1]))
                tls.unwrap()
        except (OSError, ssl.SSLError) as e:
            self.errors.append(e)

    def close(self) -> None:
        self.listener.close()


#: The Exec= handler: TLS on its stdin/stdout (fd 0 is the connection), answering "exec NAME".
EXEC_HANDLER = """
import socket, ssl, sys
seen = []
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
ctx.sni_callback = lambda _tls, name, _ctx: seen.append(name or "-")
sock = socket.socket(fileno=0)
with ctx.wrap_socket(sock, server_side=True) as tls:
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += tls.recv(4096)
    body = ("exec %s\\n" % seen[-1]).encode()
    tls.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n"
                % len(body) + body)
    tls.unwrap()
"""


@pytest.fixture
def backend(cert: Cert) -> Iterator[TLSBackend]:
    b = TLSBackend(cert)
    yield b
    b.close()


@pytest.fixture
def web(services: Path, daemon_factory, backend: TLSBackend, cert: Cert, tmp_path: Path):
    """tcpmuxd with: web (Forward= to the TLS backend) for example.test and *.example.test,
    tls-exec (Exec= of a TLS speaking program) for exec.apps.example.test, and echo (a plain TCPMUX
    service, Exec=/bin/cat)."""
    script = tmp_path / "tls_handler.py"
    script.write_text(EXEC_HANDLER)
    write_service(services, "web.conf", f"[Service]\nForward=127.0.0.1:{backend.port}\n"
                                        "ServerName=example.test *.example.test\n")
    write_service(services, "tls-exec.conf", f"[Service]\nExec={sys.executable} {script} "
                                             f"{cert.cert} {cert.key}\n"
                                             "ServerName=exec.apps.example.test\n")
    write_service(services, "echo.conf", "[Service]\nExec=/bin/cat\n")
    return daemon_factory(services)


def https_get(port: int, name: str, ctx: ssl.SSLContext) -> bytes:
    """A request over TLS to ``name`` through tcpmuxd; the body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(REQUEST)
            reply = read_all(tls)
    return reply.split(b"\r\n\r\n", 1)[1]


def refused_with(port: int, hello: bytes) -> bytes:
    """What tcpmuxd answers a raw ``hello`` with before it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.sendall(hello)
        return read_all(s)


class BIOClient:
    """A TLS client whose ClientHello is known before it connects (MemoryBIO), then driven
    over a socket: for tests that must send that hello in pieces or know its size."""

    def __init__(self, cert: Cert, name: str) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context(cert).wrap_bio(self.incoming, self.outgoing,
                                                 server_hostname=name)
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self.hello = self.outgoing.read()

    def finish(self, sock: socket.socket) -> bytes:
        """The hello was sent on ``sock``: complete the handshake, request, read the body."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(self.outgoing.read())
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake")
                self.incoming.write(data)
        self.tls.write(REQUEST)
        sock.sendall(self.outgoing.read())
        reply = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                if not data:
                    break
                self.incoming.write(data)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            reply += chunk
        return reply.split(b"\r\n\r\n", 1)[1]


def recut(hello: bytes, sizes: list[int]) -> bytes:
    """The one-record ``hello`` in handshake records of ``sizes`` bytes (the last: the rest)."""
    body, out, pos = hello[RECORD_HEADER:], b"", 0
    for size in [*sizes, len(hello)]:
        chunk = body[pos:pos + size]
        if chunk:
            out += hello[:3] + len(chunk).to_bytes(2, "big") + chunk
        pos += size
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- real clients


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("name", ["example.test", "www.example.test", "WWW.Example.Test"])
def test_python_client_through_forward(web: Daemon, backend: TLSBackend, cert: Cert,
                                       name: str, version: ssl.TLSVersion):
    body = https_get(web.port, name, client_context(cert, version))
    assert body == f"backend {name}\n".encode()  # the backend saw the name: untouched hello
    log = web.wait_for_log(f" {name} (sni): accepted")
    assert "bytes in" in log.split(f"{name} (sni): accepted", 1)[1].split("\n", 1)[0]


def test_python_client_through_exec(web: Daemon, cert: Cert):
    assert https_get(web.port, "exec.apps.example.test", client_context(cert)) == \
        b"exec exec.apps.example.test\n"
    web.wait_for_log(" exec.apps.example.test (sni): accepted, pid ")


def test_openssl_s_client(web: Daemon, cert: Cert):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{web.port}", "-servername",
         "api.example.test", "-CAfile", cert.cert, "-verify_return_error", "-quiet",
         "-ign_eof"],
        input=REQUEST, capture_output=True, timeout=30)
    assert out.stdout.endswith(b"\r\n\r\nbackend api.example.test\n"), out


def test_curl(web: Daemon, cert: Cert):
    if shutil.which("curl") is None:
        pytest.skip("no curl command (script/bootstrap installs it)")
    out = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "30", "--cacert", cert.cert,
         "--resolve", f"shop.example.test:{web.port}:127.0.0.1",
         f"https://shop.example.test:{web.port}/"], capture_output=True, timeout=40)
    assert out.returncode == 0 and out.stdout == b"backend shop.example.test\n", out


def test_name_line_still_works_on_the_same_port(web: Daemon, cert: Cert):
    assert web.talk(b"echo\r\nplain") == b"+\r\nplain"
    assert web.talk(b"HELP\r\n") == b"echo\r\ntls-exec\r\nweb\r\n"  # no server names
    # a TCPMUX client can ask for the TLS service by its name, then start TLS behind the "+"
    with web.connect() as raw:
        raw.sendall(b"web\r\n")
        assert raw.recv(3) == b"+\r\n"
        with client_context(cert).wrap_socket(raw, server_hostname="www.example.test") as tls:
            tls.sendall(REQUEST)
            assert read_all(tls).endswith(b"\r\n\r\nbackend www.example.test\n")
    log = web.wait_for_log(" web: accepted")
    assert " web (sni)" not in log


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", ["nosuch.test", "a.b.example.test"])
def test_unknown_name_gets_unrecognized_name_alert_and_a_log_line(web: Daemon, cert: Cert,
                                                                   name: str):
    """a.b.example.test: *.example.test matches one label only."""
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        https_get(web.port, name, client_context(cert))
    web.wait_for_log(f" {name} (sni): refused: unknown server name {name}")
    assert refused_with(web.port, real_hello(name, "1.3")) == alert_record(UNRECOGNIZED_NAME)


def test_no_server_name_gets_handshake_failure(web: Daemon):
    assert refused_with(web.port, real_hello(None, "1.3")) == alert_record(HANDSHAKE_FAILURE)
    web.wait_for_log("- (sni): refused: no server name in the TLS ClientHello")


def test_malformed_hello_gets_an_alert(web: Daemon):
    assert refused_with(web.port, b"\x16\x03\x01\x00\x00") == alert_record(50)
    web.wait_for_log("- (sni): refused: empty TLS handshake record")


def test_access_rules_apply(services: Path, daemon_factory, backend: TLSBackend, cert: Cert):
    write_service(services, "web.conf", f"[Service]\nForward=127.0.0.1:{backend.port}\n"
                                        "ServerName=example.test\nIPAddressDeny=any\n")
    d = daemon_factory(services)
    hello = real_hello("example.test", "1.3")
    assert refused_with(d.port, hello) == alert_record(ACCESS_DENIED)
    d.wait_for_log(" example.test (sni): refused: not allowed from 127.0.0.1")


def test_service_limits_apply(services: Path, daemon_factory, cert: Cert, tmp_path: Path):
    """MaxConnections=1: the second TLS client is refused while the first is served."""
    write_service(services, "slow.conf", "[Service]\nExec=/bin/sh -c 'echo started; "
                                         "exec sleep 30'\nServerName=slow.test\n"
                                         "MaxConnections=1\n")
    d = daemon_factory(services)
    with d.connect() as first:
        first.sendall(real_hello("slow.test", "1.3"))
        assert first.recv(100) == b"started\n"  # no "+" in front: the handler's first bytes
        second = refused_with(d.port, real_hello("slow.test", "1.3"))
        assert second == alert_record(HANDSHAKE_FAILURE)
        d.wait_for_log(" slow.test (sni): refused: service busy (1 connection)")


def test_refusal_before_the_hello_is_read_is_an_alert_too(services: Path, daemon_factory):
    """--max-connections is checked at accept, before anything is read: a TLS client whose
    first byte is there already still gets an alert, not a "-" line it cannot read."""
    write_service(services, "slow.conf", "[Service]\nExec=/bin/sh -c 'echo started; "
                                         "exec sleep 30'\nServerName=slow.test\n")
    d = daemon_factory(services, "--max-connections", "1")
    with d.connect() as first:
        first.sendall(real_hello("slow.test", "1.3"))
        assert first.recv(100) == b"started\n"
        d.signal(signal.SIGSTOP)  # so that the hello is there before the accept
        try:
            s = socket.create_connection(("127.0.0.1", d.port), timeout=IO_TIMEOUT)
            s.sendall(real_hello("slow.test", "1.3"))
        finally:
            d.signal(signal.SIGCONT)
        with s:
            assert read_all(s) == alert_record(HANDSHAKE_FAILURE)
    d.wait_for_log(" - (sni): refused: too many connections (1)")


# --------------------------------------------------------------------------- the hello's bytes


def test_hello_over_several_records_and_segments_reaches_the_backend(web: Daemon, cert: Cert):
    """Three records, sent in five pieces with pauses: the daemon waits (without spinning)
    until the hello is complete, and the backend completes the handshake with every byte."""
    client = BIOClient(cert, "pieces.example.test")
    data = recut(client.hello, [100, 150])
    with web.connect() as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start, end in ((0, 3), (3, 60), (60, 200), (200, 300), (300, len(data))):
            s.sendall(data[start:end])
            time.sleep(0.05)
        assert client.finish(s) == b"backend pieces.example.test\n"


def test_passto_gets_the_hello_unread(services: Path, daemon_factory, tmp_path: Path):
    path = tmp_path / "receiver.sock"
    receiver = socket.socket(socket.AF_UNIX)
    receiver.bind(str(path))
    receiver.listen()
    receiver.settimeout(IO_TIMEOUT)
    write_service(services, "pass.conf", f"[Service]\nPassTo=unix:{path}\n"
                                         "ServerName=pass.test\nAcknowledge=no\n")
    d = daemon_factory(services)
    hello = real_hello("pass.test", "1.3")
    with receiver, d.connect() as client:
        client.sendall(hello + b"more")
        channel, _ = receiver.accept()
        with channel:
            channel.settimeout(IO_TIMEOUT)
            conn, info = passfd.receive_connection(channel)
        with conn:
            assert info["via"] == "sni" and info["acknowledged"] == "yes"
            assert info["service"] == "pass"
            conn.settimeout(IO_TIMEOUT)
            got = b""
            while len(got) < len(hello) + 4:
                got += conn.recv(65536)
            assert got == hello + b"more"  # nothing answered, nothing taken
    d.wait_for_log(" pass.test (sni): passed")


# --------------------------------------------------------------------------- limits


def test_max_hello_size_edge(services: Path, daemon_factory, backend: TLSBackend, cert: Cert):
    """A hello of exactly --max-hello-size bytes is served; with a limit one byte smaller it is
    refused as soon as its lengths arrive, with an alert and a log line that says so."""
    write_service(services, "web.conf", f"[Service]\nForward=127.0.0.1:{backend.port}\n"
                                        "ServerName=edge.example.test\n")
    at_limit = BIOClient(cert, "edge.example.test")
    size = len(at_limit.hello)
    d = daemon_factory(services, "--max-hello-size", str(size))
    with d.connect() as s:
        s.sendall(at_limit.hello)
        assert at_limit.finish(s) == b"backend edge.example.test\n"
    d.wait_for_log(" edge.example.test (sni): accepted")
    over = BIOClient(cert, "edge.example.test")
    assert len(over.hello) == size
    d2 = daemon_factory(services, "--max-hello-size", str(size - 1))
    with d2.connect() as s:
        s.sendall(over.hello[:RECORD_HEADER + 4])  # the lengths say it cannot fit
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == alert_record(HANDSHAKE_FAILURE)
    d2.wait_for_log(f"- (sni): refused: TLS ClientHello too large (limit {size - 1} bytes)")


def test_incomplete_hello_times_out_without_spinning(services: Path, daemon_factory):
    write_service(services, "web.conf", "[Service]\nExec=/bin/cat\nServerName=t.test\n")
    d = daemon_factory(services, "--name-timeout", "1.5")
    hello = real_hello("t.test", "1.3")
    with d.connect() as s:
        s.sendall(hello[:200])
        before = cpu_seconds(d.proc.pid)
        assert read_all(s) == alert_record(HANDSHAKE_FAILURE)  # after the deadline
        used = cpu_seconds(d.proc.pid) - before
    d.wait_for_log("- (sni): refused: timed out waiting for the end of the TLS ClientHello "
                   "(200 bytes received)")
    assert used < 0.5, f"the daemon used {used:.2f}s of CPU waiting for the rest of the hello"


def test_client_hanging_up_mid_hello_is_logged_at_once(services: Path, daemon_factory):
    write_service(services, "web.conf", "[Service]\nExec=/bin/cat\nServerName=t.test\n")
    d = daemon_factory(services, "--name-timeout", "60")
    with d.connect() as s:
        s.sendall(real_hello("t.test", "1.3")[:100])
        time.sleep(0.1)  # the daemon waits for more first
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == alert_record(HANDSHAKE_FAILURE)
    d.wait_for_log("- (sni): refused: connection closed before the end of the TLS ClientHello")


# --------------------------------------------------------------------------- Accept=yes


@pytest.fixture
def activated_web(web: Daemon, services: Path) -> Iterator[Activator]:
    """The same services in the Accept=yes mode: an instance per connection."""
    if ACTIVATE is None:
        pytest.skip("systemd-socket-activate not installed (apt-get install systemd)")
    a = Activator(services, "--accept")
    yield a
    a.stop()


def test_accept_yes_serves_tls_clients(activated_web: Activator, cert: Cert):
    port = activated_web.port
    assert https_get(port, "www.example.test", client_context(cert)) == \
        b"backend www.example.test\n"
    assert https_get(port, "exec.apps.example.test", client_context(cert)) == \
        b"exec exec.apps.example.test\n"
    unknown = refused_with(port, real_hello("nosuch.test", "1.3"))
    assert unknown == alert_record(UNRECOGNIZED_NAME)
    assert talk(port, b"echo\r\nplain") == b"+\r\nplain"
    out = activated_web.stop()
    for line in (" www.example.test (sni): accepted", " exec.apps.example.test (sni): accepted",
                 " nosuch.test (sni): refused: unknown server name nosuch.test",
                 " echo: accepted"):
        assert line in out, out
