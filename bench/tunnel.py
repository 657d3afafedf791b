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
import subprocess
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (REPO, run_benchmark, BenchError, OtherLoad, Processes,  # noqa: E402
                     descendants, free_port, help_text, raise_nofile, read_line, wait_until,
                     which)
from _tunnel_measure import Measurements  # noqa: E402
from _tunnel_report import Report  # noqa: E402
from _tunnel_roles import ROLES, error_text  # noqa: E402
from _tunnel_rows import (AES, DISTURBED, HOST, PURE_ENV, QUIET, ROW_KEYS,  # noqa: E402
                          SOCKMUXD_KEYS, SSHD, Measure, Row, _read)

SELF = os.path.abspath(__file__)


class Bench(Measurements, Report):
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
            return error_text(e)

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
