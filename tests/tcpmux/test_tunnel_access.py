"""Access rules for streams that come through a SockMux tunnel, between two "hosts".

Host B (the entrance: a network namespace made here) runs a sockmuxd connector with an entrance;
host A (the exit) runs the receptor with a ``tcpmux`` exit, which hands each stream to tcpmuxd's
dispatcher with the client's address as B reported it. B's clients connect to the entrance
from B's loopback (127.0.0.1), from its private address on the link to A (10.214.0.2) and from
two public addresses of B's own interface (198.51.100.7 and 203.0.113.9).

The rule (tcpmuxd.conf(5), IPAddressAllow=): with either list set, the origin a tunnel reports
counts only when its peer is authenticated, and never as one of A's own addresses: loopback
(and link-local) origins match no entry, not even ``localhost`` or ``any``; private and public
ones are judged as written. A's own loopback clients (of a tcpmuxd on A) still match
``localhost``. Without lists every origin is served.

Needs root and ``ip netns``: skipped, with the reason, where namespaces cannot be made. Only the
namespaces made here are touched; they are deleted at the end whatever happened.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from netns_harness import NsProc, add_namespace, delete_namespace, ip, namespace_name

from tcpmuxd_harness import PYTHON, ROOT, write_service

pytestmark = pytest.mark.timeout(120)

ADDR_A, ADDR_B = "10.214.0.1", "10.214.0.2"
PUBLIC_B = ("198.51.100.7", "203.0.113.9")
LINK_PORT, ENTRANCE_PORT, NOAUTH_LINK, NOAUTH_ENTRANCE, TCPMUX_PORT = 7000, 7001, 7100, 7101, 1
TUNNEL, NOAUTH_TUNNEL = "far-b", "plain-b"
UP_TIMEOUT = 30.0

#: Run in B with ``ip netns exec``: for each [source, port, request] connect from that source,
#: send, half-close, read to the end; print the replies as JSON.
CLIENT = r"""
import json, socket, sys
out = []
for source, port, request in json.loads(sys.argv[1]):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10,
                                      source_address=(source, 0)) as s:
            s.sendall(request.encode())
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        out.append(data.decode("ascii", "replace"))
    except OSError as e:
        out.append(f"error {e}")
