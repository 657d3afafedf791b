"""tcpmuxd.sockmux.links against the real thing: FIFOs from os.mkfifo, a pty pair, loopback TCP
with TLS certificates made by the openssl command, and child processes.

Every asynchronous test runs once under asyncio's own loop and once under uvloop, inside a
timeout; every test checks that no file descriptor is left open.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import hashlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import uvloop

from tcpmuxd.sockmux import links, pipelink
from tcpmuxd.sockmux.links import Backoff
from tcpmuxd.sockmux.pipelink import PipePairTransport
from tcpmuxd.sockmux.tls import TLSSettings, client_context, server_context

MiB = 1 << 20
EXCHANGE = 8 * MiB
CHUNK = 64 * 1024
REPO = Path(__file__).resolve().parents[2]
LOGGER = "tcpmuxd.sockmux.links"

# libuv opens a few process-wide descriptors with its first loop; do that before any snapshot.
for _factory in (asyncio.new_event_loop, uvloop.new_event_loop):
    _loop = _factory()
    _loop.run_until_complete(asyncio.sleep(0))
    _loop.close()


# --- harness --------------------------------------------------------------------------------

def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the directory listing's own descriptor
        fds[int(name)] = target
    return fds


@pytest.fixture(autouse=True)
def no_fd_leak():
    gc.collect()
    before = _open_fds()
    yield
    gc.collect()
    leaked = {fd: t for fd, t in _open_fds().items() if before.get(fd) != t}
    assert not leaked, f"descriptors left open: {leaked}"


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def run(loop_kind: str) -> Callable[..., Any]:
    def runner(coro: Any, timeout: float = 60.0) -> Any:
        factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(coro, timeout))
    return runner


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PeerBase:
    """One end of a test link: sends *payload* in chunks, obeying pause_writing; hashes what
    it receives; records every callback. It closes only when told to."""

    def __init__(self, payload: bytes = b"", expect: int = 0, *, keep_open_on_eof: bool = False,
                 pause_on_start: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.payload = memoryview(payload)
        self.sent = 0
        self.expect = expect
        self.digest = hashlib.sha256()
        self.received = 0
        self.data = bytearray()  # kept only while small
        self.keep_open_on_eof = keep_open_on_eof
        self.pause_on_start = pause_on_start
        self.transport: Any = None
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.made = 0
        self.eofs = 0
        self.losts: list[BaseException | None] = []
        self.made_fut = loop.create_future()
        self.eof_fut = loop.create_future()
        self.lost_fut = loop.create_future()
        self.done_fut = loop.create_future()
        self.pause_fut = loop.create_future()
        if not expect:
            self.done_fut.set_result(None)

    def connection_made(self, transport: Any) -> None:
        self.made += 1
        self.transport = transport
        if self.pause_on_start:
            transport.pause_reading()
        self.made_fut.set_result(transport)
        self.pump()

    def pump(self) -> None:
        t = self.transport
        while self.sent < len(self.payload) and not self.paused and not t.is_closing():
            end = min(self.sent + CHUNK, len(self.payload))
            t.write(self.payload[self.sent:end])
            self.sent = end

    def got(self, view: memoryview | bytes) -> None:
        self.digest.update(view)
        self.received += len(view)
        if self.received <= 4096:
            self.data += view
        if self.received >= self.expect and not self.done_fut.done():
            self.done_fut.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True
        self.pauses += 1
        if not self.pause_fut.done():
            self.pause_fut.set_result(None)

    def resume_writing(self) -> None:
        self.paused = False
        self.resumes += 1
        self.pump()

    def eof_received(self) -> bool:
        self.eofs += 1
        if not self.eof_fut.done():
            self.eof_fut.set_result(None)
        return self.keep_open_on_eof

    def connection_lost(self, exc: BaseException | None) -> None:
        self.losts.append(exc)
        if not self.lost_fut.done():
            self.lost_fut.set_result(exc)


class StreamPeer(PeerBase, asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        self.got(data)


class BufferedPeer(PeerBase, asyncio.BufferedProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buf = bytearray(256 * 1024)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.got(memoryview(self.buf)[:nbytes])


def tls_contexts(certs: Any) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = server_context(TLSSettings(certificate=certs.server_cert, key=certs.server_key,
                                        ca=certs.ca, require_peer_certificate=True))
    client = client_context(TLSSettings(certificate=certs.client_cert, key=certs.client_key,
                                        ca=certs.ca, server_name="localhost"))
    return server, client


async def tcp_link(fa: Callable[[], Any], fb: Callable[[], Any], *,
                   server_ctx: ssl.SSLContext | None = None,
                   client_ctx: ssl.SSLContext | None = None) -> tuple[Any, Any]:
    """A connects, B is accepted; returns (A's protocol, B's protocol)."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Any] = loop.create_future()

    def factory() -> Any:
        p = fb()
        if not accepted.done():
            accepted.set_result(p)
        return p

    server = await links.listen_tcp("127.0.0.1", 0, factory, tls=server_ctx)
    try:
        port = server.sockets[0].getsockname()[1]
        _, pa = await links.connect_tcp("127.0.0.1", port, fa, tls=client_ctx,
                                        server_hostname="localhost" if client_ctx else None)
        pb = await asyncio.wait_for(accepted, 10)
    finally:
        server.close()
    return pa, pb


async def fifo_link(tmp: Path, fa: Callable[[], Any], fb: Callable[[], Any]) -> tuple[Any, Any]:
    a2b, b2a = tmp / "a2b", tmp / "b2a"
    os.mkfifo(a2b)
    os.mkfifo(b2a)
    (_, pa), (_, pb) = await asyncio.gather(pipelink.open_fifos(str(b2a), str(a2b), fa),
                                            pipelink.open_fifos(str(a2b), str(b2a), fb))
    return pa, pb


async def comm_link(fa: Callable[[], Any], fb: Callable[[], Any]) -> tuple[Any, Any]:
    """B opens the pty's slave by path; A wraps the master descriptor."""
    m, s = os.openpty()
    try:
        _, pb = await pipelink.open_comm(os.ttyname(s), fb)
        _, pa = await pipelink.open_comm(m, fa)
    finally:
        os.close(s)
        os.close(m)
    return pa, pb


