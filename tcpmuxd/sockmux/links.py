"""SockMux links: the one reliable, ordered, bidirectional byte pipe between two peers.

A link is presented the way asyncio presents a TCP connection: the caller supplies a protocol
factory (``asyncio.Protocol`` or ``asyncio.BufferedProtocol``) and gets ``(transport,
protocol)`` back; the protocol sees ``connection_made``, ``data_received`` (or ``get_buffer`` /
``buffer_updated``), ``eof_received``, ``pause_writing`` / ``resume_writing`` and exactly one
``connection_lost``. ``connection_made`` is called before the opening coroutine returns, and
only once the link is fully set up (TLS handshake done), so a protocol may write its greeting
there; if it raises, the link is aborted and the exception propagates. The openers, one attempt
each (what a tunnel does with them, the kind of link it has, is
:mod:`tcpmuxd.sockmux.linkkinds`):

==============  =====================  ==========================================================
kind            DeleGate               opened by
==============  =====================  ==========================================================
TCP connector   SERVER=sockmux://h:p   :func:`connect_tcp` (one attempt; :class:`Backoff` paces
                                       the driver's re-dials)
TCP receptor    -Ph:p                  :func:`listen_tcp` (the factory is called per link)
FIFO pair       commin + commout       :func:`~tcpmuxd.sockmux.pipelink.open_fifos`
comm device     comm                   :func:`~tcpmuxd.sockmux.pipelink.open_comm` (a serial
                                       line, a pty)
stdio           (``--stdio``)          :func:`open_stdio` (``ssh host sockmuxd --stdio``)
command         (``--command``)        :func:`open_command` (its stdout + stdin)
two open fds    -                      :func:`~tcpmuxd.sockmux.pipelink.connect_fds`
==============  =====================  ==========================================================

TCP links are the loop's own TCP transports, with TCP_NODELAY and SO_KEEPALIVE set; with TLS,
the socket is taken over by a :class:`~tcpmuxd.sockmux.tlslink.TLSTransport` (OpenSSL over
memory BIOs with lean socket I/O instead of the loop's TLS machinery: see that module).
The other kinds are a :class:`~tcpmuxd.sockmux.pipelink.PipePairTransport` (see that module
for its semantics: half-close, EOF on a tty, what ``connection_lost`` waits for).

Loop notes (asyncio and uvloop are both supported and tested):

* Bytes that arrive while a link is being handed to its protocol are held and delivered
  right after ``connection_made``, even if that paused reading (with TLS, what OpenSSL read
  with the handshake is delivered on the loop's next pass).
* A ``pause_reading()`` inside ``connection_made`` is honoured for every kind (both loops'
  transports would start reading after their first ``connection_made`` regardless; the link
  protocol's ``connection_made`` is called only after that).

Resource handling:

* Every descriptor a link opens is O_CLOEXEC and closed when ``connection_lost`` is delivered,
  or before the opening coroutine raises. Descriptors passed in by number are duplicated; the
  caller keeps (and closes) its own.
* A receptor's failed TLS handshakes (bad certificate, wrong CA, timeout) are logged on
  ``tcpmuxd.sockmux.links`` at WARNING and the socket is closed; the listener keeps serving.
  EMFILE/ENFILE while accepting are handled by the loop's own accept loop (it logs and pauses
  accepting briefly). :func:`listen_tcp`'s ``admit`` callback may refuse a connection as soon
  as it is accepted (the hub caps the links being set up; it resets and logs them itself).
* A command is spawned without a shell and with ``close_fds``; its stderr is ours. Its exit is
  noticed through a pidfd (or by polling where pidfds are unavailable) and it is reaped at once;
  when the link closes it gets ``terminate_timeout`` seconds to exit on its own (stdin is at EOF
  by then), then SIGTERM, then after ``kill_timeout`` SIGKILL. ``connection_lost`` waits for the
  reaping, so no zombie outlives a link.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import termios
from typing import Any, Callable, Sequence

from tcpmuxd.common.addresses import host_port, peer_host
from tcpmuxd.common.children import Child
from tcpmuxd.sockmux.pipelink import (
    PipePairTransport,
    ProtocolFactory,
    dup_pair,
    feed,
    open_pair,
    same_file,
    set_raw,
)
from tcpmuxd.sockmux.tlslink import TLSConnection, TLSTransport, handshake

__all__ = [
    "bind_tcp", "connect_tcp", "listen_tcp", "open_stdio", "open_command", "Backoff",
]

log = logging.getLogger(__name__)

#: listen_tcp's admission check: (accepted transport, TLS handshakes in progress) -> admit?
Admit = Callable[[Any, int], bool]

#: TCP keep-alive: first probe after this many idle seconds, then every INTERVAL, give up after
#: COUNT unanswered probes (~2 min). SockMux's own keep-alive notices a dead peer sooner; this
#: is the backstop for a peer that vanished while the link was idle and unpaced.
TCP_KEEPALIVE_IDLE = 60
TCP_KEEPALIVE_INTERVAL = 15
TCP_KEEPALIVE_COUNT = 4

#: How often a command's exit is polled for when pidfds are unavailable.
CHILD_POLL_INTERVAL = 0.05


# --- TCP options and addresses ---------------------------------------------------------------

def _tune_tcp(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY and SO_KEEPALIVE (with the probe timing above) on a TCP link's socket."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", TCP_KEEPALIVE_IDLE),
                            ("TCP_KEEPINTVL", TCP_KEEPALIVE_INTERVAL),
                            ("TCP_KEEPCNT", TCP_KEEPALIVE_COUNT)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError as exc:  # the peer may already have reset it
        log.debug("could not set TCP options: %s", exc)


def _fmt_addr(addr: object) -> str:
    """A link's peer for logs: ``HOST:PORT`` in the project's one spelling, else as it is."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return host_port(peer_host(str(addr[0])), addr[1])
    return str(addr)


