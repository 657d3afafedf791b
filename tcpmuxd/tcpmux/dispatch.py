"""The accept loop and the name phase of the long-running daemon (Accept=no).

Flow per connection: accept -> read the name line under one total deadline (peeking, so that no
byte past the line is taken from the handler) -> :func:`~tcpmuxd.tcpmux.policy.decide` (parse,
find service, access control, limits, in that order) -> the service's handler kind starts it
(:mod:`tcpmuxd.tcpmux.handlers`; ``+`` once it can) -> one log record when it ends. From the
decision on, the connection is a :class:`~tcpmuxd.tcpmux.connection.Connection`.

The name phase runs on raw non-blocking sockets with ``add_reader`` rather than transports or
tasks: a pending connection costs a socket, a timer and a small object, which keeps 1,000 idle
clients cheap and the exec path short.

Resource handling (the failure modes named as trio's serve_listeners does):

* EMFILE/ENFILE (no file descriptors): a spare descriptor kept open for the purpose is closed
  so that one connection can be accepted and refused with ``-`` instead of left hanging, then
  accepting pauses for ``Limits.accept_backoff`` seconds; it resumes by itself.
* ENOBUFS/ENOMEM: accepting pauses likewise.
* EAGAIN from fork (no processes): the connection is refused with ``-`` (the ``+`` is sent by
  the handler's own process, after the fork: handlers/process.py) and logged; the daemon keeps
  serving.
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
from typing import Callable, Coroutine, Mapping

from tcpmuxd.common.addresses import SocketAddress, addresses_of
from tcpmuxd.common.children import Child
from tcpmuxd.common.systemd import EventLog
from tcpmuxd.common.words import counted
from tcpmuxd.tcpmux import clienthello, peek, protocol
from tcpmuxd.tcpmux.config import Configuration
from tcpmuxd.tcpmux.connection import Connection
from tcpmuxd.tcpmux.handlers import oserror_text
from tcpmuxd.tcpmux.policy import (
    Counters, Decision, Event, Help, Limits, Refuse, decide, pending_source,
)


#: How often a handler is polled for when no pidfd could be opened for it (out of descriptors).
CHILD_POLL_INTERVAL = 0.5

#: While out of descriptors, accepting pauses and resumes four times a second: say so in the log
#: once in a while, not every time. Refusals of a flooding source are summed up as often.
PAUSE_LOG_INTERVAL = 10.0
#: Sources named in one summary of refused floods (the busiest ones).
FLOOD_LOG_SOURCES = 5


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
                f"refused {counted(total, 'more connection')} in {PAUSE_LOG_INTERVAL:.0f}s "
                "from sources "
                f"with too many connections waiting to send a name: {top}"
                + (f" and {counted(more, 'more source')}" if more > 0 else ""), priority=4,
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
        self.loop = asyncio.get_running_loop()
        self._listeners: dict[int, tuple[socket.socket, str]] = {}
        self._paused = False
        self._pause_logged = -PAUSE_LOG_INTERVAL
        self._spare: int | None = self._open_spare()
        #: Exec= handlers running, watched through common.children (reaped by pid as they exit).
        self._children: dict[int, Child] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Connections whose client socket is still ours (all but those handed to Exec=).
        self._open: set[Connection] = set()
        self._pending: Counter[str] = Counter()
        self._flood_log = _FloodLog(self.loop, log)
        self._stopping = False
        self._settled: asyncio.Event | None = None  # set once _open is empty, while stopping

    # -- listeners -------------------------------------------------------------------------

    def add_listener(self, sock: socket.socket, name: str) -> None:
        sock.setblocking(False)
        self._listeners[sock.fileno()] = (sock, name)
        if not self._paused:
            self.loop.add_reader(sock.fileno(), self._accept, sock, name)

    def _close_listeners(self) -> None:
        for fd, (sock, _name) in self._listeners.items():
            self.loop.remove_reader(fd)
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
            conn.refuse("server shutting down")
        if self._open:
            n = len(self._open)
            self.log.record(f"stopping: waiting up to {timeout:g}s for "
                            f"{counted(n, 'connection')} in flight", priority=5)
            self._settled = asyncio.Event()
            waits = [self.loop.create_task(self._settled.wait())]
            if hurry is not None:
                waits.append(self.loop.create_task(hurry.wait()))
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
                conn.refuse_now("server shutting down")
            else:
                conn.stop(why)
        for task in list(self._tasks):
            task.cancel()
        if self._children:
            self.log.record("Exec= handlers still running in their own sessions: "
                            f"{counted(len(self._children), 'process', 'processes')} (pids "
                            + " ".join(map(str, self._children)) + ")")
        for child in self._children.values():
            child.cancel()
        self._children.clear()
        self._flood_log.close()

    def status(self) -> str:
        c = self.counters
        return (f"{counted(len(self.config.services), 'service')}; "
                f"{counted(c.active, 'connection')} active, {c.accepted} accepted, "
                f"{c.refused} refused, {counted(len(self._children), 'handler')} running")

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
            self.loop.remove_reader(fd)
        self.loop.call_later(self.limits.accept_backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._paused = False
        if self._spare is None:
            self._spare = self._open_spare()
        for fd, (sock, name) in self._listeners.items():
            self.loop.add_reader(fd, self._accept, sock, name)

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
                conn.refuse(f"server out of resources: {os.strerror(e.errno)}")
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
               listener: str) -> Connection:
        conn = Connection(self, sock, remote, local, listener)
        self.counters.active += 1
        self._open.add(conn)
        return conn

    def _serve(self, sock: socket.socket, remote: SocketAddress, local: SocketAddress,
               listener: str) -> None:
        """Take a new connection: its name may be there already (it usually is), so it is read
        at once; only a connection still to send it waits, and counts against its source."""
        conn = self._track(sock, remote, local, listener)
        if self._stopping:
            conn.refuse_now("server shutting down")
            return
        if self.counters.active > self.limits.max_connections:
            conn.refuse(f"too many connections ({self.limits.max_connections})")
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
            conn.refuse_now(reason, record=False)
            return
        self._pending[source] += 1
        conn.pending = source
        conn.timer = self.loop.call_later(self.limits.name_timeout, self._timed_out, conn)
        self.loop.add_reader(sock.fileno(), self._readable, conn)
        self.on_change()

    def _timed_out(self, conn: Connection) -> None:
        conn.timer = None
        self._end_name_phase(conn)
        self._decided(conn, decide(self.config, conn.reader.timeout(), conn.remote, None))

    def _readable(self, conn: Connection) -> None:
        outcome = self._read_name(conn)
        if outcome is not None:
            self._end_name_phase(conn)
            self._name_read(conn, outcome)

    def _read_name(self, conn: Connection) -> Event | OSError | None:
        """Peek at what has arrived and consume exactly the name line's bytes: the final event,
        the error that ended the connection, or None while the line is not complete.

        A first byte that starts a TLS record makes it a ClientHello instead, of which nothing
        is consumed: while it is incomplete, SO_RCVLOWAT keeps the socket from being readable
        until the bytes it needs are there (or the client hung up: :mod:`~tcpmuxd.tcpmux.peek`).
        """
        sock = conn.sock
        assert sock is not None
        try:
            data = sock.recv(conn.reader.peek_size(), socket.MSG_PEEK)
            if not conn.via and data:
                conn.via = "sni" if clienthello.is_tls_start(data) else "tcpmux"
                if conn.via == "sni":
                    conn.reader = clienthello.HelloReader(self.limits.max_hello_size)
                    data = sock.recv(conn.reader.peek_size(), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            return e
        if not data:
            return conn.reader.eof()
        reader = conn.reader
        progress = not isinstance(reader, clienthello.HelloReader) or len(data) > reader.seen
        consume, event = reader.feed(data)
        while consume:
            consume -= len(sock.recv(consume))
        if not isinstance(event, protocol.NeedData):
            return event
        if isinstance(reader, clienthello.HelloReader):
            try:
                if peek.hung_up(sock):
                    return reader.eof()
            except OSError as e:
                return e
            peek.wake_at(sock, reader.wanted)
            if not progress and conn.pending is not None:
                self.loop.remove_reader(sock.fileno())
                self.loop.call_later(peek.RETRY_INTERVAL, self._peek_again, conn, sock)
        return None

    def _peek_again(self, conn: Connection, sock: socket.socket) -> None:
        """Read on after a pause (:data:`~tcpmuxd.tcpmux.peek.RETRY_INTERVAL`), unless the
        name phase has ended meanwhile."""
        if conn.pending is not None and conn.sock is sock:
            self.loop.add_reader(sock.fileno(), self._readable, conn)

    def _name_read(self, conn: Connection, outcome: Event | OSError) -> None:
        if isinstance(outcome, OSError):
            conn.end("gone", reason=oserror_text(outcome))
            return
        if isinstance(outcome, (protocol.NameReceived, clienthello.ServerNameReceived)):
            conn.name = outcome.name
        elif isinstance(outcome, protocol.HelpRequested):
            conn.name = "HELP"
        self._decided(conn, decide(self.config, outcome, conn.remote, self.counters))

    def _end_name_phase(self, conn: Connection) -> None:
        """Stop reading the name and give back the source's pending slot (and the socket's
        usual readiness, after an incomplete ClientHello)."""
        assert conn.sock is not None
        self.loop.remove_reader(conn.sock.fileno())
        if conn.via == "sni":
            peek.wake_at(conn.sock, 1)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        source, conn.pending = conn.pending, None
        if source is not None:
            self._pending[source] -= 1
            if self._pending[source] <= 0:
                del self._pending[source]

    # -- after the name --------------------------------------------------------------------

    def _decided(self, conn: Connection, decision: Decision) -> None:
        if isinstance(decision, Refuse):
            conn.alert = decision.alert
            conn.refuse(decision.reason)
        elif isinstance(decision, Help):
            conn.decision = "help"
            self.spawn_task(conn, conn.send_and_close(decision.listing))
        else:
            conn.admit(decision.service)
            decision.service.handler.start(conn)

    # -- what connections ask of the dispatcher ---------------------------------------------

    def spawn_task(self, conn: Connection, coro: Coroutine[object, object, None]) -> None:
        """Run ``coro`` for ``conn``; a stop cancels it (the connection is ended then)."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, conn))

    def _task_done(self, task: asyncio.Task[None], conn: Connection) -> None:
        """Whatever escapes a connection's task still ends it: its slots are given back and it
        gets its log record (never a connection that counts forever). A cancelled task was
        cut by close(), which ended its connection."""
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None or conn.ended:
            return
        conn.finish(decision="failed", reason=f"internal error: {task.exception()!r}")

    def watch(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        """An Exec= handler serves ``conn``: reaped as it exits, its status in the record."""
        self._children[proc.pid] = Child(self.loop, proc, poll_interval=CHILD_POLL_INTERVAL,
                                         on_exit=lambda child: self._child_exited(child, conn))
        self.on_change()

    def _child_exited(self, child: Child, conn: Connection) -> None:
        del self._children[child.pid]
        assert child.returncode is not None
        conn.exited(child.returncode)

    def let_go(self, conn: Connection) -> None:
        """The client socket is no longer ours (ended, or handed to an Exec= handler)."""
        self._open.discard(conn)
        if self._settled is not None and not self._open:
            self._settled.set()
