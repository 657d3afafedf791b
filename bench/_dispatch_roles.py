"""bench/dispatch.py's child roles: ``dispatch.py --_role ROLE ARG``, each in its own process
and session (the Forward= backend, the raw server, the PassTo= receiver, the clients), and
the checks and CPU readings the parent shares with them."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

import re

HOST = "127.0.0.1"
LINE = b"tcpmuxd-bench: fixed reply line\n"
DATE_RE = re.compile(rb"\d\d:\d\d:\d\d")
#: The server name the SNI target asks for (fwd.conf's ServerName=).
SNI_NAME = "fwd.bench.test"


def client_hello(name: str) -> bytes:
    """The ClientHello Python's ssl sends for ``name`` (TLS 1.3, one record), made without a
    socket: what an SNI client's first bytes are. The benchmark's Forward= backend never
    answers it (it writes LINE and closes), so what is measured is tcpmuxd's routing and
    relay, not TLS."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def request_bytes(name: str, kind: str) -> bytes:
    """What a client of a target sends: the name line, or for ``kind`` "sni" a ClientHello
    naming ``name``."""
    return client_hello(name) if kind == "sni" else name.encode() + b"\r\n"


def _listen_tcp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST, 0))
    s.listen(4096)
    return s


def role_backend(_arg: str) -> None:
    """Forward= backend: write LINE, close. Blocking, one process, no per-connection work."""
    ls = _listen_tcp()
    print(ls.getsockname()[1], flush=True)
    while True:
        conn, _ = ls.accept()
        try:
            conn.sendall(LINE)
        except OSError:
            pass
        conn.close()


def role_raw(_arg: str) -> None:
    """The load generator's ceiling: read the name line, answer ``+`` CRLF and LINE, close."""
    ls = _listen_tcp()
    print(ls.getsockname()[1], flush=True)
    while True:
        conn, _ = ls.accept()
        try:
            conn.settimeout(5)
            data = b""
            while b"\n" not in data:
                chunk = conn.recv(512)
                if not chunk:
                    break
                data += chunk
            conn.sendall(b"+\r\n" + LINE)
        except OSError:
            pass
        conn.close()


def role_passrecv(path: str) -> None:
    """PassTo= receiver: take the socket with tcpmuxd.passfd, write LINE to it, close."""
    from tcpmuxd.passfd import receive_connection

    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(4096)
    print("ready", flush=True)
    errors = 0
    while True:
        channel, _ = ls.accept()
        try:
            conn, _info = receive_connection(channel)
        except Exception as e:  # noqa: BLE001 - count, report once, keep serving
            errors += 1
            if errors == 1:
                print(f"passrecv: hand-over failed: {e!r}", file=sys.stderr, flush=True)
            channel.close()
            continue
        channel.close()
        try:
            conn.sendall(LINE)
        except OSError:
            pass
        conn.close()


_TIMEVAL_10S = struct.pack("ll", 10, 0)


def role_client(arg: str) -> None:
    """One load-generator process: say ready, wait for "go" on stdin, run, print JSON."""
    spec = json.loads(arg)
    addr = (spec["host"], spec["port"])
    count, kind = spec["count"], spec["kind"]
    request = request_bytes(spec["name"], kind)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    lat: list[float] = []
    errors: dict[str, int] = {}
    nul_after_ack = 0
    acks: dict[str, int] = {}
    clock = time.perf_counter
    cpu0 = time.process_time()
    start = time.monotonic()
    for _ in range(count):
        t0 = clock()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # plain blocking socket; the kernel timeouts only guard against a hang
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL_10S)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL_10S)
            s.connect(addr)
            s.sendall(request)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        except OSError as e:
            key = f"{type(e).__name__}: {e.strerror or e}"
            errors[key] = errors.get(key, 0) + 1
            s.close()
            continue
        s.close()
        t1 = clock()
        reply = b"".join(chunks)
        problem = check_reply(reply, kind)
        if problem:
            errors[problem] = errors.get(problem, 0) + 1
            continue
        end = 0 if kind == "sni" else reply.index(b"\r\n") + 2
        ack = reply[:end].decode("ascii", "replace")
        acks[ack] = acks.get(ack, 0) + 1
        if reply[end:end + 1] == b"\0":
            nul_after_ack += 1
        lat.append(t1 - t0)
    stop = time.monotonic()
    cpu = time.process_time() - cpu0
    json.dump({"start": start, "stop": stop, "cpu": cpu, "lat": lat, "errors": errors,
               "nul": nul_after_ack, "acks": acks}, sys.stdout)
    sys.stdout.flush()


def check_reply(reply: bytes, kind: str) -> str | None:
    """None if ``reply`` is ``+...`` CRLF followed by the expected output (for an SNI client,
    which gets no reply line, the output alone), else what's wrong."""
    if not reply:
        return "closed without a reply"
    if kind == "sni":
        return None if reply == LINE else f"not the fixed line: {reply[:60]!r}"
    if not reply.startswith(b"+"):
        return f"negative or bad reply: {reply[:60]!r}"
    end = reply.find(b"\r\n")
    if end < 0:
        return f"no CRLF after the reply line: {reply[:60]!r}"
    body = reply[end + 2:]
    if body.startswith(b"\0"):  # xinetd's stray NUL: counted, tolerated
        body = body[1:]
    if kind == "date":
        if not (DATE_RE.search(body) and body.endswith(b"\n")):
            return f"not date's output: {reply[:60]!r}"
    elif body != LINE:
        return f"not the fixed line: {reply[:60]!r}"
    return None


def task_cpu(pid: int) -> float:
    """CPU seconds used so far by every thread of ``pid`` (schedstat, nanoseconds)."""
    total = 0
    if not pid:
        return 0.0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        return 0.0
    return total / 1e9


TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and of its children it has reaped (/proc/PID/stat), 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # fields[0] is the state (field 3): utime..cstime are fields 14..17
    return sum(int(x) for x in fields[11:15]) / TICK


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


ROLES = {"backend": role_backend, "raw": role_raw, "passrecv": role_passrecv,
         "client": role_client}