async def stdio_link(fa: Callable[[], Any], fb: Callable[[], Any]) -> tuple[Any, Any]:
    """B is open_stdio over two pipes; A holds their other ends (connect_fds)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        _, pb = await links.open_stdio(fb, stdin=in_r, stdout=out_w)
        _, pa = await pipelink.connect_fds(out_r, in_w, fa)
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
    return pa, pb


KINDS = ["tcp", "tls", "fifo", "comm", "stdio"]


async def make_link(kind: str, tmp: Path, certs: Any, fa: Callable[[], Any],
                    fb: Callable[[], Any]) -> tuple[Any, Any]:
    if kind == "tcp":
        return await tcp_link(fa, fb)
    if kind == "tls":
        server_ctx, client_ctx = tls_contexts(certs)
        return await tcp_link(fa, fb, server_ctx=server_ctx, client_ctx=client_ctx)
    if kind == "fifo":
        return await fifo_link(tmp, fa, fb)
    if kind == "comm":
        return await comm_link(fa, fb)
    if kind == "stdio":
        return await stdio_link(fa, fb)
    raise AssertionError(kind)


@pytest.fixture
def certs(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("sockmux_certs")


def _unread(transport: Any) -> int:
    """Bytes waiting, unread, in the descriptor a link transport reads (FIONREAD)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        fd = sock.fileno()
    else:
        fd = transport.get_extra_info("read_transport").get_extra_info("pipe").fileno()
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), sys.byteorder)


async def withheld(transport: Any, at_least: int = 1, timeout: float = 10.0) -> None:
    """Wait (bounded) until ``at_least`` bytes sit readable in the transport's descriptor,
    then let the loop poll it a few times: a transport that reads would have read them by
    the time this returns."""
    async with asyncio.timeout(timeout):
        while _unread(transport) < at_least:
            await asyncio.sleep(0.005)
    for _ in range(5):
        await asyncio.sleep(0)


async def settle() -> None:
    """Let late (duplicate) callbacks show up before counting them."""
    await asyncio.sleep(0.05)


# --- every kind: bytes both ways, EOF/close, flow control -----------------------------------

@pytest.mark.parametrize("buffered", [False, True], ids=["Protocol", "BufferedProtocol"])
@pytest.mark.parametrize("kind", KINDS)
def test_exchange_both_ways_then_close(run, kind, buffered, tmp_path, certs):
    """8 MiB each way at once arrive intact; A's close reaches B as EOF; each side's
    connection_lost(None) comes exactly once."""
    a_data, b_data = os.urandom(EXCHANGE), os.urandom(EXCHANGE)
    cls = BufferedPeer if buffered else StreamPeer

    async def main():
        pa, pb = await make_link(kind, tmp_path, certs, lambda: cls(a_data, len(b_data)),
                                 lambda: cls(b_data, len(a_data)))
        await asyncio.gather(pa.done_fut, pb.done_fut)
        pa.transport.close()
        await asyncio.gather(pa.lost_fut, pb.lost_fut)
        await settle()
        return pa, pb

    pa, pb = run(main())
    assert pa.digest.hexdigest() == sha(b_data)
    assert pb.digest.hexdigest() == sha(a_data)
    assert (pa.made, pb.made) == (1, 1)
    assert pb.eofs == 1
    assert pa.losts == [None] and pb.losts == [None]


@pytest.mark.parametrize("closer", ["A", "B"])
@pytest.mark.parametrize("kind", KINDS)
def test_close_propagates(run, kind, closer, tmp_path, certs):
    async def main():
        pa, pb = await make_link(kind, tmp_path, certs, StreamPeer, StreamPeer)
        first, other = (pa, pb) if closer == "A" else (pb, pa)
        first.transport.close()
        assert first.transport.is_closing()
        await asyncio.wait_for(asyncio.gather(pa.lost_fut, pb.lost_fut), 10)
        await settle()
        return first, other

    first, other = run(main())
    assert other.eofs == 1
    # TLS: the closer's transport reports the peer's close_notify as EOF too
    assert first.eofs <= (1 if kind == "tls" else 0)
    assert first.losts == [None] and other.losts == [None]


@pytest.mark.parametrize("kind", KINDS)
def test_flow_control(run, kind, tmp_path, certs):
    """A peer that does not read makes the sender's transport call pause_writing; once it
    reads again, resume_writing follows and every byte arrives."""
    big = os.urandom(16 * MiB if kind in ("tcp", "tls") else 4 * MiB)

    async def main():
        pa, pb = await make_link(kind, tmp_path, certs, lambda: StreamPeer(big),
                                 lambda: StreamPeer(b"", len(big), pause_on_start=True))
        await asyncio.wait_for(pa.pause_fut, 10)
        assert pa.paused and pa.sent < len(big)
        seen = pb.received
        await withheld(pb.transport)
        assert pb.received == seen, "bytes delivered while reading was paused"
        assert pb.received < len(big)
        pb.transport.resume_reading()
        await asyncio.wait_for(pb.done_fut, 30)
        pa.transport.close()
        await asyncio.gather(pa.lost_fut, pb.lost_fut)
        return pa, pb

    pa, pb = run(main())
    assert pa.pauses >= 1 and pa.resumes >= 1
    assert pb.digest.hexdigest() == sha(big)
    assert pa.losts == [None] and pb.losts == [None]


# --- TCP ------------------------------------------------------------------------------------

@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_tcp_socket_options(run, tls, certs):
    async def main():
        kw = {}
        if tls:
            kw["server_ctx"], kw["client_ctx"] = tls_contexts(certs)
        pa, pb = await tcp_link(StreamPeer, StreamPeer, **kw)
        opts = []
        for p in (pa, pb):
            sock = p.transport.get_extra_info("socket")
            opts.append((sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                         sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                         sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)))
        pa.transport.close()
        await asyncio.gather(pa.lost_fut, pb.lost_fut)
        return opts

    for nodelay, keepalive, idle in run(main()):
        assert nodelay and keepalive
        assert idle == links.TCP_KEEPALIVE_IDLE


@pytest.mark.skipif(not Path("/usr/bin/ss").exists() and not Path("/bin/ss").exists(),
                    reason="needs ss(8) to read a listener's backlog")
def test_listener_backlog(run):
    async def main():
        server = await links.listen_tcp("127.0.0.1", 0, StreamPeer)
        port = server.sockets[0].getsockname()[1]
        try:
            out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                                 text=True, timeout=10, check=True).stdout
        finally:
            server.close()
        return out

    fields = run(main()).split()
    assert int(fields[2]) >= 1024  # Send-Q of a listener: its backlog


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_refused_fast(run):
    port = _free_port()

    async def main():
        t0 = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            await links.connect_tcp("127.0.0.1", port, StreamPeer, timeout=5)
        return time.monotonic() - t0

    assert run(main()) < 1.0


