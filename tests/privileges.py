"""Test helper: run a function without root's powers, in a forked child.

Root reads and searches any directory, so tests of permission errors (an unreadable drop-in
directory, an unsearchable one above a file) must drop root first. Shared by the tcpmuxd
and sockmuxd configuration tests.
"""

from __future__ import annotations

import os
import pickle
import pwd
from typing import Any, Callable


def as_nobody(func: Callable[[], Any]) -> Any:
    """Run ``func`` in a forked child that dropped root (to ``nobody``), return its picklable
    result. Without root, the child just runs it as the current user."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 1
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(func(), out)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as incoming:
        data = incoming.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0, f"the child running {func!r} failed (status {status:#x})"
    return pickle.loads(data)
