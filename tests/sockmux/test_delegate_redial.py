"""A live DeleGate 9.9.11 connector against a sockmuxd receptor that requires authentication:
DeleGate cannot authenticate, so every link fails at the end of the handshake, and DeleGate
dials again at once. Before, that was about 25 links a second, three log records each, for as
long as both ran. Now each failed link is held before the reset, 1 s after the first failure
and twice as long after each further one (``--failure-delay``), and only the first failure gets
a full record.

DeleGate is found or built as delegate_peer.py says; without it the test is skipped with the
reason. It runs, with the receptor, in a network namespace of its own, as DeleGate must.
"""

from __future__ import annotations

import re
import sys
import time

import pytest
from delegate_peer import DeleGate, find_or_build
from netns_harness import NsProc, add_namespace, delete_namespace, namespace_name

SECONDS = 12
FAILURE_DELAY = 4
LINK = 7000


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_a_delegate_that_cannot_authenticate_redials_slowly_and_quietly(tmp_path):
    binary, how = find_or_build()
    if binary is None:
        pytest.skip(how)
    ns = namespace_name("dgr")
    reason = add_namespace(ns)
    procs: list[NsProc] = []
    try:
        if reason:
            pytest.skip(reason)
        secret = tmp_path / "secret"
        secret.write_text("0123456789abcdef0123456789abcdef\n")
        secret.chmod(0o600)
        receptor = NsProc("receptor", ns, [
            sys.executable, "-m", "tcpmuxd.sockmux.daemon", "--accept", f"127.0.0.1:{LINK}",
            "--secret", str(secret), "--exit", "127.0.0.1:9",
            "--failure-delay", f"{FAILURE_DELAY}s"], tmp_path / "sockmuxd.log")
        procs.append(receptor)
        assert receptor.wait_line("waiting for the peer", 0, 15), receptor.text()
        before = _cpu_ticks(receptor.p.pid)
        procs.append(DeleGate(binary, ns, tmp_path / "delegate.log", entrance=8001,
                              exit_port=9001, connect=LINK))
        time.sleep(SECONDS)
        ticks = _cpu_ticks(receptor.p.pid) - before
        for p in reversed(procs):
            p.stop()
        text = "\n".join(line for _t, line in receptor.lines)
    finally:
        for p in procs:
            p.stop()
        delete_namespace(ns)
    summed = [int(n) for n in re.findall(r"(\d+) more refused or failed", text)]
    attempts = text.count("closed before it was up") + sum(summed)
    print(f"DeleGate connector, {SECONDS} s: {attempts} links, {len(text.splitlines())} log "
          f"lines, {ticks} CPU ticks of the receptor")
    # held 1, 2, 4, 4 s: links at 0, 1, 3, 7, 11 s (before: about 25 a second)
    assert 3 <= attempts <= 7, text
    assert text.count("closed before it was up") == 1, text  # the first in full
    assert "peer cannot authenticate" in text
    assert len(summed) == 1, text  # the rest in one summary (at the stop, here)
    assert text.count("connected, handshake starts") == 1, text  # later ones: debug only
    assert len(text.splitlines()) <= 12, text
