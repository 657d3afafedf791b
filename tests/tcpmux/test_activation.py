"""Socket activation with the real systemd-socket-activate, in both Accept= modes, and the
refusal to start with nothing to serve."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tcpmuxd_harness import PYTHON, ROOT, free_port, read_all, talk, wait_for_port, write_service
from tcpmuxd import passfd

ACTIVATE = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(ACTIVATE is None,
                                reason="systemd-socket-activate not installed (apt-get install systemd)")


class Activator:
    """systemd-socket-activate holding the port, starting tcpmuxd as systemd would."""

    def __init__(self, config_dir: Path, *mode: str, fdname: str = "tcpmux",
                 args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        argv = [ACTIVATE, *mode, "-l", f"127.0.0.1:{self.port}", f"--fdname={fdname}",
                "-E", "PYTHONPATH=" + str(ROOT),
                PYTHON, "-m", "tcpmuxd", "--config-dir", str(config_dir), *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for_port(self.port) if not mode else self._wait_listening()

    def _wait_listening(self) -> None:
        """With --accept a probe connection would start an instance: watch /proc instead."""
        deadline = time.monotonic() + 10
        needle = f":{self.port:04X} 00000000:0000 0A"  # local port, LISTEN state
        while needle not in Path("/proc/net/tcp").read_text():
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)

    def talk(self, data: bytes) -> bytes:
        return talk(self.port, data)

    def stop(self) -> str:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            out, _ = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate(timeout=5)
        return out.decode(errors="replace")


@pytest.fixture
def activate():
    started: list[Activator] = []

    def start(config_dir: Path, *mode: str, **kw) -> Activator:
        a = Activator(config_dir, *mode, **kw)
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


@pytest.fixture
def svc(services: Path) -> Path:
    write_service(services, "echo.conf", "[Service]\nExec=/bin/cat\n")
    write_service(services, "env.conf",
                  "[Service]\nExec=/bin/sh -c 'echo $TCPMUX_SERVICE $REMOTE_ADDR ${LISTEN_FDS:-none}'\n")
    write_service(services, "hidden.conf", "[Service]\nExec=/bin/true\nHidden=yes\n")
    return services


def test_accept_no_serves_all_connections_from_one_process(svc, activate):
    a = activate(svc)
    assert a.talk(b"echo\r\nabc") == b"+\r\nabc"
    assert a.talk(b"env\r\n") == b"+\r\nenv 127.0.0.1 none\n"
    assert a.talk(b"HELP\r\n") == b"echo\r\nenv\r\n"
    out = a.stop()
    assert "on tcpmux" in out, out  # the listener is named by LISTEN_FDNAMES


@pytest.mark.parametrize("mode", [("--accept",), ("--accept", "--inetd")],
                         ids=["accept-fd3", "accept-stdin"])
def test_accept_yes_execs_the_handler_in_place(svc, activate, mode):
    a = activate(svc, *mode)
    assert a.talk(b"ECHO\r\nbytes behind the name") == b"+\r\nbytes behind the name"
    assert a.talk(b"env\r\n") == b"+\r\nenv 127.0.0.1 none\n"
    assert a.talk(b"help\r\n") == b"echo\r\nenv\r\n"
    assert a.talk(b"nope\r\n") == b"-unknown service nope\r\n"
    assert a.talk(b"x" * 300 + b"\r\n") == b"-service name too long (limit 256 bytes)\r\n"


def test_accept_yes_handler_replaces_tcpmuxd(svc, activate):
    """No extra process: the handler's pid is the instance's, and its parent is the activator."""
    write_service(svc, "pid.conf", "[Service]\nExec=/bin/sh -c 'echo $$ $PPID'\n")
    a = activate(svc, "--accept")
    pid, ppid = a.talk(b"pid\r\n").split(b"\r\n", 1)[1].split()
    assert int(ppid) == a.proc.pid


def test_accept_yes_forward_and_pass_to(svc, activate, tmp_path):
    up = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "p.sock"))
    unix.listen()

    def upstream():
        conn, _ = up.accept()
        with conn:
            conn.sendall(b"up:" + read_all(conn))

    def daemon():
        channel, _ = unix.accept()
        with channel:
            conn, info = passfd.receive_connection(channel)
        with conn:
            conn.sendall(info["service"].encode() + b":" + read_all(conn))

    threads = [threading.Thread(target=f, daemon=True) for f in (upstream, daemon)]
    for t in threads:
        t.start()
    write_service(svc, "fwd.conf", f"[Service]\nForward=127.0.0.1:{up.getsockname()[1]}\n")
    write_service(svc, "pass.conf", f"[Service]\nPassTo=unix:{tmp_path}/p.sock\n")
    a = activate(svc, "--accept")
    assert a.talk(b"fwd\r\nhello") == b"+\r\nup:hello"
    assert a.talk(b"pass\r\nearly") == b"+\r\npass:early"
    for t in threads:
        t.join(5)
    up.close()
    unix.close()


def test_accept_yes_name_deadline(svc, activate):
    a = activate(svc, "--accept", args=("--name-timeout", "0.5"))
    with socket.create_connection(("127.0.0.1", a.port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(b"ec")
        assert read_all(s) == b"-timed out waiting for end of service name line\r\n"
        assert 0.4 < time.monotonic() - start < 5


def test_no_sockets_and_no_listen_is_a_clear_error(svc):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    r = subprocess.run([PYTHON, "-m", "tcpmuxd", "--config-dir", str(svc)], cwd=ROOT, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    assert r.returncode == 2
    assert "systemctl enable --now tcpmuxd.socket" in r.stderr and "--listen" in r.stderr


def test_check_exits_nonzero_on_errors(svc):
    ok = subprocess.run([PYTHON, "-m", "tcpmuxd", "--check", "--config-dir", str(svc)], cwd=ROOT,
                        capture_output=True, text=True, timeout=10)
    assert ok.returncode == 0 and "echo" in ok.stdout
    write_service(svc, "broken.conf", "[Service]\nExce=/bin/true\n")
    bad = subprocess.run([PYTHON, "-m", "tcpmuxd", "--check", "--config-dir", str(svc)], cwd=ROOT,
                         capture_output=True, text=True, timeout=10)
    assert bad.returncode == 1
    assert "broken.conf:2:" in bad.stdout + bad.stderr


def test_listen_on_a_busy_port_is_a_clear_error(svc):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = subprocess.run([PYTHON, "-m", "tcpmuxd", "--config-dir", str(svc), "--listen",
                            f"127.0.0.1:{port}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
