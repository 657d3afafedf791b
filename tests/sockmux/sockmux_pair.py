"""Test helpers for the sans-I/O SockMux layer: paired connections and a scripted DeleGate peer.

No sockets: :class:`ConnectionPair` shuttles the bytes each side queues to the other (whole, or
in pieces to exercise reassembly), and records what went over the wire in each direction.
:class:`ScriptedPeer` writes frames the way DeleGate 9.9.11 does, to drive one connection
frame by frame and check its answers exactly.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from pathlib import Path
from typing import Callable

from tcpmuxd.sockmux import SockMuxConfig, SockMuxConnection, StreamRequested
from tcpmuxd.sockmux import frames as F

#: The captured DeleGate session (vectors/README.md says what it is).
VECTORS = Path(__file__).resolve().parent / "vectors"
SECRET = b"correct horse battery staple 42"
OTHER_SECRET = b"a quite different shared secret!"
HELLO_TIME = datetime(2026, 11, 21, 16, 17, 4, 460503)


def load_vector(name: str) -> bytes:
    return (VECTORS / f"delegate-plain-{name}.bin").read_bytes()


def config(**overrides) -> SockMuxConfig:
    """Our default test configuration: extensions on, authentication with SECRET."""
    values = dict(secret=SECRET, require_auth=True, hostname="test")
    values.update(overrides)
    return SockMuxConfig(**values)


def plain_config(**overrides) -> SockMuxConfig:
    """A peer behaving like plain DeleGate: no extensions, no authentication."""
    values = dict(secret=None, require_auth=False, extensions=False, hostname="vm")
    values.update(overrides)
    return SockMuxConfig(**values)


def counter_random(seed: int) -> Callable[[int], bytes]:
    """Deterministic, distinct 'random' bytes per seed."""
    counter = itertools.count()

    def random_bytes(n: int) -> bytes:
        block = bytes([seed]) + next(counter).to_bytes(4, "big")
        return (block * (n // len(block) + 1))[:n]

    return random_bytes


def of_type(events, cls) -> list:
    return [e for e in events if isinstance(e, cls)]


def frames_of(data: bytes) -> list[F.Frame]:
    return F.decode_all(data)


class ConnectionPair:
    """Two connections, ``a`` and ``b``, wired to each other through :meth:`pump`.

    ``chunk``: feed the bytes in pieces of this size (1 = byte by byte). ``tamper_ab`` /
    ``tamper_ba``: functions rewriting the bytes in flight (man in the middle).
    ``wire_ab`` / ``wire_ba`` keep everything that went over the wire.
    """

    def __init__(self, a_config: SockMuxConfig | None = None,
                 b_config: SockMuxConfig | None = None, *, chunk: int | None = None,
                 now: float = 100.0, a_first_id: int = 1, b_first_id: int = 1,
                 tamper_ab: Callable[[bytes], bytes] | None = None,
                 tamper_ba: Callable[[bytes], bytes] | None = None) -> None:
        self.a = SockMuxConnection(a_config or config(), random_bytes=counter_random(1),
                                   first_stream_id=a_first_id)
        self.b = SockMuxConnection(b_config or config(), random_bytes=counter_random(2),
                                   first_stream_id=b_first_id)
        self.chunk = chunk
        self.now = now
        self.tamper_ab = tamper_ab
        self.tamper_ba = tamper_ba
        self.wire_ab = bytearray()
        self.wire_ba = bytearray()

    def peer(self, conn: SockMuxConnection) -> SockMuxConnection:
        return self.b if conn is self.a else self.a

    def _feed(self, conn: SockMuxConnection, data: bytes) -> list:
        if not self.chunk:
            return conn.receive_data(data, now=self.now)
        events = []
        for i in range(0, len(data), self.chunk):
            events += conn.receive_data(data[i:i + self.chunk], now=self.now)
        return events

    def pump(self, rounds: int = 1000) -> tuple[list, list]:
        """Deliver queued bytes both ways until both are quiet; returns (a_events, b_events)."""
        a_events: list = []
        b_events: list = []
        for _ in range(rounds):
            moved = False
            out = self.a.bytes_to_send()
            if out:
                moved = True
                if self.tamper_ab:
                    out = self.tamper_ab(out)
                self.wire_ab += out
                b_events += self._feed(self.b, out)
            out = self.b.bytes_to_send()
            if out:
                moved = True
                if self.tamper_ba:
                    out = self.tamper_ba(out)
                self.wire_ba += out
                a_events += self._feed(self.a, out)
            if not moved:
                return a_events, b_events
        raise AssertionError("the connections never went quiet")

    def events_of(self, conn, a_events, b_events) -> list:
        return a_events if conn is self.a else b_events

    def connect(self) -> tuple[list, list]:
        self.a.initiate_connection(self.now, HELLO_TIME)
        self.b.initiate_connection(self.now, HELLO_TIME)
        return self.pump()

    def open(self, opener: SockMuxConnection, first: bytes = b"", reply: bytes = b"",
             client: str = "127.0.0.1:5000", entrance: str = "127.0.0.1:8080") -> tuple[int, int]:
        """Open a stream from ``opener`` and accept it on the other side: (opener id, its id)."""
        acceptor = self.peer(opener)
        sid = opener.open_stream(client, entrance, first)
        a_ev, b_ev = self.pump()
        requested = of_type(self.events_of(acceptor, a_ev, b_ev), StreamRequested)
        assert len(requested) == 1, (a_ev, b_ev)
        assert requested[0].first_data == first
        acceptor.accept_stream(requested[0].stream_id, reply)
        self.pump()
        return sid, requested[0].stream_id


class ScriptedPeer:
    """Builds the frames a plain DeleGate peer would send, for driving one connection by hand."""

    def __init__(self, hello: bytes = b"20261121-161621.514487 vm\0") -> None:
        self.hello = hello

    def handshake(self, packsize: int = 16384, conndata: bool = True,
                  extensions: bytes | None = None) -> bytes:
        """HELLO, HELLOOK, HELLOOK, then the SETOPT block (with an optional 0x58 offer)."""
        frames = [
            F.encode_frame(F.HELLO, 0xA661, 0x7923, self.hello),
            F.encode_frame(F.HELLOOK, 0, 0, self.hello),
            F.encode_frame(F.HELLOOK, 0xA661, 0x7923, self.hello),
            F.encode_frame(F.SETOPT, F.NO_STREAM, F.NO_STREAM,
                           F.setopt_payload(F.OPT_PACKSIZE, F.packsize_data(packsize))),
        ]
        if extensions is not None:
            frames.append(F.encode_frame(F.SETOPT, F.NO_STREAM, F.NO_STREAM,
                                         F.setopt_payload(F.OPT_EXTENSIONS, extensions)))
        if conndata:
            frames.append(F.encode_frame(F.SETOPT, F.NO_STREAM, F.NO_STREAM,
                                         F.setopt_payload(F.OPT_CONNDATA, F.CONNDATA_ON)))
        return b"".join(frames)

    @staticmethod
    def connect(peer_id: int, first: bytes = b"", client: str = "127.0.0.1:47980",
                entrance: str = "127.0.0.1:19024") -> bytes:
        return F.encode_frame(F.CONNECT, peer_id, F.NO_STREAM,
                              F.connect_text(client, entrance) + first)

    @staticmethod
    def connected(peer_id: int, our_id: int, first: bytes = b"") -> bytes:
        return F.encode_frame(F.CONNECTED, peer_id, our_id,
                              F.connect_text("127.0.0.1:17007", "127.0.0.1:40246") + first)

    @staticmethod
    def send(peer_id: int, our_id: int, data: bytes) -> bytes:
        return F.encode_frame(F.SEND, peer_id, our_id, data)

    @staticmethod
    def sent(peer_id: int, our_id: int, count: int) -> bytes:
        return F.encode_frame(F.SENT, peer_id, our_id, F.count_payload(count))

    @staticmethod
    def close(peer_id: int, our_id: int, reason: str = "DO close") -> bytes:
        return F.encode_frame(F.CLOSE, peer_id, our_id, F.reason_payload(reason))

    @staticmethod
    def closed(peer_id: int, our_id: int) -> bytes:
        return F.encode_frame(F.CLOSED, peer_id, our_id, F.reason_payload("OK closed"))


def open_plain(conn: SockMuxConnection, peer: ScriptedPeer | None = None, **handshake) -> list:
    """Initiate ``conn`` and complete a plain DeleGate handshake against it; returns events."""
    peer = peer or ScriptedPeer()
    conn.initiate_connection(0.0, HELLO_TIME)
    events = conn.receive_data(peer.handshake(**handshake), now=0.0)
    conn.data_to_send()
    return events
