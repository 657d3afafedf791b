"""The Debian package, installed and used as an administrator would, under a real systemd.

The .deb is the one this pytest run builds (tests/packaging/pkg_helpers.py, built once per
session). Two containers boot systemd on a private, writable overlay of the host's root
(installed_rootfs.py: the host's enabled services and its policy-rc.d are taken out in the
overlay, nothing on the host changes), each in its own network namespace, joined by a veth
pair the test creates: "office" 192.0.2.1 and "branch" 192.0.2.2. The distribution's presets
apply (``presets=None``), as on a real installation. Stages, each timed (``-s`` shows them):

1. ``dpkg -i`` on both: tcpmuxd.socket is enabled and listening on port 1 afterwards (the
   package did it; ``systemctl enable --now tcpmuxd.socket`` is then a no-op), nothing else
   is. README's ``cp my-service.conf /etc/tcpmuxd/conf.d/ && systemctl
   try-reload-or-restart tcpmuxd``, typed as README has it before anything has connected,
   succeeds (``systemctl reload`` fails there); the first connection starts tcpmuxd.service,
   as its dynamic user, which serves that service; without it, ``tcpmux --list`` says the
   server lists no services (exit status 6). Commands an administrator types are taken
   from README.md (``documented_command``), so a README that says otherwise fails here.
2. office: services dropped into /etc/tcpmuxd/conf.d/, ``systemctl try-reload-or-restart
   tcpmuxd``, used
   through port 1 with the installed ``tcpmux`` client and with the test's own sockets; the
   hardened unit at work (handlers as the dynamic user; a ``User=`` service refused, the
   journal naming the drop-in that would allow it), then that drop-in applied with ``systemctl
   edit tcpmuxd.service`` (User=nobody works) and ``systemctl revert``-ed.
3. office: a vendor service in /usr/lib/tcpmuxd/conf.d/ (written by the test: the package
   ships none), then masked by a /dev/null symlink in /etc: HELP stops listing it.
   Then the PassTo= example, set up and taken down with README's commands (the daemon's
   socket unit from /usr/share/doc/tcpmuxd/examples): a client's lines come back in upper
   case through port 1, from tcpmuxd and the daemon each running as a dynamic user.
   office switches to one process per connection (Accept=yes) with README's command: one
   socket enabled, the other disabled; the records are under ``tcpmuxd-inetd@*``, none under
   ``tcpmuxd``; a package upgrade and a real reboot of the container (its root kept, as a
   machine's disk is) leave it so; then README's command back to the default.
4. ``systemctl enable --now sockmuxd@link`` on both, a tunnel over the veth pair (branch connects to
   office, with a shared secret), branch first: it returns at once although office is not up
   yet, and STATUS= and the journal say that branch is re-dialling, office that it waits for
   the peer, then both that the link is up; a 1 MiB stream from branch's entrance reaches office's
   tcpmuxd through port 1 and comes back, and a second entrance reaches office's services
   through the in-process ``tcpmux`` exit. Two containers rather than one and the host, so
   that both ends are the installed package under systemd, as in real use; and rather than
   two tunnels over loopback in one container, so that the link really crosses hosts.
   Then sockmuxd@link.socket is added to branch's running tunnel: the order that fails
   (``enable --now`` the socket while the tunnel runs, a restart) ends in exit status 78
   without a restart loop and a record that gives the order that works (units/README.md's
   commands), which then does.
5. ``dpkg --purge`` on both, with the tunnels and a spare tunnel's service and socket enabled:
   no tcpmuxd or sockmuxd process left (nor any of the dynamic user), no units loaded (not even
   ``not-found`` instances) or installed, no enablement links, port 1 and the tunnel's entrance
   closed.

About 20 s on 2 cores, 4 of them building the .deb (shared with tests/packaging). Skipped
(saying why) only where containers cannot be booted (nspawn.unavailable_reason: not root, no
systemd-nspawn, a chroot, a bare container does not boot) or joined (no veth pairs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .installed_rootfs import OverlayRootContainer, link_veth, veth_unavailable_reason
from .nspawn import Container

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "packaging"))
from pkg_helpers import built_deb  # noqa: E402  (a named module, see its docstring)

CONF_D = "/etc/tcpmuxd/conf.d"
VENDOR_D = "/usr/lib/tcpmuxd/conf.d"
SOCKMUX_D = "/etc/tcpmuxd/sockmux.d"
OFFICE, BRANCH = "192.0.2.1", "192.0.2.2"
LINK_PORT = 7000
ENTRANCE_TO_PORT_1, ENTRANCE_TO_TCPMUX_EXIT = 7001, 7002
#: systemd's range for DynamicUser=yes.
DYNAMIC_UIDS = range(61184, 65520)
ENV = {"DEBIAN_FRONTEND": "noninteractive"}
#: How long ``systemctl enable --now sockmuxd@NAME`` may take with the peer away (it took 60 s
#: when READY=1 waited for the link).
ENABLE_BOUND = 10.0
#: The command that applies changes to conf.d (README, tcpmuxd.conf(5)), in any state.
RELOAD = "systemctl try-reload-or-restart tcpmuxd"
#: units/README.md's one setting for handlers as other users.
RELAX_DROPIN = "[Service]\nDynamicUser=no\n"

TIMINGS: dict[str, float] = {}


def report(line: str) -> None:
    print(f"[installed] {line}", flush=True)


@contextlib.contextmanager
def stage(name: str):
    t0 = time.monotonic()
    try:
        yield
    finally:
        TIMINGS[name] = time.monotonic() - t0
        report(f"{name}: {TIMINGS[name]:.2f} s")


# --- helpers --------------------------------------------------------------------------------


@dataclass
class Site:
    office: Container
    branch: Container
    deb: Path

    @property
    def both(self) -> tuple[Container, Container]:
        return self.office, self.branch


#: The project's README, whose commands the administrator here types as they are written.
README = Path(__file__).resolve().parents[2] / "README.md"


def documented_command(pattern: str, doc: Path = README) -> str:
    """The one command line in ``doc``'s code blocks that ``pattern`` (a regular expression)
    finds, without its trailing comment: what an administrator following the document types."""
    blocks = re.findall(r"^```(?:sh)?\n(.*?)^```", doc.read_text(), re.M | re.S)
    lines = [re.sub(r"\s+#\s.*$", "", line).strip()
             for block in blocks for line in block.splitlines() if re.search(pattern, line)]
    assert len(lines) == 1, f"{doc.name}: {len(lines)} command lines match {pattern!r}: {lines}"
    return lines[0]


def documented_block(heading: str, number: int = 0, doc: Path = README) -> list[str]:
    """The command lines (comments cut) of the ``number``-th code block under ``heading``."""
    text = doc.read_text()
    section = text.split(f"\n{heading}\n", 1)[1]
    section = re.split(r"^#{1,3} ", section, maxsplit=1, flags=re.M)[0]
    blocks = re.findall(r"^```(?:sh)?\n(.*?)^```", section, re.M | re.S)
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in blocks[number].splitlines()
            if line.strip()]


def run_documented(c: Container, command: str, cwd: str = "/root") -> str:
    """Run a documented command line in a root shell in ``c``; it must succeed."""
    r = c.exec(["/bin/sh", "-c", f"cd {cwd} && {command}"], check=False)
    assert r.returncode == 0, f"{command!r} failed ({r.returncode}):\n{r.stdout}{r.stderr}"
    return r.stdout + r.stderr


def help_names(c: Container) -> list[str]:
    raw = c.talk(("127.0.0.1", 1), b"HELP\r\n")
    return [line.decode() for line in raw.split(b"\r\n") if line]


def request(c: Container, port: int, data: bytes, shut_wr: bool = False) -> tuple[bytes, bytes]:
    """(reply line, what followed it) of one TCPMUX request to 127.0.0.1:PORT inside ``c``."""
    raw = c.talk(("127.0.0.1", port), data, shut_wr=shut_wr)
    line, sep, rest = raw.partition(b"\r\n")
    assert sep, f"{data!r} to port {port}: no reply line in {raw!r}"
    return line, rest


def roundtrip(c: Container, port: int, head: bytes, payload: bytes) -> bytes:
    """Send head+payload (then EOF) from one thread while reading everything back."""
    s = c.connect(("127.0.0.1", port), timeout=30)
    errors: list[BaseException] = []

    def send():
        try:
            s.sendall(head + payload)
            s.shutdown(socket.SHUT_WR)
        except BaseException as e:  # re-raised below
            errors.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks = []
    with s:
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    sender.join(30)
    if errors:
        raise errors[0]
    return b"".join(chunks)


def show(c: Container, unit: str, *props: str) -> dict[str, str]:
    out = c.systemctl("show", unit, f"--property={','.join(props)}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def state(c: Container, verb: str, unit: str) -> str:
    return c.systemctl(verb, unit, check=False).stdout.strip()


def uid_of(c: Container, pid: str) -> int:
    status = c.read_file(f"/proc/{pid}/status").decode()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


#: An "editor" for systemctl edit: writes $DROPIN into the file it is given.
#: The file to edit is the last argument: systemd 257 (Debian 13) passes "+LINE FILE".
EDITOR = '#!/bin/sh\nfor file; do :; done\nprintf %s "$DROPIN" > "$file"\n'


def edit(c: Container, unit: str, dropin: str) -> None:
    """``systemctl edit UNIT`` as an admin would, the editor scripted (edit wants a tty)."""
    c.write_file("/run/e2e-editor", EDITOR, mode=0o755)
    c.exec(["script", "-qec", f"systemctl edit {unit}", "/dev/null"], check=True,
           env={"SYSTEMD_EDITOR": "/run/e2e-editor", "DROPIN": dropin})


def reload_until(c: Container, predicate, what: str) -> None:
    run_documented(c, RELOAD)
    # ExecReload=kill -HUP returns before tcpmuxd has re-read conf.d (no notify-reload on 252).
    c.wait_until(predicate, timeout=10, what=what)


#: Every process whose command line mentions the package's daemons, or that runs as a dynamic
#: user, as "pid uid argv" lines (the scanning process itself left out).
PROCESS_SCAN = r"""
import os, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        continue
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        uid = int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("Uid:")).split()[1])
    except (OSError, StopIteration):
        continue
    text = b" ".join(argv).decode(errors="replace")
    if "tcpmuxd" in text or "sockmuxd" in text or 61184 <= uid < 65520:
        print(pid, uid, text)
