"""``[::]`` means every address, IPv4 included, in both daemons: ``sockmuxd --accept [::]:PORT``
and ``--entrance [::]:PORT``, and ``tcpmuxd --listen [::]:PORT``. Each is checked with an IPv4
client (127.0.0.1) reaching a real daemon listening on ``[::]``: an IPv6-only socket
(``IPV6_V6ONLY=1``, what asyncio's ``create_server`` makes of ``::``) refuses it.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
from tcpmuxd_harness import free_port, talk, write_service
from test_daemon import echo, echo_check, procs, secret, start, wait_until_works  # noqa: F401


def _ipv6_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _ipv6_works(), reason="this host has no IPv6 to bind [::]")


def _wait_log(proc, pattern: str, timeout: float = 15.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, proc.text())
        if match:
            return match
        if time.monotonic() > deadline or proc.p.poll() is not None:
            raise AssertionError(f"{pattern!r} not logged:\n{proc.text()}")
        time.sleep(0.05)


def test_sockmuxd_accept_on_any_v6_takes_an_ipv4_connector(procs, tmp_path, echo, secret):
    """The receptor on [::]:PORT; the connector dials 127.0.0.1:PORT and the tunnel works."""
    link, entrance = free_port("::"), free_port()
    receptor = start(procs, tmp_path, "receptor",
                     ["--accept", f"[::]:{link}", "--secret", secret, "--exit",
                      f"127.0.0.1:{echo.port}"])
    _wait_log(receptor, r"waiting for the peer on \[::\]:")
    start(procs, tmp_path, "connector",
          ["--connect", f"127.0.0.1:{link}", "--secret", secret,
           "--entrance", f"127.0.0.1:{entrance}"])
    wait_until_works(entrance)
    _wait_log(receptor, r"link 127\.0\.0\.1:\d+: up \(authenticated\)")


def test_sockmuxd_entrance_on_any_v6_takes_ipv4_clients(procs, tmp_path, echo, secret):
    """An entrance on [::]:PORT forwards an IPv4 client's connection through the tunnel."""
    link, entrance = free_port(), free_port("::")
    start(procs, tmp_path, "receptor",
          ["--accept", f"127.0.0.1:{link}", "--secret", secret,
           "--exit", f"127.0.0.1:{echo.port}"])
    start(procs, tmp_path, "connector",
          ["--connect", f"127.0.0.1:{link}", "--secret", secret, "--entrance", f"[::]:{entrance}"])
    wait_until_works(entrance)
    assert echo_check(entrance, 100_000)


def test_tcpmuxd_listen_on_any_v6_takes_ipv4_clients(services, daemon_factory):
    """``tcpmuxd --listen [::]:0``: an IPv4 client is served on the port it was given."""
    write_service(services, "echo.conf", "[Service]\nExec=/bin/cat\n")
    d = daemon_factory(services, "--listen", "[::]:0")
    port = int(re.search(r"\[::\]:(\d+)", d.wait_for_log("[::]:")).group(1))
    assert talk(port, b"echo\r\nhello over IPv4\n") == b"+\r\nhello over IPv4\n"
