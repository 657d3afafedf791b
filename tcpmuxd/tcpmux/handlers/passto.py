"""``PassTo=``: the connected socket itself goes to a running daemon over a unix socket
(SCM_RIGHTS), with the service name and the peer: no process per connection at all.

The message is :mod:`tcpmuxd.passfd`'s (also the receiving daemons' API). The daemon's socket
is connected to before the ``+``, so a daemon that is not there is still a ``-`` reply.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from tcpmuxd import passfd
from tcpmuxd.common.addresses import Endpoint, parse_endpoint
from tcpmuxd.tcpmux.handlers.base import (
    DaemonConnection,
    InPlaceConnection,
    TargetHandler,
    oserror_text,
)


def _parse_pass_to(text: str) -> Endpoint:
    return parse_endpoint(text, allow_tcp=False)


@dataclass(frozen=True)
class PassTo(TargetHandler, key="PassTo", parse=_parse_pass_to):
    """A ``PassTo=`` service's receiving daemon: ``unix:PATH``."""

    def connected(self, conn: DaemonConnection, sock: socket.socket) -> None:
        """``+``, then the client's socket and its message, and we are done."""
        with sock:
            if not conn.acknowledge():
                conn.finish()
                return
            client = conn.sock
            assert client is not None
            try:
                client.setblocking(True)  # the receiver gets it as accept() would give it
                passfd.send_connection(sock, client,
                                       passfd.handover_info(conn.service, conn.remote,
                                                            conn.local, conn.via))
                decision, reason = "passed", ""
            except OSError as e:
                decision, reason = "failed", f"hand-over failed: {oserror_text(e)}"
        conn.finish(decision=decision, reason=reason)

    def connected_in_place(self, conn: InPlaceConnection, sock: socket.socket) -> int:
        with sock:
            conn.acknowledge()
            passfd.send_connection(sock, conn.sock,
                                   passfd.handover_info(conn.service, conn.remote, conn.local,
                                                        conn.via))
        conn.record("passed")
        return 0
