"""``tcpmuxd --check`` says what the daemon will do with User=, not what the shell running it could.

The defect: an administrator's root shell can switch users, so ``tcpmuxd --check`` passed a
service with ``User=`` that the daemon, run by the shipped units as a dynamic user without
CAP_SETUID/CAP_SETGID, then refused. Now --check judges by the credentials of the tcpmuxd that
will serve: run by systemd (INVOCATION_ID), its own; where systemd manages tcpmuxd, the unit of
the mode in use (its main process while it runs, else its settings); else its own.

Under a real systemd, booted in a container (tests/e2e/nspawn.py) with the shipped units and
this project bound read-only, as tests/e2e does. Without systemd here: the process's own
capabilities, root and an unprivileged uid (setpriv). Skipped, with the reason, where a
container cannot be booted.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tcpmuxd_harness import ROOT

pytestmark = pytest.mark.timeout(180)

PROJECT = "/opt/tcpmuxd"
UNIT_NAMES = ("tcpmuxd.socket", "tcpmuxd.service", "tcpmuxd-inetd.socket",
              "tcpmuxd-inetd@.service")
#: Run the project from the bind mount (the units say /usr/bin/tcpmuxd).
PROJECT_DROPIN = f"""\
[Service]
ExecStart=
ExecStart=/usr/bin/python3 -m tcpmuxd
Environment=PYTHONPATH={PROJECT} PYTHONDONTWRITEBYTECODE=1
"""
RELAX_DROPIN = "[Service]\nDynamicUser=no\n"  # units/README.md, handlers as other users
CHECK = ["/usr/bin/python3", "-m", "tcpmuxd", "--check"]
CHECK_ENV = {"PYTHONPATH": PROJECT, "PYTHONDONTWRITEBYTECODE": "1"}
USER_SERVICE = "[Service]\nExec=/usr/bin/id -un\nUser=nobody\n"


def judged(out: str) -> str:
    first = out.splitlines()[0]
    assert first.startswith("Handlers as other users (User=, Group=, SupplementaryGroups=): "), out
    return first.split(": ", 1)[1]


@pytest.fixture(scope="module")
def container():
    try:
        from e2e.nspawn import Container, unavailable_reason
    except ImportError as e:  # pragma: no cover - the tree always has it
        pytest.skip(f"tests/e2e/nspawn.py cannot be imported: {e}")
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"needs systemd booted in a container: {reason}")
    with Container(bind_ro=[(ROOT, PROJECT)], name_prefix="tcpmuxd-check") as c:
        for name in UNIT_NAMES:
            c.write_file(f"/etc/systemd/system/{name}", (ROOT / "units" / name).read_text())
        for name in ("tcpmuxd.service", "tcpmuxd-inetd@.service"):
            c.write_file(f"/etc/systemd/system/{name}.d/50-project.conf", PROJECT_DROPIN)
        c.write_file("/etc/tcpmuxd/conf.d/who.conf", USER_SERVICE)
        c.write_file("/etc/tcpmuxd/conf.d/plain.conf", "[Service]\nExec=/bin/true\n")
        c.systemctl("daemon-reload")
        yield c


def relax(c, unit: str, on: bool) -> None:
    path = f"/etc/systemd/system/{unit}.d/70-users.conf"
    if on:
        c.write_file(path, RELAX_DROPIN)
    else:
        c.remove_file(path)
    c.systemctl("daemon-reload")


def test_check_as_root_judges_by_the_shipped_unit(container):
    c = container
    r = c.exec(CHECK, env=CHECK_ENV)
    assert r.returncode == 1, f"--check passed a User= service the daemon refuses:\n{r.stdout}"
    assert judged(r.stdout) == ("not possible: tcpmuxd.service runs tcpmuxd as a dynamic user "
                                "(DynamicUser=yes), without CAP_SETUID and CAP_SETGID")
    assert "who.conf:3: User=: tcpmuxd cannot switch users here" in r.stdout, r.stdout
    assert "plain" in r.stdout

    # The daemon agrees: it refuses the same service, with the same words.
    c.systemctl("start", "tcpmuxd.socket", "tcpmuxd.service")
    try:
        running = c.exec(CHECK, env=CHECK_ENV)
        pid = c.systemctl("show", "tcpmuxd.service", "-P", "MainPID").stdout.strip()
        assert running.returncode == 1
        assert judged(running.stdout) == (f"not possible: tcpmuxd.service is running (pid {pid}) "
                                          "without CAP_SETUID and CAP_SETGID")
        journal = c.journal("-u", "tcpmuxd.service")
        assert "who.conf:3: User=: tcpmuxd cannot switch users here" in journal, journal
    finally:
        c.systemctl("stop", "tcpmuxd.service", "tcpmuxd.socket")


def test_check_follows_the_drop_in_and_the_mode(container):
    c = container
    relax(c, "tcpmuxd.service", True)
    try:
        r = c.exec(CHECK, env=CHECK_ENV)
        assert r.returncode == 0, r.stdout
        assert judged(r.stdout) == ("possible: tcpmuxd.service runs tcpmuxd as root, with "
                                    "CAP_SETUID and CAP_SETGID")
        # Accept=yes in use: its unit, still as shipped, decides
        c.systemctl("start", "tcpmuxd-inetd.socket")
        try:
            r = c.exec(CHECK, env=CHECK_ENV)
            assert r.returncode == 1, r.stdout
            assert judged(r.stdout) == (
                "not possible: tcpmuxd-inetd@.service runs tcpmuxd as a dynamic user "
                "(DynamicUser=yes), without CAP_SETUID and CAP_SETGID")
        finally:
            c.systemctl("stop", "tcpmuxd-inetd.socket")
    finally:
        relax(c, "tcpmuxd.service", False)


def test_check_run_by_systemd_judges_by_its_own_unit(container):
    """ExecStartPre=tcpmuxd --check, or systemd-run: the process has the unit's credentials."""
    c = container
    base = ["systemd-run", "--wait", "--pipe", "--quiet", "-p", "DynamicUser=yes",
            *[f"--setenv={k}={v}" for k, v in CHECK_ENV.items()]]
    r = c.exec([*base, *CHECK])
    assert r.returncode == 1, r.stdout + r.stderr
    assert judged(r.stdout) == "not possible: judged for this process, which systemd started"


def test_check_without_systemd_judges_by_this_process(public_dir, any_user_python):
    """Root and nobody each run --check on the same directory (one every user may read, and
    a tree nobody can run even from a clone in /root, mode 0700)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (util-linux) to compare root with another uid")
    conf = public_dir / "conf.d"
    conf.mkdir()
    conf.chmod(0o755)
    (conf / "who.conf").write_text(USER_SERVICE)
    (conf / "who.conf").chmod(0o644)
    argv = [any_user_python.python, "-m", "tcpmuxd", "--check", "--config-dir", str(conf)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": any_user_python.pythonpath}
    as_root = subprocess.run(argv, capture_output=True, text=True, env=env,
                             cwd=any_user_python.cwd, timeout=30)
    assert as_root.returncode == 0, as_root.stdout + as_root.stderr
    assert judged(as_root.stdout) == ("possible: judged for this process (uid 0): systemd does "
                                      "not run tcpmuxd here")
    nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             *argv], capture_output=True, text=True, env=env,
                            cwd=any_user_python.cwd, timeout=30)
    assert nobody.returncode == 1, nobody.stdout + nobody.stderr
    assert judged(nobody.stdout) == ("not possible: judged for this process (uid 65534): "
                                     "systemd does not run tcpmuxd here")
