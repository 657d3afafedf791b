"""sockmuxd against a live DeleGate 9.9.11: the reference implementation is the judge.

Each tunnel runs in a network namespace of its own (its loopback only): a data server, a
DeleGate and a sockmuxd, one accepting the link and the other dialling it, in both role
assignments. Each side has an entrance, and its exit is the data server, so every scenario runs
in both directions: entering at DeleGate and leaving through sockmuxd, and the reverse.

Scenarios (the data server's modes are described at DATA_SERVER): one echo; 16 parallel 1 MiB
echo streams; 50 concurrent streams; one 64 MiB stream each way (byte-exact, SHA-256); the
server closing first; the client closing first; a client that half-closes and still gets the
server's reply; more streams than DeleGate's 64-slot table holds, with the link surviving; and
either side restarting, with the link coming back. Every test checks that the link never went
down unless the test took it down, and that sockmuxd wrote no traceback.

DeleGate is found or built as tests/sockmux/delegate_peer.py says (``DELEGATED``,
``TCPMUXD_DELEGATE_SRC``); without it these tests are skipped with the reason. The 64 MiB
throughput of each pair (DeleGate to DeleGate, and both mixed pairs) is printed at the end of
the run ("DeleGate interop throughput"), so that a regression either way shows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from delegate_peer import THROUGHPUT, DeleGate, find_or_build
from netns_harness import (
    NsProc, add_namespace, delete_namespace, in_netns, namespace_name, wait_for_port,
)

PYTHON = sys.executable
LINK, DG_ENTRANCE, SMX_ENTRANCE, DATA = 7000, 8001, 8002, 9001  # a fresh namespace each
ROLES = ["delegate-receptor", "delegate-connector"]
#: Where a stream enters: at DeleGate's entrance (sockmuxd is the exit) or at sockmuxd's.
DIRECTIONS = {"via-delegate-entrance": DG_ENTRANCE, "via-sockmuxd-entrance": SMX_ENTRANCE}
STEP_TIMEOUT = 60.0  # no socket operation of a client waits longer
BIG = 64 << 20
#: TCP Fast Open: client (0x1), server (0x2), data in SYN without cookies (0x4, 0x200), on
#: every listener without its own socket option (0x400). Only in the test's namespace.
FASTOPEN_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"
FASTOPEN = 0x1 | 0x2 | 0x4 | 0x200 | 0x400
#: DeleGate's table has 64 slots, a few of them its own (listener, link...): about 60 streams.
OVER_TABLE = 70


# The data server, one thread per connection. The first line says what to do:
#   echo             echo everything until EOF, then close
#   upload N         read N bytes, answer "<sha256 hex> N", close (server closes first)
#   download N SEED  send N bytes of random.Random(SEED), close (server closes first)
#   reply            answer "reply to reply" at once, then read until EOF, close
#   sink             read until EOF, close
# On stdout, one JSON object per connection once it ends: mode, how its input ended (eof,
# reset, timeout, short), bytes read after the request line, their SHA-256.
DATA_SERVER = r"""
import hashlib, json, random, socket, sys, threading
lock = threading.Lock()
def emit(**ev):
    with lock:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()
def handle(conn):
    conn.settimeout(120)
    buf, mode, how, got, h = b"", "-", "eof", 0, hashlib.sha256()
    try:
        while b"\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                how = "eof before the request"
                return
            buf += chunk
        line, _, data = buf.partition(b"\n")
        words = line.decode().split()
        mode = words[0]
        if mode == "echo":
            while data:
                conn.sendall(data)
                got += len(data)
                h.update(data)
                data = conn.recv(1 << 18)
        elif mode == "upload":
            n = int(words[1])
            while True:
                got += len(data)
                h.update(data)
                if got >= n:
                    break
                data = conn.recv(1 << 18)
                if not data:
                    how = "short"
                    break
            conn.sendall(f"{h.hexdigest()} {got}\n".encode())
        elif mode == "download":
            conn.sendall(random.Random(int(words[2])).randbytes(int(words[1])))
        elif mode in ("reply", "sink"):
            if mode == "reply":
                conn.sendall(b"reply to " + line + b"\n")
            while data:
                got += len(data)
                h.update(data)
                data = conn.recv(1 << 18)
    except (ConnectionResetError, BrokenPipeError):
        how = "reset"
    except socket.timeout:
        how = "timeout"
    finally:
        conn.close()
        emit(mode=mode, how=how, bytes=got, sha=h.hexdigest())
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(1024)
emit(mode="listening")
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""


