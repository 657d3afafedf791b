"""The asyncio driver (session.py, exits.py): two hubs joined by a real socketpair link in one
event loop, real TCP entrances and exits on loopback.

Every test is bounded (``asyncio.timeout``) and closes what it opened; the main ones run on
both asyncio and uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import time
from typing import Any

import pytest

from tcpmuxd.sockmux import SockMuxConfig
from tcpmuxd.sockmux.tunnel import parse_exit
from tcpmuxd.sockmux.exits import ExitOpener, _Connecting
from tcpmuxd.sockmux.session import Hub, Session, Stream
from tcpmuxd.sockmux.stream import Phase
from tcpmuxd.sockmux.streamlog import StreamLog

SECRET = b"a shared secret of 32 bytes....."
OTHER = b"another shared secret, 32 bytes."

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

LOOPS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])


def run(coro: Any, loop: str = "asyncio", timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro
    if loop == "uvloop":
        return uvloop.run(bounded())
    return asyncio.run(bounded())


class CaptureLog:
    """EventLog stand-in: keeps the records."""

    to_journal = False

    def __init__(self) -> None:
        self.records: list[tuple[str, int, dict]] = []

    def record(self, message: str, priority: int = 6, **fields: object) -> None:
        self.records.append((message, priority, fields))

    def text(self) -> str:
        return "\n".join(m for m, _p, _f in self.records)

    def streams(self) -> list[dict]:
        return [f for _m, _p, f in self.records if f.get("SOCKMUX_EVENT") == "stream"]


def cfg(**kw: Any) -> SockMuxConfig:
    values: dict[str, Any] = dict(secret=SECRET, hostname="test")
    values.update(kw)
    return SockMuxConfig(**values)


# --------------------------------------------------------------------------- servers


class Echo(asyncio.Protocol):
    """Echoes everything, passes EOF on (half-close), flow-controlled both ways."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(data)

    def eof_received(self) -> bool:
        self.t.write_eof()
        self.t.close()
        return True

    def pause_writing(self) -> None:
        self.t.pause_reading()

    def resume_writing(self) -> None:
        self.t.resume_reading()


class Source(asyncio.Protocol):
    """Writes ``total`` bytes (forever if None) as fast as the transport lets it, then EOF."""

    chunk = os.urandom(256 * 1024)

    def __init__(self, total: int | None) -> None:
        self.left = total
        self.paused = False
        self.sent = 0

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.pump()

    def pump(self) -> None:
        while not self.paused and not self.t.is_closing():
            if self.left is not None and self.left <= 0:
                self.t.write_eof()
                return
            n = len(self.chunk) if self.left is None else min(self.left, len(self.chunk))
            self.t.write(self.chunk[:n] if n < len(self.chunk) else self.chunk)
            self.sent += n
            if self.left is not None:
                self.left -= n

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()

    def data_received(self, data: bytes) -> None:
        pass


