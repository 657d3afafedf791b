"""What resumption costs sockmuxd while the link stays up: CPU per 1-byte round trip.

Resumption keeps every frame written until the peer acknowledges it (docs/sockmux-protocol.md,
section 12). This measures what that bookkeeping costs on the data path, where it is
largest: one stream, 1-byte round trips (``send``, ``recv``, TCP_NODELAY) through a connector
and a receptor on loopback to an echo target, with the CPU of both daemons read from
schedstat (kernel time included, so the cache and allocator effects of holding the frames
count too, which callgrind's instruction counts in stream_instructions.sh do not show).

Rows, taken in turn for ``--rounds`` rounds (the machine's noise falls on all of them alike):

* ``on``: this tree, resumption on (``--resume-timeout 60s``, the default between two
  authenticated sockmuxd);
* ``off``: this tree, ``--resume-timeout 0`` (the peer against which ``on`` is compared);
* ``tree``: with ``--tree DIR``, sockmuxd from another source tree (e.g. the one before
  resumption, in a ``git worktree``), with its defaults.

    .venv/bin/python bench/resume_cost.py                       # ~1 min
    .venv/bin/python bench/resume_cost.py --tree /tmp/before    # and another checkout
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from _common import (REPO, BenchError, Processes, command_line, exit_on_signals, free_port,
                     machine_summary, percentile, read_line, sched_cpu_seconds, wait_until)

TUNNEL_BENCH = os.path.join(REPO, "bench", "tunnel.py")


def round_trips(port: int, warmup: int, count: int) -> list[float]:
    """``count`` timed 1-byte round trips (after ``warmup`` untimed) on one connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for i in range(warmup + count):
            t0 = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise BenchError("the echo through the tunnel broke off")
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def measure(procs: Processes, tmp: str, python: str, tree: str, extra: list[str],
            echo_port: int, args: argparse.Namespace) -> tuple[float, float]:
    """One row's round: (CPU microseconds per round trip, both daemons; p50 microseconds)."""
    link, entrance = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=tree)
    common = ["--secret", os.path.join(tmp, "secret"), *extra]
    daemon = [python, "-m", "tcpmuxd.sockmux.daemon"]
    log = open(os.path.join(tmp, "daemons.log"), "ab")
    receptor = procs.start("receptor", [*daemon, "--accept", f"127.0.0.1:{link}", "--exit",
                                        f"127.0.0.1:{echo_port}", *common],
                           env=env, stdout=log, stderr=log)
    connector = None
    try:
        # (the receptor's link port is not probed: a probe would be a failed link, which the
        # receptor holds against the next one; the connector re-dials until it listens)
        connector = procs.start("connector", [*daemon, "--connect", f"127.0.0.1:{link}",
                                              "--entrance", f"127.0.0.1:{entrance}", *common],
                                env=env, stdout=log, stderr=log)
        if not wait_until(lambda: _works(entrance), 20):
            raise BenchError(f"no stream through the tunnel from {tree} (see {log.name})")
        before = sched_cpu_seconds(connector.pid) + sched_cpu_seconds(receptor.pid)
        times = round_trips(entrance, args.warmup, args.round_trips)
        used = sched_cpu_seconds(connector.pid) + sched_cpu_seconds(receptor.pid) - before
    finally:
        for proc in (connector, receptor):
            if proc is not None:
                procs.stop(proc)
                procs.forget(proc)
        log.close()
    times.sort()
    # the warm-up round trips are inside the CPU figure too: a fixed few, the same per row
    return used / (args.round_trips + args.warmup) * 1e6, percentile(times, 50) * 1e6


def _works(port: int) -> bool:
    try:
        round_trips(port, 0, 1)
        return True
    except (OSError, BenchError):
        return False


def main() -> int:
    exit_on_signals()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--round-trips", type=int, default=20000,
                        help="timed round trips per row and round (20000)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed ones first (500)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, rows in turn (4)")
    parser.add_argument("--tree", help="also a sockmuxd from this source tree (its defaults)")
    args = parser.parse_args()
    python = sys.executable
    rows: list[tuple[str, str, list[str]]] = [
        ("on", REPO, ["--resume-timeout", "60s"]),
        ("off", REPO, ["--resume-timeout", "0"]),
    ]
    if args.tree:
        tree = os.path.abspath(args.tree)
        if not os.path.exists(os.path.join(tree, "tcpmuxd", "sockmux", "daemon.py")):
            print(f"resume_cost: {tree} has no tcpmuxd/sockmux/daemon.py", file=sys.stderr)
            return 2
        rows.append(("tree", tree, []))
    print("\n".join(machine_summary()))
    print(f"command: {command_line()}")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _t, _e in rows}
    with Processes() as procs, tempfile.TemporaryDirectory(prefix="resume-cost-") as tmp:
        secret = os.path.join(tmp, "secret")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(os.urandom(24).hex() + "\n")
        echo = procs.start("echo", [python, TUNNEL_BENCH, "--_role", "echo", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        echo_port = json.loads(read_line(echo, 20, "the echo target"))["ports"][0]
        try:
            for rnd in range(args.rounds):
                for name, tree, extra in rows:
                    results[name].append(measure(procs, tmp, python, tree, extra, echo_port,
                                                 args))
                print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        except BenchError as exc:
            print(f"resume_cost: {exc}", file=sys.stderr)
            return 1
    off = statistics.mean(cpu for cpu, _p in results["off"])
    print(f"\n1-byte round trips, {args.round_trips} per row and round, {args.rounds} rounds "
          "in turn; CPU of both daemons (schedstat) per round trip")
    print(f"  {'row':6s} {'CPU us/rt':>10s} {'(per round)':<32s} {'p50 us':>7s}  CPU / off")
    for name, tree, extra in rows:
        cpus = [cpu for cpu, _p in results[name]]
        p50 = statistics.median(p for _c, p in results[name])
        per_round = " ".join(f"{c:.1f}" for c in cpus)
        print(f"  {name:6s} {statistics.mean(cpus):10.1f} {per_round:<32s} {p50:7.1f}"
              f"  {statistics.mean(cpus) / off:.3f}    ({tree} {' '.join(extra)})".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
