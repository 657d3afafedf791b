"""Fixtures and reporting for tests that boot systemd in a container (see nspawn.py)."""

from __future__ import annotations

import pytest

from .nspawn import Container, unavailable_reason


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.parent.name == "e2e":
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def nspawn_available() -> None:
    """Skip, saying why, where containers cannot be booted (nspawn.unavailable_reason: not
    root, no systemd-nspawn, a chroot, a bare container does not come up)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"end-to-end test under systemd skipped: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a container gets its journal and console tail in the report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        containers = [value] if isinstance(value, Container) else [
            v for v in getattr(value, "__dict__", {}).values() if isinstance(v, Container)]
        for container in containers:
            try:
                text = container.diagnostics(lines=60)
            except Exception as e:  # the report must not fail
                text = f"(no diagnostics: {e!r})"
            report.sections.append((f"container {container.machine} ({name})", text))
