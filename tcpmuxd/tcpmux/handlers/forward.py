"""``Forward=``: tcpmuxd relays the bytes to another address itself (no process per
connection), in the way systemd-socket-proxyd does (:mod:`tcpmuxd.tcpmux.relay`).

The target is connected to before the ``+``, so a target that is down is still a ``-`` reply.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from tcpmuxd.common.addresses import parse_endpoint
from tcpmuxd.common.words import counted
from tcpmuxd.tcpmux import relay
from tcpmuxd.tcpmux.handlers.base import (
    DaemonConnection,
    InPlaceConnection,
    TargetHandler,
    oserror_text,
)


def relay_status(sent: int, received: int, error: OSError | None) -> str:
    """How a relay ended, for the connection's record."""
    status = f"{counted(sent, 'byte')} in, {counted(received, 'byte')} out"
    return status if error is None else f"{status}, ended by {oserror_text(error)}"


@dataclass(frozen=True)
class Forward(TargetHandler, key="Forward", parse=parse_endpoint):
    """A ``Forward=`` service's target: ``HOST:PORT`` or ``unix:PATH``."""

    def connected(self, conn: DaemonConnection, sock: socket.socket) -> None:
        """``+``, then relay until both directions end (or the daemon cuts it)."""
        if not conn.acknowledge():
            sock.close()
            conn.finish()
            return
        conn.decision = "accepted"
        r = relay.Relay(conn.loop, conn.take_socket(), sock,
                        lambda sent, received, error: conn.finish(
                            relay_status(sent, received, error)))
        conn.hold(r.abort)  # resets both ends; its done() finishes the connection

    def connected_in_place(self, conn: InPlaceConnection, sock: socket.socket) -> int:
        conn.acknowledge()
        sent, received, error, cut = asyncio.run(
            relay.until_stopped(conn.sock, sock, conn.stop_timeout))
        status = relay_status(sent, received, error)
        conn.record("accepted", f"{status}, {cut}" if cut else status)
        return 0