async def serve(factory: Any) -> tuple[asyncio.AbstractServer, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
    return server, server.sockets[0].getsockname()[1]


# --------------------------------------------------------------------------- the pair


class Pair:
    """Hubs A and B, a socketpair link between them, entrances made on demand."""

    def __init__(self, a_config: SockMuxConfig, b_config: SockMuxConfig,
                 a_exits: dict | None = None, b_exits: dict | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.log_a, self.log_b = CaptureLog(), CaptureLog()
        self.a = Hub(a_config, exits=a_exits, opener=ExitOpener(log=self.log_a),
                     log=self.log_a, name="A", handshake_timeout=5)
        self.b = Hub(b_config, exits=b_exits, opener=ExitOpener(log=self.log_b),
                     log=self.log_b, name="B", handshake_timeout=5)
        self.a.finished_streams = []
        self.b.finished_streams = []
        self.sa: Session | None = None
        self.sb: Session | None = None

    async def link(self, wait: bool = True) -> None:
        s1, s2 = socket.socketpair()
        _, self.sa = await self.loop.connect_accepted_socket(self.a.new_session, s1)
        _, self.sb = await self.loop.connect_accepted_socket(self.b.new_session, s2)
        if wait:
            while not (self.sa.ready and self.sb.ready):
                assert not self.sa.closed and not self.sb.closed, (
                    self.log_a.text() + "\n" + self.log_b.text())
                await asyncio.sleep(0.005)

    async def entrance(self, hub: Hub) -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        await hub.add_entrance(sock)
        return sock.getsockname()[1]

    async def close(self) -> None:
        for hub in (self.a, self.b):
            hub.close("test over")
        for hub in (self.a, self.b):
            await hub.opener.close()
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def pair(a_config: SockMuxConfig | None = None, b_config: SockMuxConfig | None = None,
               a_exits: dict | None = None, b_exits: dict | None = None, link: bool = True):
    p = Pair(a_config or cfg(), b_config or cfg(), a_exits, b_exits)
    try:
        if link:
            await p.link()
        yield p
    finally:
        await p.close()


def exits(target: str, **by_port: str) -> dict:
    result = {None: parse_exit(target)}
    for port, t in by_port.items():
        result[int(port.lstrip("p"))] = parse_exit(t)
    return result


async def echo_roundtrip(port: int, size: int, seed: int = 0) -> tuple[str, str]:
    """Send ``size`` random bytes, half-close, read the echo at the same time: hashes."""
    data = os.urandom(size) if size else b""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = hashlib.sha256()

    async def read() -> None:
        while chunk := await reader.read(1 << 16):
            received.update(chunk)

    rtask = asyncio.ensure_future(read())
    view = memoryview(data)
    for i in range(0, len(data), 1 << 16):
        writer.write(view[i:i + (1 << 16)])
        await writer.drain()
    writer.write_eof()
    await rtask
    writer.close()
    return hashlib.sha256(data).hexdigest(), received.hexdigest()


async def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("loop", LOOPS)
def test_streams_both_directions_integrity(loop):
    """50 concurrent streams each way at once, random data echoed back, SHA-256 checked."""
    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(a_exits=exits(f"127.0.0.1:{eport}"),
                        b_exits=exits(f"127.0.0.1:{eport}")) as p:
            in_a = await p.entrance(p.a)  # A -> B
            in_b = await p.entrance(p.b)  # B -> A
            sizes = [(i * 7919) % 300_000 + (1 if i % 10 else 0) for i in range(50)]
            jobs = [echo_roundtrip(in_a, n) for n in sizes] + \
                   [echo_roundtrip(in_b, n) for n in sizes]
            results = await asyncio.gather(*jobs)
            for sent, got in results:
                assert sent == got
            await wait_for(lambda: p.a.open_streams() == 0 and p.b.open_streams() == 0,
                           what="streams to close")
            # one record per stream on each side, with byte counts
            assert len(p.log_a.streams()) == 100 and len(p.log_b.streams()) == 100
            assert sum(f["SOCKMUX_BYTES_SENT"] for f in p.log_a.streams()
                       if f["SOCKMUX_DIRECTION"] == "entrance") == sum(sizes)
            assert not p.sa.closed and not p.sb.closed
        echo.close()
    run(main(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_large_single_stream(loop):
    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(b_exits=exits(f"127.0.0.1:{eport}")) as p:
            port = await p.entrance(p.a)
            sent, got = await echo_roundtrip(port, 24 << 20)
            assert sent == got
        echo.close()
    run(main(), loop)


def test_half_close_both_ways():
    """The client's EOF reaches the server while the server's reply still flows back."""
    async def main() -> None:
        got_eof = asyncio.get_running_loop().create_future()

        class Reply(asyncio.Protocol):
            def connection_made(self, t):
                self.t, self.n = t, 0

            def data_received(self, data):
                self.n += len(data)

            def eof_received(self):  # reply only after the client's EOF
                got_eof.set_result(self.n)
                self.t.write(b"after eof: %d" % self.n)
                self.t.close()
                return True

        server, sport = await serve(Reply)
        async with pair(b_exits=exits(f"127.0.0.1:{sport}")) as p:
            port = await p.entrance(p.a)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 1000)
            writer.write_eof()
            assert await got_eof == 1000
            assert await reader.read() == b"after eof: 1000"
            writer.close()
            await wait_for(lambda: p.a.open_streams() == 0 == p.b.open_streams())
            reasons = [f["SOCKMUX_REASON"] for f in p.log_a.streams() + p.log_b.streams()]
            assert all(r == "closed" for r in reasons), reasons
        server.close()
    run(main())


def test_no_server_refusal():
    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(b_exits={9999: parse_exit(f"127.0.0.1:{eport}")}) as p:
            port = await p.entrance(p.a)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            assert await reader.read() == b""  # closed: no exit for this entrance port
            writer.close()
            await wait_for(lambda: len(p.log_a.streams()) == 1 and len(p.log_b.streams()) == 1)
            assert "No server" in p.log_a.streams()[0]["SOCKMUX_REASON"]
            assert "no exit for entrance port" in p.log_b.streams()[0]["SOCKMUX_REASON"]
            # an exit chosen by the entrance port does work
            p.b.exits[port] = parse_exit(f"127.0.0.1:{eport}")
            sent, got = await echo_roundtrip(port, 1000)
            assert sent == got
            # an exit that refuses the connection: the client is closed, with the reason
            dead = socket.socket()
            dead.bind(("127.0.0.1", 0))
            dead_port = dead.getsockname()[1]
            dead.close()
            p.b.exits[port] = parse_exit(f"127.0.0.1:{dead_port}")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.read() == b""
            writer.close()
            await wait_for(lambda: len(p.log_a.streams()) == 3)
            assert "Connection refused" in p.log_a.streams()[2]["SOCKMUX_REASON"]
        echo.close()
    run(main())


@pytest.mark.parametrize("timed_out", [False, True])
@pytest.mark.parametrize("loop", LOOPS)
def test_exit_connect_cancelled_after_its_future_finished(loop, timed_out):
    """The exit's connect coroutine runs without a Task (exits._Connecting). A cancel that
    comes after the future it waits on has finished, before its done callback ran, must
    still end the coroutine with CancelledError, as Task.cancel() would, not let it go on
    as connected. A timeout refuses the stream; the stream giving up only ends the attempt.
    The coroutine stands in for the event loop's create_connection (which cannot be made
    to finish at this exact point); it yields on a bare ``sleep(0)`` first, as the
    standard loop's may."""
    async def main() -> None:
        hub = Hub(cfg(), opener=ExitOpener())
        stream = Stream(hub, False)
        future = asyncio.get_running_loop().create_future()
        seen = []

        async def connect() -> None:
            await asyncio.sleep(0)
            seen.append("stepped")
            try:
                await future
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            seen.append("connected")

        connecting = _Connecting(hub.opener, parse_exit("127.0.0.1:9"), stream, connect())
        connecting.step()
        assert seen == [] and not connecting.done()
        await wait_for(lambda: seen == ["stepped"], what="the step after sleep(0)")
        future.set_result(None)  # its done callback is scheduled, not run yet
        assert connecting.cancel(timed_out)
        assert not connecting.cancel()  # once
        await wait_for(connecting.done, what="the coroutine ended")
        assert seen == ["stepped", "cancelled"]
        assert (stream.phase is Phase.FINISHED) is timed_out  # refused (exit_failed) only on a timeout
        assert hub.stats.finished == (1 if timed_out else 0)
    run(main(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_exit_connect_timeout_and_a_client_leaving_while_the_exit_connects(loop):
    """An exit whose server never answers the SYN: the stream is refused after the connect
    timeout, with that reason, and the client is closed. A client that leaves while its exit
    is still connecting cancels the attempt (not reported as a timeout)."""
    async def main() -> None:
        # A listener whose accept queue is full drops new SYNs: connect() hangs (SYN retries).
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        filler = socket.create_connection(silent.getsockname(), timeout=5)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        try:
            async with pair(b_exits=exits(target)) as p:
                p.b.opener.connect_timeout = 0.5
                port = await p.entrance(p.a)
                started = time.monotonic()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"hello")
                assert await reader.read() == b""
                assert 0.4 < time.monotonic() - started < 5
                writer.close()
                await wait_for(lambda: len(p.log_a.streams()) == 1)
                reason = p.log_a.streams()[0]["SOCKMUX_REASON"]
                assert f"No server ({target}: no connection within 0.5 s)" in reason, reason
                # a client that goes away (reset) while its exit is connecting. (It sends
                # nothing: the entrance stops reading a client whose bytes wait for the
                # stream to open, and would see the reset only then. An EOF would only
                # half-close: the stream would go on waiting for its server.)
                p.b.opener.connect_timeout = 30
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                def connecting() -> list:
                    return [s for s in p.sb.streams.values() if s.task is not None]
                await wait_for(lambda: len(connecting()) == 1, what="exit connecting")
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
                await wait_for(lambda: len(p.log_b.streams()) == 2,
                               what="stream over on B\n" + p.log_a.text() + "\n" + p.log_b.text())
                reason = p.log_b.streams()[1]["SOCKMUX_REASON"]
                assert "no connection within" not in reason, reason
                assert connecting() == []
        finally:
            filler.close()
            silent.close()
    run(main(), loop)


def test_max_streams_refused_cleanly_at_the_limit():
    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(a_config=cfg(max_streams=3), b_exits=exits(f"127.0.0.1:{eport}")) as p:
            port = await p.entrance(p.a)
            conns = []
            for i in range(3):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"ping%d" % i)
                assert await r.readexactly(5) == b"ping%d" % i
                conns.append((r, w))
            # the fourth is refused at once (reset), the others keep working
            r4, w4 = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await r4.readexactly(1)
            w4.close()
            for i, (r, w) in enumerate(conns):
                w.write(b"again")
                assert await r.readexactly(5) == b"again"
            assert "Too many streams" in p.log_a.streams()[-1]["SOCKMUX_REASON"] or \
                "stream limit" in p.log_a.streams()[-1]["SOCKMUX_REASON"]
            # the peer's limit is refused by the peer, cleanly too (B opens towards A)
            r, w = conns.pop()
            w.close()
            await wait_for(lambda: p.a.open_streams() == 2)
            sent, got = await echo_roundtrip(port, 10000)
            assert sent == got
            assert not p.sa.closed and p.sa.ready
            for r, w in conns:
                w.close()
        echo.close()
    run(main())


def test_peer_stream_limit_refusal():
    """B has the lower limit; streams B refuses arrive as a clean CLOSE at A."""
    async def main() -> None:
        echo, eport = await serve(Echo)
        # Only B limits, but the negotiated limit is the minimum, so A refuses locally; to see
        # the peer refuse, A must not know: a plain peer (60) against B's config of 2.
        async with pair(a_config=cfg(secret=None, require_auth=False, extensions=False),
                        b_config=cfg(secret=None, require_auth=False, max_streams=2,
                                     plain_max_streams=2),
                        b_exits=exits(f"127.0.0.1:{eport}")) as p:
            port = await p.entrance(p.a)
            conns = []
            for i in range(2):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"x")
                assert await r.readexactly(1) == b"x"
                conns.append(w)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert await r.read() == b""
            w.close()
            await wait_for(lambda: any("Too many streams" in f["SOCKMUX_REASON"]
                                       for f in p.log_a.streams()), what="refusal record")
            assert p.sa.ready and p.sb.ready
            for w in conns:
                w.close()
        echo.close()
    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_stalled_stream_does_not_slow_the_others(loop):
    """A client that reads nothing beside a bulk transfer: the bulk stream keeps (at least
    half) its solo throughput, and what is held for the stalled one stays within its window."""
    window = 256 * 1024
    bulk = 48 << 20

    async def bulk_transfer(port: int) -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.perf_counter()
        n = 0
        while chunk := await reader.read(1 << 18):
            n += len(chunk)
        elapsed = time.perf_counter() - start
        writer.close()
        assert n == bulk
        return bulk / elapsed

    async def main() -> None:
        bulk_server, bulk_port = await serve(lambda: Source(bulk))
        flood_server, flood_port = await serve(lambda: Source(None))
        async with pair(a_config=cfg(stream_window=window), b_config=cfg(stream_window=window),
                        b_exits=exits(f"127.0.0.1:{bulk_port}",
                                      p1=f"127.0.0.1:{flood_port}")) as p:
            port = await p.entrance(p.a)
            # The flood exit is chosen by entrance port 1 (a fake one, from a second entrance).
            stall_entrance = socket.socket()
            stall_entrance.bind(("127.0.0.1", 0))
            stall_entrance.listen(16)
            p.b.exits[stall_entrance.getsockname()[1]] = p.b.exits.pop(1)
            await p.a.add_entrance(stall_entrance)
            stall_port = stall_entrance.getsockname()[1]

            solo = max([await bulk_transfer(port) for _ in range(2)])

            stalled = socket.socket()
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.setblocking(False)
            await asyncio.get_running_loop().sock_connect(stalled, ("127.0.0.1", stall_port))
            # let the stalled stream fill everything it may
            await wait_for(lambda: any(s.down > 0 for s in p.sa.streams.values()),
                           what="stalled stream data")
            await asyncio.sleep(0.5)
            busy = max([await bulk_transfer(port) for _ in range(2)])

            await wait_for(lambda: len(p.sa.streams) == 1 == len(p.sb.streams),
                           what="bulk streams to close")
            (stream,) = [s for s in p.sa.streams.values()]  # only the stalled one is left
            held = stream.transport.get_write_buffer_size()
            unacked = p.sa.conn.unacknowledged(stream.sid)
            frame = p.sa.conn.features.max_frame_size
            assert unacked <= window + 2 * frame, unacked
            assert held <= window + 2 * frame, held
            (remote,) = [s for s in p.sb.streams.values()]
            assert p.sb.conn.send_window(remote.sid) == 0  # its window is used up
            assert remote.pending is None or len(remote.pending) <= 2 * 256 * 1024
            ratio = busy / solo
            print(f"solo {solo / 1e6:.0f} MB/s, beside a stalled stream {busy / 1e6:.0f} MB/s,"
                  f" ratio {ratio:.2f}; stalled: {held} bytes held, {unacked} unacknowledged")
            assert ratio >= 0.5
            stalled.close()
            await wait_for(lambda: p.a.open_streams() == 0 == p.b.open_streams())
        bulk_server.close()
        flood_server.close()
    run(main(), loop, timeout=90)


def test_link_death_closes_every_stream_and_a_new_link_works():
    async def main() -> None:
        echo, eport = await serve(Echo)
        server_side: list[asyncio.Transport] = []

        class Hold(Echo):
            def connection_made(self, t):
                super().connection_made(t)
                server_side.append(t)

        hold, hport = await serve(Hold)
        async with pair(a_exits=exits(f"127.0.0.1:{hport}"),
                        b_exits=exits(f"127.0.0.1:{hport}")) as p:
            in_a, in_b = await p.entrance(p.a), await p.entrance(p.b)
            clients = []
            for port in [in_a] * 5 + [in_b] * 5:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"hi")
                assert await r.readexactly(2) == b"hi"
                clients.append((r, w))
            assert len(server_side) == 10
            # the link dies under both sessions at once
            p.sa.transport.abort()
            for r, w in clients:  # every client sees reset or EOF, promptly
                async with asyncio.timeout(5):
                    with contextlib.suppress(ConnectionError):
                        assert await r.read() == b""
                w.close()
            await wait_for(lambda: all(t.is_closing() for t in server_side),
                           what="exit connections to close")
            await wait_for(lambda: p.a.open_streams() == 0 == p.b.open_streams())
            assert p.sa.closed and p.sb.closed
            assert "link down" in p.log_a.streams()[0]["SOCKMUX_REASON"]
            # entrances refuse while the link is down
            r, w = await asyncio.open_connection("127.0.0.1", in_a)
            with contextlib.suppress(ConnectionError):
                assert await r.read() == b""
            w.close()
            # a new link: new sessions, streams work again
            await p.link()
            p.a.exits = exits(f"127.0.0.1:{eport}")
            p.b.exits = exits(f"127.0.0.1:{eport}")
            for port in (in_a, in_b):
                sent, got = await echo_roundtrip(port, 100_000)
                assert sent == got
        echo.close()
        hold.close()
    run(main())


def test_dead_peer_detected_by_keepalive():
    async def main() -> None:
        quick = cfg(keepalive_interval=0.2, dead_peer_timeout=0.6)
        async with pair(a_config=quick, link=False) as p:
            s1, s2 = socket.socketpair()
            _, sa = await asyncio.get_running_loop().connect_accepted_socket(p.a.new_session, s1)
            # nobody answers on s2: no HELLO ever comes back
            async with asyncio.timeout(5):
                await sa.done
            assert "handshake not complete" in sa.reason or "peer dead" in sa.reason
            s2.close()
        async with pair(a_config=quick, b_config=quick) as p:
            # the link is up; B freezes (stops reading and writing)
            p.sb.transport.pause_reading()
            p.sb.closed = True  # B's session writes nothing any more (a hung peer)
            async with asyncio.timeout(5):
                await p.sa.done
            assert "peer dead" in p.sa.reason
            p.sb.closed = False
    run(main())


def test_authentication_failure_closes_the_link_with_a_reason():
    async def main() -> None:
        async with pair(a_config=cfg(), b_config=cfg(secret=OTHER), link=False) as p:
            await p.link(wait=False)
            async with asyncio.timeout(5):
                await asyncio.gather(p.sa.done, p.sb.done)
            for log in (p.log_a, p.log_b):
                assert "authentication failed" in log.text()
            assert not p.sa.ever_ready and not p.sb.ever_ready
            assert p.a.stats.auth_failures == 1
        # a peer without a secret when we require one
        async with pair(a_config=cfg(), b_config=cfg(secret=None, require_auth=False),
                        link=False) as p:
            await p.link(wait=False)
            async with asyncio.timeout(5):
                await asyncio.gather(p.sa.done, p.sb.done)
            assert "no shared secret" in p.log_a.text()
            assert "peer refused authentication" in p.log_b.text()
    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_delegate_plain_fallback(loop):
    """One side speaks plain DeleGate SockMux: 64 KiB windows, 16 KiB frames, no half-close;
    request/response streams work both ways."""
    async def main() -> None:
        echo, eport = await serve(Echo)
        plain = cfg(secret=None, require_auth=False, extensions=False)
        open_ = cfg(secret=None, require_auth=False)
        async with pair(a_config=plain, b_config=open_, a_exits=exits(f"127.0.0.1:{eport}"),
                        b_exits=exits(f"127.0.0.1:{eport}")) as p:
            f = p.sb.conn.features
            assert not f.extensions and not f.half_close
            assert f.max_frame_size == 16384 and f.send_window == 65536
            in_a, in_b = await p.entrance(p.a), await p.entrance(p.b)

            async def request(port: int, size: int) -> None:
                data = os.urandom(size)
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(data)
                assert await r.readexactly(size) == data
                w.close()

            await asyncio.gather(*[request(port, 200_000 + i)
                                   for port in (in_a, in_b) for i in range(20)])
            await wait_for(lambda: p.a.open_streams() == 0 == p.b.open_streams())
            assert not p.sa.closed
        echo.close()
    run(main(), loop)


def test_newer_link_replaces_the_old_one_only_once_ready():
    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(b_exits=exits(f"127.0.0.1:{eport}")) as p:
            old_a, old_b = p.sa, p.sb
            # a stray connection that never authenticates does not cut the link
            s1, s2 = socket.socketpair()
            _, stray = await asyncio.get_running_loop().connect_accepted_socket(
                p.b.new_session, s1)
            await asyncio.sleep(0.1)
            assert not old_b.closed and p.b.current is old_b
            s2.close()
            await wait_for(lambda: stray.closed)
            # a real new link from the peer replaces the old one
            await p.link()
            await wait_for(lambda: old_a.closed and old_b.closed)
            assert "replaced by a newer link" in p.log_b.text()
            port = await p.entrance(p.a)
            sent, got = await echo_roundtrip(port, 50_000)
            assert sent == got
        echo.close()
    run(main())


def test_exec_exit_and_unix_exit(tmp_path):
    async def main() -> None:
        path = str(tmp_path / "echo.sock")
        loop = asyncio.get_running_loop()
        userver = await loop.create_unix_server(Echo, path)
        cat = "/bin/cat" if os.path.exists("/bin/cat") else "/usr/bin/cat"
        async with pair(b_exits={None: parse_exit(f"exec:{cat}"),
                                 1: parse_exit(f"unix:{path}")}) as p:
            port = await p.entrance(p.a)
            results = await asyncio.gather(*[echo_roundtrip(port, 100_000 * i)
                                             for i in range(1, 6)])
            assert all(s == g for s, g in results)
            await wait_for(lambda: p.b.opener.children == 0, what="exec exits reaped")
            targets = [f["SOCKMUX_EXIT"] for f in p.log_b.streams()]
            assert all(t.startswith(f"exec:{cat} (pid ") for t in targets), targets
            # unix exit, by entrance port
            p.b.exits[port] = p.b.exits.pop(1)
            sent, got = await echo_roundtrip(port, 300_000)
            assert sent == got
        userver.close()
    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_unix_exit_without_its_socket_is_refused(loop, tmp_path):
    """A unix exit whose socket file is missing: the standard loop's connect fails in its
    first step, inside the callback that took the CONNECT (uvloop's reports it a step
    later). Either way the client is closed, the reason names the error, and the stream is
    gone from the session."""
    async def main() -> None:
        path = tmp_path / "missing.sock"
        async with pair(b_exits={None: parse_exit(f"unix:{path}")}) as p:
            port = await p.entrance(p.a)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            assert await reader.read() == b""
            writer.close()
            await wait_for(lambda: len(p.log_b.streams()) == 1)
            reason = p.log_b.streams()[0]["SOCKMUX_REASON"]
            assert f"No server (unix:{path}: No such file or directory)" in reason, reason
            assert p.sb.streams == {}  # not left waiting on its connect
    run(main(), loop)


def test_exec_exit_that_ignores_eof_is_terminated():
    async def main() -> None:
        async with pair(b_exits={None: parse_exit("exec:/bin/sleep 60")}) as p:
            p.b.opener.terminate_grace = 0.2
            port = await p.entrance(p.a)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await wait_for(lambda: p.b.opener.children == 1, what="program started")
            # the client goes away with a reset: the stream is over, the program is not
            w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                  struct.pack("ii", 1, 0))
            w.close()
            await wait_for(lambda: p.b.opener.children == 0, timeout=10,
                           what="program terminated and reaped")
    run(main())


