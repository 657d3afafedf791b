"""Fixtures for the tcpmuxd tests; the helpers themselves are in tcpmuxd_harness.py (a named
module, so that a conftest.py in a subdirectory cannot shadow them)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

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
