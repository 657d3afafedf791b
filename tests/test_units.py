"""The shipped systemd units: systemd's own checks, and the properties other parts rely on.

``systemd-analyze verify`` runs offline over all four units in one call (they refer to each
other), with ``/usr/bin/tcpmuxd`` rewritten to a program that exists here, and must print
nothing at all: unknown or misspelt keys only warn, with exit status 0. The same holds with the
one drop-in units/README.md tells admins to add for handlers as other users
(``DynamicUser=no``). ``systemd-analyze security`` rates the services as shipped (at most 2.0)
and with that drop-in (printed, at most 2.5). The properties are read from the files
themselves, so they hold whatever systemd is installed. Last, the daemon's side of the
contract: without CAP_SETUID/CAP_SETGID (the shipped units), a service with User= is an error
that names the drop-in.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tcpmuxd.tcpmux import config

UNITS = Path(__file__).resolve().parent.parent / "units"
SERVICES = ("tcpmuxd.service", "tcpmuxd-inetd@.service")
UNIT_NAMES = (
    "tcpmuxd.socket",
    "tcpmuxd.service",
    "tcpmuxd-inetd.socket",
    "tcpmuxd-inetd@.service",
    "tcpmuxd-handler@.socket",
    "tcpmuxd-handler@.service",
)
DAEMON = "/usr/bin/tcpmuxd"
#: The program of a Unit= service's unit (tcpmuxd-handler(8)).
HELPER = "/usr/bin/tcpmuxd-handler"
#: tcpmuxd.service as shipped: 1.8, also with Unit= services running under other users,
#: which need no change to it.
MAX_EXPOSURE_TCPMUXD = 18
#: systemd-analyze security's 0-100 scale: 20 is "2.0". The shipped services, no User= needed.
MAX_EXPOSURE = 20
#: With the drop-in for handlers as other users (units/README.md): root with CAP_SETUID/SETGID.
MAX_EXPOSURE_RELAXED = 25
#: That drop-in, exactly as units/README.md shows it (indented as a code block there).
RELAX_DROPIN = "[Service]\nDynamicUser=no\n"

#: Sandbox settings both services must have, with these values.
SANDBOX = {
    "DynamicUser": "yes",
    # Not for the dynamic user, which has no capabilities: for root after DynamicUser=no.
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


def _copy_units(tmp: Path, dropin: str | None = None) -> Path:
    stand_in = tmp / "tcpmuxd"
    stand_in.write_text(f'#!/bin/sh\nexec {sys.executable} -m tcpmuxd "$@"\n')
    stand_in.chmod(0o755)
    helper = tmp / "tcpmuxd-handler"
    helper.write_text(f'#!/bin/sh\nexec {sys.executable} -m tcpmuxd.tcpmux.unit_helper "$@"\n')
    helper.chmod(0o755)
    for name in UNIT_NAMES:
        text = (UNITS / name).read_text()
        (tmp / name).write_text(text.replace(DAEMON, str(stand_in)).replace(HELPER, str(helper)))
    if dropin is not None:
        # ./NAME.service.d/ next to ./NAME.service: systemd-analyze reads it as a drop-in.
        for name in SERVICES:
            (tmp / f"{name}.d").mkdir()
            (tmp / f"{name}.d" / "users.conf").write_text(dropin)
    return tmp


@pytest.fixture(scope="module")
def unit_copies(tmp_path_factory) -> Path:
    """The units in a temporary directory, ExecStart= pointing to an executable that exists."""
    return _copy_units(tmp_path_factory.mktemp("units"))


@pytest.fixture(scope="module")
def relaxed_copies(tmp_path_factory) -> Path:
    """The same, plus units/README.md's drop-in for handlers as other users."""
    return _copy_units(tmp_path_factory.mktemp("units-relaxed"), RELAX_DROPIN)


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return tool


@pytest.mark.parametrize("state", ["shipped", "relaxed"])
def test_systemd_analyze_verify_is_silent(state, unit_copies, relaxed_copies):
    r = subprocess.run(
        [analyze(), "verify", "--man=no", *[f"./{name}" for name in UNIT_NAMES]],
        cwd=unit_copies if state == "shipped" else relaxed_copies,
        capture_output=True, text=True, timeout=60,
    )
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (
        f"systemd-analyze verify ({state}): status {r.returncode}\n{r.stdout}{r.stderr}"
    )