# --- TCP ------------------------------------------------------------------------------------

class _Handoff(asyncio.Protocol):
    """A fresh TCP transport's first protocol: holds it (and any early bytes) until the link is
    set up, then gives it to the real protocol with :meth:`hand_over`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.held: list[bytes] = []
        self.eof = False
        self.lost = False
        self.exc: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        _tune_tcp(transport)
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.held.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exc = exc

    def hand_over(self, transport: asyncio.Transport,
                  protocol_factory: ProtocolFactory) -> asyncio.BaseProtocol:
        """Call the factory, attach its protocol, replay held bytes. Raises ConnectionResetError
        if the link already died during setup (the factory is then not called)."""
        if self.lost or transport.is_closing():
            raise ConnectionResetError("the link closed while it was being set up") from self.exc
        protocol = protocol_factory()
        transport.set_protocol(protocol)
        # Resume before connection_made so that a pause there wins; no bytes can be delivered
        # before this function returns to the loop.
        transport.resume_reading()
        protocol.connection_made(transport)
        held, self.held = self.held, []
        for data in held:
            feed(protocol, data)
        if self.eof and not transport.is_closing():
            if not protocol.eof_received():  # type: ignore[attr-defined]
                transport.close()
        return protocol


async def connect_tcp(host: str, port: int, protocol_factory: ProtocolFactory, *,
                      tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                      timeout: float | None = 10.0
                      ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Dial a receptor once: TCP connect, then the TLS handshake if *tls* is given.

    *timeout* bounds the whole attempt (name lookup, connect, handshake) and raises
    TimeoutError. Connection errors propagate as OSError (ConnectionRefusedError, ...); a failed
    certificate check as ``ssl.SSLCertVerificationError``. The name checked against the
    receptor's certificate is *server_hostname*, else *host*. *protocol_factory* is called only
    once the link is up. Re-dialling is the caller's business (see :class:`Backoff`).
    """
    loop = asyncio.get_running_loop()
    transport: asyncio.Transport | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                transport, handoff = await loop.create_connection(_Handoff, host, port)
                if tls is not None:
                    # the receptor speaks only after our ClientHello: nothing was read yet
                    sock = _take_socket(transport)
                    transport = None
                    tls_conn = await handshake(sock, tls, server_side=False,
                                               server_hostname=server_hostname or host)
        except TimeoutError:
            raise TimeoutError(f"connecting to {_fmt_addr((host, port))} timed out "
                               f"after {timeout} s") from None
        if tls is None:
            assert transport is not None
            return transport, handoff.hand_over(transport, protocol_factory)
        return _start_tls_link(loop, tls_conn, protocol_factory)
    except BaseException:
        if transport is not None:
            transport.abort()
        raise


