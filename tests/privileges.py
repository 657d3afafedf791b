"""Test helpers for running without root's powers.

Root reads and searches any directory, so tests of permission errors (an unreadable drop-in
directory, an unsearchable one above a file) must drop root first (:func:`as_nobody`, shared by
the tcpmuxd and sockmuxd configuration tests). Tests that start tcpmuxd itself as another user
need a Python and a tcpmuxd that user can read, also when the clone is in /root (mode 0700):
:func:`python_for_any_user`, through the ``any_user_python`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pickle
import pwd
import re
import shutil
import stat
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from tcpmuxd_harness import ROOT


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


def reachable_by_others(path: str | Path) -> bool:
    """Whether any user can get at ``path``: every directory on the way searchable by others,
    and ``path`` readable (and, a directory, searchable) by them."""
    path = Path(path).resolve()
    for directory in reversed(path.parents):
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return False
    mode = os.stat(path).st_mode
    return bool(mode & stat.S_IROTH) and (not stat.S_ISDIR(mode) or bool(mode & stat.S_IXOTH))


@dataclass(frozen=True)
class AnyUserPython:
    """How any user runs this tree's tcpmuxd: ``[python, "-m", "tcpmuxd", ...]`` with
    ``PYTHONPATH=pythonpath``, in the directory ``cwd``."""

    python: str
    pythonpath: str
    cwd: str

    def env(self, **more: str) -> dict[str, str]:
        """The environment of this process with ``PYTHONPATH`` (and ``more``) set."""
        return {**os.environ, "PYTHONPATH": self.pythonpath, **more}


#: How to run these tests when even a copy cannot help (the interpreter itself is out of reach).
READABLE_CLONE = ("clone the repository and run script/bootstrap where other users can read "
                  "them (not under a mode-0700 home such as /root)")


def python_for_any_user(scratch: Path) -> AnyUserPython:
    """What an unprivileged user (``nobody``, an unused uid) needs to run tcpmuxd from this tree.

    Where the tree and the virtualenv can be read by others, that is them. Under a directory
    other users cannot enter (a clone in /root, mode 0700), the tcpmuxd package (with its
    compiled modules) and the project's dependencies (pyproject.toml) are copied into
    ``scratch`` (a world-readable directory the caller made), and run with the virtualenv's
    base interpreter, which is the system's. Skips, saying how to run the test, when that
    interpreter is out of reach too.
    """
    if reachable_by_others(ROOT) and reachable_by_others(sys.executable):
        return AnyUserPython(sys.executable, str(ROOT), str(ROOT))
    python = os.path.realpath(sys.executable)
    if not reachable_by_others(python):
        pytest.skip(f"other users cannot run {python} (a test runs tcpmuxd as one): "
                    + READABLE_CLONE)
    wanted = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-")
              for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
              ["dependencies"]}
    tops = ["tcpmuxd"] + sorted(
        top for top, dists in importlib.metadata.packages_distributions().items()
        if "/" not in top and any(d.lower().replace("_", "-") in wanted for d in dists))
    for top in tops:
        spec = importlib.util.find_spec(top)
        assert spec is not None and spec.submodule_search_locations, f"{top} is not a package"
        shutil.copytree(list(spec.submodule_search_locations)[0], scratch / top,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, dirnames, filenames in os.walk(scratch):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    return AnyUserPython(python, str(scratch), str(scratch))


def unused_uid() -> int:
    """A uid with no account and no process: RLIMIT_NPROC counts per real uid, and nobody's
    count could include processes of other test runs on this machine."""
    in_use = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            in_use.add(os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            pass
    for uid in range(61000 + os.getpid() % 3000, 65000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in in_use:
                return uid
    pytest.skip("no free uid")
