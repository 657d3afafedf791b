"""bench/tunnel.py's constants, its rows and measurements, and the reading of logs."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import time
from dataclasses import dataclass, field

from _common import BenchError, cpu_seconds, rss_kib, sched_cpu_seconds

HOST = "127.0.0.1"
SSHD = "/usr/sbin/sshd"
AES = "aes128-gcm@openssh.com"

#: targets of issue 3 (sockmuxd against ssh -L with its default cipher)
TARGET_THROUGHPUT = 1.0      # sockmuxd / ssh -L, Gbit/s
TARGET_RATE = 1.0            # sockmuxd / ssh -L, conn/s
TARGET_RTT = 1.0             # sockmuxd p50 / ssh -L p50 (at most)
TARGET_KIB_PER_STREAM = 10.0  # per side

#: share of all CPUs used by processes the benchmark did not start: below QUIET a measurement
#: starts, above DISTURBED it is repeated (--retries) and flagged
QUIET = 0.10
DISTURBED = 0.20

#: round trips per round and row: this many bursts, each on a fresh connection, in turn with
#: the other rows (Bench.interleaved says why); each burst begins with RTT_WARMUP unmeasured
RTT_BURSTS = 8
RTT_WARMUP = 50
#: new streams per round and row: --connections in this many bursts, in turn with the other rows
RATE_BURSTS = 4

ROW_KEYS = ("direct", "ssh", "ssh-aes", "sockmuxd", "sockmuxd-pure", "sockmuxd-tls")
TUNNEL_KEYS = ROW_KEYS[1:]
#: the sockmuxd rows and their labels; ``sockmuxd pure`` is the same tunnel on its sources
#: (SOCKMUXD_PURE_PYTHON=1), measured against the compiled build in the same run
SOCKMUXD_KEYS = {"sockmuxd": "sockmuxd", "sockmuxd-pure": "sockmuxd pure",
                 "sockmuxd-tls": "sockmuxd+TLS"}
#: the rows checked against the targets of issue 3
TARGET_KEYS = ("sockmuxd", "sockmuxd-tls")
#: selects the sources of sockmuxd's compiled modules (tcpmuxd/sockmux/native.py)
PURE_ENV = "SOCKMUXD_PURE_PYTHON"

_TIMEVAL_10S = struct.pack("ll", 10, 0)


@dataclass
class Row:
    key: str
    label: str
    bulk_port: int                 # where iperf3 -c connects (entrance, or the server itself)
    echo_port: int                 # where the echo clients connect
    tunnel: bool = True
    entrance_pids: list[int] = field(default_factory=list)   # ssh client / sockmuxd connector
    exit_pids: list[int] = field(default_factory=list)       # sshd session / sockmuxd receptor
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    cipher: str = ""
    started: float = field(default_factory=time.monotonic)
    up_after: float = 0.0
    build: str = "?"               # sockmuxd: compiled or pure Python, from its log

    def cpu(self) -> tuple[float, float]:
        """utime + stime (/proc/PID/stat, 10 ms ticks) of each side: for CPU per GB."""
        return (sum(cpu_seconds(p) for p in self.entrance_pids),
                sum(cpu_seconds(p) for p in self.exit_pids))

    def cpu_ns(self) -> tuple[float, float]:
        """The same from schedstat (ns resolution): for CPU per round trip / connection."""
        return (sum(sched_cpu_seconds(p) for p in self.entrance_pids),
                sum(sched_cpu_seconds(p) for p in self.exit_pids))

    def rss(self) -> tuple[int, int]:
        return (sum(_rss(p) for p in self.entrance_pids), sum(_rss(p) for p in self.exit_pids))

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)


def _rss(pid: int) -> int:
    try:
        return rss_kib(pid)
    except (OSError, BenchError):
        return 0


@dataclass
class Measure:
    """One measurement of one figure for one row."""
    row: str
    figure: str                    # bulk | rtt | rate | busy
    value: float = 0.0             # the figure the rounds are ordered by
    data: dict = field(default_factory=dict)
    other: float = 0.0
    other_valid: bool = True
    round: int = 0
    error: str | None = None


def _log_note(path: str) -> str:
    """How many lines a sockmuxd log has, how many of them per stream, and the first that
    mentions an error or a failure."""
    lines = _read(path).decode("utf-8", "replace").splitlines()
    streams = sum(1 for ln in lines if re.match(r"sockmuxd: stream \d+: ", ln))
    summaries = [m for ln in lines if (m := re.match(
        r"sockmuxd: (\d+) streams ended without a record of their own", ln))]
    bad = [ln for ln in lines if re.search(
        r"(?i)traceback|error|exception|warning|refused|failed|timed out", ln)
        and "without a record of their own" not in ln]
    counted = (f", {sum(int(m.group(1)) for m in summaries)} more counted in "
               f"{len(summaries)} summary records (--stream-log-rate)" if summaries else "")
    return (f"{os.path.basename(path)}: {len(lines)} log lines ({streams} of them one per "
            f"finished stream{counted})"
            + (f", {len(bad)} mention errors/failures; first: {bad[0][:240]}" if bad else ""))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""