def _take_socket(transport: Any) -> socket.socket:
    """The connection of a fresh plain transport, as a socket of its own: its descriptor is
    duplicated and the transport aborted (which closes only the transport's descriptor)."""
    try:
        return socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    finally:
        transport.abort()


def _start_tls_link(loop: asyncio.AbstractEventLoop, conn: TLSConnection,
                    protocol_factory: ProtocolFactory) -> tuple[TLSTransport, asyncio.BaseProtocol]:
    """A handshaken connection's transport, its protocol made and told (closed if that
    fails; the factory is not called for a link that is gone already)."""
    try:
        extra = conn.info()
        protocol = protocol_factory()
        transport = TLSTransport(loop, conn, protocol, extra)
    except BaseException:
        conn.sock.close()
        raise
    try:
        transport.start()
    except BaseException:
        transport.abort()
        raise
    return transport, protocol


class _Acceptor:
    """The receptor's per-listener state: hands each accepted, handshaken link to the factory.

    With TLS, no byte of an accepted connection is ever read outside the TLS layer: the loop's
    plain transport is only a vehicle for the accept. In its ``connection_made`` (which both
    loops call before they start reading) the socket is duplicated and that transport aborted,
    and the duplicate is the TLS layer's, which reads it from its first byte on. (Letting a
    plain transport read first loses a ClientHello that arrived in between: the handshake then
    stalls until it times out.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol_factory: ProtocolFactory,
                 tls: ssl.SSLContext | None, handshake_timeout: float,
                 admit: Admit | None = None) -> None:
        self.loop = loop
        self.factory = protocol_factory
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.admit = admit
        self.server: asyncio.AbstractServer | None = None
        self.handshakes: set[asyncio.Task[None]] = set()

    def new_protocol(self) -> asyncio.BaseProtocol:
        if self.tls is None:
            return _AcceptedHandoff(self)
        return _TLSAccept(self)

    def admitted(self, transport: asyncio.BaseTransport) -> bool:
        """Ask ``admit`` (it resets what it refuses) before anything is read or written."""
        return self.admit is None or self.admit(transport, len(self.handshakes))

    def accepted(self, handoff: _Handoff) -> None:
        assert handoff.transport is not None
        if not self.admitted(handoff.transport):
            return
        # Not from inside connection_made: both loops (re)start reading after it returns,
        # which would override a pause_reading() in the link protocol's connection_made.
        self.loop.call_soon(self.deliver, handoff, handoff.transport)

    def accepted_tls(self, raw: asyncio.BaseTransport) -> None:
        """Called from the plain transport's connection_made, before anything was read: take
        the socket over for TLS and drop that transport."""
        if not self.admitted(raw):
            return
        peer = _fmt_addr(raw.get_extra_info("peername"))
        try:
            sock = _take_socket(raw)
        except OSError as exc:  # EMFILE, ENFILE: refuse this one, keep serving
            log.warning("link from %s refused: %s", peer, exc)
            return
        task = self.loop.create_task(self.handshake(sock, peer))
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    async def handshake(self, sock: socket.socket, peer: str) -> None:
        assert self.tls is not None
        try:
            async with asyncio.timeout(self.handshake_timeout):
                tls_conn = await handshake(sock, self.tls, server_side=True)
        except Exception as exc:  # the socket is closed
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"no handshake within {self.handshake_timeout:g} s")
            log.warning("link from %s refused: TLS handshake failed: %s",
                        peer, str(exc) or type(exc).__name__)
            return
        if self.server is not None and not self.server.is_serving():
            log.info("link from %s dropped: the listener has been closed", peer)
            tls_conn.sock.close()
            return
        try:
            _start_tls_link(self.loop, tls_conn, self.factory)
        except OSError as exc:  # reset right after the handshake (the socket is closed)
            log.info("link from %s lost during setup: %s", peer, exc)
        except Exception:
            log.exception("link from %s: the protocol factory failed", peer)

    def deliver(self, handoff: _Handoff, transport: asyncio.Transport) -> None:
        peer = _fmt_addr(transport.get_extra_info("peername"))
        if self.server is not None and not self.server.is_serving():
            log.info("link from %s dropped: the listener has been closed", peer)
            transport.abort()
            return
        try:
            handoff.hand_over(transport, self.factory)
        except ConnectionError as exc:
            log.info("link from %s lost during setup: %s", peer, exc)
            transport.abort()
        except Exception:
            log.exception("link from %s: the protocol factory failed", peer)
            transport.abort()


class _AcceptedHandoff(_Handoff):
    def __init__(self, acceptor: _Acceptor) -> None:
        super().__init__()
        self.acceptor = acceptor

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.acceptor.accepted(self)


class _TLSAccept(asyncio.Protocol):
    """First protocol of an accepted TLS connection; gives the socket up in connection_made,
    so it never sees a byte."""

    def __init__(self, acceptor: _Acceptor) -> None:
        self.acceptor = acceptor

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _tune_tcp(transport)
        self.acceptor.accepted_tls(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - aborted before reading
        raise AssertionError("bytes read outside TLS")


def bind_tcp(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for HOST:PORT, one per address the name resolves to.

    ``::`` (written ``[::]``) is one dual-stack socket (``IPV6_V6ONLY`` off): every IPv6 and
    IPv4 address, as the man pages promise and as systemd's ``ListenStream=PORT`` binds. The
    loops' own ``create_server`` would make it IPv6-only, and an IPv4 peer would be refused.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, type_, proto, _canon, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr)
            sock.listen(backlog)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def listen_tcp(host: str | Sequence[str] | None, port: int,
                     protocol_factory: ProtocolFactory, *, tls: ssl.SSLContext | None = None,
                     backlog: int = 1024, handshake_timeout: float = 10.0,
                     admit: Admit | None = None) -> asyncio.Server:
    """Listen for links; call *protocol_factory* once per incoming link that completed setup.

    With *tls* the handshake (including the client-certificate check) must finish within
    *handshake_timeout* before the factory is called; a failure is logged and the socket closed.
    Whether a new link replaces an existing one is the protocol's (the driver's) decision.
    ``server.close()`` stops accepting; links already handed up stay open, and a handshake still
    in flight is dropped when it completes. *host* None or "" listens on every address (a
    socket per family); ``"::"`` too, with one dual-stack socket (:func:`bind_tcp`).
    *admit(transport, handshakes)* is asked first, for each accepted connection, with the
    number of TLS handshakes in progress: False drops it (admit resets and logs it itself).
    """
    loop = asyncio.get_running_loop()
    acceptor = _Acceptor(loop, protocol_factory, tls, handshake_timeout, admit)
    if host == "::":
        [sock] = bind_tcp("::", port, backlog)
        server = await loop.create_server(acceptor.new_protocol, sock=sock, backlog=backlog,
                                          start_serving=False)
    else:
        server = await loop.create_server(acceptor.new_protocol, host or None, port,
                                          backlog=backlog, reuse_address=True,
                                          start_serving=False)
    acceptor.server = server
    await server.start_serving()
    return server


# --- stdio ----------------------------------------------------------------------------------

def _raw_until_cleanup(fd: int) -> Callable[[], None]:
    """Make the tty behind *fd* raw; return the function that restores its settings and
    blocking mode. Holds a duplicate until then, so the restore never hits a reused number."""
    guard = os.dup(fd)
    try:
        saved = termios.tcgetattr(guard)
        blocking = os.get_blocking(guard)
        set_raw(guard)
    except BaseException:
        os.close(guard)
        raise

    done = False

    def restore() -> None:
        nonlocal done
        if done:
            return
        done = True
        try:
            termios.tcsetattr(guard, termios.TCSANOW, saved)
            os.set_blocking(guard, blocking)
        except (OSError, termios.error) as exc:  # hung up: there is nothing left to restore
            log.debug("could not restore the terminal: %s", exc)
        finally:
            os.close(guard)
    return restore


def _detach(*fds: int) -> None:
    """Point *fds* at /dev/null, so the link holds the only references to what they were."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in fds:
            os.dup2(null, fd)
    finally:
        os.close(null)


