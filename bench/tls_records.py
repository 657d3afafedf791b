#!/usr/bin/env python3
"""TLS per record: sockmuxd's TLS link layer against the event loop's own TLS, one run.

    .venv/bin/python bench/tls_records.py [--quick]

Why: sockmuxd's TLS links used to run on the loop's TLS (uvloop's SSLProtocol: memory BIOs
inside a general state machine, several Python-level steps per record), and bench/tunnel.py
found the TLS row behind ssh -L on round trips and new streams while the plain row kept up.
``tcpmuxd.sockmux.tlslink`` does the same OpenSSL work over memory BIOs with lean socket I/O
(one recv per readiness event, one send per write). This measures what a record costs each
way.

An echo server process (uvloop when installed, else asyncio) serves one connection plain (the
floor), one in the loop's TLS, and one through tlslink (its handshake and TLSTransport, as a
sockmuxd link); a blocking client sends 1 byte and reads it back, ``--round-trips`` times
after 200 unmeasured ones. Figures: the client's round-trip p50 and the server's CPU per round
trip (``time.process_time`` from ``connection_made`` on, after the handshake: one record
decrypted and one encrypted per round trip). Rows are taken in turn, ``--rounds`` times; the
median round is shown, and the TLS CPU above plain of tlslink over the loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (REPO, BenchError, Processes, command_line, install_fastest_loop,  # noqa: E402
                     machine_summary, percentile, read_all, read_line, run_benchmark, which)

HOST = "127.0.0.1"
SELF = os.path.abspath(__file__)
WARMUP = 200
MODES = ("plain", "loop-tls", "tlslink")
LABELS = {"plain": "plain TCP (floor)", "loop-tls": "loop's TLS",
          "tlslink": "sockmuxd's tlslink"}


# ============================================================================================
# The echo server role: `tls_records.py --_role echo MODE,CERTDIR`
# ============================================================================================

def role_echo(arg: str) -> None:
    """Echo one connection in MODE; print the port; on "stop" (stdin) print the CPU seconds
    used since the protocol's connection_made (after the handshake)."""
    import asyncio

    mode, certdir = arg.split(",", 1)
    loop_name = install_fastest_loop()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.path.join(certdir, "cert.pem"), os.path.join(certdir, "key.pem"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.num_tickets = 0
    since = [0.0]

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            since[0] = time.process_time()

        def data_received(self, data):
            self.transport.write(data)

    async def tlslink_echo(listener: socket.socket) -> None:
        """sockmuxd's TLS link layer (tcpmuxd.sockmux.tlslink) under the same Echo."""
        from tcpmuxd.sockmux import tlslink
        loop = asyncio.get_running_loop()
        raw, _ = await loop.sock_accept(listener)
        conn = await tlslink.handshake(raw, ctx, server_side=True)
        tlslink.TLSTransport(loop, conn, Echo(), conn.info()).start()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind((HOST, 0))
        listener.listen(4)
        listener.setblocking(False)
        accepting: asyncio.Task[None] | None = None
        if mode == "plain":
            await loop.create_server(Echo, sock=listener)
        elif mode == "loop-tls":
            await loop.create_server(Echo, sock=listener, ssl=ctx)
        else:
            accepting = loop.create_task(tlslink_echo(listener))
        print(json.dumps({"port": listener.getsockname()[1], "loop": loop_name}), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        print(json.dumps({"cpu": time.process_time() - since[0]}), flush=True)
        if accepting is not None and accepting.done():
            accepting.result()  # a failed tlslink handshake says so

    asyncio.run(main())


ROLES = {"echo": role_echo}


# ============================================================================================
# The parent
# ============================================================================================

class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: str) -> None:
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        self.env = dict(os.environ)  # the echo role imports tcpmuxd from this repository
        self.env["PYTHONPATH"] = REPO + (os.pathsep + self.env["PYTHONPATH"]
                                         if self.env.get("PYTHONPATH") else "")
        self.loop_name = "?"

    def make_cert(self) -> None:
        if not which("openssl"):
            raise BenchError("needs the openssl CLI: apt-get install openssl")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj",
             f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}"],
            cwd=self.tmp, check=True, capture_output=True, timeout=60)

    def measure(self, mode: str) -> tuple[float, float]:
        """(client p50 us, server CPU us per round trip) of one connection in ``mode``."""
        n = self.args.round_trips
        server = self.procs.start("echo", [sys.executable, SELF, "--_role", "echo",
                                           f"{mode},{self.tmp}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=self.tmp,
                                  env=self.env)
        hello = json.loads(read_line(server, 30, f"{mode} echo server"))
        self.loop_name = hello["loop"]
        sock = socket.create_connection((HOST, hello["port"]), timeout=10)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if mode != "plain":
                ctx = ssl.create_default_context(cafile=os.path.join(self.tmp, "cert.pem"))
                sock = ctx.wrap_socket(sock, server_hostname=HOST)
            lat = []
            clock = time.perf_counter_ns
            for i in range(WARMUP + n):
                t0 = clock()
                sock.sendall(b"r")
                if sock.recv(1) != b"r":
                    raise BenchError(f"{mode}: the echo did not come back (round trip {i})")
                if i >= WARMUP:
                    lat.append(clock() - t0)
        finally:
            sock.close()
        server.stdin.write(b"stop\n")
        server.stdin.flush()
        out = read_all(server, 30, f"{mode} echo server")
        self.procs.forget(server)
        cpu = json.loads(out.decode().strip().splitlines()[-1])["cpu"]
        lat.sort()
        return percentile(lat, 50) / 1000.0, cpu / (WARMUP + n) * 1e6

    def run(self) -> int:
        self.make_cert()
        for rnd in range(self.args.rounds):
            for mode in MODES:
                p50, cpu = self.measure(mode)
                self.results[mode].append((p50, cpu))
                print(f"[{time.strftime('%H:%M:%S')}] round {rnd + 1}: {LABELS[mode]:<18} "
                      f"p50 {p50:6.1f} us  server CPU {cpu:5.1f} us per round trip", flush=True)
        return self.report()

    def report(self) -> int:
        a = self.args
        print()
        print("=" * 88)
        print("TLS per record (bench/tls_records.py)")
        print(f"command: {command_line()}")
        for line in machine_summary():
            print(line)
        print(f"tls:     {ssl.OPENSSL_VERSION}; echo server loop: {self.loop_name}; TLS 1.3, "
              "P-256 certificate, no session tickets")
        print(f"load:    {a.round_trips} 1-byte round trips per row and round after {WARMUP}; "
              f"{a.rounds} round(s), rows in turn; median round, (range)")
        print()
        print(f"  {'row':<20}{'p50 us':>8}{'(range)':>15}{'server CPU us/rt':>18}{'(range)':>15}"
              f"{'above plain':>13}")
        plain = median(c for _, c in self.results["plain"])
        above: dict[str, float] = {}
        for mode in MODES:
            rows = self.results[mode]
            lat, cpu = median(p for p, _ in rows), median(c for _, c in rows)
            rl = f"{min(p for p, _ in rows):.1f}-{max(p for p, _ in rows):.1f}"
            rc = f"{min(c for _, c in rows):.1f}-{max(c for _, c in rows):.1f}"
            above[mode] = cpu - plain
            extra = f"{cpu - plain:>+13.1f}" if mode != "plain" else f"{'-':>13}"
            print(f"  {LABELS[mode]:<20}{lat:>8.1f}{rl:>15}{cpu:>18.1f}{rc:>15}{extra}")
        print()
        if above["loop-tls"] > 0:
            print(f"TLS CPU above plain, sockmuxd's tlslink / loop's TLS: "
                  f"{above['tlslink'] / above['loop-tls']:.2f} "
                  "(each round trip is one record in and one out)")
        print("=" * 88)
        return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="TLS per record: sockmuxd's tlslink against the event loop's TLS, with plain "
                    "TCP as the floor (see bench/README.md)")
    p.add_argument("--quick", action="store_true", help="5,000 round trips, 1 round")
    p.add_argument("--round-trips", type=int, default=None, metavar="N",
                   help="measured round trips per row and round (default 30000)")
    p.add_argument("--rounds", type=int, default=None, help="rounds, rows in turn (default 3)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--_role", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.round_trips is None:
        args.round_trips = 5000 if args.quick else 30000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if min(args.round_trips, args.rounds) < 1:
        p.error("--round-trips and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), ROLES, Bench, name="tls_records.py",
                         tmp_prefix="tls-records-", needs="/proc")


if __name__ == "__main__":
    raise SystemExit(main())
