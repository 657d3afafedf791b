"""One connection per process (Accept=yes): read the name, then become the handler.

systemd has accepted the connection and started this instance for it; there is nothing else to
serve, so the name is read with plain blocking calls under the same total deadline and the same
sans-I/O reader as the daemon, and an Exec= handler replaces this process (no extra fork).
Concurrency limits here are systemd's (MaxConnections=, MaxConnectionsPerSource= on the socket
unit): instances do not share counters.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import time
from typing import Mapping

from tcpmuxd import dispatch, handlers, passfd, protocol, relay
from tcpmuxd.config import Configuration, Service
from tcpmuxd.systemd import EventLog


def read_name(sock: socket.socket, limits: dispatch.Limits) -> protocol.Event:
    """Read exactly the name line (peek, then consume), within one total deadline."""
    reader = protocol.NameReader(limits.max_name_length)
    deadline = time.monotonic() + limits.name_timeout
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return reader.timeout()
        try:
            data = sock.recv(reader.peek_size(), socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            return reader.eof()
        if not data:
            return reader.eof()
        consume, event = reader.feed(data)
        while consume:
            consume -= len(sock.recv(consume))
        if not isinstance(event, protocol.NeedData):
            return event


def _reply(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def serve_connection(sock: socket.socket, config: Configuration, limits: dispatch.Limits,
                     log: EventLog, environ: Mapping[str, str]) -> int:
    """Serve the one connection; returns the exit status when not exec'ing."""
    started = time.monotonic()
    try:
        remote, local = handlers.addresses_of(sock)
    except OSError:
        return 0
    event = read_name(sock, limits)
    name = event.name if isinstance(event, protocol.NameReceived) else (
        "HELP" if isinstance(event, protocol.HelpRequested) else "-")
    decision = dispatch.decide(config, event, remote.host, None)

    def record(outcome: str, status: str = "") -> None:
        extra = f", {status}" if status else ""
        log.record(f"{remote} {name}: {outcome}{extra}, {time.monotonic() - started:.3f}s",
                   priority=6 if outcome in ("accepted", "passed", "help") else 5,
                   TCPMUX_SERVICE=name, TCPMUX_DECISION=outcome, REMOTE_ADDR=remote.host,
                   REMOTE_PORT=remote.port)

    if isinstance(decision, dispatch.Refuse):
        record(f"refused: {decision.reason}")
        _reply(sock, protocol.negative(decision.reason))
        return 0
    if isinstance(decision, dispatch.Help):
        record("help")
        _reply(sock, decision.listing)
        return 0
    service = decision.service
    if service.kind == "exec":
        return _exec(sock, service, remote, local, environ, record)
    if service.kind == "forward":
        return _forward(sock, service, record)
    return _pass(sock, service, remote, local, record)


def _exec(sock: socket.socket, service: Service, remote, local, environ, record) -> int:
    assert service.exec_argv is not None
    if not os.access(service.exec_argv[0], os.X_OK):
        reason = f"handler failed to start: {service.exec_argv[0]} is not executable"
        record(f"refused: {reason}")
        _reply(sock, protocol.negative(reason))
        return 1
    env = handlers.handler_environment(service, remote, local, environ)
    record("accepted", f"exec {service.exec_argv[0]} as pid {os.getpid()}")
    if service.acknowledge:
        sock.sendall(protocol.positive())
    try:
        handlers.exec_in_place(service, sock, env)
    except OSError as e:
        reason = f"handler failed to start: {e.strerror or e}"
        record(f"failed: {reason}")
        if not service.acknowledge:
            try:
                os.write(1, protocol.negative(reason))
            except OSError:
                pass
        return 1


def _open(sock: socket.socket, service: Service, target, record) -> socket.socket | None:
    """Connect to a Forward=/PassTo= target before ``+``; on failure refuse the client."""
    try:
        if target.is_unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(service.connect_timeout)
            try:
                s.connect(target.path)
            except OSError:
                s.close()
                raise
            return s
        s = socket.create_connection((target.host, target.port), timeout=service.connect_timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    except OSError as e:
        reason = f"service unavailable: {e.strerror or e}"
        record(f"refused: {reason}")
        _reply(sock, protocol.negative(reason))
        return None


def _forward(sock: socket.socket, service: Service, record) -> int:
    upstream = _open(sock, service, service.forward, record)
    if upstream is None:
        return 0
    if service.acknowledge:
        sock.sendall(protocol.positive())
    try:
        sent, received = asyncio.run(relay.relay(sock, upstream))
    except OSError as e:
        record("accepted", f"relay ended by {e.strerror or e}")
        return 0
    record("accepted", f"{sent} bytes in, {received} bytes out")
    return 0


def _pass(sock: socket.socket, service: Service, remote, local, record) -> int:
    channel = _open(sock, service, service.pass_to, record)
    if channel is None:
        return 0
    with channel:
        if service.acknowledge:
            sock.sendall(protocol.positive())
        passfd.send_connection(channel, sock, passfd.handover_info(service, remote, local))
    record("passed")
    return 0