def test_first_data_and_server_greeting():
    """A server that speaks first, a client that speaks first: no byte lost either way."""
    async def main() -> None:
        class Greeter(asyncio.Protocol):
            def connection_made(self, t):
                t.write(b"220 hello\r\n")
                self.t = t

            def data_received(self, data):
                self.t.write(data.upper())

        server, sport = await serve(Greeter)
        async with pair(b_exits=exits(f"127.0.0.1:{sport}")) as p:
            port = await p.entrance(p.a)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"quit\r\n")  # before the greeting arrives
            assert await r.readexactly(11) == b"220 hello\r\n"
            assert await r.readexactly(6) == b"QUIT\r\n"
            w.close()
        server.close()
    run(main())


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_connect_names_the_entrance_the_client_came_in_at(bind):
    """The peer is told client and entrance as HOST:PORT: from the listener itself when it is
    bound to one address, from the accepted socket when it is a wildcard."""
    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(b_exits=exits(f"127.0.0.1:{eport}")) as p:
            sock = socket.socket()
            sock.bind((bind, 0))
            sock.listen(16)
            await p.a.add_entrance(sock)
            port = sock.getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            client = "127.0.0.1:%d" % writer.get_extra_info("sockname")[1]
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            writer.close()
            await wait_for(lambda: len(p.log_b.streams()) == 1)
            fields = p.log_b.streams()[0]
            assert fields["REMOTE_ADDR"] == client
            assert fields["SOCKMUX_ENTRANCE"] == f"127.0.0.1:{port}"
        echo.close()
    run(main())


