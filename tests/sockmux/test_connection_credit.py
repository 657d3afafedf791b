"""Lazy credit (sockmuxd/1 on both sides): one SENT per half window written, none for short
exchanges, never a deadlock or a stalled sender; per-SEND SENT unchanged towards a plain peer."""

import random

import pytest
from sockmux_pair import ConnectionPair, config, frames_of, of_type, plain_config

from tcpmuxd.sockmux import DataReceived, StreamState, WindowUpdated
from tcpmuxd.sockmux import frames as F
from tcpmuxd.sockmux.windows import ReceiveWindow, SendWindow, lazy_threshold

WINDOW = 256 * 1024  # explicit, not the default: the tests count frames of this window
HALF = WINDOW // 2
PLAIN = plain_config()
EXT = config(secret=None, require_auth=False, stream_window=WINDOW)


def ready_pair(a_cfg=EXT, b_cfg=EXT) -> ConnectionPair:
    pair = ConnectionPair(a_cfg, b_cfg)
    pair.connect()
    assert pair.a.is_ready and pair.b.is_ready
    return pair


def data_of(events, sid=None) -> bytes:
    return b"".join(e.data for e in of_type(events, DataReceived)
                    if sid is None or e.stream_id == sid)


def sent_counts(wire) -> list[int]:
    return [F.parse_count(f.payload) for f in frames_of(bytes(wire)) if f.type == F.SENT]


def test_threshold_is_half_the_window():
    assert lazy_threshold(WINDOW) == HALF
    assert lazy_threshold(4096) == 2048
    assert [lazy_threshold(w) for w in (1, 2, 3, 5)] == [1, 1, 1, 2]
    with pytest.raises(ValueError):
        ReceiveWindow(10, threshold=11)
    with pytest.raises(ValueError):
        ReceiveWindow(10, threshold=0)


# -- lazy credit between two extended peers -----------------------------------------------------

def test_small_request_response_exchange_sends_no_sent():
    pair = ready_pair()
    assert pair.a.features.extensions and pair.b.features.extensions
    sid, peer_sid = pair.open(pair.a, b"first", b"reply")
    for i in range(200):  # 1-byte round trips: one SEND each way, nothing else
        before_ab, before_ba = len(pair.wire_ab), len(pair.wire_ba)
        assert pair.a.send_data(sid, b"q") == 1
        _, b_ev = pair.pump()
        assert data_of(b_ev, peer_sid) == b"q"
        pair.b.acknowledge(peer_sid, 1)
        assert pair.b.send_data(peer_sid, b"r") == 1
        a_ev, _ = pair.pump()
        assert data_of(a_ev, sid) == b"r"
        pair.a.acknowledge(sid, 1)
        pair.pump()
        assert [f.type for f in frames_of(bytes(pair.wire_ab[before_ab:]))] == [F.SEND]
        assert [f.type for f in frames_of(bytes(pair.wire_ba[before_ba:]))] == [F.SEND]
    pair.a.end_stream(sid)
    pair.pump()
    pair.b.end_stream(peer_sid)
    pair.pump()
    assert pair.a.stream_count == pair.b.stream_count == 0
    assert sent_counts(pair.wire_ab) == sent_counts(pair.wire_ba) == []


def test_short_stream_has_no_sent_frame():
    """connect + first data, reply, a little more data each way, SHUT/CLOSE: no SENT."""
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a, b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 200 OK\r\n")
    pair.b.acknowledge(peer_sid, 18)
    pair.a.acknowledge(sid, 17)
    pair.b.send_data(peer_sid, b"x" * 5000)
    a_ev, _ = pair.pump()
    pair.a.acknowledge(sid, len(data_of(a_ev, sid)))
    pair.b.end_stream(peer_sid)
    pair.a.end_stream(sid)
    pair.pump()
    assert pair.a.stream_count == pair.b.stream_count == 0
    types = [f.type for f in frames_of(bytes(pair.wire_ab)) + frames_of(bytes(pair.wire_ba))]
    assert F.SENT not in types


