#!/usr/bin/env python3
"""A PassTo= daemon: tcpmuxd hands it connections; it answers each line in upper case.

Usage: upper-daemon.py [SOCKET_PATH]

It shows the whole PassTo= contract (tcpmuxd.conf(5), PASSING CONNECTIONS): listen on a unix
stream socket that tcpmuxd may connect to, receive each connection with
tcpmuxd.passfd.receive_connection (the client's socket plus service name and peer), and serve
it. Bytes the client sent right behind the service name are already waiting in the socket.

Without SOCKET_PATH it serves the listening socket systemd passes (upper-daemon.socket beside
this file). With it, it creates that socket itself, writable by every local user (0666): the
shipped units run tcpmuxd as a dynamic user, which must be able to connect.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from tcpmuxd.passfd import HandoverError, receive_connection

#: sd_listen_fds(3): the first descriptor systemd passes.
SD_LISTEN_FDS_START = 3


def serve(conn: socket.socket, info: dict[str, str]) -> None:
    with conn:
        if info.get("acknowledged") == "no":
            conn.sendall(b"+\r\n")
        conn.sendall(f"hello {info.get('remote', '?')}, this is {info.get('service')}\r\n".encode())
        with conn.makefile("rb") as lines:
            for line in lines:
                conn.sendall(line.upper())


def listener_from_systemd() -> socket.socket | None:
    """The one listening socket of a socket unit (LISTEN_FDS=1 for this process), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def listener_at(path: str) -> socket.socket:
    """A new listening socket at ``path`` that any local user, tcpmuxd's too, may connect to."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o666)  # connecting needs write permission; the umask took it from others
    return listener


def main() -> int:
    listener = listener_from_systemd() if len(sys.argv) == 1 else None
    if listener is None and len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], "(without it, from a socket unit)", file=sys.stderr)
        return 2
    if listener is None:
        listener = listener_at(sys.argv[1])
    listener.listen(128)
    while True:
        channel, _ = listener.accept()
        with channel:
            try:
                conn, info = receive_connection(channel)
            except (HandoverError, OSError) as e:
                print(f"upper-daemon: {e}", file=sys.stderr)
                continue
        threading.Thread(target=serve, args=(conn, info), daemon=True).start()


if __name__ == "__main__":
    raise SystemExit(main())