def test_closed_answers_go_out_on_an_idle_link():
    """CLOSED answers wait for other frames to share a write, but not on an idle link: the
    peer's slot is freed within CLOSED_DELAY (plus scheduling)."""
    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(b_exits=exits(f"127.0.0.1:{eport}")) as p:
            port = await p.entrance(p.a)
            sent, got = await echo_roundtrip(port, 100)
            assert sent == got
            await wait_for(lambda: p.sa.conn.stream_count == 0 and p.sb.conn.stream_count == 0,
                           timeout=2, what="both tables empty")
            assert p.sa.conn.outgoing_bytes == p.sb.conn.outgoing_bytes == 0
        echo.close()
    run(main())


def test_stream_records_over_the_rate_are_summed_up(monkeypatch):
    """At most stream_log_rate records a second (a bucket as deep): a burst gets exactly the
    bucket's depth of records (plus what it refilled meanwhile: nothing when the burst is
    quick), the other streams are counted in summary records with the refused ones among them
    and their bytes; the bucket refills at the rate."""
    from tcpmuxd.sockmux import streamlog
    monkeypatch.setattr(streamlog, "STREAM_LOG_SUMMARY", 0.3)

    def summed(log: CaptureLog, key: str) -> int:
        return sum(f[key] for _m, _p, f in log.records
                   if f.get("SOCKMUX_EVENT") == "streams-unlogged")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo, eport = await serve(Echo)
        async with pair(b_exits={None: parse_exit(f"127.0.0.1:{eport}")}) as p:
            port = await p.entrance(p.a)
            p.a.stream_log = StreamLog(loop, p.log_a, p.a.name, 3)  # a full bucket
            started = loop.time()
            # a burst: 5 streams of 10 bytes each way and one refused (no exit for its port)
            results = await asyncio.gather(*[echo_roundtrip(port, 10) for _ in range(5)])
            assert all(sent == got for sent, got in results)
            p.b.exits.pop(None)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            assert await reader.read() == b""
            writer.close()
            await wait_for(lambda: p.a.stats.finished == 6, what="all streams over")
            refill = int((loop.time() - started) * 3)
            streams = p.log_a.streams()
            logged = len(streams)
            assert 3 <= logged <= 3 + refill, p.log_a.text()  # the bucket's depth
            await wait_for(lambda: summed(p.log_a, "SOCKMUX_STREAMS") == 6 - logged,
                           what="the summary")
            logged_refused = sum("refused" in f["SOCKMUX_REASON"] for f in streams)
            assert summed(p.log_a, "SOCKMUX_REFUSED") == 1 - logged_refused
            unlogged_echoes = 5 - (logged - logged_refused)
            # the refused stream's 5 bytes went out inside its CONNECT
            assert summed(p.log_a, "SOCKMUX_BYTES_SENT") == 10 * unlogged_echoes + 5 * (
                1 - logged_refused)
            assert summed(p.log_a, "SOCKMUX_BYTES_RECEIVED") == 10 * unlogged_echoes
            # B has no limit: every stream got its record
            assert len(p.log_b.streams()) == 6
            # the bucket refills at the rate: a stream a second later has its record again
            await asyncio.sleep(1.0)
            p.b.exits[None] = parse_exit(f"127.0.0.1:{eport}")
            assert (await echo_roundtrip(port, 10))[0]
            await wait_for(lambda: len(p.log_a.streams()) == logged + 1, what="a record again")
            await asyncio.sleep(0.4)
            assert summed(p.log_a, "SOCKMUX_STREAMS") == 6 - logged
        echo.close()
    run(main())