"""


def leftover_processes(c: Container) -> list[str]:
    out = c.exec(["python3", "-c", PROCESS_SCAN], check=True).stdout
    return out.splitlines()


# --- the two machines -----------------------------------------------------------------------


def on_both(site: Site, fn) -> list:
    """fn(container) on both containers at once (dpkg spends its time in maintainer scripts)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(fn, site.both))


@pytest.fixture(scope="module")
def site(nspawn_available, tmp_path_factory):
    reason = veth_unavailable_reason()
    if reason:
        pytest.skip(f"the two installed containers are joined by a veth pair: {reason}")
    t0 = time.monotonic()
    with stage("build the .deb (shared with tests/packaging, once per run)"):
        deb = built_deb(tmp_path_factory)
    report(f"package: {deb.name}, {deb.stat().st_size} bytes")
    with contextlib.ExitStack() as stack:
        with stage("boot office and branch (overlay roots), veth pair"):
            office, branch = (
                stack.enter_context(OverlayRootContainer(presets=None, name_prefix="tcpmuxd-inst",
                                                         log=report))
                for _ in range(2))
            link_veth(office, branch, name="tunnel0", address_a=OFFICE, address_b=BRANCH)
        yield Site(office, branch, deb)
        t_stop = time.monotonic()
    TIMINGS["stop both containers"] = time.monotonic() - t_stop
    TIMINGS["whole module"] = time.monotonic() - t0
    report("stage timings:\n" + "\n".join(f"  {s:7.2f} s  {n}" for n, s in TIMINGS.items()))


