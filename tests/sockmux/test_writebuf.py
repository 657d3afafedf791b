"""tcpmuxd.sockmux.writebuf: the write side and the close shared by sockmuxd's own link
transports, over a real socket pair, under asyncio's loop and under uvloop.

BufferedWrites is a mixin: the transport under test here is the least one supplies (a send
call and the release of its socket), as FdWriteTransport and TLSTransport do.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from typing import Any, Callable

import pytest
import uvloop

from tcpmuxd.sockmux.writebuf import WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW, BufferedWrites

MiB = 1 << 20


class SocketWrites(BufferedWrites, asyncio.WriteTransport):
    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol: Any) -> None:
        asyncio.WriteTransport.__init__(self)
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._init_writes()

    def _raw_write(self, data: bytes | bytearray | memoryview) -> int:
        return self._sock.send(data)

    def _release(self) -> None:
        self._sock.close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._send(data)


class Recorder(asyncio.BaseProtocol):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.losts: list[BaseException | None] = []
        self.lost = asyncio.get_running_loop().create_future()
        self.resumed = asyncio.Event()

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")
        self.resumed.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.losts.append(exc)
        if not self.lost.done():
            self.lost.set_result(exc)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[..., Any]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(main: Callable[[], Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(asyncio.wait_for(main(), 30))
    return runner


def pair() -> tuple[socket.socket, socket.socket]:
    """A socket pair whose sending side takes little at a time, so writes back up soon."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    theirs.setblocking(False)
    return ours, theirs


async def read_all(sock: socket.socket, size: int = 0) -> bytes:
    """What the socket gives until EOF, or until ``size`` bytes."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while not size or len(got) < size:
        data = await loop.sock_recv(sock, 256 * 1024)
        if not data:
            break
        got += data
    return bytes(got)


def test_writes_go_out_at_once(run):
    async def main():
        ours, theirs = pair()
        proto = Recorder()
        t = SocketWrites(asyncio.get_running_loop(), ours, proto)
        t.write(b"hello")
        assert t.get_write_buffer_size() == 0
        assert theirs.recv(5) == b"hello"  # already in the socket: no loop pass needed
        t.close()
        assert await asyncio.wait_for(proto.lost, 5) is None
        assert ours.fileno() == -1 and proto.events == []
        theirs.close()
    run(main)


def test_backs_up_pauses_and_resumes(run):
    """A reader that does not read: what the socket does not take is buffered, in order;
    pause_writing above the high mark, once; resume_writing at the low mark once the reader
    drains it; every byte arrives."""
    data = os.urandom(4 * MiB)

    async def main():
        ours, theirs = pair()
        proto = Recorder()
        t = SocketWrites(asyncio.get_running_loop(), ours, proto)
        assert t.get_write_buffer_limits() == (WRITE_BUFFER_LOW, WRITE_BUFFER_HIGH)
        for i in range(0, len(data), 64 * 1024):
            t.write(data[i:i + 64 * 1024])
        assert proto.events == ["pause"]
        assert t.get_write_buffer_size() > WRITE_BUFFER_HIGH
        got = await read_all(theirs, size=len(data))
        await asyncio.wait_for(proto.resumed.wait(), 5)
        assert proto.events == ["pause", "resume"]
        assert t.get_write_buffer_size() == 0
        t.close()
        await asyncio.wait_for(proto.lost, 5)
        theirs.close()
        return got
    assert hashlib.sha256(run(main)).digest() == hashlib.sha256(data).digest()


def test_close_flushes_first(run):
    """close() with bytes buffered: they all go out, then connection_lost(None), once, and
    the socket is released (the reader sees EOF after the last byte)."""
    data = os.urandom(MiB)

    async def main():
        ours, theirs = pair()
        proto = Recorder()
        t = SocketWrites(asyncio.get_running_loop(), ours, proto)
        t.write(data)
        assert t.get_write_buffer_size() > 0
        t.close()
        t.close()
        assert t.is_closing() and not proto.losts
        t.write(b"ignored after close")
        got = await read_all(theirs)
        assert await asyncio.wait_for(proto.lost, 5) is None
        t.abort()
        await asyncio.sleep(0)  # one loop pass: a second connection_lost (call_soon) runs first
        assert proto.losts == [None] and ours.fileno() == -1
        theirs.close()
        return got
    assert run(main) == data


def test_abort_drops_the_buffer(run):
    async def main():
        ours, theirs = pair()
        proto = Recorder()
        t = SocketWrites(asyncio.get_running_loop(), ours, proto)
        t.write(bytes(MiB))
        buffered = t.get_write_buffer_size()
        assert buffered > 0
        t.abort()
        assert t.get_write_buffer_size() == 0 and t.is_closing()
        assert await asyncio.wait_for(proto.lost, 5) is None
        got = await read_all(theirs)
        theirs.close()
        assert len(got) == MiB - buffered and proto.losts == [None]
    run(main)


def test_a_write_error_ends_the_transport(run):
    """The reader goes away: the next write fails, connection_lost gets the error, once."""
    async def main():
        ours, theirs = pair()
        proto = Recorder()
        t = SocketWrites(asyncio.get_running_loop(), ours, proto)
        theirs.close()
        t.write(b"to nobody")
        exc = await asyncio.wait_for(proto.lost, 5)
        assert isinstance(exc, BrokenPipeError)
        t.write(b"more")
        await asyncio.sleep(0)  # one loop pass: a second connection_lost (call_soon) runs first
        assert proto.losts == [exc] and ours.fileno() == -1
    run(main)


def test_buffer_limits(run):
    async def main():
        ours, theirs = pair()
        proto = Recorder()
        t = SocketWrites(asyncio.get_running_loop(), ours, proto)
        with pytest.raises(ValueError):
            t.set_write_buffer_limits(high=10, low=20)
        t.set_write_buffer_limits(low=1000)
        assert t.get_write_buffer_limits() == (1000, 4000)
        t.set_write_buffer_limits(high=8000)
        assert t.get_write_buffer_limits() == (2000, 8000)
        t.write(bytes(256 * 1024))
        assert proto.events == ["pause"]
        t.set_write_buffer_limits(high=0)  # paused already: not paused twice
        assert proto.events == ["pause"]
        t.abort()
        await asyncio.wait_for(proto.lost, 5)
        theirs.close()
    run(main)


def test_a_failing_protocol_callback_is_reported_not_raised(run):
    async def main():
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        ours, theirs = pair()

        class Broken(Recorder):
            def pause_writing(self) -> None:
                raise RuntimeError("no")

        proto = Broken()
        t = SocketWrites(loop, ours, proto)
        t.write(bytes(MiB))  # would pause: the handler gets the error, the write goes on
        assert len(reported) == 1 and "pause_writing" in reported[0]["message"]
        assert isinstance(reported[0]["exception"], RuntimeError)
        assert len(await read_all(theirs, size=MiB)) == MiB
        t.close()
        await asyncio.wait_for(proto.lost, 5)
        theirs.close()
    run(main)