def test_status_line_and_counters():
    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(b_exits=exits(f"127.0.0.1:{eport}")) as p:
            port = await p.entrance(p.a)
            await echo_roundtrip(port, 12345)
            await wait_for(lambda: p.a.stats.finished == 1)
            status = p.a.status()
            assert status.startswith("link up to test")
            assert "0 streams open, 1 total" in status
            assert p.a.bytes_totals() == (12345, 12345)
        echo.close()
    run(main())


def test_changes_reach_the_status_hook_once_per_delay():
    """Streams change the hub (opened, finished) many times; on_change runs change_delay
    after a change, once for every change meanwhile, and sees the counters of them all."""
    delay = 0.3

    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(b_exits=exits(f"127.0.0.1:{eport}")) as p:
            loop = p.a.loop
            calls: list[tuple[float, int]] = []
            p.a.change_delay = delay
            p.a.on_change = lambda: calls.append((loop.time(), p.a.stats.finished))
            port = await p.entrance(p.a)
            start = loop.time()
            await asyncio.gather(*(echo_roundtrip(port, 100, seed) for seed in range(20)))
            await wait_for(lambda: p.a.stats.finished == 20)
            done = loop.time()
            await asyncio.sleep(delay + 0.2)
            # 40 changes or more; one call per delay at most, none before the first delay
            assert 1 <= len(calls) <= (done - start) / delay + 2, (calls, done - start)
            assert all(t >= start + delay - 0.01 for t, _ in calls), (calls, start)
            assert all(b - a >= delay - 0.01 for (a, _), (b, _) in zip(calls, calls[1:])), calls
            assert calls[-1][1] == 20, calls
            before = len(calls)
            await echo_roundtrip(port, 100, 99)
            await wait_for(lambda: len(calls) > before and calls[-1][1] == 21,
                           what="a call for the next change")
        echo.close()
    run(main())


