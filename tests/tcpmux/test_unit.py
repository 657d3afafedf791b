"""Unit=: tcpmuxd hands the client to a unit's tcpmuxd-handler, which runs the handler.

No systemd instance is needed for these: the unit's socket is made by systemd's own
``systemd-socket-activate -l PATH`` (Accept=no, as tcpmuxd-handler@.socket), which passes it
to the real helper program (LISTEN_FDS), and tcpmuxd runs standalone on loopback with real TCP
clients. The units under a booted systemd (users, MemoryMax=) are in tests/e2e.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from privileges import as_nobody
from tcpmuxd_harness import ROOT, read_all, write_service
from test_sni import EXEC_HANDLER, Cert, cert, client_context, https_get  # noqa: F401

from tcpmuxd import passfd

WAIT = 10.0  # bound of every wait
HELPER = [sys.executable, "-m", "tcpmuxd.tcpmux.unit_helper"]


def _activate() -> str:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed (apt-get install systemd)")
    return tool


class Unit:
    """A unit's socket held by systemd-socket-activate, which starts tcpmuxd-handler (or
    ``program``) on the first connection; ``pid`` is the helper's (the tool execs it)."""

    def __init__(self, path: Path, command: list[str], *options: str,
                 program: list[str] | None = None) -> None:
        self.path = path
        self.log_path = path.with_suffix(".log")
        self.log = open(self.log_path, "w+b")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
        env["PYTHONPATH"] = str(ROOT)
        argv = program if program is not None else [*HELPER, *options, "--", *command]
        self.proc = subprocess.Popen([_activate(), "-l", str(path), *argv], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        deadline = time.monotonic() + WAIT
        while not path.exists():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "the socket did not appear"
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str) -> str:
        deadline = time.monotonic() + WAIT
        while text not in self.output():
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.output()}"
            time.sleep(0.02)
        return self.output()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, 9)  # handlers still running
        except ProcessLookupError:
            pass
        self.log.close()


@pytest.fixture
def units(tmp_path: Path):
    started: list[Unit] = []

    def start(name: str, command: list[str], *options: str, **kw) -> Unit:
        unit = Unit(tmp_path / f"{name}.sock", command, *options, **kw)
        started.append(unit)
        return unit

    yield start
    for unit in started:
        unit.stop()


