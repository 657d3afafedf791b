"""sockmuxd's memory under a peer that floods frames it answers by itself and never reads.

A receptor (``sockmuxd --accept 127.0.0.1:PORT --secret ...``) from the tree under test gets
one link from a hostile peer (``tests/sockmux/hostile_peer.py``: a plain socket speaking
frames, with a 4 KiB receive buffer) that floods ECHO frames and reads nothing, in two phases:
``before-auth`` (only its HELLO sent) and ``authenticated`` (the link is up with the shared
secret). For each event loop (uvloop, asyncio) and build (compiled where the tree has it, and
SOCKMUXD_PURE_PYTHON=1) it prints the receptor's VmRSS before the flood, its VmHWM (peak) after,
the rise, what the receptor read, whether it stopped reading (our sends blocked 0.5 s), and
whether and when it cut the link, with its log record. A flood stops after ``--seconds`` or
once the rise passes 1 GiB (to spare the machine).

    .venv/bin/python bench/flood_rss.py                 # this tree: ~1 min
    .venv/bin/python bench/flood_rss.py --tree OLD      # another checkout (e.g. git worktree)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from _common import (REPO, BenchError, Processes, command_line, exit_on_signals, free_port,
                     machine_summary, wait_until)

sys.path.insert(0, os.path.join(REPO, "tests", "sockmux"))
from hostile_peer import FLOOD_FRAMES, FloodPeer, vm_kib  # noqa: E402

SECRET = b"flood-rss-benchmark-secret-0123456789"
SEND_TIMEOUT = 2.0
MAX_RISE_KIB = 1 << 20
PHASES = {"before-auth": "hello", "authenticated": "up"}


def has_compiled(tree: str) -> bool:
    return any(name.endswith(".so") for name in os.listdir(os.path.join(tree, "tcpmuxd",
                                                                          "sockmux")))


def run_one(procs: Processes, tree: str, tmp: str, loop: str, pure: bool, phase: str,
            seconds: float, secret_path: str, send_timeout_flag: bool) -> str:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY"))}
    env.pop("SOCKMUXD_PURE_PYTHON", None)
    if pure:
        env["SOCKMUXD_PURE_PYTHON"] = "1"
    log_path = os.path.join(tmp, f"receptor-{loop}-{pure}-{phase}.log")
    argv = [sys.executable, "-m", "tcpmuxd.sockmux.daemon", "--accept", f"127.0.0.1:{port}",
            "--secret", secret_path, "--exit", f"127.0.0.1:{free_port()}", "--loop", loop]
    if send_timeout_flag:
        argv += ["--send-timeout", f"{SEND_TIMEOUT:g}s"]
    with open(log_path, "wb") as log:
        proc = procs.start("sockmuxd", argv, cwd=tree, env=env, stdout=log, stderr=log)
    try:
        def listening() -> bool:
            with open(log_path, errors="replace") as f:
                return "waiting for the peer" in f.read() or proc.poll() is not None
        if not wait_until(listening, 20) or proc.poll() is not None:
            raise BenchError(f"sockmuxd did not start (see {log_path})")
        time.sleep(0.3)
        base = vm_kib(proc.pid)
        peer = FloodPeer(port)
        try:
            peer.reach(PHASES[phase], SECRET)
            result = peer.flood(FLOOD_FRAMES["echo"], proc.pid, max_seconds=seconds,
                                max_rise_kib=MAX_RISE_KIB, base_kib=base)
            peak = vm_kib(proc.pid, "VmHWM")
            stalled_at = time.monotonic()
            cut = peer.wait_cut(SEND_TIMEOUT + 5) if result.stalled else None
            cut_after = time.monotonic() - stalled_at
        finally:
            peer.close()
        with open(log_path, errors="replace") as f:
            reason = next((m.group(1) for m in re.finditer(r"(the peer does not read: .*)",
                                                           f.read())), "")
        stop = ("stopped reading" if result.stalled else
                "reset" if result.reset else f"read on for {result.seconds:.1f} s")
        cut_text = (f"{cut} {cut_after:.1f} s after the stall" if cut else "not cut")
        return (f"{phase:13} {loop:8} {'pure' if pure else 'compiled':8} "
                f"{base / 1024:6.1f} {peak / 1024:7.1f} {(peak - base) / 1024:7.1f}  "
                f"{result.sent / 1e6:6.1f} MB  {stop}; {cut_text}"
                + (f"\n{'':15}log: {reason[:110]}" if reason else ""))
    finally:
        procs.stop(proc)
        procs.forget(proc)


def main() -> int:
    exit_on_signals()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=REPO, help="the checkout whose sockmuxd runs")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="longest flood per case (default 5)")
    args = p.parse_args()
    tree = os.path.abspath(args.tree)
    print(f"# {command_line()}")
    for line in machine_summary():
        print(f"# {line}")
    print(f"# tree: {tree}")
    builds = ([False] if has_compiled(tree) else []) + [True]
    with tempfile.TemporaryDirectory(prefix="flood-rss-") as tmp, Processes() as procs:
        secret_path = os.path.join(tmp, "secret")
        with open(secret_path, "wb") as f:
            f.write(SECRET)
        os.chmod(secret_path, 0o600)
        helptext = subprocess.run([sys.executable, "-m", "tcpmuxd.sockmux.daemon", "--help"],
                                  cwd=tree, capture_output=True, text=True).stdout
        send_timeout_flag = "--send-timeout" in helptext
        print(f"# flood: ECHO frames, nothing read; --send-timeout "
              f"{f'{SEND_TIMEOUT:g}s' if send_timeout_flag else '(not in this tree)'}")
        print(f"{'phase':13} {'loop':8} {'build':8} {'VmRSS':>6} {'VmHWM':>7} {'rise':>7}  "
              "(MiB)  read by the receptor; outcome")
        for phase in PHASES:
            for loop in ("uvloop", "asyncio"):
                for pure in builds:
                    try:
                        print(run_one(procs, tree, tmp, loop, pure, phase, args.seconds,
                                      secret_path, send_timeout_flag), flush=True)
                    except (BenchError, OSError, AssertionError) as exc:
                        print(f"{phase:13} {loop:8} {'pure' if pure else 'compiled':8} "
                              f"failed: {exc}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
