"""One connection of the long-running daemon, from accept to its one log record.

The dispatcher (dispatch.py) accepts it and reads its name; this object carries it from there:
the refusals (a ``-`` line, then a graceful close so that the client can read it), the handler
kind's start (it is the :class:`~tcpmuxd.tcpmux.handlers.base.DaemonConnection` a kind is
given: ``+``, a connect to a target before the ``+``, the end), the cut at a stop, and the
record. Everything runs in callbacks on the dispatcher's loop.

Forward= and PassTo= connect on callbacks, not tasks: the per-connection cost of a Task,
wait_for and two transports was most of the Forward= path (bench/dispatch.py).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Callable, Mapping

from tcpmuxd.common.addresses import Endpoint, SocketAddress, ip_address_of
from tcpmuxd.common.children import exit_text
from tcpmuxd.tcpmux import clienthello, protocol, records, relay
from tcpmuxd.tcpmux.config import Service
from tcpmuxd.tcpmux.handlers import oserror_text

if TYPE_CHECKING:
    from tcpmuxd.tcpmux.dispatch import Dispatcher

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


class Connection:
    """A connection from accept to its log record.

    ``timer`` is whichever deadline the connection waits under: the name deadline, the drain
    of a refusal, or the connect to a target. ``pending`` is the source it counts against
    while in the name phase (None after); ``counted``: it holds a slot of its service's limits.
    ``on_cut`` cuts what a handler kind keeps running for it (a relay); ``cut`` says why it was
    reset. ``sock`` is None once the client's socket is no longer ours. ``decision`` is a word
    of :data:`records.DECISIONS`, ``reason`` the text that explains it; ``status`` how it
    ended (exit status, bytes relayed), ``returncode`` its handler's. ``via`` is how the
    name arrived: ``"tcpmux"`` (a name line), ``"sni"`` (a TLS ClientHello, read by a
    :class:`~tcpmuxd.tcpmux.clienthello.HelloReader` that replaces the name reader; refusals
    are then TLS alerts, :attr:`alert` the one a refusal sends, and nothing else is answered),
    or ``""`` before the first byte.
    """

    __slots__ = ("server", "sock", "remote", "local", "started", "reader", "timer", "name",
                 "service", "decision", "reason", "pid", "status", "returncode", "listener",
                 "ended", "upstream", "pending", "counted", "on_cut", "cut", "via", "alert")

    def __init__(self, server: Dispatcher, sock: socket.socket, remote: SocketAddress,
                 local: SocketAddress, listener: str) -> None:
        self.server = server
        self.sock: socket.socket | None = sock
        self.remote = remote
        self.local = local
        self.listener = listener
        self.started = time.monotonic()
        self.reader: protocol.NameReader | clienthello.HelloReader = protocol.NameReader(
            server.limits.max_name_length)
        self.via = ""
        self.alert = clienthello.HANDSHAKE_FAILURE
        self.timer: asyncio.TimerHandle | None = None
        self.name = ""
        self.service: Service | None = None
        self.decision = ""
        self.reason = ""
        self.pid: int | None = None
        self.status = ""
        self.returncode: int | None = None
        self.ended = False
        self.upstream: socket.socket | None = None  # while a connect to a target is under way
        self.pending: str | None = None
        self.counted = False
        self.on_cut: Callable[[], None] | None = None
        self.cut = ""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.server.loop

    @property
    def environ(self) -> Mapping[str, str]:
        return self.server.environ

    def admit(self, service: Service) -> None:
        """The decision is to serve it: it takes a slot of the service's limits."""
        self.service = service
        self.server.counters.start(service, self.remote.source)
        self.counted = True

    def _release_slot(self) -> None:
        if self.counted:
            self.counted = False
            assert self.service is not None
            self.server.counters.end(self.service, self.remote.source)

    # -- what handler kinds call (handlers.base.DaemonConnection) ----------------------------

    @property
    def acknowledges(self) -> bool:
        assert self.service is not None
        return self.service.acknowledge and self.via != "sni"

    def acknowledge(self) -> bool:
        assert self.service is not None and self.sock is not None
        if not self.acknowledges:
            return True
        try:
            self.sock.send(protocol.positive())
        except OSError as e:
            self.decision, self.reason = "gone", oserror_text(e)
            return False
        return True

    def refuse(self, reason: str) -> None:
        """Send ``-reason`` and close so that the client can read it (shutdown, then drain);
        the service's slot is given back at once."""
        self._release_slot()
        if not self._send_refusal(reason):
            self.end()
            return
        assert self.sock is not None
        self.timer = self.loop.call_later(self.server.limits.linger, self.drained)
        self.loop.add_reader(self.sock.fileno(), self._drain)

    def finish(self, status: str = "", decision: str | None = None, reason: str = "") -> None:
        if status:
            self.status = status
        if reason:
            self.reason = reason
        self.on_cut = None
        self._release_slot()
        self.end(decision)

    def exited(self, returncode: int) -> None:
        """Its Exec= handler has exited (``Popen.returncode``)."""
        self.returncode = returncode
        self.finish(exit_text(returncode))

    def reset(self, reason: str) -> None:
        assert self.sock is not None
        relay.reset(self.sock)
        self.sock = None
        self.decision, self.reason = "failed", reason
        self.cut = "connection reset"
        self.finish()

    def take_socket(self) -> socket.socket:
        sock, self.sock = self.sock, None
        assert sock is not None
        return sock

    def hold(self, cut: Callable[[], None]) -> None:
        self.on_cut = cut

    def release(self) -> None:
        assert self.sock is not None
        self.sock.close()
        self.sock = None
        self.server.let_go(self)

    def watch(self, proc: subprocess.Popen[bytes]) -> None:
        self.pid = proc.pid
        self.decision = "accepted"
        self.server.watch(proc, self)

    def connect(self, target: Endpoint, timeout: float,
                then: Callable[[socket.socket], None]) -> None:
        """Literal addresses connect at once; names are resolved first (a task)."""
        if target.is_unix:
            self._start_connect(socket.AF_UNIX, target.path, timeout, then)
            return
        literal = ip_address_of(target.host)
        if literal is not None:
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            self._start_connect(family, (str(literal), target.port), timeout, then)
            return
        self.server.spawn_task(self, self._resolve_then_connect(target, timeout, then))

    async def _resolve_then_connect(self, target: Endpoint, timeout: float,
                                    then: Callable[[socket.socket], None]) -> None:
        try:
            infos = await self.loop.getaddrinfo(target.host, target.port,
                                                type=socket.SOCK_STREAM)
        except OSError as e:
            self.refuse(f"cannot resolve service address: {e}")
            return
        self._start_connect(infos[0][0], infos[0][4], timeout, then)

    def _start_connect(self, family: int, address: object, timeout: float,
                       then: Callable[[socket.socket], None]) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # EMFILE/ENFILE: out of descriptors for the upstream side
            self.refuse(f"server out of resources: {oserror_text(e)}")
            return
        sock.setblocking(False)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(address)  # type: ignore[arg-type]
        if err == 0:
            then(sock)
        elif err == errno.EINPROGRESS:
            self.timer = self.loop.call_later(timeout, self._connect_done, sock, then, True)
            self.loop.add_writer(sock.fileno(), self._connect_done, sock, then, False)
            self.upstream = sock
        else:
            sock.close()
            self.refuse(f"service unavailable: {os.strerror(err)}")

    def _connect_done(self, sock: socket.socket, then: Callable[[socket.socket], None],
                      timed_out: bool) -> None:
        """The connect finished (writable) or timed out."""
        self.loop.remove_writer(sock.fileno())
        self.upstream = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if timed_out:
            why = "timed out"
        else:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                then(sock)
                return
            why = os.strerror(err)
        sock.close()
        self.refuse(f"service unavailable: {why}")

    # -- refusals, the stop, the end -----------------------------------------------------------

    def _send_refusal(self, reason: str) -> bool:
        """Send ``-reason`` (a TLS client: the alert, :attr:`alert`) and our EOF; False when
        the client is gone."""
        self.decision, self.reason = "refused", reason
        assert self.sock is not None
        if not self.via:
            self._sniff()
        refusal = (clienthello.alert_record(self.alert) if self.via == "sni"
                   else protocol.negative(reason))
        try:
            self.sock.send(refusal)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        return True

    def _sniff(self) -> None:
        """A refusal before the first byte was read (a stop, --max-connections, a flooding
        source): a TLS client whose first byte is there already gets an alert, not a line."""
        assert self.sock is not None
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if first and clienthello.is_tls_start(first):
            self.via = "sni"

    def refuse_now(self, reason: str, record: bool = True) -> None:
        """Send ``-reason`` and close at once, holding nothing: for refusals that must not cost
        a slot (a flooding source, a stop). What the client sent already is read off first."""
        self._release_slot()
        if self._send_refusal(reason):
            assert self.sock is not None
            _discard_received(self.sock)
        self.end(record=record)

    def _drain(self) -> None:
        assert self.sock is not None
        try:
            if self.sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.drained()

    def drained(self) -> None:
        """The refused client closed (or the linger ran out): close our end too."""
        assert self.sock is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.loop.remove_reader(self.sock.fileno())
        self.end()

    async def send_and_close(self, data: bytes) -> None:
        """The HELP listing, then our end."""
        assert self.sock is not None
        try:
            await asyncio.wait_for(self.loop.sock_sendall(self.sock, data),
                                   self.server.limits.linger)
        except asyncio.TimeoutError:
            self.decision, self.reason = "gone", "the listing was not read in time"
        except OSError as e:
            self.decision, self.reason = "gone", f"the listing was not sent: {oserror_text(e)}"
        self.end()

    def stop(self, why: str) -> None:
        """End it now, the daemon stopping: reset what is open, log it as cut (``why``)."""
        if self.on_cut is not None:
            self.cut = why
            self.on_cut()  # resets both ends; finishes the connection
            return
        if self.decision == "refused" and self.sock is not None:
            self.drained()  # it has its "-" line already: a normal close
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.upstream is not None:
            self.loop.remove_writer(self.upstream.fileno())
            self.upstream.close()
            self.upstream = None
        assert self.sock is not None
        self.loop.remove_reader(self.sock.fileno())
        if self.service is not None:
            # on its way to a target (resolving or connecting): nothing has been answered
            # yet, so the client can still be told
            self.refuse_now("server shutting down")
            return
        relay.reset(self.sock)  # half-way through the HELP listing
        self.sock = None
        self.cut = why
        self.end()

    def end(self, decision: str | None = None, record: bool = True, reason: str = "") -> None:
        """Close what is left and write the one record of this connection (``record``: False
        for refusals that are logged in summaries instead)."""
        if self.ended:
            return
        self.ended = True
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        server = self.server
        server.let_go(self)
        if decision:
            self.decision = decision
        if reason:
            self.reason = reason
        counters = server.counters
        counters.active -= 1
        if self.decision == "refused":
            counters.refused += 1
        elif self.decision in ("accepted", "passed"):
            counters.accepted += 1
        if record:
            self._record()
        server.on_change()

    def _record(self) -> None:
        details = tuple(x for x in (f"pid {self.pid}" if self.pid is not None else "",
                                    self.status) if x)
        records.write(
            self.server.log, self.remote, requested=self.name,
            service=self.service.name if self.service else None,
            decision=self.decision or "closed", reason=self.reason, details=details,
            cut=self.cut, duration=time.monotonic() - self.started, via=self.via,
            TCPMUX_LISTENER=self.listener, TCPMUX_HANDLER_PID=self.pid,
            **records.exit_fields(self.returncode))
