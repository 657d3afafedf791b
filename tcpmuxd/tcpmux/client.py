"""``tcpmux``: the TCPMUX (RFC 1078) client.

``tcpmux HOST[:PORT] SERVICE`` connects, asks for SERVICE and, once the server answers ``+``,
relays standard input to the connection and the connection to standard output, byte for byte,
until the server closes. That makes it a ``ProxyCommand`` for ssh and a building block for
scripts. ``tcpmux --list HOST[:PORT]`` prints the names the server lists for ``HELP``.

Flow, in order, with the failure each step can end in (exit status in brackets):

1. parse and validate the command line, the service name included, before any network traffic
   [2, usage];
2. resolve HOST and connect to its addresses within one deadline (``--timeout``), trying every
   address the resolver returns, staggered, the way RFC 8305 ("Happy Eyeballs") describes
   [3, network error; 4, timeout];
3. send ``SERVICE CRLF`` and read the reply line within one total deadline, not per read, with
   :class:`~tcpmuxd.tcpmux.protocol.ReplyReader` [1, refused; 4, timeout; 5, protocol error];
4. on ``+``: write the bytes that came right behind the reply line, then relay both ways. End of
   standard input half-closes the connection (``shutdown(SHUT_WR)``) and the relay keeps reading;
   end of the connection ends the program after everything received went to standard output
   [0; 3 if the connection is lost].

The relay works on raw file descriptors (``os.read``/``os.write``/``recv_into``), never on text
or buffered streams, so no byte is altered or held back. Its two directions run in two threads
with blocking I/O: that keeps the flags of the inherited descriptors 0 and 1 untouched (setting
``O_NONBLOCK`` on them would change them for the parent too), works when standard input is a
regular file (which epoll refuses), and cannot deadlock against a peer process that writes to us
while we write to it.

Ctrl-C ends the program with status 130 and no traceback; a closed standard output (the reader
of a pipe went away) ends it quietly with status 141, as a shell reports a process killed by
SIGPIPE.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import math
import os
import select
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from tcpmuxd import __version__
from tcpmuxd.common.addresses import host_port, parse_endpoint
from tcpmuxd.tcpmux.protocol import (
    DEFAULT_MAX_NAME_LENGTH,
    HELP,
    Reply,
    ReplyError,
    ReplyReader,
    is_valid_name,
    name_key,
)

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "EXIT_NETWORK",
    "EXIT_TIMEOUT",
    "EXIT_PROTOCOL",
    "EXIT_NO_SERVICES",
    "EXIT_INTERRUPTED",
    "EXIT_BROKEN_PIPE",
    "MAX_TIMEOUT",
    "ClientError",
    "Target",
    "build_parser",
    "connect",
    "main",
    "parse_target",
    "read_listing",
    "read_reply",
    "relay",
]

PROG = "tcpmux"
DEFAULT_PORT = 1
DEFAULT_TIMEOUT = 10.0
#: Longest --timeout accepted (larger values overflow the platform's timeouts).
MAX_TIMEOUT = 1_000_000.0

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NETWORK = 3
EXIT_TIMEOUT = 4
EXIT_PROTOCOL = 5
#: --list: the server answered HELP with no names (a server with no services, not a dead one).
EXIT_NO_SERVICES = 6
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE

#: Delay before the next address is tried while earlier attempts are still pending (RFC 8305
#: recommends 250 ms). An attempt that fails starts the next one at once.
CONNECTION_ATTEMPT_DELAY = 0.25
#: Read size of the relay: large enough that bulk transfers cost few system calls.
RELAY_BUFFER = 256 * 1024
#: A HELP listing longer than this is not a TCPMUX server's.
MAX_LISTING = 1024 * 1024
#: Longest name accepted in a HELP listing (servers may allow longer names than we send).
MAX_LISTED_NAME = 1024

# send() raises EPIPE instead of raising SIGPIPE where the platform allows it.
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)

EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_OK}    success: the service ran and the server closed the connection,
       or the list was printed
  {EXIT_REFUSED}    the server refused the service (a "-" reply), or refused HELP
  {EXIT_USAGE}    usage error: bad option, address, port or service name (nothing was sent)
  {EXIT_NETWORK}    network error: cannot resolve HOST, cannot connect, connection lost,
       or an I/O error on standard input or output
  {EXIT_TIMEOUT}    timeout: no connection, or no complete reply, within --timeout seconds
  {EXIT_PROTOCOL}    protocol error: the server closed without a reply, or did not answer
       with a TCPMUX reply line or listing
  {EXIT_NO_SERVICES}    --list: the server lists no services (it answered HELP with no names)
  {EXIT_INTERRUPTED}  interrupted (SIGINT, Ctrl-C)
  {EXIT_BROKEN_PIPE}  standard output was closed by its reader (as if killed by SIGPIPE)
"""

