"""The accept loop and the life of one connection in the long-running daemon (Accept=no).

Flow per connection: accept -> read the name line under one total deadline (peeking, so that no
byte past the line is taken from the handler) -> :func:`~tcpmuxd.tcpmux.policy.decide` (parse, find service, access
control, limits, in that order) -> ``+`` -> start the handler -> one log record when it ends.

The name phase runs on raw non-blocking sockets with ``add_reader`` rather than transports or
tasks: a pending connection costs a socket, a timer and a small object, which keeps 1,000 idle
clients cheap and the exec path short.

Resource handling (the failure modes named as trio's serve_listeners does):

* EMFILE/ENFILE (no file descriptors): a spare descriptor kept open for the purpose is closed
  so that one connection can be accepted and refused with ``-`` instead of left hanging, then
  accepting pauses for ``Limits.accept_backoff`` seconds; it resumes by itself.
* ENOBUFS/ENOMEM: accepting pauses likewise.
* EAGAIN from fork (no processes): the connection is refused (or, after ``+``, closed) and
  logged; the daemon keeps serving.
* Refused connections are closed gracefully (reply, shutdown, drain briefly) so the client can
  read the ``-`` line even when it pipelined data behind the name.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections import Counter
from typing import Callable, Mapping

from tcpmuxd import passfd
from tcpmuxd.common.addresses import Endpoint, SocketAddress, addresses_of, ip_address_of
from tcpmuxd.common.children import Child, exit_text
from tcpmuxd.common.systemd import EventLog
from tcpmuxd.tcpmux import handlers, protocol, relay
from tcpmuxd.tcpmux.config import Configuration, Service
from tcpmuxd.tcpmux.handlers import oserror_text
from tcpmuxd.tcpmux.policy import (
    Counters, Decision, Help, Limits, Refuse, decide, pending_source,
)


#: How often a handler is polled for when no pidfd could be opened for it (out of descriptors).
CHILD_POLL_INTERVAL = 0.5

#: While out of descriptors, accepting pauses and resumes four times a second: say so in the log
#: once in a while, not every time. Refusals of a flooding source are summed up as often.
PAUSE_LOG_INTERVAL = 10.0
#: Sources named in one summary of refused floods (the busiest ones).
FLOOD_LOG_SOURCES = 5
#: What a refusal closed at once reads off the socket first, so that its close is a FIN, not
#: the reset that unread data would cause (bytes that come later still cause one).
DISCARD_LIMIT = 64 * 1024


def _discard_received(sock: socket.socket) -> None:
    """Read off (non-blocking) what the client has sent already, up to DISCARD_LIMIT."""
    left = DISCARD_LIMIT
    while left > 0:
        try:
            data = sock.recv(min(left, 65536))
        except OSError:
            return
        if not data:
            return
        left -= len(data)


class _FloodLog:
    """Refusals of a source over ``max_pending_per_source``, logged without flooding the log:
    the first of a source in each PAUSE_LOG_INTERVAL in full, the rest summed up at its end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log: EventLog) -> None:
        self._loop = loop
        self._log = log
        self._logged: dict[str, float] = {}  # source -> when its last full record was written
        self._suppressed: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def refused(self, source: str, message: str) -> None:
        now = self._loop.time()
        if now - self._logged.get(source, -PAUSE_LOG_INTERVAL) >= PAUSE_LOG_INTERVAL:
            self._logged[source] = now
            self._log.record(f"{message}; further refusals of {source} are summed up every "
                             f"{PAUSE_LOG_INTERVAL:.0f}s", priority=4,
                             TCPMUX_DECISION="refused", REMOTE_ADDR=source)
        else:
            self._suppressed[source] += 1
        if self._timer is None:
            self._timer = self._loop.call_later(PAUSE_LOG_INTERVAL, self._summary)

    def _summary(self) -> None:
        self._timer = None
        now = self._loop.time()
        for source, when in list(self._logged.items()):
            if now - when >= PAUSE_LOG_INTERVAL:
                del self._logged[source]
        if self._suppressed:
            total = sum(self._suppressed.values())
            top = ", ".join(f"{source} ({n})" for source, n
                            in self._suppressed.most_common(FLOOD_LOG_SOURCES))
            more = len(self._suppressed) - FLOOD_LOG_SOURCES
            self._log.record(
                f"refused {total} more connections in {PAUSE_LOG_INTERVAL:.0f}s from sources "
                f"with too many connections waiting to send a name: {top}"
                + (f" and {more} more sources" if more > 0 else ""), priority=4,
                TCPMUX_DECISION="refused")
            self._suppressed.clear()
        if self._logged:
            self._timer = self._loop.call_later(PAUSE_LOG_INTERVAL, self._summary)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._suppressed:
            self._summary()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


