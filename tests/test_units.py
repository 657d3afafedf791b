"""The shipped systemd units: systemd's own checks, and the properties other parts rely on.

``systemd-analyze verify`` runs offline over all four units in one call (they refer to each
other), with ``/usr/bin/tcpmuxd`` rewritten to a program that exists here, and must print
nothing at all: unknown or misspelt keys only warn, with exit status 0. The properties are read
from the files themselves, so they hold whatever systemd is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "units"
UNIT_NAMES = (
    "tcpmuxd.socket",
    "tcpmuxd.service",
    "tcpmuxd-inetd.socket",
    "tcpmuxd-inetd@.service",
)
DAEMON = "/usr/bin/tcpmuxd"
#: systemd-analyze security's 0-100 scale: 25 is "2.5".
MAX_EXPOSURE = 25

#: Sandbox settings both services must have, with these values.
SANDBOX = {
    "CapabilityBoundingSet": "CAP_SETUID CAP_SETGID",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "read-only",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values in order (unit files repeat keys; configparser cannot)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        while line.endswith("\\") and i < len(lines):  # continuation lines
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not Key=Value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def units() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {name: parse_unit(UNITS / name) for name in UNIT_NAMES}


def one(units, unit: str, section: str, key: str) -> str:
    values = units[unit].get(section, {}).get(key)
    assert values, f"{unit}: no {key}= in [{section}]"
    assert len(values) == 1, f"{unit}: {key}= given {len(values)} times"
    return values[0]


def words(units, unit: str, section: str, key: str) -> set[str]:
    return {w for v in units[unit].get(section, {}).get(key, []) for w in v.split()}


# --- systemd's own checks -------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit_copies(tmp_path_factory) -> Path:
    """The units in a temporary directory, ExecStart= pointing to an executable that exists."""
    tmp = tmp_path_factory.mktemp("units")
    stand_in = tmp / "tcpmuxd"
    stand_in.write_text(f'#!/bin/sh\nexec {sys.executable} -m tcpmuxd "$@"\n')
    stand_in.chmod(0o755)
    for name in UNIT_NAMES:
        text = (UNITS / name).read_text()
        (tmp / name).write_text(text.replace(DAEMON, str(stand_in)))
    return tmp


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return tool


def test_systemd_analyze_verify_is_silent(unit_copies):
    r = subprocess.run(
        [analyze(), "verify", "--man=no", *[f"./{name}" for name in UNIT_NAMES]],
        cwd=unit_copies, capture_output=True, text=True, timeout=60,
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (
        f"systemd-analyze verify: status {r.returncode}\n{r.stdout}{r.stderr}"
    )


def test_sandbox_exposure_is_low(unit_copies):
    services = ["./tcpmuxd.service", "./tcpmuxd-inetd@.service"]
    r = subprocess.run(
        [analyze(), "security", "--offline=true", "--no-pager", f"--threshold={MAX_EXPOSURE}",
         *services],
        cwd=unit_copies, capture_output=True, text=True, timeout=60,
    )
    if "Unknown option" in r.stderr or "unrecognized option" in r.stderr:
        pytest.skip(f"this systemd-analyze has no offline security check: {r.stderr.strip()}")
    overall = re.findall(r"Overall exposure level for (\S+): ([\d.]+)", r.stdout)
    print("exposure:", ", ".join(f"{unit} {level}" for unit, level in overall))
    assert r.returncode == 0 and len(overall) == 2, (
        f"exposure above {MAX_EXPOSURE / 10} (status {r.returncode}):\n"
        + "\n".join(line for line in r.stdout.splitlines() if "✗" in line or "→" in line)
        + r.stderr
    )


# --- the contract with the daemon and with packagers ----------------------------------------


def test_accept_no_socket(units):
    u = "tcpmuxd.socket"
    assert units[u]["Socket"]["ListenStream"] == ["1"]
    assert one(units, u, "Socket", "Accept") == "no"
    assert int(one(units, u, "Socket", "Backlog")) >= 1024
    assert "sockets.target" in words(units, u, "Install", "WantedBy")


def test_accept_no_service(units):
    u = "tcpmuxd.service"
    assert one(units, u, "Service", "Type") == "notify"
    assert one(units, u, "Service", "ExecStart") == DAEMON
    assert one(units, u, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(units, u, "Service", "Restart") == "on-failure"
    assert one(units, u, "Service", "WatchdogSec")
    assert "tcpmuxd.socket" in words(units, u, "Unit", "Requires")
    assert "tcpmuxd.socket" in words(units, u, "Unit", "After")
    assert "tcpmuxd.socket" in words(units, u, "Install", "Also")
    assert not units[u].get("Install", {}).get("WantedBy"), "started by its socket only"


def test_accept_yes_socket(units):
    u = "tcpmuxd-inetd.socket"
    assert units[u]["Socket"]["ListenStream"] == ["1"]
    assert one(units, u, "Socket", "Accept") == "yes"
    assert int(one(units, u, "Socket", "MaxConnections")) > 0
    assert int(one(units, u, "Socket", "MaxConnectionsPerSource")) > 0
    assert "sockets.target" in words(units, u, "Install", "WantedBy")


def test_accept_yes_service(units):
    u = "tcpmuxd-inetd@.service"
    assert one(units, u, "Service", "ExecStart") == DAEMON
    assert one(units, u, "Service", "StandardInput") == "socket"
    assert one(units, u, "Service", "StandardOutput") == "socket"
    assert one(units, u, "Service", "StandardError") == "journal"
    assert one(units, u, "Unit", "CollectMode") == "inactive-or-failed"
    assert units[u]["Service"].get("Type", ["simple"]) == ["simple"]
    assert "WatchdogSec" not in units[u]["Service"]


def test_the_two_modes_conflict_both_ways(units):
    no_side = ("tcpmuxd.socket", "tcpmuxd.service")
    for unit in no_side:
        assert "tcpmuxd-inetd.socket" in words(units, unit, "Unit", "Conflicts"), unit
    inetd = words(units, "tcpmuxd-inetd.socket", "Unit", "Conflicts")
    assert set(no_side) <= inetd
    # An ordering between them makes systemd stop one side before starting the other, so port 1
    # is free when the other socket binds it.
    assert set(no_side) <= words(units, "tcpmuxd-inetd.socket", "Unit", "After")


def test_both_services_have_the_same_sandbox(units):
    for unit in ("tcpmuxd.service", "tcpmuxd-inetd@.service"):
        service = units[unit]["Service"]
        got = {key: " ".join(service.get(key, ["(unset)"])) for key in SANDBOX}
        assert got == SANDBOX, unit
        for key in ("User", "DynamicUser", "PrivateUsers", "PrivateNetwork"):
            assert key not in service, f"{unit}: {key}= would break handlers (units/README.md)"


def test_readme_names_every_unit():
    text = (UNITS / "README.md").read_text()
    for name in UNIT_NAMES:
        assert name in text
    assert "notify-reload" in text
