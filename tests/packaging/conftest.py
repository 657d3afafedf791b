"""Two hooks: the time limit of the package tests, and a report of how long each package build
of tests/packaging took in this run.

Fixtures and helpers are in pkg_helpers.py (a named module); nothing here shadows
tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pkg_helpers
import pytest

HERE = Path(__file__).resolve().parent

#: A test here may be the first to need a package, and so build it in its fixture: each build
#: is bounded by its own subprocess timeout (900 s, pkg_helpers), which the suite-wide 120 s
#: of pytest-timeout would cut short on a busy machine (an Arch build took 110 s on an idle one).
PACKAGE_TEST_TIMEOUT = 1000


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(item.path).resolve().parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(PACKAGE_TEST_TIMEOUT))


def pytest_terminal_summary(terminalreporter):
    if not pkg_helpers.TIMINGS:
        return
    terminalreporter.section("packaging build times")
    for label, seconds in pkg_helpers.TIMINGS.items():
        terminalreporter.write_line(f"{seconds:7.1f} s  {label}")