class _Connection:
    """A connection from accept to its log record.

    ``timer`` is whichever deadline the connection waits under: the name deadline, the drain
    of a refusal, or the connect to a Forward=/PassTo= target. ``pending`` is the source it
    counts against while in the name phase (None after). ``cut`` says why it was reset.
    """

    __slots__ = ("sock", "remote", "local", "started", "reader", "timer", "name", "service",
                 "decision", "pid", "status", "listener", "ended", "upstream", "pending",
                 "relay", "cut")

    def __init__(self, sock: socket.socket, remote: SocketAddress, local: SocketAddress,
                 listener: str, max_name_length: int) -> None:
        self.sock: socket.socket | None = sock
        self.remote = remote
        self.local = local
        self.listener = listener
        self.started = time.monotonic()
        self.reader = protocol.NameReader(max_name_length)
        self.timer: asyncio.TimerHandle | None = None
        self.name = ""
        self.service: Service | None = None
        self.decision = ""
        self.pid: int | None = None
        self.status = ""
        self.ended = False
        self.upstream: socket.socket | None = None  # while a Forward=/PassTo= connect is under way
        self.pending: str | None = None
        self.relay: relay.Relay | None = None
        self.cut = ""


class Dispatcher:
    """Serves TCPMUX on any number of listening sockets from one event loop."""

    def __init__(self, config: Configuration, limits: Limits, log: EventLog,
                 environ: Mapping[str, str], on_change: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.limits = limits
        self.log = log
        self.environ = dict(environ)
        self.counters = Counters()
        self.on_change = on_change
        self._loop = asyncio.get_running_loop()
        self._listeners: dict[int, tuple[socket.socket, str]] = {}
        self._paused = False
        self._pause_logged = -PAUSE_LOG_INTERVAL
        self._spare: int | None = self._open_spare()
        #: Exec= handlers running, watched through common.children (reaped by pid as they exit).
        self._children: dict[int, Child] = {}
        self._tasks: set[asyncio.Task] = set()
        self._relays: set[relay.Relay] = set()
        #: Connections whose client socket is still ours (all but those handed to Exec=).
        self._open: set[_Connection] = set()
        self._pending: Counter[str] = Counter()
        self._flood_log = _FloodLog(self._loop, log)
        self._stopping = False
        self._settled: asyncio.Event | None = None  # set once _open is empty, while stopping

    # -- listeners -------------------------------------------------------------------------

    def add_listener(self, sock: socket.socket, name: str) -> None:
        sock.setblocking(False)
        self._listeners[sock.fileno()] = (sock, name)
        if not self._paused:
            self._loop.add_reader(sock.fileno(), self._accept, sock, name)

    def _close_listeners(self) -> None:
        for fd, (sock, _name) in self._listeners.items():
            self._loop.remove_reader(fd)
            sock.close()
        self._listeners.clear()

    async def stop(self, timeout: float, hurry: asyncio.Event | None = None) -> None:
        """Stop gracefully (SIGTERM): stop accepting, answer clients still sending their name
        with ``-server shutting down``, let the other connections we hold (relays, connects to
        Forward=/PassTo= targets, refusals being drained) end by themselves for up to
        ``timeout`` seconds or until ``hurry`` is set, then reset and log what is left.

        Under systemd the listening sockets stay open in tcpmuxd.socket: connections that were
        not accepted yet wait there for the next start (a restart loses none of them).
        """
        self._stopping = True
        self._close_listeners()
        for conn in [c for c in self._open if c.pending is not None]:
            self._end_name_phase(conn)
            self._refuse(conn, "server shutting down")
        if self._open:
            n = len(self._open)
            self.log.record(f"stopping: waiting up to {timeout:g}s for {n} connection"
                            f"{'s' if n != 1 else ''} in flight", priority=5)
            self._settled = asyncio.Event()
            waits = [self._loop.create_task(self._settled.wait())]
            if hurry is not None:
                waits.append(self._loop.create_task(hurry.wait()))
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        why = (f"cut (reset) at stop after {timeout:g}s" if hurry is None or not hurry.is_set()
               else "cut (reset) at stop, asked again to stop")
        self.close(why)

    def close(self, why: str = "cut (reset): dispatcher closed") -> None:
        """Stop accepting and end every connection we hold now: a client still sending its name
        gets ``-server shutting down``, the rest are reset and logged as cut (``why``).
        Handlers already running go on in their own sessions."""
        self._stopping = True
        self._close_listeners()
        for conn in list(self._open):
            if conn.pending is not None:
                self._end_name_phase(conn)
                self._refuse_now(conn, "server shutting down")
            else:
                self._cut(conn, why)
        for task in list(self._tasks):
            task.cancel()
        if self._children:
            self.log.record(f"{len(self._children)} Exec= handlers keep running in their own "
                            "sessions (pids " + " ".join(map(str, self._children)) + ")")
        for child in self._children.values():
            child.cancel()
        self._children.clear()
        self._flood_log.close()

    def status(self) -> str:
        c = self.counters
        return (f"{len(self.config.services)} services; {c.active} connections active, "
                f"{c.accepted} accepted, {c.refused} refused, {len(self._children)} handlers running")

    @staticmethod
    def _open_spare() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def _pause_accepting(self, why: str) -> None:
        if self._paused:
            return
        self._paused = True
        now = time.monotonic()
        if now - self._pause_logged >= PAUSE_LOG_INTERVAL:
            self._pause_logged = now
            self.log.record(f"accepting paused for {self.limits.accept_backoff}s: {why} "
                            f"(logged at most every {PAUSE_LOG_INTERVAL:.0f}s)", priority=4)
        for fd in self._listeners:
            self._loop.remove_reader(fd)
        self._loop.call_later(self.limits.accept_backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._paused = False
        if self._spare is None:
            self._spare = self._open_spare()
        for fd, (sock, name) in self._listeners.items():
            self._loop.add_reader(fd, self._accept, sock, name)

    def _accept(self, listener: socket.socket, name: str) -> None:
        for _ in range(64):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self._refuse_with_spare(listener, name, e)
                    self._pause_accepting(os.strerror(e.errno))
                    return
                if e.errno in (errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(os.strerror(e.errno))
                    return
                raise
            self._start(sock, name)

    def _refuse_with_spare(self, listener: socket.socket, name: str, e: OSError) -> None:
        """Use the spare descriptor to tell one waiting client why, instead of leaving it hanging.

        The client is refused like any other (``-`` line, shutdown, drain, log record), so it
        keeps the spare's slot until it has read the line and closed; the spare is reopened
        when accepting resumes. accept() fails with EMFILE even when nobody is waiting, so the
        spare is reopened at once when nobody was.
        """
        if self._spare is None:
            return
        os.close(self._spare)
        self._spare = None
        try:
            sock, _addr = listener.accept()
        except OSError:
            sock = None
        if sock is not None:
            sock.setblocking(False)
            try:
                remote, local = addresses_of(sock)
            except OSError:
                sock.close()
            else:
                conn = self._track(sock, remote, local, name)
                self._refuse(conn, f"server out of resources: {os.strerror(e.errno)}")
        self._spare = self._open_spare()

    # -- the name phase --------------------------------------------------------------------

    def serve_socket(self, sock: socket.socket, remote: SocketAddress, local: SocketAddress,
                     listener: str) -> None:
        """Serve a connection that did not come from our listeners, such as a sockmuxd stream
        (a socketpair end): ``remote`` is who the client really is, for access rules and logs
        (with ``tunnel`` set for a stream through a tunnel)."""
        sock.setblocking(False)
        self._serve(sock, remote, local, listener)

    def _start(self, sock: socket.socket, listener: str) -> None:
        sock.setblocking(False)
        try:
            remote, local = addresses_of(sock)
        except OSError:
            sock.close()
            return
        self._serve(sock, remote, local, listener)

    def _track(self, sock: socket.socket, remote: SocketAddress, local: SocketAddress,
               listener: str) -> _Connection:
        conn = _Connection(sock, remote, local, listener, self.limits.max_name_length)
        self.counters.active += 1
        self._open.add(conn)
        return conn

    def _serve(self, sock: socket.socket, remote: SocketAddress, local: SocketAddress,
               listener: str) -> None:
        """Take a new connection: its name may be there already (it usually is), so it is read
        at once; only a connection still to send it waits, and counts against its source."""
        conn = self._track(sock, remote, local, listener)
        if self._stopping:
            self._refuse_now(conn, "server shutting down")
            return
        if self.counters.active > self.limits.max_connections:
            self._refuse(conn, f"too many connections ({self.limits.max_connections})")
            return
        outcome = self._read_name(conn)
        if outcome is not None:
            self._name_read(conn, outcome)
            return
        source = pending_source(remote)
        limit = self.limits.max_pending_per_source
        if self._pending[source] >= limit:
            reason = f"too many connections from {source} waiting to send a name ({limit})"
            self._flood_log.refused(source, f"{remote}: refused: {reason}")
            self._refuse_now(conn, reason, record=False)
            return
        self._pending[source] += 1
        conn.pending = source
        conn.timer = self._loop.call_later(self.limits.name_timeout, self._timed_out, conn)
        self._loop.add_reader(sock.fileno(), self._readable, conn)
        self.on_change()

    def _timed_out(self, conn: _Connection) -> None:
        conn.timer = None
        self._end_name_phase(conn)
        self._decided(conn, decide(self.config, conn.reader.timeout(), conn.remote, None))

    def _readable(self, conn: _Connection) -> None:
        outcome = self._read_name(conn)
        if outcome is not None:
            self._end_name_phase(conn)
            self._name_read(conn, outcome)

    def _read_name(self, conn: _Connection) -> protocol.Event | OSError | None:
        """Peek at what has arrived and consume exactly the name line's bytes: the final event,
        the error that ended the connection, or None while the line is not complete."""
        sock = conn.sock
        assert sock is not None
        try:
            data = sock.recv(conn.reader.peek_size(), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            return e
        if not data:
            return conn.reader.eof()
        consume, event = conn.reader.feed(data)
        while consume:
            consume -= len(sock.recv(consume))
        return None if isinstance(event, protocol.NeedData) else event

    def _name_read(self, conn: _Connection, outcome: protocol.Event | OSError) -> None:
        if isinstance(outcome, OSError):
            self._end(conn, f"error: {oserror_text(outcome)}")
            return
        if isinstance(outcome, protocol.NameReceived):
            conn.name = outcome.name
        elif isinstance(outcome, protocol.HelpRequested):
            conn.name = "HELP"
        self._decided(conn, decide(self.config, outcome, conn.remote, self.counters))

    def _end_name_phase(self, conn: _Connection) -> None:
        """Stop reading the name and give back the source's pending slot."""
        assert conn.sock is not None
        self._loop.remove_reader(conn.sock.fileno())
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        source, conn.pending = conn.pending, None
        if source is not None:
            self._pending[source] -= 1
            if self._pending[source] <= 0:
                del self._pending[source]

    # -- after the name --------------------------------------------------------------------

    def _decided(self, conn: _Connection, decision: Decision) -> None:
        if isinstance(decision, Refuse):
            self._refuse(conn, decision.reason)
        elif isinstance(decision, Help):
            conn.decision = "help"
            self._spawn_task(conn, self._send_and_close(conn, decision.listing))
        else:
            service = decision.service
            conn.service = service
            self.counters.start(service, conn.remote.source)
            if service.kind == "exec":
                self._exec(conn, service)
            elif service.kind == "forward":
                assert service.forward is not None
                self._connect_target(conn, service, service.forward, self._forward_connected)
            else:
                assert service.pass_to is not None
                self._connect_target(conn, service, service.pass_to, self._pass_connected)

    def _spawn_task(self, conn: _Connection, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, conn))

    def _task_done(self, task: asyncio.Task, conn: _Connection) -> None:
        """Whatever escapes a connection's task still ends it: its slots are given back and it
        gets its log record (never a connection that counts forever). A cancelled task was
        cut by close(), which ended its connection."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None or conn.ended:
            return
        e = task.exception()
        if conn.service is not None:
            self.counters.end(conn.service, conn.remote.source)
        self._end(conn, f"internal error: {e!r}")

    @staticmethod
    def _send_refusal(conn: _Connection, reason: str) -> bool:
        """Send ``-reason`` and our EOF; False when the client is gone."""
        conn.decision = f"refused: {reason}"
        assert conn.sock is not None
        try:
            conn.sock.send(protocol.negative(reason))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True

    def _refuse(self, conn: _Connection, reason: str) -> None:
        """Send ``-reason`` and close so that the client can read it (shutdown, then drain)."""
        if not self._send_refusal(conn, reason):
            self._end(conn)
            return
        assert conn.sock is not None
        conn.timer = self._loop.call_later(self.limits.linger, self._drained, conn)
        self._loop.add_reader(conn.sock.fileno(), self._drain, conn)

    def _refuse_now(self, conn: _Connection, reason: str, record: bool = True) -> None:
        """Send ``-reason`` and close at once, holding nothing: for refusals that must not cost
        a slot (a flooding source, a stop). What the client sent already is read off first."""
        if self._send_refusal(conn, reason):
            assert conn.sock is not None
            _discard_received(conn.sock)
        self._end(conn, record=record)

    def _drain(self, conn: _Connection) -> None:
        assert conn.sock is not None
        try:
            if conn.sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._drained(conn)

    def _drained(self, conn: _Connection) -> None:
        assert conn.sock is not None
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self._loop.remove_reader(conn.sock.fileno())
        self._end(conn)

    async def _send_and_close(self, conn: _Connection, data: bytes) -> None:
        assert conn.sock is not None
        try:
            await asyncio.wait_for(self._loop.sock_sendall(conn.sock, data), self.limits.linger)
        except (OSError, asyncio.TimeoutError) as e:
            conn.decision += f" (send failed: {e})"
        self._end(conn)

    def _acknowledge(self, conn: _Connection, service: Service) -> bool:
        """Send ``+`` when tcpmuxd, not the handler, answers; False if the client is gone."""
        if not service.acknowledge:
            return True
        assert conn.sock is not None
        try:
            conn.sock.send(protocol.positive())
        except OSError as e:
            conn.decision = f"client gone: {oserror_text(e)}"
            return False
        return True

    def _exec(self, conn: _Connection, service: Service) -> None:
        """Start the handler; the ``+`` (Acknowledge=yes) comes from the child, once it exists
        (handlers.py), so a handler that cannot be started is refused with ``-``."""
        assert conn.sock is not None and service.exec_argv is not None
        if not os.access(service.exec_argv[0], os.X_OK):
            self._service_refuse(conn, service, "handler failed to start: "
                                 f"{service.exec_argv[0]} is not executable")
            return
        env = handlers.handler_environment(service, conn.remote, conn.local, self.environ)
        # O_NONBLOCK lives on the open file description the handler shares: clear it, or a
        # plain program reading its stdin gets EAGAIN.
        conn.sock.setblocking(True)
        try:
            child = handlers.spawn(service, conn.sock, env)
        except handlers.StartError as e:
            if e.replied:  # the exec failed after the child sent "+": all that is left is a cut
                relay.reset(conn.sock)
                conn.sock = None
                conn.decision = f"handler failed to start after the + reply: {e.reason}"
                conn.cut = "connection reset"
                self._service_end(conn, service)
            else:
                conn.sock.setblocking(False)
                self._service_refuse(conn, service, f"handler failed to start: {e.reason}")
            return
        conn.sock.close()
        conn.sock = None
        self._let_go(conn)
        conn.pid = child.pid
        conn.decision = "accepted"
        self._children[child.pid] = Child(self._loop, child, poll_interval=CHILD_POLL_INTERVAL,
                                          on_exit=lambda c: self._child_exited(c, conn))
        self.on_change()

    def _child_exited(self, child: Child, conn: _Connection) -> None:
        del self._children[child.pid]
        assert child.returncode is not None and conn.service is not None
        conn.status = exit_text(child.returncode)
        self._service_end(conn, conn.service)

    # Forward= and PassTo= run on callbacks, not tasks: the per-connection cost of a Task,
    # wait_for and two transports was most of the Forward= path (bench/dispatch.py).

    def _connect_target(self, conn: _Connection, service: Service, target: Endpoint,
                        then: Callable[[_Connection, Service, socket.socket], None]) -> None:
        """Connect to a Forward=/PassTo= target before ``+`` (so failure can still be refused),
        then call ``then``. Literal addresses connect at once; names are resolved first."""
        if target.is_unix:
            self._start_connect(conn, service, socket.AF_UNIX, target.path, then)
            return
        literal = ip_address_of(target.host)
        if literal is not None:
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            self._start_connect(conn, service, family, (str(literal), target.port), then)
            return
        self._spawn_task(conn, self._resolve_then_connect(conn, service, target, then))

    async def _resolve_then_connect(self, conn: _Connection, service: Service, target: Endpoint,
                                    then) -> None:
        try:
            infos = await self._loop.getaddrinfo(target.host, target.port,
                                                 type=socket.SOCK_STREAM)
        except OSError as e:
            self._service_refuse(conn, service, f"cannot resolve service address: {e}")
            return
        self._start_connect(conn, service, infos[0][0], infos[0][4], then)

    def _start_connect(self, conn: _Connection, service: Service, family: int, address,
                       then) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # EMFILE/ENFILE: out of descriptors for the upstream side
            self._service_refuse(conn, service, f"server out of resources: {oserror_text(e)}")
            return
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(address)
        if err == 0:
            then(conn, service, sock)
        elif err == errno.EINPROGRESS:
            conn.timer = self._loop.call_later(service.connect_timeout, self._connect_done,
                                               conn, service, sock, then, True)
            self._loop.add_writer(sock.fileno(), self._connect_done, conn, service, sock, then,
                                  False)
            conn.upstream = sock
        else:
            sock.close()
            self._service_refuse(conn, service, f"service unavailable: {os.strerror(err)}")

    def _connect_done(self, conn: _Connection, service: Service, sock: socket.socket, then,
                      timed_out: bool) -> None:
        """The connect finished (writable) or timed out."""
        self._loop.remove_writer(sock.fileno())
        conn.upstream = None
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if timed_out:
            why = "timed out"
        else:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                then(conn, service, sock)
                return
            why = os.strerror(err)
        sock.close()
        self._service_refuse(conn, service, f"service unavailable: {why}")

    def _forward_connected(self, conn: _Connection, service: Service,
                           upstream: socket.socket) -> None:
        if not self._acknowledge(conn, service):
            upstream.close()
            self._service_end(conn, service)
            return
        conn.decision = "accepted"
        client, conn.sock = conn.sock, None
        assert client is not None

        def done(sent: int, received: int, error: OSError | None) -> None:
            self._relays.discard(r)
            conn.relay = None
            conn.status = f"{sent} bytes in, {received} bytes out"
            if error is not None:
                conn.status += f", ended by {oserror_text(error)}"
            self._service_end(conn, service)

        r = relay.Relay(self._loop, client, upstream, done)
        conn.relay = r
        self._relays.add(r)

    def _pass_connected(self, conn: _Connection, service: Service,
                        channel: socket.socket) -> None:
        with channel:
            if not self._acknowledge(conn, service):
                self._service_end(conn, service)
                return
            assert conn.sock is not None
            info = passfd.handover_info(service, conn.remote, conn.local)
            try:
                conn.sock.setblocking(True)  # the receiver gets it as accept() would give it
                passfd.send_connection(channel, conn.sock, info)
                conn.decision = "passed"
            except OSError as e:
                conn.decision = f"hand-over failed: {oserror_text(e)}"
        self._service_end(conn, service)

    def _cut(self, conn: _Connection, why: str) -> None:
        """End a connection we hold now (a stop): reset what is open, log it as cut."""
        if conn.relay is not None:
            conn.cut = why
            conn.relay.abort()  # resets both ends; its done() ends the connection
            return
        if conn.decision.startswith("refused") and conn.sock is not None:
            self._drained(conn)  # it has its "-" line already: a normal close
            return
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn.upstream is not None:
            self._loop.remove_writer(conn.upstream.fileno())
            conn.upstream.close()
            conn.upstream = None
        assert conn.sock is not None
        self._loop.remove_reader(conn.sock.fileno())
        if conn.service is not None:
            # on its way to a Forward=/PassTo= target (resolving or connecting): nothing has
            # been answered yet, so the client can still be told
            self.counters.end(conn.service, conn.remote.source)
            self._refuse_now(conn, "server shutting down")
            return
        relay.reset(conn.sock)  # half-way through the HELP listing
        conn.sock = None
        conn.cut = why
        self._end(conn)

    def _service_refuse(self, conn: _Connection, service: Service, reason: str) -> None:
        self.counters.end(service, conn.remote.source)
        self._refuse(conn, reason)

    def _service_end(self, conn: _Connection, service: Service) -> None:
        self.counters.end(service, conn.remote.source)
        self._end(conn)

    def _let_go(self, conn: _Connection) -> None:
        """The client socket is no longer ours (ended, or handed to an Exec= handler)."""
        self._open.discard(conn)
        if self._settled is not None and not self._open:
            self._settled.set()

    def _end(self, conn: _Connection, decision: str | None = None, record: bool = True) -> None:
        """Close what is left and write the one record of this connection (``record``: False
        for refusals that are logged in summaries instead)."""
        if conn.ended:
            return
        conn.ended = True
        if conn.sock is not None:
            conn.sock.close()
            conn.sock = None
        self._let_go(conn)
        if decision:
            conn.decision = decision
        self.counters.active -= 1
        if conn.decision.startswith("refused"):
            self.counters.refused += 1
        elif conn.decision in ("accepted", "passed"):
            self.counters.accepted += 1
        if not record:
            self.on_change()
            return
        duration = time.monotonic() - conn.started
        name = conn.name or "-"
        parts = [f"{conn.remote} {name}: {conn.decision or 'closed'}"]
        if conn.pid is not None:
            parts.append(f"pid {conn.pid}")
        if conn.status:
            parts.append(conn.status)
        if conn.cut:
            parts.append(conn.cut)
        parts.append(f"{duration:.3f}s")
        if conn.cut:
            priority = 4
        elif conn.decision in ("accepted", "passed", "help"):
            priority = 6
        else:
            priority = 5
        self.log.record(
            ", ".join(parts),
            priority=priority,
            TCPMUX_SERVICE=conn.service.name if conn.service else (conn.name or None),
            TCPMUX_REQUESTED=conn.name or None,
            TCPMUX_DECISION=conn.decision,
            TCPMUX_CUT=conn.cut or None,
            TCPMUX_LISTENER=conn.listener,
            TCPMUX_TUNNEL=conn.remote.tunnel,
            REMOTE_ADDR=conn.remote.host or None,
            REMOTE_PORT=conn.remote.port or None,
            TCPMUX_HANDLER_PID=conn.pid,
            TCPMUX_EXIT_STATUS=conn.status or None,
            TCPMUX_DURATION_USEC=int(duration * 1e6),
        )
        self.on_change()
