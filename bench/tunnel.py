#!/usr/bin/env python3
"""Tunnels: sockmuxd against ssh -L and against the direct path, one run, loopback.

    .venv/bin/python bench/tunnel.py [--quick]      (as root; see bench/README.md)

Rows (each one path from a client to a target on 127.0.0.1):

* ``direct``        the client talks to the target itself: the physical limit;
* ``ssh -L``        OpenSSH port forwarding through a private sshd run in the foreground on an
                    ephemeral loopback port (temporary host key, temporary authorized key for
                    root), default cipher; ``ssh -L aes`` the same with ``-c aes128-gcm``;
* ``sockmuxd``      a connector (entrances) and a receptor (exits) over a TCP link on loopback,
                    authenticated with a shared secret file; ``sockmuxd+TLS`` the same link in
                    TLS with client certificates (made with the openssl CLI), as the encrypted
                    comparison with ssh.

Figures per row: one-stream bulk throughput (iperf3) and the tunnel's CPU per GB on each side,
1-byte round trips (p50/p99), messages per second over 64 busy streams (a small request and
its echo in turn on each), the new-stream rate of 4 parallel clients (connect, one byte there
and back, close) with connect+first-byte latency, and the resident memory of each side with
1,000 concurrent idle streams. Ratios against ssh -L are checked
against the targets of issue 3 (PASS/MISS; exit status 1 on any MISS, 2 when it cannot run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (REPO, run_benchmark, BenchError, OtherLoad, Processes, command_line,  # noqa: E402
                     cpu_seconds, descendants, fd_count, free_port, help_text,
                     install_fastest_loop, machine_summary, nofile_limit, percentile,
                     raise_nofile, read_all, read_line, rss_kib, sched_cpu_seconds, wait_until,
                     which)

HOST = "127.0.0.1"
SELF = os.path.abspath(__file__)
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


# ============================================================================================
# Child roles: `tunnel.py --_role ROLE ARG`, each in its own process and session
# ============================================================================================

def role_echo(arg: str) -> None:
    """Echo server on ``arg`` ports of 127.0.0.1 (one per row, so that the tunnels' TIME_WAIT
    sockets do not share 4-tuples): echoes every byte, closes on EOF. asyncio Protocol, uvloop
    when installed; prints the ports as a JSON list."""
    import asyncio

    loop_name = install_fastest_loop()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data)

        def eof_received(self):
            return False  # close

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(Echo, HOST, 0, backlog=4096, reuse_address=True)
                   for _ in range(int(arg))]
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        print(json.dumps({"ports": ports, "loop": loop_name}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def _client_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # plain blocking socket; the kernel timeouts only guard against a hang
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL_10S)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL_10S)
    return s


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"


def role_rtt(arg: str) -> None:
    """One connection to ``port``; ``warmup`` then ``n`` times: send 1 byte, wait for it.
    Prints JSON: round trips in ns, or the error that stopped it."""
    spec = json.loads(arg)
    lat: list[int] = []
    error = None
    clock = time.perf_counter_ns
    s = _client_socket()
    try:
        s.connect((HOST, spec["port"]))
        for i in range(spec["warmup"] + spec["n"]):
            t0 = clock()
            s.send(b"r")
            if s.recv(1) != b"r":
                error = f"the echo did not come back (round trip {i})"
                break
            if i >= spec["warmup"]:
                lat.append(clock() - t0)
    except OSError as e:
        error = _err(e)
    finally:
        s.close()
    json.dump({"lat": lat, "error": error, "cpu": time.process_time()}, sys.stdout)
    sys.stdout.flush()


def role_rate(arg: str) -> None:
    """A new-stream load generator: say ready, wait for "go" on stdin, then ``count`` times
    connect, send 1 byte, read it back, close (one connection at a time). Prints JSON."""
    spec = json.loads(arg)
    addr = (HOST, spec["port"])
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    lat: list[float] = []
    errors: dict[str, int] = {}
    clock = time.perf_counter
    cpu0 = time.process_time()
    start = time.monotonic()
    for _ in range(spec["count"]):
        t0 = clock()
        s = _client_socket()
        try:
            s.connect(addr)
            s.send(b"n")
            got = s.recv(1)
            t1 = clock()
        except OSError as e:
            errors[_err(e)] = errors.get(_err(e), 0) + 1
            s.close()
            continue
        s.close()
        if got != b"n":
            key = "closed before the echo" if not got else f"wrong echo {got!r}"
            errors[key] = errors.get(key, 0) + 1
            continue
        lat.append(t1 - t0)
    stop = time.monotonic()
    json.dump({"start": start, "stop": stop, "cpu": time.process_time() - cpu0, "lat": lat,
               "errors": errors}, sys.stdout)
    sys.stdout.flush()


def role_busy(arg: str) -> None:
    """Busy streams: ``conns`` connections to ``port``, each with one ``size``-byte message in
    flight (send it, read its echo whole and check it, send the next), for ``seconds`` after
    "go" on stdin. Many streams active in the same instant is where a tunnel can coalesce their
    frames into one link write, or pay a system call for each. Prints JSON: messages echoed."""
    import selectors

    spec = json.loads(arg)
    size, msg = spec["size"], bytes(range(256)) * (spec["size"] // 256 + 1)
    msg = msg[:size]
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    error = None
    try:
        for _ in range(spec["conns"]):
            s = _client_socket()
            s.connect((HOST, spec["port"]))
            s.setblocking(False)
            socks.append(s)
    except OSError as e:
        error = _err(e)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go" or error:
        json.dump({"count": 0, "seconds": 0.0, "error": error or "no go"}, sys.stdout)
        return
    got = {s: 0 for s in socks}
    for s in socks:
        s.send(msg)       # size is far below the send buffer: all of it is taken
        sel.register(s, selectors.EVENT_READ)
    count = 0
    cpu0 = time.process_time()
    start = time.monotonic()
    deadline = start + spec["seconds"]
    while error is None and (now := time.monotonic()) < deadline:
        for key, _ in sel.select(timeout=min(1.0, deadline - now)):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except OSError as e:
                error = _err(e)
                break
            if not data:
                error = "a stream was closed before its echo"
                break
            have = got[s]
            if data != msg[have:have + len(data)]:
                error = f"wrong echo after {have} bytes of a message"
                break
            have += len(data)
            if have == size:
                count += 1
                have = 0
                s.send(msg)
            got[s] = have
    seconds = time.monotonic() - start
    for s in socks:
        s.close()
    json.dump({"count": count, "seconds": seconds, "cpu": time.process_time() - cpu0,
               "error": error}, sys.stdout)
    sys.stdout.flush()


ROLES = {"echo": role_echo, "rtt": role_rtt, "rate": role_rate, "busy": role_busy}


# ============================================================================================
# The parent
# ============================================================================================

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


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: str) -> None:
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.tree = os.path.abspath(args.tree or REPO)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = self.tree + (os.pathsep + self.env["PYTHONPATH"]
                                              if self.env.get("PYTHONPATH") else "")
        self.env.pop("SSH_AUTH_SOCK", None)   # no agent: only the temporary key
        self.notes: list[str] = []
        self.commands: list[tuple[str, str]] = []
        self.rows: dict[str, Row] = {}
        self.helpers: list[subprocess.Popen] = []
        self.measures: list[Measure] = []
        self.mem: dict[str, dict] = {}
        self.final: list[tuple[str, bool, str]] = []
        self.quiet_budget = args.quiet_budget
        self.load = OtherLoad(self.our_pids)
        self.sshd: subprocess.Popen | None = None
        self.iperf_server: subprocess.Popen | None = None
        self.iperf_port = 0
        self.echo_loop = "?"
        self.sockmuxd_loop = "?"
        self.tls_flags = False
        self.versions: dict[str, str] = {}
        self.failed_rows: dict[str, str] = {}
        # the report's lines, the MISSes it counted and its rows (see report())
        self.w: Callable[[str], None] = print
        self.misses = 0
        self.order: list[Row] = []

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def our_pids(self) -> list[int]:
        pids = [p.pid for p in self.helpers if p.poll() is None]
        if self.sshd is not None and self.sshd.poll() is None:
            pids += [self.sshd.pid] + descendants(self.sshd.pid)
        return pids

    def command(self, what: str, argv: list[str], env: str = "") -> None:
        self.commands.append((what, (env + " " if env else "") + shlex.join(argv)))

    # --- prerequisites ------------------------------------------------------------------

    def check_prerequisites(self) -> None:
        missing: dict[str, str] = {}
        for tool, package in (("iperf3", "iperf3"), ("ssh", "openssh-client"),
                              ("ssh-keygen", "openssh-client")):
            if not which(tool):
                missing[tool] = package
        if not os.access(SSHD, os.X_OK):
            missing[SSHD] = "openssh-server"
        want_tls = "sockmuxd-tls" in self.args.rows
        if want_tls and not which("openssl"):
            missing["openssl (TLS row only)"] = "openssl"
        problems = []
        if missing:
            pkgs = " ".join(sorted(set(missing.values())))
            problems.append(f"missing {', '.join(missing)}: install with `apt-get install "
                            f"{pkgs}` (all of them: apt-get install openssh-server "
                            f"openssh-client iperf3 openssl)")
        if os.geteuid() != 0 and any(k.startswith("ssh") for k in self.args.rows):
            problems.append("run as root: the private sshd logs in root with the temporary key "
                            "and needs root for privilege separation")
        if any(k.startswith("sockmuxd") for k in self.args.rows):
            problems += self.check_sockmuxd()
        if problems:
            raise BenchError("cannot run:\n  - " + "\n  - ".join(problems))
        if any(k.startswith("ssh") for k in self.args.rows) and not os.path.isdir("/run/sshd"):
            # sshd refuses to start without its privilege-separation directory (made at boot by
            # the package's tmpfiles.d entry, which a container may not have run)
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            self.notes.append("created /run/sshd (sshd's privilege-separation directory), as "
                              "systemd-tmpfiles would for openssh-server")

    def check_sockmuxd(self) -> list[str]:
        text, problems = help_text([sys.executable, "-m", "tcpmuxd.sockmux.daemon", "--help"],
                                   "sockmuxd", self.tree, self.env, self.tmp)
        if problems:
            return problems
        # where it is imported from, and which build of its per-stream modules runs (a tree
        # older than tcpmuxd.sockmux.native is pure Python)
        r2 = subprocess.run([sys.executable, "-c", "import os, tcpmuxd.sockmux.daemon as d; "
                             "print(os.path.dirname(os.path.dirname(os.path.dirname("
                             "os.path.abspath(d.__file__)))))\n"
                             "try:\n from tcpmuxd.sockmux import native\n"
                             " print(native.describe())\n"
                             "except ImportError:\n print('pure Python')"],
                            env=self.env, cwd=self.tmp, capture_output=True, timeout=30, text=True)
        where, _, build = r2.stdout.strip().partition("\n")
        self.versions["sockmuxd"] = f"from {where or '?'} ({build or '?'})"
        if os.path.realpath(where) != os.path.realpath(self.tree):
            return [f"sockmuxd is imported from {where or '?'}, not from "
                    f"{self.tree} (no tcpmuxd/sockmux/daemon.py there?)"]
        need = ("--accept", "--connect", "--entrance", "--exit", "--secret")
        lacking = [o for o in need if o not in text]
        if lacking:
            return [f"sockmuxd --help does not list {', '.join(lacking)}"]
        self.tls_flags = all(o in text for o in ("--tls-cert", "--tls-key", "--tls-ca"))
        if "sockmuxd-tls" in self.args.rows and not self.tls_flags:
            self.args.rows.remove("sockmuxd-tls")
            self.notes.append("sockmuxd --help lists no --tls-cert/--tls-key/--tls-ca: no TLS row")
        return []

    def tool_versions(self) -> None:
        def first(argv):
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                return ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]
            except (OSError, subprocess.TimeoutExpired):
                return "?"
        self.versions["iperf3"] = first(["iperf3", "--version"])
        if any(k.startswith("ssh") for k in self.args.rows):
            self.versions["ssh"] = first(["ssh", "-V"])
            # the cipher a default ssh -L negotiates with this sshd: the client's first choice
            # (both ends are the same OpenSSH)
            try:
                r = subprocess.run(["ssh", "-F", "/dev/null", "-G", HOST], capture_output=True,
                                   text=True, timeout=10)
                for line in r.stdout.splitlines():
                    if line.startswith("ciphers "):
                        self.versions["ssh cipher"] = line.split()[1].split(",")[0]
            except (OSError, subprocess.TimeoutExpired):
                pass
        if "sockmuxd-tls" in self.args.rows:
            self.versions["openssl"] = first(["openssl", "version"])

    # --- helpers: echo server, iperf3 server --------------------------------------------

    def start_echo(self, count: int) -> list[int]:
        argv = [sys.executable, SELF, "--_role", "echo", str(count)]
        proc = self.procs.start("echo", argv, stdout=subprocess.PIPE, env=self.env,
                                cwd=self.tmp)
        self.helpers.append(proc)
        info = json.loads(read_line(proc, 30, "echo server"))
        self.echo_loop = info["loop"]
        self.command("echo target", argv)
        return info["ports"]

    def start_iperf_server(self) -> None:
        if not self.iperf_port:
            self.iperf_port = free_port()
        log = os.path.join(self.tmp, "iperf3-server.log")
        argv = ["iperf3", "-s", "-B", HOST, "-p", str(self.iperf_port), "--forceflush"]
        with open(log, "wb") as f:
            proc = self.procs.start("iperf3 -s", argv, stdout=f, stderr=subprocess.STDOUT,
                                    cwd=self.tmp)
        self.iperf_server = proc
        self.helpers.append(proc)
        if not wait_until(lambda: proc.poll() is not None or
                          b"Server listening" in _read(log), 15):
            raise BenchError("iperf3 -s did not say 'Server listening' within 15 s")
        if proc.poll() is not None:
            raise BenchError(f"iperf3 -s exited ({proc.returncode}): "
                             f"{_read(log).decode(errors='replace').strip()[-300:]}")
        if not any(w == "iperf3 server" for w, _ in self.commands):
            self.command("iperf3 server", argv)

    def restart_iperf_server(self) -> None:
        if self.iperf_server is not None:
            self.procs.stop(self.iperf_server)
            self.procs.forget(self.iperf_server)
            self.helpers.remove(self.iperf_server)
        self.start_iperf_server()

    # --- probes -------------------------------------------------------------------------

    def echo_once(self, port: int, timeout: float = 5.0) -> str | None:
        try:
            with socket.create_connection((HOST, port), timeout=timeout) as s:
                s.sendall(b"p")
                got = s.recv(1)
                return None if got == b"p" else f"no echo (got {got!r})"
        except OSError as e:
            return _err(e)

    def wait_path(self, row: Row, timeout: float) -> None:
        """Bounded: until one byte goes through ``row`` to the echo target and back."""
        deadline = time.monotonic() + timeout
        problem = "?"
        while time.monotonic() < deadline:
            for p in row.procs:
                if p.poll() is not None:
                    raise BenchError(f"{row.label}: a process exited with status "
                                     f"{p.returncode} during start-up{self.log_tail(row)}")
            problem = self.echo_once(row.echo_port, timeout=3.0)
            if problem is None:
                row.up_after = time.monotonic() - row.started
                return
            time.sleep(0.05)
        raise BenchError(f"{row.label}: no byte came back through it within {timeout:.0f} s "
                         f"({problem}){self.log_tail(row)}")

    def log_tail(self, row: Row) -> str:
        out = []
        for path in row.logs:
            lines = _read(path).decode("utf-8", "replace").strip().splitlines()[-6:]
            if lines:
                out.append(f"\n  last lines of {os.path.basename(path)}:\n    "
                           + "\n    ".join(lines))
        return "".join(out)

    # --- ssh -L -------------------------------------------------------------------------

    def start_sshd(self, echo_ports: list[int]) -> int:
        d = os.path.join(self.tmp, "ssh")
        os.makedirs(d, mode=0o700)
        for name in ("host_ed25519", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                            f"tunnel-bench-{name}", "-f", os.path.join(d, name)],
                           check=True, timeout=30, stdin=subprocess.DEVNULL)
        with open(os.path.join(d, "id_ed25519.pub")) as f:
            pub = f.read().strip()
        # the key may only forward to the benchmark's own targets, from loopback
        opens = ",".join(f'permitopen="{HOST}:{p}"' for p in [self.iperf_port] + echo_ports)
        with open(os.path.join(d, "authorized_keys"), "w") as f:
            f.write(f'restrict,port-forwarding,{opens},from="127.0.0.1" {pub}\n')
        os.chmod(os.path.join(d, "authorized_keys"), 0o600)
        port = free_port()
        conf = os.path.join(d, "sshd_config")
        with open(conf, "w") as f:
            f.write("\n".join([
                f"Port {port}", f"ListenAddress {HOST}",
                f"HostKey {d}/host_ed25519", f"PidFile {d}/sshd.pid",
                f"AuthorizedKeysFile {d}/authorized_keys",
                "PermitRootLogin prohibit-password", "PubkeyAuthentication yes",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                "UsePAM no", "UseDNS no", "StrictModes no", "AllowTcpForwarding local",
                "X11Forwarding no", "PermitTTY no", "PrintMotd no",
                "MaxStartups 100:30:200", "MaxSessions 100", "LogLevel INFO", ""]))
        log = os.path.join(self.tmp, "sshd.log")
        argv = [SSHD, "-D", "-e", "-f", conf]
        with open(log, "wb") as f:
            self.sshd = self.procs.start("sshd", argv, stdout=f, stderr=subprocess.STDOUT,
                                         cwd=self.tmp)
        self.command("sshd", argv)
        self.commands.append(("sshd config", "; ".join(
            ln for ln in _read(conf).decode().splitlines() if ln)))
        if not wait_until(lambda: self.sshd.poll() is not None or
                          b"Server listening" in _read(log), 15):
            raise BenchError("sshd did not say 'Server listening' within 15 s:\n    "
                             + _read(log).decode(errors="replace").strip()[-500:])
        if self.sshd.poll() is not None:
            raise BenchError(f"sshd exited with status {self.sshd.returncode}:\n    "
                             + _read(log).decode(errors="replace").strip()[-500:])
        return port

    def start_ssh(self, key: str, label: str, ssh_port: int, echo_port: int,
                  cipher: str | None) -> Row:
        bulk, echo = free_port(), free_port()
        d = os.path.join(self.tmp, "ssh")
        argv = ["ssh", "-F", "/dev/null", "-N",
                "-L", f"{HOST}:{bulk}:{HOST}:{self.iperf_port}",
                "-L", f"{HOST}:{echo}:{HOST}:{echo_port}",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
                "-i", os.path.join(d, "id_ed25519"), "-p", str(ssh_port)]
        if cipher:
            argv += ["-c", cipher]
        argv.append(f"root@{HOST}")
        log = os.path.join(self.tmp, f"{key}.log")
        before = set(descendants(self.sshd.pid))
        with open(log, "wb") as f:
            proc = self.procs.start(key, argv, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=self.tmp)
        self.helpers.append(proc)
        self.command(label, argv)
        row = Row(key, label, bulk, echo, entrance_pids=[proc.pid], procs=[proc, self.sshd],
                  logs=[log, os.path.join(self.tmp, "sshd.log")],
                  cipher=cipher or self.versions.get("ssh cipher", "default"))
        self.wait_path(row, 30)
        # the sshd processes of this connection: those that appeared for it
        wait_until(lambda: set(descendants(self.sshd.pid)) - before, 5)
        row.exit_pids = sorted(set(descendants(self.sshd.pid)) - before)
        if not row.exit_pids:
            raise BenchError(f"{label}: found no sshd process for its connection")
        return row

    # --- sockmuxd -----------------------------------------------------------------------

    def make_certs(self) -> dict[str, str]:
        d = os.path.join(self.tmp, "tls")
        os.makedirs(d, mode=0o700)
        p = {n: os.path.join(d, n) for n in ("ca.key", "ca.pem", "srv.key", "srv.csr",
                                             "srv.pem", "cli.key", "cli.csr", "cli.pem",
                                             "srv.ext", "cli.ext")}
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        with open(p["srv.ext"], "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        with open(p["cli.ext"], "w") as f:
            f.write("extendedKeyUsage=clientAuth\n")
        steps = [
            ["openssl", "req", "-x509", *ec, "-keyout", p["ca.key"], "-out", p["ca.pem"],
             "-days", "2", "-subj", "/CN=tunnel-bench CA"],
            ["openssl", "req", *ec, "-keyout", p["srv.key"], "-out", p["srv.csr"],
             "-subj", "/CN=127.0.0.1"],
            ["openssl", "x509", "-req", "-in", p["srv.csr"], "-CA", p["ca.pem"], "-CAkey",
             p["ca.key"], "-CAcreateserial", "-out", p["srv.pem"], "-days", "2",
             "-extfile", p["srv.ext"]],
            ["openssl", "req", *ec, "-keyout", p["cli.key"], "-out", p["cli.csr"],
             "-subj", "/CN=tunnel-bench connector"],
            ["openssl", "x509", "-req", "-in", p["cli.csr"], "-CA", p["ca.pem"], "-CAkey",
             p["ca.key"], "-CAcreateserial", "-out", p["cli.pem"], "-days", "2",
             "-extfile", p["cli.ext"]],
        ]
        for argv in steps:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=d,
                               stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise BenchError(f"`{shlex.join(argv)}` failed: {r.stderr.strip()[-300:]}")
        self.commands.append(("TLS certificates", "openssl req -x509 (P-256 CA), openssl req + "
                              "openssl x509 -req (server: SAN IP:127.0.0.1; client: "
                              "clientAuth), in a temporary directory"))
        return p

    def start_sockmuxd(self, key: str, label: str, echo_port: int,
                       certs: dict[str, str] | None) -> Row:
        """Start a receptor and a connector of ``key``'s row: on the sources for
        ``sockmuxd-pure``, else on the tree's build (compiled where it was built)."""
        env = dict(self.env)
        env.pop(PURE_ENV, None)
        if key == "sockmuxd-pure":
            env[PURE_ENV] = "1"
        secret = os.path.join(self.tmp, "sockmux.secret")
        if not os.path.exists(secret):
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(24).hex() + "\n")
        link, bulk, echo = free_port(), free_port(), free_port()
        base = [sys.executable, "-m", "tcpmuxd.sockmux.daemon"]
        rec = base + ["--accept", f"{HOST}:{link}",
                      "--exit", f"{bulk}={HOST}:{self.iperf_port}",
                      "--exit", f"{echo}={HOST}:{echo_port}", "--secret", secret]
        con = base + ["--connect", f"{HOST}:{link}",
                      "--entrance", f"{HOST}:{bulk}", "--entrance", f"{HOST}:{echo}",
                      "--secret", secret]
        if certs:
            rec += ["--tls-cert", certs["srv.pem"], "--tls-key", certs["srv.key"],
                    "--tls-ca", certs["ca.pem"]]
            con += ["--tls-cert", certs["cli.pem"], "--tls-key", certs["cli.key"],
                    "--tls-ca", certs["ca.pem"]]
        shown = (f"{PURE_ENV}=1 " if key == "sockmuxd-pure" else "") + "PYTHONPATH=" \
            + shlex.quote(self.tree)
        rlog = os.path.join(self.tmp, f"{key}-receptor.log")
        clog = os.path.join(self.tmp, f"{key}-connector.log")
        with open(rlog, "wb") as f:
            receptor = self.procs.start(f"{key} receptor", rec, stdout=f,
                                        stderr=subprocess.STDOUT, env=env, cwd=self.tmp)
        self.helpers.append(receptor)
        self.command(f"{label} receptor", rec, shown)
        row = Row(key, label, bulk, echo, exit_pids=[receptor.pid], procs=[receptor],
                  logs=[rlog, clog])
        # readiness of the receptor from its log: a probe connection would be a failed link
        if not wait_until(lambda: receptor.poll() is not None or
                          b"waiting for the peer" in _read(rlog), 30):
            raise BenchError(f"{label} receptor did not say 'waiting for the peer' within "
                             f"30 s{self.log_tail(row)}")
        with open(clog, "wb") as f:
            connector = self.procs.start(f"{key} connector", con, stdout=f,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.tmp)
        self.helpers.append(connector)
        self.command(f"{label} connector", con, shown)
        row.entrance_pids = [connector.pid]
        row.procs.append(connector)
        self.wait_path(row, 60)
        m = re.search(rb"starting \((\w+) event loop(?:, ([^)]*))?\)", _read(clog) + _read(rlog))
        if m:
            self.sockmuxd_loop = m.group(1).decode()
            row.build = (m.group(2) or b"pure Python").decode()
        if certs:
            row.cipher = "TLS (standard library ssl)"
        return row

    # --- measurements -------------------------------------------------------------------

    def measured(self, row: Row, figure: str, rnd: int, fn) -> Measure:
        """Run ``fn`` (returns a Measure) after a quiet moment; again when others took more
        than DISTURBED of the CPUs (--retries, within --quiet-budget); keep the cleaner."""
        best = None
        for attempt in range(1 + self.args.retries):
            if attempt and self.quiet_budget <= 0:
                break
            self.wait_quiet()
            mark = self.load.start()
            m = fn()
            m.other, m.other_valid = self.load.share(mark)
            m.round = rnd
            if best is None or (m.error is None and (best.error or m.other < best.other)):
                best = m
            if best.error is None and best.other <= DISTURBED:
                break
            if attempt < self.args.retries and best.error is None:
                self.say(f"  {row.label} {figure}: other processes took {m.other:.0%} of the "
                         f"CPUs: measuring again")
        self.measures.append(best)
        return best

    def wait_quiet(self) -> None:
        if self.quiet_budget <= 0 or self.args.quiet_wait <= 0:
            return
        other, waited = self.load.wait_quiet(QUIET, min(self.args.quiet_wait, self.quiet_budget))
        if waited > 0.5:
            self.quiet_budget -= waited
            if other > QUIET:
                self.say(f"  the machine is busy ({other:.0%} of the CPUs used by other "
                         f"processes): measuring anyway")

    def bulk(self, row: Row) -> Measure:
        t = self.args.time
        argv = ["iperf3", "-c", HOST, "-p", str(row.bulk_port), "-t", str(t), "-J",
                "--connect-timeout", "5000"]
        if not any(w == f"iperf3 {row.key}" for w, _ in self.commands):
            self.command(f"iperf3 {row.key}", argv)
        m = Measure(row.key, "bulk")
        for attempt in range(2):
            cpu0 = row.cpu()
            t0 = time.monotonic()
            proc = self.procs.start("iperf3 -c", argv, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=self.tmp)
            out = read_all(proc, t + 60, f"iperf3 through {row.label}")
            self.procs.forget(proc)
            seconds = time.monotonic() - t0
            cpu1 = row.cpu()
            try:
                res = json.loads(out)
            except ValueError:
                res = {"error": f"no JSON from iperf3 (exit status {proc.returncode}): "
                                f"{out[:200]!r}"}
            if "error" not in res:
                break
            m.error = str(res["error"])
            if attempt == 0:  # a test cut short can leave the server busy: start it again
                self.say(f"  iperf3 through {row.label}: {m.error}; restarting iperf3 -s and "
                         f"trying once more")
                self.restart_iperf_server()
        else:
            return m
        m.error = None
        recv = res["end"]["sum_received"]
        sent = res["end"].get("sum_sent", {})
        gb = recv["bytes"] / 1e9
        ce, cx = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        m.value = recv["bits_per_second"] / 1e9
        m.data = {"bytes": recv["bytes"], "seconds": recv.get("seconds", t),
                  "retransmits": sent.get("retransmits", 0), "wall": seconds,
                  "cpu_ent": ce, "cpu_exit": cx,
                  "ent_per_gb": ce / gb if gb else 0.0, "exit_per_gb": cx / gb if gb else 0.0}
        return m

    def rtt_burst(self, row: Row, n: int) -> tuple[list[float], str | None, tuple[float, float]]:
        """One fresh client connection through ``row``: RTT_WARMUP round trips, then ``n``
        measured. Returns the round trips in microseconds, the error that stopped them, and
        the tunnel's CPU seconds (entrance, exit) meanwhile."""
        spec = {"port": row.echo_port, "n": n, "warmup": RTT_WARMUP}
        argv = [sys.executable, SELF, "--_role", "rtt", json.dumps(spec)]
        cpu0 = row.cpu_ns()
        proc = self.procs.start("rtt", argv, stdout=subprocess.PIPE, env=self.env, cwd=self.tmp)
        out = read_all(proc, 120, f"round-trip client through {row.label}")
        self.procs.forget(proc)
        cpu1 = row.cpu_ns()
        cpu = (cpu1[0] - cpu0[0], cpu1[1] - cpu0[1])
        try:
            res = json.loads(out)
        except ValueError:
            return [], f"round-trip client failed (exit status {proc.returncode})", cpu
        return [x / 1000.0 for x in res["lat"]], res["error"], cpu

    def interleaved(self, order: list[Row], rnd: int, figure: str, bursts: int,
                    burst: Callable[[Row], Any], combine: Callable[[Measure, list[Any]], None]
                    ) -> list[Measure]:
        """One round of ``figure`` for every row, in ``bursts`` bursts taken row by row in
        turn; ``combine`` makes each row's Measure from its bursts.

        A round trip or a new stream through two tunnel processes costs a few wake-ups, and
        whether those land on an idle CPU or behind another process decides the figure: on 2
        CPUs the same row measured twice in one run gave round-trip p50s 30 % apart and stream
        rates 25 % apart, in levels each lasting longer than a measurement. Short bursts taken
        in turn with the other rows let every row meet the same mix of levels, so their ratio
        holds. Repeated (--retries) when others took more than DISTURBED of the CPUs; the
        cleaner attempt is kept."""
        best: list[Measure] | None = None
        for attempt in range(1 + self.args.retries):
            if attempt and self.quiet_budget <= 0:
                break
            self.wait_quiet()
            mark = self.load.start()
            got: dict[str, list[Any]] = {row.key: [] for row in order}
            for _ in range(bursts):
                for row in order:
                    got[row.key].append(burst(row))
            other, valid = self.load.share(mark)
            ms = []
            for row in order:
                m = Measure(row.key, figure, other=other, other_valid=valid, round=rnd)
                combine(m, got[row.key])
                ms.append(m)
            errors = sum(m.error is not None for m in ms)
            if best is None or (errors, other) < (sum(m.error is not None for m in best),
                                                  best[0].other):
                best = ms
            if errors == 0 and other <= DISTURBED:
                break
            if attempt < self.args.retries and errors == 0:
                self.say(f"  {figure}: other processes took {other:.0%} of the CPUs: "
                         f"measuring again")
        assert best is not None
        self.measures.extend(best)
        return best

    def rtt_round(self, order: list[Row], rnd: int) -> list[Measure]:
        """Round trips of every row: RTT_BURSTS connections each (see interleaved)."""
        n = max(1, self.args.round_trips // RTT_BURSTS)
        return self.interleaved(order, rnd, "rtt", RTT_BURSTS,
                                lambda row: self.rtt_burst(row, n), self._rtt_measure)

    @staticmethod
    def _rtt_measure(m: Measure,
                     bursts: list[tuple[list[float], str | None, tuple[float, float]]]) -> None:
        lat = sorted(x for b in bursts for x in b[0])
        errors = [e for _, e, _ in bursts if e]
        if errors:
            m.error = f"{errors[0]} ({len(errors)} of {len(bursts)} connections failed)"
        if not lat:
            m.error = m.error or "no round trip"
            return
        n = len(lat)
        m.value = percentile(lat, 50)
        # the CPU was read around whole bursts: warm-up round trips included
        trips = n + RTT_WARMUP * len(bursts)
        m.data = {"p50": m.value, "p99": percentile(lat, 99), "mean": sum(lat) / n, "n": n,
                  "cpu_ent_us": sum(c[0] for _, _, c in bursts) / trips * 1e6,
                  "cpu_exit_us": sum(c[1] for _, _, c in bursts) / trips * 1e6}

    def rate_round(self, order: list[Row], rnd: int) -> list[Measure]:
        """New streams through every row: RATE_BURSTS bursts of --connections / RATE_BURSTS
        each (see interleaved)."""
        n = max(self.args.clients, self.args.connections // RATE_BURSTS)
        return self.interleaved(order, rnd, "rate", RATE_BURSTS,
                                lambda row: self.rate_burst(row, n), self._rate_measure)

    def rate_burst(self, row: Row, total: int) -> dict:
        """``total`` new streams through ``row`` from --clients processes started together:
        their time span, connect+first-byte latencies, errors and CPU, or the failure."""
        k = self.args.clients
        counts = [total // k + (1 if i < total % k else 0) for i in range(k)]
        workers = []
        for count in counts:
            spec = {"port": row.echo_port, "count": count}
            workers.append(self.procs.start(
                "rate", [sys.executable, SELF, "--_role", "rate", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, cwd=self.tmp))
        for w in workers:
            read_line(w, 30, "load-generator client")
        cpu0 = row.cpu_ns()
        for w in workers:       # all are waiting on stdin: start them together
            w.stdin.write(b"go\n")
            w.stdin.flush()
        starts, stops, lat, cli = [], [], [], 0.0
        errors: dict[str, int] = {}
        failed = None
        for w in workers:
            out = read_all(w, 60 + total * 0.05, f"client through {row.label}")
            self.procs.forget(w)
            try:
                data = json.loads(out)
            except ValueError:
                failed = f"a load-generator client failed (exit status {w.returncode})"
                continue
            starts.append(data["start"])
            stops.append(data["stop"])
            lat.extend(data["lat"])
            cli += data["cpu"]
            for e, v in data["errors"].items():
                errors[e] = errors.get(e, 0) + v
        cpu1 = row.cpu_ns()
        return {"attempted": total, "seconds": max(stops) - min(starts) if stops else 0.0,
                "lat": lat, "errors": errors, "cli": cli, "failed": failed,
                "cpu_ent": cpu1[0] - cpu0[0], "cpu_exit": cpu1[1] - cpu0[1]}

    @staticmethod
    def _rate_measure(m: Measure, bursts: list[dict]) -> None:
        failed = [b["failed"] for b in bursts if b["failed"]]
        if failed:
            m.error = failed[0]
            return
        total = sum(b["attempted"] for b in bursts)
        seconds = sum(b["seconds"] for b in bursts)
        lat = sorted(x for b in bursts for x in b["lat"])
        errors: dict[str, int] = {}
        for b in bursts:
            for e, v in b["errors"].items():
                errors[e] = errors.get(e, 0) + v
        m.value = len(lat) / seconds if seconds > 0 else 0.0
        m.data = {"done": len(lat), "attempted": total, "seconds": seconds, "errors": errors,
                  "p50": percentile(lat, 50) * 1e3 if lat else 0.0,
                  "p99": percentile(lat, 99) * 1e3 if lat else 0.0,
                  "cli_us": sum(b["cli"] for b in bursts) / total * 1e6,
                  "cpu_ent_us": sum(b["cpu_ent"] for b in bursts) / total * 1e6,
                  "cpu_exit_us": sum(b["cpu_exit"] for b in bursts) / total * 1e6}
        if errors:
            m.error = f"{sum(errors.values())} of {total} failed ({next(iter(errors))})"

    def busy(self, row: Row) -> Measure:
        """--busy streams through ``row`` at once, spread over --busy-clients processes, each
        stream a --busy-size-byte request and its echo in turn for --time seconds."""
        a = self.args
        k = min(a.busy_clients, a.busy)
        counts = [a.busy // k + (1 if i < a.busy % k else 0) for i in range(k)]
        workers = [self.procs.start(
            "busy", [sys.executable, SELF, "--_role", "busy", json.dumps(
                {"port": row.echo_port, "conns": n, "size": a.busy_size, "seconds": a.time})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, cwd=self.tmp)
            for n in counts]
        for w in workers:
            read_line(w, 30, "busy-stream client")
        cpu0 = row.cpu_ns()
        for w in workers:
            w.stdin.write(b"go\n")
            w.stdin.flush()
        m = Measure(row.key, "busy")
        total, seconds, cli = 0, 0.0, 0.0
        for w in workers:
            out = read_all(w, a.time + 60, f"busy-stream client through {row.label}")
            self.procs.forget(w)
            try:
                data = json.loads(out)
            except ValueError:
                m.error = f"a busy-stream client failed (exit status {w.returncode})"
                return m
            if data["error"]:
                m.error = data["error"]
            total += data["count"]
            seconds = max(seconds, data["seconds"])
            cli += data.get("cpu", 0.0)
        cpu1 = row.cpu_ns()
        m.value = total / seconds if seconds > 0 else 0.0
        m.data = {"count": total, "seconds": seconds,
                  "cpu_ent_us": (cpu1[0] - cpu0[0]) / max(total, 1) * 1e6,
                  "cpu_exit_us": (cpu1[1] - cpu0[1]) / max(total, 1) * 1e6,
                  "cli_us": cli / max(total, 1) * 1e6}
        return m

    def idle_streams(self, row: Row) -> None:
        """Open N streams through ``row`` (at most --batch unconfirmed at a time: ssh -L listens
        with a backlog of 128), each confirmed by one echoed byte; VmRSS of each side before and
        with them; then close them and check the tunnel still works."""
        n, batch = self.args.streams, self.args.batch
        time.sleep(0.5)
        idle = row.rss()
        socks: list[socket.socket] = []
        failed: dict[str, int] = {}
        t0 = time.monotonic()
        try:
            for first in range(0, n, batch):
                group = []
                for _ in range(min(batch, n - first)):
                    s = _client_socket()
                    try:
                        s.connect((HOST, row.echo_port))
                        s.send(b"i")
                        group.append(s)
                    except OSError as e:
                        failed[_err(e)] = failed.get(_err(e), 0) + 1
                        s.close()
                for s in group:
                    try:
                        got = s.recv(1)
                    except OSError as e:
                        got = _err(e)
                    if got == b"i":
                        socks.append(s)
                    else:
                        key = got if isinstance(got, str) else "closed before the echo"
                        failed[key] = failed.get(key, 0) + 1
                        s.close()
            opened = time.monotonic() - t0
            time.sleep(0.5)
            held = row.rss()
            fds = [fd_count(p) for p in row.entrance_pids + row.exit_pids]
        finally:
            for s in socks:
                s.close()
        time.sleep(0.5)
        after = row.rss()
        problem = self.echo_once(row.echo_port)
        ok = len(socks)
        self.mem[row.key] = {
            "idle": idle, "held": held, "after": after, "ok": ok, "failed": failed,
            "seconds": opened, "fds": fds, "serves_after": problem,
            "kib_ent": (held[0] - idle[0]) / ok if ok else float("nan"),
            "kib_exit": (held[1] - idle[1]) / ok if ok else float("nan"),
            "nofile": [nofile_limit(p) for p in row.entrance_pids + row.exit_pids]}

    # --- the run ------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        self.check_prerequisites()
        self.tool_versions()
        nofile = raise_nofile(max(8192, 4 * a.streams + 1024))
        self.say(f"open-files limit raised to {nofile} (inherited by every process started)")
        self.start_rows()
        order = [self.rows[k] for k in ROW_KEYS if k in self.rows]
        # warm-up: a few new streams and round trips through every row, not measured
        for row in order:
            for _ in range(20):
                self.echo_once(row.echo_port)
        for rnd in range(a.rounds):
            self.say(f"round {rnd + 1} of {a.rounds}")
            self.measure_round(order, rnd)
        if a.streams:
            for row in order:
                if not row.tunnel:
                    continue
                self.say(f"memory: {row.label}, {a.streams} idle streams")
                self.idle_streams(row)
                r = self.mem[row.key]
                self.say(f"  {row.label:<13} {r['ok']}/{a.streams} open in {r['seconds']:.2f} s;"
                         f" KiB per stream: entrance side {r['kib_ent']:.1f}, exit side "
                         f"{r['kib_exit']:.1f}")
        for row in order:
            if row.tunnel:
                alive = row.alive()
                problem = self.echo_once(row.echo_port) if alive else "a process exited"
                self.final.append((f"{row.label} alive and serving after the run",
                                   problem is None, problem or ""))
        return self.report()

    def start_rows(self) -> None:
        """The targets, then every row's tunnel (a sockmuxd row that does not start is a
        MISS; the other rows are still measured)."""
        rows = self.args.rows
        echo_ports = dict(zip(rows, self.start_echo(len(rows))))
        self.start_iperf_server()
        self.say(f"echo target ({self.echo_loop}) on {HOST}:"
                 f"{','.join(map(str, echo_ports.values()))}, iperf3 -s on {HOST}:"
                 f"{self.iperf_port}")
        if "direct" in rows:
            self.rows["direct"] = Row("direct", "direct", self.iperf_port, echo_ports["direct"],
                                      tunnel=False)
        if "ssh" in rows or "ssh-aes" in rows:
            ssh_port = self.start_sshd([echo_ports[k] for k in rows if k.startswith("ssh")])
            self.say(f"sshd listening on {HOST}:{ssh_port}")
            if "ssh" in rows:
                self.rows["ssh"] = self.start_ssh("ssh", "ssh -L", ssh_port, echo_ports["ssh"],
                                                  None)
            if "ssh-aes" in rows:
                self.rows["ssh-aes"] = self.start_ssh("ssh-aes", "ssh -L aes", ssh_port,
                                                      echo_ports["ssh-aes"], AES)
        for key, label in SOCKMUXD_KEYS.items():
            if key not in rows:
                continue
            certs = self.make_certs() if key == "sockmuxd-tls" else None
            try:
                self.rows[key] = self.start_sockmuxd(key, label, echo_ports[key], certs)
            except BenchError as e:
                # measured as failed (MISS), the other rows still run
                self.failed_rows[key] = str(e)
                self.notes.append(f"{label} did not start: {e}")
                self.say(f"{label} DID NOT START: {e}")
                continue
            if self.rows[key].up_after > 5:
                self.notes.append(f"{label}: the first byte went through only after "
                                  f"{self.rows[key].up_after:.1f} s (see its log lines below)")
        for row in self.rows.values():
            if row.tunnel:
                self.say(f"{row.label}: up after {row.up_after:.1f} s (entrance side pids "
                         f"{row.entrance_pids}, exit side pids {row.exit_pids})")

    def measure_round(self, order: list[Row], rnd: int) -> None:
        """Bulk for every row, then round trips, busy streams and new streams, interleaved."""
        for row in order:
            m = self.measured(row, "bulk", rnd, lambda: self.bulk(row))
            self.say(f"  bulk  {row.label:<13} " + (
                f"{m.value:6.2f} Gbit/s  CPU/GB entrance {m.data['ent_per_gb']:.2f} s, exit "
                f"{m.data['exit_per_gb']:.2f} s" if m.error is None else f"FAILED: {m.error}")
                + self._other(m))
        for row, m in zip(order, self.rtt_round(order, rnd)):
            self.say(f"  rtt   {row.label:<13} " + (
                f"p50 {m.data['p50']:6.1f} us  p99 {m.data['p99']:7.1f} us"
                if m.data else "") + (f"  ERROR: {m.error}" if m.error else "")
                + self._other(m))
        for row in order:
            if not self.args.busy:
                break
            m = self.measured(row, "busy", rnd, lambda: self.busy(row))
            self.say(f"  busy  {row.label:<13} " + (
                f"{m.value:7.0f} msg/s" + (
                    f"  CPU us/msg entrance {m.data['cpu_ent_us']:.1f}, exit "
                    f"{m.data['cpu_exit_us']:.1f}" if row.tunnel else "") if m.data else "")
                + (f"  ERROR: {m.error}" if m.error else "") + self._other(m))
        for row, m in zip(order, self.rate_round(order, rnd)):
            self.say(f"  rate  {row.label:<13} " + (
                f"{m.value:7.0f} conn/s  p50 {m.data['p50']:.3f} ms  p99 "
                f"{m.data['p99']:.3f} ms" if m.data else "")
                + (f"  ERROR: {m.error}" if m.error else "") + self._other(m))

    def _other(self, m: Measure) -> str:
        return (f"  (other processes {m.other:.0%})" if m.other_valid and m.other > QUIET
                else "")

    # --- the report ---------------------------------------------------------------------

    def pick(self, key: str, figure: str) -> tuple[Measure | None, list[Measure]]:
        """The median round (by value) of a row's figure, and all its rounds."""
        ms = [m for m in self.measures if m.row == key and m.figure == figure]
        good = sorted((m for m in ms if m.data), key=lambda m: m.value)
        if not good:
            return None, ms
        return good[(len(good) - 1) // 2], ms

    def report(self) -> int:
        out: list[str] = []
        self.w = out.append
        self.misses = 0
        self.order = [self.rows[k] for k in ROW_KEYS if k in self.rows]
        self._report_header()
        self._report_figures()
        self._report_memory()
        ssh = self.rows.get("ssh")
        self._report_targets(ssh)
        self._report_reference()
        self._report_compiled()
        self._report_after()
        self._report_notes()
        w = self.w
        w("=" * 96)
        checked = ssh is not None and any(k in self.rows or k in self.failed_rows
                                          for k in TARGET_KEYS)
        w("result: " + (f"{self.misses} MISS(es)" if self.misses else "all targets met"
                        if checked else "no MISS; the targets were not checked (they need the "
                        "ssh and a sockmuxd row)"))
        print("\n".join(out), flush=True)
        return 1 if self.misses else 0

    def _report_header(self) -> None:
        a, w = self.args, self.w
        w("")
        w("=" * 96)
        w("sockmuxd tunnel benchmark (bench/tunnel.py)")
        w(f"command: {command_line()}")
        for line in machine_summary():
            w(line)
        w(f"event loop: sockmuxd {self.sockmuxd_loop} (from its log: 'starting (... event "
          f"loop)'); echo target {self.echo_loop}")
        for k, v in self.versions.items():
            w(f"{k + ':':<11} {v}")
        for key in SOCKMUXD_KEYS:
            if key in self.rows:
                w(f"build:     {self.rows[key].label}: {self.rows[key].build} (from its log)")
        w(f"load:    {a.rounds} round(s), rows interleaved; the median round is shown, "
          f"(range) over rounds; all on {HOST}")

    def _rng(self, key: str, figure: str, fmt: str) -> str:
        """The range of a row's figure over the rounds ("" for one round)."""
        ms = [m.value for m in self.measures if m.row == key and m.figure == figure and m.data]
        if self.args.rounds <= 1 or not ms:
            return ""
        return f"{fmt.format(min(ms))}-{fmt.format(max(ms))}"

    @staticmethod
    def _oth(m: Measure | None) -> str:
        return f"{m.other:.0%}" if m and m.other_valid else "-"

    def _table(self, figure: str, header: str, cells: Callable[[Row, Measure, str], str],
               ref: str | None = "direct") -> None:
        """A line per row: its median round of ``figure`` through ``cells(row, m, xd)``
        (``xd``: its value over ``ref``'s), or FAILED with the first error."""
        self.w(header)
        base = self.pick(ref, figure)[0] if ref else None
        for row in self.order:
            m, _ = self.pick(row.key, figure)
            if m is None:
                self.w(f"  {row.label:<14}{'FAILED':>8}  {self._errors(row.key, figure)}")
                continue
            xd = f"{m.value / base.value:.2f}" if base and base.value else "-"
            self.w(f"  {row.label:<14}" + cells(row, m, xd))

    @staticmethod
    def _tunnel_cpu(row: Row, values: tuple[float, ...], widths: tuple[int, ...],
                    fmt: str) -> str:
        """The tunnel processes' CPU columns; dashes for the direct row."""
        return "".join(f"{v:>{n}{fmt}}" if row.tunnel else f"{'-':>{n}}"
                       for v, n in zip(values, widths))

    def _report_figures(self) -> None:
        a, w, rng, oth, cpu = self.args, self.w, self._rng, self._oth, self._tunnel_cpu
        w("")
        w(f"one-stream bulk throughput: iperf3 -t {a.time}, client -> server through the row "
          "(entrance -> exit)")
        self._table("bulk", f"  {'row':<14}{'Gbit/s':>8}{'(range)':>13}{'x direct':>10}"
                            f"{'retr':>6}{'CPU s/GB: entrance':>20}{'exit':>7}{'both':>7}"
                            f"{'other':>7}",
                    lambda row, m, xd: (
                        f"{m.value:>8.2f}{rng(row.key, 'bulk', '{:.2f}'):>13}{xd:>10}"
                        f"{m.data['retransmits']:>6}" + cpu(
                            row, (m.data["ent_per_gb"], m.data["exit_per_gb"],
                                  m.data["ent_per_gb"] + m.data["exit_per_gb"]), (20, 7, 7),
                            ".2f") + f"{oth(m):>7}"))
        w("  CPU s/GB: utime+stime (/proc/PID/stat, 10 ms ticks) of the tunnel processes per GB "
          "received; entrance side = ssh / sockmuxd connector, exit side = sshd session / "
          "sockmuxd receptor")
        w("")
        w(f"1-byte round trip: {RTT_BURSTS} connections per round, taken in turn with the "
          f"other rows, each {a.round_trips // RTT_BURSTS} round trips after {RTT_WARMUP} "
          "warm-up ones (echo target); CPU from schedstat, per round trip, warm-up ones and "
          "connecting included")
        self._table("rtt", f"  {'row':<14}{'p50 us':>8}{'(range)':>15}{'p99 us':>9}"
                           f"{'mean us':>9}{'CPU us/rt: entrance':>21}{'exit':>7}{'other':>7}",
                    lambda row, m, xd: (
                        f"{m.data['p50']:>8.1f}{rng(row.key, 'rtt', '{:.1f}'):>15}"
                        f"{m.data['p99']:>9.1f}{m.data['mean']:>9.1f}"
                        + cpu(row, (m.data["cpu_ent_us"], m.data["cpu_exit_us"]), (21, 7),
                              ".1f") + f"{oth(m):>7}"), ref=None)
        w("")
        w(f"new streams: {a.connections} connections per round in {RATE_BURSTS} bursts taken in "
          f"turn with the other rows, each burst over {a.clients} parallel clients (each: "
          "connect, send 1 byte, read it back, close; one at a time per client)")
        self._table("rate", f"  {'row':<14}{'conn/s':>8}{'(range)':>13}{'x direct':>10}"
                            f"{'p50 ms':>8}{'p99 ms':>8}{'err':>5}{'CPU us/conn: entrance':>23}"
                            f"{'exit':>6}{'cli':>6}{'other':>7}",
                    lambda row, m, xd: (
                        f"{m.value:>8.0f}{rng(row.key, 'rate', '{:.0f}'):>13}{xd:>10}"
                        f"{m.data['p50']:>8.3f}{m.data['p99']:>8.3f}"
                        f"{sum(m.data['errors'].values()):>5}"
                        + cpu(row, (m.data["cpu_ent_us"], m.data["cpu_exit_us"]), (23, 6),
                              ".0f") + f"{m.data['cli_us']:>6.0f}{oth(m):>7}"))
        w("  p50/p99: connect + first byte back; CPU per connection from schedstat (all threads); "
          "cli: the load generator's")
        if not a.busy:
            return
        w("")
        w(f"busy streams: {a.busy} streams at once over {min(a.busy_clients, a.busy)} client "
          f"processes, each a {a.busy_size}-byte request and its echo in turn, {a.time} s")
        self._table("busy", f"  {'row':<14}{'msg/s':>8}{'(range)':>15}{'x direct':>10}"
                            f"{'CPU us/msg: entrance':>22}{'exit':>6}{'cli':>6}{'other':>7}",
                    lambda row, m, xd: (
                        f"{m.value:>8.0f}{rng(row.key, 'busy', '{:.0f}'):>15}{xd:>10}"
                        + cpu(row, (m.data["cpu_ent_us"], m.data["cpu_exit_us"]), (22, 6),
                              ".1f") + f"{m.data['cli_us']:>6.1f}{oth(m):>7}"))
        w("  msg/s: requests echoed per second over all streams; CPU per message from "
          "schedstat; many streams active at once is where a tunnel's link writes can carry "
          "the frames of several streams")

    def _report_memory(self) -> None:
        if not self.mem:
            return
        a, w = self.args, self.w
        w("")
        w(f"{a.streams} concurrent idle streams (each confirmed by one echoed byte, opened "
          f"{a.batch} at a time): VmRSS")
        w(f"  {'row':<14}{'open':>6}{'entrance: idle':>16}{'with':>8}{'KiB/stream':>11}"
          f"{'exit: idle':>12}{'with':>8}{'KiB/stream':>11}{'open s':>8}")
        for row in self.order:
            r = self.mem.get(row.key)
            if not r:
                continue
            mib = lambda k: f"{k / 1024:.1f}M"  # noqa: E731
            w(f"  {row.label:<14}{r['ok']:>6}{mib(r['idle'][0]):>16}{mib(r['held'][0]):>8}"
              f"{r['kib_ent']:>11.1f}{mib(r['idle'][1]):>12}{mib(r['held'][1]):>8}"
              f"{r['kib_exit']:>11.1f}{r['seconds']:>8.2f}")
        w("  (VmRSS in KiB as /proc reports it; idle = just before opening them, after the "
          "throughput, round-trip and stream-rate runs)")

    def _verdict(self, ok: bool, bad: str = "") -> str:
        self.misses += not ok
        return ("PASS" if ok else "MISS") + (f"  ({bad})" if bad else "")

    def _report_targets(self, ssh: Row | None) -> None:
        a, w, verdict = self.args, self.w, self._verdict
        w("")
        w("targets (issue 3): sockmuxd against ssh -L with its default cipher "
          f"({self.versions.get('ssh cipher', '?')}); the median of the per-round ratios "
          "(range over rounds)")
        for key in TARGET_KEYS:
            row = self.rows.get(key)
            if key in self.failed_rows:
                w(f"  {key:<56}{'-':>8}{'':>12}   {verdict(False, 'did not start: see notes')}")
                continue
            if row is None:
                continue
            label = row.label
            if ssh is None:
                w(f"  {label}: no ssh -L row to compare with")
            else:
                for fig, name, goal, fmt in (("bulk", "throughput", TARGET_THROUGHPUT, ">="),
                                             ("rate", "new-stream rate", TARGET_RATE, ">="),
                                             ("rtt", "round trip p50", TARGET_RTT, "<=")):
                    ratios, errs = self.round_ratios(key, "ssh", fig)
                    title = f"{label} / ssh -L {name}"
                    if not ratios:
                        w(f"  {title:<56}{'n/a':>8}   {verdict(False, 'not measured')}")
                        continue
                    ratio = median(ratios)
                    ok = ratio >= goal if fmt == ">=" else ratio <= goal
                    spread = (f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "")
                    w(f"  {title:<56}{ratio:>8.2f}{spread:>12}   target {fmt} {goal:.1f}  "
                      f"{verdict(ok and not errs, errs)}")
            r = self.mem.get(key)
            if r is None:
                if a.streams:
                    w(f"  {label + ' memory per idle stream':<56}{'n/a':>8}{'':>12}   "
                      f"{verdict(False, 'not measured')}")
                continue
            complete = r["ok"] == a.streams
            for side, k in (("entrance (connector)", "kib_ent"), ("exit (receptor)", "kib_exit")):
                title = f"{label} KiB per idle stream, {side}"
                ok = r[k] <= TARGET_KIB_PER_STREAM and complete
                w(f"  {title:<56}{r[k]:>8.1f}{'':>12}   target <= {TARGET_KIB_PER_STREAM:.0f}  "
                  + verdict(ok, "" if complete else f"only {r['ok']} of {a.streams} opened"))

    def _report_reference(self) -> None:
        """Information: against direct and against ssh with AES."""
        info = []
        for key in TARGET_KEYS:
            if key not in self.rows:
                continue
            label = self.rows[key].label
            for ref in ("ssh", "direct", "ssh-aes"):
                if ref not in self.rows:
                    continue
                parts = []
                figures = (("bulk", "throughput"), ("rate", "conn/s"), ("rtt", "p50 rtt"),
                           ("busy", "busy msg/s"))
                for fig, name in figures[3:] if ref == "ssh" else figures:
                    ratios, _ = self.round_ratios(key, ref, fig)
                    if ratios:
                        parts.append(f"{name} {median(ratios):.2f}x")
                if parts:
                    info.append(f"  {label} / {self.rows[ref].label}: " + ", ".join(parts))
        if info:
            self.w("")
            self.w("for reference (no target):")
            for line in info:
                self.w(line)

    def _report_compiled(self) -> None:
        """The compiled build against the sources, as ratios of the same run's rounds: what
        README.md and sockmuxd(8) may claim for compiling."""
        if "sockmuxd" not in self.rows or "sockmuxd-pure" not in self.rows:
            return
        w = self.w
        w("")
        w(f"compiled against pure Python (sockmuxd / sockmuxd pure, {self.rows['sockmuxd'].build}"
          "; median of the per-round ratios, range over rounds):")
        for fig, name, cpu_key, cpu_name in (
                ("bulk", "throughput", "per_gb", "CPU per GB"),
                ("rate", "new streams/s", "cpu_us", "CPU per connection"),
                ("rtt", "round trip p50", "cpu_us", "CPU per round trip"),
                ("busy", "busy msg/s", "cpu_us", "CPU per message")):
            ratios, errs = self.round_ratios("sockmuxd", "sockmuxd-pure", fig)
            cpus = self.round_ratios("sockmuxd", "sockmuxd-pure", fig, cpu_key)[0]
            if not ratios:
                continue
            spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
            cspread = f" ({min(cpus):.2f}-{max(cpus):.2f})" if len(cpus) > 1 else ""
            w(f"  {name + ':':<17}{median(ratios):5.2f}x{spread:<14}"
              + (f"  {cpu_name} (both sides): {median(cpus):.2f}x{cspread}" if cpus else "")
              + (f"  ({errs})" if errs else ""))

    def _report_after(self) -> None:
        w = self.w
        if self.mem:
            w("")
            w("memory details:")
            for row in self.order:
                r = self.mem.get(row.key)
                if not r:
                    continue
                w(f"  {row.label}: after closing them {r['after'][0] / 1024:.1f}M / "
                  f"{r['after'][1] / 1024:.1f}M (entrance/exit); descriptors with them open "
                  f"{r['fds']}; open-files limits {r['nofile']}; "
                  + ("still serves" if r["serves_after"] is None
                     else f"DOES NOT SERVE: {r['serves_after']}")
                  + (f"; failed: {r['failed']}" if r["failed"] else ""))
                if r["serves_after"] is not None:
                    self.misses += 1
        if self.final:
            w("")
            w("after the run:")
            for what, ok, detail in self.final:
                self.misses += not ok
                w(f"  {what:<48} {'yes' if ok else 'NO'}  {detail}")
        w("")
        w("commands:")
        for what, cmd in self.commands:
            w(f"  {what + ':':<24} {cmd}")

    def _report_notes(self) -> None:
        notes = list(self.notes)
        disturbed = [m for m in self.measures if m.other_valid and m.other > DISTURBED]
        if disturbed:
            worst = max(disturbed, key=lambda m: m.other)
            notes.append(f"other processes used more than {DISTURBED:.0%} of the CPUs in "
                         f"{len(disturbed)} of {len(self.measures)} measurements even after "
                         f"retries (worst {worst.other:.0%}: {worst.row} {worst.figure}, round "
                         f"{worst.round + 1}); figures from a busy machine are low and noisy")
        for m in self.measures:
            if m.error:
                notes.append(f"{m.row} {m.figure} round {m.round + 1}: {m.error}")
        for row in self.order:
            for path in row.logs:
                if "sockmuxd" in os.path.basename(path):
                    notes.append(_log_note(path))
        if notes:
            self.w("")
            self.w("notes:")
            for n in dict.fromkeys(notes):
                self.w(f"  - {n}")

    def round_ratios(self, key: str, ref: str, figure: str,
                     cpu: str | None = None) -> tuple[list[float], str]:
        """``key``'s figure over ``ref``'s, per round (rows are interleaved within a round, so
        a slow minute on a shared machine hits both); and the first error seen, if any.
        With ``cpu`` (``per_gb`` or ``cpu_us``), the ratio of the tunnel's CPU of both sides
        (``ent_per_gb + exit_per_gb``, ``cpu_ent_us + cpu_exit_us``) instead."""
        ratios, errs = [], ""
        for rnd in range(self.args.rounds):
            mk = [m for m in self.measures if m.row == key and m.figure == figure
                  and m.round == rnd]
            mr = [m for m in self.measures if m.row == ref and m.figure == figure
                  and m.round == rnd]
            for m in mk + mr:
                if m.error and not errs:
                    errs = f"{m.row}: {m.error}"
            if not (mk and mr and mk[0].data and mr[0].data):
                continue
            if cpu is None:
                if mr[0].value:
                    ratios.append(mk[0].value / mr[0].value)
                continue
            ent, ex = (("ent_per_gb", "exit_per_gb") if cpu == "per_gb"
                       else ("cpu_ent_us", "cpu_exit_us"))
            theirs = mr[0].data[ent] + mr[0].data[ex]
            if theirs:
                ratios.append((mk[0].data[ent] + mk[0].data[ex]) / theirs)
        return ratios, errs

    def _errors(self, key: str, figure: str) -> str:
        errs = [m.error for m in self.measures if m.row == key and m.figure == figure
                and m.error]
        return errs[0] if errs else ""


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="sockmuxd against ssh -L and the direct path on loopback: bulk throughput, "
                    "round trips, new-stream rate, memory per idle stream (see bench/README.md)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: iperf3 -t 2, 500 round trips, 800 connections, 1 round")
    p.add_argument("--time", type=int, default=None, metavar="SEC",
                   help="iperf3 -t per bulk measurement (default 5, --quick 2)")
    p.add_argument("--round-trips", type=int, default=None, metavar="N",
                   help="1-byte round trips over one connection (default 2000, --quick 500)")
    p.add_argument("--connections", type=int, default=None, metavar="N",
                   help="connections per stream-rate measurement (default 4000, --quick 800)")
    p.add_argument("--clients", type=int, default=4, help="parallel stream-rate clients (4)")
    p.add_argument("--busy", type=int, default=64, metavar="N",
                   help="streams busy at once for the busy-streams figure, each a request and "
                        "its echo in turn for --time seconds (64; 0: skip)")
    p.add_argument("--busy-size", type=int, default=64, metavar="BYTES",
                   help="bytes per busy-stream request (64)")
    p.add_argument("--busy-clients", type=int, default=2, metavar="N",
                   help="client processes the busy streams are spread over (2)")
    p.add_argument("--streams", type=int, default=1000, metavar="N",
                   help="concurrent idle streams for the memory figure (1000; 0: skip)")
    p.add_argument("--batch", type=int, default=100, metavar="N",
                   help="idle streams opened before their echoes are awaited (100: ssh -L "
                        "listens with a backlog of 128)")
    p.add_argument("--rounds", type=int, default=None,
                   help="measure every row this many times, interleaved; the median round is "
                        "reported (default 3, --quick 1)")
    p.add_argument("--only", metavar="LIST",
                   help="comma-separated rows: " + ",".join(ROW_KEYS))
    p.add_argument("--quiet-wait", type=float, default=10.0, metavar="SEC",
                   help="before each measurement, wait up to SEC s for other processes to use "
                        f"less than {QUIET:.0%}% of the CPUs (default 10; 0: don't wait)")
    p.add_argument("--quiet-budget", type=float, default=120.0, metavar="SEC",
                   help="total time a run may spend waiting so (default 120)")
    p.add_argument("--retries", type=int, default=1,
                   help="measure again (at most this many times) when other processes took "
                        f"more than {DISTURBED:.0%}% of the CPUs during a measurement (1)")
    p.add_argument("--tree", metavar="DIR",
                   help="run sockmuxd from this source tree instead of the repository")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, keys, logs) and print its path")
    p.add_argument("--_role", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    for name, quick, full in (("time", 2, 5), ("round_trips", 500, 2000),
                              ("connections", 800, 4000), ("rounds", 1, 3)):
        if getattr(args, name) is None:  # 0 stays 0, and is refused below
            setattr(args, name, quick if q else full)
    rows = list(ROW_KEYS)
    if args.only:
        rows = [r.strip() for r in args.only.split(",") if r.strip()]
        bad = [r for r in rows if r not in ROW_KEYS]
        if bad:
            p.error(f"--only: unknown rows {', '.join(bad)} (known: {', '.join(ROW_KEYS)})")
        rows = [r for r in ROW_KEYS if r in rows]
    args.rows = rows
    if min(args.time, args.round_trips, args.connections, args.clients, args.rounds,
           args.batch, args.busy_size, args.busy_clients) < 1 or min(args.streams,
                                                                   args.busy) < 0:
        p.error("counts and times must be at least 1 (--streams 0 skips the memory figure, "
                "--busy 0 the busy streams)")
    if args.busy_size > 65536:
        p.error("--busy-size: at most 65536 bytes")
    if args.streams > 20000:
        p.error("--streams: at most 20000")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), ROLES, Bench, name="tunnel.py", tmp_prefix="tunnel-bench-",
                         needs="/proc")


if __name__ == "__main__":
    raise SystemExit(main())
