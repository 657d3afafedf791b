"""A live DeleGate 9.9.11, the reference SockMux implementation, as a test peer.

DeleGate is not part of this project and is never copied into it (its licence allows copies for
one's own use, not redistribution). A test finds it, in this order:

1. ``DELEGATED``: the path of a built ``delegated`` binary;
2. ``TCPMUXD_DELEGATE_SRC``: a directory holding ``delegate-9.9.11-src.tar.gz`` and a ``build``
   script (``build OUT_BINARY`` compiles it, patched for today's gcc/glibc, with a working
   SockMux connect helper); by default ``../shared/peers/delegate`` beside the clone. The
   binary is built once and cached outside the clone, in
   ``${XDG_CACHE_HOME:-~/.cache}/tcpmuxd-tests/delegate-<first 16 hex digits of the
   tarball's SHA-256>/delegated``, so a new tarball builds anew.

Where neither gives a binary, or it cannot be built, the tests that need it are skipped with
the reason (``pytest -rs`` prints it); they never pass silently.

DeleGate always runs inside a network namespace of the test's own (it resolves names at
start-up and would wait for a resolver), with no resolver, in plain mode (``SOXCONF=crypt:no``:
its own cipher is never used with us), in its own session (a receptor forks a child per link:
the whole process group is stopped).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netns_harness import ROOT, NsProc

TARBALL = "delegate-9.9.11-src.tar.gz"
DEFAULT_SRC = ROOT.parent / "shared" / "peers" / "delegate"
BUILD_TIMEOUT = 1200.0
#: (pair, what, MB/s) of the 64 MiB streams, printed at the end of the run (conftest.py).
THROUGHPUT: list[tuple[str, str, float]] = []


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tcpmuxd-tests"


def find_or_build() -> tuple[Path | None, str]:
    """(the binary, how it was found) or (None, the reason there is none)."""
    given = os.environ.get("DELEGATED")
    if given:
        path = Path(given)
        if path.is_file() and os.access(path, os.X_OK):
            return path, f"DELEGATED={given}"
        return None, f"DELEGATED={given} is not an executable file"
    src = Path(os.environ.get("TCPMUXD_DELEGATE_SRC") or DEFAULT_SRC)
    tarball, build = src / TARBALL, src / "build"
    if not tarball.is_file() or not build.is_file():
        return None, (f"no DeleGate peer: set DELEGATED=/path/to/delegated, or "
                      f"TCPMUXD_DELEGATE_SRC=DIR with {TARBALL} and its build script "
                      f"(looked in {src})")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()[:16]
    binary = _cache_dir() / f"delegate-{digest}" / "delegated"
    if binary.is_file():
        return binary, f"cached build {binary}"
    binary.parent.mkdir(parents=True, exist_ok=True)
    with open(binary.parent / "build.lock", "w") as lock:  # one build for parallel runs
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():
            return binary, f"cached build {binary}"
        print(f"delegate_peer: building DeleGate from {tarball} (about 2 minutes)",
              file=sys.stderr, flush=True)
        start = time.monotonic()
        try:
            out = subprocess.run(["bash", str(build), str(binary)], capture_output=True,
                                 text=True, timeout=BUILD_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"building DeleGate failed: {exc}"
        if out.returncode != 0 or not binary.is_file():
            tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
            return None, f"building DeleGate failed (exit {out.returncode}):\n{tail}"
        print(f"delegate_peer: built {binary} in {time.monotonic() - start:.0f} s",
              file=sys.stderr, flush=True)
    return binary, f"built {binary}"


class DeleGate(NsProc):
    """One DeleGate SockMux peer in namespace ``ns``: a receptor (``accept=PORT``) or a
    connector (``connect=PORT``) on 127.0.0.1, with an entrance and the exit its streams go
    to."""

    def __init__(self, binary: Path, ns: str, log: Path, *, entrance: int, exit_port: int,
                 accept: int | None = None, connect: int | None = None,
                 name: str = "delegate") -> None:
        assert (accept is None) != (connect is None)
        # DeleGate drops root for "nobody": its root must be writable for that user
        # (pytest's own temporary directories are 0700).
        self.root = Path(tempfile.mkdtemp(prefix="tcpmuxd-delegate-"))
        self.root.chmod(0o777)
        link = (["-P127.0.0.1:%d" % accept, "SERVER=sockmux"] if accept is not None
                else ["SERVER=sockmux://127.0.0.1:%d" % connect])
        argv = [str(binary), "-f", "-v", *link, f"PORT=127.0.0.1:{entrance}",
                f"SERVER=tcprelay://127.0.0.1:{exit_port},-in", f"DGROOT={self.root}",
                "RESOLV=", "RES_WAIT=0", "ADMIN=root@localhost", "SOXCONF=crypt:no"]
        super().__init__(name, ns, argv, log)

    def stop(self, timeout: float = 5.0) -> int | None:
        code = super().stop(timeout)
        shutil.rmtree(self.root, ignore_errors=True)
        return code