class DataServer(NsProc):
    def __init__(self, ns: str, log: Path) -> None:
        self.ends: list[dict] = []
        super().__init__("data server", ns, [PYTHON, "-u", "-c", DATA_SERVER, str(DATA)], log)

    def on_line(self, now: float, line: str) -> None:
        try:
            ev = json.loads(line)
        except ValueError:
            return
        if ev.get("mode") != "listening":
            with self.cond:
                self.ends.append(ev)
                self.cond.notify_all()

    def wait_end(self, mode: str, count: int = 1, timeout: float = 20.0) -> list[dict]:
        """The end records of ``mode`` connections, once there are ``count`` (or timeout)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [e for e in self.ends if e["mode"] == mode]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self.cond.wait(min(left, 0.2))

    def forget(self) -> None:
        with self.cond:
            self.ends.clear()


# --------------------------------------------------------------------------- clients


@dataclass
class Result:
    """What one client saw: the bytes read (or their hash and count), and how it ended."""

    how: str = ""  # eof, reset, timeout, connect: ..., error: ...
    data: bytes = b""
    count: int = 0
    sha: str = ""
    sent: int = 0
    seconds: float = 0.0
    signs: list[str] = field(default_factory=list)


def _ending(exc: OSError) -> str:
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"error: {exc!r}"


def run_client(port: int, request: bytes, payload: bytes = b"", *, close: str = "none",
               keep: int = 1 << 20, expect: int | None = None,
               fastopen: bool = False) -> Result:
    """Connect (in the calling thread's namespace), send ``request`` + ``payload`` while
    reading, then ``close``: "none" (read until EOF), "shut" (half-close after sending, read
    until EOF), "full" (close at once after sending, read nothing), or "after" (close once
    ``expect`` bytes came back). Keeps at most ``keep`` bytes read; hashes all.
    ``fastopen``: the request rides in the SYN (TCP Fast Open), so that it is there when the
    connection is accepted, however late this thread runs after the connect."""
    r = Result()
    start = time.monotonic()
    try:
        if fastopen:
            s = socket.socket()
            s.settimeout(STEP_TIMEOUT)
            s.sendto(request, socket.MSG_FASTOPEN, ("127.0.0.1", port))
            request = b""
        else:
            s = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
    except OSError as exc:
        r.how = f"connect: {exc!r}"
        return r
    h = hashlib.sha256()
    done = threading.Event()

    def read() -> None:
        try:
            while True:
                if expect is not None and close == "after" and r.count >= expect:
                    r.signs.append("enough")
                    break
                chunk = s.recv(1 << 18)
                if not chunk:
                    r.signs.append("eof")
                    break
                r.count += len(chunk)
                h.update(chunk)
                if len(r.data) < keep:
                    r.data += chunk[:keep - len(r.data)]
        except OSError as exc:
            r.signs.append(_ending(exc))
        finally:
            done.set()

    reader = threading.Thread(target=read, daemon=True)
    if close != "full":
        reader.start()
    try:
        s.sendall(request + payload)
        r.sent = len(request) + len(payload)
        if close == "shut":
            s.shutdown(socket.SHUT_WR)
        elif close == "full":
            s.close()
            r.how, r.seconds = "closed", time.monotonic() - start
            return r
    except OSError as exc:
        r.signs.append(_ending(exc))
    if not done.wait(STEP_TIMEOUT * 2):
        r.signs.append("hung")
    s.close()
    r.sha = h.hexdigest()
    r.seconds = time.monotonic() - start
    r.how = "reset" if "reset" in r.signs else (r.signs[0] if r.signs else "?")
    return r


def recv_exactly(s: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer if the stream ends first."""
    got = b""
    while len(got) < n:
        chunk = s.recv(min(n - len(got), 1 << 16))
        if not chunk:
            break
        got += chunk
    return got


def clients_in(ns: str, jobs: list, timeout: float = 180.0) -> list[Result]:
    """Run ``run_client(*args, **kw)`` for each (args, kw) of ``jobs`` at once, each in a
    thread inside ``ns``; their results in order."""
    results: list[Result | None] = [None] * len(jobs)

    def one(i: int, args: tuple, kw: dict) -> None:
        results[i] = in_netns(ns, lambda: run_client(*args, **kw), timeout)

    threads = [threading.Thread(target=one, args=(i, a, k), daemon=True)
               for i, (a, k) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert all(r is not None for r in results), "a client thread did not finish"
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- the tunnel


class Tunnel:
    """One namespace with a data server and a SockMux pair: DeleGate or sockmuxd on each end.
    ``role`` says who accepts the link: "delegate-receptor" (sockmuxd dials), or
    "delegate-connector" (DeleGate dials), or "delegate-pair" (two DeleGates, for figures:
    the second one's entrance is SMX_ENTRANCE)."""

    def __init__(self, binary: Path, role: str, tmp: Path) -> None:
        self.binary, self.role, self.tmp = binary, role, tmp
        self.ns = namespace_name("dgl")
        self.procs: list[NsProc] = []
        self.server: DataServer
        self.delegate: DeleGate
        self.sockmuxd: NsProc | None = None
        self.delegate2: DeleGate | None = None
        self.starts = 0

    def make(self) -> str | None:
        reason = add_namespace(self.ns)
        if reason is None:  # TCP Fast Open for clients and every listener, no cookie needed
            try:
                in_netns(self.ns, lambda: Path(FASTOPEN_SYSCTL).write_text(f"{FASTOPEN}\n"))
            except OSError as exc:
                return f"cannot enable TCP Fast Open in the test's namespace: {exc}"
        return reason

    def _proc(self, p: NsProc) -> NsProc:
        self.procs.append(p)
        return p

    def start(self) -> None:
        self.server = DataServer(self.ns, self.tmp / "data-server.log")
        self._proc(self.server)
        assert self.server.wait_line('"listening"', 0, 15), self.server.text()
        if self.role == "delegate-connector":
            self.start_sockmuxd()
            self.start_delegate()
        else:
            self.start_delegate()
            if self.role == "delegate-pair":
                self.delegate2 = DeleGate(self.binary, self.ns, self.tmp / "delegate2.log",
                                          entrance=SMX_ENTRANCE, exit_port=DATA, connect=LINK,
                                          name="delegate connector")
                self._proc(self.delegate2)
            else:
                self.start_sockmuxd()
        self.wait_link_up(0.0)

    def start_delegate(self) -> DeleGate:
        self.starts += 1
        kind = {"accept": LINK} if self.role != "delegate-connector" else {"connect": LINK}
        self.delegate = DeleGate(self.binary, self.ns, self.tmp / f"delegate{self.starts}.log",
                                 entrance=DG_ENTRANCE, exit_port=DATA,
                                 name=f"delegate #{self.starts}", **kind)
        self._proc(self.delegate)
        if self.role != "delegate-connector":
            assert wait_for_port(self.ns, LINK), self.logs()
        return self.delegate

    def start_sockmuxd(self) -> NsProc:
        link = (["--connect", f"127.0.0.1:{LINK}", "--reconnect-max", "1s"]
                if self.role == "delegate-receptor" else ["--accept", f"127.0.0.1:{LINK}"])
        self.starts += 1
        self.sockmuxd = self._proc(NsProc(
            f"sockmuxd #{self.starts}", self.ns,
            [PYTHON, "-m", "tcpmuxd.sockmux.daemon", *link, "--no-auth",
             "--entrance", f"127.0.0.1:{SMX_ENTRANCE}", "--exit", f"127.0.0.1:{DATA}",
             "--name", "live", "--stream-log-rate", "1000"],
            self.tmp / f"sockmuxd{self.starts}.log"))
        if self.role == "delegate-connector":
            assert wait_for_port(self.ns, LINK), self.logs()
        return self.sockmuxd

    def wait_link_up(self, after: float, timeout: float = 30.0) -> None:
        """The link is up: sockmuxd says so, or (two DeleGates) a stream gets through."""
        if self.sockmuxd is not None:
            hit = self.sockmuxd.wait_line(r"link \S+: up ", after, timeout)
            assert hit, f"the link did not come up within {timeout} s\n{self.logs()}"
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            (r,) = clients_in(self.ns, [((SMX_ENTRANCE, b"echo\n", b"ping"),
                                         {"close": "after", "expect": 4})])
            if r.data == b"ping":
                return
            time.sleep(0.5)
        raise AssertionError(f"two DeleGates: no stream got through\n{self.logs()}")

    def assert_link_stayed_up(self, since: float) -> None:
        assert self.sockmuxd is not None
        downs = self.sockmuxd.matches(r"link \S+: down: .*", since)
        assert not downs, f"the link went down: {[m.group(0) for m in downs]}\n{self.logs()}"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.text()[-6000:]}" for p in self.procs)

    def close(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop(timeout=5)
            except Exception:  # keep cleaning up
                pass
        delete_namespace(self.ns)


@pytest.fixture(scope="session")
def delegated() -> Path:
    binary, how = find_or_build()
    if binary is None:
        print(f"SKIP (DeleGate interop): {how}")
        pytest.skip(how)
    print(f"DeleGate: {how}")
    return binary


@contextlib.contextmanager
def open_tunnel(binary: Path, role: str, tmp: Path) -> Iterator[Tunnel]:
    t = Tunnel(binary, role, tmp)
    try:
        reason = t.make()
        if reason:
            pytest.skip(reason)
        t.start()
        yield t
    finally:
        t.close()
        if t.sockmuxd is not None:
            assert "Traceback" not in t.sockmuxd.text(), t.sockmuxd.text()


@pytest.fixture(scope="module", params=ROLES)
def tunnel(request, delegated, tmp_path_factory):
    with open_tunnel(delegated, request.param, tmp_path_factory.mktemp(request.param)) as t:
        yield t


@pytest.fixture(params=ROLES)
def fresh_tunnel(request, delegated, tmp_path):
    """A tunnel of the test's own (for tests that stop one side)."""
    with open_tunnel(delegated, request.param, tmp_path) as t:
        yield t


@pytest.fixture
def checked(tunnel):
    """The module's tunnel, checked after the test: the link stayed up, sockmuxd is alive."""
    since = time.monotonic()
    tunnel.server.forget()
    yield tunnel
    tunnel.assert_link_stayed_up(since)
    assert tunnel.sockmuxd is not None and tunnel.sockmuxd.alive(), tunnel.logs()


# --------------------------------------------------------------------------- the matrix

directions = pytest.mark.parametrize("port", DIRECTIONS.values(), ids=DIRECTIONS.keys())


@directions
def test_single_echo(checked, port):
    """One echo. Through a sockmuxd exit, DeleGate's trace of our CONNECTED shows the server
    and our end of the connection to it, as its own CONNECTED names them (not 0.0.0.0:0)."""
    since = time.monotonic()
    (r,) = clients_in(checked.ns, [((port, b"echo\n", b"hello, DeleGate"),
                                    {"close": "after", "expect": 15})])
    assert r.data == b"hello, DeleGate", (r, checked.logs())
    if port == DG_ENTRANCE:
        hit = checked.delegate.wait_line(r"CONNed< L#\d+ <- R#\d+\[98304 (\S+) (\S+)\]", since, 5)
        assert hit, checked.logs()
        server, local = hit[1].groups()
        assert server == f"127.0.0.1:{DATA}" and local.startswith("127.0.0.1:"), hit[1][0]
        assert local != "127.0.0.1:0", hit[1][0]


@directions
def test_sixteen_parallel_1mib_echo_streams(checked, port):
    blobs = [random.Random(i).randbytes((1 << 20) + 4099 * i) for i in range(16)]
    jobs = [((port, b"echo\n", blob), {"close": "after", "expect": len(blob), "keep": 0})
            for blob in blobs]
    results = clients_in(checked.ns, jobs)
    bad = [(i, r) for i, (blob, r) in enumerate(zip(blobs, results))
           if r.count != len(blob) or r.sha != hashlib.sha256(blob).hexdigest()]
    assert not bad, (bad, checked.logs())


@directions
def test_fifty_concurrent_streams(checked, port):
    """50 streams open at the same time (each holds until all 50 got their first answer),
    then each exchanges 64 KiB more and closes."""
    n = 50
    barrier = threading.Barrier(n, timeout=STEP_TIMEOUT)
    results: list[bytes | str] = [b""] * n

    def one(i: int) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
            with s:
                s.sendall(b"echo\nfirst %02d|" % i)
                got = recv_exactly(s, 9)
                barrier.wait()  # all 50 are open now
                more = random.Random(i).randbytes(65536)
                s.sendall(more)
                results[i] = got + recv_exactly(s, len(more))
        except (OSError, threading.BrokenBarrierError) as exc:
            results[i] = repr(exc)

    threads = [threading.Thread(target=in_netns, args=(checked.ns, lambda i=i: one(i), 120))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(130)
    bad = [i for i in range(n)
           if results[i] != b"first %02d|" % i + random.Random(i).randbytes(65536)]
    assert not bad, ([results[i] if isinstance(results[i], str) else len(results[i])
                      for i in bad], checked.logs())


@directions
def test_64mib_upload_byte_exact(checked, port):
    blob = random.Random(64).randbytes(BIG)
    (r,) = clients_in(checked.ns, [((port, b"upload %d\n" % BIG, blob), {})])
    want = f"{hashlib.sha256(blob).hexdigest()} {BIG}\n".encode()
    assert r.data == want and r.how == "eof", (r, checked.logs())
    _record(checked.role, port, "upload", r.seconds)


@directions
def test_64mib_download_byte_exact(checked, port):
    (r,) = clients_in(checked.ns, [((port, b"download %d 7\n" % BIG), {"keep": 0})])
    assert r.how == "eof" and r.count == BIG, (r, checked.logs())
    assert r.sha == hashlib.sha256(random.Random(7).randbytes(BIG)).hexdigest()
    _record(checked.role, port, "download", r.seconds)


@directions
def test_server_closes_first(checked, port):
    """The server sends 300 KiB and closes: the client gets all of it, then a plain EOF."""
    n = 300 * 1024
    (r,) = clients_in(checked.ns, [((port, b"download %d 3\n" % n), {})])
    assert r.how == "eof" and r.data == random.Random(3).randbytes(n), (r.how, r.count)
    (end,) = checked.server.wait_end("download")
    assert end["how"] == "eof", end


@directions
def test_client_closes_first(checked, port):
    """The client sends 300 KiB and closes its socket at once: the server reads all of it,
    then a plain EOF (not a reset, nothing lost)."""
    blob = random.Random(5).randbytes(300 * 1024)
    (r,) = clients_in(checked.ns, [((port, b"sink\n", blob), {"close": "full"})])
    assert r.how == "closed", r
    (end,) = checked.server.wait_end("sink")
    assert end == {"mode": "sink", "how": "eof", "bytes": len(blob),
                   "sha": hashlib.sha256(blob).hexdigest()}, (end, checked.logs())


@directions
def test_client_half_close_still_gets_the_reply(checked, port):
    """The client sends its request and shuts down writing at once; the server answers it
    right away. Plain SockMux has no half-close: the client's EOF ends the stream both ways
    (CLOSE), and DeleGate reads its client only after CONNECTED, so the answer gets through
    only inside CONNECTED, which is what DeleGate does and sockmuxd does towards it (the
    exit waits --first-data-wait for the server's first bytes)."""
    results = clients_in(checked.ns, [((port, b"reply\n" + b"x" * 100),
                                       {"close": "shut", "fastopen": True}) for _ in range(5)])
    assert [r.data for r in results] == [b"reply to reply\n"] * 5, checked.logs()


@directions
def test_more_streams_than_delegates_table_and_the_link_survives(checked, port):
    """70 streams at once: DeleGate's 64-slot table holds about 60. The excess is refused
    (the client sees its connection closed or reset, with nothing in it), every stream that
    was admitted works to the end, the link stays up, and afterwards streams work again."""
    n = OVER_TABLE
    barrier = threading.Barrier(n + 1, timeout=STEP_TIMEOUT)
    outcome: list[str] = [""] * n

    def one(i: int) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
        except OSError as exc:  # refused so fast that the reset beat the connect's end
            outcome[i] = f"refused ({_ending(exc)} at connect)"
            barrier.wait()
            return
        with s:
            try:
                s.sendall(b"echo\nhello %02d\n" % i)
                first = "ok" if recv_exactly(s, 9) == b"hello %02d\n" % i else "refused"
            except OSError as exc:
                first = f"refused ({_ending(exc)})"
            barrier.wait()  # hold every stream until all 70 were tried
            if first != "ok":
                outcome[i] = first
                return
            try:
                s.sendall(b"again %02d\n" % i)
                got = recv_exactly(s, 9)
                outcome[i] = "ok" if got == b"again %02d\n" % i else f"broken {got!r}"
            except OSError as exc:
                outcome[i] = f"broken ({_ending(exc)})"

    threads = [threading.Thread(target=in_netns, args=(checked.ns, lambda i=i: one(i), 120))
               for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join(60)
    ok = outcome.count("ok")
    print(f"{OVER_TABLE} streams at once: {ok} served, "
          f"{sum(o.startswith('refused') for o in outcome)} refused")
    assert all(o == "ok" or o.startswith("refused") for o in outcome), \
        [o for o in outcome if o != "ok"]
    assert 50 <= ok <= 64, (outcome, checked.logs())
    if port == SMX_ENTRANCE:  # we refused the excess ourselves, and said why
        assert checked.sockmuxd.wait_line(r"refused: stream limit reached", 0, 5), \
            checked.logs()
    else:  # DeleGate sent CONNECTs without a stream id: refused one by one, logged
        assert checked.sockmuxd.wait_line(r"refused: Too many streams", 0, 5), checked.logs()
    _echo_once(checked, port)


def _echo_once(t: Tunnel, port: int, within: float = 5.0) -> None:
    """One echo gets through within ``within`` seconds (streams just closed may still hold
    their slots while their CLOSE and CLOSED cross)."""
    deadline = time.monotonic() + within
    while True:
        (r,) = clients_in(t.ns, [((port, b"echo\n", b"once more"),
                                  {"close": "after", "expect": 9})])
        if r.data == b"once more" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.data == b"once more", (r, t.logs())


# --------------------------------------------------------------------------- restarts


@pytest.mark.parametrize("restart", ["delegate", "sockmuxd"])
def test_restart_of_either_side_and_the_link_comes_back(fresh_tunnel, restart):
    """One side stops (SIGTERM) and starts again: the streams of the old link end (never
    hang), the connector re-dials, and streams work again both ways."""
    t = fresh_tunnel
    for port in DIRECTIONS.values():
        _echo_once(t, port)
    since = time.monotonic()
    if restart == "delegate":
        t.delegate.stop()
        assert t.sockmuxd is not None
        assert t.sockmuxd.wait_line(r"link \S+: down: ", since, 20), t.logs()
        t.start_delegate()
    else:
        assert t.sockmuxd is not None
        assert t.sockmuxd.stop() is not None
        assert t.sockmuxd.wait_line(r"stopping", since, 1), t.logs()
        t.start_sockmuxd()
    t.wait_link_up(since, timeout=45)
    for port in DIRECTIONS.values():  # a DeleGate connector re-dials every few seconds
        _echo_once(t, port, within=30)


# --------------------------------------------------------------------------- figures


def _record(role: str, port: int, what: str, seconds: float) -> None:
    pair = {"delegate-receptor": "DeleGate receptor + sockmuxd connector",
            "delegate-connector": "sockmuxd receptor + DeleGate connector",
            "delegate-pair": "DeleGate + DeleGate"}[role]
    where = "DeleGate" if port == DG_ENTRANCE else (
        "DeleGate #2" if role == "delegate-pair" else "sockmuxd")
    THROUGHPUT.append((pair, f"{what}, entering at {where}", BIG / seconds / 1e6))


def test_delegate_pair_throughput(delegated, tmp_path):
    """The same 64 MiB streams between two DeleGates: the yardstick for the mixed pairs."""
    with open_tunnel(delegated, "delegate-pair", tmp_path) as t:
        for port in DIRECTIONS.values():
            blob = random.Random(64).randbytes(BIG)
            (r,) = clients_in(t.ns, [((port, b"upload %d\n" % BIG, blob), {})])
            assert r.data == f"{hashlib.sha256(blob).hexdigest()} {BIG}\n".encode(), r
            _record(t.role, port, "upload", r.seconds)
            (r,) = clients_in(t.ns, [((port, b"download %d 7\n" % BIG), {"keep": 0})])
            assert r.count == BIG, r
            _record(t.role, port, "download", r.seconds)
