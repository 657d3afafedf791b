"""sockmuxd between two "hosts": network namespaces made by the test, joined by a veth pair.

Host A (namespace ``smx-a-<pid>-<n>``, 10.213.0.1/30) runs the receptor and a data server on
its own loopback; host B (``smx-b-<pid>-<n>``, 10.213.0.2/30) runs the connector with an
entrance on its loopback. Clients in B (threads that enter B with setns) open several streams
at once; the data server either answers with the SHA-256 and the byte count of what it read
(mode "H") or echoes (mode "E"), so every finished stream is checked end to end.

Mid-transfer the link is lost:

* silently (the veth in B is set down: no FIN, no RST): only --dead-peer notices it;
* loudly (the receptor gets SIGKILL): the connector sees the reset at once.

Either way every stream in flight must end on both sides (the client sees EOF or a reset, so
does the data server) within a bound, both daemons must log the loss with its reason, the
connector must re-establish the link once the other side is back, and new streams must work
again.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): skipped, with the reason, where ``ip netns add``
or a veth pair is not allowed. Only the namespaces made here are touched, never the host's own
interfaces or routes; they are deleted at the end of each test, whatever happened. Every wait
is bounded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_harness import (
    NETNS_DIR, NsProc, add_namespace, delete_namespace, enter_netns, in_netns, ip,
    namespace_name,
)
from tcpmuxd_harness import Notify

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DAEMON = [PYTHON, "-m", "tcpmuxd.sockmux.daemon"]

ADDR_A, ADDR_B, PREFIX = "10.213.0.1", "10.213.0.2", 30  # test-only, inside our namespaces
VETH_A, VETH_B = "smx-veth-a", "smx-veth-b"
LINK_PORT, ENTRANCE_PORT, DATA_PORT = 7000, 7001, 9000  # fresh namespaces: no clashes

KEEPALIVE = 1.0
DEAD_PEER = 3.0
RECONNECT_MAX = 1.0
HOLD = 1.0
SLACK = 4.0
#: A silent cut: the dead-peer timer must have fired, and everything been closed, by then.
CUT_BOUND = DEAD_PEER + SLACK
#: A killed peer is seen at once (a reset or EOF on the link), far sooner than --dead-peer.
KILL_BOUND = 2.5
#: From the peer being reachable again to the link being up.
RECONNECT_BOUND = RECONNECT_MAX + 5.0
#: From a daemon's first log line about an event to its last one reaching the test.
LOG_SLACK = 2.0
CLIENT_TIMEOUT = 20.0  # no socket operation of a client waits longer than this
STREAMS = 4
SIZE = 1 << 20

# The data server, run in host A. Per connection, the first byte says the mode: "H" reads until
# EOF then answers "<sha256 hex> <count>\n"; "E" echoes. The first 16 bytes are the stream's
# tag. It reports on stdout, one JSON object a line: listening, data (64 KiB received), end
# (how its input ended: eof / reset / timeout / error ...; whether the reply went out), each
# with its monotonic time.
DATA_SERVER = r"""
import hashlib, json, socket, sys, threading, time
lock = threading.Lock()
def emit(**ev):
    ev["t"] = time.monotonic()
    with lock:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()
def handle(conn, n):
    conn.settimeout(30)
    h, count, tag, told, how = hashlib.sha256(), 0, b"", False, "eof"
    try:
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            if len(tag) < 16:
                tag += chunk[:16 - len(tag)]
            h.update(chunk)
            count += len(chunk)
            if tag[:1] == b"E":
                conn.sendall(chunk)
            if not told and count >= 65536:
                told = True
                emit(ev="data", conn=n, tag=tag.decode("ascii", "replace"))
    except (ConnectionResetError, BrokenPipeError):
        how = "reset"
    except socket.timeout:
        how = "timeout"
    except OSError as exc:
        how = f"error {exc}"
    reply = "-"
    if how == "eof":  # the answer (H), then our EOF; the client may be gone by now
        try:
            if tag[:1] == b"H":
                conn.sendall(f"{h.hexdigest()} {count}\n".encode())
            conn.shutdown(socket.SHUT_WR)
            reply = "sent"
        except OSError as exc:
            reply = f"failed: {exc}"
    conn.close()
    emit(ev="end", conn=n, tag=tag.decode("ascii", "replace"), how=how, bytes=count,
         reply=reply)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(128)
