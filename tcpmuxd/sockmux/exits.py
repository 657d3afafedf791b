"""Exits: connecting a stream that arrived from the peer to its destination on this side.

:class:`ExitOpener` connects a :class:`~tcpmuxd.sockmux.session.Stream` to an
:class:`~tcpmuxd.sockmux.tunnel.Exit`. It sets ``stream.connected_as`` first: the stream
answers CONNECTED with it as soon as its transport is made. If the exit cannot be reached it
calls ``stream.exit_failed(reason)`` (CLOSE with the reason). Kinds:

* ``tcp`` / ``unix``: a connection to the server, within ``connect_timeout`` seconds.
* ``exec``: the program runs with one end of a socketpair as its stdin and stdout (stderr is
  ours, i.e. the journal), in its own session, signals reset, other descriptors closed, in an
  environment without systemd's private variables and with ``REMOTE_ADDR``/``REMOTE_PORT``
  (the client on the far side, as the peer reported it), ``SOCKMUX_TUNNEL`` and
  ``SOCKMUX_ENTRANCE``. It runs as sockmuxd's own user. It is reaped the moment it exits
  (pidfd, else polling): no zombies. When its stream is over and it is still running, it gets
  ``terminate_grace`` seconds, then SIGTERM (its process group), then SIGKILL.
* ``tcpmux``: one end of a socketpair goes to an in-process tcpmuxd
  :class:`~tcpmuxd.tcpmux.dispatch.Dispatcher` built from tcpmuxd's conf.d (``tcpmux_search_path``),
  which reads a TCPMUX service name from the stream and serves it as for a client of tcpmuxd's
  own port, with the far client's address (as the peer reports it) and the tunnel's name for
  logs, limits and access rules: with ``IPAddressAllow=``/``IPAddressDeny=`` set, such an
  origin counts only from an authenticated peer and never as one of our own addresses
  (tcpmuxd.conf(5)). Services with ``User=`` need sockmuxd to be allowed to switch users (see
  sockmuxd(8)).

Opening a tcp or unix exit is the event loop's connect coroutine, driven without a Task
(:class:`_Connecting`); exec and tcpmux exits are one short task each. The stream cancels
either when the peer gives up first.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path
from typing import Any, Final, Mapping, Sequence

from ..common.addresses import SocketAddress
from ..common.children import Child
from ..common.systemd import EventLog, child_environment
from ..common.words import counted
from .tunnel import Exit

__all__ = ["ExitOpener"]

#: How long an exec exit may go on after its stream is over before it gets SIGTERM, and
#: then how long before SIGKILL.
TERMINATE_GRACE: Final = 2.0
KILL_GRACE: Final = 3.0
CHILD_POLL_INTERVAL: Final = 0.1


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    return host, int(port) if port.isdigit() else 0


class _Connecting:
    """One tcp or unix exit connecting: the event loop's connect coroutine, without a Task.

    Its first step runs at once, in the callback that received the peer's CONNECT; a Task
    would run it one loop iteration later (Python 3.12's eager tasks would not, and 3.11 has
    none) and costs a weak-set registration per stream besides. Its later steps run from the
    done callback of the future it waits on, as a Task's do. The stream answers CONNECTED
    from connection_made (``Stream.connected_as``), so success needs nothing from here; a
    connect error or the timeout refuses the stream. ``cancel()`` is the stream giving up
    first (or, with ``timed_out``, the deadline): what Task.cancel() would be.
    """

    __slots__ = ("opener", "exit_", "stream", "coro", "waiting", "finished", "cancelling",
                 "timed_out")

    def __init__(self, opener: ExitOpener, exit_: Exit, stream: Any, coro: Any) -> None:
        self.opener = opener
        self.exit_ = exit_
        self.stream = stream
        self.coro = coro
        self.waiting: Any = None  # the future the coroutine waits on
        self.finished = False
        self.cancelling = False
        self.timed_out = False

    def done(self) -> bool:
        return self.finished

    def cancel(self, timed_out: bool = False) -> bool:
        if self.finished or self.cancelling:
            return False
        self.cancelling = True
        self.timed_out = timed_out
        waiting = self.waiting
        if waiting is not None:
            waiting.cancel()  # its done callback steps the coroutine into CancelledError
        return True

    def step(self, future: Any = None) -> None:
        self.waiting = None
        try:
            if self.cancelling and (future is None or not future.cancelled()):
                # the future finished before cancel() could cancel it: throw, as a Task does
                waiting = self.coro.throw(asyncio.CancelledError())
            else:
                waiting = self.coro.send(None)
        except StopIteration:
            self.finished = True
            return
        except asyncio.CancelledError:
            self.finished = True
            if self.timed_out:
                self.stream.exit_failed(
                    f"No server ({self.exit_.target}: no connection within "
                    f"{self.opener.connect_timeout:g} s)")
            return  # else the stream gave up (the peer closed it first)
        except Exception as exc:  # OSError mostly; anything else must not break the link
            self.finished = True
            self.stream.exit_failed(f"No server ({self.exit_.target}: {_strerror(exc)})")
            return
        if waiting is None:  # a bare yield: run again on the next iteration
            self.opener.loop.call_soon(self.step)
        else:
            self.waiting = waiting
            waiting.add_done_callback(self.step)


class ExitOpener:
    """Connects streams to exits; owns exec exits' processes and the tcpmux dispatcher."""

    def __init__(self, *, connect_timeout: float = 10.0, environ: Mapping[str, str] | None = None,
                 log: EventLog | None = None, tunnel: str = "sockmux",
                 tcpmux_search_path: Sequence[Path] | None = None,
                 terminate_grace: float = TERMINATE_GRACE) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.environ = dict(os.environ if environ is None else environ)
        self.log = log
        self.tunnel = tunnel
        self.tcpmux_search_path = tcpmux_search_path
        self.terminate_grace = terminate_grace
        self._children: set[Child] = set()
        self._dispatcher: Any = None
        self.debug_enabled = False

    def _debug(self, message: str) -> None:
        if self.debug_enabled and self.log is not None:
            self.log.record(message, priority=7, SOCKMUX_TUNNEL=self.tunnel)

    # -- the tcpmux dispatcher ---------------------------------------------------------------

    def dispatcher(self) -> Any:
        """tcpmuxd's dispatcher for ``tcpmux`` exits, built on first use (conf.d read then)."""
        if self._dispatcher is None:
            from ..tcpmux import config as tcpmux_config
            from ..tcpmux.dispatch import Dispatcher
            from ..tcpmux.policy import Limits

            path = tuple(self.tcpmux_search_path or tcpmux_config.DEFAULT_SEARCH_PATH)
            cfg = tcpmux_config.load(path)
            for error in cfg.errors:
                if self.log is not None:
                    self.log.record(f"tcpmux exit: configuration: {error}", priority=3,
                                    SOCKMUX_TUNNEL=self.tunnel)
            log = self.log if self.log is not None else EventLog({}, "sockmuxd")
            self._dispatcher = Dispatcher(cfg, Limits(), log, self.environ)
            if self.log is not None:
                self.log.record(f"tcpmux exit: {counted(len(cfg.services), 'service')} from "
                                + ", ".join(str(p) for p in path), SOCKMUX_TUNNEL=self.tunnel)
        return self._dispatcher

    # -- opening -----------------------------------------------------------------------------

    def open(self, exit_: Exit, stream: Any) -> _Connecting | asyncio.Task[None] | None:
        """Start connecting ``stream`` to ``exit_``; the stream hears back by a call."""
        kind = exit_.kind
        if kind == "tcp" or kind == "unix":
            ep = exit_.endpoint
            assert ep is not None
            # CONNECTED names the server and our end of the connection to it, as DeleGate's
            # does: the transport's (both event loops ask the socket once, as they make it).
            stream.connected_as = (None, None, None)
            if ep.path is not None:  # unix (not ep.is_unix: an interpreted call per stream)
                connect = self.loop.create_unix_connection(lambda: stream, ep.path)
            else:
                assert ep.host is not None and ep.port is not None  # not unix: host:port
                connect = self.loop.create_connection(lambda: stream, ep.host, ep.port)
            connecting = _Connecting(self, exit_, stream, connect)
            # The timeout is a plain timer (asyncio.timeout() is a Python-level context
            # manager: a few microseconds per stream, and streams are opened thousands of
            # times a second). The stream stops it once it is over.
            stream.deadline = self.loop.call_later(self.connect_timeout,
                                                   connecting.cancel, True)
            connecting.step()
            return connecting
        if kind == "exec":
            coro = self._exec(exit_, stream)
        elif kind == "tcpmux":
            coro = self._tcpmux(stream)
        else:  # pragma: no cover - config only makes the kinds above
            stream.exit_failed(f"No server (unknown exit kind {kind})")
            return None
        return self.loop.create_task(coro)

    def _environment(self, stream: Any) -> dict[str, str]:
        host, port = _split(stream.client)
        extra = {"SOCKMUX_TUNNEL": self.tunnel, "SOCKMUX_ENTRANCE": stream.entrance,
                 "PROTO": "TCP", "REMOTE_ADDR": host, "REMOTE_PORT": str(port),
                 "TCPREMOTEIP": host, "TCPREMOTEPORT": str(port)}
        return child_environment(self.environ, extra)

    async def _exec(self, exit_: Exit, stream: Any) -> None:
        argv = exit_.argv
        assert argv
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                proc = subprocess.Popen(
                    argv, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=None,
                    close_fds=True, start_new_session=True, restore_signals=True,
                    env=self._environment(stream))
            finally:
                theirs.close()
        except OSError as exc:
            ours.close()
            stream.exit_failed(f"No server (cannot start {argv[0]}: {_strerror(exc)})")
            return
        name = argv[0]
        child = Child(self.loop, proc, poll_interval=CHILD_POLL_INTERVAL, process_group=True,
                      on_exit=lambda c: self._child_exited(c, name))
        self._children.add(child)
        previous = stream.on_finish

        def finished(s: Any) -> None:
            child.end(self.terminate_grace, KILL_GRACE)
            if previous is not None:
                previous(s)
        stream.on_finish = finished
        stream.connected_as = ("localhost:0", "localhost:0", f"{exit_.target} (pid {proc.pid})")
        try:
            await self.loop.connect_accepted_socket(lambda: stream, ours)
        except BaseException:
            ours.close()
            child.end(self.terminate_grace, KILL_GRACE)
            raise

    def _child_exited(self, child: Child, name: str) -> None:
        """An exec exit's process exited and was reaped."""
        self._children.discard(child)
        code = child.proc.returncode
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        self._debug(f"exit program {name} (pid {child.pid}): {how}")

    async def _tcpmux(self, stream: Any) -> None:
        try:
            dispatcher = self.dispatcher()
        except Exception as exc:  # a broken conf.d search path must not kill the tunnel
            stream.exit_failed(f"No server (tcpmux: {exc})")
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host, port = _split(stream.client)
        ehost, eport = _split(stream.entrance)
        # The client's address is the one the peer reports, from the far side's networks: the
        # dispatcher judges it as a tunnel's origin, never as one of our own addresses.
        session = stream.session
        authenticated = session is not None and bool(session.authenticated)
        try:
            dispatcher.serve_socket(theirs, SocketAddress(host, port, "TCP", self.tunnel,
                                                          authenticated),
                                    SocketAddress(ehost, eport, "TCP"), f"sockmux:{self.tunnel}")
        except OSError as exc:
            ours.close()
            theirs.close()
            stream.exit_failed(f"No server (tcpmux: {_strerror(exc)})")
            return
        stream.connected_as = ("localhost:1", "localhost:0", None)
        try:
            await self.loop.connect_accepted_socket(lambda: stream, ours)
        except BaseException:
            ours.close()
            raise

    # -- shutdown ----------------------------------------------------------------------------

    @property
    def children(self) -> int:
        return len(self._children)

    async def close(self, timeout: float = 3.0) -> None:
        """End every exec exit (SIGTERM, SIGKILL after ``timeout``) and the dispatcher."""
        for child in list(self._children):
            child.terminate(KILL_GRACE)  # each leaves the set once it is reaped
        deadline = self.loop.time() + timeout
        while self._children and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for child in list(self._children):
            child.kill_now()
            self._children.discard(child)
        if self._dispatcher is not None:
            self._dispatcher.close()
            self._dispatcher = None