def test_connect_times_out_when_backlog_is_full(run):
    """A listener whose accept queue is full drops SYNs: the dial hangs until the timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    addr = listener.getsockname()
    fillers = []
    try:
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(addr)
            fillers.append(f)
        time.sleep(0.2)

        async def main():
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await links.connect_tcp(*addr, StreamPeer, timeout=0.5)
            return time.monotonic() - t0

        elapsed = run(main())
        assert 0.4 < elapsed < 2.0
    finally:
        for f in fillers:
            f.close()
        listener.close()


def test_connect_timeout_covers_tls_handshake(run, certs):
    """A receptor that accepts TCP but never speaks TLS: the dial times out, no protocol made."""
    _, client_ctx = tls_contexts(certs)
    made = []

    async def main():
        server = await links.listen_tcp("127.0.0.1", 0, asyncio.Protocol)
        port = server.sockets[0].getsockname()[1]
        t0 = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                await links.connect_tcp("127.0.0.1", port, lambda: made.append(1), tls=client_ctx,
                                        server_hostname="localhost", timeout=0.5)
        finally:
            server.close()
        await settle()
        return time.monotonic() - t0

    assert run(main()) < 2.0
    assert made == []


def test_listener_hands_up_each_link(run):
    async def main():
        loop = asyncio.get_running_loop()
        accepted: list[StreamPeer] = []
        three = loop.create_future()

        def factory():
            accepted.append(StreamPeer())
            if len(accepted) == 3:
                three.set_result(None)
            return accepted[-1]

        server = await links.listen_tcp("127.0.0.1", 0, factory)
        port = server.sockets[0].getsockname()[1]
        clients = [(await links.connect_tcp("127.0.0.1", port, StreamPeer))[1] for _ in range(3)]
        await asyncio.wait_for(three, 5)
        server.close()
        transports = {id(p.transport) for p in accepted}
        for c in clients:
            c.transport.close()
        await asyncio.gather(*(p.lost_fut for p in accepted + clients))
        return transports

    assert len(run(main())) == 3


def test_early_bytes_reach_the_accepted_protocol(run, certs):
    """A client that writes right after the handshake: those bytes, possibly received with
    the handshake, are delivered after connection_made, in order."""
    server_ctx, client_ctx = tls_contexts(certs)

    async def main():
        pa, pb = await tcp_link(lambda: StreamPeer(b"hello, receptor"), 
                                lambda: StreamPeer(b"", 15),
                                server_ctx=server_ctx, client_ctx=client_ctx)
        await asyncio.wait_for(pb.done_fut, 5)
        pa.transport.close()
        await asyncio.gather(pa.lost_fut, pb.lost_fut)
        return bytes(pb.data)

    assert run(main()) == b"hello, receptor"


# --- TLS ------------------------------------------------------------------------------------

def test_tls_mutual_auth_identities(run, certs):
    server_ctx, client_ctx = tls_contexts(certs)

    async def main():
        pa, pb = await tcp_link(StreamPeer, StreamPeer, server_ctx=server_ctx,
                                client_ctx=client_ctx)
        server_sees = pb.transport.get_extra_info("peercert")
        client_sees = pa.transport.get_extra_info("peercert")
        version = pa.transport.get_extra_info("ssl_object").version()
        pa.transport.close()
        await asyncio.gather(pa.lost_fut, pb.lost_fut)
        return server_sees, client_sees, version

    server_sees, client_sees, version = run(main())
    assert dict(x[0] for x in server_sees["subject"])["commonName"] == "client"
    assert dict(x[0] for x in client_sees["subject"])["commonName"] == "localhost"
    assert version in ("TLSv1.2", "TLSv1.3")


async def _serve_tls(server_ctx: ssl.SSLContext) -> tuple[asyncio.Server, int, list[StreamPeer]]:
    accepted: list[StreamPeer] = []

    def factory():
        accepted.append(StreamPeer(b"welcome"))
        return accepted[-1]

    server = await links.listen_tcp("127.0.0.1", 0, factory, tls=server_ctx)
    return server, server.sockets[0].getsockname()[1], accepted


async def _good_client_works(port: int, certs: Any, accepted: list[StreamPeer]) -> None:
    _, client_ctx = tls_contexts(certs)
    n = len(accepted)
    _, pa = await links.connect_tcp("127.0.0.1", port, lambda: StreamPeer(b"", 7),
                                    tls=client_ctx, server_hostname="localhost", timeout=5)
    await asyncio.wait_for(pa.done_fut, 5)
    assert bytes(pa.data) == b"welcome"
    assert len(accepted) == n + 1
    pa.transport.close()
    await asyncio.gather(pa.lost_fut, accepted[-1].lost_fut)


async def _refused_client(port: int, ctx: ssl.SSLContext) -> None:
    """Dial with *ctx*; the link must not come to life: either the dial raises, or (TLS 1.3:
    the client finished its handshake before the receptor checked its certificate) the
    receptor closes it at once, before a byte of application data."""
    try:
        _, p = await links.connect_tcp("127.0.0.1", port, StreamPeer, tls=ctx,
                                       server_hostname="localhost", timeout=5)
    except (OSError, ssl.SSLError):
        return
    await asyncio.wait_for(p.lost_fut, 5)
    assert p.received == 0


def _assert_handshake_failure_logged(caplog: pytest.LogCaptureFixture) -> None:
    records = [r for r in caplog.records
               if r.name == LOGGER and r.levelno == logging.WARNING
               and "TLS handshake failed" in r.getMessage()]
    assert records, [r.getMessage() for r in caplog.records]


def test_tls_client_without_certificate_refused(run, certs, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    server_ctx, _ = tls_contexts(certs)
    anonymous = client_context(TLSSettings(ca=certs.ca))

    async def main():
        server, port, accepted = await _serve_tls(server_ctx)
        try:
            await _refused_client(port, anonymous)
            await asyncio.sleep(0.1)
            assert accepted == []
            await _good_client_works(port, certs, accepted)
        finally:
            server.close()

    run(main())
    _assert_handshake_failure_logged(caplog)


class TinyBufferPeer(BufferedPeer):
    """Hands out 100-byte buffers: a TLS record (up to 16 KiB) then spans many reads, and
    what OpenSSL holds decrypted must be read without the socket turning readable again."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)[:100]