def test_entrance_connections_held_while_the_link_is_down():
    """With hold_timeout, a client arriving before the link waits for it (its first bytes
    kept); without a link in time it is reset."""
    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(b_exits=exits(f"127.0.0.1:{eport}"), link=False) as p:
            p.a.holds.hold_timeout = 5.0
            port = await p.entrance(p.a)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"early bytes")
            await asyncio.sleep(0.2)
            assert len(p.a.holds.waiting) == 1
            await p.link()
            assert await r.readexactly(11) == b"early bytes"
            w.close()
            # no link: held, then reset after the hold time
            p.sa.close("test")
            await wait_for(lambda: p.sb.closed)
            p.a.holds.hold_timeout = 0.3
            r, w = await asyncio.open_connection("127.0.0.1", port)
            start = time.monotonic()
            with contextlib.suppress(ConnectionError):
                assert await r.read() == b""
            assert time.monotonic() - start >= 0.25
            w.close()
            await wait_for(lambda: "no link within" in p.log_a.streams()[-1]["SOCKMUX_REASON"])
        echo.close()
    run(main())


def test_client_first_bytes_ride_in_connect():
    """A client that speaks first: its bytes travel inside CONNECT (one round trip less);
    a client that waits for the server: the stream opens after first_data_wait anyway.
    (Seen in the exit's link counters: streams requested, and data that came in SEND frames,
    which bytes inside CONNECT are not.)"""

    async def main() -> None:
        echo, eport = await serve(Echo)
        async with pair(b_exits=exits(f"127.0.0.1:{eport}")) as p:
            p.a.holds.first_data_wait = 0.2
            port = await p.entrance(p.a)
            assert p.b.current is not None
            stats = p.b.current.conn.stats

            def requested() -> int:
                return stats().streams_requested

            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.0\r\n\r\n")
            assert await r.readexactly(18) == b"GET / HTTP/1.0\r\n\r\n"
            w.close()
            assert requested() == 1 and stats().data_received == 0  # all 18 in CONNECT
            # silent client: opened after the wait, without first data
            r, w = await asyncio.open_connection("127.0.0.1", port)
            start = time.monotonic()
            await wait_for(lambda: requested() == 2, what="the stream to open")
            assert 0.15 <= time.monotonic() - start < 2
            w.write(b"late")
            assert await r.readexactly(4) == b"late"
            assert stats().data_received == 4  # in a SEND: the stream was open before them
            w.close()
            # silent clients arriving at different times each wait their own time (one
            # timer serves them all, re-armed for the next deadline)
            opened: dict[int, float] = {}
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            t1 = time.monotonic()
            await asyncio.sleep(0.1)
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)
            t2 = time.monotonic()
            while len(opened) < 2:
                assert time.monotonic() - t1 < 3, "the silent streams did not open"
                for i in range(3, requested() + 1):
                    opened.setdefault(i, time.monotonic())
                await asyncio.sleep(0.005)
            assert 0.15 <= opened[3] - t1 < 2
            assert 0.15 <= opened[4] - t2 < 2  # its own wait, not the first one's
            for w in (w1, w2):
                w.close()
        echo.close()
    run(main())


