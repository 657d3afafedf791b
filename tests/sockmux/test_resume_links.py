"""Resumption over the other kinds of link, live: TLS, and a command link (--command).

test_netns_resume.py cuts a plain TCP link between two namespaces; here two sockmuxd on
loopback, with 8 streams of 32 MiB through them (each echoed back), lose their link
mid-transfer and carry on over the next one:

* TLS: the test's relay between them is killed (both sockets reset) and started again; the
  new link is a new TLS session, authenticated, then resumed; and a receptor stopped cleanly
  ends the session over TLS (no half-close there), its streams reset at once;
* a command link: the connector's command (a stdio-to-TCP bridge of the test's own, toward
  the receptor) is killed; the connector runs it again, and the new link resumes.

A FIFO or serial link has no third party to lose: it ends only when a peer process does, and
a restarted peer has lost its session (reset at once: test_connection_resume.py).

Every stream is checked end to end (SHA-256, nothing lost or repeated, none reset). Every
wait is bounded; the processes are stopped whatever happens.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from relay import Relay
from test_daemon import Proc, echo, free_port, procs, secret, start  # noqa: F401 (fixtures)
from test_netns import Client

STREAMS = 8
SIZE = 32 << 20
#: Between a stream's 1 MiB pieces: on loopback a stream would take 0.2 s, and some could end
#: before the cut; this way each is in flight for 1.5 s at least.
GAP = 0.05
#: A test's own bound on the whole transfer once the link is back (a few seconds here).
FINISH = 120.0

#: The command link's far end: stdin to a TCP connection and that connection to stdout; the
#: test kills it (SIGKILL) to lose the link.
BRIDGE = r"""
import os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
"""


def common(secret_path: str, echo_port: int) -> list[str]:
    return ["--secret", secret_path, "--resume-timeout", "30s", "--keepalive", "1s",
            "--dead-peer", "5s", "--exit", f"127.0.0.1:{echo_port}"]


def resumed(connector: Proc) -> None:
    """The connector says it resumed the session with every stream in it."""
    hit = connector.wait_for_match(r"session resumed, (\d+) streams? carried on", 15)
    assert int(hit[1]) == STREAMS, connector.text()


def start_streams(port: int, label: str) -> list[Client]:
    """STREAMS echo streams through the entrance ``port``, once each has moved some data."""
    clients = [Client(None, "E", f"{label}{i:02d}", SIZE + i * 4099, port=port, gap=GAP)
               for i in range(STREAMS)]
    for c in clients:
        c.start()
    deadline = time.monotonic() + 30
    while not all(c.received > (256 << 10) for c in clients):
        assert time.monotonic() < deadline, f"the streams did not get going: {clients}"
        time.sleep(0.02)
    assert not any(c.ended for c in clients), clients
    return clients


def finish(clients: list[Client], procs: list[Proc]) -> None:
    for c in clients:
        c.join(FINISH)
    assert not any(c.is_alive() for c in clients), clients
    broken = [c for c in clients if not c.intact]
    assert not broken, (broken, [p.text() for p in procs])


class TlsPair:
    """A receptor and a connector over TLS, the test's relay between them."""

    def __init__(self, procs: list[Proc], tmp_path: Path, echo_port: int, secret: str,
                 certs) -> None:
        self.link, self.relay_port, self.entrance = free_port(), free_port(), free_port()
        self.receptor = start(procs, tmp_path, "receptor", [
            "--accept", f"127.0.0.1:{self.link}", "--tls-cert", certs.server_cert,
            "--tls-key", certs.server_key, "--tls-ca", certs.ca, *common(secret, echo_port)])
        self.relay = self.start_relay()
        self.connector = start(procs, tmp_path, "connector", [
            "--connect", f"127.0.0.1:{self.relay_port}", "--tls-ca", certs.ca, "--tls-cert",
            certs.client_cert, "--tls-key", certs.client_key, "--tls-server-name",
            "localhost", "--entrance", f"127.0.0.1:{self.entrance}", "--reconnect-max", "1s",
            *common(secret, echo_port)])
        self.connector.wait_for_match(r"up \(authenticated\)", 20)

    def start_relay(self) -> Relay:
        self.relay = Relay(("127.0.0.1", self.relay_port), ("127.0.0.1", self.link))
        self.relay.start_listening()
        return self.relay


@pytest.fixture
def tls_pair(procs, tmp_path, echo, secret, sockmux_certs):
    pair: TlsPair | None = None
    try:
        pair = TlsPair(procs, tmp_path, echo.port, secret, sockmux_certs)
        yield pair
    finally:
        if pair is not None:
            pair.relay.kill()


def test_streams_survive_a_reset_tls_link(tls_pair, procs):
    p = tls_pair
    clients = start_streams(p.entrance, "t")
    p.relay.kill()
    p.connector.wait_for_match(r"streams? suspended", 10)
    p.receptor.wait_for_match(r"streams? suspended", 10)
    time.sleep(1.0)  # the outage
    p.start_relay()
    resumed(p.connector)
    finish(clients, procs)
    after = re.split(r"streams? suspended", p.connector.text(), maxsplit=1)[1]
    assert not re.search(r"streams reset|, reset|: down:", after), p.connector.text()


def test_a_receptor_stopped_over_tls_ends_the_session_at_once(tls_pair):
    """TLS has no half-close: the stopping receptor sends RESUME E and reads until the
    connector, having reset its streams, closes the link."""
    p = tls_pair
    clients = start_streams(p.entrance, "q")
    t_stop = time.monotonic()
    assert p.receptor.stop() == 0
    hit = p.connector.wait_for_match(r"the peer ended the session \(sockmuxd is shutting "
                                     r"down\): (\d+) streams? reset", 5)
    assert int(hit[1]) == STREAMS, p.connector.text()
    for c in clients:
        c.join(30)
    assert all(c.kind == "reset" and c.ended - t_stop < 5 for c in clients), clients
    assert "suspended" not in p.connector.text(), p.connector.text()


def bridges(script: str) -> list[int]:
    """Pids of the running bridges of this test: processes that run ``script`` (not the
    connector, whose --command names it too)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            argv = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or gone meanwhile
            continue
        if len(argv) > 1 and argv[1] == os.fsencode(script):
            found.append(int(pid))
    return found


def test_streams_survive_a_command_link_whose_command_dies(procs, tmp_path, echo, secret):
    link, entrance = free_port(), free_port()
    receptor = start(procs, tmp_path, "receptor", [
        "--accept", f"127.0.0.1:{link}", *common(secret, echo.port)])
    receptor.wait_for_match("waiting for the peer", 20)
    bridge = tmp_path / f"bridge-{link}.py"  # its path is this test's marker for pgrep
    bridge.write_text(BRIDGE)
    connector = start(procs, tmp_path, "connector", [
        "--command", f"{sys.executable} {bridge} 127.0.0.1 {link}",
        "--entrance", f"127.0.0.1:{entrance}", "--reconnect-max", "1s",
        *common(secret, echo.port)])
    try:
        connector.wait_for_match(r"up \(authenticated\)", 20)
        clients = start_streams(entrance, "c")
        (first,) = bridges(str(bridge))
        os.kill(first, signal.SIGKILL)
        connector.wait_for_match(r"streams? suspended", 10)
        resumed(connector)
        assert bridges(str(bridge)) and first not in bridges(str(bridge))
        finish(clients, procs)
    finally:
        for pid in bridges(str(bridge)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
