"""Keep-alive and dead peers via tick(now), peer restarts, and byte-by-byte reassembly."""

import pytest
from sockmux_pair import (
    HELLO_TIME, ConnectionPair, config, counter_random, frames_of, of_type, open_plain,
    plain_config,
)

from tcpmuxd.sockmux import (
    Authenticated, ConnectionState, DataReceived, DeadPeer, HandshakeComplete, LinkReady,
    PeerRestarted, Pong, SockMuxConnection, StreamAccepted, StreamClosed, StreamClosedError,
    StreamEnded, StreamRequested,
)
from tcpmuxd.sockmux import frames as F


def ready_pair(a_cfg=None, b_cfg=None, **kw) -> ConnectionPair:
    pair = ConnectionPair(a_cfg, b_cfg, **kw)
    pair.connect()
    assert pair.a.is_ready and pair.b.is_ready
    return pair


# -- keep-alive --------------------------------------------------------------------------------------

def test_echo_after_the_idle_interval_and_pong_with_rtt():
    pair = ready_pair()  # everything happened at t=100
    assert pair.a.next_deadline() == 130.0
    assert pair.a.tick(129.9) == [] and pair.a.bytes_to_send() == b""
    assert pair.a.tick(130.0) == []
    (echo,) = frames_of(pair.a.bytes_to_send())
    assert (echo.type, echo.sender, echo.receiver) == (F.ECHO, F.NO_STREAM, F.NO_STREAM)
    assert pair.a.tick(131.0) == [] and pair.a.bytes_to_send() == b""  # one per interval
    pair.now = 130.25
    pair.b.receive_data(echo.encode(), now=pair.now)
    (echook,) = frames_of(pair.b.bytes_to_send())
    assert (echook.type, echook.payload) == (F.ECHOOK, echo.payload)
    events = pair.a.receive_data(echook.encode(), now=130.25)
    assert [type(e) for e in events] == [Pong] and events[0].rtt == pytest.approx(0.25)
    assert pair.a.rtt == pytest.approx(0.25)


def test_dead_peer_after_the_timeout_closes_every_stream():
    pair = ready_pair()
    s1, _ = pair.open(pair.a)
    _, s2 = pair.open(pair.b)
    pair.a.tick(130.0)  # ECHO goes out, but nothing ever comes back
    assert pair.a.next_deadline() == 160.0
    assert pair.a.tick(159.9) == []
    events = pair.a.tick(160.0)
    assert events == [DeadPeer(60.0, tuple(sorted((s1, s2))))]
    assert pair.a.state is ConnectionState.CLOSED and pair.a.stream_count == 0
    assert pair.a.tick(200.0) == [] and pair.a.next_deadline() is None
    with pytest.raises(StreamClosedError):
        pair.a.send_data(s1, b"x")


def test_anything_read_resets_the_dead_peer_timer():
    pair = ready_pair()
    pair.a.receive_data(F.encode_frame(F.NOOP, 0, 0), now=150.0)
    assert pair.a.tick(205.0) == []
    assert isinstance(pair.a.tick(210.0)[0], DeadPeer)


def test_intervals_are_configurable():
    cfg = config(keepalive_interval=5.0, dead_peer_timeout=12.0)
    pair = ready_pair(cfg, cfg)
    pair.a.tick(105.0)
    assert [f.type for f in frames_of(pair.a.bytes_to_send())] == [F.ECHO]
    pair.a.tick(110.0)
    assert [f.type for f in frames_of(pair.a.bytes_to_send())] == [F.ECHO]
    assert isinstance(pair.a.tick(112.0)[0], DeadPeer)


def test_keepalive_between_two_connections_keeps_the_link_alive():
    pair = ready_pair()
    for step in range(1, 20):  # ten minutes, a tick every 30 s, the pair delivering
        pair.now = 100.0 + 30.0 * step
        assert not of_type(pair.a.tick(pair.now) + pair.b.tick(pair.now), DeadPeer)
        a_ev, _ = pair.pump()
    assert pair.a.is_ready and pair.b.is_ready


def test_ping_on_demand():
    pair = ready_pair()
    pair.a.ping(now=101.0)
    pair.now = 101.5
    a_ev, _ = pair.pump()
    assert [type(e) for e in a_ev] == [Pong] and a_ev[0].rtt == pytest.approx(0.5)