async def open_stdio(protocol_factory: ProtocolFactory, *, stdin: int = 0, stdout: int = 1,
                     detach: bool = True) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """A link over this process's stdin and stdout (``ssh host sockmuxd --stdio``).

    Both descriptors are duplicated for the link. With *detach* (the default), once the link
    is up *stdin* and *stdout* are pointed at /dev/null: a stray ``print`` cannot corrupt the
    link, and closing the link really closes the pipes, so the peer sees EOF before this
    process exits.

    * Pipes (or anything but the cases below): a :class:`PipePairTransport`.
    * The same socket on both (sshd's socketpair, inetd, systemd ``StandardInput=socket``):
      the loop's socket transport, with a real half-close through ``write_eof``.
    * A tty: raw mode (see :func:`set_raw`) while the link is up; its settings and blocking
      mode are restored when the link closes (``ssh -t`` or a manual run stay usable).
    """
    loop = asyncio.get_running_loop()
    st_in, st_out = os.fstat(stdin), os.fstat(stdout)
    if ((st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino)
            and stat.S_ISSOCK(st_in.st_mode)):
        sock = socket.socket(fileno=os.dup(stdin))
        try:
            transport, protocol = await loop.connect_accepted_socket(protocol_factory, sock)
        except BaseException:
            sock.close()
            raise
        _tune_tcp(transport)
        if detach:
            _detach(stdin, stdout)
        return transport, protocol

    cleanups: list[Callable[[], None]] = []
    rfd, wfd = dup_pair(stdin, stdout)
    try:
        if os.isatty(rfd):
            cleanups.append(_raw_until_cleanup(rfd))
        if os.isatty(wfd) and not same_file(rfd, wfd):
            cleanups.append(_raw_until_cleanup(wfd))
        same = same_file(rfd, wfd)
    except BaseException:
        for restore in cleanups:
            restore()
        os.close(rfd)
        os.close(wfd)
        raise
    try:
        pair, protocol = await open_pair(rfd, wfd, protocol_factory, can_write_eof=not same,
                                          extra={"peername": "stdio"}, cleanups=cleanups)
    except BaseException:
        for restore in cleanups:
            restore()
        raise
    if detach:
        _detach(stdin, stdout)
    return pair, protocol


