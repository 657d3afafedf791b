#!/usr/bin/env python3
"""Connection dispatch: tcpmuxd against xinetd, one run, loopback, ephemeral ports.

    .venv/bin/python bench/dispatch.py [--quick]      (as root; see bench/README.md)

Targets, each measured with N sequential connections and with N connections spread over
4 parallel client processes (connect, send NAME CRLF, read to EOF, check the reply):

* ``raw``          a trivial one-process TCPMUX-alike written here (reads the line, answers
                   ``+`` and a fixed line): the ceiling of the load generator itself;
* ``xinetd date``  xinetd 2.3.15 TCPMUXPLUS service running /bin/date (fork+exec per connection);
* ``tcpmuxd date`` tcpmuxd ``Exec=/bin/date`` (fork+exec per connection);
* ``tcpmuxd fwd``  tcpmuxd ``Forward=`` to a backend process that writes a fixed line and closes;
* ``tcpmuxd sni``  the same service found by the server name of a TLS ClientHello (ServerName=);
* ``tcpmuxd pass`` tcpmuxd ``PassTo=unix:`` to a receiver process that writes the same line;
* ``tcpmuxd unit`` tcpmuxd ``Unit=`` running /bin/date through tcpmuxd-handler, whose unix
                   socket ``systemd-socket-activate -l`` holds (the stand-in of the socket unit
                   tcpmuxd-handler@.socket: no systemd instance is needed; the helper and its
                   handlers run as the benchmark's user, in no unit of their own).

Then tcpmuxd's resident memory idle and with 1,000 connections that have not sent a name, and a
last check that it still serves. Nothing is installed: xinetd is fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` into a temporary directory (no install
scripts run, nothing else is started), unless --xinetd names a binary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (REPO, run_benchmark, BenchError, Processes, command_line,  # noqa: E402
                     machine_cpu,
                     fd_count, free_port, help_text, machine_summary, nofile_limit, percentile,
                     raise_nofile, read_all, read_line, rss_kib, wait_connectable, wait_until,
                     which)
from _dispatch_roles import (HOST, ROLES, SNI_NAME, TICK, check_reply,  # noqa: E402
                             proc_cpu, request_bytes, self_cpu, task_cpu)

#: What the Forward= backend, the PassTo= receiver and the raw server write.
SELF = os.path.abspath(__file__)

TARGETS_RSS_IDLE_MIB = 40.0
TARGETS_RSS_RISE_MIB = 20.0
TARGET_EXEC_RATIO = 1.0
TARGET_INPROC_RATIO = 3.0
TARGET_SNI_RATIO = 0.8  # routing by a ClientHello costs at most a fifth of Forward='s rate
#: Share of all CPUs used by processes the benchmark did not start: below QUIET a measurement
#: starts, above DISTURBED it is repeated (--retries) and flagged.
QUIET = 0.10
DISTURBED = 0.20




# ============================================================================================
# The parent
# ============================================================================================

@dataclass
class Target:
    key: str            # raw | xinetd-date | tcpmuxd-date | tcpmuxd-fwd | tcpmuxd-pass | ...
    label: str
    port: int
    name: str
    kind: str           # "date" or "line"
    pid: int = 0        # the server process whose CPU time is reported
    helper: int = 0     # Unit=: tcpmuxd-handler, whose CPU and its handlers' join +kids
    ok: bool = True     # False when its probe failed: measured anyway, shown with errors


@dataclass
class Result:
    target: Target
    mode: str
    clients: int
    attempted: int
    done: int = 0
    seconds: float = 0.0
    lat: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    nul: int = 0
    acks: dict[str, int] = field(default_factory=dict)
    client_cpu: float = 0.0     # seconds, all client processes
    server_cpu: float = 0.0     # seconds, the target's server process (all its threads)
    server_total: float = 0.0   # seconds, the same plus the children it reaped (handlers)
    busy: float = 0.0           # fraction of all CPUs busy during the run
    other: float = 0.0          # fraction of all CPUs used by processes this run did not start
    other_valid: bool = True    # False when the run was too short to tell
    round: int = 0

    def per_conn_us(self, seconds: float) -> float:
        return seconds / self.attempted * 1e6 if self.attempted else 0.0

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def nerrors(self) -> int:
        return sum(self.errors.values())

    def p(self, q: float) -> float:
        return percentile(self.lat, q) * 1000.0


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: str) -> None:
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.env = dict(os.environ)
        self.tree = os.path.abspath(args.tree or REPO)
        self.env["PYTHONPATH"] = self.tree + (os.pathsep + self.env["PYTHONPATH"]
                                              if self.env.get("PYTHONPATH") else "")
        self.notes: list[str] = []
        self.commands: list[str] = []
        self.results: list[Result] = []       # one per target and mode: the median round
        self.all_results: list[Result] = []   # every round
        self.server_pids: list[int] = []      # long-running processes this run started
        self.tcpmuxd: subprocess.Popen | None = None
        self.tcpmuxd_log = os.path.join(tmp, "tcpmuxd.log")
        self.unit_sock = os.path.join(tmp, "unit.sock")
        self.unit: subprocess.Popen | None = None
        self.xinetd: subprocess.Popen | None = None
        self.xinetd_version = "?"
        self.mem: dict[str, object] = {}
        self.final: list[tuple[str, bool, str]] = []
        # the report's lines and the MISSes it counted (see report())
        self.w: Callable[[str], None] = print
        self.misses = 0
        self.quiet_budget = args.quiet_budget

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    # --- helpers ------------------------------------------------------------------------

    def start_role(self, role: str, arg: str = "-") -> subprocess.Popen:
        return self.procs.start(role, [sys.executable, SELF, "--_role", role, arg],
                                stdout=subprocess.PIPE, env=self.env, cwd=self.tmp)

    def request(self, port: int, name: str, kind: str, timeout: float = 5.0) -> bytes:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(request_bytes(name, kind))
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return data
                data += chunk

    def probe(self, target: Target) -> str | None:
        try:
            return check_reply(self.request(target.port, target.name, target.kind), target.kind)
        except OSError as e:
            return f"{type(e).__name__}: {e}"

    # --- prerequisites ------------------------------------------------------------------

    def check_tcpmuxd(self) -> list[str]:
        text, problems = help_text([sys.executable, "-m", "tcpmuxd", "--help"], "tcpmuxd",
                                   self.tree, self.env, self.tmp)
        if problems:
            return problems
        missing = [opt for opt in ("--listen", "--config-dir", "--name-timeout")
                   if opt not in text]
        if missing:
            return [f"tcpmuxd --help does not list {', '.join(missing)}"]
        return []

    def find_xinetd(self) -> str:
        if self.args.xinetd:
            if not os.access(self.args.xinetd, os.X_OK):
                raise BenchError(f"--xinetd {self.args.xinetd}: not an executable file")
            return self.args.xinetd
        # Fetched, never installed: no maintainer scripts run, no inetd is started or replaced.
        problems = []
        for tool in ("apt-get", "dpkg-deb"):
            if not which(tool):
                problems.append(f"{tool} not found")
        if not problems:
            pkgdir = os.path.join(self.tmp, "xinetd-pkg")
            os.makedirs(pkgdir)
            self.say("fetching xinetd: apt-get download xinetd (not installed: unpacked with "
                     "dpkg-deb -x into the temporary directory)")
            r = subprocess.run(["apt-get", "download", "-q", "xinetd"], cwd=pkgdir,
                               capture_output=True, text=True, timeout=300)
            debs = [f for f in os.listdir(pkgdir) if f.endswith(".deb")]
            if r.returncode != 0 or not debs:
                err = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.startswith("E:")]
                problems.append("`apt-get download xinetd` failed"
                                + (f" ({err[0]})" if err else ""))
            else:
                deb = os.path.join(pkgdir, debs[0])
                root = os.path.join(pkgdir, "root")
                subprocess.run(["dpkg-deb", "-x", deb, root], check=True, timeout=120)
                binary = os.path.join(root, "usr", "sbin", "xinetd")
                if os.access(binary, os.X_OK):
                    self.xinetd_version = debs[0].split("_")[1].replace("%3a", ":")
                    return binary
                problems.append(f"{debs[0]} holds no usr/sbin/xinetd")
        installed = which("xinetd")
        if installed:
            self.notes.append(f"xinetd could not be fetched ({'; '.join(problems)}); "
                              f"used the installed {installed} with a private configuration")
            return installed
        raise BenchError("xinetd is missing and could not be fetched: " + "; ".join(problems)
                         + ". Fix: `apt-get update` (so that `apt-get download xinetd` works), "
                           "or `apt-get install xinetd`, or pass --xinetd PATH")

    def check_libraries(self, binary: str) -> None:
        if not which("ldd"):
            return
        r = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30)
        missing = [ln.split()[0] for ln in r.stdout.splitlines() if "not found" in ln]
        if missing:
            packages = {"libwrap.so.0": "libwrap0", "libtirpc.so.3": "libtirpc3",
                        "libselinux.so.1": "libselinux1", "libnsl.so.2": "libnsl2"}
            pkgs = sorted({packages.get(m, f"<package with {m}>") for m in missing})
            raise BenchError(f"xinetd ({binary}) needs missing libraries {', '.join(missing)}: "
                             f"apt-get install {' '.join(pkgs)}")

    # --- servers ------------------------------------------------------------------------

    def start_helpers(self) -> tuple[int, int, str]:
        backend = self.start_role("backend")
        raw = self.start_role("raw")
        sock = os.path.join(self.tmp, "pass.sock")
        recv = self.start_role("passrecv", sock)
        self.server_pids += [backend.pid, raw.pid, recv.pid]
        backend_port = int(read_line(backend, 30, "Forward= backend"))
        raw_port = int(read_line(raw, 30, "raw server"))
        read_line(recv, 30, "PassTo= receiver")
        return backend_port, raw_port, sock, raw.pid

    def start_unit(self) -> None:
        """The Unit= target's unit: systemd-socket-activate holds its socket, as
        tcpmuxd-handler@.socket would, and starts tcpmuxd-handler /bin/date on the first
        connection (the probe's)."""
        argv = [which("systemd-socket-activate"), "-l", self.unit_sock, sys.executable, "-m",
                "tcpmuxd.tcpmux.unit_helper", "/bin/date"]
        self.commands.append("unit:    PYTHONPATH=" + shlex.quote(self.tree) + " "
                             + shlex.join(argv))
        self.unit = self.procs.start("unit", argv, env=self.env, cwd=self.tmp,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.server_pids.append(self.unit.pid)
        wait_until(lambda: os.path.exists(self.unit_sock), 30)

    def start_tcpmuxd(self, backend_port: int, sock: str, sni: bool, unit: bool) -> int:
        """tcpmuxd serving date, fwd (also by its server name where the sni target is
        measured), pass, and unit where that target is: a --tree from before ServerName= or
        Unit= would refuse those keys."""
        confdir = os.path.join(self.tmp, "conf.d")
        os.makedirs(confdir)
        server_name = f"ServerName={SNI_NAME}\n" if sni else ""
        files = {"date.conf": "[Service]\nExec=/bin/date\n",
                 "fwd.conf": f"[Service]\nForward={HOST}:{backend_port}\n{server_name}",
                 "pass.conf": f"[Service]\nPassTo=unix:{sock}\n"}
        if unit:
            files["unit.conf"] = f"[Service]\nUnit={self.unit_sock}\n"
        for name, text in files.items():
            with open(os.path.join(confdir, name), "w") as f:
                f.write(text)
        port = free_port()
        argv = [sys.executable, "-m", "tcpmuxd", "--listen", f"{HOST}:{port}",
                "--config-dir", confdir, "--name-timeout", "60"]
        self.commands.append("tcpmuxd: PYTHONPATH=" + shlex.quote(self.tree) + " "
                             + shlex.join(argv))
        log = open(self.tcpmuxd_log, "wb")
        try:
            self.tcpmuxd = self.procs.start("tcpmuxd", argv, env=self.env, cwd=self.tmp,
                                            stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.server_pids.append(self.tcpmuxd.pid)
        try:
            wait_connectable((HOST, port), 30, self.tcpmuxd, "tcpmuxd")
        except BenchError as e:
            with open(self.tcpmuxd_log, "rb") as f:
                tail = f.read().decode("utf-8", "replace").strip().splitlines()[-5:]
            raise BenchError(f"{e}; its last output:\n    " + "\n    ".join(tail)) from None
        # The readiness probe's connection is closed by now or within a moment; what is left is
        # the idle descriptor count the run is checked against at the end.
        time.sleep(0.2)
        self.start_fds = fd_count(self.tcpmuxd.pid)
        return port

    def start_xinetd(self, binary: str) -> int:
        port = free_port()
        conf = os.path.join(self.tmp, "xinetd.conf")
        user = "    user        = root\n" if os.geteuid() == 0 else ""
        # no rate limit (cps = 0 0) and no `bind` in defaults: bench/README.md says why
        with open(conf, "w") as f:
            f.write(
                "defaults\n{\n    cps         = 0 0\n    instances   = UNLIMITED\n"
                "    per_source  = UNLIMITED\n}\n\n"
                "service tcpmux\n{\n    type        = INTERNAL UNLISTED\n    id          = tcpmux\n"
                "    socket_type = stream\n    protocol    = tcp\n"
                f"    port        = {port}\n    bind        = {HOST}\n    wait        = no\n"
                f"{user}}}\n\n"
                "service date\n{\n    type        = TCPMUXPLUS UNLISTED\n"
                "    socket_type = stream\n    protocol    = tcp\n    wait        = no\n"
                f"{user}    server      = /bin/date\n}}\n")
        argv = [binary, "-dontfork", "-f", conf, "-pidfile", os.path.join(self.tmp, "xinetd.pid"),
                "-filelog", os.path.join(self.tmp, "xinetd.log")]
        self.commands.append("xinetd:  " + shlex.join(argv))
        self.xinetd = self.procs.start("xinetd", argv, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, cwd=self.tmp)
        self.server_pids.append(self.xinetd.pid)
        wait_connectable((HOST, port), 30, self.xinetd, "xinetd")
        return port

    # --- load ---------------------------------------------------------------------------

    def load(self, target: Target, total: int, clients: int, mode: str) -> Result:
        result = Result(target, mode, clients, total)
        counts = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
        workers = []
        for count in counts:
            spec = {"host": HOST, "port": target.port, "name": target.name, "count": count,
                    "kind": target.kind}
            workers.append(self.procs.start(
                "client", [sys.executable, SELF, "--_role", "client", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, cwd=self.tmp))
        for w in workers:
            read_line(w, 30, "load-generator client")
        for w in workers:       # all are waiting on stdin: start them together
            w.stdin.write(b"go\n")
            w.stdin.flush()
        starts, stops = [], []
        cpu0, busy0 = task_cpu(target.pid), machine_cpu()
        tot0 = proc_cpu(target.pid) + proc_cpu(target.helper)
        ours0 = sum(proc_cpu(p) for p in self.server_pids) + self_cpu()
        budget = 60 + total * 0.05  # 20 conn/s at the very least, or the run is broken
        for w in workers:
            out = read_all(w, budget, f"client against {target.label}")
            self.procs.forget(w)
            try:
                data = json.loads(out)
            except ValueError:
                raise BenchError(f"a load-generator client against {target.label} failed "
                                 f"(exit status {w.returncode}; its error is above)") from None
            starts.append(data["start"])
            stops.append(data["stop"])
            result.lat.extend(data["lat"])
            result.client_cpu += data["cpu"]
            result.nul += data["nul"]
            for k, v in data["errors"].items():
                result.errors[k] = result.errors.get(k, 0) + v
            for k, v in data["acks"].items():
                result.acks[k] = result.acks.get(k, 0) + v
        cpu1, busy1 = task_cpu(target.pid), machine_cpu()
        ours1 = sum(proc_cpu(p) for p in self.server_pids) + self_cpu()
        result.server_cpu = cpu1 - cpu0
        result.server_total = proc_cpu(target.pid) + proc_cpu(target.helper) - tot0
        jiffies = max(1, busy1[1] - busy0[1])
        result.busy = (busy1[0] - busy0[0]) / jiffies
        ours = (ours1 - ours0 + result.client_cpu) * TICK
        result.other = max(0.0, (busy1[0] - busy0[0] - ours) / jiffies)
        # CPU times come in 10 ms ticks: over a short window the estimate is noise
        result.other_valid = jiffies >= 50 * (os.cpu_count() or 1) * TICK / 100
        if not result.other_valid:
            result.other = 0.0
        result.lat.sort()
        result.done = len(result.lat)
        result.seconds = max(stops) - min(starts)
        return result

    def measure(self, target: Target, rnd: int) -> None:
        n, clients = self.args.connections, self.args.clients
        if rnd == 0 and self.args.warmup:
            warm = self.load(target, self.args.warmup, 1, "warm-up")
            if warm.nerrors:
                self.say(f"  {target.label}: {warm.nerrors} errors in the warm-up: "
                         f"{next(iter(warm.errors))}")
        for mode, k in (("seq", 1), (f"par{clients}", clients)):
            # The machine may be shared: wait for a quiet moment, and measure once more when
            # another workload took a large share of the CPUs anyway (keeping the cleaner run).
            r = None
            for attempt in range(1 + self.args.retries):
                if attempt and self.quiet_budget <= 0:
                    break
                self.wait_quiet()
                candidate = self.load(target, n, k, mode)
                if r is None or candidate.other < r.other:
                    r = candidate
                if r.other <= DISTURBED:
                    break
                if attempt < self.args.retries:
                    self.say(f"  {target.label} {mode}: other processes took {r.other:.0%} of "
                             f"the CPUs ({r.rate:.0f} conn/s): measuring again")
            assert r is not None
            r.round = rnd
            self.all_results.append(r)
            err = f", {r.nerrors} errors ({next(iter(r.errors))})" if r.nerrors else ""
            self.say(f"  {target.label:<13} {mode:<5} {r.rate:8.1f} conn/s  p50 {r.p(50):7.3f} ms"
                     f"  p99 {r.p(99):7.3f} ms  server {r.per_conn_us(r.server_cpu):4.0f} us/conn"
                     f"  CPUs busy {r.busy:4.0%}, other processes "
                     + (f"{r.other:4.0%}" if r.other_valid else "   -") + err)

    def wait_quiet(self) -> None:
        """Wait (at most --quiet-wait seconds) until processes this run did not start use less
        than QUIET of the CPUs, sampled over 0.3 s."""
        if self.quiet_budget <= 0 or self.args.quiet_wait <= 0:
            return
        start = time.monotonic()
        deadline = start + min(self.args.quiet_wait, self.quiet_budget)
        waited = False
        while True:
            b0, ours0 = machine_cpu(), sum(proc_cpu(p) for p in self.server_pids) + self_cpu()
            time.sleep(0.3)
            b1, ours1 = machine_cpu(), sum(proc_cpu(p) for p in self.server_pids) + self_cpu()
            other = (b1[0] - b0[0] - (ours1 - ours0) * TICK) / max(1, b1[1] - b0[1])
            if other <= QUIET:
                break
            if time.monotonic() >= deadline:
                self.say(f"  the machine is busy ({other:.0%} of the CPUs used by other "
                         f"processes): measuring anyway")
                break
            if not waited:
                self.say(f"  waiting for a quieter moment (other processes use {other:.0%} of "
                         f"the CPUs)")
                waited = True
        if waited:
            self.quiet_budget -= time.monotonic() - start
            if self.quiet_budget <= 0:
                self.say("  the waiting budget (--quiet-budget) is spent: no more waiting or "
                         "retries in this run")

    def pick_medians(self) -> None:
        """Per target and mode, the round with the median rate (all its figures)."""
        groups: dict[tuple[str, str], list[Result]] = {}
        for r in self.all_results:
            groups.setdefault((r.target.key, r.mode), []).append(r)
        self.results = []
        for rs in groups.values():
            ordered = sorted(rs, key=lambda r: r.rate)
            self.results.append(ordered[(len(ordered) - 1) // 2])

    def spread(self, r: Result) -> tuple[float, float]:
        rates = [x.rate for x in self.all_results
                 if x.target.key == r.target.key and x.mode == r.mode]
        return min(rates), max(rates)

    # --- memory -------------------------------------------------------------------------

    def pending_memory(self, port: int) -> None:
        pid = self.tcpmuxd.pid
        n = self.args.pending
        time.sleep(0.5)
        base_fds = fd_count(pid)
        idle = rss_kib(pid)
        self.mem.update(idle=idle, base_fds=base_fds, nofile=nofile_limit(pid))
        socks: list[socket.socket] = []
        try:
            t0 = time.monotonic()
            for _ in range(n):
                s = socket.create_connection((HOST, port), timeout=10)
                socks.append(s)
            accepted = wait_until(lambda: fd_count(pid) >= base_fds + n, 30)
            self.mem["accept_seconds"] = time.monotonic() - t0
            self.mem["fds_pending"] = fd_count(pid)
            self.mem["all_accepted"] = accepted
            time.sleep(0.5)
            samples = []
            for _ in range(3):
                samples.append(rss_kib(pid))
                time.sleep(0.1)
            self.mem["pending"] = max(samples)
            # still serving with n connections waiting for their names?
            t = time.monotonic()
            problem = self.probe(Target("probe", "probe", port, "date", "date"))
            self.mem["serving_while_pending"] = (problem is None, problem,
                                                 (time.monotonic() - t) * 1000)
            readable, _, _ = select.select(socks, [], [], 0)
            self.mem["closed_early"] = len(readable)
        finally:
            for s in socks:
                s.close()
        back = wait_until(lambda: fd_count(pid) <= base_fds + 2, 30)
        self.mem["released"] = (back, fd_count(pid))
        self.mem["after_release"] = rss_kib(pid)

    # --- the run ------------------------------------------------------------------------

    def run(self) -> int:
        keys = ["raw", "xinetd-date", "tcpmuxd-date", "tcpmuxd-fwd", "tcpmuxd-sni", "tcpmuxd-pass",
                "tcpmuxd-unit"]
        if self.args.only:
            wanted = set(self.args.only.split(","))
            keys = [k for k in keys if k in wanted or k.split("-")[-1] in wanted
                    or k.split("-")[0] in wanted]
        use_mux = any(k.startswith("tcpmuxd") for k in keys) or not self.args.no_memory
        use_xinetd = "xinetd-date" in keys

        missing = self.check_tcpmuxd() if use_mux else []
        if not os.path.exists("/bin/date"):
            missing.append("/bin/date is missing: apt-get install coreutils")
        if which("systemd-socket-activate") is None:
            missing.append("systemd-socket-activate is missing (the Unit= row): apt-get "
                           "install systemd")
        xinetd = None
        if use_xinetd:
            try:
                xinetd = self.find_xinetd()
                self.check_libraries(xinetd)
            except BenchError as e:
                missing.append(str(e))
        if missing:
            raise BenchError("cannot run:\n  - " + "\n  - ".join(missing))
        # the pending-connection test needs n sockets here and n+ in tcpmuxd (inherited)
        nofile = raise_nofile(max(4096, 2 * self.args.pending + 512))
        self.say(f"RLIMIT_NOFILE soft limit {nofile} (tcpmuxd inherits it)")

        mux_port, all_targets = self.start_targets(use_mux, use_xinetd, xinetd,
                                                   sni="tcpmuxd-sni" in keys,
                                                   unit="tcpmuxd-unit" in keys)
        targets = [all_targets[k] for k in keys]
        for t in targets:
            problem = self.probe(t)
            if problem:
                t.ok = False
                self.notes.append(f"{t.label}: the first request failed: {problem}")
                self.say(f"{t.label}: first request failed: {problem}")

        if use_mux and not self.args.no_memory:
            self.say(f"memory: tcpmuxd idle, then {self.args.pending} connections that send "
                     f"no name")
            self.pending_memory(mux_port)

        for rnd in range(self.args.rounds):
            if self.args.rounds > 1:
                self.say(f"round {rnd + 1} of {self.args.rounds}")
            for t in targets:
                self.measure(t, rnd)
        self.pick_medians()

        if self.tcpmuxd is not None:
            self.check_after_run(mux_port)
        return self.report()

    def start_targets(self, use_mux: bool, use_xinetd: bool, xinetd: str | None, *,
                      sni: bool, unit: bool) -> tuple[int, dict[str, Target]]:
        """Start the helpers, tcpmuxd and xinetd; tcpmuxd's port and every target."""
        backend_port, raw_port, sock, raw_pid = self.start_helpers()
        if unit:
            self.start_unit()
        self.say(f"helpers: Forward= backend on {HOST}:{backend_port}, raw server on "
                 f"{HOST}:{raw_port}, PassTo= receiver on {sock}")
        ports = {"raw": raw_port}
        mux_port = mux_pid = 0
        if use_mux:
            mux_port = self.start_tcpmuxd(backend_port, sock, sni, unit)
            mux_pid = self.tcpmuxd.pid
            self.say(f"tcpmuxd pid {mux_pid} listening on {HOST}:{mux_port}")
        if use_xinetd:
            ports["xinetd"] = self.start_xinetd(xinetd)
            self.say(f"xinetd {self.xinetd_version} pid {self.xinetd.pid} listening on "
                     f"{HOST}:{ports['xinetd']}")
        all_targets = {
            "raw": Target("raw", "raw", raw_port, "date", "line", raw_pid),
            "xinetd-date": Target("xinetd-date", "xinetd date", ports.get("xinetd", 0), "date",
                                  "date", self.xinetd.pid if self.xinetd else 0),
            "tcpmuxd-date": Target("tcpmuxd-date", "tcpmuxd date", mux_port, "date", "date",
                                   mux_pid),
            "tcpmuxd-fwd": Target("tcpmuxd-fwd", "tcpmuxd fwd", mux_port, "fwd", "line", mux_pid),
            "tcpmuxd-sni": Target("tcpmuxd-sni", "tcpmuxd sni", mux_port, SNI_NAME, "sni", mux_pid),
            "tcpmuxd-pass": Target("tcpmuxd-pass", "tcpmuxd pass", mux_port, "pass", "line",
                                   mux_pid),
            "tcpmuxd-unit": Target("tcpmuxd-unit", "tcpmuxd unit", mux_port, "unit", "date",
                                   mux_pid, self.unit.pid if self.unit else 0)}
        return mux_port, all_targets

    def check_after_run(self, mux_port: int) -> None:
        """After the run: tcpmuxd alive, serving every service, descriptors back."""
        alive = self.tcpmuxd.poll() is None
        self.final.append(("tcpmuxd process alive", alive,
                           "" if alive else f"exit status {self.tcpmuxd.returncode}"))
        if alive:
            services = [("date", "date"), ("fwd", "line"), ("pass", "line")]
            if self.unit is not None:
                services.append(("unit", "date"))
            for name, kind in services:
                problem = self.probe(Target(name, name, mux_port, name, kind))
                self.final.append((f"tcpmuxd serves {name}", problem is None, problem or ""))
            idle_fds = self.mem.get("base_fds", self.start_fds)
            settled = wait_until(lambda: fd_count(self.tcpmuxd.pid) <= idle_fds + 2, 10)
            fds = fd_count(self.tcpmuxd.pid)
            self.final.append(("tcpmuxd descriptors back to idle", settled,
                               f"{fds} open (idle: {idle_fds})"))
            self.mem["after_run"] = rss_kib(self.tcpmuxd.pid)
        if self.xinetd is not None and self.xinetd.poll() is None:
            self.mem["xinetd_idle"] = rss_kib(self.xinetd.pid)

    # --- the report ---------------------------------------------------------------------

    def report(self) -> int:
        a = self.args
        out: list[str] = []
        self.w = w = out.append
        self.misses = 0
        w("")
        w("=" * 78)
        w("tcpmuxd dispatch benchmark (bench/dispatch.py)")
        w(f"command: {command_line()}")
        for c in self.commands:
            w(f"  {c}")
        for line in machine_summary():
            w(line)
        w(f"load:    {a.connections} connections sequential (1 client process) and "
          f"{a.connections} over {a.clients} parallel client processes, "
          f"after {a.warmup} warm-up connections, {a.rounds} round(s); blocking sockets, "
          f"127.0.0.1")
        self._report_table()
        self._report_ratios()
        self._report_memory()
        self._report_after()
        self._report_notes()
        w("=" * 78)
        print("\n".join(out), flush=True)
        return 1 if self.misses else 0

    def _report_table(self) -> None:
        a, w = self.args, self.w
        w("")
        rounds = a.rounds > 1
        w(f"{'target':<13}{'mode':<6}{'ok':>5}{'err':>4}{'conn/s':>9}"
          + (f"{'(range)':>14}" if rounds else "")
          + f"{'p50 ms':>8}{'p99 ms':>8}{'srv':>6}{'+kids':>7}{'cli':>5}{'other':>7}")
        w("-" * (73 + 14 * rounds))
        for r in self.results:
            lo, hi = self.spread(r)
            w(f"{r.target.label:<13}{r.mode:<6}{r.done:>5}{r.nerrors:>4}{r.rate:>9.1f}"
              + (f"{f'{lo:.0f}-{hi:.0f}':>14}" if rounds else "")
              + f"{r.p(50):>8.3f}{r.p(99):>8.3f}{r.per_conn_us(r.server_cpu):>6.0f}"
              f"{r.per_conn_us(r.server_total):>7.0f}{r.per_conn_us(r.client_cpu):>5.0f}"
              + (f"{r.other:>7.0%}" if r.other_valid else f"{'-':>7}"))
        w("  conn/s, p50, p99: " + (f"the median of {a.rounds} rounds (range: slowest-fastest "
                                    "round); " if rounds else "")
          + "srv: CPU us per connection of the server process itself (xinetd: its parent "
            "only);")
        w("  +kids: the same plus the children it reaped (handlers, xinetd's forked "
          "children; 10 ms ticks);")
        w("  cli: load-generator CPU us per connection; other: share of all CPUs used by "
          "processes")
        w("  this benchmark did not start (another workload on the machine disturbs the "
          "figures)")
        w("")

    def _report_ratios(self) -> None:
        w = self.w
        by = {(r.target.key, r.mode.rstrip("0123456789")): r for r in self.results}

        def ratio(label, num, den, goal):
            for mode in ("seq", "par"):
                rn, rd = by.get((num, mode)), by.get((den, mode))
                if not rn or not rd or rd.rate == 0:
                    w(f"  {label + ' (' + mode + ')':<40} {'n/a':>8}")
                    continue
                value = rn.rate / rd.rate
                if goal is None:  # a cost to know, not a target
                    w(f"  {label + ' (' + mode + ')':<40} {value:>8.2f}   (a cost, no target)")
                    continue
                bad = rn.nerrors or rd.nerrors
                verdict = "PASS" if value >= goal and not bad else "MISS"
                self.misses += verdict == "MISS"
                extra = "  (errors in the run)" if bad else ""
                w(f"  {label + ' (' + mode + ')':<40} {value:>8.2f}   target >= {goal:.1f}  "
                  f"{verdict}{extra}")

        w("ratios (conn/s):")
        ratio("tcpmuxd exec / xinetd exec", "tcpmuxd-date", "xinetd-date", TARGET_EXEC_RATIO)
        ratio("tcpmuxd fwd / tcpmuxd exec", "tcpmuxd-fwd", "tcpmuxd-date", TARGET_INPROC_RATIO)
        ratio("tcpmuxd pass / tcpmuxd exec", "tcpmuxd-pass", "tcpmuxd-date", TARGET_INPROC_RATIO)
        ratio("tcpmuxd sni fwd / tcpmuxd fwd", "tcpmuxd-sni", "tcpmuxd-fwd", TARGET_SNI_RATIO)
        ratio("tcpmuxd unit / tcpmuxd exec", "tcpmuxd-unit", "tcpmuxd-date", None)

    def _report_memory(self) -> None:
        a, w = self.args, self.w
        m = self.mem
        if "idle" in m:
            mib = lambda kib: kib / 1024.0  # noqa: E731
            idle, pend = m["idle"], m["pending"]
            rise = pend - idle
            v1 = "PASS" if mib(idle) <= TARGETS_RSS_IDLE_MIB else "MISS"
            ok_all = m["all_accepted"]
            v2 = "PASS" if mib(rise) <= TARGETS_RSS_RISE_MIB and ok_all else "MISS"
            self.misses += (v1 == "MISS") + (v2 == "MISS")
            w("")
            w("tcpmuxd resident memory (VmRSS):")
            w(f"  {'idle after start-up':<40} {mib(idle):>8.1f} MiB  target <= "
              f"{TARGETS_RSS_IDLE_MIB:.0f} MiB  {v1}")
            w(f"  {'with ' + str(a.pending) + ' pending (no name sent)':<40} {mib(pend):>8.1f} MiB")
            w(f"  {'rise':<40} {mib(rise):>8.1f} MiB  target <= {TARGETS_RSS_RISE_MIB:.0f} MiB"
              f"  {v2}   ({rise / a.pending:.1f} KiB per connection)")
            w(f"  pending connections accepted: {'all' if ok_all else 'NOT ALL'} "
              f"({m['fds_pending'] - m['base_fds']} more fds, in {m['accept_seconds']:.2f} s); "
              f"closed by tcpmuxd before the name timeout: {m['closed_early']}")
            ok, problem, ms = m["serving_while_pending"]
            w(f"  served a request while they were pending: {'yes' if ok else 'NO'} "
              f"({ms:.1f} ms){'' if ok else ': ' + str(problem)}")
            back, fds = m["released"]
            w(f"  after closing them: {mib(m['after_release']):.1f} MiB, descriptors "
              f"{'back to idle' if back else 'NOT released'} ({fds})")
            if "after_run" in m:
                w(f"  after the whole run: {mib(m['after_run']):.1f} MiB")
            w(f"  tcpmuxd open-files limit (soft/hard): {m['nofile']}")
            if "xinetd_idle" in m:
                w(f"  (xinetd idle, for reference: {mib(m['xinetd_idle']):.1f} MiB)")

    def _report_after(self) -> None:
        w = self.w
        by = {(r.target.key, r.mode.rstrip("0123456789")): r for r in self.results}
        if self.final:
            w("")
            w("after the run:")
        for what, ok, detail in self.final:
            self.misses += not ok
            w(f"  {what:<40} {'yes' if ok else 'NO'}  {detail}")

        # the load generator's ceiling
        raw = [r for r in self.results if r.target.key == "raw"]
        others = [r for r in self.results if r.target.key != "raw"]
        if raw and others:
            w("")
            w("load generator check (raw = trivial one-process server, same client code):")
            for mode in ("seq", "par"):
                rr = by.get(("raw", mode))
                best = max((r for r in others if r.mode.startswith(mode)),
                           key=lambda r: r.rate, default=None)
                if rr and best and best.rate:
                    factor = rr.rate / best.rate
                    w(f"  {mode}: raw {rr.rate:.0f} conn/s = {factor:.1f}x the fastest target "
                      f"({best.target.label}, {best.rate:.0f} conn/s): "
                      + ("not the bottleneck" if factor >= 1.5 else
                         "CLOSE: the client may limit this figure"))

    def _report_notes(self) -> None:
        w = self.w
        notes = list(self.notes)
        disturbed = [r for r in self.all_results if r.other > DISTURBED]
        if disturbed:
            worst = max(disturbed, key=lambda r: r.other)
            notes.append(f"other processes used more than {DISTURBED:.0%} of the CPUs in "
                         f"{len(disturbed)} of "
                         f"{len(self.all_results)} measurements even after retries (worst "
                         f"{worst.other:.0%}: "
                         f"{worst.target.label} {worst.mode}, round {worst.round + 1}); "
                         f"figures from a busy machine are low and noisy: rerun on a quiet one")
        for r in self.results:
            if r.nul:
                notes.append(f"{r.target.label} {r.mode}: a NUL byte right after the reply line "
                             f"in {r.nul}/{r.done} replies")
            if r.acks and r.target.key != "raw":
                acks = ", ".join(f"{k!r}" for k in r.acks)
                if r.mode == "seq":
                    notes.append(f"{r.target.label}: reply line {acks}")
            for k, v in r.errors.items():
                notes.append(f"{r.target.label} {r.mode}: {v} x {k}")
        if os.path.exists(self.tcpmuxd_log):
            with open(self.tcpmuxd_log, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            bad = [ln for ln in lines if re.search(r"(?i)traceback|error|exception", ln)]
            notes.append(f"tcpmuxd wrote {len(lines)} log lines"
                         + (f", {len(bad)} mention errors; first: {bad[0][:200]}" if bad else ""))
        if notes:
            w("")
            w("notes:")
            seen = set()
            for n in notes:
                if n not in seen:
                    seen.add(n)
                    w(f"  - {n}")

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="tcpmuxd vs xinetd: TCPMUX dispatch rate, latency and memory "
                    "(see bench/README.md)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 200 connections per measurement")
    p.add_argument("--connections", type=int, default=None,
                   help="connections per measurement (default 2000, --quick 200)")
    p.add_argument("--clients", type=int, default=4, help="parallel client processes (4)")
    p.add_argument("--rounds", type=int, default=None,
                   help="measure every target this many times, interleaved, and report the "
                        "median round (default 3, --quick 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up connections per target, not measured (default 50, --quick 10)")
    p.add_argument("--quiet-wait", type=float, default=10.0, metavar="SEC",
                   help="before each measurement, wait up to SEC seconds for other processes "
                        f"to use less than {QUIET:.0%}% of the CPUs (default 10; 0: don't wait)")
    p.add_argument("--quiet-budget", type=float, default=120.0, metavar="SEC",
                   help="total time a run may spend waiting and retrying so (default 120)")
    p.add_argument("--retries", type=int, default=1,
                   help="measure again (at most this many times) when other processes took more "
                        f"than {DISTURBED:.0%}% of the CPUs during a measurement (default 1)")
    p.add_argument("--pending", type=int, default=1000,
                   help="connections held open without a name for the memory figure (1000)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--only", metavar="LIST",
                   help="comma-separated targets: raw, xinetd, date, fwd, sni, pass, unit "
                        "(e.g. --only fwd,pass)")
    p.add_argument("--xinetd", metavar="PATH", help="use this xinetd binary instead of fetching")
    p.add_argument("--tree", metavar="DIR",
                   help="run tcpmuxd from this source tree (a directory holding tcpmuxd/) "
                        "instead of the repository: to compare a change")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, logs) and print its path")
    p.add_argument("--_role", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.connections is None:
        args.connections = 200 if args.quick else 2000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.warmup is None:
        args.warmup = 10 if args.quick else 50
    if args.connections < 1 or args.clients < 1 or args.rounds < 1 or args.pending < 0:
        p.error("--connections, --clients and --rounds must be at least 1")
    if args.pending == 0:
        args.no_memory = True
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), ROLES, Bench, name="dispatch.py", tmp_prefix="tcpmuxd-bench-",
                         needs="/proc, SCM_RIGHTS, xinetd")


if __name__ == "__main__":
    raise SystemExit(main())