emit(ev="listening")
n = 0
while True:
    conn, _ = srv.accept()
    n += 1
    threading.Thread(target=handle, args=(conn, n), daemon=True).start()
"""


class DataServer(NsProc):
    def __init__(self, ns: str, port: int, log: Path) -> None:
        self.events: list[dict] = []
        super().__init__("data server", ns, [PYTHON, "-u", "-c", DATA_SERVER, str(port)], log)

    def on_line(self, now: float, line: str) -> None:
        try:
            ev = json.loads(line)
        except ValueError:
            return
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    def wait_events(self, pred, timeout: float) -> list[dict]:
        """Wait until ``pred(events)`` is true (or the time is up); the events then."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(min(left, 0.2))
            return list(self.events)


# --------------------------------------------------------------------------- clients


#: The random block a finite stream repeats: a prime number of bytes, so no frame or window
#: size divides it, and a loss or repetition in the stream shows in its length or its SHA-256
#: (which the check compares) unless it were exactly a multiple of this, twice over.
PATTERN_BLOCK = (1 << 20) + 7


def pattern(size: int, step: int) -> Iterator[memoryview]:
    """``size`` bytes in pieces of at most ``step``: one fresh random block repeated, so a
    stream of 32 MiB holds 1 MiB of memory rather than 32."""
    block = os.urandom(PATTERN_BLOCK)
    doubled = memoryview(block + block)
    at = 0
    while size > 0:
        n = min(step, size, PATTERN_BLOCK)
        yield doubled[at:at + n]
        at = (at + n) % PATTERN_BLOCK
        size -= n


