"""Fixtures for the tcpmuxd tests; the helpers themselves are in tcpmuxd_harness.py (a named
module, so that a conftest.py in a subdirectory cannot shadow them)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from privileges import AnyUserPython, python_for_any_user
from tcpmuxd_harness import Daemon

@pytest.fixture
def services(tmp_path: Path) -> Path:
    """An empty service directory for the test to fill."""
    d = tmp_path / "conf.d"
    d.mkdir()
    return d


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator:
    started: list[Daemon] = []

    def start(config_dir: Path, *args: str, **kw) -> Daemon:
        d = Daemon(config_dir, tmp_path, list(args), **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user may enter, e.g. a config directory an unprivileged daemon reads
    (pytest's tmp_path is root's, mode 0700), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="tcpmuxd-public-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def any_user_python() -> Iterator[AnyUserPython]:
    """How another user runs this tree's tcpmuxd (privileges.python_for_any_user), with a
    world-readable scratch directory for the copies it may need (pytest's own temporary
    directories are root's, mode 0700), removed at the end of the session."""
    scratch = Path(tempfile.mkdtemp(prefix="tcpmuxd-any-user-"))
    try:
        scratch.chmod(0o755)
        yield python_for_any_user(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
