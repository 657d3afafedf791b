"""What every handler kind is, and what the two ways of running tcpmuxd offer one.

A handler kind (``Exec=``, ``Forward=``, ``PassTo=``) is one class, a subclass of
:class:`Handler`, that holds all there is to know about it: the service-file keys it reads and
how they are checked (:attr:`Handler.keys`, :meth:`Handler.check`, :meth:`Handler.build`), how
it describes itself (:meth:`Handler.describe`, the TARGET column of ``--check`` and log
lines), how it starts a connection in the long-running daemon (:meth:`Handler.start`, driven by
callbacks on the daemon's event loop) and how it runs one in an Accept=yes instance, in place
(:meth:`Handler.run_in_place`). A service holds an instance: its settings, validated.

The daemon and the Accept=yes instance hand the kind the connection as an object with the
operations below (:class:`DaemonConnection`, :class:`InPlaceConnection`): reply, refuse,
connect to a target before the ``+``, log, end. Limits, access rules and the log record are
theirs, so a kind never counts connections or writes log lines of its own, and the order of
checks (tcpmuxd(8)) stays the same for every kind: a kind is only asked once the service was
found, allowed and within its limits, and it must answer the client with ``-`` and a reason
when it cannot start (before any ``+``).

Adding a kind is one module in this package and its name in ``handlers/__init__.py``'s
:data:`~tcpmuxd.tcpmux.handlers.KINDS` (and its keys in tcpmuxd.conf(5)).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

from tcpmuxd.common.addresses import Endpoint, SocketAddress
from tcpmuxd.common.dropins import KeySpec, Settings, parse_timeout

if TYPE_CHECKING:
    from tcpmuxd.tcpmux.config import Service

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DaemonConnection",
    "Handler",
    "TargetHandler",
    "InPlaceConnection",
    "StartError",
    "connection_variables",
    "oserror_text",
]


#: ConnectTimeoutSec=, for the kinds that connect to a target before the ``+``.
CONNECT_TIMEOUT = KeySpec(parse_timeout)
DEFAULT_CONNECT_TIMEOUT = 5.0


class StartError(Exception):
    """The handler did not start: ``reason`` is for the ``-`` reply and the log.

    ``replied``: the ``+`` had already been sent (the exec itself failed after it), so the
    client can no longer be told with a ``-`` line.
    """

    def __init__(self, reason: str, replied: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.replied = replied


def oserror_text(e: OSError) -> str:
    """The errno's own words ("Connection refused"), not a wrapper's text."""
    return os.strerror(e.errno) if e.errno else str(e)


def connection_variables(service: str, remote: SocketAddress,
                         local: SocketAddress) -> dict[str, str]:
    """The variables that describe the connection to a program that serves it: the service
    name, and the peer under systemd's names (REMOTE_ADDR, REMOTE_PORT) and UCSPI's (PROTO,
    TCPREMOTEIP, ...). Whatever runs a program for a connection gives it these."""
    variables = {"TCPMUX_SERVICE": service, "PROTO": remote.family}
    if remote.family == "TCP":
        variables.update(
            REMOTE_ADDR=remote.host,
            REMOTE_PORT=str(remote.port),
            TCPREMOTEIP=remote.host,
            TCPREMOTEPORT=str(remote.port),
            TCPLOCALIP=local.host,
            TCPLOCALPORT=str(local.port),
        )
    return variables


class DaemonConnection(Protocol):
    """A connection in the long-running daemon once its service is decided (dispatch.py).

    Everything runs on the event loop, in callbacks: a kind starts what it needs and returns;
    whatever it does later ends in exactly one of :meth:`refuse`, :meth:`finish`, :meth:`reset`
    or :meth:`watch` (which finishes when the process exits). ``sock`` is the client's socket
    (non-blocking) while the connection holds it, None once a kind took or released it.
    """

    sock: socket.socket | None
    remote: SocketAddress
    local: SocketAddress
    service: Service
    #: What the log record says happened, a word of tcpmux.records.DECISIONS ("accepted",
    #: "passed", ...), set by the kind.
    decision: str
    #: How the name arrived: "tcpmux" (a name line) or "sni" (a TLS ClientHello, which the
    #: handler must get untouched, with no "+" in front: see :attr:`acknowledges`).
    via: str

    @property
    def acknowledges(self) -> bool:
        """Whether a ``+`` is sent for this connection (by tcpmuxd or the handler's process):
        the service's Acknowledge= for a name line, never for a TLS client."""
        ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def environ(self) -> Mapping[str, str]:
        """The daemon's own environment, which a handler's is built from."""
        ...

    def refuse(self, reason: str) -> None:
        """Answer ``-reason`` (nothing was answered yet), close gracefully, end."""

    def acknowledge(self) -> bool:
        """Send ``+`` if tcpmuxd answers for this service (Acknowledge=yes); False when the
        client is gone (the decision says so)."""

    def connect(self, target: Endpoint, timeout: float,
                then: Callable[[socket.socket], None]) -> None:
        """Connect to ``target`` within ``timeout`` seconds, before any ``+``, then call
        ``then(sock)`` with the connected socket (non-blocking); on failure refuse the client
        (``-service unavailable: ...``). A stop in the meantime refuses it too."""

    def hold(self, cut: Callable[[], None]) -> None:
        """What to call to cut what the kind keeps running for the connection (a relay) when
        the daemon stops: it must reset both ends and :meth:`finish`."""

    def take_socket(self) -> socket.socket:
        """The client's socket, which the kind now owns (a relay closes it)."""

    def release(self) -> None:
        """Close our copy of the client's socket: it was handed to a process of its own."""

    def watch(self, proc: subprocess.Popen[bytes]) -> None:
        """The handler process serving the connection: "accepted"; it is reaped the moment it
        exits and the connection finishes with its exit status."""

    def reset(self, reason: str) -> None:
        """End with a reset: the ``+`` went out but the handler did not start ("failed",
        ``reason`` says why)."""

    def finish(self, status: str = "", decision: str | None = None, reason: str = "") -> None:
        """The connection is over: ``status`` says how (bytes, exit status) in its record;
        ``decision`` and ``reason`` replace the kind's, for a failure at the end."""


class InPlaceConnection(Protocol):
    """The one connection of an Accept=yes instance (inetd.py), served with blocking calls:
    after the kind's :meth:`Handler.run_in_place` the process exits (or has become the
    handler). The kind writes the connection's record with :meth:`record`, before an exec."""

    sock: socket.socket
    remote: SocketAddress
    local: SocketAddress
    service: Service
    environ: Mapping[str, str]
    #: How long a relay may go on after SIGTERM (--stop-timeout).
    stop_timeout: float
    #: As :attr:`DaemonConnection.via`.
    via: str

    @property
    def acknowledges(self) -> bool:
        """As :attr:`DaemonConnection.acknowledges`."""
        ...

    def record(self, outcome: str, status: str = "", reason: str = "") -> None:
        """The connection's log record: ``outcome`` is a word of tcpmux.records.DECISIONS
        ("accepted", "passed", "failed", ...), ``reason`` the text that explains it."""

    def refuse(self, reason: str, sock: socket.socket | None = None) -> None:
        """Record and answer ``-reason`` on ``sock`` (default: the connection), then our EOF."""

    def acknowledge(self) -> None:
        """Send ``+`` if tcpmuxd answers for this service (Acknowledge=yes)."""

    def connect(self, target: Endpoint, timeout: float) -> socket.socket | None:
        """Connect to ``target`` before any ``+``; on failure refuse the client, None."""


class Handler:
    """One handler kind (a subclass) and, as an instance, one service's handler settings.

    Subclasses are frozen dataclasses whose fields are the validated settings. A kind is
    declared as ``class Exec(Handler, key="Exec")``: ``key`` is the service-file key that
    selects it, and its lower-case form is ``kind``, its name in ``--check`` and logs
    (``"exec"``). It sets ``keys``: every key it reads, its own first, with its parser
    (:class:`KeySpec`; leave ``kinds`` unset: the registry fills in which kinds share a key,
    and a key set for a service of another kind is an error naming the kinds it applies to).
    """

    key: ClassVar[str]
    kind: ClassVar[str]
    keys: ClassVar[Mapping[str, KeySpec]]

    def __init_subclass__(cls, key: str | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if key is not None:
            cls.key = key
            cls.kind = key.lower()

    @classmethod
    def check(cls, settings: Settings, *, switch_users: bool) -> None:
        """Checks across this kind's keys beyond each value's own parser, reported with
        ``settings.error(line, message)``. Runs for every file, whichever kind it has (or
        none, when that is an error already), so that ``--check`` lists every problem of a
        file at once. ``switch_users``: whether this tcpmuxd may run handlers as other users."""

    @classmethod
    def build(cls, settings: Settings) -> Handler:
        """The handler of a file of this kind whose keys were all valid (no errors)."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the connection goes to, for the ``--check`` table and log lines."""
        raise NotImplementedError

    def start(self, conn: DaemonConnection) -> None:
        """Serve ``conn`` in the long-running daemon (see :class:`DaemonConnection`)."""
        raise NotImplementedError

    def run_in_place(self, conn: InPlaceConnection) -> int:
        """Serve the Accept=yes instance's connection; the instance's exit status (or no
        return: the process became the handler)."""
        raise NotImplementedError


@dataclass(frozen=True)
class TargetHandler(Handler):
    """A kind that connects to a ``target`` before the ``+`` (so that a target that is not
    there is still a ``-`` reply), within ConnectTimeoutSec=, and then serves the connection
    over that socket: :meth:`connected` in the daemon, :meth:`connected_in_place` in an
    Accept=yes instance. Declared as ``class Forward(TargetHandler, key="Forward",
    parse=parse_endpoint)``: its own key's value, read by ``parse``, is the target; it also
    reads ConnectTimeoutSec=."""

    target: Endpoint
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def __init_subclass__(cls, key: str | None = None,
                          parse: Callable[[str], Endpoint] | None = None,
                          **kwargs: object) -> None:
        super().__init_subclass__(key=key, **kwargs)
        if key is not None:
            assert parse is not None, f"{cls.__name__}: how is {key}= read?"
            cls.keys = {key: KeySpec(parse), "ConnectTimeoutSec": CONNECT_TIMEOUT}

    @classmethod
    def build(cls, settings: Settings) -> TargetHandler:
        return cls(settings.get(cls.key),
                   settings.get("ConnectTimeoutSec", DEFAULT_CONNECT_TIMEOUT))

    def describe(self) -> str:
        return str(self.target)

    def start(self, conn: DaemonConnection) -> None:
        conn.connect(self.target, self.connect_timeout,
                     lambda sock: self.connected(conn, sock))

    def run_in_place(self, conn: InPlaceConnection) -> int:
        sock = conn.connect(self.target, self.connect_timeout)
        if sock is None:
            return 0
        return self.connected_in_place(conn, sock)

    def connected(self, conn: DaemonConnection, sock: socket.socket) -> None:
        """The target answered (``sock``, non-blocking, ours to close): serve ``conn``."""
        raise NotImplementedError

    def connected_in_place(self, conn: InPlaceConnection, sock: socket.socket) -> int:
        """The target answered (``sock``, blocking): serve the instance's connection."""
        raise NotImplementedError
