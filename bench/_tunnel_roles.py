"""bench/tunnel.py's child roles: ``tunnel.py --_role ROLE ARG``, each in its own process
and session (the echo target and the clients; bench/stream_instructions.sh runs them too)."""

from __future__ import annotations

import json
import socket
import sys
import time

from _common import install_fastest_loop
from _tunnel_rows import _TIMEVAL_10S, HOST

def role_echo(arg: str) -> None:
    """Echo server on ``arg`` ports of 127.0.0.1 (one per row, so that the tunnels' TIME_WAIT
    sockets do not share 4-tuples): echoes every byte, closes on EOF. asyncio Protocol, uvloop
    when installed; prints the ports as a JSON list."""
    import asyncio

    loop_name = install_fastest_loop()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

        def eof_received(self):
            return False  # close

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(Echo, HOST, 0, backlog=4096, reuse_address=True)
                   for _ in range(int(arg))]
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        print(json.dumps({"ports": ports, "loop": loop_name}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def client_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # plain blocking socket; the kernel timeouts only guard against a hang
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL_10S)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL_10S)
    return s


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"


def role_rtt(arg: str) -> None:
    """One connection to ``port``; ``warmup`` then ``n`` times: send 1 byte, wait for it.
    Prints JSON: round trips in ns, or the error that stopped it."""
    spec = json.loads(arg)
    lat: list[int] = []
    error = None
    clock = time.perf_counter_ns
    s = client_socket()
    try:
        s.connect((HOST, spec["port"]))
        for i in range(spec["warmup"] + spec["n"]):
            t0 = clock()
            s.send(b"r")
            if s.recv(1) != b"r":
                error = f"the echo did not come back (round trip {i})"
                break
            if i >= spec["warmup"]:
                lat.append(clock() - t0)
    except OSError as e:
        error = error_text(e)
    finally:
        s.close()
    json.dump({"lat": lat, "error": error, "cpu": time.process_time()}, sys.stdout)
    sys.stdout.flush()


def role_rate(arg: str) -> None:
    """A new-stream load generator: say ready, wait for "go" on stdin, then ``count`` times
    connect, send 1 byte, read it back, close (one connection at a time). Prints JSON."""
    spec = json.loads(arg)
    addr = (HOST, spec["port"])
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    lat: list[float] = []
    errors: dict[str, int] = {}
    clock = time.perf_counter
    cpu0 = time.process_time()
    start = time.monotonic()
    for _ in range(spec["count"]):
        t0 = clock()
        s = client_socket()
        try:
            s.connect(addr)
            s.send(b"n")
            got = s.recv(1)
            t1 = clock()
        except OSError as e:
            errors[error_text(e)] = errors.get(error_text(e), 0) + 1
            s.close()
            continue
        s.close()
        if got != b"n":
            key = "closed before the echo" if not got else f"wrong echo {got!r}"
            errors[key] = errors.get(key, 0) + 1
            continue
        lat.append(t1 - t0)
    stop = time.monotonic()
    json.dump({"start": start, "stop": stop, "cpu": time.process_time() - cpu0, "lat": lat,
               "errors": errors}, sys.stdout)
    sys.stdout.flush()


def role_busy(arg: str) -> None:
    """Busy streams: ``conns`` connections to ``port``, each with one ``size``-byte message in
    flight (send it, read its echo whole and check it, send the next), for ``seconds`` after
    "go" on stdin. Many streams active in the same instant is where a tunnel can coalesce their
    frames into one link write, or pay a system call for each. Prints JSON: messages echoed."""
    import selectors

    spec = json.loads(arg)
    size, msg = spec["size"], bytes(range(256)) * (spec["size"] // 256 + 1)
    msg = msg[:size]
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    error = None
    try:
        for _ in range(spec["conns"]):
            s = client_socket()
            s.connect((HOST, spec["port"]))
            s.setblocking(False)
            socks.append(s)
    except OSError as e:
        error = error_text(e)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go" or error:
        json.dump({"count": 0, "seconds": 0.0, "error": error or "no go"}, sys.stdout)
        return
    got = {s: 0 for s in socks}
    for s in socks:
        s.send(msg)       # size is far below the send buffer: all of it is taken
        sel.register(s, selectors.EVENT_READ)
    count = 0
    cpu0 = time.process_time()
    start = time.monotonic()
    deadline = start + spec["seconds"]
    while error is None and (now := time.monotonic()) < deadline:
        for key, _ in sel.select(timeout=min(1.0, deadline - now)):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except OSError as e:
                error = error_text(e)
                break
            if not data:
                error = "a stream was closed before its echo"
                break
            have = got[s]
            if data != msg[have:have + len(data)]:
                error = f"wrong echo after {have} bytes of a message"
                break
            have += len(data)
            if have == size:
                count += 1
                have = 0
                s.send(msg)
            got[s] = have
    seconds = time.monotonic() - start
    for s in socks:
        s.close()
    json.dump({"count": count, "seconds": seconds, "cpu": time.process_time() - cpu0,
               "error": error}, sys.stdout)
    sys.stdout.flush()


ROLES = {"echo": role_echo, "rtt": role_rtt, "rate": role_rate, "busy": role_busy}
