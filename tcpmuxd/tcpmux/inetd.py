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
import signal
import socket
import time
from typing import Mapping

from tcpmuxd import passfd
from tcpmuxd.common.addresses import addresses_of
from tcpmuxd.common.systemd import EventLog
from tcpmuxd.tcpmux import handlers, protocol, relay
from tcpmuxd.tcpmux.config import Configuration, Service
from tcpmuxd.tcpmux.policy import Help, Limits, Refuse, decide


def read_name(sock: socket.socket, limits: Limits) -> protocol.Event:
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


def serve_connection(sock: socket.socket, config: Configuration, limits: Limits,
                     log: EventLog, environ: Mapping[str, str]) -> int:
    """Serve the one connection; returns the exit status when not exec'ing."""
    started = time.monotonic()
    try:
        remote, local = addresses_of(sock)
    except OSError:
        return 0
    event = read_name(sock, limits)
    name = event.name if isinstance(event, protocol.NameReceived) else (
        "HELP" if isinstance(event, protocol.HelpRequested) else "-")
    decision = decide(config, event, remote, None)

    def record(outcome: str, status: str = "") -> None:
        extra = f", {status}" if status else ""
        log.record(f"{remote} {name}: {outcome}{extra}, {time.monotonic() - started:.3f}s",
                   priority=6 if outcome in ("accepted", "passed", "help") else 5,
                   TCPMUX_SERVICE=name, TCPMUX_DECISION=outcome, REMOTE_ADDR=remote.host,
                   REMOTE_PORT=remote.port)

    if isinstance(decision, Refuse):
        record(f"refused: {decision.reason}")
        _reply(sock, protocol.negative(decision.reason))
        return 0
    if isinstance(decision, Help):
        record("help")
        _reply(sock, decision.listing)
        return 0
    service = decision.service
    if service.kind == "exec":
        return _exec(sock, service, remote, local, environ, record)
    if service.kind == "forward":
        return _forward(sock, service, limits, record)
    return _pass(sock, service, remote, local, record)


def _exec(sock: socket.socket, service: Service, remote, local, environ, record) -> int:
    assert service.exec_argv is not None
    if not os.access(service.exec_argv[0], os.X_OK):
        reason = f"handler failed to start: {service.exec_argv[0]} is not executable"
        record(f"refused: {reason}")
        _reply(sock, protocol.negative(reason))
        return 1
    env = handlers.handler_environment(service, remote, local, environ)
    # The record is written before the exec, which leaves no one to write it after; a failure
    # gets a second record that says so.
    record("accepted", f"exec {service.exec_argv[0]} as pid {os.getpid()}")
    try:
        handlers.exec_in_place(service, sock, env)
    except handlers.StartError as e:
        # sock's descriptor is closed by now: the connection is fds 0 and 1
        out = socket.socket(fileno=1)
        if e.replied:
            record(f"failed: handler failed to start after the + reply: {e.reason}",
                   "connection reset")
            relay.reset(out)
        else:
            record(f"refused: handler failed to start: {e.reason}")
            _reply(out, protocol.negative(f"handler failed to start: {e.reason}"))
            out.detach()
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


def _forward(sock: socket.socket, service: Service, limits: Limits, record) -> int:
    upstream = _open(sock, service, service.forward, record)
    if upstream is None:
        return 0
    if service.acknowledge:
        sock.sendall(protocol.positive())
    sent, received, error, cut = asyncio.run(_relay(sock, upstream, limits.stop_timeout))
    status = f"{sent} bytes in, {received} bytes out"
    if error is not None:
        status += f", ended by {handlers.oserror_text(error)}"
    if cut:
        status += f", {cut}"
    record("accepted", status)
    return 0


async def _relay(client: socket.socket, upstream: socket.socket,
                 stop_timeout: float) -> tuple[int, int, OSError | None, str]:
    """Relay until both directions end: (bytes in, bytes out, error, why it was cut or "").

    SIGTERM (the instance being stopped) lets the relay go on for up to ``stop_timeout``
    seconds, as in the daemon, a second one not; then both ends are reset, so that neither
    takes the cut for a normal end.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, int, OSError | None]] = loop.create_future()
    cut = ""

    def on_done(forth: int, back: int, error: OSError | None) -> None:
        if not done.done():
            done.set_result((forth, back, error))

    r = relay.Relay(loop, client, upstream, on_done)

    timer: asyncio.TimerHandle | None = None

    def cut_now(why: str) -> None:
        nonlocal cut
        if not done.done():
            cut = why
            r.abort()

    def stopping() -> None:
        nonlocal timer
        if timer is None:
            timer = loop.call_later(stop_timeout, cut_now,
                                    f"cut (reset) at stop after {stop_timeout:g}s")
        else:
            cut_now("cut (reset) at stop, asked again to stop")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping)
    forth, back, error = await done
    return forth, back, error, cut


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
