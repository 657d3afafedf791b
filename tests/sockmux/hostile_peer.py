"""A hostile SockMux peer for tests and bench/flood_rss.py: a plain blocking socket that
speaks frames (built with :mod:`tcpmuxd.sockmux.frames` and ``sockmux_pair.ScriptedPeer``),
gets a receptor to the phase wanted, then floods frames and never reads the answers.

Phases: ``hello`` (our HELLO sent, nothing else: the receptor answers ECHO and HELLO there),
``auth`` (HELLO exchange and options done with an offer of authentication, no proof ever: the
receptor waits in AUTH and refuses every CONNECT "Not Authenticated"), ``up`` (authenticated
with the shared secret by a real :class:`SockMuxConnection`, the link is up).
"""

from __future__ import annotations

import errno
import select
import socket
import time
from dataclasses import dataclass

from sockmux_pair import ScriptedPeer
from tcpmuxd.sockmux import frames as F
from tcpmuxd.sockmux.connection import LinkReady, SockMuxConfig, SockMuxConnection

PHASES = ("hello", "auth", "up")
#: TCP states (linux/tcp_states.h): CLOSE after a reset, CLOSE_WAIT after the peer's FIN.
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8

#: One frame of each flood: what the receptor answers by itself.
FLOOD_FRAMES = {
    "echo": F.encode_frame(F.ECHO, F.NO_STREAM, F.NO_STREAM, F.echo_payload(1)),  # ECHOOK
    "hello": F.encode_frame(F.HELLO, 0, 0, b"\0"),  # HELLOOK with the receptor's text
    "close": F.encode_frame(F.CLOSE, 7, 9, b"\0"),  # CLOSED, for a stream that is not there
    "connect": F.encode_frame(F.CONNECT, 7, F.NO_STREAM,  # CLOSE "### Not Authenticated ###"
                              F.connect_text("192.0.2.1:5000", "192.0.2.2:80")),
}


def vm_kib(pid: int, field: str = "VmRSS") -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of ``pid``, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


@dataclass
class FloodResult:
    sent: int  # bytes the receptor's kernel took
    seconds: float
    stalled: bool  # the receptor stopped reading (our sends blocked for stall_after seconds)
    reset: bool  # the receptor cut the link while we flooded
    peak_rise_kib: int  # the highest VmRSS rise seen while flooding


class FloodPeer:
    """One link to a receptor at 127.0.0.1:``port``, with a small receive buffer (so that
    the kernel holds little of what the receptor answers: it stays in the receptor)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))

    def close(self) -> None:
        self.sock.close()

    def reach(self, phase: str, secret: bytes | None = None) -> None:
        """Get the receptor to ``phase`` (see the module docstring)."""
        if phase == "hello":
            self.sock.sendall(F.encode_frame(F.HELLO, 0, 0, b"20260101-000000.000000 flood\0"))
        elif phase == "auth":
            self.sock.sendall(ScriptedPeer().handshake(extensions=b"sockmuxd/1 auth\0"))
        elif phase == "up":
            assert secret is not None
            self.conn = SockMuxConnection(SockMuxConfig(secret=secret, hostname="flood"))
            self.conn.initiate_connection(time.monotonic())
            self.sock.sendall(self.conn.bytes_to_send())
            deadline = time.monotonic() + 10
            while True:
                data = self.sock.recv(65536)
                assert data, "the receptor closed the link during the handshake"
                events = self.conn.receive_data(data, time.monotonic())
                self.sock.sendall(self.conn.bytes_to_send())
                if any(isinstance(e, LinkReady) for e in events):
                    return
                assert time.monotonic() < deadline, "no LinkReady within 10 s"
        else:
            raise ValueError(phase)

    def flood(self, frame: bytes, pid: int, *, max_seconds: float = 15.0,
              stall_after: float = 0.5, max_rise_kib: int = 96 << 10,
              base_kib: int = 0) -> FloodResult:
        """Send ``frame`` over and over, reading nothing, until the receptor stops reading
        (a send blocked for ``stall_after`` s), cuts the link, or ``max_seconds`` pass; stop
        early, too, once its VmRSS rose by ``max_rise_kib`` (a test must not eat the machine)."""
        chunk = frame * max(1, (64 << 10) // len(frame))
        view = memoryview(chunk)
        sock = self.sock
        sock.setblocking(False)
        start = time.monotonic()
        blocked_since: float | None = None
        sent, peak, reset, stalled = 0, 0, False, False
        pos = 0
        try:
            while True:
                now = time.monotonic()
                if now - start > max_seconds:
                    break
                peak = max(peak, vm_kib(pid) - base_kib)
                if peak > max_rise_kib:
                    break
                _r, writable, _x = select.select([], [sock], [], 0.05)
                if not writable:
                    if blocked_since is None:
                        blocked_since = now
                    elif now - blocked_since >= stall_after:
                        stalled = True
                        break
                    continue
                try:
                    n = sock.send(view[pos:])
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                        reset = True
                        break
                    raise
                blocked_since = None
                sent += n
                pos = (pos + n) % len(chunk)
        finally:
            sock.setblocking(True)
        return FloodResult(sent, time.monotonic() - start, stalled, reset, peak)

    def probe(self, value: int, timeout: float = 20.0) -> None:
        """Send an ECHO carrying ``value`` and read every answer there is (the receptor reads
        the rest of a flood meanwhile and answers it too) until its ECHOOK comes back."""
        self.sock.sendall(F.encode_frame(F.ECHO, F.NO_STREAM, F.NO_STREAM, F.echo_payload(value)))
        decoder = F.FrameDecoder(F.MAX_FRAME_SIZE)
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, "no answer to the probe"
            decoder.feed(self.sock.recv(1 << 20))
            while (frame := decoder.next_frame()) is not None:
                if frame.type == F.ECHOOK and F.parse_echo(frame.payload) == value:
                    return

    def tcp_state(self) -> int:
        """The kernel's TCP state of our socket (TCP_INFO's first byte), read without
        touching the receive queue: reading would let the receptor go on."""
        return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]

    def wait_cut(self, timeout: float) -> str | None:
        """How the receptor ends the link within ``timeout`` s, without reading: "reset"
        (RST), "closed" (FIN), or None (still up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.tcp_state()
            if state == TCP_CLOSE:
                return "reset"
            if state == TCP_CLOSE_WAIT:
                return "closed"
            time.sleep(0.02)
        return None