def test_tls_record_larger_than_the_protocols_buffer(run, certs, tmp_path):
    """1 MiB each way through 100-byte buffers arrives intact (SHA-256), over TLS."""
    a_data, b_data = os.urandom(1 << 20), os.urandom(1 << 20)

    async def main():
        pa, pb = await make_link("tls", tmp_path, certs,
                                 lambda: TinyBufferPeer(a_data, len(b_data)),
                                 lambda: TinyBufferPeer(b_data, len(a_data)))
        await asyncio.wait_for(asyncio.gather(pa.done_fut, pb.done_fut), 30)
        pa.transport.close()
        await asyncio.gather(pa.lost_fut, pb.lost_fut)
        return pa, pb

    pa, pb = run(main())
    assert pa.digest.hexdigest() == sha(b_data)
    assert pb.digest.hexdigest() == sha(a_data)
    assert pa.losts == [None] and pb.losts == [None]


def test_tls_refused_client_is_told_why(run, certs):
    """The receptor refuses a client without a certificate with a TLS alert (OpenSSL writes
    it on the socket itself), so the connector learns the reason rather than an EOF: from the
    dial (TLS 1.2) or as the error its link is lost with (TLS 1.3: the alert comes after the
    client has finished its side of the handshake)."""
    server_ctx, _ = tls_contexts(certs)
    anonymous = client_context(TLSSettings(ca=certs.ca))

    async def main() -> BaseException | None:
        server, port, accepted = await _serve_tls(server_ctx)
        try:
            try:
                _, p = await links.connect_tcp("127.0.0.1", port, StreamPeer, tls=anonymous,
                                               server_hostname="localhost", timeout=5)
            except ssl.SSLError as exc:
                return exc
            await asyncio.wait_for(p.lost_fut, 5)
            assert p.received == 0 and accepted == []
            return p.losts[0]
        finally:
            server.close()

    exc = run(main())
    assert isinstance(exc, ssl.SSLError), repr(exc)
    assert "CERTIFICATE_REQUIRED" in str(exc).upper().replace(" ", "_"), str(exc)


