"""``Unit=``: the handler runs in a systemd unit of the service's own, not in tcpmuxd's.

The unit is an instance of the shipped pair ``tcpmuxd-handler@.socket`` (Accept=no, a unix
socket in :data:`SOCKET_DIR`) and ``tcpmuxd-handler@.service``, whose drop-in gives the
command and whatever ``User=``, sandbox and resource limits the service needs. Its program,
tcpmuxd-handler(8), takes connections the way a ``PassTo=`` daemon does (the same message,
:mod:`tcpmuxd.passfd`) and starts the command with Exec='s process set-up and environment;
tcpmuxd needs no privilege for any of it.

The hand-over differs from ``PassTo=`` in one way: tcpmuxd keeps its copy of the client's
socket until the helper answers (tcpmuxd.passfd, the answers), because a unit that cannot
start must still get the client a ``-``. The ``+`` is sent by the handler's process, right
after it wrote its commit (``+PID``) to tcpmuxd; whatever ends the wait without a commit
(``-REASON``, the connection closed, ConnectTimeoutSec= run out, tcpmuxd stopping) is a ``-``.
To give up without a race, tcpmuxd first shuts its reading side (the helper's commit then
fails, and its process gives up before the ``+``), then reads what is queued: a commit already
there wins. After the commit, the connection stays open until the helper reports how the
handler ended, so the service's limits count running handlers as for Exec=.
"""

from __future__ import annotations

import asyncio
import errno
import re
import select
import socket
import time
from dataclasses import dataclass

from tcpmuxd import passfd
from tcpmuxd.common.addresses import Endpoint
from tcpmuxd.tcpmux.handlers.base import (
    DaemonConnection,
    InPlaceConnection,
    TargetHandler,
    oserror_text,
)

#: Where tcpmuxd-handler@INSTANCE.socket listens: SOCKET_DIR/INSTANCE.sock.
SOCKET_DIR = "/run/tcpmuxd/handler"
TEMPLATE = "tcpmuxd-handler@"
#: A unit instance name as systemd allows it (unit_instance_is_valid), bounded so that the
#: socket path stays below sun_path's 108 bytes.
_INSTANCE = re.compile(r"[A-Za-z0-9:_.\\-]{1,80}")


def _parse_unit(text: str) -> Endpoint:
    """``INSTANCE`` (of tcpmuxd-handler@.socket) or the absolute path of a helper's socket."""
    if text.startswith("/"):
        if len(text.encode()) > 107:
            raise ValueError(f"socket path {text!r} is longer than 107 bytes")
        return Endpoint(path=text)
    if not _INSTANCE.fullmatch(text):
        raise ValueError(f"{text!r} is not a unit instance name (letters, digits and "
                         "':_.\\-', at most 80) nor an absolute socket path")
    return Endpoint(path=f"{SOCKET_DIR}/{text}.sock")


def unit_of(target: Endpoint) -> str:
    """How logs and ``--check`` name the unit behind ``target``."""
    assert target.path is not None
    directory, _, name = target.path.rpartition("/")
    if directory == SOCKET_DIR and name.endswith(".sock"):
        return f"{TEMPLATE}{name[:-len('.sock')]}.service"
    return f"unix:{target.path}"


class _Wait:
    """What tcpmuxd knows of a hand-over to a unit's helper: fed its answers, it says whether
    the handler was committed (pid), refused (reason) or ended (status); ``closed``: the
    helper's side is gone (EOF), ``gave_up``: tcpmuxd stopped waiting."""

    def __init__(self) -> None:
        self.reader = passfd.AnswerReader()
        self.pid: int | None = None
        self.refused: str | None = None
        self.ended: str | None = None
        self.closed = False
        self.gave_up = False

    def feed(self, data: bytes) -> None:
        """Take what was read (b"" at EOF); a peer that is not a helper is a refusal."""
        if not data:
            self.closed = True
        try:
            answers = self.reader.feed(data)
        except passfd.HandoverError as e:
            answers = [(passfd.REFUSED, f"the unit's answer is not tcpmuxd-handler's: {e}")]
            self.closed = True
        for kind, text in answers:
            if self.pid is None and self.refused is None:
                if kind == passfd.COMMITTED:
                    self.pid = int(text)
                else:
                    self.refused = text if kind == passfd.REFUSED else "answered out of turn"
            elif self.pid is not None and self.ended is None and kind == passfd.ENDED:
                self.ended = text

    @property
    def decided(self) -> bool:
        """A commit or a refusal came, or nothing more can come."""
        return self.pid is not None or self.refused is not None or self.closed