EXAMPLES_HELP = """\
examples:
  tcpmux --list example.org
  tcpmux example.org:7001 echo < request > response
  ssh -o 'ProxyCommand tcpmux %h ssh' example.org
"""


class ClientError(Exception):
    """A failure reported as one ``tcpmux: ...`` line and the exit status ``status``."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _StdoutClosed(Exception):
    """Standard output's reader went away (EPIPE): end quietly."""


@dataclass(frozen=True)
class Target:
    """Where to connect: ``host`` as given (no brackets), ``port``, and how to name it."""

    host: str
    port: int

    @property
    def display(self) -> str:
        """HOST for messages; IPv6 literals in brackets so the colons do not run into ours."""
        return host_port(self.host)


def parse_target(text: str) -> Target:
    """Parse ``HOST[:PORT]`` in the project's address spelling (:mod:`tcpmuxd.common.addresses`).

    HOST is a name, an IPv4 address or an IPv6 address in brackets; PORT defaults to 1. A bare
    IPv6 address is refused as in service files, because ``::1:80`` could mean either.
    Raises :class:`ValueError` with a message for the user.
    """
    if not text.startswith("[") and text.count(":") >= 2:
        raise ValueError(
            f"bad address {text!r}: write IPv6 addresses in brackets, [ADDRESS] or [ADDRESS]:PORT"
        )
    with_port = text
    if ":" not in text or (text.startswith("[") and text.endswith("]")):
        with_port = f"{text}:{DEFAULT_PORT}"
    try:
        endpoint = parse_endpoint(with_port, allow_unix=False)
    except ValueError as exc:
        raise ValueError(f"bad address {text!r}: {exc}") from None
    assert endpoint.host is not None and endpoint.port is not None
    return Target(endpoint.host, endpoint.port)


def _describe_name_problem(name: str) -> str:
    if not name:
        return "empty"
    if len(name) > DEFAULT_MAX_NAME_LENGTH:
        return f"longer than {DEFAULT_MAX_NAME_LENGTH} characters"
    return "only visible ASCII characters are allowed, no spaces or control characters"


def _printable(text: str) -> str:
    """Server-supplied text made safe for a terminal (no escape sequences, one line)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _seconds(value: float) -> str:
    return f"{value:g}"


def _strerror(exc: OSError) -> str:
    if exc.strerror:
        return exc.strerror
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class _Log:
    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose

    def error(self, message: str) -> None:
        _stderr(f"{PROG}: {message}")

    def info(self, message: str) -> None:
        if self.verbose:
            _stderr(f"{PROG}: {message}")


def _stderr(line: str) -> None:
    try:
        os.write(2, (line + "\n").encode("utf-8", "replace"))
    except OSError:
        pass  # nowhere left to complain


# --- connecting -----------------------------------------------------------------------------


def _resolve(target: Target, family: int, deadline: float) -> list[tuple]:
    """getaddrinfo within the deadline (it has no timeout of its own, so it runs in a thread)."""
    result: list = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(target.host, target.port, family, socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:  # gaierror is an OSError; IDNA errors are not
            result.append(exc)

    thread = threading.Thread(target=lookup, name="tcpmux-resolve", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not result:
        raise ClientError(f"timed out resolving {target.display}", EXIT_TIMEOUT)
    outcome = result[0]
    if isinstance(outcome, BaseException):
        reason = _strerror(outcome) if isinstance(outcome, OSError) else str(outcome)
        raise ClientError(f"cannot resolve {target.display}: {reason}", EXIT_NETWORK)
    if not outcome:
        raise ClientError(f"cannot resolve {target.display}: no addresses", EXIT_NETWORK)
    return outcome


def _interleave(addrinfos: Sequence[tuple]) -> list[tuple]:
    """Alternate address families, keeping the resolver's order within each (RFC 8305 s. 4)."""
    first = addrinfos[0][0]
    preferred = [a for a in addrinfos if a[0] == first]
    others = [a for a in addrinfos if a[0] != first]
    ordered: list[tuple] = []
    for i in range(max(len(preferred), len(others))):
        ordered.extend(group[i] for group in (preferred, others) if i < len(group))
    return ordered