def test_sent_goes_out_exactly_at_the_threshold():
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a)
    assert pair.a.send_data(sid, bytes(HALF - 1)) == HALF - 1
    _, b_ev = pair.pump()
    pair.b.acknowledge(peer_sid, HALF - 1)
    a_ev, _ = pair.pump()
    assert a_ev == [] and sent_counts(pair.wire_ba) == []
    assert pair.a.send_window(sid) == WINDOW - HALF + 1
    pair.a.send_data(sid, b"!")
    pair.pump()
    assert pair.b.unacknowledged(peer_sid) == 1
    pair.b.acknowledge(peer_sid, 1)  # written total reaches half the window: one SENT
    a_ev, _ = pair.pump()
    assert sent_counts(pair.wire_ba) == [HALF]
    assert a_ev == [WindowUpdated(sid, WINDOW)]
    sent = [f for f in frames_of(bytes(pair.wire_ba)) if f.type == F.SENT][0]
    assert (sent.sender, sent.receiver, sent.payload) == (peer_sid, sid, b"%d\0" % HALF)


def test_sent_carries_everything_written_when_an_acknowledge_crosses_the_threshold():
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a)
    pair.a.send_data(sid, bytes(HALF + 999))
    pair.pump()
    pair.b.acknowledge(peer_sid, HALF - 10)
    pair.b.acknowledge(peer_sid, 1009)  # crosses the threshold: the SENT has all of it
    pair.pump()
    assert sent_counts(pair.wire_ba) == [HALF + 999]
    assert pair.a.send_window(sid) == WINDOW


def test_first_data_is_never_counted_towards_credit():
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a, b"f" * 1000)
    pair.b.acknowledge(peer_sid, 1000)
    pair.a.send_data(sid, bytes(HALF - 1))
    pair.pump()
    pair.b.acknowledge(peer_sid, HALF - 1)
    pair.pump()
    assert sent_counts(pair.wire_ba) == []  # 1000 bytes of first data did not count


@pytest.mark.parametrize("step", [1, 7, 333, 1000, 2047, 2048])
def test_sender_never_stalls_with_a_small_window_and_a_link_delay(step):
    """4 KiB window (the smallest allowed), odd chunk sizes, credit one step late: while the
    receiver keeps up, every send_data takes everything offered (up to half a window)."""
    cfg = config(secret=None, require_auth=False, stream_window=4096)
    pair = ready_pair(cfg, cfg)
    sid, peer_sid = pair.open(pair.a)
    assert pair.a.send_window(sid) == 4096
    rng = random.Random(step)
    blob = bytes(rng.randrange(256) for _ in range(200_000))
    pos, got, credit_in_flight = 0, bytearray(), b""
    while pos < len(blob):
        # the SENTs b queued during the previous step arrive now (one step of link delay)
        events = pair.a.receive_data(credit_in_flight) if credit_in_flight else []
        assert all(isinstance(e, WindowUpdated) for e in events)
        chunk = blob[pos:pos + rng.randint(1, step)]
        assert pair.a.send_data(sid, chunk) == len(chunk), "the sender stalled"
        pos += len(chunk)
        b_ev = pair.b.receive_data(pair.a.bytes_to_send())
        data = data_of(b_ev, peer_sid)
        got += data
        pair.b.acknowledge(peer_sid, len(data))  # the destination keeps up
        credit_in_flight = pair.b.bytes_to_send()
        assert pair.b.unacknowledged(peer_sid) == 0
    assert bytes(got) == blob
    counts = sent_counts(pair.wire_ba) + [F.parse_count(f.payload)
                                          for f in frames_of(credit_in_flight)]
    assert all(c >= 2048 for c in counts) and len(counts) <= len(blob) // 2048


def test_long_transfer_fed_one_byte_at_a_time_with_odd_acknowledgements():
    cfg = config(secret=None, require_auth=False, stream_window=4096, max_frame_size=1031)
    pair = ready_pair(cfg, cfg)
    sid, peer_sid = pair.open(pair.a)
    rng = random.Random(7)
    blob = bytes(rng.randrange(256) for _ in range(60_000))
    pos, got, unwritten = 0, bytearray(), 0
    stuck = 0
    while len(got) < len(blob):
        if pos < len(blob):
            pos += pair.a.send_data(sid, blob[pos:pos + rng.choice((1, 3, 17, 1023, 5000))])
        wire = pair.a.bytes_to_send()
        for i in range(len(wire)):  # b reads the link one byte at a time
            data = data_of(pair.b.receive_data(wire[i:i + 1]), peer_sid)
            got += data
            unwritten += len(data)
        while unwritten:  # the destination takes odd amounts, down to one byte
            n = min(unwritten, rng.choice((1, 1, 2, 5, 13, 600)))
            pair.b.acknowledge(peer_sid, n)
            unwritten -= n
        back = pair.b.bytes_to_send()
        for i in range(len(back)):
            pair.a.receive_data(back[i:i + 1])
        # all written: the sender must have credit (at least W - T + 1), or it would deadlock
        assert pair.a.send_window(sid) >= 4096 - 2048 + 1
        stuck = stuck + 1 if not wire else 0
        assert stuck < 3
    assert bytes(got) == blob
    assert all(c >= 2048 for c in sent_counts(pair.wire_ba))