# --- 1. installation ------------------------------------------------------------------------


def test_install_enables_and_starts_the_socket(site):
    for c in site.both:
        c.write_file(f"/var/tmp/{site.deb.name}", site.deb.read_bytes())
    with stage("dpkg -i (both at once)"):
        results = on_both(site, lambda c: c.exec(["dpkg", "-i", f"/var/tmp/{site.deb.name}"],
                                                 env=ENV, check=True, timeout=120))
    report(f"dpkg -i on office:\n{results[0].stdout}{results[0].stderr}".rstrip())

    with stage("after installation: what the package enabled and started"):
        for c in site.both:
            assert state(c, "is-enabled", "tcpmuxd.socket") == "enabled"
            assert state(c, "is-active", "tcpmuxd.socket") == "active", "not started by postinst"
            assert state(c, "is-active", "tcpmuxd.service") == "inactive", "socket-activated"
            assert state(c, "is-enabled", "tcpmuxd-inetd.socket") == "disabled"
            assert state(c, "is-active", "tcpmuxd-inetd.socket") == "inactive"
            assert state(c, "is-enabled", "sockmuxd@link.service") == "disabled"
        c = site.office
        # As the admin would, per the README: a no-op here, since the package did it.
        run_documented(c, documented_command(r"^systemctl enable --now tcpmuxd\.socket\b"))
        assert state(c, "is-active", "tcpmuxd.service") == "inactive", "socket-activated"

    with stage("README's reload right after installation, before anything connected"):
        # README: "cp my-service.conf /etc/tcpmuxd/conf.d/ && systemctl ..." while
        # tcpmuxd.service does not run yet: it must succeed, and leave it not running.
        c.write_file("/root/my-service.conf", "[Service]\nExec=/bin/echo my service\n")
        command = documented_command(r"^cp my-service\.conf /etc/tcpmuxd/conf\.d/ ")
        run_documented(c, command)
        assert command.endswith(f"&& {RELOAD}"), "the README's command is the one used below"
        assert state(c, "is-active", "tcpmuxd.service") == "inactive"
        # The first connection starts tcpmuxd, which reads conf.d then.
        r = c.exec(["tcpmux", "127.0.0.1", "my-service"], check=True)
        assert r.stdout == "my service\n", r
        c.remove_file(f"{CONF_D}/my-service.conf")
        run_documented(c, RELOAD)
        c.wait_until(lambda: help_names(c) == [], timeout=10, what="my-service gone from HELP")
        # no services: tcpmux --list says so (issue 13, item 5), not silence and status 0
        r = c.exec(["tcpmux", "--list", "127.0.0.1"])
        assert (r.returncode, r.stdout) == (6, ""), r
        assert r.stderr == "tcpmux: 127.0.0.1: the server lists no services\n", r
        main = show(c, "tcpmuxd.service", "ActiveState", "MainPID", "StatusText")
        report(f"tcpmuxd.service after the first connection: {main}")
        assert main["ActiveState"] == "active"
        uid = uid_of(c, main["MainPID"])
        assert uid in DYNAMIC_UIDS, f"tcpmuxd runs as uid {uid}, not as its dynamic user"


