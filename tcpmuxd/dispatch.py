"""The accept loop and the life of one connection in the long-running daemon (Accept=no).

Flow per connection: accept -> read the name line under one total deadline (peeking, so that no
byte past the line is taken from the handler) -> :func:`decide` (parse, find service, access
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
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping, Union

from tcpmuxd import handlers, passfd, protocol, relay
from tcpmuxd.addresses import Endpoint, ip_address_of
from tcpmuxd.config import Configuration, Service
from tcpmuxd.handlers import SocketAddress
from tcpmuxd.systemd import EventLog


#: How often a handler is polled for when no pidfd could be opened for it (out of descriptors).
CHILD_POLL_INTERVAL = 0.5

#: While out of descriptors, accepting pauses and resumes four times a second: say so in the log
#: once in a while, not every time.
PAUSE_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class Limits:
    """The multiplexer-wide limits (per-service ones are in the service files)."""

    name_timeout: float = 10.0
    max_name_length: int = protocol.DEFAULT_MAX_NAME_LENGTH
    max_connections: int = 1024
    accept_backoff: float = 0.25
    #: How long a refused connection is drained after the ``-`` line before it is closed.
    linger: float = 2.0


@dataclass(frozen=True)
class Accept:
    service: Service


@dataclass(frozen=True)
class Refuse:
    reason: str


@dataclass(frozen=True)
class Help:
    listing: bytes


Decision = Union[Accept, Refuse, Help]


class Counters:
    """Live connection counts: per service, per (service, source address), and totals."""

    def __init__(self) -> None:
        self.active = 0
        self.per_service: Counter[str] = Counter()
        self.per_source: Counter[tuple[str, str]] = Counter()
        self.accepted = 0
        self.refused = 0

    def start(self, service: Service, source: str) -> None:
        self.per_service[service.key] += 1
        self.per_source[(service.key, source)] += 1

    def end(self, service: Service, source: str) -> None:
        for counter, key in ((self.per_service, service.key),
                             (self.per_source, (service.key, source))):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]


def decide(config: Configuration, event: protocol.Event, source: str,
           counters: Counters | None) -> Decision:
    """The order every refusal is checked in: parse, find service, access, limits.

    ``counters`` is None where limits are kept by someone else (systemd, in Accept=yes mode).
    """
    if isinstance(event, protocol.BadName):
        return Refuse(event.reason)
    if isinstance(event, protocol.HelpRequested):
        return Help(protocol.help_listing(config.listed()))
    assert isinstance(event, protocol.NameReceived)
    service = config.lookup(event.name)
    if service is None:
        return Refuse(f"unknown service {event.name}")
    if not service.allows(source):
        return Refuse(f"not allowed from {source}")
    if counters is not None:
        if service.max_connections and counters.per_service[service.key] >= service.max_connections:
            return Refuse(f"service busy ({service.max_connections} connections)")
        limit = service.max_connections_per_source
        if limit and counters.per_source[(service.key, source)] >= limit:
            return Refuse(f"too many connections from {source} ({limit})")
    return Accept(service)


def _oserror_text(e: OSError) -> str:
    """The errno's own words ("Connection refused"), not asyncio's wrapper text."""
    return os.strerror(e.errno) if e.errno else str(e)


class _Connection:
    """A connection from accept to its log record."""

    __slots__ = ("sock", "remote", "local", "started", "reader", "timer", "name", "service",
                 "decision", "pid", "status", "listener", "ended", "upstream")

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
        self._children: dict[int, tuple[subprocess.Popen, _Connection, int | None]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._relays: set[relay.Relay] = set()

    # -- listeners -------------------------------------------------------------------------

    def add_listener(self, sock: socket.socket, name: str) -> None:
        sock.setblocking(False)
        self._listeners[sock.fileno()] = (sock, name)
        if not self._paused:
            self._loop.add_reader(sock.fileno(), self._accept, sock, name)

    def close(self) -> None:
        """Stop accepting; connections in flight are cut, handlers already running go on."""
        for fd, (sock, _name) in self._listeners.items():
            self._loop.remove_reader(fd)
            sock.close()
        self._listeners.clear()
        for task in self._tasks:
            task.cancel()
        for r in list(self._relays):
            r.abort()
        for _child, _conn, pidfd in self._children.values():
            if pidfd is not None:
                self._loop.remove_reader(pidfd)
                os.close(pidfd)

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
                    self._refuse_with_spare(listener, e)
                    self._pause_accepting(os.strerror(e.errno))
                    return
                if e.errno in (errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(os.strerror(e.errno))
                    return
                raise
            self._start(sock, name)

    def _refuse_with_spare(self, listener: socket.socket, e: OSError) -> None:
        """Use the spare descriptor to tell one waiting client why, instead of leaving it hanging.

        accept() fails with EMFILE even when nobody is waiting, so the spare is reopened on
        every path; if the slot was taken meanwhile it is reopened when accepting resumes.
        """
        if self._spare is None:
            return
        os.close(self._spare)
        self._spare = None
        try:
            sock, _addr = listener.accept()
        except OSError:
            sock = None
        try:
            if sock is not None:
                with sock:
                    sock.setblocking(False)
                    sock.send(protocol.negative(
                        f"server out of resources: {os.strerror(e.errno)}"))
                self.counters.refused += 1
        except OSError:
            pass
        finally:
            self._spare = self._open_spare()

    # -- the name phase --------------------------------------------------------------------

    def serve_socket(self, sock: socket.socket, remote: SocketAddress, local: SocketAddress,
                     listener: str) -> None:
        """Serve a connection that did not come from our listeners, such as a sockmuxd stream
        (a socketpair end): ``remote`` is who the client really is, for access rules and logs."""
        sock.setblocking(False)
        self._serve(sock, remote, local, listener)

    def _start(self, sock: socket.socket, listener: str) -> None:
        sock.setblocking(False)
        try:
            remote, local = handlers.addresses_of(sock)
        except OSError:
            sock.close()
            return
        self._serve(sock, remote, local, listener)

    def _serve(self, sock: socket.socket, remote: SocketAddress, local: SocketAddress,
               listener: str) -> None:
        conn = _Connection(sock, remote, local, listener, self.limits.max_name_length)
        self.counters.active += 1
        if self.counters.active > self.limits.max_connections:
            self._refuse(conn, f"too many connections ({self.limits.max_connections})")
            return
        conn.timer = self._loop.call_later(self.limits.name_timeout, self._timed_out, conn)
        self._loop.add_reader(sock.fileno(), self._readable, conn)
        self.on_change()

    def _timed_out(self, conn: _Connection) -> None:
        assert conn.sock is not None
        self._loop.remove_reader(conn.sock.fileno())
        conn.timer = None
        self._decided(conn, decide(self.config, conn.reader.timeout(), conn.remote.host, None))

    def _readable(self, conn: _Connection) -> None:
        sock = conn.sock
        assert sock is not None
        try:
            data = sock.recv(conn.reader.peek_size(), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._stop_reading(conn)
            self._end(conn, f"error: {_oserror_text(e)}")
            return
        if not data:
            event: protocol.Event = conn.reader.eof()
        else:
            consume, event = conn.reader.feed(data)
            while consume:
                consume -= len(sock.recv(consume))
            if isinstance(event, protocol.NeedData):
                return
        self._stop_reading(conn)
        if isinstance(event, protocol.NameReceived):
            conn.name = event.name
        elif isinstance(event, protocol.HelpRequested):
            conn.name = "HELP"
        self._decided(conn, decide(self.config, event, conn.remote.host, self.counters))

    def _stop_reading(self, conn: _Connection) -> None:
        assert conn.sock is not None
        self._loop.remove_reader(conn.sock.fileno())
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

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
            self.counters.start(service, conn.remote.host)
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
        gets its log record (never a connection that counts forever)."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None or conn.ended:
            return
        e = task.exception()
        if conn.service is not None:
            self.counters.end(conn.service, conn.remote.host)
        self._end(conn, f"internal error: {e!r}")

    def _refuse(self, conn: _Connection, reason: str) -> None:
        """Send ``-reason`` and close so that the client can read it (shutdown, then drain)."""
        conn.decision = f"refused: {reason}"
        sock = conn.sock
        assert sock is not None
        try:
            sock.send(protocol.negative(reason))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._end(conn)
            return
        deadline = self._loop.call_later(self.limits.linger, self._drained, conn)
        self._loop.add_reader(sock.fileno(), self._drain, conn, deadline)

    def _drain(self, conn: _Connection, deadline: asyncio.TimerHandle) -> None:
        assert conn.sock is not None
        try:
            if conn.sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        deadline.cancel()
        self._drained(conn)

    def _drained(self, conn: _Connection) -> None:
        assert conn.sock is not None
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
            conn.decision = f"client gone: {_oserror_text(e)}"
            return False
        return True

    def _exec(self, conn: _Connection, service: Service) -> None:
        assert conn.sock is not None and service.exec_argv is not None
        if not os.access(service.exec_argv[0], os.X_OK):
            self._service_refuse(conn, service, "handler failed to start: "
                                 f"{service.exec_argv[0]} is not executable")
            return
        if not self._acknowledge(conn, service):
            self._service_end(conn, service)
            return
        env = handlers.handler_environment(service, conn.remote, conn.local, self.environ)
        # O_NONBLOCK lives on the open file description the handler shares: clear it, or a
        # plain program reading its stdin gets EAGAIN.
        conn.sock.setblocking(True)
        try:
            child = handlers.spawn(service, conn.sock, env)
        except OSError as e:
            reason = f"handler failed to start: {_oserror_text(e)}"
            if service.acknowledge:
                conn.decision = reason
                self._service_end(conn, service)
            else:
                self._service_refuse(conn, service, reason)
            return
        conn.sock.close()
        conn.sock = None
        conn.pid = child.pid
        conn.decision = "accepted"
        self._watch_child(child, conn)
        self.on_change()

    # Handlers are watched one by one through pidfds rather than with a SIGCHLD handler and
    # waitpid(-1): that reaps only our own handlers (sockmuxd, which embeds the dispatcher,
    # has children of its own) and works on loops that refuse a SIGCHLD handler (uvloop).

    def _watch_child(self, child: subprocess.Popen, conn: _Connection) -> None:
        try:
            pidfd: int | None = os.pidfd_open(child.pid)
        except OSError:  # out of descriptors: poll for this one instead, nothing is lost
            pidfd = None
        self._children[child.pid] = (child, conn, pidfd)
        if pidfd is None:
            self._loop.call_later(CHILD_POLL_INTERVAL, self._poll_child, child.pid)
        else:
            self._loop.add_reader(pidfd, self._child_exited, child.pid)

    def _poll_child(self, pid: int) -> None:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            self._loop.call_later(CHILD_POLL_INTERVAL, self._poll_child, pid)
        else:
            self._child_exited(pid)

    def _child_exited(self, pid: int) -> None:
        child, conn, pidfd = self._children.pop(pid)
        if pidfd is not None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
        _, status = os.waitpid(pid, 0)  # it has exited: this does not block
        child.returncode = os.waitstatus_to_exitcode(status)
        conn.status = handlers.describe_status(status)
        assert conn.service is not None
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
            self._service_refuse(conn, service, f"server out of resources: {_oserror_text(e)}")
            return
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(address)
        if err == 0:
            then(conn, service, sock)
        elif err == errno.EINPROGRESS:
            fd = sock.fileno()
            timer = self._loop.call_later(service.connect_timeout, self._connect_done,
                                          conn, service, sock, then, "timed out")
            self._loop.add_writer(fd, self._connect_done, conn, service, sock, then, timer)
            conn.upstream = sock
        else:
            sock.close()
            self._service_refuse(conn, service, f"service unavailable: {os.strerror(err)}")

    def _connect_done(self, conn: _Connection, service: Service, sock: socket.socket, then,
                      outcome: asyncio.TimerHandle | str) -> None:
        """The connect finished (writable) or timed out (``outcome`` is the reason)."""
        self._loop.remove_writer(sock.fileno())
        conn.upstream = None
        if isinstance(outcome, str):
            why = outcome
        else:
            outcome.cancel()
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
            conn.status = f"{sent} bytes in, {received} bytes out"
            if error is not None:
                conn.status += f", ended by {_oserror_text(error)}"
            self._service_end(conn, service)

        r = relay.Relay(self._loop, client, upstream, done)
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
                conn.decision = f"hand-over failed: {_oserror_text(e)}"
        self._service_end(conn, service)

    def _service_refuse(self, conn: _Connection, service: Service, reason: str) -> None:
        self.counters.end(service, conn.remote.host)
        self._refuse(conn, reason)

    def _service_end(self, conn: _Connection, service: Service) -> None:
        self.counters.end(service, conn.remote.host)
        self._end(conn)

    def _end(self, conn: _Connection, decision: str | None = None) -> None:
        """Close what is left and write the one record of this connection."""
        if conn.ended:
            return
        conn.ended = True
        if conn.sock is not None:
            conn.sock.close()
            conn.sock = None
        if decision:
            conn.decision = decision
        self.counters.active -= 1
        if conn.decision.startswith("refused"):
            self.counters.refused += 1
        elif conn.decision in ("accepted", "passed"):
            self.counters.accepted += 1
        duration = time.monotonic() - conn.started
        name = conn.name or "-"
        parts = [f"{conn.remote} {name}: {conn.decision or 'closed'}"]
        if conn.pid is not None:
            parts.append(f"pid {conn.pid}")
        if conn.status:
            parts.append(conn.status)
        parts.append(f"{duration:.3f}s")
        self.log.record(
            ", ".join(parts),
            priority=6 if conn.decision in ("accepted", "passed", "help") else 5,
            TCPMUX_SERVICE=conn.service.name if conn.service else (conn.name or None),
            TCPMUX_REQUESTED=conn.name or None,
            TCPMUX_DECISION=conn.decision,
            TCPMUX_LISTENER=conn.listener,
            REMOTE_ADDR=conn.remote.host or None,
            REMOTE_PORT=conn.remote.port or None,
            TCPMUX_HANDLER_PID=conn.pid,
            TCPMUX_EXIT_STATUS=conn.status or None,
            TCPMUX_DURATION_USEC=int(duration * 1e6),
        )
        self.on_change()