print(json.dumps(out))
"""


@pytest.fixture
def hosts() -> Iterator[tuple[str, str]]:
    """Namespaces (A, B) joined by a veth pair, B with public addresses of its own."""
    a, b = namespace_name("tmx-a"), namespace_name("tmx-b")
    try:
        for ns in (a, b):
            reason = add_namespace(ns)
            if reason:
                pytest.skip(reason)
        ip("-n", a, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b",
           "netns", b)
        ip("-n", a, "addr", "add", f"{ADDR_A}/24", "dev", "veth-a")
        ip("-n", b, "addr", "add", f"{ADDR_B}/24", "dev", "veth-b")
        for public in PUBLIC_B:
            ip("-n", b, "addr", "add", f"{public}/24", "dev", "veth-b")
        for ns, dev in ((a, "veth-a"), (b, "veth-b")):
            ip("-n", ns, "link", "set", dev, "up")
        yield a, b
    finally:
        for ns in (a, b):
            delete_namespace(ns)


def run_in(ns: str, argv: list[str], log: Path) -> NsProc:
    """``argv`` in namespace ``ns``, its output in ``log`` (named after the file)."""
    return NsProc(log.name, ns, argv, log)


@pytest.fixture
def started() -> Iterator[list[NsProc]]:
    procs: list[NsProc] = []
    yield procs
    for p in reversed(procs):
        p.stop()
    for p in procs:
        print(f"--- {p.name}\n{p.text()}")


def requests(ns: str, items: list[tuple[str, int, str]]) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, PYTHON, "-c", CLIENT, json.dumps(items)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_until_served(ns: str, source: str, port: int, log: NsProc) -> None:
    deadline = time.monotonic() + UP_TIMEOUT
    while requests(ns, [(source, port, "open\r\n")]) != ["+\r\nopen\n"]:
        assert time.monotonic() < deadline, f"the tunnel did not come up:\n{log.text()}"
        time.sleep(0.2)


SERVICES = {
    "local": "IPAddressAllow=localhost\nIPAddressDeny=any\n",
    "lan": "IPAddressAllow=10.214.0.0/16 localhost\nIPAddressDeny=any\n",
    "pub": "IPAddressAllow=198.51.100.0/24\nIPAddressDeny=any\n",
    "anyone": "IPAddressAllow=any\n",
    "open": "",
}


def refusal(origin: str, tunnel: str, why: str = "") -> str:
    return f"-not allowed from {origin} through tunnel {tunnel}{why}\r\n"


def test_tunnel_origins_are_judged_as_the_far_sides_never_as_ours(hosts, started, tmp_path):
    a, b = hosts
    conf = tmp_path / "conf.d"
    for name, rules in SERVICES.items():
        write_service(conf, f"{name}.conf", f"[Service]\nExec=/bin/echo {name}\n{rules}")
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    secret.chmod(0o600)
    sockmuxd = [PYTHON, "-m", "tcpmuxd.sockmux.daemon"]
    exit_a = run_in(a, [*sockmuxd, "--name", TUNNEL, "--accept", f"{ADDR_A}:{LINK_PORT}",
                             "--secret", str(secret), "--exit", f"{ENTRANCE_PORT}=tcpmux",
                             "--tcpmux-config-dir", str(conf)], tmp_path / "exit-a.log")
    started.append(exit_a)
    started.append(run_in(b, [*sockmuxd, "--name", "to-a", "--connect",
                                   f"{ADDR_A}:{LINK_PORT}", "--secret", str(secret),
                                   "--entrance", f"0.0.0.0:{ENTRANCE_PORT}"],
                               tmp_path / "entrance-b.log"))
    # tcpmuxd on A itself, with the same services: A's own loopback clients
    started.append(run_in(a, [PYTHON, "-m", "tcpmuxd", "--config-dir", str(conf),
                                   "--listen", f"127.0.0.1:{TCPMUX_PORT}"],
                               tmp_path / "tcpmuxd-a.log"))
    wait_until_served(b, "127.0.0.1", ENTRANCE_PORT, exit_a)

    origins = ["127.0.0.1", ADDR_B, *PUBLIC_B]
    items = [(origin, ENTRANCE_PORT, f"{name}\r\n") for origin in origins for name in SERVICES]
    replies = dict(zip([(origin, name) for origin in origins for name in SERVICES],
                       requests(b, items)))
    ok = {name: f"+\r\n{name}\n" for name in SERVICES}
    loopback = refusal("127.0.0.1", TUNNEL,
                       ": a loopback address of the far side, never one of ours")
    expected = {
        # B's loopback is not A's: it matches no entry, not even localhost or any
        ("127.0.0.1", "local"): loopback, ("127.0.0.1", "lan"): loopback,
        ("127.0.0.1", "pub"): loopback, ("127.0.0.1", "anyone"): loopback,
        ("127.0.0.1", "open"): ok["open"],
        # private and public origins are judged as written
        (ADDR_B, "local"): refusal(ADDR_B, TUNNEL), (ADDR_B, "lan"): ok["lan"],
        (ADDR_B, "pub"): refusal(ADDR_B, TUNNEL), (ADDR_B, "anyone"): ok["anyone"],
        (ADDR_B, "open"): ok["open"],
        ("198.51.100.7", "local"): refusal("198.51.100.7", TUNNEL),
        ("198.51.100.7", "lan"): refusal("198.51.100.7", TUNNEL),
        ("198.51.100.7", "pub"): ok["pub"], ("198.51.100.7", "anyone"): ok["anyone"],
        ("198.51.100.7", "open"): ok["open"],
        ("203.0.113.9", "local"): refusal("203.0.113.9", TUNNEL),
        ("203.0.113.9", "lan"): refusal("203.0.113.9", TUNNEL),
        ("203.0.113.9", "pub"): refusal("203.0.113.9", TUNNEL),
        ("203.0.113.9", "anyone"): ok["anyone"], ("203.0.113.9", "open"): ok["open"],
    }
    assert replies == expected

    # A's own loopback, straight to tcpmuxd on A: localhost means this one
    assert requests(a, [("127.0.0.1", TCPMUX_PORT, "local\r\n")]) == [ok["local"]]
    log = exit_a.text()
    assert f"via {TUNNEL} local: refused: not allowed from 127.0.0.1 through tunnel {TUNNEL}: " \
           "a loopback address of the far side" in log, log
    assert f"{ADDR_B}:" in log and f"via {TUNNEL} lan: accepted" in log, log


def test_origin_from_an_unauthenticated_peer_is_not_trusted(hosts, started, tmp_path):
    a, b = hosts
    conf = tmp_path / "conf.d"
    for name in ("lan", "open"):
        write_service(conf, f"{name}.conf", f"[Service]\nExec=/bin/echo {name}\n"
                                            f"{SERVICES[name]}")
    sockmuxd = [PYTHON, "-m", "tcpmuxd.sockmux.daemon", "--no-auth"]
    exit_a = run_in(a, [*sockmuxd, "--name", NOAUTH_TUNNEL, "--accept",
                             f"{ADDR_A}:{NOAUTH_LINK}", "--exit", f"{NOAUTH_ENTRANCE}=tcpmux",
                             "--tcpmux-config-dir", str(conf)], tmp_path / "exit-a.log")
    started.append(exit_a)
    started.append(run_in(b, [*sockmuxd, "--connect", f"{ADDR_A}:{NOAUTH_LINK}",
                                   "--entrance", f"0.0.0.0:{NOAUTH_ENTRANCE}"],
                               tmp_path / "entrance-b.log"))
    wait_until_served(b, ADDR_B, NOAUTH_ENTRANCE, exit_a)
    assert requests(b, [(ADDR_B, NOAUTH_ENTRANCE, "lan\r\n"),
                        (ADDR_B, NOAUTH_ENTRANCE, "open\r\n")]) == [
        refusal(ADDR_B, NOAUTH_TUNNEL, ": its peer is not authenticated, so the origin it "
                                       "reports cannot be trusted"),
        "+\r\nopen\n"]