def _read_queued(channel: socket.socket, wait: _Wait) -> None:
    """Read what the helper has written already, without waiting."""
    while not wait.closed:
        try:
            data = channel.recv(passfd.MAX_ANSWER, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        wait.feed(data)


def _give_up(channel: socket.socket, wait: _Wait) -> None:
    """Stop waiting: no commit can arrive after this, and one already queued is taken."""
    wait.gave_up = True
    try:
        channel.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    _read_queued(channel, wait)


@dataclass(frozen=True)
class Unit(TargetHandler, key="Unit", parse=_parse_unit):
    """A ``Unit=`` service's unit: the socket of its tcpmuxd-handler(8)."""

    def describe(self) -> str:
        return unit_of(self.target)

    def refusal(self, wait: _Wait) -> str:
        """The ``-`` reply for a hand-over that ended without a commit."""
        if wait.refused is not None:
            why = wait.refused
        elif wait.gave_up:
            why = f"{self.describe()} did not answer within {self.connect_timeout:g}s"
        else:
            why = f"{self.describe()} closed the connection without starting it"
        return f"handler failed to start: {why}"

    def send_refusal(self, e: OSError) -> str:
        """The ``-`` reply when the hand-over itself could not be sent: a unit that failed
        right after taking the connection (EPIPE, ECONNRESET) closed it, as above."""
        if e.errno in (errno.EPIPE, errno.ECONNRESET):
            wait = _Wait()
            wait.closed = True
            return self.refusal(wait)
        return f"handler failed to start: {self.describe()}: {oserror_text(e)}"

    def status(self, wait: _Wait) -> str:
        """The record's status of a committed hand-over."""
        how = wait.ended or ("end not reported" if wait.gave_up
                             else "the helper ended before the handler")
        return f"handler pid {wait.pid} in {self.describe()}, {how}"

    def connected(self, conn: DaemonConnection, sock: socket.socket) -> None:
        """Hand the client over, then wait (on the loop) for the helper's answers."""
        client = conn.sock
        assert client is not None
        try:
            passfd.send_connection(sock, client, passfd.handover_info(
                conn.service, conn.remote, conn.local, conn.via))
        except OSError as e:
            sock.close()
            conn.refuse(self.send_refusal(e))
            return
        _DaemonWait(self, conn, sock)

    def connected_in_place(self, conn: InPlaceConnection, sock: socket.socket) -> int:
        """The same with blocking calls; the record is written once the handler started (this
        instance does not wait for its end: its limits are systemd's)."""
        with sock:
            try:
                passfd.send_connection(sock, conn.sock, passfd.handover_info(
                    conn.service, conn.remote, conn.local, conn.via))
            except OSError as e:
                conn.refuse(self.send_refusal(e))
                return 0
            wait = _Wait()
            deadline = time.monotonic() + self.connect_timeout
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            while not wait.decided:
                left = deadline - time.monotonic()
                if left <= 0 or not poller.poll(left * 1000):
                    _give_up(sock, wait)
                    break
                _read_queued(sock, wait)
        if wait.pid is None:
            conn.refuse(self.refusal(wait))
            return 0
        conn.record("accepted", f"handler pid {wait.pid} in {self.describe()}")
        return 0


class _DaemonWait:
    """One hand-over in the long-running daemon, from the message to the handler's end: the
    helper's answers read on the loop, ConnectTimeoutSec= for the commit, the daemon's stop."""

    def __init__(self, handler: Unit, conn: DaemonConnection, channel: socket.socket) -> None:
        self.handler = handler
        self.conn = conn
        self.channel = channel
        self.wait = _Wait()
        self.committed = False
        loop = conn.loop
        self.timer: asyncio.TimerHandle | None = loop.call_later(
            handler.connect_timeout, self._timed_out)
        loop.add_reader(channel.fileno(), self._readable)
        conn.hold(self._cut)

    def _readable(self) -> None:
        _read_queued(self.channel, self.wait)
        self._progress()

    def _timed_out(self) -> None:
        self.timer = None
        _give_up(self.channel, self.wait)
        self._progress()

    def _cut(self) -> None:
        """The daemon stops while the unit starts: a commit already made stands, else reset."""
        _give_up(self.channel, self.wait)
        if self.wait.pid is not None:
            self._progress()
            return
        self._close()
        self.conn.reset(f"cut: tcpmuxd stopped while {self.handler.describe()} was starting")

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.conn.loop.remove_reader(self.channel.fileno())
        self.channel.close()

    def _progress(self) -> None:
        wait, conn = self.wait, self.conn
        if not self.committed:
            if wait.pid is not None:
                # The handler's process has the client (and sends the "+"): ours goes.
                self.committed = True
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                conn.release()
            elif wait.decided or wait.gave_up:
                self._close()
                client = conn.sock
                assert client is not None
                client.setblocking(False)  # the helper may have made it blocking
                conn.refuse(self.handler.refusal(wait))
                return
        if self.committed and (wait.ended is not None or wait.closed or wait.gave_up):
            self._close()
            conn.finish(self.handler.status(wait), decision="accepted")
