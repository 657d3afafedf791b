"""sockmuxd as processes: two real daemons (receptor and connector, or a pipe pair) on
loopback, over TCP, TLS, a FIFO pair, a pty and a command's stdio; streams both ways checked
by SHA-256; re-dialling; READY=1 and STATUS= on a notify socket; tcpmux and exec exits; --check; bad
flags; the systemd units (verify, security).

Every process is started in its own session and killed (group) when its test ends; every wait
is bounded.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tcpmuxd_harness import EchoServer, LogFile, Notify

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "units"
PYTHON = sys.executable
DAEMON = [PYTHON, "-m", "tcpmuxd.sockmux.daemon"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.stop()


def echo_check(port: int, size: int, timeout: float = 30.0) -> bool:
    """Send ``size`` random bytes through ``port``, half-close, read the echo meanwhile."""
    data = os.urandom(size)
    received = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        def reader() -> None:
            try:
                while chunk := s.recv(1 << 16):
                    received.update(chunk)
            except OSError:
                pass
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        t.join(timeout)
    return hashlib.sha256(data).hexdigest() == received.hexdigest()


def integrity(ports: list[int], streams: int = 4, size: int = 1 << 20) -> None:
    """``streams`` concurrent streams through each port at once; every one must match."""
    jobs = [(port, size + i * 4099) for port in ports for i in range(streams)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: echo_check(*job), jobs))
    assert all(results), results


def wait_until_works(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if echo_check(port, 100, timeout=5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no stream through port {port} within {timeout} s")
        time.sleep(0.1)


class Proc(LogFile):
    """A sockmuxd process with its log."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.log = self.log_path = log
        self.args = args
        environ = dict(os.environ)
        for key in list(environ):
            if key.startswith(("LISTEN_", "WATCHDOG_")) or key == "NOTIFY_SOCKET":
                del environ[key]
        environ.update(env or {})
        with open(log, "ab") as out:
            self.p = subprocess.Popen(DAEMON + args, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=out, start_new_session=True, env=environ,
                                      cwd=ROOT, pass_fds=pass_fds)

    def stop(self, timeout: float = 15.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.p.returncode

    def kill(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except OSError:
                pass
            self.p.wait(10)
        else:
            try:  # children it may have left behind (a --command link)
                os.killpg(self.p.pid, signal.SIGKILL)
            except OSError:
                pass

    def text(self) -> str:
        return self.output()


@pytest.fixture
def procs():
    """Processes of one test, stopped at its end; their logs are printed (pytest shows them
    for a failed test only)."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()
    for p in started:
        print(f"--- sockmuxd {shlex.join(p.args)}\n{p.text()}")


def refused(port: int) -> bool:
    """The entrance takes the connection but no stream goes through (reset or EOF)."""
    try:
        return not echo_check(port, 10, timeout=5)
    except OSError:
        return True


@pytest.fixture
def secret(tmp_path) -> str:
    path = tmp_path / "secret"
    path.write_text("0123456789abcdef0123456789abcdef\n")
    path.chmod(0o600)
    return str(path)


def start(procs: list[Proc], tmp_path: Path, name: str, args: list[str], **kw) -> Proc:
    p = Proc(args, tmp_path / f"{name}.log", **kw)
    procs.append(p)
    return p


def both_ways(echo_port: int) -> list[str]:
    return ["--exit", f"127.0.0.1:{echo_port}"]


# --------------------------------------------------------------------------- link kinds


@pytest.mark.parametrize("kind", ["tcp", "tls", "fifo", "pty", "command"])
def test_integrity_over_each_link(kind, procs, tmp_path, echo, secret, request):
    """Streams both directions at once over each kind of link, checked by SHA-256."""
    in_a, in_b = free_port(), free_port()
    common = ["--secret", secret, *both_ways(echo.port)]
    a = ["--entrance", f"127.0.0.1:{in_a}", *common]
    b = ["--entrance", f"127.0.0.1:{in_b}", *common]
    size = 1 << 20
    if kind in ("tcp", "tls"):
        link = free_port()
        tls_a: list[str] = []
        tls_b: list[str] = []
        if kind == "tls":
            certs = request.getfixturevalue("sockmux_certs")
            tls_a = ["--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                     "--tls-ca", certs.ca]
            tls_b = ["--tls-ca", certs.ca, "--tls-cert", certs.client_cert,
                     "--tls-key", certs.client_key, "--tls-server-name", "localhost"]
        start(procs, tmp_path, "receptor", ["--accept", f"127.0.0.1:{link}", *tls_a, *a])
        start(procs, tmp_path, "connector", ["--connect", f"127.0.0.1:{link}", *tls_b, *b])
    elif kind == "fifo":
        a2b, b2a = tmp_path / "a2b", tmp_path / "b2a"
        os.mkfifo(a2b)
        os.mkfifo(b2a)
        start(procs, tmp_path, "a", ["--fifo", f"{b2a},{a2b}", *a])
        start(procs, tmp_path, "b", ["--fifo", f"{a2b},{b2a}", *b])
    elif kind == "pty":
        master, slave = os.openpty()
        try:
            start(procs, tmp_path, "a", ["--comm", f"/dev/fd/{master}", *a], pass_fds=(master,))
            start(procs, tmp_path, "b", ["--comm", os.ttyname(slave), *b])
        finally:
            os.close(master)
            os.close(slave)
        size = 64 << 10  # a pty is slow
    else:
        child = shlex.join(DAEMON + ["--stdio", *b])
        start(procs, tmp_path, "connector", ["--command", child, *a])
    wait_until_works(in_a)
    wait_until_works(in_b)
    integrity([in_a, in_b], streams=4, size=size)
    if kind == "command":
        # the connector's stop ends the child sockmuxd (its stdin closes): no process left
        assert procs[0].stop() == 0
        time.sleep(0.5)
        out = subprocess.run(["pgrep", "-f", "--", f"--entrance 127.0.0.1:{in_b}"],
                             capture_output=True, text=True)
        assert out.stdout.strip() == "", "the --stdio child outlived its link"
    else:
        for p in procs:
            assert p.stop() == 0, p.text()
    logs = "\n".join(p.text() for p in procs)
    assert "Traceback" not in logs
    assert re.search(r"stream \d+: .*bytes sent", logs)


def test_tls_refuses_an_unknown_client(procs, tmp_path, echo, secret, sockmux_certs):
    c = sockmux_certs
    link, entrance = free_port(), free_port()
    start(procs, tmp_path, "receptor", ["--accept", f"127.0.0.1:{link}", "--tls-cert",
                                        c.server_cert, "--tls-key", c.server_key, "--tls-ca",
                                        c.ca, "--secret", secret, *both_ways(echo.port)])
    conn = start(procs, tmp_path, "connector", [
        "--connect", f"127.0.0.1:{link}", "--tls-ca", c.ca, "--tls-cert", c.rogue_client_cert,
        "--tls-key", c.rogue_client_key, "--tls-server-name", "localhost", "--secret", secret,
        "--entrance", f"127.0.0.1:{entrance}", "--hold", "0", "--reconnect-max", "1s"])
    deadline = time.monotonic() + 15
    while "TLS handshake failed" not in procs[0].text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "TLS handshake failed" in procs[0].text()
    assert refused(entrance)
    assert "link" in conn.text()


# --------------------------------------------------------------------------- behaviour


def test_connector_redials_after_the_receptor_restarts(procs, tmp_path, echo, secret):
    link, entrance = free_port(), free_port()
    receptor_args = ["--accept", f"127.0.0.1:{link}", "--secret", secret, *both_ways(echo.port)]
    receptor = start(procs, tmp_path, "receptor", receptor_args)
    start(procs, tmp_path, "connector", [
        "--connect", f"127.0.0.1:{link}", "--secret", secret, "--reconnect-max", "1s",
        "--entrance", f"127.0.0.1:{entrance}", "--hold", "0", "--resume-timeout", "0"])
    wait_until_works(entrance)
    # a stream open while the receptor dies is reset, not left hanging (without resumption;
    # with it, see test_netns_resume.py)
    s = socket.create_connection(("127.0.0.1", entrance), timeout=10)
    s.sendall(b"hello")
    assert s.recv(5) == b"hello"
    receptor.p.send_signal(signal.SIGKILL)
    receptor.p.wait(10)
    try:
        assert s.recv(10) == b""
    except ConnectionResetError:
        pass
    s.close()
    # while it is down, the entrance refuses at once
    assert refused(entrance)
    start(procs, tmp_path, "receptor2", receptor_args)
    wait_until_works(entrance, timeout=20)
    integrity([entrance], streams=3, size=200_000)
    assert "link-up" not in procs[1].text()  # (journal field names are not in the text)
    assert procs[1].text().count(": up (authenticated)") >= 2


def test_ready_once_listening_and_dialling(procs, tmp_path, echo, secret):
    """READY=1 as soon as the entrances are open and the link is being kept up, whether or not
    the peer is there (issue 13, item 1: ``systemctl enable --now`` must not wait for the
    peer): a connector with no receptor is ready and says it is re-dialling, with the failures
    so far; a receptor is ready waiting for the peer; STATUS= follows the link up and down."""
    link, entrance = free_port(), free_port()
    conn_notify = Notify(tmp_path / "connector.notify")
    recv_notify = Notify(tmp_path / "receptor.notify")
    try:
        t0 = time.monotonic()
        conn = start(procs, tmp_path, "connector", [
            "--connect", f"127.0.0.1:{link}", "--secret", secret, "--reconnect-max", "1s",
            "--entrance", f"127.0.0.1:{entrance}"],
            env={"NOTIFY_SOCKET": conn_notify.path, "WATCHDOG_USEC": "400000"})
        ready = conn_notify.wait("READY=1", t0, 15)
        assert ready, (conn_notify.messages, conn.text())
        assert f"MAINPID={conn.p.pid}" in ready[1]
        assert f"STATUS=connecting to 127.0.0.1:{link}; 0 streams open" in ready[1], ready
        socket.create_connection(("127.0.0.1", entrance), timeout=5).close()  # listening
        assert conn_notify.wait(f"STATUS=re-dialling: connecting to 127.0.0.1:{link} failed "
                                "2 times in a row (", t0, 15), conn_notify.messages
        assert conn_notify.wait("WATCHDOG=1", ready[0], 5)  # fed while there is no link
        assert "failed 1 time in a row" in conn.text()  # the journal says it too

        t1 = time.monotonic()
        recv = start(procs, tmp_path, "receptor", [
            "--accept", f"127.0.0.1:{link}", "--secret", secret, *both_ways(echo.port)],
            env={"NOTIFY_SOCKET": recv_notify.path})
        ready = recv_notify.wait("READY=1", t1, 15)
        assert ready, (recv_notify.messages, recv.text())
        assert f"STATUS=waiting for the peer on 127.0.0.1:{link}; 0 streams open" in ready[1]
        for notify in (conn_notify, recv_notify):
            assert notify.wait("STATUS=link up to ", t1, 15), notify.messages
        assert echo_check(entrance, 1000)
        # (the connection made above, before the link, counts as a stream too)
        done = conn_notify.wait("1000 B sent, 1000 B received", t1, 10)
        assert done and "STATUS=link up to " in done[1] and "; 0 streams open, " in done[1], \
            conn_notify.messages

        t2 = time.monotonic()
        recv.stop()
        assert conn_notify.wait("STATUS=link down: re-dialling, connecting to ", t2, 15), \
            conn_notify.messages
        conn.stop()
        assert conn_notify.wait("STOPPING=1", t2, 5)
    finally:
        conn_notify.close()
        recv_notify.close()


def test_start_up_record_names_each_entrance_once(procs, tmp_path, secret):
    """A bare PORT listens on both loopback addresses: the start-up record names the entrance
    once, with both (issue 13, item 11: it listed it twice)."""
    entrance, other = free_port(), free_port()
    p = start(procs, tmp_path, "connector", [
        "--connect", f"127.0.0.1:{free_port()}", "--secret", secret,
        "--entrance", str(entrance), "--entrance", f"127.0.0.1:{other}"])
    deadline = time.monotonic() + 15
    while "; exits " not in p.text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in p.text().splitlines() if "; entrances " in line)
    shown = line.split("; entrances ", 1)[1].split("; exits ", 1)[0]
    has_v6 = socket.has_ipv6 and f"[::1]:{entrance}" in shown
    both = f"127.0.0.1:{entrance}, [::1]:{entrance}" if has_v6 else f"127.0.0.1:{entrance}"
    assert shown == f"{entrance} ({both}), 127.0.0.1:{other} (127.0.0.1:{other})", line


def test_socket_activated_entrance(procs, tmp_path, echo, secret):
    """``--entrance fd:NAME`` from systemd's sockets: the first client starts the connector
    (systemd-socket-activate, as a socket unit would) and waits for the link (--hold)."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed")
    link, entrance = free_port(), free_port()
    start(procs, tmp_path, "receptor", ["--accept", f"127.0.0.1:{link}", "--secret", secret,
                                        *both_ways(echo.port)])
    log = open(tmp_path / "activated.log", "wb")
    activated = subprocess.Popen(
        [tool, "-l", f"127.0.0.1:{entrance}", "--fdname=web", *DAEMON, "--connect",
         f"127.0.0.1:{link}", "--secret", secret, "--entrance", "fd:web"],
        stdout=log, stderr=log, start_new_session=True, cwd=ROOT)
    try:
        time.sleep(0.5)  # systemd-socket-activate is listening; sockmuxd is not running yet
        assert echo_check(entrance, 200_000), (tmp_path / "activated.log").read_text()
        integrity([entrance], streams=3, size=100_000)
    finally:
        activated.send_signal(signal.SIGTERM)
        try:
            activated.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(activated.pid, signal.SIGKILL)
            activated.wait(5)
        log.close()
    text = (tmp_path / "activated.log").read_text()
    assert "entrances fd:web" in text and "Traceback" not in text, text


def test_tcpmux_and_exec_exits(procs, tmp_path, secret):
    confd = tmp_path / "conf.d"
    confd.mkdir()
    (confd / "echo.conf").write_text("[Service]\nExec=/bin/cat\n")
    (confd / "hello.conf").write_text("[Service]\nExec=/bin/echo hello from tcpmux\n")
    link, tcpmux_in, exec_in = free_port(), free_port(), free_port()
    start(procs, tmp_path, "receptor", [
        "--accept", f"127.0.0.1:{link}", "--secret", secret,
        "--exit", f"{tcpmux_in}=tcpmux", "--exit", f"{exec_in}=exec:/usr/bin/env",
        "--tcpmux-config-dir", str(confd)])
    start(procs, tmp_path, "connector", [
        "--connect", f"127.0.0.1:{link}", "--secret", secret,
        "--entrance", f"127.0.0.1:{tcpmux_in}", "--entrance", f"127.0.0.1:{exec_in}"])

    def talk(port: int, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    deadline = time.monotonic() + 20
    while True:
        try:
            reply = talk(tcpmux_in, b"hello\r\n")
            if reply:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, procs[0].text()
        time.sleep(0.1)
    assert reply == b"+\r\nhello from tcpmux\n"
    payload = os.urandom(300_000)
    assert talk(tcpmux_in, b"ECHO\r\n" + payload) == b"+\r\n" + payload
    assert talk(tcpmux_in, b"nosuch\r\n").startswith(b"-")
    env = talk(exec_in, b"").decode()
    assert "SOCKMUX_ENTRANCE=127.0.0.1:%d" % exec_in in env
    assert "REMOTE_ADDR=127.0.0.1" in env and "NOTIFY_SOCKET" not in env
    # the exec exit's stream record comes once its program has exited: wait for it (bounded)
    deadline = time.monotonic() + 15
    while not re.search(r"-> exit exec:/usr/bin/env \(pid \d+\)", procs[0].text()):
        assert time.monotonic() < deadline, procs[0].text()
        time.sleep(0.05)
    assert "tcpmux exit: 2 services" in procs[0].text()


def test_tunnel_files_and_check(procs, tmp_path, echo, secret):
    confdir = tmp_path / "sockmux.d"
    confdir.mkdir()
    link, entrance = free_port(), free_port()
    (confdir / "recv.conf").write_text(
        f"[Tunnel]\nAccept=127.0.0.1:{link}\nSecret={secret}\nExit=127.0.0.1:{echo.port}\n")
    (confdir / "conn.conf").write_text(
        f"[Tunnel]\nConnect=127.0.0.1:{link}\nSecret={secret}\n"
        f"Entrance=127.0.0.1:{entrance}\nReconnectMaxSec=1s\n")
    out = subprocess.run(DAEMON + ["--check", "--config-dir", str(confdir), "conn"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"Connect=127.0.0.1:{link}" in out.stdout and "ReconnectMaxSec" in out.stdout
    start(procs, tmp_path, "recv", ["--config-dir", str(confdir), "recv"])
    start(procs, tmp_path, "conn", ["--config-dir", str(confdir), "conn"])
    wait_until_works(entrance)
    integrity([entrance], streams=3, size=300_000)
    assert "tunnel conn:" in procs[1].text()
    # a broken file: --check says where, exit status 1; running it: 78, no traceback
    (confdir / "bad.conf").write_text("[Tunnel]\nConect=127.0.0.1:1\n")
    out = subprocess.run(DAEMON + ["--check", "--config-dir", str(confdir), "bad"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 1 and "bad.conf:2" in out.stderr, out.stderr
    out = subprocess.run(DAEMON + ["--config-dir", str(confdir), "bad"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 78 and "Traceback" not in out.stderr


#: Runs argv[3:] with descriptor argv[1] as systemd's socket 3, named argv[2], as systemd does
#: (LISTEN_PID is this process's, which exec keeps).
AS_PASSED = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.execvpe(sys.argv[3], sys.argv[3:], "
             "{**os.environ, 'LISTEN_PID': str(os.getpid()), 'LISTEN_FDS': '1', "
             "'LISTEN_FDNAMES': sys.argv[2]})")


@pytest.mark.parametrize("passed", [None, "other"], ids=["no-socket", "other-name"])
def test_fd_entrance_without_its_socket_is_a_configuration_error(tmp_path, secret, passed):
    """Entrance=fd:entrance with no such socket from systemd (issue 13, item 2): exit status 78,
    which sockmuxd@.service does not restart on, and a message that says what happened: with
    no socket at all, the socket unit was not running when the tunnel started, and the order
    of the commands that add it to a running tunnel; with sockets of other names, the name."""
    confdir = tmp_path / "sockmux.d"
    confdir.mkdir()
    (confdir / "office.conf").write_text(
        f"[Tunnel]\nConnect=127.0.0.1:{free_port()}\nSecret={secret}\nEntrance=fd:entrance\n")
    command = DAEMON + ["--config-dir", str(confdir), "office"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        if passed is not None:
            command = [PYTHON, "-c", AS_PASSED, str(listener.fileno()), passed, *command]
        out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=30,
                             env=env, pass_fds=(listener.fileno(),))
    assert out.returncode == 78, out.stderr
    assert "Traceback" not in out.stderr
    if passed is None:
        assert "systemd passed no sockets: the socket unit was not running" in out.stderr
        assert ("systemctl stop sockmuxd@office.service && systemctl enable --now "
                "sockmuxd@office.socket && systemctl start sockmuxd@office.service"
                in out.stderr), out.stderr
        assert "FileDescriptorName" not in out.stderr  # it was not the name
    else:
        assert ("systemd passed sockets named other, none named 'entrance': set "
                "FileDescriptorName=entrance in the socket unit" in out.stderr), out.stderr


def _held_for(port: int, timeout: float = 15.0) -> float:
    """Seconds from connecting to the entrance until the tunnel resets (or ends) it."""
    started = time.monotonic()
    try:  # a reset at once may come before connect() has returned
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            assert s.recv(1) == b""
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_hold_from_the_tunnel_file_and_the_flag(procs, tmp_path, secret):
    """HoldSec= holds an entrance connection while the link is down, then resets it;
    --hold replaces it for a tunnel file too."""
    confdir = tmp_path / "sockmux.d"
    confdir.mkdir()
    entrances = free_port(), free_port()
    for name, entrance in zip(("a", "b"), entrances):
        (confdir / f"{name}.conf").write_text(
            f"[Tunnel]\nConnect=127.0.0.1:{free_port()}\nSecret={secret}\n"
            f"Entrance=127.0.0.1:{entrance}\nHoldSec=2s\nReconnectMaxSec=1s\n")
    start(procs, tmp_path, "a", ["--config-dir", str(confdir), "a"])
    start(procs, tmp_path, "b", ["--config-dir", str(confdir), "b", "--hold", "0"])
    for proc in procs:
        deadline = time.monotonic() + 20
        while "entrances" not in proc.text() and time.monotonic() < deadline:
            time.sleep(0.05)
    held, at_once = _held_for(entrances[0]), _held_for(entrances[1])
    assert 1.8 <= held < 10, held
    assert at_once < 1.5, at_once


def test_check_with_flags(tmp_path, secret):
    out = subprocess.run(DAEMON + ["--check", "--connect", "gw.example.net:7000", "--secret",
                                   secret, "--entrance", "5432", "--exit", "8080=tcpmux",
                                   "--tcpmux-config-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Connect=gw.example.net:7000" in out.stdout
    assert "127.0.0.1:5432 and [::1]:5432" in out.stdout
    assert "8080 -> tcpmux" in out.stdout
    # DeleGate's spelling
    out = subprocess.run(DAEMON + ["--check", "-P127.0.0.1:8000", "PORT=9000-9001",
                                   "SERVER=telnet://10.0.0.1,-in:-:-P9001",
                                   "SERVER=10.0.0.2:80,-in", "--no-auth"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    for text in ("Accept=127.0.0.1:8000", "Entrance             9000", "Entrance             9001",
                 "9001 -> tcp 10.0.0.1:23", "default -> tcp 10.0.0.2:80", "none: the peer"):
        assert text in out.stdout, out.stdout


@pytest.mark.parametrize("args, message", [
    ([], "no tunnel"),
    (["--connect", "h:1", "--accept", "0.0.0.0:1", "--no-auth", "--exit", "h:2"],
     "exactly one link"),
    (["--connect", "h:1", "--exit", "h:2"], "needs --secret FILE"),
    (["--connect", "h:1", "--no-auth"], "would carry nothing"),
    (["--connect", "h:x", "--no-auth", "--exit", "h:2"], "--connect: port"),
    (["--accept", "7000", "--no-auth", "--exit", "h:2"], "give the address to listen on too"),
    (["--connect", "h:1", "--no-auth", "--exit", "nosuchthing"], "--exit nosuchthing"),
    (["--connect", "h:1", "--no-auth", "--exit", "exec:relative"], "absolute path"),
    (["--connect", "h:1", "--no-auth", "--exit", "h:2", "--exit", "h:3"], "second default"),
    (["--connect", "h:1", "--no-auth", "--entrance", "70000"], "out of range"),
    (["--fifo", "/a,/b", "--no-auth", "--exit", "h:2", "--tls"],
     "--tls only applies to --accept or --connect tunnels"),
    (["--connect", "h:1", "--no-auth", "--exit", "h:2", "--keepalive", "1min",
      "--dead-peer", "30s"], "must be longer"),
    (["--connect", "h:1", "--no-auth", "--exit", "h:2", "--keepalive", "soon"],
     "not a time span"),
    (["--connect", "h:1", "--no-auth", "--exit", "h:2", "--stream-log-rate", "1000001"],
     "--stream-log-rate: '1000001' is out of range 0-1000000"),
    (["--connect", "h:1", "--no-auth", "--exit", "h:2", "--stream-log-rate", "-1"],
     "--stream-log-rate: '-1' is not a non-negative integer"),
    (["name", "--stream-log-rate", "0"], "exclude each other"),
    (["--accept", "127.0.0.1:1", "--no-auth", "--exit", "h:2", "--max-pending-links", "0"],
     "--max-pending-links: '0' is out of range 1-1024"),
    (["--accept", "127.0.0.1:1", "--no-auth", "--exit", "h:2", "--max-pending-links", "1025"],
     "--max-pending-links: '1025' is out of range 1-1024"),
    (["--connect", "h:1", "--no-auth", "--exit", "h:2", "--max-pending-links", "4"],
     "--max-pending-links only applies to --accept tunnels, not to --connect ones"),
    (["--connect", "h:1", "--no-auth", "--exit", "h:2", "--failure-delay", "5s"],
     "--failure-delay only applies to --accept tunnels, not to --connect ones"),
    (["--connect", "h:1", "--no-auth", "--exit", "h:2", "--handshake-timeout", "0"],
     "must be greater than zero"),
    (["--connect", "h:1", "--no-auth", "--exit", "h:2", "--send-timeout", "0"],
     "must be greater than zero"),
    (["--connect", "h:1", "--no-extensions", "--exit", "h:2", "--secret", "/x"],
     "cannot authenticate"),
    (["--connect", "h:1", "--secret", "/nonexistent/secret", "--exit", "h:2"],
     "--secret: /nonexistent/secret"),
    (["name", "--connect", "h:1"], "exclude each other"),
    (["SERVER=sockmux:commin@/a", "--no-auth", "--exit", "h:2"], "go together"),
    (["ADMIN=me@example.net"], "ADMIN= is not supported"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_flags_give_clear_errors(args, message):
    out = subprocess.run(DAEMON + args, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_secret_permissions_are_checked(tmp_path):
    path = tmp_path / "open-secret"
    path.write_text("0123456789abcdef0123456789abcdef\n")
    path.chmod(0o644)
    out = subprocess.run(DAEMON + ["--connect", "h:1", "--secret", str(path), "--exit", "h:2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 2 and "too open" in out.stderr


def test_help_names_every_flag_of_the_man_page():
    """``--help`` and docs/sockmuxd.8.scd describe the same flags."""
    out = subprocess.run(DAEMON + ["--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=30)
    helped = set(re.findall(r"(--[a-z][a-z-]*[a-z])", out.stdout))
    page = (ROOT / "docs" / "sockmuxd.8.scd").read_text()
    documented = set(re.findall(r"\*(--[a-z][a-z-]+)\*", page))
    assert helped - {"--help"} == documented - {"--help"}, (helped ^ documented)


def test_man_page_renders_cleanly(tmp_path):
    if shutil.which("scdoc") is None or shutil.which("man") is None:
        pytest.skip("scdoc and man are needed")
    page = tmp_path / "sockmuxd.8"
    with open(ROOT / "docs" / "sockmuxd.8.scd", "rb") as src, open(page, "wb") as dst:
        subprocess.run(["scdoc"], stdin=src, stdout=dst, check=True, timeout=30)
    out = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                         text=True, timeout=30, env={**os.environ, "MANPAGER": "cat",
                                                     "MANWIDTH": "80"})
    assert out.returncode == 0 and out.stderr == "", out.stderr


# --------------------------------------------------------------------------- units


@pytest.fixture(scope="module")
def unit_copies(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("units")
    stand_in = tmp / "sockmuxd"
    stand_in.write_text(f'#!/bin/sh\nexec {PYTHON} -m tcpmuxd.sockmux.daemon "$@"\n')
    stand_in.chmod(0o755)
    for name in ("sockmuxd@.service", "sockmuxd@.socket"):
        text = (UNITS / name).read_text().replace("/usr/bin/sockmuxd", str(stand_in))
        (tmp / name).write_text(text)
        # an instance too: templates and instances are checked differently
        (tmp / name.replace("@", "@office")).write_text(text)
    return tmp


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return tool


def test_units_verify_cleanly(unit_copies):
    for names in (["./sockmuxd@.service", "./sockmuxd@.socket"],
                  ["./sockmuxd@office.service", "./sockmuxd@office.socket"]):
        r = subprocess.run([analyze(), "verify", "--man=no", *names], cwd=unit_copies,
                           capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), r.stdout + r.stderr


def test_service_exposure_at_most_2(unit_copies):
    r = subprocess.run([analyze(), "security", "--offline=true", "--no-pager",
                        "--threshold=20", "./sockmuxd@.service"],
                       cwd=unit_copies, capture_output=True, text=True, timeout=60)
    if "Unknown option" in r.stderr or "unrecognized option" in r.stderr:
        pytest.skip("this systemd-analyze has no offline security check")
    level = re.findall(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    print("exposure:", level)
    assert r.returncode == 0 and level and float(level[0]) <= 2.0, r.stdout + r.stderr


def test_unit_contract():
    service = (UNITS / "sockmuxd@.service").read_text()
    for line in ("Type=notify", "ExecStart=/usr/bin/sockmuxd %i", "Restart=always",
                 "CapabilityBoundingSet=\n", "WatchdogSec=", "RestartSec=",
                 "RestartPreventExitStatus=2 78", "PrivateDevices=yes"):
        assert line in service, line
    assert "TimeoutStartSec=" not in service  # READY=1 does not wait for the peer
    socket_unit = (UNITS / "sockmuxd@.socket").read_text()
    for line in ("FileDescriptorName=entrance", "Service=sockmuxd@%i.service"):
        assert line in socket_unit, line


# --------------------------------------------------------------------------- under systemd

E2E_PROJECT = "/opt/tcpmuxd"
#: The project's venv's packages, for /usr/bin/python3 (the venv's own interpreter).
E2E_SITE = f"{E2E_PROJECT}/.venv/lib/python{sys.version_info[0]}.{sys.version_info[1]}" \
    "/site-packages"
#: The shipped units unchanged, but run from the bind mount (uvloop from the project's venv).
E2E_DROPIN = f"""\
[Service]
ExecStart=
ExecStart=/usr/bin/python3 -m tcpmuxd.sockmux.daemon %i
Environment=PYTHONPATH={E2E_PROJECT}:{E2E_SITE}
Environment=PYTHONDONTWRITEBYTECODE=1
WatchdogSec=3s
"""


@pytest.mark.e2e
def test_units_under_systemd():
    """sockmuxd@.service and sockmuxd@.socket in a booted systemd, sandbox in force: a receptor
    and a socket-activated connector (Entrance=fd:entrance) reach an exec exit; READY, STATUS,
    the watchdog and the journal records; a clean stop."""
    sys.path.insert(0, str(ROOT / "tests"))
    from e2e.nspawn import Container, unavailable_reason
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no container: {reason}")
    if subprocess.run(["/usr/bin/python3", "-c", "import systemd"]).returncode:
        pytest.skip("python3-systemd is not installed in /usr")
    etc = "/etc/tcpmuxd/sockmux.d"
    with Container(bind_ro=[(ROOT, E2E_PROJECT)], log=print) as c:
        for name in ("sockmuxd@.service", "sockmuxd@.socket"):
            c.write_file(f"/etc/systemd/system/{name}", (UNITS / name).read_text())
        c.write_file("/etc/systemd/system/sockmuxd@.service.d/50-e2e.conf", E2E_DROPIN)
        c.write_file("/etc/systemd/system/sockmuxd@conn.socket.d/ports.conf",
                     "[Socket]\nListenStream=127.0.0.1:7001\n")
        c.write_file(f"{etc}/t.secret", "0123456789abcdef0123456789abcdef\n", mode=0o600)
        c.write_file(f"{etc}/recv.conf", f"[Tunnel]\nAccept=127.0.0.1:7000\n"
                     f"Secret={etc}/t.secret\nExit=exec:/bin/cat\n")
        c.write_file(f"{etc}/conn.conf", f"[Tunnel]\nConnect=127.0.0.1:7000\n"
                     f"Secret={etc}/t.secret\nEntrance=fd:entrance\nReconnectMaxSec=1s\n")
        c.systemctl("daemon-reload")
        cursor = c.journal_cursor()
        c.systemctl("start", "--no-block", "sockmuxd@recv.service")
        c.systemctl("start", "sockmuxd@conn.socket")
        payload = os.urandom(300_000)
        # the first connection starts sockmuxd@conn.service, which waits for the link
        assert c.talk(("127.0.0.1", 7001), payload, shut_wr=True) == payload
        assert c.talk(("127.0.0.1", 7001), b"unix", shut_wr=True) == b"unix"  # again
        for unit in ("sockmuxd@recv.service", "sockmuxd@conn.service"):
            out = c.systemctl("show", "-p", "ActiveState", "-p", "StatusText", "-p",
                              "WatchdogUSec", unit).stdout
            print(unit, out)
            assert "ActiveState=active" in out and "StatusText=link up" in out, out
            assert "WatchdogUSec=3s" in out
        time.sleep(4)  # longer than WatchdogSec: fed, still running
        started = [e["MESSAGE"] for e in c.journal_since(cursor, "SYSLOG_IDENTIFIER=sockmuxd")
                   if "event loop" in e.get("MESSAGE", "")]
        assert len(started) == 2 and all("uvloop" in m for m in started), started
        entries = c.journal_since(cursor, "SOCKMUX_EVENT=stream")
        exits = [e for e in entries if e.get("SOCKMUX_DIRECTION") == "exit"]
        assert len(exits) == 2, entries
        assert exits[0]["SOCKMUX_BYTES_RECEIVED"] == str(len(payload))
        assert exits[0]["SOCKMUX_EXIT"].startswith("exec:/bin/cat (pid ")
        c.systemctl("stop", "sockmuxd@conn.socket", "sockmuxd@conn.service",
                    "sockmuxd@recv.service")
        for unit in ("sockmuxd@recv.service", "sockmuxd@conn.service"):
            state = c.systemctl("show", "-p", "Result", "-p", "NRestarts", unit).stdout
            assert "Result=success" in state and "NRestarts=0" in state, state
