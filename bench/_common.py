"""Shared helpers for the benchmarks in bench/: timing, percentiles, RSS, ports, processes.

Standard library only, so that a benchmark runs from a bare virtualenv. Every helper process a
benchmark starts goes through :class:`Processes`, which puts it in its own session (process
group) and kills the whole group on the way out, also on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from typing import Iterable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchError(Exception):
    """A benchmark cannot go on; the message says why and, if it can, what to do."""


# --- signals -------------------------------------------------------------------------------

def exit_on_signals() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit, so that ``finally`` blocks clean up (Ctrl-C is
    already KeyboardInterrupt)."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


# --- event loop ----------------------------------------------------------------------------

def install_fastest_loop() -> str:
    """uvloop for the asyncio helpers when it is installed (as sockmuxd uses it); returns the
    loop's name for the report."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    uvloop.install()
    return "uvloop"


# --- statistics ----------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (p in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# --- memory and descriptors ----------------------------------------------------------------

def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS from /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_limit(pid: int | str = "self") -> str:
    """The 'Max open files' soft/hard pair from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft}/{hard}"
    return "?"


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to at least ``wanted`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))  # root may raise hard
        except (ValueError, OSError):
            raise BenchError(f"RLIMIT_NOFILE hard limit is {hard}, need {wanted}: run as root "
                             f"or raise it (ulimit -Hn {wanted})") from None
        return wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- ports ---------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago (for programs that must be told a port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_connectable(addr: tuple[str, int], timeout: float, proc: subprocess.Popen | None = None,
                     what: str = "server") -> None:
    """Connect to ``addr`` until it accepts (bounded), failing early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before it listened")
        try:
            with socket.create_connection(addr, timeout=1.0):
                return
        except OSError as e:
            last = e
            time.sleep(0.02)
    raise BenchError(f"{what} did not accept on {addr[0]}:{addr[1]} within {timeout:.0f} s "
                     f"({last})")


# --- processes -----------------------------------------------------------------------------

class Processes:
    """Every process a benchmark starts, each in its own session; :meth:`close` ends them all
    (SIGTERM to the group, then SIGKILL). Use as a context manager."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("close_fds", True)
        proc = subprocess.Popen(list(argv), start_new_session=True, **kw)
        self.procs.append((name, proc))
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        """``proc`` has exited and was waited for: no longer ours to stop."""
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop(self, proc: subprocess.Popen, grace: float = 3.0) -> None:
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            # the group may outlive its leader (forked children): kill what is left. Only
            # after a leader we saw alive: the group id of one long gone may have been reused.
            _killpg(proc.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with suppress(OSError):
                    stream.close()

    def close(self) -> None:
        # ignore further Ctrl-C while cleaning up, so cleanup itself is not cut short
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for _name, proc in reversed(self.procs):
                self.stop(proc)
            self.procs.clear()
        finally:
            signal.signal(signal.SIGINT, old)

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _killpg(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def read_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """One line from ``proc.stdout`` (a binary pipe), bounded in time."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + timeout
        data = b""
        fd = proc.stdout.fileno()
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise BenchError(f"{what}: no answer within {timeout:.0f} s")
            chunk = os.read(fd, 1)
            if not chunk:
                raise BenchError(f"{what} exited (status {proc.wait()}) before answering")
            data += chunk
        return data.decode().strip()
    finally:
        sel.close()


