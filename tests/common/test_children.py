"""common/children.py: real child processes, watched through a pidfd and by polling, reaped
and ended. Every wait is bounded and waits for an event; "nothing happened" is checked against
a later event that would have come after it (a second child's exit), never after a sleep."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from tcpmuxd.common.children import Child, ExitWatch, exit_text

#: Exits when its standard input ends: the test decides when, by closing the pipe.
UNTIL_EOF = [sys.executable, "-c", "import sys; sys.stdin.read()"]
#: Ignores SIGTERM, says so, then waits: only SIGKILL ends it.
STUBBORN = [sys.executable, "-c",
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)"]
WAIT = 10.0  # bound of every wait for an event


def held() -> subprocess.Popen[bytes]:
    return subprocess.Popen(UNTIL_EOF, stdin=subprocess.PIPE)


def release(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()


async def later_exit(loop: asyncio.AbstractEventLoop) -> None:
    """A barrier: a second child, watched the same way, exits and is seen. A watch that was
    still registered for an earlier child would have fired by then (its descriptor has been
    readable all along), so what has not happened by now does not happen."""
    seen = asyncio.Event()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ExitWatch(loop, proc, seen.set, 0.02)
    await asyncio.wait_for(seen.wait(), WAIT)


def assert_reaped(pid: int) -> None:
    with pytest.raises(ChildProcessError):  # no zombie left: it has been waited for
        os.waitpid(pid, os.WNOHANG)


@pytest.fixture(params=[True, False], ids=["pidfd", "polling"])
def pidfd(request, monkeypatch) -> bool:
    if not request.param:  # no pidfd can be opened: the one substitution here, to poll instead
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    return request.param


def test_exit_watch_reports_once_after_the_child_is_reaped(pidfd):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[tuple[int | None, bool]] = []
        released = False
        called = asyncio.Event()
        proc = held()

        def on_exit() -> None:
            calls.append((proc.returncode, released))
            called.set()

        ExitWatch(loop, proc, on_exit, 0.02)
        await asyncio.sleep(0)  # one loop iteration with the child running
        released = True
        release(proc)
        await asyncio.wait_for(called.wait(), WAIT)
        await later_exit(loop)
        assert calls == [(0, True)]  # once, only after the child could exit, and reaped
        assert_reaped(proc.pid)

    asyncio.run(main())


def test_exit_watch_cancel_stops_watching_and_is_idempotent(pidfd):
    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[bool] = []
        proc = held()
        watch = ExitWatch(loop, proc, lambda: calls.append(True), 0.02)
        watch.cancel()
        watch.cancel()
        release(proc)
        await loop.run_in_executor(None, proc.wait)
        await later_exit(loop)
        assert calls == []

    asyncio.run(main())


def run_child(body: Callable[[asyncio.AbstractEventLoop], object]) -> None:
    async def main() -> None:
        await body(asyncio.get_running_loop())  # type: ignore[misc]
    asyncio.run(main())


def test_child_that_exits_by_itself_within_the_grace_gets_no_signal(pidfd):
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        signals: list[int] = []
        exits: list[int | None] = []
        ended = asyncio.Event()
        proc = held()
        child = Child(loop, proc, poll_interval=0.02, on_signal=signals.append,
                      on_exit=lambda c: exits.append(c.returncode))
        child.end(WAIT, WAIT, ended.set)
        release(proc)
        await asyncio.wait_for(ended.wait(), WAIT)
        assert (exits, signals, child.returncode) == ([0], [], 0)
        assert_reaped(proc.pid)

    run_child(body)


def test_child_end_sends_sigterm_after_the_grace(pidfd):
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        signals: list[int] = []
        ended = asyncio.Event()
        proc = held()
        child = Child(loop, proc, poll_interval=0.02, on_signal=signals.append)
        child.end(0.05, WAIT, ended.set)
        child.end(WAIT, WAIT)  # asking again keeps the first deadline
        await asyncio.wait_for(ended.wait(), WAIT)
        assert (signals, child.returncode) == ([signal.SIGTERM], -signal.SIGTERM)
        assert_reaped(proc.pid)
        release(proc)

    run_child(body)


def test_child_that_ignores_sigterm_gets_sigkill(pidfd):
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        signals: list[int] = []
        ended = asyncio.Event()
        proc = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert await loop.run_in_executor(None, proc.stdout.readline) == b"ready\n"
        child = Child(loop, proc, poll_interval=0.02, on_signal=signals.append)
        child.end(0, 0.1, ended.set)
        await asyncio.wait_for(ended.wait(), WAIT)
        assert (signals, child.returncode) == ([signal.SIGTERM, signal.SIGKILL],
                                               -signal.SIGKILL)
        proc.stdout.close()

    run_child(body)


def test_child_signals_its_process_group(tmp_path: Path):
    """A child in its own session that started a process of its own: both end."""
    pidfile = tmp_path / "grandchild"

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        ended = asyncio.Event()
        proc = subprocess.Popen(["/bin/sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"],
                                start_new_session=True)
        deadline = loop.time() + WAIT
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert proc.poll() is None, "the shell ended before starting its child"
            assert loop.time() < deadline, "the shell did not start its child"
            await asyncio.sleep(0.01)
        grandchild = int(pidfile.read_text())
        child = Child(loop, proc, poll_interval=0.02, process_group=True)
        child.end(0, WAIT, ended.set)
        await asyncio.wait_for(ended.wait(), WAIT)
        assert child.returncode == -signal.SIGTERM
        deadline = loop.time() + WAIT
        while _alive(grandchild):
            assert loop.time() < deadline, "the child's own child outlived the signal"
            await asyncio.sleep(0.01)

    run_child(body)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_child_kill_now_reaps_before_returning_without_on_exit(pidfd):
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        exits: list[int | None] = []
        proc = held()
        child = Child(loop, proc, poll_interval=0.02, on_exit=lambda c: exits.append(1))
        child.kill_now()
        assert child.returncode == -signal.SIGKILL
        assert_reaped(proc.pid)
        await later_exit(loop)
        assert exits == []  # the caller ended it and knows
        release(proc)

    run_child(body)


def test_child_cancel_leaves_the_process_running(pidfd):
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        exits: list[int] = []
        signals: list[int] = []
        proc = held()
        child = Child(loop, proc, poll_interval=0.02, on_exit=lambda c: exits.append(1),
                      on_signal=signals.append)
        child.end(0, 0)
        child.cancel()  # also the SIGTERM that was due
        await later_exit(loop)
        assert proc.poll() is None and (exits, signals) == ([], [])
        release(proc)
        assert await loop.run_in_executor(None, proc.wait) == 0

    run_child(body)


def test_child_end_after_exit_calls_back_at_once(pidfd):
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        exited = asyncio.Event()
        proc = held()
        child = Child(loop, proc, poll_interval=0.02, on_exit=lambda c: exited.set())
        release(proc)
        await asyncio.wait_for(exited.wait(), WAIT)
        calls: list[bool] = []
        child.end(WAIT, WAIT, lambda: calls.append(True))
        assert calls == [True]

    run_child(body)


@pytest.mark.parametrize("code, text", [(0, "exit 0"), (3, "exit 3"),
                                        (-signal.SIGKILL, "signal SIGKILL"), (-99, "signal 99")])
def test_exit_text(code: int, text: str) -> None:
    assert exit_text(code) == text