# --- command --------------------------------------------------------------------------------

def _command_exited(child: Child, name: str) -> None:
    code = child.proc.returncode
    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
    log.log(logging.INFO if code else logging.DEBUG, "command %s (pid %d) %s",
            name, child.pid, how)


def _command_signalled(proc: subprocess.Popen[bytes], name: str, signum: int) -> None:
    if signum == signal.SIGTERM:
        log.info("command %s (pid %d) still running after its link closed: SIGTERM",
                 name, proc.pid)
    else:
        log.warning("command %s (pid %d) ignored SIGTERM: SIGKILL", name, proc.pid)


async def open_command(argv: Sequence[str], protocol_factory: ProtocolFactory, *,
                       terminate_timeout: float = 2.0, kill_timeout: float = 3.0,
                       env: dict[str, str] | None = None, cwd: str | None = None
                       ) -> tuple[PipePairTransport, asyncio.BaseProtocol]:
    """A link over a command's stdout (read) and stdin (write), e.g. ``["ssh", "host",
    "sockmuxd", "--stdio"]``. No shell; other descriptors are not inherited; its stderr is ours.

    The command ending closes its stdout: EOF on the link. Closing the link closes its stdin;
    ``connection_lost`` comes once the process has been reaped, after at most
    *terminate_timeout* + *kill_timeout* seconds (see the module docstring).
    ``get_extra_info("subprocess")`` is the ``subprocess.Popen`` (``returncode`` is set once
    reaped). Raises OSError (FileNotFoundError, PermissionError) if it cannot be started.
    """
    argv = [os.fspath(a) for a in argv]
    if not argv:
        raise ValueError("empty command")
    loop = asyncio.get_running_loop()
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    try:
        proc = subprocess.Popen(argv, stdin=to_child_r, stdout=from_child_w, stderr=None,
                                close_fds=True, env=env, cwd=cwd)
    except BaseException:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            os.close(fd)
        raise
    os.close(to_child_r)
    os.close(from_child_w)
    name = shlex.join(argv)
    child = Child(loop, proc, poll_interval=CHILD_POLL_INTERVAL,
                  on_exit=lambda c: _command_exited(c, name),
                  on_signal=lambda signum: _command_signalled(proc, name, signum))
    try:
        return await open_pair(from_child_r, to_child_w, protocol_factory, can_write_eof=True,
                                extra={"peername": f"command:{name}", "subprocess": proc},
                                finalizer=lambda then: child.end(terminate_timeout,
                                                                 kill_timeout, then))
    except BaseException:
        child.kill_now()
        raise


