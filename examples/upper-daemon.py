#!/usr/bin/env python3
"""A PassTo= daemon: tcpmuxd hands it connections; it answers each line in upper case.

Usage: upper-daemon.py SOCKET_PATH

It shows the whole PassTo= contract: listen on a unix stream socket, receive each connection
with tcpmuxd.passfd.receive_connection (the client's socket plus service name and peer), and
serve it. Bytes the client sent right behind the service name are already waiting in the socket.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from tcpmuxd.passfd import HandoverError, receive_connection


def serve(conn: socket.socket, info: dict[str, str]) -> None:
    with conn:
        if info.get("acknowledged") == "no":
            conn.sendall(b"+\r\n")
        conn.sendall(f"hello {info.get('remote', '?')}, this is {info.get('service')}\r\n".encode())
        with conn.makefile("rb") as lines:
            for line in lines:
                conn.sendall(line.upper())


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
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