def read_all(proc: subprocess.Popen, timeout: float, what: str) -> bytes:
    """Everything ``proc`` writes to stdout until it exits, bounded in time."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: did not finish within {timeout:.0f} s") from None
    return out or b""


# --- what to print about the run -----------------------------------------------------------

def help_text(argv: list[str], name: str, tree: str, env: dict[str, str],
              cwd: str) -> tuple[str, list[str]]:
    """Run ``argv`` (a daemon's --help, from the tree under test): its output, or the reason
    it does not start there (a one-line problem, as the prerequisite checks report them)."""
    try:
        r = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=30, text=True)
    except subprocess.TimeoutExpired:
        return "", [f"{name}: `{shlex.join(argv[1:])}` did not finish within 30 s"]
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return "", [f"{name} does not start from {tree} (`{shlex.join(argv)}` exited "
                    f"{r.returncode}: {tail[0]})"]
    return r.stdout, []


def machine_summary() -> list[str]:
    cpus = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cpus
    model = "?"
    with suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    distro = "?"
    with suppress(OSError):
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    distro = line.split("=", 1)[1].strip().strip('"')
    return [
        f"machine: nproc={usable} (cpu_count={cpus}), {model}",
        f"system:  {distro}, Linux {platform.release()}",
        f"python:  {sys.version.split()[0]} ({sys.executable})",
    ]


def command_line() -> str:
    return shlex.join([sys.executable] + sys.argv)


def which(name: str, extra: Iterable[str] = ("/usr/sbin", "/sbin")) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(extra)
    return shutil.which(name, path=path)


# --- CPU time and process trees (added for bench/tunnel.py) --------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (fields[0] is the state), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of ``pid`` (all its threads) from /proc/PID/stat, in seconds (10 ms
    ticks); with ``children``, plus cutime + cstime of the children it has reaped. 0 if gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14..17
    return sum(int(x) for x in fields[11:15 if children else 13]) / CLK_TCK


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            ppid = parent_pid(int(name))
            if ppid is not None:
                parents.setdefault(ppid, []).append(int(name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return sorted(found)


def machine_cpu() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs together, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def own_cpu() -> float:
    """CPU seconds of this process and of every child it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """How much of the machine's CPUs processes *not* started by the benchmark use.

    ``ours`` returns the pids whose CPU time is the benchmark's own (long-running helpers);
    this process and the children it has waited for are always counted as its own.
    """

    def __init__(self, ours) -> None:
        self.ours = ours

    def _ours(self) -> float:
        return own_cpu() + sum(cpu_seconds(p, children=True) for p in self.ours())

    def start(self) -> tuple[tuple[int, int], float]:
        return machine_cpu(), self._ours()

    def share(self, mark: tuple[tuple[int, int], float]) -> tuple[float, bool]:
        """(share of all CPUs used by others since ``mark``, whether the window was long
        enough to tell: CPU times come in ticks)."""
        (busy0, total0), ours0 = mark
        busy1, total1 = machine_cpu()
        ours1 = self._ours()
        ticks = max(1, total1 - total0)
        other = (busy1 - busy0 - (ours1 - ours0) * CLK_TCK) / ticks
        valid = ticks >= 50 * (os.cpu_count() or 1) * CLK_TCK / 100
        return (max(0.0, other) if valid else 0.0), valid

    def wait_quiet(self, quiet: float, timeout: float) -> tuple[float, float]:
        """Wait at most ``timeout`` s until others use at most ``quiet`` of the CPUs (sampled
        over 0.3 s). Returns (the last share seen, seconds waited)."""
        start = time.monotonic()
        while True:
            mark = self.start()
            time.sleep(0.3)
            (busy0, total0), ours0 = mark
            busy1, total1 = machine_cpu()
            other = (busy1 - busy0 - (self._ours() - ours0) * CLK_TCK) / max(1, total1 - total0)
            waited = time.monotonic() - start
            if other <= quiet or waited >= timeout:
                return max(0.0, other), waited


def sched_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by every thread of ``pid``, from /proc/PID/task/*/schedstat
    (nanoseconds: finer than the 10 ms ticks of /proc/PID/stat), 0 if gone."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def run_benchmark(args, roles: dict, make_bench, *, name: str, tmp_prefix: str,
                  needs: str) -> int:
    """The common ``main()`` of the benchmarks: helper roles (``--_role``), signal handling,
    a temporary directory, and every started process stopped whatever happens.

    ``make_bench(args, procs, tmp)`` returns an object whose ``run()`` gives the exit status.
    """
    if args._role:
        role, arg = args._role
        try:
            roles[role](arg)
        except (KeyboardInterrupt, BrokenPipeError):
            pass
        return 0
    exit_on_signals()
    if sys.prefix == sys.base_prefix:
        print(f"note: {sys.executable} is not the project's virtualenv "
              f"(run .venv/bin/python bench/{name})", file=sys.stderr)
    if sys.platform != "linux":
        print(f"{name}: Linux only ({needs})", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix=tmp_prefix)
    try:
        with Processes() as procs:
            return make_bench(args, procs, tmp).run()
    except BenchError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; every process it started has been stopped",
              file=sys.stderr)
        return 130
    except SystemExit as e:
        if isinstance(e.code, int) and e.code > 128:
            print(f"{name}: stopped by signal {e.code - 128}; every process it started "
                  "has been stopped", file=sys.stderr)
        raise
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
