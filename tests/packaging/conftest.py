"""Only a report hook: how long each package build of tests/packaging took in this run.

Fixtures and helpers are in pkg_helpers.py (a named module); nothing here shadows
tests/conftest.py.
"""

from __future__ import annotations

import pkg_helpers


def pytest_terminal_summary(terminalreporter):
    if not pkg_helpers.TIMINGS:
        return
    terminalreporter.section("packaging build times")
    for label, seconds in pkg_helpers.TIMINGS.items():
        terminalreporter.write_line(f"{seconds:7.1f} s  {label}")