def tcp_reply(port: int, data: bytes, shut: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        return read_all(s)


# --------------------------------------------------------------------------- served


def test_handler_runs_as_a_child_of_the_helper_with_exec_environment(
        services: Path, daemon_factory, units):
    """The real helper, over the unit's real unix socket, for a real TCP client: ``+`` from
    the handler's process, Exec='s variables, the bytes behind the name, the helper as the
    handler's parent (so the handler is in the unit's control group), and tcpmuxd's record
    with the handler's pid and exit status."""
    script = ('echo "$PPID $TCPMUX_SERVICE $PROTO $REMOTE_ADDR $REMOTE_PORT $TCPREMOTEIP '
              '$TCPLOCALPORT ${LISTEN_FDS:-none} ${NOTIFY_SOCKET:-none}"; exec cat')
    unit = units("env", ["/bin/sh", "-c", script])
    write_service(services, "env.conf", f"[Service]\nUnit={unit.path}\n")
    d = daemon_factory(services)
    with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as s:
        s.sendall(b"ENV\r\nbehind the name")
        s.shutdown(socket.SHUT_WR)
        client_port = s.getsockname()[1]
        reply = read_all(s)
    assert reply == (f"+\r\n{unit.pid} env TCP 127.0.0.1 {client_port} 127.0.0.1 {d.port} "
                     "none none\nbehind the name").encode(), reply
    log = d.wait_for_log(" exit 0, ")
    pid = re.search(rf"127\.0\.0\.1:{client_port} ENV: accepted, handler pid (\d+) in "
                    rf"unix:{unit.path}, exit 0, ", log)
    assert pid, log
    unit.wait_for_log(f"127.0.0.1:{client_port} env: pid {pid.group(1)} exit 0")


def test_acknowledge_no_leaves_the_reply_to_the_handler(services: Path, daemon_factory, units):
    unit = units("own", ["/bin/sh", "-c", "printf '+mine\\r\\n'; exec cat"])
    write_service(services, "own.conf", f"[Service]\nUnit={unit.path}\nAcknowledge=no\n")
    d = daemon_factory(services)
    assert tcp_reply(d.port, b"own\r\nx") == b"+mine\r\nx"


def test_a_tls_client_routed_by_its_server_name_gets_no_plus_line(
        services: Path, daemon_factory, units, cert: Cert, tmp_path: Path):
    """ServerName= with Unit=: the helper's handler gets the ClientHello untouched and speaks
    TLS from its first byte, so nobody may write a "+" line before it (the helper is told
    via=sni); the client's TLS handshake would fail on one."""
    script = tmp_path / "tls_handler.py"
    script.write_text(EXEC_HANDLER)
    unit = units("tls", [sys.executable, str(script), str(cert.cert), str(cert.key)])
    write_service(services, "tls.conf",
                  f"[Service]\nUnit={unit.path}\nServerName=unit.example.test\n")
    d = daemon_factory(services)
    body = https_get(d.port, "unit.example.test", client_context(cert))
    assert body == b"exec unit.example.test\n"
    d.wait_for_log(" unit.example.test (sni): accepted, handler pid ")


def test_max_connections_counts_running_handlers(services: Path, daemon_factory, units):
    """tcpmuxd keeps the helper's connection until the handler ends, so its limits count
    handlers running in the unit (MaxConnections=1: the second is refused until the first
    ends)."""
    unit = units("cat", ["/bin/cat"])
    write_service(services, "cat.conf", f"[Service]\nUnit={unit.path}\nMaxConnections=1\n")
    d = daemon_factory(services)
    with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as first:
        first.sendall(b"cat\r\n")
        assert first.recv(3) == b"+\r\n"
        assert tcp_reply(d.port, b"cat\r\n").startswith(b"-service busy"), d.output()
        first.sendall(b"ping")
        assert first.recv(4) == b"ping"
    d.wait_for_log(" exit 0, ")
    assert tcp_reply(d.port, b"cat\r\nagain") == b"+\r\nagain"


def test_max_handlers_at_its_edge(services: Path, daemon_factory, units):
    """--max-handlers 1: one handler runs, the next is refused with the reason (nothing sent
    before the ``-``), and one more is served once the first has ended."""
    unit = units("cat", ["/bin/cat"], "--max-handlers", "1")
    write_service(services, "cat.conf", f"[Service]\nUnit={unit.path}\n")
    d = daemon_factory(services)
    with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as first:
        first.sendall(b"cat\r\n")
        assert first.recv(3) == b"+\r\n"
        assert tcp_reply(d.port, b"cat\r\n") == (
            b"-handler failed to start: too many handlers running in this unit (1, "
            b"tcpmuxd-handler --max-handlers)\r\n")
    d.wait_for_log(" exit 0, ")
    assert tcp_reply(d.port, b"cat\r\nagain") == b"+\r\nagain"
    unit.wait_for_log("refused: too many handlers running")


# --------------------------------------------------------------------------- refused


def test_unit_socket_missing(services: Path, daemon_factory, tmp_path: Path):
    write_service(services, "gone.conf", f"[Service]\nUnit={tmp_path}/nothing.sock\n")
    d = daemon_factory(services)
    assert tcp_reply(d.port, b"gone\r\n") == b"-service unavailable: No such file or directory\r\n"
    d.wait_for_log("gone: refused: service unavailable: No such file or directory")


def test_unit_socket_refusing(services: Path, daemon_factory, tmp_path: Path):
    """A socket file nothing listens on (a socket unit that failed and left it)."""
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listening: connect() is refused
        write_service(services, "dead.conf", f"[Service]\nUnit={path}\n")
        d = daemon_factory(services)
        assert tcp_reply(d.port, b"dead\r\n") == b"-service unavailable: Connection refused\r\n"


def test_helper_that_cannot_be_executed(services: Path, daemon_factory, units):
    """The unit's program fails to exec (a unit that cannot start): the connection closes
    without an answer, and the client gets ``-``, never a ``+``."""
    unit = units("broken", [], program=["/nonexistent/tcpmuxd-handler"])
    write_service(services, "broken.conf", f"[Service]\nUnit={unit.path}\n")
    d = daemon_factory(services)
    assert tcp_reply(d.port, b"broken\r\n") == (
        f"-handler failed to start: unix:{unit.path} closed the connection without starting "
        "it\r\n").encode()


@pytest.mark.parametrize("command, reason", [
    ([], "no command: give it after tcpmuxd-handler in ExecStart= of the unit's drop-in"),
    (["{tmp}/data"], "bad command: {tmp}/data: not executable"),
    (["date"], "bad command: the program must be an absolute path, got 'date'"),
])
def test_helper_without_a_command_it_can_run(services: Path, daemon_factory, units,
                                             tmp_path: Path, command: list[str], reason: str):
    (tmp_path / "data").write_text("not a program\n")
    command = [word.format(tmp=tmp_path) for word in command]
    reason = reason.format(tmp=tmp_path)
    unit = units("cmd", command)
    write_service(services, "cmd.conf", f"[Service]\nUnit={unit.path}\n")
    d = daemon_factory(services)
    assert tcp_reply(d.port, b"cmd\r\n") == f"-handler failed to start: {reason}\r\n".encode()
    unit.wait_for_log(f"every connection will be refused: {reason}")


def test_unit_that_does_not_answer_in_time(services: Path, daemon_factory, tmp_path: Path):
    """A unit that takes the connection but never commits: ``-`` after ConnectTimeoutSec=."""
    path = tmp_path / "mute.sock"
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(str(path))
    mute.listen()
    held: list[socket.socket] = []
    thread = threading.Thread(target=lambda: held.append(mute.accept()[0]), daemon=True)
    thread.start()
    try:
        write_service(services, "mute.conf",
                      f"[Service]\nUnit={path}\nConnectTimeoutSec=300ms\n")
        d = daemon_factory(services)
        started = time.monotonic()
        assert tcp_reply(d.port, b"mute\r\n") == (
            f"-handler failed to start: unix:{path} did not answer within 0.3s\r\n").encode()
        assert 0.3 <= time.monotonic() - started < WAIT
    finally:
        thread.join(WAIT)
        for s in (*held, mute):
            s.close()


def test_a_commit_cannot_arrive_once_tcpmuxd_gave_up():
    """What the race-free give-up relies on (handlers/unit.py): after the reader's
    shutdown(SHUT_RD) the helper's write fails, and what was queued before is still read."""
    reader, writer = socket.socketpair()
    with reader, writer:
        writer.send(passfd.answer(passfd.COMMITTED, "42"))
        reader.shutdown(socket.SHUT_RD)
        with pytest.raises(BrokenPipeError):
            writer.send(b"+43\n", socket.MSG_NOSIGNAL)
        assert passfd.AnswerReader().feed(reader.recv(100)) == [("+", "42")]


def test_other_users_may_not_hand_connections_over(public_dir: Path):
    """The socket is 0666, so the helper checks the peer: a user that is not tcpmuxd's gets
    ``-`` before anything it sends is read, and the journal (here: the log) says who."""
    if os.geteuid() != 0:
        pytest.skip("connecting as another user needs root")
    unit = Unit(public_dir / "guarded.sock", ["/bin/echo", "hi"])
    try:
        unit.path.chmod(0o666)
        _refused_as_nobody(unit)
    finally:
        unit.stop()


def _refused_as_nobody(unit: Unit) -> None:

    def connect() -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(WAIT)
            s.connect(str(unit.path))
            return read_all(s)

    assert as_nobody(connect) == b"-not allowed to hand connections to this unit\n"
    unit.wait_for_log("refused: user nobody (uid 65534) may not hand connections over "
                      "(--allow-user)")


def test_answer_reader():
    reader = passfd.AnswerReader()
    assert reader.feed(b"+12") == []
    assert reader.feed(b"3\n=exit 0\n") == [("+", "123"), ("=", "exit 0")]
    with pytest.raises(passfd.HandoverError):
        passfd.AnswerReader().feed(b"+x\n")
    with pytest.raises(passfd.HandoverError):
        passfd.AnswerReader().feed(b"hello\n")
    with pytest.raises(passfd.HandoverError):
        passfd.AnswerReader().feed(b"-" * passfd.MAX_ANSWER)
    assert len(passfd.answer("-", "x" * 1000)) == passfd.MAX_ANSWER


def test_accept_yes_instance_hands_over_too(services: Path, units):
    """In an Accept=yes instance (StandardInput=socket: a socketpair end here), Unit= waits
    for the commit the same way, and the instance's record names the handler's pid."""
    unit = units("echo", ["/bin/sh", "-c", "echo $TCPMUX_SERVICE $PROTO; exec cat"])
    write_service(services, "echo.conf", f"[Service]\nUnit={unit.path}\n")
    client, theirs = socket.socketpair()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONPATH"] = str(ROOT)
    with client, theirs:
        proc = subprocess.Popen([sys.executable, "-m", "tcpmuxd", "--config-dir", str(services)],
                                stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, env=env,
                                cwd=ROOT)
        theirs.close()
        try:
            client.settimeout(WAIT)
            client.sendall(b"echo\r\nbehind")
            client.shutdown(socket.SHUT_WR)
            assert read_all(client) == b"+\r\necho UNIX\nbehind"
            _, err = proc.communicate(timeout=WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0
    assert re.search(rf"unix echo: accepted, handler pid \d+ in unix:{unit.path}, ",
                     err.decode()), err


def test_handover_timeout_at_its_edge(units):
    """--handover-timeout: a peer that connects and sends nothing is closed after it, and
    logged; one that sends the message in time is served."""
    unit = units("slow", ["/bin/echo", "hi"], "--handover-timeout", "0.3")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(WAIT)
        s.connect(str(unit.path))
        started = time.monotonic()
        assert s.recv(100) == b""
        assert 0.3 <= time.monotonic() - started < WAIT
    unit.wait_for_log(f"no hand-over from uid {os.getuid()}: timed out")
    ours, theirs = socket.socketpair()
    with ours, theirs, socket.socket(socket.AF_UNIX) as s:
        s.settimeout(WAIT)
        s.connect(str(unit.path))
        time.sleep(0.1)  # well within the timeout
        passfd.send_connection(s, theirs, {"service": "slow", "remote": " 0", "local": " 0",
                                           "acknowledged": "yes"})
        theirs.close()
        ours.settimeout(WAIT)
        assert read_all(ours) == b"+\r\nhi\n"
        assert passfd.AnswerReader().feed(read_all(s))[1] == ("=", "exit 0")


@pytest.mark.parametrize("option", ["--max-handlers=0", "--handover-timeout=0",
                                    "--handover-timeout=x"])
def test_helper_refuses_bad_limits(option: str):
    r = subprocess.run([*HELPER, option, "/bin/true"], capture_output=True, text=True,
                       cwd=ROOT, timeout=WAIT)
    assert r.returncode == 2 and "tcpmuxd-handler: error: argument" in r.stderr, r.stderr


def test_helper_without_a_listening_socket():
    r = subprocess.run([*HELPER, "/bin/true"], capture_output=True, text=True, cwd=ROOT,
                       timeout=WAIT, stdin=subprocess.DEVNULL,
                       env={k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")})
    assert r.returncode == 2 and "expects one listening unix socket" in r.stderr, r.stderr


# --------------------------------------------------------------------------- a memory limit


#: A handler that allocates 16 MiB at a time until the kernel stops it, and one that holds
#: the connection (cat), chosen by the first line the client sends.
HOG = ("read -r what; if [ \"$what\" = eat ]; then echo eating; exec " + sys.executable
       + " -c 'b = []\nwhile True: b.append(bytearray(16 << 20))'; fi; exec cat")
LIMIT = 96 << 20


def _memory_cgroup(name: str) -> Path:
    """A new memory cgroup below this process's own, limited to LIMIT without swap (cgroup
    v1's memory hierarchy or v2's), where the test may make one; pytest.skip saying why not."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if line.split(":", 2)[1] == "memory"]
    v2 = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    try:
        if v1:
            group = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/") / name
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(LIMIT))
            if (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(LIMIT))
            return group
        if v2:
            parent = Path("/sys/fs/cgroup") / v2[0].lstrip("/")
            if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                raise OSError("memory is not in the subtree_control of this process's cgroup")
            group = parent / name
            group.mkdir()
            (group / "memory.max").write_text(str(LIMIT))
            (group / "memory.swap.max").write_text("0")
            return group
    except OSError as e:
        pytest.skip(f"no memory cgroup for the test to make: {e}")
    pytest.skip("this process is in no memory cgroup")


def test_a_handler_over_the_memory_limit_is_killed_alone(services: Path, daemon_factory,
                                                         units, tmp_path: Path):
    """The design's claim, with the kernel's own memory limit and no systemd (the unit's
    MemoryMax= under systemd: tests/e2e/test_unit_systemd.py): the helper and every handler of
    a unit share one memory cgroup, and a handler that goes over its limit is the one the
    kernel kills; the helper, a handler beside it and tcpmuxd go on, and tcpmuxd's record says
    how it ended."""
    if os.geteuid() != 0:
        pytest.skip("making a memory cgroup needs root")
    group = _memory_cgroup(f"tcpmuxd-test-{os.getpid()}")
    try:
        unit = units("hog", ["/bin/sh", "-c", HOG])
        (group / "cgroup.procs").write_text(str(unit.pid))  # the helper-to-be, its handlers
        write_service(services, "hog.conf", f"[Service]\nUnit={unit.path}\n")
        d = daemon_factory(services)
        with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as beside:
            beside.sendall(b"hog\r\ncat\n")
            assert beside.recv(3) == b"+\r\n"
            with socket.create_connection(("127.0.0.1", d.port), timeout=WAIT) as eater:
                eater.sendall(b"hog\r\neat\n")
                got = b""
                try:
                    while chunk := eater.recv(1024):
                        got += chunk
                except ConnectionResetError:
                    pass
                assert got == b"+\r\neating\n", got
            d.wait_for_log(" signal SIGKILL, ")
            beside.sendall(b"still here\n")
            assert beside.recv(100) == b"still here\n"
        assert unit.proc.poll() is None, "the helper was killed"
        assert tcp_reply(d.port, b"hog\r\ncat\nagain\n") == b"+\r\nagain\n"
        assert d.proc.poll() is None
    finally:
        _remove_cgroup(group)


def _remove_cgroup(group: Path) -> None:
    """Remove the test's cgroup once its processes are gone (the fixtures end them)."""
    deadline = time.monotonic() + WAIT
    while True:
        procs = (group / "cgroup.procs").read_text().split()
        for pid in procs:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        try:
            group.rmdir()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{group} still has {procs}"
            time.sleep(0.05)
