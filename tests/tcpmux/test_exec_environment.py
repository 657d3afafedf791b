"""What an exec'd handler finds when it starts, checked from inside the handler.

tcpmuxd.conf(5), Exec=: the socket on fds 0 and 1 (and 2 unless StandardError= sends
it elsewhere), its own session, default signal dispositions and an empty signal mask, no other
inherited fds, User=/Group=/SupplementaryGroups= (plus the user's own groups), an environment
without systemd's private variables but with TCPMUX_SERVICE, the systemd and the UCSPI names of
the two ends, Environment= and WorkingDirectory=. And the bytes a client sends right behind the
name must reach the handler's stdin.

tcpmuxd execs handlers in three ways and every check runs in all of them:

* ``standalone``: the long-running daemon (``--listen``) forks the handler
  (handlers/process.py, spawn);
* ``accept``: ``systemd-socket-activate --accept``, connection as fd 3 with LISTEN_FDS=1, the
  tcpmuxd instance becomes the handler (handlers/process.py, exec_in_place);
* ``inetd``: ``systemd-socket-activate --accept --inetd``, connection on stdin/stdout.

tcpmuxd is started from a deliberately dirty state in every mode: SIGQUIT and SIGUSR1 ignored
(SIGQUIT is what ``tcpmuxd --listen ... &`` from a script leaves ignored), SIGUSR2 and SIGWINCH
blocked, systemd's variables (a NOTIFY_SOCKET that exists, stale LISTEN_*, WATCHDOG_*) in its
environment, and in the Accept=yes modes inheritable fds it did not ask for. A handler that
finds none of that got a clean start.

The probes:

* ``probe.sh`` (a /bin/sh script) reports its own /proc status (ids, session), the targets of its
  open fds, its cwd and its initial environment (/proc/$$/environ, base64), writes a marker line
  to stderr, then execs a small Python program that fstat()s fds 0-2, reports the socket ends and
  copies stdin to the report. dash keeps the script open on one fd >= 10 (the probe path); that
  is the only fd besides 0-2 allowed.
* ``/bin/cat /proc/self/status`` for the signal state: dash clears the signal mask and catches
  SIGINT/SIGCHLD at start-up, cat touches neither, so cat's status is exactly what tcpmuxd
  handed over at exec.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tcpmuxd_harness import (ROOT, PYTHON, LogFile, NotifySocket, free_port, read_all,
                             write_service)

pytestmark = pytest.mark.timeout(90)

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
IO_TIMEOUT = 10.0

#: Sent in the same segment as the name line: all of it must reach the handler's stdin.
PAYLOAD = b"payload right behind the name\x00\xff\r\nsecond line, no newline at the end"

IGNORED = (signal.SIGQUIT, signal.SIGUSR1)
BLOCKED = (signal.SIGUSR2, signal.SIGWINCH)

#: What tcpmuxd is given in its environment that no handler may see.
PRIVATE_JUNK = {
    "LISTEN_FDS": "2",
    "LISTEN_PID": "1",
    "LISTEN_FDNAMES": "junk:junk",
    "WATCHDOG_USEC": "60000000",
    "WATCHDOG_PID": "1",
}
#: Not systemd's names today, but in the families the issue names (LISTEN_*, WATCHDOG_*).
PRIVATE_FAMILY_JUNK = {"LISTEN_FDS_FIRST_FD": "3", "WATCHDOG_JUNK": "1"}
#: What tcpmuxd is given that handlers do inherit.
KEPT = {"TCPMUXD_TEST_KEPT": "kept value"}

PROBE_SH = r"""#!/bin/sh
echo "probe-stderr $TCPMUX_SERVICE $REMOTE_PORT" >&2
echo "=== status"
/bin/cat /proc/$$/status
echo "=== fds"
/bin/ls -l /proc/$$/fd
echo "=== cwd"
/bin/readlink /proc/$$/cwd
echo "=== environ"
/usr/bin/base64 -w0 /proc/$$/environ
echo
echo "=== sockets"
exec /usr/bin/python3 -I -S @SOCKINFO@
"""

SOCKINFO_PY = r"""
import json, os, socket, stat
report = {}
for fd in (0, 1, 2):
    st = os.fstat(fd)
    entry = {"sock": stat.S_ISSOCK(st.st_mode), "id": [st.st_dev, st.st_ino],
             "chr": stat.S_ISCHR(st.st_mode), "rdev": st.st_rdev}
    if entry["sock"]:
        s = socket.socket(fileno=os.dup(fd))
        entry["name"] = list(s.getsockname()[:2])
        entry["peer"] = list(s.getpeername()[:2])
        s.close()
    report[str(fd)] = entry
