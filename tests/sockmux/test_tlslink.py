"""tcpmuxd.sockmux.tlslink: the TLS handshake and TLSTransport over real loopback TCP
sockets, with the throwaway certificates of conftest.py, under asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import socket
import ssl
import struct
import sys
import termios
from typing import Any, Callable

import pytest
import uvloop

from tcpmuxd.sockmux.tls import TLSSettings, client_context, server_context
from tcpmuxd.sockmux.tlslink import TLSConnection, TLSTransport, handshake

MiB = 1 << 20


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(main: Callable[[], Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(main(), 60))
    return runner


def contexts(certs: Any, *, client_certificate: bool = True) -> tuple[ssl.SSLContext,
                                                                       ssl.SSLContext]:
    server = server_context(TLSSettings(certificate=certs.server_cert, key=certs.server_key,
                                        ca=certs.ca))
    client = client_context(TLSSettings(
        certificate=certs.client_cert if client_certificate else None,
        key=certs.client_key if client_certificate else None, ca=certs.ca))
    return server, client


async def connected() -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking TCP sockets on loopback: (server's, client's)."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, listener.getsockname())
        server, _ = await loop.sock_accept(listener)
    server.setblocking(False)
    return server, client


async def handshaken(certs: Any) -> tuple[TLSConnection, TLSConnection]:
    server_ctx, client_ctx = contexts(certs)
    server, client = await connected()
    return await asyncio.gather(
        handshake(server, server_ctx, server_side=True),
        handshake(client, client_ctx, server_side=False, server_hostname="localhost"))


class Peer:
    """Sends ``payload`` as fast as the transport takes it; hashes what arrives; records the
    callbacks."""

    def __init__(self, payload: bytes = b"", expect: int = 0, pause_on_start: bool = False,
                 keep_open_on_eof: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.payload = memoryview(payload)
        self.sent = self.received = 0
        self.expect = expect
        self.pause_on_start = pause_on_start
        self.keep_open_on_eof = keep_open_on_eof
        self.digest = hashlib.sha256()
        self.paused = False
        self.events: list[str] = []
        self.losts: list[BaseException | None] = []
        self.done = loop.create_future()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.pause = loop.create_future()
        self.transport: Any = None
        if not expect:
            self.done.set_result(None)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")
        if self.pause_on_start:
            transport.pause_reading()
        self.pump()

    def pump(self) -> None:
        while self.sent < len(self.payload) and not self.paused:
            end = min(self.sent + 64 * 1024, len(self.payload))
            self.transport.write(self.payload[self.sent:end])
            self.sent = end

    def got(self, data: Any) -> None:
        self.digest.update(data)
        self.received += len(data)
        if self.received >= self.expect and not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True
        self.events.append("pause")
        if not self.pause.done():
            self.pause.set_result(None)

    def resume_writing(self) -> None:
        self.paused = False
        self.events.append("resume")
        self.pump()

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.eof.set_result(None)
        return self.keep_open_on_eof

    def connection_lost(self, exc: BaseException | None) -> None:
        self.losts.append(exc)
        if not self.lost.done():
            self.lost.set_result(exc)


class StreamPeer(Peer, asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        self.got(data)


class BufferedPeer(Peer, asyncio.BufferedProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer = bytearray(100_000)  # not a multiple of a record

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        self.got(memoryview(self.buffer)[:nbytes])


def start(conn: TLSConnection, protocol: Any) -> TLSTransport:
    transport = TLSTransport(asyncio.get_running_loop(), conn, protocol, conn.info())
    transport.start()
    return transport


def unread(sock: socket.socket) -> int:
    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)


# --------------------------------------------------------------------------- handshake


def test_handshake_gives_both_sides_the_connection(run, sockmux_certs):
    async def main():
        server, client = await handshaken(sockmux_certs)
        info = server.info()
        assert dict(x[0] for x in info["peercert"]["subject"])["commonName"] == "client"
        assert info["socket"] is server.sock and info["peername"] == client.sock.getsockname()
        assert client.info()["cipher"] is not None and client.obj.version() in ("TLSv1.3",
                                                                               "TLSv1.2")
        server.sock.close()
        client.sock.close()
    run(main)


def test_a_refused_client_learns_why(run, sockmux_certs):
    """A receptor requiring a client certificate refuses one without: its handshake fails,
    and the alert it sends first reaches the client, whose link ends with it."""
    async def main():
        server_ctx, client_ctx = contexts(sockmux_certs, client_certificate=False)
        server, client = await connected()
        results = await asyncio.gather(
            handshake(server, server_ctx, server_side=True),
            handshake(client, client_ctx, server_side=False, server_hostname="localhost"),
            return_exceptions=True)
        assert isinstance(results[0], ssl.SSLError) and server.fileno() == -1
        if isinstance(results[1], BaseException):  # TLS 1.2: the client's handshake fails
            assert isinstance(results[1], ssl.SSLError)
            return
        peer = StreamPeer()  # TLS 1.3: the client finished first and reads the alert
        start(results[1], peer)
        exc = await asyncio.wait_for(peer.lost, 10)
        assert isinstance(exc, ssl.SSLError) and "certificate required" in str(exc).lower()
    run(main)


def test_a_peer_that_goes_away_mid_handshake(run, sockmux_certs):
    async def main():
        server_ctx, _ = contexts(sockmux_certs)
        server, client = await connected()
        client.close()
        with pytest.raises(ConnectionResetError, match="during the TLS handshake"):
            await handshake(server, server_ctx, server_side=True)
        assert server.fileno() == -1
    run(main)


def test_a_cancelled_handshake_closes_its_socket(run, sockmux_certs):
    """A bounded handshake (the caller's timeout) leaves no descriptor behind."""
    async def main():
        server_ctx, _ = contexts(sockmux_certs)
        server, client = await connected()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):  # the client never says ClientHello
                await handshake(server, server_ctx, server_side=True)
        assert server.fileno() == -1
        client.close()
    run(main)