def connect(
    addrinfos: Sequence[tuple],
    deadline: float,
    log: _Log | None = None,
    attempt_delay: float = CONNECTION_ATTEMPT_DELAY,
) -> socket.socket:
    """Connect to the first of ``addrinfos`` (getaddrinfo results) that answers by ``deadline``.

    Attempts are started one after the other, the next one ``attempt_delay`` seconds after the
    previous or as soon as it fails, and run in parallel; the first to connect wins and the
    others are closed. Returns a blocking socket. Raises :class:`ClientError`: status 4 when an
    attempt was still pending at the deadline, 3 when every address failed.
    """
    log = log or _Log(False)
    queue = list(_interleave(addrinfos)) if addrinfos else []
    failures: list[str] = []
    pending: dict[socket.socket, tuple] = {}
    next_start = time.monotonic()
    with selectors.DefaultSelector() as selector:
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                if queue and (not pending or now >= next_start):
                    family, type_, proto, _, sockaddr = queue.pop(0)
                    log.info(f"connecting to {host_port(sockaddr[0])} port {sockaddr[1]}")
                    try:
                        sock = socket.socket(family, type_, proto)
                    except OSError as exc:
                        failures.append(f"{host_port(sockaddr[0])}: {_strerror(exc)}")
                        continue
                    sock.setblocking(False)
                    err = sock.connect_ex(sockaddr)
                    if err == 0:
                        return _connected(sock, sockaddr, log)
                    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                        pending[sock] = sockaddr
                        selector.register(sock, selectors.EVENT_WRITE)
                        next_start = now + attempt_delay
                    else:
                        sock.close()
                        failures.append(f"{host_port(sockaddr[0])}: {os.strerror(err)}")
                    continue
                if not pending:
                    break  # every address failed
                wait = deadline - now
                if queue:
                    wait = min(wait, next_start - now)
                for key, _ in selector.select(max(wait, 0.0)):
                    sock = key.fileobj
                    sockaddr = pending.pop(sock)
                    selector.unregister(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err == 0:
                        return _connected(sock, sockaddr, log)
                    sock.close()
                    failures.append(f"{host_port(sockaddr[0])}: {os.strerror(err)}")
                    next_start = time.monotonic()
        finally:
            for sock in pending:
                sock.close()
    for failure in failures:
        log.info(f"failed: {failure}")
    if pending:
        raise ClientError("timed out connecting", EXIT_TIMEOUT)
    if len(failures) == 1:
        raise ClientError(failures[0].split(": ", 1)[1], EXIT_NETWORK)
    raise ClientError("; ".join(failures) or "no addresses", EXIT_NETWORK)


def _connected(sock: socket.socket, sockaddr: tuple, log: _Log) -> socket.socket:
    sock.setblocking(True)
    try:
        # The relay writes what it has at once; Nagle would delay an interactive session.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    log.info(f"connected to {host_port(sockaddr[0])} port {sockaddr[1]}")
    return sock


def _open(target: Target, family: int, timeout: float, log: _Log) -> socket.socket:
    """Resolve and connect within one deadline of ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    addrinfos = _resolve(target, family, deadline)
    try:
        return connect(addrinfos, deadline, log)
    except ClientError as exc:
        where = f"{target.display} port {target.port}"
        if exc.status == EXIT_TIMEOUT:
            raise ClientError(
                f"timed out connecting to {where} (no answer within {_seconds(timeout)} s)",
                EXIT_TIMEOUT,
            ) from None
        raise ClientError(f"cannot connect to {where}: {exc}", exc.status) from None


# --- the handshake --------------------------------------------------------------------------


def _send_line(sock: socket.socket, line: bytes, deadline: float) -> None:
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    sock.sendall(line, _SEND_FLAGS)


def _recv_until(sock: socket.socket, deadline: float) -> bytes:
    """One recv that gives up at ``deadline`` (raises :class:`TimeoutError`)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
    return sock.recv(65536)


def read_reply(sock: socket.socket, deadline: float) -> Reply:
    """Read the reply line; the deadline covers the whole line, however it is split.

    Raises :class:`ReplyError`, or :class:`TimeoutError` saying what was missing.
    """
    reader = ReplyReader()
    received = False
    while True:
        try:
            data = _recv_until(sock, deadline)
        except TimeoutError:
            raise TimeoutError("reply line not complete" if received else "no reply") from None
        received = received or bool(data)
        if not data:
            raise reader.eof()
        reply = reader.feed(data)
        if reply is not None:
            return reply


def read_listing(sock: socket.socket, deadline: float) -> list[str] | Reply:
    """Read HELP's answer to the end: the names, or the negative :class:`Reply` if refused.

    Raises :class:`ReplyError` for anything that is not a listing of names.
    """
    data = bytearray()
    while True:
        try:
            chunk = _recv_until(sock, deadline)
        except TimeoutError:
            raise TimeoutError("HELP listing not complete" if data else "no reply") from None
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LISTING:
            raise ReplyError(f"HELP listing longer than {MAX_LISTING} bytes")
    lines = [line.rstrip(b"\r") for line in bytes(data).split(b"\n")]
    if lines and lines[0].startswith(b"-"):
        return Reply(False, lines[0][1:].decode("ascii", "replace").strip())
    names = []
    for number, line in enumerate(lines, 1):
        name = line.strip(b" \t").decode("ascii", "replace")
        if not name:
            continue
        if not is_valid_name(name, MAX_LISTED_NAME):
            raise ReplyError(f"not a TCPMUX HELP listing (line {number}: {bytes(line[:40])!r})")
        names.append(name)
    return names


# --- the relay ------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until everything is out; waits for a descriptor someone made non-blocking."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except BrokenPipeError:
            raise _StdoutClosed from None
        view = view[written:]


class _StdinPump:
    """Standard input to the socket, in a thread; half-closes the socket at end of input.

    Waits with poll() on fd 0 and a wake-up pipe before each read, so :meth:`stop` can end it
    without closing a descriptor another thread is blocked on.
    """

    def __init__(self, sock: socket.socket, log: _Log) -> None:
        self.sock = sock
        self.log = log
        self.error: str | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="tcpmux-stdin", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        # Unblocks a sendall to a server that no longer reads.
        _shutdown(self.sock, socket.SHUT_RDWR)
        self._thread.join(timeout=2.0)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(0, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_r in events:
                return
            if events.get(0, 0) & select.POLLNVAL:
                self._eof("standard input is closed")
                return
            try:
                data = os.read(0, RELAY_BUFFER)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.error = f"error reading standard input: {_strerror(exc)}"
                self._eof(self.error)
                return
            if not data:
                self._eof("end of standard input")
                return
            try:
                self.sock.sendall(data, _SEND_FLAGS)
            except OSError as exc:
                # The server closed its side; what it still sends is read by the other thread.
                self.log.info(f"cannot send any more: {_strerror(exc)}")
                return

    def _eof(self, why: str) -> None:
        self.log.info(f"{why}: half-closing the connection")
        _shutdown(self.sock, socket.SHUT_WR)


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # not connected any more


def relay(sock: socket.socket, log: _Log) -> str | None:
    """Relay stdin -> sock and sock -> stdout until the server closes; returns an error or None.

    Raises :class:`_StdoutClosed` when standard output's reader went away.
    """
    sock.settimeout(None)
    pump = _StdinPump(sock, log)
    pump.start()
    buffer = bytearray(RELAY_BUFFER)
    view = memoryview(buffer)
    try:
        while True:
            try:
                n = sock.recv_into(buffer)
            except OSError as exc:
                return f"connection lost: {_strerror(exc)}"
            if not n:
                log.info("connection closed by the server")
                return pump.error
            try:
                _write_all(1, view[:n])
            except OSError as exc:
                return f"error writing standard output: {_strerror(exc)}"
    finally:
        pump.stop()


# --- command line ---------------------------------------------------------------------------


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (0 < value <= MAX_TIMEOUT and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds: {text!r}"
        )
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise ClientError(message, EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} [-46v] [-t SECONDS] HOST[:PORT] SERVICE\n"
        f"       {PROG} [-46v] [-t SECONDS] -l HOST[:PORT]",
        description="Connect to SERVICE through the TCPMUX (RFC 1078) server on HOST, then\n"
        "relay standard input and output to it until the server closes the connection;\n"
        "or list the services the server offers.",
        epilog=EXIT_STATUS_HELP + "\n" + EXAMPLES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "target",
        metavar="HOST[:PORT]",
        help=f"host name, IPv4 address or [IPv6] address; PORT defaults to {DEFAULT_PORT}",
    )
    parser.add_argument(
        "service", metavar="SERVICE", nargs="?",
        help="service name (visible ASCII, case-insensitive); HELP is the same as --list",
    )
    parser.add_argument(
        "-l", "--list", action="store_true",
        help="print the services the server lists (HELP), one per line (none: status 6)",
    )
    parser.add_argument(
        "-t", "--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help="limit for resolving and connecting, and again for the whole reply "
        f"(default {_seconds(DEFAULT_TIMEOUT)}, at most {MAX_TIMEOUT:.0f})",
    )
    family = parser.add_mutually_exclusive_group()
    family.add_argument("-4", dest="family", action="store_const", const=socket.AF_INET,
                        default=socket.AF_UNSPEC, help="use IPv4 addresses only")
    family.add_argument("-6", dest="family", action="store_const", const=socket.AF_INET6,
                        help="use IPv6 addresses only")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="report progress and the server's positive reply on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _check_family(target: Target, family: int) -> None:
    try:
        literal = ipaddress.ip_address(target.host)
    except ValueError:
        return
    wanted = {socket.AF_INET: 4, socket.AF_INET6: 6}.get(family)
    if wanted and literal.version != wanted:
        raise ClientError(
            f"{target.display} is an IPv{literal.version} address, but -{wanted} was given",
            EXIT_USAGE,
        )


def _ensure_standard_fds() -> None:
    """Put /dev/null on a closed fd 0, 1 or 2, so that no socket or pipe of ours lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _run(argv: Sequence[str] | None) -> int:
    _ensure_standard_fds()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        target = parse_target(args.target)
    except ValueError as exc:
        raise ClientError(str(exc), EXIT_USAGE) from None
    _check_family(target, args.family)
    listing = args.list
    if listing and args.service is not None:
        raise ClientError("--list takes no SERVICE", EXIT_USAGE)
    if not listing:
        if args.service is None:
            parser.error("missing SERVICE (or use --list)")
        if not is_valid_name(args.service):
            problem = _describe_name_problem(args.service)
            raise ClientError(f"invalid service name {args.service!r}: {problem}", EXIT_USAGE)
        listing = name_key(args.service) == HELP
    log = _Log(args.verbose)

    sock = _open(target, args.family, args.timeout, log)
    with sock:
        deadline = time.monotonic() + args.timeout
        service = HELP.upper() if listing else args.service
        what = target.display if listing else f"{target.display}: {service}"
        try:
            _send_line(sock, service.encode("ascii") + b"\r\n", deadline)
            result = read_listing(sock, deadline) if listing else read_reply(sock, deadline)
        except TimeoutError as exc:
            missing = str(exc) or "no reply"
            raise ClientError(
                f"{what}: {missing} within {_seconds(args.timeout)} s", EXIT_TIMEOUT
            ) from None
        except ReplyError as exc:
            raise ClientError(f"{what}: {exc}", EXIT_PROTOCOL) from None
        except OSError as exc:
            raise ClientError(f"{what}: {_strerror(exc)}", EXIT_NETWORK) from None

        if isinstance(result, list):
            if not result:
                log.error(f"{what}: the server lists no services")
                return EXIT_NO_SERVICES
            _write_all(1, "".join(name + "\n" for name in result).encode("ascii"))
            return EXIT_OK
        if not result.positive:
            reason = _printable(result.message) or "no reason given"
            log.error(f"{what}: refused: {reason}")
            return EXIT_REFUSED
        message = _printable(result.message)
        log.info(f"{what}: accepted" + (f": {message}" if message else ""))
        if result.rest:
            _write_all(1, result.rest)
        error = relay(sock, log)
    if error:
        log.error(f"{target.display}: {service}: {error}")
        return EXIT_NETWORK
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tcpmux``; returns the exit status (see ``tcpmux --help``)."""
    try:
        return _run(argv)
    except ClientError as exc:
        _stderr(f"{PROG}: {exc}")
        return exc.status
    except SystemExit as exc:  # --help, --version
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    except _StdoutClosed:
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
