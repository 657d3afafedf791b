"""Memory the compiled build must give back: what one frame, one held buffer allocates is freed.

mypyc up to at least 1.15 (Debian 13's, which builds the packages and is the version of the
development environment) leaks the left operand of ``bytes + bytes`` (mypyc/mypyc#1192). With
it, every frame header sockmuxd queued stayed allocated: a peer flooding ECHO frames, or any
long bulk transfer, grew the daemon without bound (42 MiB per 9 MB of ECHO frames, measured
on a receptor). The compiled modules now concatenate bytes through frames.concat; these tests
catch any leak of that kind on the paths every frame takes, in process (tracemalloc counts
what compiled code allocates too) and in a real receptor (its VmRSS).

In the pure-Python pass they hold trivially; the compiled pass is the one they guard.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

from hostile_peer import FLOOD_FRAMES, FloodPeer, vm_kib
from sockmux_pair import ConnectionPair, of_type
from test_daemon import procs, secret  # noqa: F401
from test_hostile_peers import SECRET, receptor

from tcpmuxd.sockmux import frames as F
from tcpmuxd.sockmux.events import DataReceived

#: Repetitions per in-process check; leaking one 8-byte header each would keep ~4.6 MiB.
ROUNDS = 100_000
#: What may stay allocated after ROUNDS (caches, free lists): far below one object a round.
MAX_KEPT = 512 << 10


def kept_after(work: Callable[[], None]) -> int:
    """Bytes still allocated (tracemalloc) after ``work`` ran once, beyond a warm-up run."""
    work()  # warm-up: free lists, interned objects, grown containers
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_concat_frees_both_operands():
    head, tail = b"\x03\x09\x00\xff", b"\x00\xff\x00\x00"

    def work() -> None:
        for i in range(ROUNDS):
            F.concat(bytes(head), tail)
            F.encode_frame(F.ECHOOK, F.NO_STREAM, F.NO_STREAM, b"12345678")

    assert kept_after(work) < MAX_KEPT


def test_control_frames_answered_and_sent_are_freed():
    """An ECHO flood on an open link: each ECHO is decoded and answered (LinkCore._queue)."""
    pair = ConnectionPair()
    pair.connect()
    echo = F.encode_frame(F.ECHO, F.NO_STREAM, F.NO_STREAM, F.echo_payload(1))
    burst = echo * 1000

    def work() -> None:
        for _ in range(ROUNDS // 1000):
            pair.a.receive_data(burst, now=pair.now)
            assert len(pair.a.bytes_to_send()) >= 1000 * len(echo)

    assert kept_after(work) < MAX_KEPT


def test_data_frames_sent_and_delivered_are_freed():
    """A stream's data both ways through the frame path (LinkCore._queue_data), credit
    returned as a server would, so that it never stalls."""
    pair = ConnectionPair()
    pair.connect()
    sid_a, sid_b = pair.open(pair.a)
    chunk = b"d" * 1000

    def work() -> None:
        for _ in range(ROUNDS):
            pair.a.send_data(sid_a, chunk)
            for event in of_type(pair.b.receive_data(pair.a.bytes_to_send(), now=pair.now),
                                 DataReceived):
                pair.b.acknowledge(sid_b, len(event.data))
            pair.a.receive_data(pair.b.bytes_to_send(), now=pair.now)

    assert kept_after(work) < MAX_KEPT


def test_a_receptor_flooded_again_and_again_does_not_grow(procs, tmp_path, secret):
    """A peer that floods ECHO frames unread, reads every answer, and again: the receptor's
    VmRSS after the last round stays where it was after the first (each round had it read
    ~9 MB of frames and answer them; with the leak it grew by 42 MiB a round)."""
    proc, port = receptor(procs, tmp_path, secret, "--send-timeout", "30s")
    peer = FloodPeer(port)
    try:
        peer.reach("up", SECRET)
        after: list[int] = []
        for rnd in range(4):
            assert peer.flood(FLOOD_FRAMES["echo"], proc.p.pid, max_rise_kib=1 << 20).stalled
            peer.probe(9000 + rnd, timeout=30)
            after.append(vm_kib(proc.p.pid))
        assert after[-1] - after[0] < 16 << 10, f"VmRSS after each round (KiB): {after}"
    finally:
        peer.close()
