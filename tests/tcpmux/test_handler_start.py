"""An Exec= handler that cannot be started is refused with ``-``, never answered ``+`` first.

With Acknowledge=yes the ``+`` is sent by the process that becomes the handler, after the fork,
the user switch and the check of the new user's process limit, right before the exec
(handlers/process.py). So a client gets ``+`` only when there is a handler, and ``-handler failed to
start: REASON`` when there cannot be one. Only the exec itself can fail after the ``+`` (here: a
script whose interpreter is missing, which passes the executable check); that connection is
reset and logged, never ended like a normal one.

Checked in the long-running daemon (``standalone``) and in an Accept=yes instance (``accept``,
under ``systemd-socket-activate``, which execs the handler in its own place), with real
process limits: RLIMIT_NPROC and real processes of an unused uid (the limit of fork is tested
in test_resources.py, under an unprivileged uid).
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from tcpmuxd_harness import write_service
from test_exec_environment import socket_activate
from privileges import unused_uid

pytestmark = pytest.mark.timeout(90)

IO_TIMEOUT = 10.0
#: RLIMIT_NPROC of tcpmuxd (root, so its own forks are not limited): the limit a handler run
#: as another user meets when that user already has this many processes.
NPROC = 3


def nproc_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NPROC, (NPROC, NPROC))


@contextmanager
def tcpmuxd(mode: str, config: Path, daemon_factory, tmp_path: Path):
    """(port, output()) of tcpmuxd with RLIMIT_NPROC=NPROC, in ``mode``."""
    if mode == "standalone":
        d = daemon_factory(config, preexec_fn=nproc_limit)
        yield d.port, d.output
        return
    limit = f"import resource; resource.setrlimit(resource.RLIMIT_NPROC, ({NPROC}, {NPROC}))\n"
    with socket_activate(mode, config, tmp_path, before_exec=limit) as srv:
        yield srv.port, srv.output


def request(port: int, data: bytes) -> tuple[bytes, str]:
    """Send, half-close, read to the end: (bytes, how it ended: "eof" or "reset")."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            return bytes(got), "reset"
        return bytes(got), "eof"


def wait_logged(output, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (out := output()):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{out}"
        time.sleep(0.02)
    return out


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(5)


@pytest.mark.parametrize("mode", ["standalone", "accept"])
def test_user_at_its_process_limit_is_refused_before_the_ack(mode, public_dir, daemon_factory,
                                                             tmp_path, sleepers):
    if os.geteuid() != 0:
        pytest.skip("needs root to run handlers and processes as another user")
    uid = unused_uid()
    write_service(public_dir, "cat.conf", f"[Service]\nExec=/bin/cat\nUser={uid}\nGroup={uid}\n")

    def sleeper() -> subprocess.Popen:
        return subprocess.Popen(["sleep", "60"], user=uid, group=uid, extra_groups=[],
                                start_new_session=True)

    with tcpmuxd(mode, public_dir, daemon_factory, tmp_path) as (port, output):
        # setuid() flags a process whose new user has more than RLIMIT_NPROC processes already,
        # and its exec fails: NPROC processes of the uid are still fine, one more is the edge.
        sleepers.extend(sleeper() for _ in range(NPROC))
        assert request(port, b"cat\r\nunder the limit") == (b"+\r\nunder the limit", "eof")
        sleepers.append(sleeper())
        reason = f"handler failed to start: user {uid} is at its process limit (RLIMIT_NPROC)"
        assert request(port, b"cat\r\nover the limit") == (f"-{reason}\r\n".encode(), "eof")
        wait_logged(output, f"refused: {reason}")
        last = sleepers.pop()
        last.kill()
        last.wait(5)
        assert request(port, b"cat\r\nback under") == (b"+\r\nback under", "eof")


@pytest.mark.parametrize("mode", ["standalone", "accept"])
def test_working_directory_missing_is_refused(mode, public_dir, daemon_factory, tmp_path):
    write_service(public_dir, "cat.conf",
                  f"[Service]\nExec=/bin/cat\nWorkingDirectory={public_dir}/gone\n")
    with tcpmuxd(mode, public_dir, daemon_factory, tmp_path) as (port, output):
        reason = "handler failed to start: No such file or directory"
        assert request(port, b"cat\r\ndata") == (f"-{reason}\r\n".encode(), "eof")
        wait_logged(output, f"refused: {reason}")


@pytest.mark.parametrize("mode", ["standalone", "accept"])
def test_exec_failing_after_the_ack_resets_and_is_logged(mode, public_dir, daemon_factory,
                                                         tmp_path):
    script = public_dir / "orphan-script"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)  # executable, so it passes the check; only its exec fails
    write_service(public_dir, "orphan.conf", f"[Service]\nExec={script}\n")
    write_service(public_dir, "cat.conf", "[Service]\nExec=/bin/cat\n")
    with tcpmuxd(mode, public_dir, daemon_factory, tmp_path) as (port, output):
        assert request(port, b"orphan\r\n") == (b"+\r\n", "reset")
        wait_logged(output, "handler failed to start after the + reply: "
                            "No such file or directory")
        assert request(port, b"cat\r\nstill serving") == (b"+\r\nstill serving", "eof")