def test_tls_client_certificate_from_another_ca_refused(run, certs, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    server_ctx, _ = tls_contexts(certs)
    rogue = client_context(TLSSettings(certificate=certs.rogue_client_cert,
                                       key=certs.rogue_client_key, ca=certs.ca))

    async def main():
        server, port, accepted = await _serve_tls(server_ctx)
        try:
            await _refused_client(port, rogue)
            await asyncio.sleep(0.1)
            assert accepted == []
            await _good_client_works(port, certs, accepted)
        finally:
            server.close()

    run(main())
    _assert_handshake_failure_logged(caplog)


def test_tls_server_from_wrong_ca_refused(run, certs, caplog):
    """The client trusts another CA: the dial fails verification; the receptor logs the
    failed handshake and goes on serving."""
    caplog.set_level(logging.INFO, LOGGER)
    server_ctx, _ = tls_contexts(certs)
    wrong_ca = client_context(TLSSettings(certificate=certs.client_cert, key=certs.client_key,
                                          ca=certs.rogue_ca))

    async def main():
        server, port, accepted = await _serve_tls(server_ctx)
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                await links.connect_tcp("127.0.0.1", port, StreamPeer, tls=wrong_ca,
                                        server_hostname="localhost", timeout=5)
            await asyncio.sleep(0.1)
            assert accepted == []
            await _good_client_works(port, certs, accepted)
        finally:
            server.close()

    run(main())
    _assert_handshake_failure_logged(caplog)


def test_tls_hostname_checked(run, certs):
    server_ctx, client_ctx = tls_contexts(certs)

    async def main():
        server, port, accepted = await _serve_tls(server_ctx)
        try:
            with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
                await links.connect_tcp("127.0.0.1", port, StreamPeer, tls=client_ctx,
                                        server_hostname="elsewhere.example", timeout=5)
        finally:
            server.close()
        await settle()

    run(main())


@pytest.mark.parametrize("pin", ["right", "wrong"])
def test_tls_pinned_certificate(run, certs, pin):
    """cafile holding only the receptor's self-signed certificate pins it."""
    server_ctx = server_context(TLSSettings(certificate=certs.pinned_cert,
                                            key=certs.pinned_key, require_peer_certificate=False))
    client_ctx = client_context(TLSSettings(
        ca=certs.pinned_cert if pin == "right" else certs.other_pinned_cert))

    async def main():
        server, port, accepted = await _serve_tls(server_ctx)
        try:
            if pin == "wrong":
                with pytest.raises(ssl.SSLCertVerificationError):
                    await links.connect_tcp("127.0.0.1", port, StreamPeer, tls=client_ctx,
                                            timeout=5)
                await settle()
                assert accepted == []
                return
            _, pa = await links.connect_tcp("127.0.0.1", port, lambda: StreamPeer(b"", 7),
                                            tls=client_ctx, timeout=5)
            await asyncio.wait_for(pa.done_fut, 5)
            assert bytes(pa.data) == b"welcome"
            pa.transport.close()
            await asyncio.gather(pa.lost_fut, accepted[0].lost_fut)
        finally:
            server.close()

    run(main())


def test_tls_handshake_timeout_on_receptor(run, certs, caplog):
    """A client that connects and never starts TLS is dropped after handshake_timeout."""
    caplog.set_level(logging.INFO, LOGGER)
    server_ctx, _ = tls_contexts(certs)

    async def main():
        accepted: list[StreamPeer] = []
        server = await links.listen_tcp("127.0.0.1", 0,
                                        lambda: accepted.append(StreamPeer(b"welcome"))
                                        or accepted[-1],
                                        tls=server_ctx, handshake_timeout=0.3)
        port = server.sockets[0].getsockname()[1]
        try:
            loop = asyncio.get_running_loop()
            idle = socket.create_connection(("127.0.0.1", port))
            idle.setblocking(False)
            try:
                t0 = time.monotonic()
                assert await asyncio.wait_for(loop.sock_recv(idle, 100), 5) == b""
                elapsed = time.monotonic() - t0
            finally:
                idle.close()
            assert 0.2 < elapsed < 3
            assert accepted == []
            await _good_client_works(port, certs, accepted)
        finally:
            server.close()

    run(main())
    _assert_handshake_failure_logged(caplog)


def test_tls_client_hello_waiting_at_accept_is_not_lost(run, certs, caplog):
    """Regression: a ClientHello already queued when the receptor accepts must reach the TLS
    layer. It used to be read by the plain transport before start_tls took over and was lost:
    the handshake stalled until handshake_timeout and the link came up only on a re-dial.

    A thread dials and starts its handshake while the receptor's loop is blocked, so the
    ClientHello is waiting when the connection is accepted; 50 links in a row must each be up
    (greeting received) within a second."""
    caplog.set_level(logging.INFO, LOGGER)
    server_ctx, client_ctx = tls_contexts(certs)

    def dial(port: int) -> tuple[bytes, float]:
        t0 = time.monotonic()
        data = b""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
                with client_ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    while len(data) < 7:
                        chunk = s.recv(7 - len(data))
                        if not chunk:
                            break
                        data += chunk
        except OSError as exc:
            return repr(exc).encode(), time.monotonic() - t0
        return data, time.monotonic() - t0

    async def main():
        loop = asyncio.get_running_loop()
        accepted: list[StreamPeer] = []
        server = await links.listen_tcp("127.0.0.1", 0,
                                        lambda: accepted.append(StreamPeer(b"welcome"))
                                        or accepted[-1],
                                        tls=server_ctx, handshake_timeout=2.0)
        port = server.sockets[0].getsockname()[1]
        bad = []
        try:
            for i in range(50):
                fut = loop.run_in_executor(None, dial, port)
                time.sleep(0.03)  # blocks the loop: connect + ClientHello before the accept
                data, elapsed = await fut
                if data != b"welcome" or elapsed >= 1.0:
                    bad.append((i, data, round(elapsed, 2)))
                if len(accepted) > i:
                    await asyncio.wait_for(accepted[i].lost_fut, 5)
        finally:
            server.close()
        await settle()
        return bad, len(accepted)

    bad, n = run(main())
    assert bad == [] and n == 50, bad
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_handshake_finishing_after_listener_closed_is_dropped(run, certs, caplog):
    caplog.set_level(logging.INFO, LOGGER)
    server_ctx, client_ctx = tls_contexts(certs)

    async def main():
        loop = asyncio.get_running_loop()
        server, port, accepted = await _serve_tls(server_ctx)
        raw = socket.create_connection(("127.0.0.1", port))
        await asyncio.sleep(0.1)  # accepted; the receptor now waits for a ClientHello
        server.close()
        raw.setblocking(False)
        t, p = await loop.create_connection(StreamPeer, sock=raw, ssl=client_ctx,
                                            server_hostname="localhost")
        exc = await asyncio.wait_for(p.lost_fut, 5)
        assert accepted == [] and p.received == 0
        return exc

    run(main())
    assert any("listener has been closed" in r.getMessage() for r in caplog.records)


# --- pipe pairs (shown on FIFOs) ------------------------------------------------------------

def test_half_close(run, tmp_path):
    """write_eof() is the peer's EOF; a peer whose eof_received returns True can still answer."""
    async def main():
        pa, pb = await fifo_link(tmp_path, lambda: StreamPeer(b"", 4),
                                 lambda: StreamPeer(b"", 4, keep_open_on_eof=True))
        pa.transport.write(b"ping")
        assert pa.transport.can_write_eof()
        pa.transport.write_eof()
        with pytest.raises(RuntimeError):
            pa.transport.write(b"more")
        await asyncio.wait_for(pb.eof_fut, 5)
        assert bytes(pb.data) == b"ping" and not pb.transport.is_closing()
        pb.transport.write(b"pong")
        pb.transport.close()
        await asyncio.wait_for(asyncio.gather(pa.lost_fut, pb.lost_fut), 5)
        await settle()
        return pa, pb

    pa, pb = run(main())
    assert bytes(pa.data) == b"pong"
    assert pa.eofs == 1 and pb.eofs == 1
    assert pa.losts == [None] and pb.losts == [None]


def test_pause_reading_in_connection_made_is_honoured(run, tmp_path):
    async def main():
        pa, pb = await fifo_link(tmp_path, StreamPeer,
                                 lambda: StreamPeer(b"", 5, pause_on_start=True))
        pa.transport.write(b"hello")
        await withheld(pb.transport, 5)
        assert pb.received == 0
        assert not pb.transport.is_reading()
        pb.transport.resume_reading()
        await asyncio.wait_for(pb.done_fut, 5)
        pa.transport.close()
        await asyncio.gather(pa.lost_fut, pb.lost_fut)
        return bytes(pb.data)

    assert run(main()) == b"hello"


def test_set_protocol_switches_mid_link(run, tmp_path):
    """The link's protocol can be replaced (say, a greeting phase, then the session), also
    from a Protocol to a BufferedProtocol; bytes and callbacks follow the new one."""
    async def main():
        pa, pb = await fifo_link(tmp_path, StreamPeer, lambda: StreamPeer(b"", 5))
        pa.transport.write(b"first")
        await asyncio.wait_for(pb.done_fut, 5)
        second = BufferedPeer(b"", 6)
        pb.transport.set_protocol(second)
        assert pb.transport.get_protocol() is second
        pa.transport.write(b"second")
        await asyncio.wait_for(second.done_fut, 5)
        pa.transport.close()
        await asyncio.gather(pa.lost_fut, second.lost_fut)
        await settle()
        return pb, second

    pb, second = run(main())
    assert bytes(pb.data) == b"first" and bytes(second.data) == b"second"
    assert pb.losts == [] and second.losts == [None] and second.eofs == 1


def test_abort_drops_the_write_buffer(run, tmp_path):
    async def main():
        pa, pb = await fifo_link(tmp_path, lambda: StreamPeer(os.urandom(4 * MiB)),
                                 lambda: StreamPeer(pause_on_start=True))
        await asyncio.wait_for(pa.pause_fut, 5)
        assert pa.transport.get_write_buffer_size() > 0
        pa.transport.abort()
        assert await asyncio.wait_for(pa.lost_fut, 2) is None
        pb.transport.resume_reading()
        await asyncio.wait_for(pb.lost_fut, 5)
        await settle()
        return pa, pb

    pa, pb = run(main())
    assert pb.received < 4 * MiB and pb.eofs == 1
    assert pa.losts == [None] and pb.losts == [None]


def test_peer_vanishing_with_unsent_bytes_is_an_error(run, tmp_path):
    async def main():
        pa, pb = await fifo_link(tmp_path, lambda: StreamPeer(os.urandom(4 * MiB)),
                                 lambda: StreamPeer(pause_on_start=True))
        await asyncio.wait_for(pa.pause_fut, 5)
        pb.transport.abort()
        exc = await asyncio.wait_for(pa.lost_fut, 5)
        await asyncio.wait_for(pb.lost_fut, 5)
        await settle()
        return pa, exc

    pa, exc = run(main())
    assert isinstance(exc, (BrokenPipeError, ConnectionResetError)), repr(exc)
    assert len(pa.losts) == 1


class Exploding(StreamPeer):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        raise RuntimeError("boom")


@pytest.mark.parametrize("kind", ["fifo", "tcp"])
def test_connection_made_raising_aborts_the_link(run, kind, tmp_path):
    """The exception reaches the caller; the link is aborted, so nothing is left open."""
    async def main():
        made: list[StreamPeer] = []
        factory = lambda: made.append(Exploding()) or made[-1]  # noqa: E731
        if kind == "fifo":
            a2b, b2a = tmp_path / "a2b", tmp_path / "b2a"
            os.mkfifo(a2b)
            os.mkfifo(b2a)
            other = asyncio.ensure_future(pipelink.open_fifos(str(a2b), str(b2a), StreamPeer))
            with pytest.raises(RuntimeError, match="boom"):
                await pipelink.open_fifos(str(b2a), str(a2b), factory)
            _, peer = await other
        else:
            peers: list[StreamPeer] = []
            server = await links.listen_tcp("127.0.0.1", 0,
                                            lambda: peers.append(StreamPeer()) or peers[-1])
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(RuntimeError, match="boom"):
                await links.connect_tcp("127.0.0.1", port, factory)
            server.close()
            while not peers:
                await asyncio.sleep(0.01)
            peer = peers[0]
        await asyncio.wait_for(asyncio.gather(peer.lost_fut, made[0].lost_fut), 5)
        await settle()
        return peer, made[0]

    peer, exploded = run(main())
    assert peer.losts == [None] and exploded.losts == [None]


def test_fifo_open_waits_for_a_late_peer(run, tmp_path):
    a2b, b2a = tmp_path / "a2b", tmp_path / "b2a"
    os.mkfifo(a2b)
    os.mkfifo(b2a)

    async def main():
        a = asyncio.ensure_future(pipelink.open_fifos(str(b2a), str(a2b),
                                                      lambda: StreamPeer(b"x")))
        await asyncio.sleep(0.3)
        assert not a.done()
        _, pb = await pipelink.open_fifos(str(a2b), str(b2a), lambda: StreamPeer(b"", 1))
        _, pa = await asyncio.wait_for(a, 5)
        await asyncio.wait_for(pb.done_fut, 5)
        pa.transport.close()
        await asyncio.gather(pa.lost_fut, pb.lost_fut)

    run(main())


def test_fifo_open_times_out_without_a_reader(run, tmp_path):
    a2b, b2a = tmp_path / "a2b", tmp_path / "b2a"
    os.mkfifo(a2b)
    os.mkfifo(b2a)

    async def main():
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await pipelink.open_fifos(str(b2a), str(a2b), StreamPeer, timeout=0.3)
        return time.monotonic() - t0

    assert 0.25 < run(main()) < 2


def test_regular_files_are_refused(run, tmp_path):
    f = tmp_path / "plain"
    f.write_bytes(b"")

    async def main():
        fd = os.open(f, os.O_RDWR)
        try:
            with pytest.raises(ValueError, match="regular file"):
                await pipelink.connect_fds(fd, fd, StreamPeer)
        finally:
            os.close(fd)
        with pytest.raises(ValueError):
            await pipelink.open_fifos(str(f), str(f), StreamPeer)

    run(main())


def test_pair_extra_info(run, tmp_path):
    async def main():
        pa, pb = await fifo_link(tmp_path, StreamPeer, StreamPeer)
        t = pa.transport
        info = (isinstance(t, PipePairTransport), t.get_extra_info("peername"),
                t.get_extra_info("read_transport") is not None, t.get_extra_info("nope", 7))
        t.set_write_buffer_limits(high=1000)
        limits = t.get_write_buffer_limits()
        t.close()
        await asyncio.gather(pa.lost_fut, pb.lost_fut)
        return info, limits

    (is_pair, peername, has_rt, default), limits = run(main())
    assert is_pair and peername == f"fifo:{tmp_path / 'b2a'},{tmp_path / 'a2b'}"
    assert has_rt and default == 7
    assert limits == (250, 1000)


# --- comm device ----------------------------------------------------------------------------

def test_comm_sets_raw_mode(run):
    m, s = os.openpty()
    try:
        async def main():
            t, p = await pipelink.open_comm(os.ttyname(s), StreamPeer, speed=115200)
            attrs = termios.tcgetattr(s)
            assert not t.can_write_eof()
            with pytest.raises(NotImplementedError):
                t.write_eof()
            t.close()
            await p.lost_fut
            return attrs

        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = run(main())
    finally:
        os.close(s)
        os.close(m)
    assert not lflag & (termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
    assert not iflag & (termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON
                        | termios.IXOFF | termios.ISTRIP)
    assert not oflag & termios.OPOST
    assert cflag & termios.CSIZE == termios.CS8 and not cflag & termios.PARENB
    assert cflag & termios.CLOCAL and cflag & termios.CREAD
    assert cc[termios.VMIN] == 1 and cc[termios.VTIME] == 0
    assert ispeed == ospeed == termios.B115200


def test_comm_is_eight_bit_clean(run):
    """Every byte value, including CR, LF, XON/XOFF, ^C, ^D, ^V and 0xff, goes through as is."""
    table = bytes(range(256)) * 64

    async def main():
        pa, pb = await comm_link(lambda: StreamPeer(table, len(table)),
                                 lambda: StreamPeer(table, len(table)))
        await asyncio.wait_for(asyncio.gather(pa.done_fut, pb.done_fut), 10)
        pa.transport.close()
        await asyncio.gather(pa.lost_fut, pb.lost_fut)
        return pa, pb

    pa, pb = run(main())
    assert pa.digest.hexdigest() == pb.digest.hexdigest() == sha(table)


def test_comm_keeps_the_callers_descriptor(run):
    m, s = os.openpty()
    try:
        async def main():
            t, p = await pipelink.open_comm(m, StreamPeer)
            t.close()
            await p.lost_fut

        run(main())
        os.write(s, b"x")  # both ends still open: the link closed its own duplicates only
        assert os.read(m, 1) == b"x"
    finally:
        os.close(s)
        os.close(m)


def test_comm_speed_needs_a_tty(run):
    async def main():
        with pytest.raises(ValueError, match="not a tty"):
            await pipelink.open_comm(os.devnull, StreamPeer, speed=9600)

    run(main())


def test_tty_writer_writelines_and_limits(run):
    """The tty write side (not the loop's pipe transport): writev with partial writes, bytes,
    bytearray and memoryview chunks, buffer limits, pause/resume."""
    chunks = [os.urandom(n) for n in (1, 100, 70000, 3, 300000, 5)]
    payload = b"".join(chunks)
    rounds = 8

    async def main():
        pa, pb = await comm_link(StreamPeer, lambda: StreamPeer(b"", len(payload) * rounds,
                                                                pause_on_start=True))
        t = pa.transport
        t.set_write_buffer_limits(high=4096)
        assert t.get_write_buffer_limits() == (1024, 4096)
        for i in range(rounds):
            t.writelines([chunks[0], bytearray(chunks[1]), memoryview(chunks[2]), b"",
                          chunks[3], chunks[4], memoryview(bytearray(chunks[5]))])
        assert pa.paused and t.get_write_buffer_size() > 4096
        pb.transport.resume_reading()
        await asyncio.wait_for(pb.done_fut, 20)
        assert t.get_write_buffer_size() == 0 and pa.resumes >= 1
        t.close()
        t.write(b"dropped after close")
        await asyncio.gather(pa.lost_fut, pb.lost_fut)
        return pb

    pb = run(main())
    assert pb.received == len(payload) * rounds
    assert pb.digest.hexdigest() == sha(payload * rounds)


# --- stdio ----------------------------------------------------------------------------------

def test_stdio_detaches_the_descriptors(run):
    """After open_stdio the given descriptors point at /dev/null; the link holds the pipes."""
    async def main():
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            t, p = await links.open_stdio(StreamPeer, stdin=in_r, stdout=out_w)
            targets = os.readlink(f"/proc/self/fd/{in_r}"), os.readlink(f"/proc/self/fd/{out_w}")
            os.write(out_w, b"stray")  # goes to /dev/null, not into the link
            t.write(b"link")
            data = os.read(out_r, 100)
            t.close()
            await p.lost_fut
            eof = os.read(out_r, 100)  # the link held the only write end
        finally:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
        return targets, data, eof

    targets, data, eof = run(main())
    assert targets == (os.devnull, os.devnull)
    assert data == b"link" and eof == b""


@pytest.mark.parametrize("closer", ["link", "terminal"])
def test_stdio_on_a_tty_is_raw_while_up(run, closer, caplog):
    """A tty on stdio is made raw; when the link closes its settings and blocking mode are
    restored; if the terminal hung up instead, there is nothing to restore and no error."""
    caplog.set_level(logging.DEBUG, LOGGER)
    m, s = os.openpty()
    keep = os.dup(s)  # the same open file description as the process's "stdin"
    saved = termios.tcgetattr(keep)
    try:
        async def main():
            _, sb = await links.open_stdio(lambda: StreamPeer(b"\n\r", 4), stdin=s, stdout=s)
            during = termios.tcgetattr(keep)
            # the terminal's side; raw=False: the settings seen are open_stdio's alone
            _, pb = await pipelink.open_comm(m, lambda: StreamPeer(b"\r\n\x03\x04", 2),
                                          raw=False)
            os.close(m)  # the link holds the master now
            await asyncio.gather(sb.done_fut, pb.done_fut)
            (sb if closer == "link" else pb).transport.close()
            await sb.lost_fut
            # while the terminal is still there (once it hangs up its settings are gone)
            after = termios.tcgetattr(keep) if closer == "link" else None
            blocking = os.get_blocking(keep)
            pb.transport.close()  # ("keep" holds the slave: the master sees no hang-up)
            await pb.lost_fut
            return during, bytes(sb.data), bytes(pb.data), sb.losts, after, blocking

        during, b_got, a_got, losts, after, blocking = run(main())
    finally:
        for fd in (s, keep):
            os.close(fd)
    assert not during[3] & (termios.ECHO | termios.ICANON)
    assert b_got == b"\r\n\x03\x04" and a_got == b"\n\r"
    assert losts == [None]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    if closer == "link":
        assert after == saved and during != saved
        assert blocking


def test_stdio_on_one_socket_uses_a_socket_transport(run):
    """sshd (socketpair) or inetd style: stdin and stdout are the same socket."""
    async def main():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            tb, pb = await links.open_stdio(lambda: StreamPeer(b"", 4, keep_open_on_eof=True),
                                            stdin=ours.fileno(), stdout=ours.fileno())
            assert not isinstance(tb, PipePairTransport) and tb.can_write_eof()
            _, pa = await loop.connect_accepted_socket(lambda: StreamPeer(b"", 4), theirs)
            pa.transport.write(b"ping")
            pa.transport.write_eof()
            await asyncio.wait_for(pb.eof_fut, 5)
            tb.write(b"pong")
            tb.close()
            await asyncio.gather(pa.lost_fut, pb.lost_fut)
        finally:
            ours.close()  # now /dev/null
        return pa, pb

    pa, pb = run(main())
    assert bytes(pb.data) == b"ping" and bytes(pa.data) == b"pong"
    assert pa.losts == [None] and pb.losts == [None]


STDIO_CHILD = textwrap.dedent("""\
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from tcpmuxd.sockmux import links

    class Echo(asyncio.Protocol):
        def __init__(self, done):
            self.done = done
        def connection_made(self, t):
            self.t = t
        def data_received(self, data):
            self.t.write(data)
        def pause_writing(self):
            self.t.pause_reading()
        def resume_writing(self):
            self.t.resume_reading()
        def connection_lost(self, exc):
            self.done.set_result(exc)

    async def main():
        done = asyncio.get_running_loop().create_future()
        await links.open_stdio(lambda: Echo(done))
        print("stray output must not reach the link", flush=True)
        sys.exit(0 if await done is None else 3)

    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.install()
    asyncio.run(main())
    """)


def test_stdio_in_a_child_process(run, loop_kind, tmp_path):
    """The real fd 0 and 1: a child running open_stdio with an echo protocol, reached through
    open_command (which is how ``ssh host sockmuxd --stdio`` is used)."""
    script = tmp_path / "stdio_echo.py"
    script.write_text(STDIO_CHILD.format(repo=str(REPO)))
    data = os.urandom(EXCHANGE)

    async def main():
        t, p = await links.open_command([sys.executable, str(script), loop_kind],
                                        lambda: StreamPeer(data, len(data)))
        await asyncio.wait_for(p.done_fut, 30)
        t.close()
        await asyncio.wait_for(p.lost_fut, 10)
        return p, t.get_extra_info("subprocess")

    p, proc = run(main())
    assert p.digest.hexdigest() == sha(data)
    assert p.losts == [None]
    assert proc.returncode == 0
    _assert_reaped(proc.pid)


# --- command --------------------------------------------------------------------------------

ECHO = ("import os\n"
        "while True:\n"
        "    d = os.read(0, 65536)\n"
        "    if not d: break\n"
        "    v = memoryview(d)\n"
        "    while v: v = v[os.write(1, v):]\n")


def _assert_reaped(pid: int) -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert not os.path.exists(f"/proc/{pid}") or "Z" not in Path(f"/proc/{pid}/stat").read_text()


def test_command_echo(run):
    data = os.urandom(EXCHANGE)

    async def main():
        t, p = await links.open_command([sys.executable, "-c", ECHO],
                                        lambda: BufferedPeer(data, len(data)))
        assert t.get_extra_info("peername").startswith("command:")
        await asyncio.wait_for(p.done_fut, 30)
        t0 = time.monotonic()
        t.close()
        await asyncio.wait_for(p.lost_fut, 10)
        await settle()
        return p, t.get_extra_info("subprocess"), time.monotonic() - t0

    p, proc, closing = run(main())
    assert p.digest.hexdigest() == sha(data)
    assert p.losts == [None]
    assert proc.returncode == 0  # it saw EOF on stdin and exited by itself
    assert closing < 1.5
    _assert_reaped(proc.pid)


def test_command_flow_control(run):
    """A command that does not read yet: our writes pause, then resume once it reads. (Its
    stdout closes when cat takes over with >/dev/null: EOF, kept open to go on writing.)"""
    data = os.urandom(4 * MiB)

    async def main():
        t, p = await links.open_command(["sh", "-c", "sleep 0.5; exec cat >/dev/null"],
                                        lambda: StreamPeer(data, keep_open_on_eof=True))
        await asyncio.wait_for(p.pause_fut, 5)
        assert p.sent < len(data)
        while p.sent < len(data) or t.get_write_buffer_size():
            await asyncio.sleep(0.02)
        t.close()
        await asyncio.wait_for(p.lost_fut, 10)
        return p, t.get_extra_info("subprocess")

    p, proc = run(main())
    assert p.pauses >= 1 and p.resumes >= 1
    assert p.eofs == 1 and p.losts == [None]
    assert proc.returncode == 0
    _assert_reaped(proc.pid)


def test_command_exit_is_eof(run):
    async def main():
        t, p = await links.open_command(
            [sys.executable, "-c", "import sys; sys.stdout.write('bye'); sys.exit(5)"],
            lambda: StreamPeer(b"", 3))
        await asyncio.wait_for(p.lost_fut, 10)
        await settle()
        return p, t.get_extra_info("subprocess")

    p, proc = run(main())
    assert bytes(p.data) == b"bye" and p.eofs == 1 and p.losts == [None]
    assert proc.returncode == 5
    _assert_reaped(proc.pid)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_command_terminated_when_link_closes(run, pidfd, monkeypatch):
    """A command that does not read stdin gets SIGTERM after terminate_timeout."""
    if not pidfd:
        monkeypatch.delattr(os, "pidfd_open", raising=False)

    async def main():
        t, p = await links.open_command(["sleep", "60"], StreamPeer, terminate_timeout=0.2)
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        t.close()
        await asyncio.wait_for(p.lost_fut, 10)
        return p, t.get_extra_info("subprocess"), time.monotonic() - t0

    p, proc, elapsed = run(main())
    assert proc.returncode == -signal.SIGTERM
    assert 0.15 < elapsed < 2
    assert p.losts == [None]
    _assert_reaped(proc.pid)


def test_command_ignoring_sigterm_is_killed(run):
    async def main():
        t, p = await links.open_command(
            ["sh", "-c", "trap '' TERM; echo ready; exec sleep 60"],
            lambda: StreamPeer(b"", 6), terminate_timeout=0.1, kill_timeout=0.3)
        await asyncio.wait_for(p.done_fut, 10)
        t0 = time.monotonic()
        t.close()
        await asyncio.wait_for(p.lost_fut, 10)
        return t.get_extra_info("subprocess"), time.monotonic() - t0

    proc, elapsed = run(main())
    assert proc.returncode == -signal.SIGKILL
    assert 0.35 < elapsed < 3
    _assert_reaped(proc.pid)


def test_command_stderr_is_ours(run, capfd):
    async def main():
        t, p = await links.open_command(
            [sys.executable, "-c", "import sys; sys.stderr.write('from-the-command\\n')"],
            StreamPeer)
        await asyncio.wait_for(p.lost_fut, 10)
        return t.get_extra_info("subprocess")

    proc = run(main())
    assert "from-the-command" in capfd.readouterr().err
    _assert_reaped(proc.pid)


def test_command_not_found(run, tmp_path):
    async def main():
        with pytest.raises(FileNotFoundError):
            await links.open_command([str(tmp_path / "no-such-command")], StreamPeer)
        with pytest.raises(ValueError):
            await links.open_command([], StreamPeer)

    run(main())


# --- Backoff --------------------------------------------------------------------------------

class FixedRandom:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_grows_to_the_cap():
    b = Backoff(initial=0.5, maximum=30, factor=2, jitter=0.2, rng=FixedRandom(0.0))
    assert [b.next_delay() for _ in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_jitter_stays_in_range():
    b = Backoff(initial=0.5, maximum=30, factor=2, jitter=0.2, rng=FixedRandom(0.999999))
    assert b.next_delay() == pytest.approx(0.4, abs=1e-5)
    rng_b = Backoff(jitter=0.2)
    bases = [0.5, 1, 2, 4, 8, 16, 30]
    for base in bases:
        d = rng_b.next_delay()
        assert 0.8 * base < d <= base
    draws = [rng_b.next_delay() for _ in range(2000)]
    assert all(24 < d <= 30 for d in draws)
    assert min(draws) < 24.5 and max(draws) > 29.5  # actually spread over the range


def test_backoff_never_exceeds_maximum():
    b = Backoff(initial=1, maximum=7, factor=3, jitter=0.5)
    assert max(b.next_delay() for _ in range(500)) <= 7


def test_backoff_reset():
    b = Backoff(rng=FixedRandom(0.0))
    for _ in range(5):
        b.next_delay()
    b.reset()
    assert b.next_delay() == 0.5


def test_backoff_resets_only_after_a_stable_link():
    b = Backoff(stable_after=10, rng=FixedRandom(0.0))
    for _ in range(4):
        b.next_delay()
    b.link_closed(2.0)  # dropped right after setup: keep backing off
    assert b.next_delay() == 8
    b.link_closed(10.0)
    assert b.next_delay() == 0.5


@pytest.mark.parametrize("kwargs", [dict(initial=0), dict(initial=5, maximum=1),
                                    dict(factor=0.5), dict(jitter=1.0), dict(jitter=-0.1)])
def test_backoff_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)