# --- 2. a service of the admin's, reload, port 1 ---------------------------------------------


def test_conf_d_service_after_reload(site):
    c = site.office
    with stage("conf.d services, systemctl reload tcpmuxd"):
        c.write_file(f"{CONF_D}/hello.conf",
                     "[Service]\nDescription=test\nExec=/bin/echo hello from conf.d\n")
        c.write_file(f"{CONF_D}/cat.conf", "[Service]\nExec=/bin/cat\n")
        c.write_file(f"{CONF_D}/uid.conf", "[Service]\nExec=/usr/bin/id -u\n")
        c.write_file(f"{CONF_D}/whoami.conf", "[Service]\nExec=/usr/bin/id -un\nUser=nobody\n")
        cursor = c.journal_cursor()
        reload_until(c, lambda: "hello" in help_names(c), "hello in HELP after the reload")

    with stage("use them through port 1"):
        r = c.exec(["tcpmux", "127.0.0.1", "hello"], check=True)
        assert r.stdout == "hello from conf.d\n", r
        listed = c.exec(["tcpmux", "--list", "127.0.0.1"], check=True).stdout.split()
        assert listed == ["cat", "hello", "uid"], listed
        line, rest = request(c, 1, b"cat\r\nthrough port 1", shut_wr=True)
        assert (line[:1], rest) == (b"+", b"through port 1")
        line, rest = request(c, 1, b"uid\r\n")
        assert line[:1] == b"+" and int(rest) in DYNAMIC_UIDS, (line, rest)
        # The hardened unit cannot switch users: refused, and the journal says what to relax.
        line, rest = request(c, 1, b"whoami\r\n")
        assert line == b"-unknown service whoami", line
        entries = c.journal_since(cursor, "SYSLOG_IDENTIFIER=tcpmuxd")
        errors = [str(e.get("MESSAGE")) for e in entries if "whoami.conf" in str(e.get("MESSAGE"))]
        report(f"journal: {errors[:1]}")
        assert errors and "DynamicUser=no" in errors[0], errors
        check = c.exec(["tcpmuxd", "--check"])
        report(f"tcpmuxd --check (as root in a shell; it judges by tcpmuxd.service):\n"
               f"{check.stdout}")
        # --check says what the daemon does, not what a root shell could (issue 12, item 9)
        assert check.returncode == 1, check
        assert "whoami.conf:3: User=: tcpmuxd cannot switch users" in check.stdout, check

    with stage("systemctl edit tcpmuxd.service: DynamicUser=no, as the journal says; revert"):
        edit(c, "tcpmuxd.service", RELAX_DROPIN)
        c.systemctl("restart", "tcpmuxd.service")
        assert request(c, 1, b"whoami\r\n") == (b"+", b"nobody\n")
        assert request(c, 1, b"uid\r\n") == (b"+", b"0\n")
        # Back to the unit as shipped for the rest.
        c.systemctl("revert", "tcpmuxd.service")
        c.systemctl("restart", "tcpmuxd.service")
        line, rest = request(c, 1, b"uid\r\n")
        assert line[:1] == b"+" and int(rest) in DYNAMIC_UIDS, (line, rest)


