"""Unit= under a real systemd: each service's handlers in a unit of its own.

A container boots systemd (nspawn.py) with this project bound read-only at /opt/tcpmuxd, as in
test_tcpmuxd_systemd.py: tcpmuxd.socket and tcpmuxd.service are installed unchanged (a drop-in
only runs the project from the bind mount), so tcpmuxd is the shipped dynamic user with no
capability at all; the handler pair tcpmuxd-handler@.socket/.service is installed unchanged,
and each service gets the drop-in an administrator writes (tcpmuxd-handler(8), EXAMPLES), its
ExecStart= running the helper from the bind mount. /etc/nsswitch.conf gets "systemd", as
Debian's libnss-systemd sets it, so that the helper can name tcpmuxd's dynamic user.

- ``who``: ``User=nobody`` (a static user), the handler prints its user and control group;
- ``hog``: a dynamic user of its own (``User=tcpmux-hog``), ``MemoryMax=``: its handlers are
  ``cat`` or, for a client that sends ``eat``, a program that allocates past the limit.

Each handler runs as its unit's user, in that unit's control group, and the units are visible
in ``systemctl``; a handler that exceeds ``MemoryMax=`` is killed (its client's connection is
cut after the ``+``, tcpmuxd's record says SIGKILL) while a ``cat`` handler in the same unit, one
in the other unit, the unit itself and tcpmuxd go on. That part needs the memory controller in
the container (cgroup v2 with it delegated, as on a host that boots with the unified
hierarchy); where the container has none (a host on cgroup v1), it is skipped, saying so.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from .nspawn import Container

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "/opt/tcpmuxd"
UNIT_NAMES = ("tcpmuxd.socket", "tcpmuxd.service", "tcpmuxd-handler@.socket",
              "tcpmuxd-handler@.service")
CONF_D = "/etc/tcpmuxd/conf.d"
ENVIRONMENT = f"Environment=PYTHONPATH={PROJECT} PYTHONDONTWRITEBYTECODE=1\n"
DAEMON_DROPIN = ("[Service]\nExecStart=\nExecStart=/usr/bin/python3 -m tcpmuxd\n" + ENVIRONMENT)
HELPER = "/usr/bin/python3 -m tcpmuxd.tcpmux.unit_helper"
#: A handler that allocates 16 MiB at a time, touching it, until the kernel stops it.
EAT = ("import sys\nblocks = []\nprint('eating', flush=True)\nwhile True:\n"
       "    blocks.append(bytearray(16 << 20))\n")
MEMORY_MAX = "96M"
WAIT = 20.0


def handler_dropin(command: str, *settings: str) -> str:
    """The administrator's drop-in (tcpmuxd-handler(8), EXAMPLES), the helper from PROJECT."""
    return ("[Service]\nExecStart=\n" f"ExecStart={HELPER} {command}\n" + ENVIRONMENT
            + "".join(f"{s}\n" for s in settings))


def report(line: str) -> None:
    print(f"[e2e] {line}", flush=True)


