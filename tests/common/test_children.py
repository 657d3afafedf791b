"""ExitWatch: a real child process, watched through a pidfd and by polling."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from tcpmuxd.common.children import ExitWatch

SLEEP = [sys.executable, "-c", "import time; time.sleep(0.3)"]


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_on_exit_runs_once_after_the_child_is_reaped(pidfd, monkeypatch):
    if not pidfd:  # no pidfd can be opened: the one substitution here, to take the other path
        monkeypatch.delattr(os, "pidfd_open", raising=False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[int | None] = []
        proc = subprocess.Popen(SLEEP)
        ExitWatch(loop, proc, lambda: calls.append(proc.returncode), 0.02)
        await asyncio.sleep(0.1)
        assert calls == [] and proc.returncode is None  # still running: nothing yet
        async with asyncio.timeout(10):
            while not calls:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert calls == [0]  # once, and the child is reaped (no zombie left)
        with pytest.raises(ChildProcessError):
            os.waitpid(proc.pid, os.WNOHANG)

    asyncio.run(main())


def test_cancel_stops_watching_and_is_idempotent():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[bool] = []
        proc = subprocess.Popen(SLEEP)
        watch = ExitWatch(loop, proc, lambda: calls.append(True), 0.02)
        watch.cancel()
        watch.cancel()
        proc.wait(timeout=10)
        await asyncio.sleep(0.1)
        assert calls == []

    asyncio.run(main())