@pytest.mark.parametrize("window", [1, 2, 3, 5, 8, 17, 4096])
def test_no_deadlock_with_tiny_windows(window):
    """The windows alone, every window size down to one byte, random chunks and writes:
    whenever the receiver has written everything, the sender has credit."""
    rng = random.Random(window)
    send, recv = SendWindow(window), ReceiveWindow(window, threshold=lazy_threshold(window))
    total, delivered, unwritten, sent_back = 10_000, 0, 0, 0
    while delivered < total:
        n = min(rng.randint(1, window), send.available, total - delivered)
        assert n > 0, "deadlock: no credit though everything received was written"
        send.consume(n)
        recv.receive(n)
        delivered += n
        unwritten += n
        while unwritten:
            k = rng.randint(1, unwritten)
            for count in recv.acknowledge(k):
                assert count >= lazy_threshold(window)
                assert send.acknowledge(count) == count  # the delta decoder takes it whole
                sent_back += count
            unwritten -= k
        assert send.available >= window - lazy_threshold(window) + 1
        assert send.unacknowledged == recv.outstanding == recv.acknowledged < lazy_threshold(
            window)
    assert sent_back + recv.acknowledged == total


# -- end of the stream: credit that would be of no use is not sent ------------------------------

def test_no_sent_after_the_peer_shut_its_direction():
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a)
    pair.a.send_data(sid, bytes(HALF + 5))
    pair.a.end_stream(sid)
    _, b_ev = pair.pump()
    assert pair.b.stream_state(peer_sid) is StreamState.REMOTE_ENDED
    pair.b.acknowledge(peer_sid, HALF + 5)  # past the threshold, but a will send no more
    pair.pump()
    assert sent_counts(pair.wire_ba) == []
    assert pair.b.unacknowledged(peer_sid) == 0


def test_credit_still_flows_after_our_own_shut():
    """SHUT ends only our direction: the peer's data still needs credit, or it would hang."""
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a)
    pair.a.end_stream(sid)
    pair.pump()
    assert pair.b.send_data(peer_sid, bytes(WINDOW)) == WINDOW
    a_ev, _ = pair.pump()
    assert pair.a.stream_state(sid) is StreamState.LOCAL_ENDED
    pair.a.acknowledge(sid, len(data_of(a_ev, sid)))
    pair.pump()
    assert sent_counts(pair.wire_ab) == [WINDOW]
    assert pair.b.send_window(peer_sid) == WINDOW


def test_no_sent_after_close():
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a)
    pair.a.send_data(sid, bytes(HALF))
    pair.pump()
    pair.b.close_stream(peer_sid)
    pair.b.acknowledge(peer_sid, HALF)  # the close raced with the write
    pair.pump()
    assert sent_counts(pair.wire_ba) == []
    frames = frames_of(bytes(pair.wire_ba))
    assert frames[-1].type == F.CLOSE


# -- plain peers: one SENT per SEND frame, as before ---------------------------------------------

@pytest.mark.parametrize("cfgs", [(PLAIN, PLAIN), (EXT, PLAIN), (PLAIN, EXT)],
                         ids=["plain", "ext-to-plain", "plain-to-ext"])
def test_per_frame_sent_without_the_extension_on_both_sides(cfgs):
    pair = ready_pair(*cfgs)
    assert not pair.a.features.extensions
    sid, peer_sid = pair.open(pair.a)
    for chunk in (b"q", b"xy", bytes(20_000)):
        pair.a.send_data(sid, chunk)
        _, b_ev = pair.pump()
        for e in of_type(b_ev, DataReceived):  # one SENT per SEND frame, its own length
            pair.b.acknowledge(peer_sid, len(e.data))
        pair.pump()
    assert sent_counts(pair.wire_ba) == [1, 2, 16376, 20_000 - 16376]
    assert pair.a.send_window(sid) == 65536  # all credit back, as before