def show(c: Container, unit: str, *props: str) -> dict[str, str]:
    out = c.systemctl("show", unit, f"--property={','.join(props)}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def request(c: Container, data: bytes) -> bytes:
    return c.talk(("127.0.0.1", 1), data, shut_wr=True, timeout=WAIT)


def memory_controller(c: Container) -> bool:
    text = c.exec(["cat", "/sys/fs/cgroup/cgroup.controllers"]).stdout
    return "memory" in text.split()


@pytest.fixture(scope="module")
def box(nspawn_available):
    with Container(bind_ro=[(ROOT, PROJECT)], log=report) as c:
        for name in UNIT_NAMES:
            c.write_file(f"/etc/systemd/system/{name}", (ROOT / "units" / name).read_text())
        c.write_file("/etc/systemd/system/tcpmuxd.service.d/50-e2e-project.conf", DAEMON_DROPIN)
        c.write_file("/etc/nsswitch.conf", "passwd: files systemd\ngroup: files systemd\n"
                     "shadow: files\nhosts: files\n")
        c.write_file("/etc/systemd/system/tcpmuxd-handler@who.service.d/handler.conf",
                     handler_dropin("/bin/sh -c 'id -un; cat /proc/self/cgroup'",
                                    "User=nobody"))
        c.write_file("/srv/eat.py", EAT)
        c.write_file("/srv/hog.sh", "#!/bin/sh\nread -r what\n"
                     "if [ \"$what\" = eat ]; then exec /usr/bin/python3 /srv/eat.py; fi\n"
                     "id -un; grep -o 'tcpmuxd-handler@[a-z]*' /proc/self/cgroup; exec cat\n",
                     mode=0o755)
        c.write_file("/etc/systemd/system/tcpmuxd-handler@hog.service.d/handler.conf",
                     handler_dropin("/srv/hog.sh", "User=tcpmux-hog",
                                    f"MemoryMax={MEMORY_MAX}", "MemorySwapMax=0"))
        # a unit that cannot start: its program does not exist
        c.write_file("/etc/systemd/system/tcpmuxd-handler@broken.service.d/handler.conf",
                     "[Service]\nExecStart=\nExecStart=/nonexistent/tcpmuxd-handler /bin/true\n")
        c.write_file(f"{CONF_D}/broken.conf", "[Service]\nUnit=broken\n")
        c.write_file(f"{CONF_D}/who.conf", "[Service]\nUnit=who\n")
        c.write_file(f"{CONF_D}/hog.conf", "[Service]\nUnit=hog\n")
        c.systemctl("daemon-reload")
        c.systemctl("enable", "--now", "tcpmuxd.socket", "tcpmuxd-handler@who.socket",
                    "tcpmuxd-handler@hog.socket", "tcpmuxd-handler@broken.socket")
        yield c


def test_each_handler_runs_as_its_user_in_its_own_unit(box):
    c = box
    t0 = time.monotonic()
    reply = request(c, b"who\r\n")
    report(f"who -> {reply!r} ({time.monotonic() - t0:.2f} s, the unit's first start included)")
    assert reply.startswith(b"+\r\nnobody\n"), reply
    assert b"/system.slice/system-tcpmuxd\\x2dhandler.slice/tcpmuxd-handler@who.service" \
        in reply, reply

    with c.connect(("127.0.0.1", 1), timeout=WAIT) as s:
        s.sendall(b"hog\r\ncat\n")
        got = b""
        while got.count(b"\n") < 3:
            chunk = s.recv(1024)
            assert chunk, got
            got += chunk
        assert got == b"+\r\ntcpmux-hog\ntcpmuxd-handler@hog\n", got
        units = c.systemctl("list-units", "--plain", "--no-legend", "tcpmuxd*").stdout
        report(f"units:\n{units}")
        for unit in ("tcpmuxd.service", "tcpmuxd-handler@who.service",
                     "tcpmuxd-handler@hog.service", "tcpmuxd-handler@hog.socket"):
            assert re.search(rf"^{re.escape(unit)}\s+loaded active", units, re.M), unit
        tasks = c.systemctl("status", "tcpmuxd-handler@hog.service").stdout
        assert "cat" in tasks, tasks  # the running handler, listed in its unit
        # tcpmuxd itself stays the shipped dynamic user, with no capability
        pid = show(c, "tcpmuxd.service", "MainPID")["MainPID"]
        status = c.read_file(f"/proc/{pid}/status").decode()
        assert re.search(r"^CapEff:\s+0+$", status, re.M), status
    record = c.wait_until(lambda: re.search(r".* hog: accepted, handler pid \d+ in "
                                            r"tcpmuxd-handler@hog.service, exit 0, .*",
                                            records(c)),
                          timeout=WAIT, what="tcpmuxd's record of the hog connection")
    report(f"tcpmuxd: {record.group(0)}")


def records(c: Container) -> str:
    """tcpmuxd's journal records, as text."""
    return c.exec(["journalctl", "-t", "tcpmuxd", "--no-pager", "-o", "cat"]).stdout


def test_a_handler_over_memory_max_is_killed_alone(box):
    c = box
    if not memory_controller(c):
        pytest.skip("the container has no memory controller (the host runs cgroup v1, or does "
                    "not delegate it), so MemoryMax= cannot be enforced in it")
    before = show(c, "tcpmuxd.service", "MainPID", "NRestarts")
    with c.connect(("127.0.0.1", 1), timeout=WAIT) as same, \
            c.connect(("127.0.0.1", 1), timeout=WAIT) as other:
        same.sendall(b"hog\r\ncat\n")
        other.sendall(b"who\r\n")
        assert same.recv(3) == b"+\r\n"
        with c.connect(("127.0.0.1", 1), timeout=WAIT) as eater:
            eater.sendall(b"hog\r\neat\n")
            got = b""
            try:
                while chunk := eater.recv(1024):
                    got += chunk
            except ConnectionResetError:
                pass
            assert got == b"+\r\neating\n", got  # then cut: the handler was killed
        same.sendall(b"still here\n")
        want = b"tcpmux-hog\ntcpmuxd-handler@hog\nstill here\n"
        got = b""
        while len(got) < len(want):
            chunk = same.recv(1024)
            assert chunk, got
            got += chunk
        assert got == want
    after = show(c, "tcpmuxd.service", "MainPID", "NRestarts")
    assert after == before, (before, after)
    hog = show(c, "tcpmuxd-handler@hog.service", "ActiveState", "MemoryMax")
    assert hog["ActiveState"] == "active", hog
    assert request(c, b"hog\r\ncat\n").startswith(b"+\r\ntcpmux-hog\n")
    text = c.wait_until(lambda: "signal SIGKILL" in records(c) and records(c), timeout=WAIT,
                        what="tcpmuxd's record of the killed handler")
    report(f"tcpmuxd's records:\n{text}")


def test_a_unit_that_cannot_start_is_a_refusal(box):
    """systemd cannot start the unit (its program is missing): the client gets ``-`` with
    the reason, never a ``+``; tcpmuxd and the other units go on."""
    c = box
    reply = request(c, b"broken\r\n")
    report(f"broken -> {reply!r}; unit: "
           f"{show(c, 'tcpmuxd-handler@broken.service', 'ActiveState', 'Result')}")
    assert reply.startswith(b"-handler failed to start: tcpmuxd-handler@broken.service ") \
        and reply.endswith(b"\r\n") and reply.count(b"\r\n") == 1, reply
    assert request(c, b"who\r\n").startswith(b"+\r\nnobody\n")