# --- re-dial pacing -------------------------------------------------------------------------

class Backoff:
    """Delays between a connector's dial attempts: exponential, capped, jittered. Pure (no
    clock, no I/O); *rng* (``random.Random``-like, only ``random()`` is used) makes it
    deterministic for tests.

    The n-th delay since the last reset (n = 0, 1, ...) is drawn uniformly from
    ``(b * (1 - jitter), b]`` with ``b = min(maximum, initial * factor**n)``: never above
    *maximum*, and peers that lost a link together do not re-dial in lockstep. A driver::

        backoff = Backoff()
        while True:
            try:
                transport, protocol = await connect_tcp(host, port, factory, tls=ctx)
            except OSError:                     # includes TimeoutError and SSL errors
                await asyncio.sleep(backoff.next_delay())
                continue
            up = loop.time()
            await protocol.closed               # however the driver learns of connection_lost
            backoff.link_closed(loop.time() - up)
            await asyncio.sleep(backoff.next_delay())

    :meth:`link_closed` resets the sequence when the link had stayed up for *stable_after*
    seconds, so a link that lived for hours is re-dialled promptly, while one the peer keeps
    dropping straight after setup is paced like a failed dial.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0,
                 jitter: float = 0.2, *, stable_after: float = 10.0,
                 rng: Any = None) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("need 0 < initial <= maximum")
        if factor < 1:
            raise ValueError("factor must be >= 1")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.stable_after = stable_after
        self._rng = rng if rng is not None else random.Random()
        self._base = initial

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; advances the sequence."""
        base = self._base
        self._base = min(self.maximum, base * self.factor)
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """Start again from *initial* (after a link that worked)."""
        self._base = self.initial

    def link_closed(self, uptime: float) -> None:
        """Report that a link ended after *uptime* seconds; resets if it had been stable."""
        if uptime >= self.stable_after:
            self.reset()