# --------------------------------------------------------------------------- the transport


@pytest.mark.parametrize("peer", [StreamPeer, BufferedPeer], ids=["Protocol", "Buffered"])
def test_both_ways_with_flow_control_then_close(run, sockmux_certs, peer):
    """8 MiB each way at once; a side that does not read makes the other's transport pause
    (and its bytes wait unread in its socket); reading again resumes it; every byte arrives;
    close() is the peer's EOF (close_notify), and each side's connection_lost comes once."""
    a_data, b_data = os.urandom(8 * MiB), os.urandom(8 * MiB)

    async def main():
        server, client = await handshaken(sockmux_certs)
        b = peer(b_data, len(a_data), pause_on_start=True)
        a = peer(a_data, len(b_data))
        tb, ta = start(server, b), start(client, a)
        await asyncio.wait_for(a.pause, 10)
        seen = b.received
        async with asyncio.timeout(10):
            while not unread(server.sock):
                await asyncio.sleep(0.005)
        for _ in range(5):
            await asyncio.sleep(0)
        assert b.received == seen and not tb.is_reading()
        tb.resume_reading()
        await asyncio.wait_for(asyncio.gather(a.done, b.done), 30)
        assert "resume" in a.events
        ta.close()
        await asyncio.wait_for(asyncio.gather(a.lost, b.lost), 10)
        return a, b, client.sock.fileno(), server.sock.fileno()

    a, b, a_fd, b_fd = run(main)
    assert a.digest.digest() == hashlib.sha256(b_data).digest()
    assert b.digest.digest() == hashlib.sha256(a_data).digest()
    assert "eof" in b.events and a.losts == [None] and b.losts == [None]
    assert a_fd == b_fd == -1


def test_abort_and_tcp_eof(run, sockmux_certs):
    """abort() drops what is buffered and ends at once; the peer sees the connection end
    without close_notify (TCP EOF or a reset) and its link ends too."""
    async def main():
        server, client = await handshaken(sockmux_certs)
        a, b = StreamPeer(os.urandom(4 * MiB)), StreamPeer(pause_on_start=True)
        ta, tb = start(client, a), start(server, b)
        await asyncio.wait_for(a.pause, 10)
        assert ta.get_write_buffer_size() > 0
        ta.abort()
        assert ta.get_write_buffer_size() == 0 and ta.is_closing()
        assert await asyncio.wait_for(a.lost, 10) is None
        tb.resume_reading()
        await asyncio.wait_for(b.lost, 10)
        assert a.losts == [None] and len(b.losts) == 1
        assert client.sock.fileno() == -1 and server.sock.fileno() == -1
    run(main)


def test_a_reset_after_data_ends_a_paused_link_once_it_reads(run, sockmux_certs):
    """The peer's data, then its reset, arrive while reading is paused: on resume the data
    is delivered and the reset ends the link (uvloop gives one last readiness call for an fd
    with an error, then stops polling it: the reset must be found in that call)."""
    async def main():
        server, client = await handshaken(sockmux_certs)
        a, b = StreamPeer(os.urandom(4 * MiB)), StreamPeer(pause_on_start=True)
        ta, tb = start(client, a), start(server, b)
        await asyncio.wait_for(a.pause, 10)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ta.abort()  # RST, whatever the client's socket holds
        await asyncio.sleep(0.1)  # the reset is there before the server reads again
        tb.resume_reading()
        assert isinstance(await asyncio.wait_for(b.lost, 10), ConnectionResetError)
        assert b.received > 0  # what came before the reset was delivered first
    run(main)


def test_no_half_close(run, sockmux_certs):
    async def main():
        server, client = await handshaken(sockmux_certs)
        a, b = StreamPeer(), StreamPeer(keep_open_on_eof=True)
        ta, tb = start(client, a), start(server, b)
        assert not ta.can_write_eof()
        with pytest.raises(NotImplementedError):
            ta.write_eof()
        ta.close()
        await asyncio.wait_for(b.eof, 10)
        # the side that keeps its end open after the peer's close_notify can still close
        assert not tb.is_closing()
        tb.close()
        await asyncio.wait_for(asyncio.gather(a.lost, b.lost), 10)
    run(main)


def test_set_protocol_switches_to_a_buffered_protocol(run, sockmux_certs):
    async def main():
        server, client = await handshaken(sockmux_certs)
        a, first = StreamPeer(), StreamPeer(expect=5)
        ta, tb = start(client, a), start(server, first)
        ta.write(b"hello")
        await asyncio.wait_for(first.done, 10)
        second = BufferedPeer(expect=len(b"world" * 1000))
        tb.set_protocol(second)
        assert tb.get_protocol() is second
        ta.writelines([b"world"] * 1000)  # one record, not a thousand
        await asyncio.wait_for(second.done, 10)
        assert second.digest.digest() == hashlib.sha256(b"world" * 1000).digest()
        ta.close()
        await asyncio.wait_for(a.lost, 10)
        await asyncio.wait_for(second.lost, 10)
    run(main)
