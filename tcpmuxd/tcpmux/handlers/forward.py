"""``Forward=``: tcpmuxd relays the bytes to another address itself (no process per
connection), in the way systemd-socket-proxyd does (:mod:`tcpmuxd.tcpmux.relay`).

The target is connected to before the ``+``, so a target that is down is still a ``-`` reply.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from tcpmuxd.common.addresses import Endpoint, parse_endpoint
from tcpmuxd.common.dropins import KeySpec, Settings
from tcpmuxd.tcpmux import relay
from tcpmuxd.tcpmux.handlers.base import (
    CONNECT_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DaemonConnection,
    Handler,
    InPlaceConnection,
    oserror_text,
)

def relay_status(sent: int, received: int, error: OSError | None) -> str:
    """How a relay ended, for the connection's record."""
    status = f"{sent} bytes in, {received} bytes out"
    return status if error is None else f"{status}, ended by {oserror_text(error)}"


@dataclass(frozen=True)
class Forward(Handler):
    """A ``Forward=`` service's target: ``HOST:PORT`` or ``unix:PATH``."""

    key: ClassVar[str] = "Forward"
    kind: ClassVar[str] = "forward"
    keys: ClassVar[Mapping[str, KeySpec]] = {
        "Forward": KeySpec(parse_endpoint),
        "ConnectTimeoutSec": CONNECT_TIMEOUT,
    }

    target: Endpoint
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    @classmethod
    def build(cls, settings: Settings) -> Forward:
        return cls(settings.get("Forward"),
                   settings.get("ConnectTimeoutSec", DEFAULT_CONNECT_TIMEOUT))

    def describe(self) -> str:
        return str(self.target)

    def start(self, conn: DaemonConnection) -> None:
        conn.connect(self.target, self.connect_timeout, lambda up: _relay(conn, up))

    def run_in_place(self, conn: InPlaceConnection) -> int:
        upstream = conn.connect(self.target, self.connect_timeout)
        if upstream is None:
            return 0
        conn.acknowledge()
        sent, received, error, cut = asyncio.run(
            relay.until_stopped(conn.sock, upstream, conn.stop_timeout))
        status = relay_status(sent, received, error)
        conn.record("accepted", f"{status}, {cut}" if cut else status)
        return 0


def _relay(conn: DaemonConnection, upstream: socket.socket) -> None:
    """Connected: ``+``, then relay until both directions end (or the daemon cuts it)."""
    if not conn.acknowledge():
        upstream.close()
        conn.finish()
        return
    conn.decision = "accepted"
    r = relay.Relay(conn.loop, conn.take_socket(), upstream,
                    lambda sent, received, error: conn.finish(relay_status(sent, received,
                                                                           error)))
    conn.hold(r.abort)  # resets both ends; its done() finishes the connection
