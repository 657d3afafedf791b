"""Waiting for more of a ClientHello that is only ever peeked at (both modes).

A TLS client's ClientHello stays in the socket for its handler, so a socket with an incomplete
one is always readable: waiting for "readable" would spin. Instead the socket is made readable
only once the bytes the reader wants are there (SO_RCVLOWAT, which Linux's TCP honours in
poll and epoll), and a client that hangs up half-way is told apart by POLLRDHUP, since a peek
still returns the bytes it left. The low-water mark goes back to 1 before anyone else reads:
a handler's blocking read would wait for it too.
"""

from __future__ import annotations

import select
import socket

#: A socket that ignores SO_RCVLOWAT (a unix socketpair, such as a SockMux tunnel's stream)
#: and woke up without new bytes is peeked at again after this long, not at once.
RETRY_INTERVAL = 0.02


def wake_at(sock: socket.socket, wanted: int) -> None:
    """Make ``sock`` readable only once ``wanted`` bytes can be read (1: as usual). A socket
    that cannot have it set is left as it is: the caller's retry interval covers it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, wanted))
    except OSError:
        pass


def hung_up(sock: socket.socket) -> bool:
    """Whether the client has closed or half-closed its side (or the connection failed)."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
               for _fd, events in poller.poll(0))