# --- 3. masking a vendor service ----------------------------------------------------------


def test_mask_vendor_service(site):
    c = site.office
    with stage("vendor service in /usr/lib/tcpmuxd/conf.d, reload"):
        # Test-only: the package ships no vendor services, so the test plays the vendor.
        c.write_file(f"{VENDOR_D}/vendor-echo.conf",
                     "[Service]\nExec=/bin/echo from the vendor\n")
        reload_until(c, lambda: "vendor-echo" in help_names(c), "vendor-echo in HELP")
        assert request(c, 1, b"vendor-echo\r\n") == (b"+", b"from the vendor\n")

    with stage("mask it: /etc/tcpmuxd/conf.d/vendor-echo.conf -> /dev/null, reload"):
        c.exec(["ln", "-s", "/dev/null", f"{CONF_D}/vendor-echo.conf"], check=True)
        reload_until(c, lambda: "vendor-echo" not in help_names(c), "vendor-echo gone from HELP")
        assert help_names(c) == ["cat", "hello", "uid"]
        line, _ = request(c, 1, b"vendor-echo\r\n")
        assert line == b"-unknown service vendor-echo", line
        # exit status 1: whoami.conf (User=) from the stage above, which this unit cannot serve
        check = c.exec(["tcpmuxd", "--check"]).stdout
        assert f"{CONF_D}/vendor-echo.conf (masks {VENDOR_D}/vendor-echo.conf)" in check, check


# --- 3b. the PassTo= example ------------------------------------------------------------------


#: README's section with the commands that set the example up, and take it down again.
PASS_TO_EXAMPLE = "### The PassTo= example"
UPPER_SOCKET = "/run/tcpmuxd-examples/upper.sock"


def upper_works(c: Container) -> None:
    """The example, through port 1: the daemon's greeting, then the line in upper case."""
    line, rest = request(c, 1, b"upper\r\nthrough port 1\n", shut_wr=True)
    assert line == b"+", (line, rest)
    assert re.fullmatch(rb"hello 127\.0\.0\.1 \d+, this is upper\r\nTHROUGH PORT 1\n", rest), rest


def test_pass_to_example(site):
    c = site.office
    with stage("the PassTo= example, set up with README's commands"):
        *setup, try_it = documented_block(PASS_TO_EXAMPLE)
        cwd = "/"
        for command in setup:
            if command.startswith("cd "):
                cwd = command[3:]
                continue
            run_documented(c, command, cwd=cwd)
        out = run_documented(c, try_it, cwd=cwd)
        report(f"{try_it}: {out!r}")
        assert re.fullmatch(r"hello (::1|127\.0\.0\.1) \d+, this is upper\r?\nHELLO, DAEMON\n", out), out
        upper_works(c)
        # How it works: systemd made the socket writable by others, and both ends are
        # unprivileged: tcpmuxd and the example daemon each run as a dynamic user.
        mode = c.exec(["stat", "-c", "%a", UPPER_SOCKET], check=True).stdout.strip()
        assert mode == "666", mode
        daemon = show(c, "upper-daemon.service", "ActiveState", "MainPID")
        assert daemon["ActiveState"] == "active", daemon
        assert uid_of(c, daemon["MainPID"]) in DYNAMIC_UIDS
        # It stays for the next test: through both modes and a reboot, then it is removed.


def remove_pass_to_example(c: Container) -> None:
    for command in documented_block(PASS_TO_EXAMPLE, 1):
        run_documented(c, command)
    assert state(c, "is-active", "upper-daemon.service") == "inactive"
    c.wait_until(lambda: "upper" not in help_names(c), timeout=10, what="upper gone from HELP")
    assert c.exec(["test", "-e", UPPER_SOCKET]).returncode == 1, "the socket is still there"


# --- 3c. switching modes, and a reboot ----------------------------------------------------------

#: README's commands that switch to one process per connection (Accept=yes), and back.
TO_INETD = r"\benable --now tcpmuxd-inetd\.socket\b"
TO_DEFAULT = r"tcpmuxd-inetd\.socket .*\benable --now tcpmuxd\.socket\b"


def enabled_and_active(c: Container) -> dict[str, tuple[str, str]]:
    return {u: (state(c, "is-enabled", u), state(c, "is-active", u))
            for u in ("tcpmuxd.socket", "tcpmuxd-inetd.socket")}


def records(c: Container, cursor: str, *selection: str) -> list[dict]:
    """tcpmuxd's connection records (with TCPMUX_SERVICE) since ``cursor``, as ``journalctl
    SELECTION`` shows them."""
    out = c.exec(["journalctl", "--no-pager", "-o", "json", f"--cursor={cursor}", *selection],
                 check=True).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if "TCPMUX_SERVICE" in e and e.get("__CURSOR") != cursor]