class Client(threading.Thread):
    """One stream from host B: enters B (``ns``; None: stays where the test runs), connects
    to the entrance (``port`` on 127.0.0.1), sends a 16-byte tag then ``size`` random bytes
    (None: without end, 64 KiB every ``pace`` seconds, until the stream dies or ``halt()``;
    a finite size goes in 1 MiB pieces, ``gap`` seconds apart: so long in flight at least),
    half-closes, and reads what comes back meanwhile.

    Once the thread has ended, ``kind`` is how the stream ended as the client saw it: reset
    (a reset on either the reading or the sending side: a socket reports its reset only once,
    to whichever call comes first, and a read after that sees EOF), eof, timeout, connect:
    ..., error: ...; ``ended`` is when (monotonic) the first sign of the end came."""

    def __init__(self, ns: str | None, mode: str, label: str, size: int | None,
                 pace: float = 0.005, port: int = ENTRANCE_PORT, gap: float = 0.0) -> None:
        super().__init__(daemon=True, name=f"client-{label}")
        assert mode in ("H", "E")
        self.ns, self.mode, self.size, self.pace, self.port = ns, mode, size, pace, port
        self.gap = gap
        self.tag = (mode + label + "." * 16)[:16]
        self.kind: str | None = None
        self.ended: float | None = None
        self.signs: list[tuple[float, str, str]] = []  # (time, kind, reader/sender)
        self.sent = 0
        self.sent_hash = hashlib.sha256()
        self.received = 0
        self.received_hash = hashlib.sha256()
        self.reply = b""
        self.sock: socket.socket | None = None
        self._halt = threading.Event()
        self._read_done = threading.Event()

    def halt(self) -> None:
        self._halt.set()
        s = self.sock
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _sign(self, kind: str, who: str) -> None:
        if not self._halt.is_set():
            self.signs.append((time.monotonic(), kind, who))

    @staticmethod
    def _classify(exc: OSError) -> str:
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            return "reset"
        if isinstance(exc, TimeoutError):
            return "timeout"
        return f"error: {exc!r}"

    def _read(self) -> None:
        s = self.sock
        assert s is not None
        try:
            while True:
                chunk = s.recv(1 << 16)
                if not chunk:
                    self._sign("eof", "reader")
                    break
                self.received += len(chunk)
                if self.mode == "E":
                    self.received_hash.update(chunk)
                elif len(self.reply) < 200:
                    self.reply += chunk
        except OSError as exc:
            self._sign(self._classify(exc), "reader")
        finally:
            self._read_done.set()

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)
        self.sent += len(data)
        self.sent_hash.update(data)

    def run(self) -> None:
        try:
            if self.ns is not None:
                enter_netns(self.ns)
            self.sock = socket.create_connection(("127.0.0.1", self.port),
                                                 timeout=CLIENT_TIMEOUT)
        except OSError as exc:
            self.kind, self.ended = f"connect: {exc!r}", time.monotonic()
            return
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        try:
            self._send(self.tag.encode())
            if self.size is not None:
                for piece in pattern(self.size, 1 << 20):
                    self._send(piece)
                    if self.gap:
                        time.sleep(self.gap)
                self.sock.shutdown(socket.SHUT_WR)
            else:
                block = os.urandom(1 << 16)
                while not self._halt.is_set() and not self._read_done.is_set():
                    self._send(block)
                    time.sleep(self.pace)
        except OSError as exc:
            self._sign(self._classify(exc), "sender")
        reader.join(CLIENT_TIMEOUT + 5)
        if reader.is_alive():
            self._sign("hung (reader still running)", "reader")
        self.sock.close()
        signs = list(self.signs)
        if signs:
            kinds = [k for _t, k, _w in signs]
            self.kind = "reset" if "reset" in kinds else kinds[0]
            self.ended = min(t for t, _k, _w in signs)
        else:
            self.kind, self.ended = "halted", time.monotonic()

    @property
    def intact(self) -> bool:
        """The stream finished normally and the data server saw exactly what was sent."""
        if [k for _t, k, _w in self.signs] != ["eof"]:
            return False
        if self.mode == "E":
            return (self.received == self.sent
                    and self.received_hash.digest() == self.sent_hash.digest())
        return self.reply == f"{self.sent_hash.hexdigest()} {self.sent}\n".encode()

    def __repr__(self) -> str:
        signs = [(f"{t:.3f}", k, w) for t, k, w in self.signs]
        return (f"<Client {self.tag} kind={self.kind} sent={self.sent} "
                f"received={self.received} signs={signs} reply={self.reply!r}>")