class Reply(asyncio.Protocol):
    """Answers "reply\\n" ``delay`` seconds after the first line, then reads until EOF."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.answered = False

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        if not self.answered and b"\n" in data:
            self.answered = True
            asyncio.get_running_loop().call_later(self.delay, self._answer)

    def _answer(self) -> None:
        if not self.t.is_closing():
            self.t.write(b"reply\n")

    def eof_received(self) -> bool:
        return False  # close


@pytest.mark.parametrize("case", [
    # (A's entrance waits, B's exit waits, server delay, the client gets the reply)
    ("exit carries the answer in CONNECTED", 0.0, 0.5, 0.0, True),
    ("neither waits: lost, as between two DeleGates", 0.0, 0.0, 0.005, False),
    ("entrance waits for the server to go quiet", 0.5, 0.0, 0.02, True),
], ids=lambda c: c[0])
def test_plain_peer_half_closing_client_gets_the_reply(case):
    """Plain SockMux has no half-close: the client's EOF ends the stream both ways and the
    peer drops what comes after it. --reply-wait gives a request sent with the client's EOF
    its answer all the same: B's exit answers CONNECTED once the server's first bytes are
    there (carrying them: what a DeleGate entrance, which reads its client's EOF right after
    CONNECTED, still delivers), and A's entrance passes the EOF of a client that got nothing
    yet on once the server went quiet. A with reply_wait 0 stands in for a DeleGate
    entrance, B with 0 for a DeleGate exit that waits 1 ms (the server here needs longer)."""
    _name, a_wait, b_wait, delay, delivered = case

    async def main() -> None:
        server, sport = await serve(lambda: Reply(delay))
        plain = cfg(secret=None, require_auth=False, extensions=False)
        async with pair(a_config=plain, b_config=plain, b_exits=exits(f"127.0.0.1:{sport}")) as p:
            p.a.holds.reply_wait, p.b.holds.reply_wait = a_wait, b_wait
            p.a.holds.first_data_wait = 0.5  # the request surely rides in CONNECT
            port = await p.entrance(p.a)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"request\n")
            w.write_eof()
            got = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert (got == b"reply\n") is delivered, (got, p.log_a.text(), p.log_b.text())
            await wait_for(lambda: p.a.open_streams() == 0 == p.b.open_streams())
            (a_stream,) = p.a.finished_streams
            assert a_stream.target == f"127.0.0.1:{sport}"  # CONNECTED names the server
            if delivered and a_wait:
                assert "its EOF passed on once the server was quiet" in a_stream.reason
        server.close()
    run(main())


def test_refused_connects_of_a_flooding_peer_are_logged_at_the_stream_rate(monkeypatch):
    """A DeleGate whose table is full sends CONNECT after CONNECT without a stream id (seen
    live: hundreds when its clients keep coming). Each is refused, and their records share
    the stream records' budget: at most stream_log_rate of them, the rest counted in the
    summary as refused."""
    from sockmux_pair import ScriptedPeer
    from tcpmuxd.sockmux import frames as F
    from tcpmuxd.sockmux import streamlog
    monkeypatch.setattr(streamlog, "STREAM_LOG_SUMMARY", 0.3)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        log = CaptureLog()
        hub = Hub(cfg(secret=None, require_auth=False, extensions=False), log=log, name="B",
                  stream_log_rate=3)
        ours, theirs = socket.socketpair()
        _, session = await loop.connect_accepted_socket(hub.new_session, ours)
        theirs.setblocking(False)
        await loop.sock_sendall(theirs, ScriptedPeer().handshake())
        await wait_for(lambda: session.ready, what="the link")
        flood = b"".join(ScriptedPeer.connect(F.NO_STREAM, client=f"127.0.0.1:{40000 + i}")
                         for i in range(200))
        await loop.sock_sendall(theirs, flood)
        await wait_for(lambda: hub.stats.refused == 200, what="200 refusals")
        refusals = [f for _m, _p, f in log.records if f.get("SOCKMUX_EVENT") == "stream-refused"]
        assert 1 <= len(refusals) <= 4, log.text()
        await wait_for(lambda: sum(f["SOCKMUX_REFUSED"] for _m, _p, f in log.records
                                   if f.get("SOCKMUX_EVENT") == "streams-unlogged")
                       == 200 - len(refusals), what="the summary")
        assert session.ready and not session.closed  # refused one by one, the link stays
        hub.close("test over")
        theirs.close()
    run(main())