def test_switch_modes_and_reboot(site):
    c = site.office
    inetd = {"tcpmuxd.socket": ("disabled", "inactive"),
             "tcpmuxd-inetd.socket": ("enabled", "active")}
    default = {"tcpmuxd.socket": ("enabled", "active"),
               "tcpmuxd-inetd.socket": ("disabled", "inactive")}
    with stage("to Accept=yes with README's command; the records are the instances'"):
        cursor = c.journal_cursor()
        run_documented(c, documented_command(TO_INETD))
        assert enabled_and_active(c) == inetd
        assert c.exec(["tcpmux", "127.0.0.1", "hello"], check=True).stdout == "hello from conf.d\n"
        upper_works(c)
        assert state(c, "is-active", "tcpmuxd.service") == "inactive"

        def logged():
            found = records(c, cursor, "-u", "tcpmuxd-inetd@*")
            return found if {e["TCPMUX_SERVICE"] for e in found} >= {"hello", "upper"} else None
        found = c.wait_until(logged, timeout=10, what="Accept=yes records under tcpmuxd-inetd@*")
        report("journalctl -u 'tcpmuxd-inetd@*': " + "; ".join(
            f"{e['_SYSTEMD_UNIT']}: {e['MESSAGE']}" for e in found))
        assert all(e["_SYSTEMD_UNIT"].startswith("tcpmuxd-inetd@") for e in found)
        assert records(c, cursor, "-u", "tcpmuxd") == [], "tcpmuxd.service served nothing"
        assert len(records(c, cursor, "-t", "tcpmuxd")) == len(found)

    with stage("a package upgrade (dpkg -i again) keeps the choice"):
        c.exec(["dpkg", "-i", f"/var/tmp/{site.deb.name}"], env=ENV, check=True, timeout=120)
        assert enabled_and_active(c) == inetd

    with stage("reboot: still Accept=yes"):
        seconds = c.reboot()
        report(f"office rebooted in {seconds:.2f} s")
        assert enabled_and_active(c) == inetd
        assert c.exec(["tcpmux", "127.0.0.1", "hello"], check=True).stdout == "hello from conf.d\n"
        upper_works(c)

    with stage("back to Accept=no with README's command"):
        run_documented(c, documented_command(TO_DEFAULT))
        assert enabled_and_active(c) == default
        upper_works(c)
        assert state(c, "is-active", "tcpmuxd.service") == "active"

    with stage("the PassTo= example removed with README's commands"):
        remove_pass_to_example(c)

    # The reboot took office's end of the veth pair, and with it branch's.
    link_veth(site.office, site.branch, name="tunnel0", address_a=OFFICE, address_b=BRANCH)


# --- 4. a sockmuxd tunnel between the two ------------------------------------------------------


