"""One connection per process (Accept=yes): read the name, then become the handler.

systemd has accepted the connection and started this instance for it; there is nothing else to
serve, so the name is read with plain blocking calls under the same total deadline and the same
sans-I/O reader as the daemon, the same decision is taken (policy.py), and the service's
handler kind runs the connection in place (:meth:`~tcpmuxd.tcpmux.handlers.base.Handler.
run_in_place`): an Exec= handler replaces this process (no extra fork). Concurrency limits here
are systemd's (MaxConnections=, MaxConnectionsPerSource= on the socket unit): instances do not
share counters.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Mapping

from tcpmuxd.common.addresses import Endpoint, SocketAddress, addresses_of
from tcpmuxd.common.systemd import EventLog
from tcpmuxd.tcpmux import clienthello, peek, protocol, records
from tcpmuxd.tcpmux.config import Configuration, Service
from tcpmuxd.tcpmux.policy import Event, Help, Limits, Refuse, decide


def read_name(sock: socket.socket, limits: Limits) -> tuple[str, Event]:
    """Read exactly the name line (peek, then consume), within one total deadline; or, when
    the first byte starts a TLS record, peek at the whole ClientHello and consume nothing
    (as dispatch.py does). Returns how the name came (``"tcpmux"``, ``"sni"``, or ``""``
    when nothing came) and the final event."""
    reader: protocol.NameReader | clienthello.HelloReader = protocol.NameReader(
        limits.max_name_length)
    via = ""
    deadline = time.monotonic() + limits.name_timeout
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return via, reader.timeout()
            try:
                data = sock.recv(reader.peek_size(), socket.MSG_PEEK | socket.MSG_DONTWAIT)
                if not via and data:
                    via = "sni" if clienthello.is_tls_start(data) else "tcpmux"
                    if via == "sni":
                        reader = clienthello.HelloReader(limits.max_hello_size)
                        data = sock.recv(reader.peek_size(),
                                         socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return via, reader.eof()
            if not data:
                return via, reader.eof()
            progress = not isinstance(reader, clienthello.HelloReader) or len(data) > reader.seen
            consume, event = reader.feed(data)
            while consume:
                consume -= len(sock.recv(consume))
            if not isinstance(event, protocol.NeedData):
                return via, event
            if isinstance(reader, clienthello.HelloReader):
                if peek.hung_up(sock):
                    return via, reader.eof()
                peek.wake_at(sock, reader.wanted)
                if not progress:
                    time.sleep(min(peek.RETRY_INTERVAL, max(0.0, left)))
    finally:
        if via == "sni":
            peek.wake_at(sock, 1)


def _reply(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class _Connection:
    """The instance's connection, as handler kinds see it
    (:class:`~tcpmuxd.tcpmux.handlers.base.InPlaceConnection`)."""

    def __init__(self, sock: socket.socket, remote: SocketAddress, local: SocketAddress,
                 log: EventLog, environ: Mapping[str, str], limits: Limits) -> None:
        self.sock = sock
        self.remote = remote
        self.local = local
        self.log = log
        self.environ = environ
        self.stop_timeout = limits.stop_timeout
        self.started = time.monotonic()
        self.name = ""
        self.via = ""  # how the name came: "tcpmux", "sni" (a TLS ClientHello), "" (none)
        self.alert = clienthello.HANDSHAKE_FAILURE  # what a refused TLS client is sent
        self.service: Service  # set once the decision is to accept

    @property
    def acknowledges(self) -> bool:
        return self.service.acknowledge and self.via != "sni"

    def record(self, outcome: str, status: str = "", reason: str = "") -> None:
        chosen: Service | None = getattr(self, "service", None)  # (unset before the decision)
        records.write(self.log, self.remote, requested=self.name,
                      service=chosen.name if chosen else None, decision=outcome,
                      reason=reason, details=(status,) if status else (),
                      duration=time.monotonic() - self.started, via=self.via)

    def refuse(self, reason: str, sock: socket.socket | None = None) -> None:
        self.record("refused", reason=reason)
        _reply(sock or self.sock, clienthello.alert_record(self.alert) if self.via == "sni"
               else protocol.negative(reason))

    def acknowledge(self) -> None:
        if self.acknowledges:
            self.sock.sendall(protocol.positive())

    def connect(self, target: Endpoint, timeout: float) -> socket.socket | None:
        try:
            if target.is_unix:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(timeout)
                try:
                    s.connect(target.path)
                except OSError:
                    s.close()
                    raise
                return s
            s = socket.create_connection((target.host, target.port), timeout=timeout)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError as e:
            self.refuse(f"service unavailable: {e.strerror or e}")
            return None


def serve_connection(sock: socket.socket, config: Configuration, limits: Limits,
                     log: EventLog, environ: Mapping[str, str]) -> int:
    """Serve the one connection; returns the exit status when not exec'ing."""
    try:
        remote, local = addresses_of(sock)
    except OSError:
        return 0
    conn = _Connection(sock, remote, local, log, environ, limits)
    conn.via, event = read_name(sock, limits)
    if isinstance(event, (protocol.NameReceived, clienthello.ServerNameReceived)):
        conn.name = event.name
    elif isinstance(event, protocol.HelpRequested):
        conn.name = "HELP"
    decision = decide(config, event, remote, None)
    if isinstance(decision, Refuse):
        conn.alert = decision.alert
        conn.refuse(decision.reason)
        return 0
    if isinstance(decision, Help):
        conn.record("help")
        _reply(sock, decision.listing)
        return 0
    conn.service = decision.service
    return decision.service.handler.run_in_place(conn)
