"""The PassTo= example works where it is installed: tcpmuxd unprivileged, the daemon root.

The shipped units run tcpmuxd as a dynamic user, and an administrator starts the example daemon
as root, from its socket unit (examples/upper-daemon.socket) or by hand with a socket path. In
both cases tcpmuxd must be able to connect: here a real tcpmuxd runs as a uid of its own, with
conf.d/upper.conf's PassTo= pointed at the socket of a real upper-daemon.py run as root, and a
client gets its lines back in upper case through it. Started by systemd-socket-activate (what
a socket unit does), the daemon serves the socket it is given. The example's units agree with
upper.conf and with where the packages install the script, and systemd-analyze verify says
nothing about them. (The socket unit itself, under systemd, with SocketMode=0666: the installed
end-to-end test, tests/e2e/test_installed.py.)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from privileges import unused_uid
from tcpmuxd import passfd
from tcpmuxd_harness import Daemon, PYTHON, ROOT, read_all, write_service
from test_units import parse_unit

EXAMPLES = ROOT / "examples"
DAEMON = EXAMPLES / "upper-daemon.py"
#: Where the packages install the examples (tests/packaging/pkg_helpers.expected_files).
INSTALLED_EXAMPLES = "/usr/share/doc/tcpmuxd/examples"
IO_TIMEOUT = 10.0


def pass_to_path() -> str:
    """The socket conf.d/upper.conf hands connections to."""
    m = re.search(r"^PassTo=unix:(\S+)$", (ROOT / "conf.d" / "upper.conf").read_text(), re.M)
    assert m, "conf.d/upper.conf has no PassTo=unix:PATH"
    return m.group(1)


def wait_for_socket(path: Path, proc: subprocess.Popen) -> None:
    """Until ``path`` accepts connections (the daemon has bound and listens), or it died."""
    deadline = time.monotonic() + IO_TIMEOUT
    while True:
        assert proc.poll() is None, f"the daemon exited: {proc.communicate()}"
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))
            return
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline, f"{path}: no listening socket within {IO_TIMEOUT}s"
            time.sleep(0.02)


def stop(proc: subprocess.Popen) -> None:
    """The example daemon keeps nothing that needs a clean stop."""
    proc.kill()
    proc.wait(5)


def test_daemon_run_by_root_serves_an_unprivileged_tcpmuxd(public_dir, any_user_python):
    if os.geteuid() != 0:
        pytest.skip("needs root: the daemon runs as root and tcpmuxd as another user")
    sock = public_dir / "run" / "upper.sock"  # its directory is the daemon's to make
    conf = public_dir / "conf.d"
    conf.mkdir(mode=0o755)
    text = (ROOT / "conf.d" / "upper.conf").read_text().replace(pass_to_path(), str(sock))
    write_service(conf, "upper.conf", text)
    uid = unused_uid()  # tcpmuxd's stand-in for a dynamic user

    def as_uid() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)

    upper = subprocess.Popen([PYTHON, str(DAEMON), str(sock)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    daemon = None
    try:
        wait_for_socket(sock, upper)
        daemon = Daemon(conf, public_dir, notify=False, preexec_fn=as_uid,
                        python=any_user_python.python, cwd=any_user_python.cwd,
                        env={"PYTHONPATH": any_user_python.pythonpath})
        assert os.stat(f"/proc/{daemon.proc.pid}").st_uid == uid
        with daemon.connect(timeout=IO_TIMEOUT) as s:
            port = s.getsockname()[1]
            s.sendall(b"upper\r\nsent with the name\nand after it\n")
            s.shutdown(socket.SHUT_WR)
            reply = read_all(s)
        assert reply == (b"+\r\n" + f"hello 127.0.0.1 {port}, this is upper\r\n".encode()
                         + b"SENT WITH THE NAME\nAND AFTER IT\n"), (reply, daemon.output())
    finally:
        if daemon is not None:
            daemon.stop()
        stop(upper)


def test_socket_activated_it_serves_the_socket_it_is_given(tmp_path):
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed (apt-get install systemd)")
    sock = tmp_path / "upper.sock"
    upper = subprocess.Popen([tool, "--listen", str(sock), PYTHON, str(DAEMON)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, upper)
        ours, theirs = socket.socketpair()
        with ours, theirs, socket.socket(socket.AF_UNIX) as channel:
            channel.settimeout(IO_TIMEOUT)
            channel.connect(str(sock))
            passfd.send_connection(channel, theirs, {
                "service": "upper", "remote": "192.0.2.7 4242", "local": "192.0.2.1 1",
                "acknowledged": "no"})
            theirs.close()
            ours.settimeout(IO_TIMEOUT)
            ours.sendall(b"handed over\n")
            ours.shutdown(socket.SHUT_WR)
            reply = read_all(ours)
        # acknowledged=no: the daemon sends the "+" itself.
        assert reply == b"+\r\nhello 192.0.2.7 4242, this is upper\r\nHANDED OVER\n", reply
    finally:
        stop(upper)


def test_the_units_match_the_service_and_the_installed_script(tmp_path):
    socket_unit = parse_unit(EXAMPLES / "upper-daemon.socket")
    service_unit = parse_unit(EXAMPLES / "upper-daemon.service")
    assert socket_unit["Socket"]["ListenStream"] == [pass_to_path()]
    # tcpmuxd's dynamic user connects: it needs write permission on the socket.
    assert socket_unit["Socket"]["SocketMode"] == ["0666"]
    assert service_unit["Service"]["ExecStart"] == \
        [f"/usr/bin/python3 {INSTALLED_EXAMPLES}/{DAEMON.name}"]

    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    for unit in ("upper-daemon.socket", "upper-daemon.service"):
        text = (EXAMPLES / unit).read_text().replace(
            f"/usr/bin/python3 {INSTALLED_EXAMPLES}/", f"{sys.executable} {EXAMPLES}/")
        (tmp_path / unit).write_text(text)
    r = subprocess.run([tool, "verify", "--man=no", "./upper-daemon.socket",
                        "./upper-daemon.service"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout + r.stderr) == (0, ""), r