def test_sockmuxd_tunnel(site):
    office, branch = site.both
    secret = hashlib.sha256(os.urandom(32)).hexdigest() + "\n"
    common = f"Secret={SOCKMUX_D}/link.secret\nKeepAliveSec=5s\nDeadPeerSec=15s\n"
    cursors = [c.journal_cursor() for c in site.both]
    with stage("sockmuxd: tunnel files, sockmuxd --check"):
        for c in site.both:
            c.write_file(f"{SOCKMUX_D}/link.secret", secret, mode=0o600)
        office.write_file(f"{SOCKMUX_D}/link.conf", (
            "[Tunnel]\nDescription=office, the receptor\n"
            f"Accept={OFFICE}:{LINK_PORT}\n{common}"
            f"Exit={ENTRANCE_TO_TCPMUX_EXIT}=tcpmux\nExit=127.0.0.1:1\n"))
        branch.write_file(f"{SOCKMUX_D}/link.conf", (
            "[Tunnel]\nDescription=branch, the connector\n"
            f"Connect={OFFICE}:{LINK_PORT}\n{common}ReconnectMaxSec=2s\n"
            f"Entrance={ENTRANCE_TO_PORT_1}\nEntrance={ENTRANCE_TO_TCPMUX_EXIT}\n"))
        for c in site.both:
            r = c.exec(["sockmuxd", "--check", "link"])
            assert r.returncode == 0, f"{r.stdout}{r.stderr}"

    with stage("systemctl enable --now sockmuxd@link: branch first, office not up: at once"):
        # READY=1 once listening or dialling (issue 13, item 1): enabling either end first
        # returns at once, and systemctl status says what the link is doing.
        for c, idle in ((branch, r"(connecting to|re-dialling: connecting to) "),
                        (office, r"(waiting for the peer on |link )")):
            t0 = time.monotonic()
            c.systemctl("enable", "--now", "sockmuxd@link.service", timeout=ENABLE_BOUND + 30)
            seconds = time.monotonic() - t0
            s = show(c, "sockmuxd@link.service", "ActiveState", "SubState", "StatusText")
            report(f"{c.machine}: enable --now returned in {seconds:.2f} s: {s}")
            assert seconds < ENABLE_BOUND, f"{c.machine}: enable --now took {seconds:.1f} s"
            assert (s["ActiveState"], s["SubState"]) == ("active", "running"), s
            assert re.match(idle + re.escape(f"{OFFICE}:{LINK_PORT}") + "|link ",
                            s["StatusText"]), s
            if c is branch:  # no peer yet: the failures so far, in STATUS= and the journal
                c.wait_until(lambda: re.match(
                    rf"re-dialling: connecting to {re.escape(OFFICE)}:{LINK_PORT} failed "
                    r"\d+ times? in a row", show(c, "sockmuxd@link.service", "StatusText")[
                        "StatusText"]), timeout=10, what="branch's STATUS= says re-dialling")
                failed = c.journal_since(cursors[1], "SOCKMUX_EVENT=link-failed")
                assert failed and failed[0]["SOCKMUX_FAILURES"] == "1", failed
        for c in site.both:
            c.wait_until(lambda c=c: show(c, "sockmuxd@link.service", "StatusText")[
                "StatusText"].startswith("link up to "), timeout=20, what="link up")

    with stage("a 1 MiB stream: branch entrance -> link -> office port 1 -> cat, and back"):
        payload = os.urandom(1 << 20)
        t0 = time.monotonic()
        raw = roundtrip(branch, ENTRANCE_TO_PORT_1, b"cat\r\n", payload)
        seconds = time.monotonic() - t0
        line, _, rest = raw.partition(b"\r\n")
        assert line[:1] == b"+", raw[:200]
        assert len(rest) == len(payload) and rest == payload, f"{len(rest)} bytes came back"
        report(f"1 MiB each way through the tunnel in {seconds:.2f} s")

    with stage("the in-process tcpmux exit"):
        line, rest = request(branch, ENTRANCE_TO_TCPMUX_EXIT, b"hello\r\n")
        assert (line[:1], rest) == (b"+", b"hello from conf.d\n"), (line, rest)

    with stage("one journal record per stream, on both sides"):
        for c, cursor in zip(site.both, cursors, strict=True):
            def records(c=c, cursor=cursor):
                entries = c.journal_since(cursor, "SYSLOG_IDENTIFIER=sockmuxd")
                found = [e for e in entries if "SOCKMUX_BYTES_SENT" in e]
                return found if len(found) >= 2 else None
            found = c.wait_until(records, timeout=10, what="two stream records")
            report(f"{c.machine}: " + "\n  ".join(str(e.get("MESSAGE")) for e in found))
            assert len(found) == 2, found
            big = max(int(e["SOCKMUX_BYTES_SENT"]) for e in found)
            assert big >= len(payload), found


# --- 4b. the tunnel's socket unit, added to the running tunnel ---------------------------------

#: units/README.md, where the order of commands that add sockmuxd@NAME.socket is written.
UNITS_README = Path(__file__).resolve().parents[2] / "units" / "README.md"
SOCKET_ENTRANCE = 7003