def run_streams(ns: str, label: str, streams: int = STREAMS, size: int = SIZE) -> list[Client]:
    """``streams`` concurrent finite streams, half hashed, half echoed; all must be intact."""
    clients = [Client(ns, "HE"[i % 2], f"{label}{i}", size + i * 4099)
               for i in range(streams)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(CLIENT_TIMEOUT * 2)
    assert all(c.intact for c in clients), clients
    return clients


# --------------------------------------------------------------------------- the two hosts


class Hosts:
    """Namespaces A and B with a veth pair, the data server and the receptor in A, the
    connector in B."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.a = namespace_name("smx-a")
        self.b = namespace_name("smx-b")
        self.procs: list[NsProc] = []
        self.notifies: list[Notify] = []
        self.clients: list[Client] = []
        self.timings: dict[str, float] = {}
        self.secret = tmp / "secret"
        self.secret.write_text("0123456789abcdef0123456789abcdef\n")
        self.secret.chmod(0o600)
        self.server: DataServer
        self.receptor: NsProc
        self.connector: NsProc
        self.connector_notify: Notify

    # -- set-up, or the reason it is not possible here ------------------------------------

    def make_network(self) -> str | None:
        """Build the network; a reason to skip when this machine does not allow it."""
        for ns in (self.a, self.b):
            reason = add_namespace(ns)
            if reason:
                return reason
        out = ip("-n", self.a, "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B,
                 "netns", self.b, check=False)
        if out.returncode != 0:
            return f"cannot create a veth pair: {out.stderr.strip()}"
        for ns, dev, addr in ((self.a, VETH_A, ADDR_A), (self.b, VETH_B, ADDR_B)):
            ip("-n", ns, "addr", "add", f"{addr}/{PREFIX}", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        names = [name for _i, name in in_netns(self.b, socket.if_nameindex)]
        if VETH_B not in names:
            return f"setns did not move the thread into {self.b} (sees {names})"
        return None

    def daemon_args(self, role: str) -> list[str]:
        # Without resumption: these tests are about a lost link ending its streams
        # (test_netns_resume.py has them outlive it).
        common = ["--secret", str(self.secret), "--keepalive", f"{KEEPALIVE:g}",
                  "--dead-peer", f"{DEAD_PEER:g}", "--connect-timeout", "2s",
                  "--resume-timeout", "0", "--name", role]
        if role == "receptor":
            return [*DAEMON, "--accept", f"{ADDR_A}:{LINK_PORT}",
                    "--exit", f"127.0.0.1:{DATA_PORT}", *common]
        return [*DAEMON, "--connect", f"{ADDR_A}:{LINK_PORT}",
                "--entrance", f"127.0.0.1:{ENTRANCE_PORT}", "--reconnect-max",
                f"{RECONNECT_MAX:g}s", "--hold", f"{HOLD:g}s", *common]

    def start_receptor(self, label: str = "receptor") -> tuple[NsProc, Notify]:
        notify = Notify(self.tmp / f"{label}.notify")
        self.notifies.append(notify)
        p = NsProc(label, self.a, self.daemon_args("receptor"), self.tmp / f"{label}.log",
                   env={"NOTIFY_SOCKET": notify.path})
        self.procs.append(p)
        self.receptor = p
        return p, notify

    def start(self) -> None:
        self.server = DataServer(self.a, DATA_PORT, self.tmp / "data-server.log")
        self.procs.append(self.server)
        assert self.server.wait_line('"listening"', 0, 15), self.server.text()
        t0 = time.monotonic()
        _receptor, receptor_notify = self.start_receptor()
        self.connector_notify = Notify(self.tmp / "connector.notify")
        self.notifies.append(self.connector_notify)
        self.connector = NsProc("connector", self.b, self.daemon_args("connector"),
                                self.tmp / "connector.log",
                                env={"NOTIFY_SOCKET": self.connector_notify.path})
        self.procs.append(self.connector)
        for who, notify in (("connector", self.connector_notify),
                            ("receptor", receptor_notify)):
            ready = notify.wait("READY=1", 0, 20)
            assert ready, f"{who}: no READY=1 within 20 s\n{self.logs()}"
            up = notify.wait("STATUS=link up", 0, 20)  # READY=1 came before the link
            assert up, f"{who}: no link up within 20 s\n{self.logs()}"
        self.timings["start to READY"] = time.monotonic() - t0

    # -- actions and checks ---------------------------------------------------------------

    def client(self, mode: str, label: str, size: int | None) -> Client:
        c = Client(self.b, mode, label, size)
        self.clients.append(c)
        c.start()
        return c

    def in_flight(self, label: str, streams: int = STREAMS) -> list[Client]:
        """``streams`` endless streams (half hashed, half echoed), each with at least 64 KiB
        through to the data server."""
        clients = [self.client("HE"[i % 2], f"{label}{i}", None) for i in range(streams)]
        tags = {c.tag for c in clients}
        events = self.server.wait_events(
            lambda evs: tags <= {e.get("tag") for e in evs if e["ev"] == "data"}, 15)
        seen = {e.get("tag") for e in events if e["ev"] == "data"}
        assert tags <= seen, (clients, events, self.logs())
        time.sleep(0.3)  # well into the transfer
        assert all(c.is_alive() and not c.signs for c in clients), clients
        return clients

    def assert_all_ended(self, clients: list[Client], since: float, bound: float,
                         what: str) -> None:
        """Every client and its data-server connection ended (EOF or reset, nothing else)
        within ``bound`` seconds of ``since``."""
        for c in clients:
            c.join(max(0.0, since + bound + 2 - time.monotonic()))
        tags = {c.tag for c in clients}
        events = self.server.wait_events(
            lambda evs: tags <= {e.get("tag") for e in evs if e["ev"] == "end"},
            max(0.0, since + bound - time.monotonic()))
        ends = {e["tag"]: e for e in events if e["ev"] == "end" and e.get("tag") in tags}
        diag = f"{what}\nclients {clients}\nserver ends {ends}\n{self.logs()}"
        for c in clients:
            assert not c.is_alive(), f"client {c.tag} still open {bound} s after: {diag}"
            assert c.kind in ("eof", "reset"), f"client {c.tag} ended by {c.kind}: {diag}"
            assert c.ended is not None and c.ended - since <= bound, \
                f"client {c.tag} ended after {c.ended - since:.2f} s > {bound} s: {diag}"
            assert c.tag in ends, f"the data server never saw {c.tag} end: {diag}"
            end = ends[c.tag]
            assert end["how"] in ("eof", "reset"), f"data server: {end}: {diag}"
            assert end["t"] - since <= bound, \
                f"data server saw {c.tag} end after {end['t'] - since:.2f} s: {diag}"
        slowest_client = max(c.ended for c in clients) - since  # type: ignore[type-var]
        slowest_server = max(ends[c.tag]["t"] for c in clients) - since
        self.timings[f"{what}: clients ended within"] = slowest_client
        self.timings[f"{what}: data server saw the end within"] = slowest_server
        print(f"{what}: clients {[c.kind for c in clients]}, data server "
              f"{[ends[c.tag]['how'] for c in clients]}")

    def link_down(self, proc: NsProc, since: float, bound: float) -> tuple[float, str, int]:
        """The daemon logged the link going down, with its reason: (time, reason, streams)."""
        hit = proc.wait_line(r"link \S+: down: (.+?) \((\d+) streams reset, up \d+ s\)",
                             since, max(0.0, since + bound - time.monotonic()))
        assert hit, f"no 'link ... down: REASON' within {bound} s\n{self.logs()}"
        t, m = hit
        assert m.group(1).strip(), m.group(0)
        return t, m.group(1), int(m.group(2))

    def link_up(self, proc: NsProc, since: float, bound: float) -> float:
        hit = proc.wait_line(r"link \S+: up \(authenticated\)", since,
                             max(0.0, since + bound - time.monotonic()))
        assert hit, f"the link is not up again within {bound} s\n{self.logs()}"
        return hit[0]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (netns {p.ns})\n{p.text()}" for p in self.procs)

    # -- the end, whatever happened --------------------------------------------------------

    def close(self) -> None:
        for c in self.clients:
            c.halt()
        for c in self.clients:
            c.join(5)
        for p in reversed(self.procs):
            try:
                p.stop(timeout=5)
            except Exception:  # keep cleaning up
                pass
        for n in self.notifies:
            n.close()
        for ns in (self.a, self.b):
            delete_namespace(ns)


@pytest.fixture
def hosts(tmp_path):
    h = Hosts(tmp_path)
    try:
        reason = h.make_network()
        if reason:
            print(f"SKIP: {reason}")
            pytest.skip(reason)
        h.start()
        yield h
    finally:
        h.close()
        for p in h.procs:
            argv = shlex.join(a if "\n" not in a else "SCRIPT" for a in p.argv)
            print(f"--- {p.name}: ip netns exec {p.ns} {argv}\n{p.text()}")
        print("timings (s):", ", ".join(f"{k} {v:.2f}" for k, v in h.timings.items()))
        assert not [ns for ns in (h.a, h.b) if (NETNS_DIR / ns).exists()], "netns left behind"


# --------------------------------------------------------------------------- the tests


def test_silent_cut_closes_every_stream_and_the_link_comes_back(hosts):
    """The veth in B goes down mid-transfer (no FIN, no RST): the dead-peer timer ends the
    link on both sides and resets every stream; once the veth is up again the connector
    re-establishes the link and new streams are intact."""
    h = hosts
    run_streams(h.b, "before")
    flying = h.in_flight("cut")

    t_cut = time.monotonic()
    ip("netns", "exec", h.b, "ip", "link", "set", VETH_B, "down")
    h.assert_all_ended(flying, t_cut, CUT_BOUND, "silent cut")

    for who, proc in (("connector", h.connector), ("receptor", h.receptor)):
        t, reason, streams = h.link_down(proc, t_cut, CUT_BOUND)
        h.timings[f"silent cut: {who} logged the loss after"] = t - t_cut
        print(f"{who}: link down after {t - t_cut:.2f} s: {reason} ({streams} streams)")
        assert reason.startswith("peer dead: nothing received for"), reason
        assert t - t_cut >= DEAD_PEER - KEEPALIVE, "noticed before any dead-peer timer could"
        assert streams >= STREAMS
        # each stream in flight is logged as ended by the link loss
        ended = proc.wait_matches(r"stream \d+: .*link down: peer dead", t_cut, STREAMS,
                                  LOG_SLACK)
        assert len(ended) >= STREAMS, proc.text()
    assert h.connector_notify.wait("STATUS=link down", t_cut, CUT_BOUND + 2), \
        h.connector_notify.messages

    # while the link is down, a new stream waits --hold, then is reset: it does not hang
    t_held = time.monotonic()
    held = h.client("H", "outage", 1000)
    held.join(HOLD + SLACK)
    assert not held.is_alive() and held.kind in ("eof", "reset") and not held.intact, held
    assert held.ended is not None
    h.timings["outage: new stream refused after"] = held.ended - t_held
    assert held.ended - t_held <= HOLD + SLACK

    t_restore = time.monotonic()
    ip("netns", "exec", h.b, "ip", "link", "set", VETH_B, "up")
    t_up = h.link_up(h.connector, t_restore, RECONNECT_BOUND)
    h.link_up(h.receptor, t_restore, RECONNECT_BOUND)
    h.timings["silent cut: link up again after restore"] = t_up - t_restore
    assert h.connector_notify.wait("STATUS=link up", t_restore, RECONNECT_BOUND + 2), \
        h.connector_notify.messages
    run_streams(h.b, "after")
    for p in (h.connector, h.receptor):
        assert p.alive() and "Traceback" not in p.text(), p.text()


def test_killed_receptor_resets_every_stream_and_the_link_comes_back(hosts):
    """The receptor gets SIGKILL mid-transfer: the connector sees the link reset at once (not
    the dead-peer timer), every stream ends on both sides; a new receptor is dialled again and
    new streams are intact."""
    h = hosts
    run_streams(h.b, "before")
    flying = h.in_flight("kill")

    t_kill = time.monotonic()
    h.receptor.kill()
    h.assert_all_ended(flying, t_kill, KILL_BOUND, "receptor killed")

    t, reason, streams = h.link_down(h.connector, t_kill, KILL_BOUND)
    h.timings["receptor killed: connector logged the loss after"] = t - t_kill
    print(f"connector: link down after {t - t_kill:.2f} s: {reason} ({streams} streams)")
    assert not reason.startswith("peer dead"), reason
    assert streams >= STREAMS
    assert len(h.connector.wait_matches(r"stream \d+: .*link down: ", t_kill, STREAMS,
                                        LOG_SLACK)) >= STREAMS

    t_restart = time.monotonic()
    receptor2, notify2 = h.start_receptor("receptor2")
    up = notify2.wait("STATUS=link up", t_restart, RECONNECT_BOUND + 5)
    assert up, h.logs()
    t_up = h.link_up(h.connector, t_restart, RECONNECT_BOUND + 5)
    h.timings["receptor killed: link up again after the restart"] = t_up - t_restart
    run_streams(h.b, "after")
    for p in (h.connector, receptor2):
        assert p.alive() and "Traceback" not in p.text(), p.text()
