"""``PassTo=``: the connected socket itself goes to a running daemon over a unix socket
(SCM_RIGHTS), with the service name and the peer: no process per connection at all.

The message is :mod:`tcpmuxd.passfd`'s (also the receiving daemons' API). The daemon's socket
is connected to before the ``+``, so a daemon that is not there is still a ``-`` reply.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from tcpmuxd import passfd
from tcpmuxd.common.addresses import Endpoint, parse_endpoint
from tcpmuxd.common.dropins import KeySpec, Settings
from tcpmuxd.tcpmux.handlers.base import (
    CONNECT_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DaemonConnection,
    Handler,
    InPlaceConnection,
    oserror_text,
)


def _parse_pass_to(text: str) -> Endpoint:
    return parse_endpoint(text, allow_tcp=False)


@dataclass(frozen=True)
class PassTo(Handler):
    """A ``PassTo=`` service's receiving daemon: ``unix:PATH``."""

    key: ClassVar[str] = "PassTo"
    kind: ClassVar[str] = "passto"
    keys: ClassVar[Mapping[str, KeySpec]] = {
        "PassTo": KeySpec(_parse_pass_to),
        "ConnectTimeoutSec": CONNECT_TIMEOUT,
    }

    target: Endpoint
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    @classmethod
    def build(cls, settings: Settings) -> PassTo:
        return cls(settings.get("PassTo"),
                   settings.get("ConnectTimeoutSec", DEFAULT_CONNECT_TIMEOUT))

    def describe(self) -> str:
        return str(self.target)

    def start(self, conn: DaemonConnection) -> None:
        conn.connect(self.target, self.connect_timeout, lambda channel: _hand_over(conn, channel))

    def run_in_place(self, conn: InPlaceConnection) -> int:
        channel = conn.connect(self.target, self.connect_timeout)
        if channel is None:
            return 0
        with channel:
            conn.acknowledge()
            passfd.send_connection(channel, conn.sock,
                                   passfd.handover_info(conn.service, conn.remote, conn.local))
        conn.record("passed")
        return 0


def _hand_over(conn: DaemonConnection, channel: socket.socket) -> None:
    """Connected to the daemon: ``+``, then the socket and its message, and we are done."""
    with channel:
        if not conn.acknowledge():
            conn.finish()
            return
        sock = conn.sock
        assert sock is not None
        try:
            sock.setblocking(True)  # the receiver gets it as accept() would give it
            passfd.send_connection(channel, sock,
                                   passfd.handover_info(conn.service, conn.remote, conn.local))
            decision = "passed"
        except OSError as e:
            decision = f"hand-over failed: {oserror_text(e)}"
    conn.finish(decision=decision)