def test_socket_unit_added_to_a_running_tunnel(site):
    """Issue 13, item 2: sockmuxd@link.socket added the way that fails (enable --now while the
    tunnel runs, then a restart) ends in one failed start with exit status 78, no restart loop,
    and a journal record with the commands that work; those, from units/README.md, work."""
    branch = site.branch
    unit = "sockmuxd@link.service"
    with stage("branch: Entrance=fd:entrance and a port for sockmuxd@link.socket"):
        conf = branch.read_file(f"{SOCKMUX_D}/link.conf").decode()
        branch.write_file(f"{SOCKMUX_D}/link.conf", conf + "Entrance=fd:entrance\n")
        branch.write_file("/etc/systemd/system/sockmuxd@link.socket.d/ports.conf",
                          f"[Socket]\nListenStream=127.0.0.1:{SOCKET_ENTRANCE}\n")
        branch.systemctl("daemon-reload")
        cursor = branch.journal_cursor()

    with stage("the wrong order: enable --now the socket, restart the tunnel: 78, no loop"):
        r = branch.systemctl("enable", "--now", "sockmuxd@link.socket", check=False)
        report(f"enable --now sockmuxd@link.socket while the tunnel runs: {r.returncode}, "
               f"{r.stderr.strip()!r}")
        assert r.returncode != 0, "systemd started a socket unit whose service runs"
        r = branch.systemctl("restart", unit, check=False)
        s = show(branch, unit, "ActiveState", "SubState", "Result", "ExecMainStatus",
                 "NRestarts")
        report(f"systemctl restart {unit}: {r.returncode}; {s}")
        # failed for good, not "activating (auto-restart)": RestartPreventExitStatus=78
        assert (s["ActiveState"], s["ExecMainStatus"], s["NRestarts"]) == ("failed", "78", "0"), s
        records = branch.journal_since(cursor, "SOCKMUX_EVENT=config-error")
        assert len(records) == 1, records
        message = records[0]["MESSAGE"]
        report(f"journal: {message}")
        assert "the socket unit was not running when this service started" in message
        assert "FileDescriptorName" not in message, "it was set: the name was not the problem"

    with stage("the order units/README.md and the record give: the new entrance works"):
        documented = documented_command(r"^systemctl stop sockmuxd@NAME\.service && ",
                                        doc=UNITS_README)
        command = documented.replace("NAME", "link")
        assert command in message, (command, message)
        run_documented(branch, command)
        s = show(branch, unit, "ActiveState", "SubState")
        assert (s["ActiveState"], s["SubState"]) == ("active", "running"), s
        assert state(branch, "is-active", "sockmuxd@link.socket") == "active"
        branch.wait_until(lambda: show(branch, unit, "StatusText")["StatusText"].startswith(
            "link up to "), timeout=20, what="the link up again")
        line, rest = request(branch, SOCKET_ENTRANCE, b"hello\r\n")
        assert (line[:1], rest) == (b"+", b"hello from conf.d\n"), (line, rest)


# --- 5. purge -------------------------------------------------------------------------------


def test_purge_leaves_nothing_running(site):
    office, branch = site.both
    # Instances enabled for the next boot, not started: a tunnel's entrance socket too.
    office.systemctl("enable", "sockmuxd@spare.socket", "sockmuxd@spare.service")
    for c in site.both:
        wanted = c.exec("find /etc/systemd/system -type l -name 'sockmuxd@*'", check=True).stdout
        report(f"{c.machine}: enabled before the purge:\n{wanted.strip()}")
    with stage("dpkg --purge (both at once)"):
        results = on_both(site, lambda c: c.exec(["dpkg", "--purge", "tcpmuxd"], env=ENV,
                                                 check=True, timeout=120))
    report(f"dpkg --purge on office:\n{results[0].stdout}{results[0].stderr}".rstrip())

    with stage("after the purge: processes, units, ports"):
        for c in site.both:
            assert leftover_processes(c) == [], f"{c.machine}: processes left"
            loaded = c.systemctl("list-units", "--all", "--plain", "--no-legend",
                                 "tcpmuxd*", "sockmuxd*").stdout.strip()
            assert loaded == "", f"{c.machine}: units still loaded:\n{loaded}"
            # (exits 1 when nothing matches)
            files = c.systemctl("list-unit-files", "--no-legend", "tcpmuxd*", "sockmuxd*",
                                check=False).stdout.strip()
            assert files == "", f"{c.machine}: unit files left:\n{files}"
            links = c.exec("find /etc/systemd/system -type l \\( -name 'tcpmuxd*' -o "
                           "-name 'sockmuxd*' \\)", check=True).stdout.strip()
            assert links == "", f"{c.machine}: enablement symlinks left:\n{links}"
            status = c.exec(["dpkg-query", "-W", "-f=${db:Status-Status}", "tcpmuxd"]).stdout
            assert status in ("", "not-installed"), status
            for path in ("/usr/bin/tcpmuxd", "/usr/bin/sockmuxd",
                         "/lib/systemd/system/tcpmuxd.socket",
                         "/usr/lib/python3/dist-packages/tcpmuxd"):
                assert c.exec(["test", "!", "-e", path]).returncode == 0, f"{path} left"
            with pytest.raises(ConnectionRefusedError):
                c.connect(("127.0.0.1", 1)).close()
            left = c.exec("find /etc/tcpmuxd /usr/lib/tcpmuxd 2>/dev/null; true").stdout.split()
            report(f"{c.machine}: left in /etc/tcpmuxd, /usr/lib/tcpmuxd (the admin's own files,"
                   f" which dpkg keeps): {left}")
        with pytest.raises(ConnectionRefusedError):
            branch.connect(("127.0.0.1", ENTRANCE_TO_PORT_1)).close()
