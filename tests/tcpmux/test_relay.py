"""relay.py, directly: a Relay between real socket pairs (unix socketpairs, loopback TCP where
resets matter), on a real event loop.

Back-pressure is measured with the kernel's own counts (FIONREAD): what the sender wrote, minus
what still waits in the relay's receive queue, minus what reached the far end, is what the
relay holds in memory. A unix socketpair moves bytes synchronously (a send lands in the peer's
queue at once), so after the loop has run until nothing changes any more, that figure is exact;
the loop is run by iterations, never for a time.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import hashlib
import socket
import struct
import termios
from collections.abc import Callable

import pytest

from tcpmuxd.tcpmux.relay import CHUNK, Relay

WAIT = 10.0  # bound of every wait for an event
#: Iterations the loop may run while settling: far more than a stall ever needs.
MAX_ITERATIONS = 100_000


def queued(sock: socket.socket) -> int:
    """Bytes in ``sock``'s receive queue (SIOCINQ)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


def unix_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


async def settle(snapshot: Callable[[], object]) -> None:
    """Run the loop until ``snapshot()`` no longer changes over a few iterations (the relay
    and the kernel have done all they can), bounded by MAX_ITERATIONS."""
    last, same = snapshot(), 0
    for _ in range(MAX_ITERATIONS):
        await asyncio.sleep(0)
        now = snapshot()
        same = same + 1 if now == last else 0
        if same >= 5:
            return
        last = now
    raise AssertionError("the relay did not settle")


class Ends:
    """client <-> (a | Relay | b) <-> server, with the relay's result."""

    def __init__(self, make: Callable[[], tuple[socket.socket, socket.socket]]) -> None:
        self.loop = asyncio.get_running_loop()
        self.client, self.a = make()
        self.b, self.server = make()
        for s in (self.client, self.server):
            s.setblocking(False)
        # the relay's sockets, kept by number to ask the kernel about their queues
        self.a_fd, self.b_fd = self.a.fileno(), self.b.fileno()
        self.done: asyncio.Future[tuple[int, int, OSError | None]] = self.loop.create_future()
        self.calls = 0
        self.relay = Relay(self.loop, self.a, self.b, self._on_done)

    def _on_done(self, forth: int, back: int, error: OSError | None) -> None:
        self.calls += 1
        if not self.done.done():
            self.done.set_result((forth, back, error))

    async def read_to_eof(self, sock: socket.socket) -> bytes:
        data = bytearray()
        while chunk := await asyncio.wait_for(self.loop.sock_recv(sock, 1 << 20), WAIT):
            data += chunk
        return bytes(data)

    def close(self) -> None:
        self.client.close()
        self.server.close()


def queued_fd(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def fill(sock: socket.socket, data: memoryview) -> int:
    """Write what ``sock`` takes now, without blocking; how much that was."""
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            break
    return sent


def test_both_directions_and_half_close():
    """EOF from the client reaches the server as EOF while the server can still answer; the
    relay ends once both directions have, with the bytes each destination got."""
    async def main() -> None:
        e = Ends(unix_pair)
        await e.loop.sock_sendall(e.client, b"request")
        e.client.shutdown(socket.SHUT_WR)
        assert await e.read_to_eof(e.server) == b"request"
        assert not e.done.done()  # only one direction has ended
        await e.loop.sock_sendall(e.server, b"the response")
        e.server.shutdown(socket.SHUT_WR)
        assert await e.read_to_eof(e.client) == b"the response"
        assert await asyncio.wait_for(e.done, WAIT) == (7, 12, None)
        e.close()

    asyncio.run(main())


@pytest.mark.parametrize("both", [False, True], ids=["one-way", "both-ways"])
def test_back_pressure_holds_at_most_one_chunk_per_direction(both: bool):
    """Ends that do not read: the relay stops reading from the source once the destination is
    full, holding at most CHUNK bytes per direction; once the ends read, everything arrives,
    in order, followed by the EOF."""
    size = 16 * CHUNK
    forth = bytes(range(256)) * (size // 256)
    back = bytes(reversed(forth))

    async def main() -> None:
        e = Ends(unix_pair)
        written = [0, 0]
        directions = [(e.client, memoryview(forth))]
        if both:
            directions.append((e.server, memoryview(back)))

        def snapshot() -> tuple[int, ...]:
            return (queued_fd(e.a_fd), queued_fd(e.b_fd), queued(e.server), queued(e.client))

        while True:  # write until neither end takes anything any more
            progress = 0
            for i, (sock, data) in enumerate(directions):
                n = fill(sock, data[written[i]:])
                written[i] += n
                progress += n
            await settle(snapshot)
            if not progress:
                break
        assert written[0] < size, "the buffers took everything: nothing was held back"
        held_forth = written[0] - queued_fd(e.a_fd) - queued(e.server)
        assert queued_fd(e.a_fd) > 0  # the relay stopped reading from the client
        assert 0 <= held_forth <= CHUNK, held_forth
        if both:
            held_back = written[1] - queued_fd(e.b_fd) - queued(e.client)
            assert queued_fd(e.b_fd) > 0
            assert 0 <= held_back <= CHUNK, held_back

        # now read: the rest goes through, then the EOFs, intact and in order
        async def send_rest(sock: socket.socket, data: memoryview, start: int) -> None:
            await e.loop.sock_sendall(sock, data[start:])
            sock.shutdown(socket.SHUT_WR)

        senders = [e.loop.create_task(send_rest(sock, data, written[i]))
                   for i, (sock, data) in enumerate(directions)]
        if not both:
            e.server.shutdown(socket.SHUT_WR)
        got_forth, got_back = await asyncio.gather(e.read_to_eof(e.server),
                                                   e.read_to_eof(e.client))
        await asyncio.gather(*senders)
        assert hashlib.sha256(got_forth).digest() == hashlib.sha256(forth).digest()
        assert got_back == (back if both else b"")
        assert await asyncio.wait_for(e.done, WAIT) == (size, size if both else 0, None)
        e.close()

    asyncio.run(main())


def test_abort_resets_both_ends():
    """A cut (the daemon stopping) is a reset on both sides, never an EOF that looks like a
    normal end; on_done comes once."""
    async def main() -> None:
        e = Ends(tcp_pair)
        await e.loop.sock_sendall(e.client, b"ping")
        assert await asyncio.wait_for(e.loop.sock_recv(e.server, 10), WAIT) == b"ping"
        e.relay.abort()
        e.relay.abort()
        assert await asyncio.wait_for(e.done, WAIT) == (4, 0, None)
        assert e.calls == 1
        for end in (e.client, e.server):
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(e.loop.sock_recv(end, 10), WAIT)
        e.close()

    asyncio.run(main())


def test_an_error_on_one_side_ends_both():
    """The server resets: the relay ends with that error and closes the client's side."""
    async def main() -> None:
        e = Ends(tcp_pair)
        await e.loop.sock_sendall(e.server, b"partial")
        assert await asyncio.wait_for(e.loop.sock_recv(e.client, 10), WAIT) == b"partial"
        e.server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        e.server.close()
        forth, back, error = await asyncio.wait_for(e.done, WAIT)
        assert (forth, back) == (0, 7) and isinstance(error, ConnectionResetError)
        assert await asyncio.wait_for(e.loop.sock_recv(e.client, 10), WAIT) == b""
        e.client.close()

    asyncio.run(main())
