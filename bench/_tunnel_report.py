"""bench/tunnel.py's report: the tables, the targets of issue 3, the figures for reference,
compiled against pure Python, and the notes (a mixin of its Bench)."""

from __future__ import annotations

import os
from statistics import median
from typing import Callable

from _common import command_line, machine_summary
from _tunnel_rows import (DISTURBED, HOST, QUIET, RATE_BURSTS, ROW_KEYS, RTT_BURSTS,
                          RTT_WARMUP, SOCKMUXD_KEYS, TARGET_KEYS, TARGET_KIB_PER_STREAM,
                          TARGET_RATE, TARGET_RTT, TARGET_THROUGHPUT, Measure, Row, _log_note)


class Report:
    """The report of a run (Bench provides args, rows, measures, mem, notes...)."""

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