def exposure(directory: Path, threshold: int) -> tuple[subprocess.CompletedProcess, dict]:
    r = subprocess.run(
        [analyze(), "security", "--offline=true", "--no-pager", f"--threshold={threshold}",
         *[f"./{name}" for name in SERVICES]],
        cwd=directory, capture_output=True, text=True, timeout=60,
    )
    if "Unknown option" in r.stderr or "unrecognized option" in r.stderr:
        pytest.skip(f"this systemd-analyze has no offline security check: {r.stderr.strip()}")
    overall = dict(re.findall(r"Overall exposure level for (\S+): ([\d.]+)", r.stdout))
    return r, overall


def _explain(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stdout.splitlines() if "✗" in line or "→" in line]
    return "\n".join(lines) + r.stderr


def test_sandbox_exposure_is_low(unit_copies):
    """As shipped (no service needs another user): at most 2.0."""
    r, overall = exposure(unit_copies, MAX_EXPOSURE)
    print("exposure as shipped:", ", ".join(f"{u} {level}" for u, level in overall.items()))
    assert r.returncode == 0 and len(overall) == 2, (
        f"exposure above {MAX_EXPOSURE / 10} (status {r.returncode}):\n{_explain(r)}")


def test_sandbox_exposure_with_handlers_as_other_users(relaxed_copies, unit_copies):
    """With DynamicUser=no (units/README.md): printed, bounded, and higher than shipped."""
    assert "\n".join("    " + line for line in RELAX_DROPIN.splitlines()) in (
        UNITS / "README.md").read_text(), "units/README.md no longer shows this drop-in"
    r, relaxed = exposure(relaxed_copies, MAX_EXPOSURE_RELAXED)
    _, shipped = exposure(unit_copies, 100)
    print("exposure with DynamicUser=no:",
          ", ".join(f"{u} {level} (shipped {shipped.get(u)})" for u, level in relaxed.items()))
    assert r.returncode == 0 and len(relaxed) == 2, (
        f"exposure above {MAX_EXPOSURE_RELAXED / 10} (status {r.returncode}):\n{_explain(r)}")
    assert "Service runs as root user" in r.stdout, "the drop-in did not apply"
    for unit, level in relaxed.items():
        assert float(level) > float(shipped[unit]), (unit, level, shipped)


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
    # a bad command line (exit status 2, as argparse gives it) is not restarted in a loop
    assert one(units, u, "Service", "RestartPreventExitStatus") == "2"
    bad = subprocess.run([sys.executable, "-m", "tcpmuxd.tcpmux.cli", "--max-connections=0"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--max-connections" in bad.stderr, bad
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


def test_stop_timeout_leaves_room_for_tcpmuxd_to_cut_and_log(units):
    """systemd's SIGKILL must come after tcpmuxd has cut what --stop-timeout left (and logged
    it), in both modes."""
    from tcpmuxd.tcpmux.policy import Limits
    for unit in SERVICES:
        seconds = config.parse_timespan(one(units, unit, "Service", "TimeoutStopSec"))
        assert seconds >= Limits.stop_timeout + 10, (unit, seconds)


def test_both_services_have_the_same_sandbox(units):
    for unit in SERVICES:
        service = units[unit]["Service"]
        got = {key: " ".join(service.get(key, ["(unset)"])) for key in SANDBOX}
        assert got == SANDBOX, unit
        # User=: DynamicUser=no alone would then not give root back; PrivateUsers=: no other
        # users even then; PrivateNetwork=: no Forward= to other hosts.
        for key in ("User", "Group", "PrivateUsers", "PrivateNetwork", "AmbientCapabilities"):
            assert key not in service, f"{unit}: {key}= would break handlers (units/README.md)"


# --- the daemon's side: services with User= under the shipped units -------------------------


def test_user_services_are_an_error_naming_the_drop_in(tmp_path):
    (tmp_path / "who.conf").write_text("[Service]\nExec=/usr/bin/id -un\nUser=nobody\n")
    (tmp_path / "grp.conf").write_text("[Service]\nExec=/usr/bin/id\nGroup=nogroup\n"
                                       "SupplementaryGroups=nogroup\n")
    (tmp_path / "plain.conf").write_text("[Service]\nExec=/bin/echo hi\n")

    cfg = config.load([tmp_path], switch_users=False)
    assert sorted(cfg.services) == ["plain"], "User= services must not run as tcpmuxd's user"
    errors = sorted(str(e) for e in cfg.errors)
    print("\n".join(errors))
    assert [e.split(": ", 1)[0] for e in errors] == [f"{tmp_path}/grp.conf:3",
                                                       f"{tmp_path}/who.conf:3"]
    assert "Group=, SupplementaryGroups=: tcpmuxd cannot switch users" in errors[0]
    assert "User=: tcpmuxd cannot switch users" in errors[1]
    for e in errors:
        assert "DynamicUser=no" in e and "tcpmuxd.service" in e and "README.units.md" in e

    cfg = config.load([tmp_path], switch_users=True)
    assert sorted(cfg.services) == ["grp", "plain", "who"] and cfg.ok, cfg.errors


def test_can_switch_users_reads_the_effective_capabilities(any_user_python):
    probe = [any_user_python.python, "-c",
             "from tcpmuxd.tcpmux.config import can_switch_users as f; print(f())"]
    env = {"PYTHONPATH": any_user_python.pythonpath, "PATH": "/usr/bin:/bin"}
    cwd = any_user_python.cwd  # nobody runs it too
    here = subprocess.run(probe, capture_output=True, text=True, env=env, cwd=cwd,
                          check=True).stdout
    with open("/proc/self/status") as f:
        eff = int(next(line for line in f if line.startswith("CapEff:")).split()[1], 16)
    assert here.strip() == str(eff & 0xC0 == 0xC0)
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("dropping capabilities needs root and setpriv (util-linux)")
    # Root without CAP_SETUID/CAP_SETGID, as DynamicUser=no minus the bounding set would be,
    # and the unprivileged user of the shipped units.
    for how in (["--bounding-set=-setuid,-setgid", "--inh-caps=-all"],
                ["--reuid=65534", "--regid=65534", "--clear-groups"]):
        r = subprocess.run(["setpriv", *how, *probe], capture_output=True, text=True, env=env,
                           cwd=cwd)
        assert (r.returncode, r.stdout.strip()) == (0, "False"), (how, r.stdout, r.stderr)


def test_readme_names_every_unit():
    text = (UNITS / "README.md").read_text()
    for name in UNIT_NAMES:
        assert name in text
    assert "notify-reload" in text


# --- Unit=: the handler unit pair -------------------------------------------------------------


def test_tcpmuxd_service_exposure_is_unchanged_by_unit_services(unit_copies):
    """Unit= services run under other users without touching tcpmuxd.service: still 1.8."""
    r, overall = exposure(unit_copies, MAX_EXPOSURE_TCPMUXD)
    print("exposure as shipped:", ", ".join(f"{u} {level}" for u, level in overall.items()))
    assert r.returncode == 0 and float(overall["tcpmuxd.service"]) <= 1.8, _explain(r)


def test_handler_unit_pair(units, unit_copies):
    """Accept=no (an Accept=yes socket would name its connections' units after the socket's
    prefix and lose the instance, so no drop-in per service), the socket path Unit= derives,
    a mode tcpmuxd's dynamic user can connect with, and a handler OOM-killed ending alone."""
    from tcpmuxd.tcpmux.handlers.unit import SOCKET_DIR
    sock, service = "tcpmuxd-handler@.socket", "tcpmuxd-handler@.service"
    assert one(units, sock, "Socket", "ListenStream") == f"{SOCKET_DIR}/%i.sock"
    assert one(units, sock, "Socket", "Accept") == "no"
    assert one(units, sock, "Socket", "SocketMode") == "0666"
    assert one(units, service, "Service", "ExecStart") == HELPER
    assert one(units, service, "Service", "OOMPolicy") == "continue"
    assert one(units, service, "Service", "Type") == "notify"
    assert "PrivateUsers" not in units[service]["Service"], "it would hide tcpmuxd's uid"
    r = subprocess.run(
        [analyze(), "security", "--offline=true", "--no-pager", "--threshold=20",
         f"./{service}"], cwd=unit_copies, capture_output=True, text=True, timeout=60)
    print(r.stdout.splitlines()[-1] if r.stdout else r.stderr)
    assert r.returncode == 0, _explain(r)
