"""What tcpmuxd decides about a connection once its name line is read, in both modes.

The long-running daemon (dispatch.py) and the Accept=yes instance (inetd.py) apply the same
rules in the same order: parse, find the service, its access rules, its limits. The limits the
daemon keeps live (:class:`Counters`) do not exist in Accept=yes mode, where systemd keeps them.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass
from typing import Union

from tcpmuxd.common.addresses import SocketAddress, ip_address_of
from tcpmuxd.common.words import counted
from tcpmuxd.tcpmux import clienthello, protocol
from tcpmuxd.tcpmux.config import Configuration, Service


@dataclass(frozen=True)
class Limits:
    """The multiplexer-wide limits (per-service ones are in the service files)."""

    name_timeout: float = 10.0
    max_name_length: int = protocol.DEFAULT_MAX_NAME_LENGTH
    #: Bytes the records of a TLS ClientHello may take (SNI), under the same name_timeout.
    max_hello_size: int = clienthello.DEFAULT_MAX_HELLO_SIZE
    max_connections: int = 1024
    #: Connections from one source still to send their name (cli.py documents the default).
    max_pending_per_source: int = 64
    #: How long a stop waits for relays and hand-overs in progress before cutting them.
    stop_timeout: float = 30.0
    accept_backoff: float = 0.25
    #: How long a refused connection is drained after the ``-`` line before it is closed.
    linger: float = 2.0


@dataclass(frozen=True)
class Accept:
    service: Service


@dataclass(frozen=True)
class Refuse:
    reason: str
    #: The TLS alert that says it to a client routed by its ClientHello (no "-" line there).
    alert: int = clienthello.HANDSHAKE_FAILURE


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


#: What a connection's first bytes can end in: a name line's events or a ClientHello's.
Event = Union[protocol.Event, clienthello.Event]


def decide(config: Configuration, event: Event, remote: SocketAddress,
           counters: Counters | None) -> Decision:
    """The order every refusal is checked in: parse, find service, access, limits.

    A ClientHello's server name finds the service by ServerName=, a name line by the name.
    ``counters`` is None where limits are kept by someone else (systemd, in Accept=yes mode).
    """
    if isinstance(event, protocol.BadName):
        return Refuse(event.reason)
    if isinstance(event, clienthello.BadHello):
        return Refuse(event.reason, event.alert)
    if isinstance(event, protocol.HelpRequested):
        return Help(protocol.help_listing(config.listed()))
    if isinstance(event, clienthello.ServerNameReceived):
        service = config.lookup_server_name(event.name)
        if service is None:
            return Refuse(f"unknown server name {event.name}", clienthello.UNRECOGNIZED_NAME)
    else:
        assert isinstance(event, protocol.NameReceived)
        service = config.lookup(event.name)
        if service is None:
            return Refuse(f"unknown service {event.name}")
    refusal = service.refusal(remote.host, remote.tunnel, remote.authenticated)
    if refusal is not None:
        return Refuse(refusal, clienthello.ACCESS_DENIED)
    source = remote.source
    if counters is not None:
        if service.max_connections and counters.per_service[service.key] >= service.max_connections:
            return Refuse(f"service busy ({counted(service.max_connections, 'connection')})")
        limit = service.max_connections_per_source
        if limit and counters.per_source[(service.key, source)] >= limit:
            return Refuse(f"too many connections from {source} ({limit})")
    return Accept(service)


def pending_source(remote: SocketAddress) -> str:
    """What a connection in the name phase counts against for ``max_pending_per_source``: its
    IPv4 address, or the /64 of its IPv6 address (a host commonly has a whole /64 to pick
    source addresses from); for a stream through a tunnel, that of its origin and the tunnel."""
    ip = ip_address_of(remote.host)
    if ip is None:
        key = remote.host or remote.family.lower()
    elif ip.version == 6:
        key = str(ipaddress.IPv6Network((ip, 64), strict=False))
    else:
        key = str(ip)
    return key if remote.tunnel is None else f"{key} via {remote.tunnel}"
