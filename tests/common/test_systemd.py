"""The systemd adapter reads the environment it is given, not the process's own.

Each check runs in a child process whose C environment (``os.environ``) says something else
than the mapping passed in, with real descriptors and a real notification socket.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from tcpmuxd_harness import PYTHON, ROOT

from tcpmuxd.common.systemd import Notifier, child_environment, listen_fds

#: Run in a child whose descriptors 3 and 4 are a listener and a connected socket, and whose
#: own environment has no LISTEN_* variables: only the mapping names them.
PASSED = textwrap.dedent("""
    import fcntl, json, os, sys
    from tcpmuxd.common import systemd
    # first above 4 (the passed numbers may be 3 or 4 the other way round), then onto 3 and 4
    high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:]]
    for target, fd in zip((3, 4), high):
        os.dup2(fd, target)
        os.close(fd)
    assert not any(k.startswith("LISTEN_") for k in os.environ)
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:"}
    passed = systemd.passed_sockets(environ)
    print(json.dumps({
        "listeners": [(s.fileno(), name) for s, name in passed.listeners],
        "connection": passed.connection.fileno() if passed.connection else None,
        "inheritable": [os.get_inheritable(fd) for fd in (3, 4)],
        "other_pid": systemd.listen_fds({**environ, "LISTEN_PID": "1"}),
    }))
""")


def test_passed_sockets_come_from_the_mapping(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    a, b = socket.socketpair()
    with listener, a, b:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env["PYTHONPATH"] = str(ROOT)
        fds = (listener.fileno(), a.fileno())
        out = subprocess.run([PYTHON, "-c", PASSED, *map(str, fds)], env=env,
                             capture_output=True, text=True, timeout=30, pass_fds=fds, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["listeners"] == [[3, "web"]]
    assert got["connection"] == 4  # the socket that does not listen is the connection
    assert got["inheritable"] == [False, False]  # only deliberate descriptors cross an exec
    assert got["other_pid"] == {}  # the variables were meant for another process


@pytest.mark.parametrize("value, names", [("1", {3: "unknown"}),
                                          ("3", {3: "a", 4: "unknown", 5: "unknown"})])
def test_listen_fds_names(value: str, names: dict[int, str]) -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": value}
    if value == "3":
        environ["LISTEN_FDNAMES"] = "a::"
    assert listen_fds(environ) == names


def test_listen_fds_that_is_not_a_count_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="LISTEN_FDS='x'"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_sends_to_the_socket_the_mapping_names(tmp_path: Path, abstract: bool,
                                                        monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)  # the C environment names none
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        if abstract:
            name = f"tcpmuxd-test-{os.getpid()}-{id(receiver)}"
            receiver.bind("\0" + name)
            value = "@" + name
        else:
            receiver.bind(str(tmp_path / "notify"))
            value = str(tmp_path / "notify")
        receiver.settimeout(10)
        notifier = Notifier({"NOTIFY_SOCKET": value})
        assert notifier.enabled
        notifier.ready("serving")
        assert receiver.recv(4096).decode().split("\n") == [
            "READY=1", "STATUS=serving", f"MAINPID={os.getpid()}"]


def test_notifier_without_a_socket_is_silent(monkeypatch, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "notify"))
        # The C environment names a socket, the mapping does not: nothing is sent.
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        for value in ("", "vsock:2:1234"):
            notifier = Notifier({"NOTIFY_SOCKET": value} if value else {})
            assert not notifier.enabled
            notifier.ready("serving")
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(4096)  # the datagrams would be queued by now: sendto() is synchronous


def test_notifier_watchdog_interval_from_the_mapping() -> None:
    pid = str(os.getpid())
    assert Notifier({"WATCHDOG_USEC": "400000"}).watchdog_interval == 0.2
    assert Notifier({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": pid}).watchdog_interval == 0.2
    assert Notifier({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({}).watchdog_interval is None


def test_child_environment_drops_systemds_private_variables() -> None:
    base = {"PATH": "/bin", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x", "NOTIFY_SOCKET": "/n",
            "WATCHDOG_USEC": "1", "MAINPID": "1", "JOURNAL_STREAM": "1:2", "HOME": "/root"}
    assert child_environment(base, {"REMOTE_ADDR": "192.0.2.1"}) == {
        "PATH": "/bin", "HOME": "/root", "REMOTE_ADDR": "192.0.2.1"}