data = b""
while True:
    chunk = os.read(0, 65536)
    if not chunk:
        break
    data += chunk
report["stdin"] = data.hex()
os.write(1, (json.dumps(report) + "\n").encode())
"""


# --- the dirty start ------------------------------------------------------------------------


def dirty_signals() -> None:
    """preexec_fn: leave tcpmuxd with ignored and blocked signals, as careless parents do."""
    for signum in IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)


#: Runs under systemd-socket-activate: dirty the state, leak fds, then exec ``python -m tcpmuxd``
#: (same pid, so LISTEN_PID still matches).
DIRTY_EXEC = r"""
import os, signal, socket, sys
for signum in (signal.SIGQUIT, signal.SIGUSR1):
    signal.signal(signum, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGWINCH})
leak = os.open("/dev/null", os.O_RDONLY)
os.set_inheritable(leak, True)
os.dup2(leak, 57)
a, b = socket.socketpair()
a.set_inheritable(True)
b.set_inheritable(True)
os.execv(sys.executable, [sys.executable, "-m", "tcpmuxd", *sys.argv[1:]])
"""


# --- probes and services --------------------------------------------------------------------


@dataclass
class Probes:
    directory: Path  # world-readable: handlers may run as nobody
    probe: Path
    workdir: Path


@pytest.fixture
def probes() -> Iterator[Probes]:
    # tmp_path lives under /tmp/pytest-of-root (mode 0700): nobody could not run anything there.
    d = Path(tempfile.mkdtemp(prefix="tcpmuxd-probe-"))
    try:
        d.chmod(0o755)
        sockinfo = d / "sockinfo.py"
        sockinfo.write_text(SOCKINFO_PY)
        sockinfo.chmod(0o644)
        probe = d / "probe.sh"
        probe.write_text(PROBE_SH.replace("@SOCKINFO@", str(sockinfo)))
        probe.chmod(0o755)
        workdir = d / "work dir"
        workdir.mkdir()
        workdir.chmod(0o755)
        yield Probes(d, probe, workdir)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def user_with_own_groups() -> tuple[str, int, list[int]] | None:
    """A non-root account that is a member of some group besides its primary one."""
    for group in grp.getgrall():
        for member in group.gr_mem:
            try:
                entry = pwd.getpwnam(member)
            except KeyError:
                continue
            if entry.pw_uid == 0 or group.gr_gid == entry.pw_gid:
                continue
            return member, entry.pw_gid, os.getgrouplist(member, entry.pw_gid)
    return None


EXTRA_GID = 4242  # a numeric SupplementaryGroups= entry with no group database entry


@pytest.fixture
def config(services: Path, probes: Probes) -> Path:
    common = f"""
        [Service]
        Exec={probes.probe}
        """
    write_service(services, "probe.conf", common + f"""
        User=nobody
        Group=nogroup
        SupplementaryGroups=users
        SupplementaryGroups={EXTRA_GID}
        Environment="GREETING=hello world" PLAIN=1
        Environment=PLAIN=2
        WorkingDirectory={probes.workdir}
        """)
    write_service(services, "probe-socket.conf", common + "StandardError=socket\n")
    write_service(services, "probe-null.conf", common + "StandardError=null\n")
    write_service(services, "probe-root.conf", common)
    write_service(services, "sigprobe.conf", """
        [Service]
        Exec=/bin/cat /proc/self/status
        User=nobody
        Group=nogroup
        """)
    own = user_with_own_groups()
    if own is not None:
        write_service(services, "probe-own.conf", common + f"User={own[0]}\n")
    return services


# --- the three ways tcpmuxd runs ------------------------------------------------------------


@dataclass
class Server(LogFile):
    """tcpmuxd in one of its modes: where to connect and where its stderr goes."""

    mode: str
    port: int
    log_path: Path
    proc: subprocess.Popen


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def socket_activate(mode: str, config: Path, tmp_path: Path,
                    before_exec: str = "") -> Iterator[Server]:
    """tcpmuxd under systemd-socket-activate --accept [--inetd], started dirty (DIRTY_EXEC)."""
    if SOCKET_ACTIVATE is None:
        pytest.skip("systemd-socket-activate is not installed")
    port = free_port()
    notify = NotifySocket(tmp_path / "notify")
    log_path = tmp_path / f"socket-activate-{mode}.log"
    junk = {**PRIVATE_JUNK, **PRIVATE_FAMILY_JUNK}
    if mode == "accept":
        # systemd-socket-activate sets LISTEN_FDS/LISTEN_PID itself; --fdname gives the name
        # real systemd uses for Accept=yes connections.
        del junk["LISTEN_FDS"], junk["LISTEN_PID"], junk["LISTEN_FDNAMES"]
    env_args: list[str] = []
    for key, value in {**junk, **KEPT, "NOTIFY_SOCKET": str(notify.path),
                       "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}.items():
        env_args += ["-E", f"{key}={value}"]
    argv = [SOCKET_ACTIVATE, "--accept", *(["--inetd"] if mode == "inetd" else
                                            ["--fdname=connection"]),
            "-l", f"127.0.0.1:{port}", *env_args,
            PYTHON, "-c", before_exec + DIRTY_EXEC, "--config-dir", str(config)]
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    cwd=ROOT, start_new_session=True)
        try:
            srv = Server(mode, port, log_path, proc)
            srv.wait_for_log(f"Listening on 127.0.0.1:{port}", timeout=10)
            yield srv
        finally:
            _stop(proc)
    finally:
        notify.close()


@pytest.fixture(params=["standalone", "accept", "inetd"])
def server(request, config: Path, daemon_factory, tmp_path: Path) -> Iterator[Server]:
    mode = request.param
    if mode == "standalone":
        daemon = daemon_factory(config, env={**PRIVATE_JUNK, **PRIVATE_FAMILY_JUNK, **KEPT},
                                preexec_fn=dirty_signals)
        # NOTIFY_SOCKET is set by the Daemon fixture to a live notify socket.
        assert daemon.notify is not None
        yield Server(mode, daemon.port, daemon.log_path, daemon.proc)
        return
    with socket_activate(mode, config, tmp_path) as srv:
        yield srv


# --- the client side ------------------------------------------------------------------------


@dataclass
class Report:
    raw: bytes
    client_name: tuple[str, int]
    client_peer: tuple[str, int]
    ack: bool
    before: bytes  # anything ahead of the first section (stderr, when it is the socket)
    sections: dict[str, bytes]

    def status(self) -> dict[str, str]:
        return parse_status(self.sections["status"])

    def fds(self) -> dict[int, str]:
        out = {}
        for line in self.sections["fds"].decode().splitlines():
            m = re.search(r"\s(\d+) -> (.*)$", line)
            if m:
                out[int(m.group(1))] = m.group(2)
        return out

    def environ(self) -> dict[str, str]:
        raw = base64.b64decode(self.sections["environ"].strip())
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if item)

    def sockets(self) -> dict:
        return json.loads(self.sections["sockets"])


def parse_status(text: bytes) -> dict[str, str]:
    out = {}
    for line in text.decode().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key] = value.strip()
    return out


def converse(port: int, name: str, payload: bytes = PAYLOAD) -> tuple[bytes, tuple, tuple]:
    """Send the name and ``payload`` in one segment, half-close, read everything (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        me, peer = s.getsockname(), s.getpeername()
        s.sendall(name.encode() + b"\r\n" + payload)
        s.shutdown(socket.SHUT_WR)
        return read_all(s), me, peer


def run_probe(server: Server, name: str) -> Report:
    raw, me, peer = converse(server.port, name)
    body = raw
    ack = body.startswith(b"+\r\n")
    assert ack, f"no '+' from {server.mode} for {name}: {raw[:300]!r}\nlog:\n{server.output()}"
    body = body[3:]
    before, sep, rest = body.partition(b"=== ")
    assert sep, f"the probe did not run: {raw[:500]!r}\nlog:\n{server.output()}"
    sections: dict[str, bytes] = {}
    for chunk in (b"=== " + rest).split(b"=== ")[1:]:
        title, _, content = chunk.partition(b"\n")
        sections[title.decode()] = content
    missing = {"status", "fds", "cwd", "environ", "sockets"} - set(sections)
    assert not missing, f"probe sections {missing} missing: {raw[:1000]!r}"
    return Report(raw, me[:2], peer[:2], ack, before, sections)


def same_file(path: Path, ident: list[int]) -> bool:
    st = os.stat(path)
    return [st.st_dev, st.st_ino] == ident


def assert_socket_ends(report: Report, fds: tuple[int, ...]) -> None:
    info = report.sockets()
    for fd in fds:
        entry = info[str(fd)]
        assert entry["sock"], f"fd {fd} is not a socket: {entry}"
        assert entry["id"] == info["0"]["id"], f"fd {fd} is another socket than fd 0"
        # the handler's peer is this client, its own end is what the client connected to
        assert tuple(entry["peer"]) == tuple(report.client_name), entry
        assert tuple(entry["name"]) == tuple(report.client_peer), entry


# --- the tests ------------------------------------------------------------------------------


def test_socket_stdin_payload_and_no_other_fds(server: Server, probes: Probes) -> None:
    report = run_probe(server, "probe")
    assert_socket_ends(report, (0, 1))
    # every byte behind the name line reached stdin, nothing more, nothing less
    assert bytes.fromhex(report.sockets()["stdin"]) == PAYLOAD
    fds = report.fds()
    assert fds[0].startswith("socket:[") and fds[1] == fds[0], fds
    extra = {fd: target for fd, target in fds.items() if fd > 2}
    # dash keeps its script open on one fd >= 10; anything else was inherited
    leaked = {fd: t for fd, t in extra.items() if t != str(probes.probe)}
    assert not leaked, f"{server.mode}: the handler inherited fds {leaked} (all: {fds})"
    assert len(extra) <= 1, extra


def test_own_session(server: Server) -> None:
    status = run_probe(server, "probe").status()
    pid = status["Pid"]
    assert status["NSsid"] == pid, f"{server.mode}: handler is not a session leader: {status}"
    assert status["NSpgid"] == pid, status


def test_signals_default_and_unblocked(server: Server) -> None:
    raw, _, _ = converse(server.port, "sigprobe", payload=b"")
    assert raw.startswith(b"+\r\n"), raw[:200]
    status = parse_status(raw[3:])
    assert "SigBlk" in status, raw[:500]
    names = {
        key: sorted(signal.Signals(n + 1).name for n in range(64)
                    if int(status[key], 16) >> n & 1 and n + 1 in signal.valid_signals()
                    and n + 1 < signal.SIGRTMIN)
        for key in ("SigBlk", "SigIgn", "SigCgt")
    }
    assert int(status["SigBlk"], 16) == 0, f"{server.mode}: blocked in the handler: {names}"
    assert int(status["SigIgn"], 16) == 0, f"{server.mode}: ignored in the handler: {names}"
    assert int(status["SigCgt"], 16) == 0, names
    assert status["NSsid"] == status["Pid"], status


def test_user_group_and_supplementary_groups(server: Server) -> None:
    status = run_probe(server, "probe").status()
    nobody = pwd.getpwnam("nobody").pw_uid
    nogroup = grp.getgrnam("nogroup").gr_gid
    users = grp.getgrnam("users").gr_gid
    assert status["Uid"].split() == [str(nobody)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(nogroup)] * 4, status["Gid"]
    expected = set(os.getgrouplist("nobody", nogroup)) | {users, EXTRA_GID}
    assert {int(g) for g in status["Groups"].split()} == expected, status["Groups"]


def test_user_own_groups(server: Server) -> None:
    own = user_with_own_groups()
    if own is None:
        pytest.skip("no account on this host is a member of a secondary group (a fresh "
                    "minimal system has none; e.g. `gpasswd -a daemon users` makes one)")
    user, gid, groups = own
    status = run_probe(server, "probe-own").status()
    assert status["Uid"].split() == [str(pwd.getpwnam(user).pw_uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(gid)] * 4, status["Gid"]
    assert {int(g) for g in status["Groups"].split()} == set(groups), (user, status["Groups"])


def test_without_user_runs_as_tcpmuxd(server: Server) -> None:
    status = run_probe(server, "probe-root").status()
    assert status["Uid"].split() == ["0"] * 4


def test_environment(server: Server) -> None:
    report = run_probe(server, "probe")
    env = report.environ()
    systemds = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "WATCHDOG_PID",
                "WATCHDOG_USEC")
    private = {k: v for k, v in env.items() if k in systemds}
    assert not private, f"{server.mode}: systemd's variables reached the handler: {private}"
    client_host, client_port = report.client_name
    server_host, server_port = report.client_peer
    expected = {
        "TCPMUX_SERVICE": "probe",
        "REMOTE_ADDR": client_host,
        "REMOTE_PORT": str(client_port),
        "PROTO": "TCP",
        "TCPREMOTEIP": client_host,
        "TCPREMOTEPORT": str(client_port),
        "TCPLOCALIP": server_host,
        "TCPLOCALPORT": str(server_port),
        "GREETING": "hello world",
        "PLAIN": "2",
        "USER": "nobody",
        **KEPT,
    }
    got = {k: env.get(k) for k in expected}
    assert got == expected


def test_environment_without_any_listen_or_watchdog_variable(server: Server) -> None:
    env = run_probe(server, "probe").environ()
    leaked = {k: v for k, v in env.items() if k.startswith(("LISTEN_", "WATCHDOG_"))}
    assert not leaked, f"{server.mode}: {leaked}"


def test_working_directory(server: Server, probes: Probes) -> None:
    report = run_probe(server, "probe")
    assert report.sections["cwd"].decode().strip() == str(probes.workdir)


def stderr_marker(report: Report) -> bytes:
    return f"probe-stderr {report.environ()['TCPMUX_SERVICE']} {report.client_name[1]}\n".encode()


def test_stderr_journal_is_tcpmuxds_stderr(server: Server) -> None:
    report = run_probe(server, "probe")
    marker = stderr_marker(report)
    assert marker not in report.raw
    info = report.sockets()["2"]
    assert not info["sock"], f"{server.mode}: StandardError=journal put stderr on the socket"
    assert same_file(server.log_path, info["id"]), "fd 2 is not tcpmuxd's own stderr"
    server.wait_for_log(marker.decode().strip())


def test_stderr_socket(server: Server) -> None:
    report = run_probe(server, "probe-socket")
    assert_socket_ends(report, (0, 1, 2))
    assert report.before == stderr_marker(report), report.raw[:300]
    assert stderr_marker(report).decode().strip() not in server.output()


def test_stderr_null(server: Server) -> None:
    report = run_probe(server, "probe-null")
    info = report.sockets()["2"]
    assert info["chr"] and info["rdev"] == os.stat("/dev/null").st_rdev, info
    assert report.fds()[2] == "/dev/null"
    marker = stderr_marker(report)
    assert marker not in report.raw
    # The probe wrote the marker to its fd 2 before it wrote the report we have read, and a
    # write to tcpmuxd's log file would be in the file by then: no need to wait.
    assert marker.decode().strip() not in server.output()


@pytest.mark.parametrize("mode", ["accept", "inetd"])
def test_own_session_when_tcpmuxd_leads_a_process_group(mode: str, config: Path,
                                                        tmp_path: Path) -> None:
    with socket_activate(mode, config, tmp_path, before_exec="import os; os.setpgid(0, 0)\n") \
            as srv:
        status = run_probe(srv, "probe").status()
    assert status["NSsid"] == status["Pid"], status