def test_delegates_echo_is_answered_with_its_own_clock_and_swapped_ids():
    conn = SockMuxConnection(plain_config())
    open_plain(conn)
    conn.receive_data(F.encode_frame(F.ECHO, 0x00FF, 0x0001, b"-123456\0"))
    (frame,) = frames_of(conn.bytes_to_send())
    assert (frame.type, frame.sender, frame.receiver, frame.payload) == (
        F.ECHOOK, 0x0001, 0x00FF, b"-123456\0")


# -- peer restart ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [config(), plain_config()], ids=["auth", "plain"])
def test_peer_restart_kills_streams_and_redoes_the_handshake(cfg):
    pair = ready_pair(cfg, cfg)
    s1, _ = pair.open(pair.a)
    s2, _ = pair.open(pair.a)
    _, s3 = pair.open(pair.b)
    # b's process restarts on the same link (e.g. a FIFO pair): a fresh connection says HELLO
    pair.b = SockMuxConnection(cfg, random_bytes=counter_random(9))
    pair.b.initiate_connection(pair.now, HELLO_TIME)
    a_ev, b_ev = pair.pump()
    assert a_ev[0] == PeerRestarted(tuple(sorted((s1, s2, s3))))
    expected = [HandshakeComplete, Authenticated, LinkReady] if cfg.secret else [
        HandshakeComplete, LinkReady]
    assert [type(e) for e in a_ev[1:]] == expected
    assert [type(e) for e in b_ev] == expected
    assert pair.a.is_ready and pair.b.is_ready and pair.a.stream_count == 0
    with pytest.raises(StreamClosedError):
        pair.a.send_data(s1, b"old stream")
    sid, peer_sid = pair.open(pair.a, b"after restart")
    assert pair.a.stream_count == pair.b.stream_count == 1
    # the restarted peer said HELLO once; nothing loops
    types = [f.type for f in frames_of(bytes(pair.wire_ba))]
    assert types.count(F.HELLO) == 2  # the original one and the restarted one


def test_hello_during_setup_is_a_restart_too():
    conn = SockMuxConnection(plain_config())
    conn.initiate_connection(0.0)
    hello = b"20261121-161621.514487 vm\0"
    conn.receive_data(F.encode_frame(F.HELLO, 0, 0, hello)
                      + F.encode_frame(F.HELLOOK, 0, 0, hello))
    assert conn.state is ConnectionState.SETUP
    events = conn.receive_data(F.encode_frame(F.HELLO, 0, 0, hello))
    assert events == [PeerRestarted(())] and conn.state is ConnectionState.HELLO


# -- reassembly -----------------------------------------------------------------------------------------

def _scenario(chunk):
    """A whole session; returns every event of both sides, in order."""
    pair = ConnectionPair(chunk=chunk)
    log = []
    log.extend(pair.connect())

    def open_logged(opener, first, reply=b""):
        sid = opener.open_stream("192.0.2.1:4000", "192.0.2.2:23", first)
        a_ev, b_ev = pair.pump()
        log.extend((a_ev, b_ev))
        (req,) = of_type(a_ev + b_ev, StreamRequested)
        pair.peer(opener).accept_stream(req.stream_id, reply)
        log.extend(pair.pump())
        return sid, req.stream_id

    s1, p1 = open_logged(pair.a, b"first", b"reply")
    s2, p2 = open_logged(pair.b, b"x" * 3000)
    pair.a.send_data(s1, bytes(range(256)) * 300)
    pair.b.send_data(p2, b"from b" * 1000)
    a_ev, b_ev = pair.pump()
    log.extend((a_ev, b_ev))
    pair.b.acknowledge(p1, sum(len(e.data) for e in of_type(b_ev, DataReceived)))
    pair.a.end_stream(s1)
    pair.a.close_stream(s2, "bye")
    log.extend(pair.pump())
    pair.b.end_stream(p1)
    log.extend(pair.pump())
    log.append((pair.a.stream_count, pair.b.stream_count))
    return log


@pytest.mark.parametrize("chunk", [1, 2, 7, 100])
def test_fragmented_input_gives_the_same_events(chunk):
    whole = _scenario(None)
    assert _scenario(chunk) == whole
    flat = [e for part in whole[:-1] for e in part]
    assert of_type(flat, StreamRequested) and of_type(flat, StreamAccepted)
    assert of_type(flat, StreamEnded) and of_type(flat, StreamClosed)
    assert whole[-1] == (0, 0)
