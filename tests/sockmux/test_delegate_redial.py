"""A live DeleGate 9.9.11 connector against a sockmuxd receptor that requires authentication
(issue 11, item 4): DeleGate cannot authenticate, so every link fails at the end of the
handshake, and DeleGate dials again at once. Before, that was about 25 links a second, three
log records each, for as long as both ran. Now each failed link is held before the reset, 1 s
after the first failure and twice as long after each further one (``--failure-delay``), and
only the first failure gets a full record.

DeleGate is found through ``DELEGATED`` (the path of a built ``delegated``); without it the test
is skipped with the reason. It runs, with the receptor, in a network namespace of its own
(``unshare -n``, loopback up), as DeleGate must: it resolves names at start-up.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 12
FAILURE_DELAY = 4


def _delegated() -> Path:
    given = os.environ.get("DELEGATED")
    if not given:
        pytest.skip("no DeleGate peer: set DELEGATED=/path/to/delegated (a DeleGate 9.9.11 "
                    "built from its public source) to run this test")
    path = Path(given)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(f"DELEGATED={given} is not an executable file")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare(1) and ip(8) to run DeleGate in a network namespace")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a network namespace: {probe.stderr.decode().strip()}")
    return path


def _run(delegated: Path, tmp: Path, extra: list[str]) -> tuple[str, int]:
    """Receptor and DeleGate connector together for SECONDS in a fresh namespace; returns
    the receptor's log and the CPU ticks it used meanwhile."""
    secret = tmp / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    secret.chmod(0o600)
    dgroot = Path(tempfile.mkdtemp(prefix="tcpmuxd-delegate-"))  # DeleGate runs as nobody
    dgroot.chmod(0o777)
    log = tmp / "sockmuxd.log"
    sockmuxd = [sys.executable, "-m", "tcpmuxd.sockmux.daemon", "--accept", "127.0.0.1:7000",
                "--secret", str(secret), "--exit", "127.0.0.1:9", *extra]
    delegate = [str(delegated), "-f", "-v", "SERVER=sockmux://127.0.0.1:7000",
                "PORT=127.0.0.1:8001", "SERVER=tcprelay://127.0.0.1:9001,-in",
                f"DGROOT={dgroot}", "RESOLV=", "RES_WAIT=0", "ADMIN=root@localhost",
                "SOXCONF=crypt:no"]
    script = f"""
        set -e
        ip link set lo up
        {shlex.join(sockmuxd)} > {shlex.quote(str(log))} 2>&1 &
        receptor=$!
        for i in $(seq 100); do
            grep -q 'waiting for the peer' {shlex.quote(str(log))} && break
            sleep 0.05
        done
        setsid {shlex.join(delegate)} > {shlex.quote(str(tmp / 'delegate.log'))} 2>&1 &
        dg=$!
        before=$(awk '{{print $14+$15}}' /proc/$receptor/stat)
        sleep {SECONDS}
        after=$(awk '{{print $14+$15}}' /proc/$receptor/stat)
        kill -- -$dg 2>/dev/null || true
        kill $receptor
        wait $receptor || true
        sleep 0.2
        kill -9 -- -$dg 2>/dev/null || true
        echo "cpu $((after - before))"
    """
    try:
        out = subprocess.run(["unshare", "-n", "bash", "-c", script], cwd=ROOT,
                             capture_output=True, text=True, timeout=SECONDS + 30)
    finally:
        shutil.rmtree(dgroot, ignore_errors=True)
    match = re.search(r"cpu (\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    return log.read_text(errors="replace"), int(match.group(1))


def test_a_delegate_that_cannot_authenticate_redials_slowly_and_quietly(tmp_path):
    delegated = _delegated()
    text, ticks = _run(delegated, tmp_path, ["--failure-delay", f"{FAILURE_DELAY}s"])
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
