"""Streams: open / accept / refuse / data / half-close / close, flow control, stream limits."""

import pytest
from sockmux_pair import (
    ConnectionPair, ScriptedPeer, config, frames_of, of_type, open_plain, plain_config,
)

from tcpmuxd.sockmux import (
    DataReceived, LocalProtocolError, RemoteProtocolError, SockMuxConnection, StreamAccepted,
    StreamClosed, StreamClosedError, StreamEnded, StreamRefused, StreamRequested, StreamState,
    TooManyStreams, WindowUpdated, LinkClosed,
)
from tcpmuxd.sockmux import frames as F
from tcpmuxd.sockmux.windows import ReceiveWindow, SendWindow

PLAIN = plain_config()
NOAUTH_EXT = config(secret=None, require_auth=False)


def ready_pair(a_cfg=None, b_cfg=None, **kw) -> ConnectionPair:
    pair = ConnectionPair(a_cfg, b_cfg, **kw)
    pair.connect()
    assert pair.a.is_ready and pair.b.is_ready
    return pair


def data_of(events, sid=None) -> bytes:
    return b"".join(e.data for e in of_type(events, DataReceived)
                    if sid is None or e.stream_id == sid)


def deliver_and_ack(pair, receiver, events, sid):
    """Play the driver: write everything received on ``sid`` and acknowledge it."""
    got = data_of(events, sid)
    if got:
        receiver.acknowledge(sid, len(got))
    return got


# -- open / accept / refuse ----------------------------------------------------------------------

@pytest.mark.parametrize("cfgs", [(None, None), (PLAIN, PLAIN), (NOAUTH_EXT, PLAIN)],
                         ids=["ext", "plain", "mixed"])
def test_open_accept_exchange_close(cfgs):
    pair = ready_pair(*cfgs)
    sid = pair.a.open_stream("10.0.0.1:40000", "10.0.0.2:2323", b"GET / HTTP/1.0\r\n")
    a_ev, b_ev = pair.pump()
    (req,) = of_type(b_ev, StreamRequested)
    assert (req.client_addr, req.entrance_addr, req.first_data) == (
        "10.0.0.1:40000", "10.0.0.2:2323", b"GET / HTTP/1.0\r\n")
    assert pair.a.stream_state(sid) is StreamState.CONNECTING
    assert pair.b.stream_state(req.stream_id) is StreamState.REQUESTED
    pair.b.accept_stream(req.stream_id, b"220 hello\r\n", server_addr="10.0.0.9:23",
                         local_addr="10.0.0.2:51515")
    a_ev, b_ev = pair.pump()
    assert a_ev == [StreamAccepted(sid, b"220 hello\r\n", "10.0.0.9:23", "10.0.0.2:51515")]
    assert pair.a.send_data(sid, b"ping") == 4
    pair.b.send_data(req.stream_id, b"pong")
    a_ev, b_ev = pair.pump()
    assert data_of(b_ev) == b"ping" and data_of(a_ev) == b"pong"
    pair.a.close_stream(sid)
    a_ev, b_ev = pair.pump()
    assert b_ev == [StreamClosed(req.stream_id, "DO close")] and a_ev == []
    assert pair.a.stream_count == pair.b.stream_count == 0
    closes = [f for f in frames_of(bytes(pair.wire_ab)) if f.type == F.CLOSE]
    closeds = [f for f in frames_of(bytes(pair.wire_ba)) if f.type == F.CLOSED]
    assert closes[0].payload == b"DO close\0" and closeds[0].payload == b"OK closed\0"
    assert (closeds[0].sender, closeds[0].receiver) == (closes[0].receiver, closes[0].sender)


def test_refusal_reaches_the_opener_with_its_reason():
    pair = ready_pair()
    sid = pair.a.open_stream("1.1.1.1:1", "2.2.2.2:99")
    _, b_ev = pair.pump()
    pair.b.refuse_stream(of_type(b_ev, StreamRequested)[0].stream_id, "No server")
    a_ev, b_ev = pair.pump()
    assert a_ev == [StreamClosed(sid, "No server")] and b_ev == []
    assert pair.a.stream_count == pair.b.stream_count == 0


def test_first_data_without_conndata_follows_connected():
    conn = SockMuxConnection(PLAIN)
    open_plain(conn, conndata=False)
    conn.receive_data(F.encode_frame(F.NOOP, 0, 0))  # ends the peer's setup
    sid = conn.open_stream("a:1", "b:2", b"early bytes")
    (connect,) = frames_of(conn.bytes_to_send())
    assert connect.payload == F.connect_text("a:1", "b:2")  # no data inside CONNECT
    conn.receive_data(ScriptedPeer.connected(0x30, sid))
    (send,) = frames_of(conn.bytes_to_send())
    assert (send.type, send.sender, send.receiver, send.payload) == (
        F.SEND, sid, 0x30, b"early bytes")
    assert conn.send_window(sid) == 65536 - 11  # a SEND counts against the window


def test_first_data_without_conndata_is_bounded_by_one_frame():
    conn = SockMuxConnection(PLAIN)
    open_plain(conn, conndata=False)
    conn.receive_data(F.encode_frame(F.NOOP, 0, 0))
    with pytest.raises(LocalProtocolError, match="window"):
        conn.open_stream("a:1", "b:2", bytes(16384))
    assert conn.stream_count == 0 and conn.bytes_to_send() == b""


def test_first_data_is_outside_the_window_and_never_acknowledged():
    pair = ready_pair(PLAIN, PLAIN)
    sid, peer_sid = pair.open(pair.a, b"x" * 1000, b"y" * 500)
    assert pair.a.send_window(sid) == 65536 and pair.b.send_window(peer_sid) == 65536
    pair.a.acknowledge(sid, 500)
    pair.b.acknowledge(peer_sid, 1000)
    assert pair.a.bytes_to_send() == b"" and pair.b.bytes_to_send() == b""
    with pytest.raises(LocalProtocolError):
        pair.b.acknowledge(peer_sid, 1)  # nothing left to acknowledge


def test_first_data_too_large_is_a_local_error():
    pair = ready_pair(PLAIN, PLAIN)
    limit = pair.a.max_first_data
    assert 15000 < limit < 16384
    with pytest.raises(LocalProtocolError):
        pair.a.open_stream("a:1", "b:2", b"x" * 16384)
    pair.a.open_stream("a:1", "b:2", b"x" * limit)


def test_cancel_while_connecting_closes_after_connected():
    """Towards a plain peer the CLOSE waits for CONNECTED (DeleGate needs both ids)."""
    pair = ready_pair(PLAIN, PLAIN)
    sid = pair.a.open_stream("a:1", "b:2")
    _, b_ev = pair.pump()
    pair.a.close_stream(sid)  # b has not answered: a does not know b's id yet
    assert pair.a.stream_state(sid) is StreamState.CANCELLING
    assert pair.a.bytes_to_send() == b""  # so the CLOSE waits for CONNECTED
    req = of_type(b_ev, StreamRequested)[0]
    pair.b.accept_stream(req.stream_id)
    a_ev, b_ev = pair.pump()
    assert a_ev == [] and b_ev == [StreamClosed(req.stream_id, "DO close")]
    (close,) = [f for f in frames_of(bytes(pair.wire_ab)) if f.type == F.CLOSE]
    assert (close.sender, close.receiver) == (sid, req.stream_id)
    assert pair.a.stream_count == pair.b.stream_count == 0


def test_cancel_while_connecting_then_refused():
    pair = ready_pair(PLAIN, PLAIN)
    sid = pair.a.open_stream("a:1", "b:2")
    _, b_ev = pair.pump()
    pair.a.close_stream(sid)
    pair.b.refuse_stream(of_type(b_ev, StreamRequested)[0].stream_id)
    a_ev, b_ev = pair.pump()
    assert a_ev == [] and b_ev == []
    assert pair.a.stream_count == pair.b.stream_count == 0


def test_cancel_while_connecting_goes_at_once_between_sockmuxd_peers():
    """With the extension the CLOSE goes at once, to the peer's 0x00FF: the peer stops
    connecting its exit instead of finishing the connect for nothing."""
    pair = ready_pair()
    sid = pair.a.open_stream("a:1", "b:2")
    _, b_ev = pair.pump()
    req = of_type(b_ev, StreamRequested)[0]
    pair.a.close_stream(sid)
    assert pair.a.stream_state(sid) is StreamState.CLOSING
    (close,) = frames_of(pair.a.bytes_to_send())
    assert (close.type, close.sender, close.receiver) == (F.CLOSE, sid, F.NO_STREAM)
    assert pair.b.receive_data(close.encode(), now=pair.now) == [
        StreamClosed(req.stream_id, "DO close")]
    a_ev, b_ev = pair.pump()
    assert a_ev == b_ev == []
    assert pair.a.stream_count == pair.b.stream_count == 0


@pytest.mark.parametrize("answer", ["accept", "refuse"])
def test_cancel_crossing_the_peers_answer(answer):
    """The peer answered (CONNECTED or a refusal) before our CLOSE reached it: no protocol
    error on either side, and both tables end empty."""
    pair = ready_pair()
    sid = pair.a.open_stream("a:1", "b:2")
    _, b_ev = pair.pump()
    req = of_type(b_ev, StreamRequested)[0]
    pair.a.close_stream(sid)
    if answer == "accept":
        pair.b.accept_stream(req.stream_id, b"greeting")
    else:
        pair.b.refuse_stream(req.stream_id)
    a_ev, b_ev = pair.pump()
    assert a_ev == []
    assert b_ev == ([StreamClosed(req.stream_id, "DO close")] if answer == "accept" else [])
    assert pair.a.stream_count == pair.b.stream_count == 0
    # the link is fine: a new stream works
    new_sid, peer_sid = pair.open(pair.a, b"ping", b"pong")
    assert pair.a.stream_state(new_sid) is StreamState.OPEN


def test_peer_cancelling_before_our_answer_addresses_no_stream():
    conn = SockMuxConnection(PLAIN)
    open_plain(conn)
    (req,) = conn.receive_data(ScriptedPeer.connect(0x44))
    events = conn.receive_data(ScriptedPeer.close(0x44, F.NO_STREAM))
    assert events == [StreamClosed(req.stream_id, "DO close")]
    (closed,) = frames_of(conn.bytes_to_send())
    assert (closed.type, closed.sender, closed.receiver) == (F.CLOSED, req.stream_id, 0x44)
    assert conn.stream_count == 0


def test_closed_answers_alone_are_not_urgent_output():
    """A CLOSED answer alone may wait for company (the driver holds it briefly); anything
    else queued makes the output urgent."""
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a)
    pair.a.close_stream(sid)
    assert pair.a.output_is_urgent
    pair.b.receive_data(pair.a.bytes_to_send(), now=pair.now)
    assert pair.b.outgoing_bytes > 0 and not pair.b.output_is_urgent  # CLOSED only
    other, _ = pair.open(pair.b)  # opening pumps: the CLOSED goes out with the CONNECT
    assert pair.a.stream_count == pair.b.stream_count == 1
    assert not pair.b.output_is_urgent and pair.b.outgoing_bytes == 0


def test_simultaneous_close():
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a)
    pair.a.close_stream(sid)
    pair.b.close_stream(peer_sid)
    a_ev, b_ev = pair.pump()
    assert a_ev == b_ev == []
    assert pair.a.stream_count == pair.b.stream_count == 0


def test_close_for_an_unknown_stream_is_still_answered():
    conn = SockMuxConnection(PLAIN)
    open_plain(conn)
    assert conn.receive_data(ScriptedPeer.close(0x50, 0x1234)) == []
    (closed,) = frames_of(conn.bytes_to_send())
    assert (closed.type, closed.sender, closed.receiver) == (F.CLOSED, 0x1234, 0x50)


def test_driver_misuse_is_a_local_error():
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a)
    with pytest.raises(LocalProtocolError):
        pair.a.accept_stream(sid)  # not REQUESTED
    pair.b.close_stream(peer_sid)
    pair.pump()
    with pytest.raises(StreamClosedError):
        pair.a.send_data(sid, b"late")
    with pytest.raises(StreamClosedError):
        pair.a.end_stream(sid)
    pair.a.acknowledge(sid, 10)  # a write finishing after the close: ignored
    pair.a.close_stream(sid)  # idempotent
    with pytest.raises(StreamClosedError):
        pair.a.send_data(999, b"x")


def test_send_on_connecting_stream_takes_nothing_until_accepted():
    pair = ready_pair()
    sid = pair.a.open_stream("a:1", "b:2")
    assert pair.a.send_data(sid, b"too early") == 0
    _, b_ev = pair.pump()
    pair.b.accept_stream(of_type(b_ev, StreamRequested)[0].stream_id)
    a_ev, _ = pair.pump()
    assert of_type(a_ev, StreamAccepted) and pair.a.send_data(sid, b"now") == 3


def test_duplicate_peer_stream_id_kills_the_link():
    conn = SockMuxConnection(PLAIN)
    open_plain(conn)
    conn.receive_data(ScriptedPeer.connect(7))
    with pytest.raises(RemoteProtocolError, match="reuses"):
        conn.receive_data(ScriptedPeer.connect(7))


@pytest.mark.parametrize("peer_id", [F.NO_STREAM, 0], ids=["0x00ff", "placeholder-0"])
def test_connect_without_a_stream_id_is_refused_and_the_link_lives(peer_id):
    """DeleGate with its ids used up sends CONNECT from its "no stream" id 0x00FF (seen
    live): refuse that one (the CLOSE to 0x00FF reaches the agent it made), keep the link and
    every other stream. With its agent table full it sends it from a placeholder agent, id 0
    (seen live too): refused without an answer, as a CLOSE to 0 would end DeleGate's link."""
    conn = SockMuxConnection(PLAIN)
    open_plain(conn)
    (req,) = conn.receive_data(ScriptedPeer.connect(7))
    conn.accept_stream(req.stream_id)
    conn.data_to_send()
    events = conn.receive_data(ScriptedPeer.connect(peer_id, client="127.0.0.1:48486",
                                                    entrance="127.0.0.1:48261"))
    (refused,) = of_type(events, StreamRefused)
    assert refused.peer_stream_id == peer_id and "stream table is full" in refused.reason
    frames = F.decode_all(conn.bytes_to_send())
    if peer_id == F.NO_STREAM:
        (close,) = frames
        assert (close.type, close.sender, close.receiver) == (F.CLOSE, F.NO_STREAM, F.NO_STREAM)
    else:
        assert frames == []
    assert conn.stream_count == 1 and conn.is_ready
    # DeleGate answers CLOSED from 0x00FF to 0x00FF: nothing to do; the open stream still works
    assert conn.receive_data(F.encode_frame(F.CLOSED, F.NO_STREAM, F.NO_STREAM,
                                            b"OK closed\0")) == []
    assert data_of(conn.receive_data(ScriptedPeer.send(7, req.stream_id, b"still here"))) \
        == b"still here"
    with pytest.raises(RemoteProtocolError, match="reuses"):  # a real reuse is still fatal
        conn.receive_data(ScriptedPeer.connect(7))


@pytest.mark.parametrize("peer_id", [F.NO_STREAM, 0], ids=["0x00ff", "placeholder-0"])
@pytest.mark.parametrize("cancelled", [False, True])
def test_connected_without_a_stream_id_closes_the_stream_and_the_link_lives(cancelled, peer_id):
    """DeleGate connects its server, finds no free slot and answers CONNECTED from 0x00FF:
    our stream is refused (closed at once, CLOSE to 0x00FF for its agent), the link lives.
    From its placeholder id 0 there is nothing to close (a CLOSE to 0 would end its link)."""
    conn = SockMuxConnection(PLAIN)
    open_plain(conn)
    sid = conn.open_stream("127.0.0.1:5000", "127.0.0.1:8002")
    other = conn.open_stream("127.0.0.1:5001", "127.0.0.1:8002")
    conn.receive_data(ScriptedPeer.connected(9, other))
    if cancelled:
        conn.close_stream(sid)
    conn.data_to_send()
    events = conn.receive_data(ScriptedPeer.connected(peer_id, sid))
    closed = of_type(events, StreamClosed)
    if cancelled:
        assert closed == []  # the driver let go of it already
    else:
        assert [c.stream_id for c in closed] == [sid]
        assert "stream table is full" in closed[0].reason
    frames = F.decode_all(conn.bytes_to_send())
    if peer_id == F.NO_STREAM:
        (close,) = frames
        assert (close.type, close.sender, close.receiver) == (F.CLOSE, sid, F.NO_STREAM)
    else:
        assert frames == []
    assert conn.stream_state(sid) is StreamState.CLOSED and conn.is_ready
    assert conn.receive_data(ScriptedPeer.closed(F.NO_STREAM, sid)) == []
    assert data_of(conn.receive_data(ScriptedPeer.send(9, other, b"ok"))) == b"ok"


def test_stream_ids_skip_0xff_and_are_not_reused_while_open():
    pair = ready_pair(NOAUTH_EXT, NOAUTH_EXT, a_first_id=0xFD)
    ids = [pair.a.open_stream("a:1", "b:2") for _ in range(4)]
    assert ids == [0xFD, 0xFE, 0x100, 0x101]
    pair2 = ready_pair(NOAUTH_EXT, NOAUTH_EXT, a_first_id=0xFFFF)
    first = pair2.a.open_stream("a:1", "b:2")
    second = pair2.a.open_stream("a:1", "b:2")
    assert (first, second) == (0xFFFF, 1)  # wraps, never 0


def test_stream_ids_towards_a_plain_peer_fit_in_one_byte():
    """DeleGate keeps our id of a stream in one byte (seen live: our stream 256 was answered
    as stream 0, and every stream past the 254th of a link hung). Towards a plain peer ids
    wrap after 0xFE, skip 0xFF and 0, and are not reused while open."""
    conn = SockMuxConnection(PLAIN, first_stream_id=0xFD)
    open_plain(conn)
    ids = [conn.open_stream("a:1", "b:2") for _ in range(4)]
    assert ids == [0xFD, 0xFE, 1, 2]
    for n, sid in enumerate(ids[1:], start=20):  # connected, closed, CLOSED: ids are free
        conn.receive_data(ScriptedPeer.connected(n, sid))
        conn.close_stream(sid)
        conn.receive_data(ScriptedPeer.closed(n, sid))
    assert conn.stream_ids == (0xFD,)
    many = [conn.open_stream("a:1", "b:2") for _ in range(59)]
    assert len(set(many + [0xFD])) == 60 and all(0 < i < 0xFF for i in many)
    assert 0xFD not in many  # still open: not reused


# -- half-close ------------------------------------------------------------------------------------

def test_half_close_keeps_the_other_direction_open():
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a, b"request")
    pair.a.end_stream(sid)
    a_ev, b_ev = pair.pump()
    assert b_ev == [StreamEnded(peer_sid)]
    assert pair.a.stream_state(sid) is StreamState.LOCAL_ENDED
    with pytest.raises(LocalProtocolError):
        pair.a.send_data(sid, b"more")
    assert pair.b.send_data(peer_sid, b"response after the request ended") > 0
    a_ev, _ = pair.pump()
    assert data_of(a_ev, sid) == b"response after the request ended"
    pair.a.acknowledge(sid, len(data_of(a_ev, sid)))
    pair.b.end_stream(peer_sid)
    a_ev, b_ev = pair.pump()
    assert a_ev == [StreamClosed(sid, "DO close")]
    assert b_ev == []
    # lazy credit (both extended): 32 bytes are far below half the window, so no SENT at all
    assert [f.payload for f in frames_of(bytes(pair.wire_ab)) if f.type == F.SENT] == []
    assert pair.a.stream_count == pair.b.stream_count == 0


def test_simultaneous_half_close():
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a)
    pair.a.end_stream(sid)
    pair.b.end_stream(peer_sid)
    a_ev, b_ev = pair.pump()
    assert a_ev == [StreamEnded(sid)] and b_ev == [StreamEnded(peer_sid)]
    assert pair.a.stream_count == pair.b.stream_count == 0


def test_end_while_connecting_is_sent_after_connected():
    pair = ready_pair()
    sid = pair.a.open_stream("a:1", "b:2", b"one-shot request")
    pair.a.end_stream(sid)
    _, b_ev = pair.pump()
    pair.b.accept_stream(of_type(b_ev, StreamRequested)[0].stream_id)
    a_ev, b_ev = pair.pump()
    assert of_type(b_ev, StreamEnded)
    assert pair.a.stream_state(sid) is StreamState.LOCAL_ENDED


def test_without_half_close_end_stream_closes():
    pair = ready_pair(PLAIN, NOAUTH_EXT)
    sid, peer_sid = pair.open(pair.a)
    pair.a.end_stream(sid)
    a_ev, b_ev = pair.pump()
    assert b_ev == [StreamClosed(peer_sid, "DO close")]
    assert F.SHUT not in [f.type for f in frames_of(bytes(pair.wire_ab))]


def test_data_after_shut_is_a_remote_error():
    pair = ready_pair()
    sid, peer_sid = pair.open(pair.a)
    pair.a.end_stream(sid)
    pair.pump()
    rogue = F.encode_frame(F.SEND, sid, peer_sid, b"x")
    with pytest.raises(RemoteProtocolError, match="after the peer ended"):
        pair.b.receive_data(rogue)


def test_urgent_data_is_acknowledged_at_once_and_outside_the_window():
    conn = SockMuxConnection(PLAIN)
    open_plain(conn)
    (req,) = conn.receive_data(ScriptedPeer.connect(3))
    conn.accept_stream(req.stream_id)
    conn.data_to_send()
    events = conn.receive_data(F.encode_frame(F.SENDOOB, 3, req.stream_id, b"\xff\xf4"))
    assert events == [DataReceived(req.stream_id, b"\xff\xf4", urgent=True)]
    (sentoob,) = frames_of(conn.bytes_to_send())
    assert (sentoob.type, sentoob.receiver, sentoob.payload) == (F.SENTOOB, 3, b"2\0")
    conn.acknowledge(req.stream_id, 2)  # the driver acknowledges everything it wrote
    assert conn.bytes_to_send() == b""


def test_urgent_data_flood_is_bounded():
    conn = SockMuxConnection(PLAIN)
    open_plain(conn)
    (req,) = conn.receive_data(ScriptedPeer.connect(3))
    conn.accept_stream(req.stream_id)
    urgent = F.encode_frame(F.SENDOOB, 3, req.stream_id, bytes(16376))
    conn.receive_data(urgent * 2)  # two frames unwritten: still fine
    conn.acknowledge(req.stream_id, 16376)
    conn.receive_data(urgent)  # the driver keeps up: fine
    with pytest.raises(RemoteProtocolError, match="urgent"):
        conn.receive_data(F.encode_frame(F.SENDOOB, 3, req.stream_id, b"!"))


def test_shut_is_ignored_when_half_close_was_not_negotiated():
    conn = SockMuxConnection(PLAIN)
    open_plain(conn)
    (req,) = conn.receive_data(ScriptedPeer.connect(3))
    conn.accept_stream(req.stream_id)
    events = conn.receive_data(F.encode_frame(F.SHUT, 3, req.stream_id))
    assert events[0].frame_type == F.SHUT and conn.stream_state(req.stream_id) is StreamState.OPEN


# -- flow control -----------------------------------------------------------------------------------

def test_window_exhaustion_and_credit_return_towards_a_plain_peer():
    pair = ready_pair(PLAIN, PLAIN)
    sid, peer_sid = pair.open(pair.a)
    payload = bytes(100_000)
    taken = pair.a.send_data(sid, payload)
    assert taken == 65536
    assert pair.a.send_data(sid, payload[taken:]) == 0
    _, b_ev = pair.pump()
    assert len(data_of(b_ev)) == 65536
    assert all(len(e.data) <= 16384 - 8 for e in of_type(b_ev, DataReceived))
    assert pair.b.unacknowledged(peer_sid) == 65536
    # a partial write returns no credit yet: one SENT per SEND frame, once written
    pair.b.acknowledge(peer_sid, 1000)
    a_ev, _ = pair.pump()
    assert a_ev == []
    pair.b.acknowledge(peer_sid, 16376 - 1000)
    a_ev, _ = pair.pump()
    assert a_ev == [WindowUpdated(sid, 16376)]
    sent = [f for f in frames_of(bytes(pair.wire_ba)) if f.type == F.SENT]
    assert sent[-1].payload == b"16376\0" and (sent[-1].sender, sent[-1].receiver) == (
        peer_sid, sid)
    assert pair.a.send_data(sid, payload[taken:]) == 16376


def test_a_stalled_reader_stalls_only_its_own_stream():
    pair = ready_pair(PLAIN, PLAIN)
    stalled, stalled_peer = pair.open(pair.a)
    flowing, flowing_peer = pair.open(pair.a)
    pair.a.send_data(stalled, bytes(65536))  # its destination never reads: never acknowledged
    pair.pump()
    total = 0
    blob = bytes(range(256)) * 4096  # 1 MiB
    pos = 0
    while pos < len(blob):
        pos += pair.a.send_data(flowing, blob[pos:])
        a_ev, b_ev = pair.pump()
        total += len(deliver_and_ack(pair, pair.b, b_ev, flowing_peer))
        a_ev2, _ = pair.pump()
    assert total == len(blob)
    assert pair.a.send_window(stalled) == 0
    assert pair.b.unacknowledged(stalled_peer) == 65536


def test_plain_peer_may_send_one_frame_beyond_64k_and_not_a_byte_more():
    """DeleGate stops only once *more than* 65,536 bytes are unacknowledged: at 65,536 it
    still sends a full frame, 81,912 bytes in flight (seen on the wire between two
    DeleGates). That is the edge; one byte more is a violation and ends the link."""
    conn = SockMuxConnection(PLAIN)
    open_plain(conn)
    (req,) = conn.receive_data(ScriptedPeer.connect(3))
    conn.accept_stream(req.stream_id)
    up_to_64k = ScriptedPeer.send(3, req.stream_id, bytes(16376)) * 4 + ScriptedPeer.send(
        3, req.stream_id, bytes(65536 - 4 * 16376))
    one_more_frame = ScriptedPeer.send(3, req.stream_id, bytes(16376))
    events = conn.receive_data(up_to_64k + one_more_frame)
    assert sum(len(e.data) for e in events) == 81912
    assert conn.unacknowledged(req.stream_id) == 81912
    with pytest.raises(RemoteProtocolError, match="flow control") as info:
        conn.receive_data(ScriptedPeer.send(3, req.stream_id, b"x"))
    assert "1 bytes sent with 0 bytes of credit (window 81912)" in str(info.value)
    assert info.value.events == []


def test_plain_window_follows_the_negotiated_frame_size():
    """A DeleGate with SOXCONF=packsize:4096 sends 4 KiB frames and stops above 4 of them."""
    conn = SockMuxConnection(PLAIN)
    open_plain(conn, packsize=4096)
    (req,) = conn.receive_data(ScriptedPeer.connect(3))
    conn.accept_stream(req.stream_id)
    assert conn.features.receive_window == 5 * 4096 - 8
    conn.receive_data(ScriptedPeer.send(3, req.stream_id, bytes(4088)) * 4
                      + ScriptedPeer.send(3, req.stream_id, bytes(4 * 4096 - 4 * 4088))
                      + ScriptedPeer.send(3, req.stream_id, bytes(4088)))
    assert conn.unacknowledged(req.stream_id) == 5 * 4096 - 8
    with pytest.raises(RemoteProtocolError, match="flow control"):
        conn.receive_data(ScriptedPeer.send(3, req.stream_id, b"x"))


def test_remote_error_keeps_earlier_events_and_close_link_lists_streams():
    conn = SockMuxConnection(PLAIN)
    open_plain(conn)
    (req,) = conn.receive_data(ScriptedPeer.connect(3))
    conn.accept_stream(req.stream_id)
    conn.data_to_send()
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(ScriptedPeer.send(3, req.stream_id, b"last words") + b"\x07" * 8)
    assert info.value.events == [DataReceived(req.stream_id, b"last words")]
    assert conn.receive_data(b"more") == []  # CLOSED: input ignored
    with pytest.raises(StreamClosedError, match="link is closed"):
        conn.send_data(req.stream_id, b"x")
    conn.close_stream(req.stream_id)
    conn.acknowledge(req.stream_id, 10)
    assert conn.bytes_to_send() == b""  # nothing is queued onto a dead link
    assert conn.close_link("protocol error") == [LinkClosed("protocol error", (req.stream_id,))]


def test_larger_windows_and_frames_with_the_extension():
    cfg = config(stream_window=1 << 20)
    pair = ready_pair(cfg, cfg)
    sid, peer_sid = pair.open(pair.a)
    assert pair.a.send_data(sid, bytes(2 << 20)) == 1 << 20
    _, b_ev = pair.pump()
    sizes = [len(e.data) for e in of_type(b_ev, DataReceived)]
    assert max(sizes) == F.MAX_PAYLOAD and sum(sizes) == 1 << 20


def test_send_data_does_not_copy_bytes():
    pair = ready_pair(PLAIN, PLAIN)
    sid, _ = pair.open(pair.a)
    blob = bytes(40000)
    pair.a.send_data(sid, blob)
    chunks = pair.a.data_to_send()
    views = [c for c in chunks if isinstance(c, memoryview)]
    assert len(views) == 3 and all(v.obj is blob for v in views)
    assert sum(len(c) for c in chunks) == 40000 + 3 * 8


def test_small_bytes_ride_as_they_are():
    """bytes that fit one frame and the window are the frame's payload itself (no memoryview
    around them); past the window, the payload is a view of the part taken."""
    pair = ready_pair(PLAIN, PLAIN)
    sid, _ = pair.open(pair.a)
    small = b"one frame"
    assert pair.a.send_data(sid, small) == len(small)
    header, payload = pair.a.data_to_send()
    assert payload is small and F.decode_all(header + payload)[0].payload == small
    credit = pair.a.send_window(sid)
    big = bytes(range(256)) * ((credit + 1000) // 256 + 1)
    assert pair.a.send_data(sid, big) == credit
    chunks = pair.a.data_to_send()
    views = [c for c in chunks if isinstance(c, memoryview)]
    assert views and all(v.obj is big for v in views)
    assert b"".join(bytes(v) for v in views) == big[:credit]


def test_mutable_buffers_are_copied():
    pair = ready_pair(PLAIN, PLAIN)
    sid, peer_sid = pair.open(pair.a)
    buf = bytearray(b"original")
    pair.a.send_data(sid, buf)
    buf[:] = b"mutated!"
    _, b_ev = pair.pump()
    assert data_of(b_ev) == b"original"


def test_windows_unit():
    w = SendWindow(10)
    w.consume(7)
    assert w.available == 3
    with pytest.raises(LocalProtocolError):
        w.consume(4)
    assert w.acknowledge(100) == 7 and w.available == 10  # over-acknowledgement is clamped
    r = ReceiveWindow(100, max_records=3)
    for n in (10, 10, 10, 10, 10):  # the 4th and 5th merge into the 3rd record
        r.receive(n)
    assert r.available == 50
    assert r.acknowledge(25) == [10, 10]
    assert r.acknowledge(5) == []
    assert r.acknowledge(20) == [30]
    with pytest.raises(RemoteProtocolError):
        r.receive(101)
    r.grant_free(5)
    assert r.unacknowledged == 5 and r.acknowledge(5) == []


def test_memory_bound_per_stream_is_the_window():
    pair = ready_pair(PLAIN, PLAIN)
    sid, peer_sid = pair.open(pair.a, b"f" * 100)
    for _ in range(10):  # the sender keeps trying; nothing is acknowledged
        pair.a.send_data(sid, bytes(50000))
        pair.pump()
    assert pair.b.unacknowledged(peer_sid) == 65536 + 100
    assert pair.a.outgoing_bytes == 0


# -- stream limits -----------------------------------------------------------------------------------

def test_open_stream_at_the_negotiated_limit():
    cfg = config(max_streams=5)
    pair = ready_pair(cfg, config(max_streams=50))
    for _ in range(5):
        pair.open(pair.a)
    with pytest.raises(TooManyStreams):
        pair.a.open_stream("a:1", "b:2")
    assert pair.b.max_streams == 5  # the smaller limit applies to both
    with pytest.raises(TooManyStreams):
        pair.b.open_stream("a:1", "b:2")  # the limit counts both directions


@pytest.mark.parametrize("limit", [1, 5, 59])
def test_incoming_streams_past_the_limit_are_refused_cleanly(limit):
    # a believes it may open 60 streams (a plain peer's table); b is configured for fewer
    pair = ready_pair(PLAIN, plain_config(plain_max_streams=limit))
    opened = []
    for _ in range(limit):  # exactly at the limit: all accepted
        opened.append(pair.open(pair.a))
    sid = pair.a.open_stream("a:1", "b:2", b"one too many")  # limit + 1
    a_ev, b_ev = pair.pump()
    assert a_ev == [StreamClosed(sid, f"Too many streams (limit {limit})")]
    assert [type(e) for e in b_ev] == [StreamRefused]
    assert pair.b.stream_count == limit and pair.a.stream_count == limit
    # the link is intact: existing streams work, and a slot freed is usable again
    mine, theirs = opened[0]
    pair.a.send_data(mine, b"still fine")
    _, b_ev = pair.pump()
    assert data_of(b_ev, theirs) == b"still fine"
    pair.a.close_stream(mine)
    pair.pump()
    pair.open(pair.a)
    assert pair.b.stream_count == limit


def test_plain_peer_gets_at_most_60_streams_by_default():
    pair = ready_pair(NOAUTH_EXT, PLAIN)
    for _ in range(60):
        pair.a.open_stream("a:1", "b:2")
    with pytest.raises(TooManyStreams):
        pair.a.open_stream("a:1", "b:2")


def test_thousands_of_streams():
    cfg = config(max_streams=5000)
    pair = ready_pair(cfg, cfg)
    n = 3000
    ids = [pair.a.open_stream(f"10.0.{i // 250}.{i % 250}:{1024 + i}", "10.9.9.9:80",
                              b"hello %d" % i) for i in range(n)]
    assert len(set(ids)) == n and F.NO_STREAM not in ids and 0 not in ids
    _, b_ev = pair.pump()
    requests = of_type(b_ev, StreamRequested)
    assert len(requests) == n
    for i, req in enumerate(requests):
        assert req.first_data == b"hello %d" % i
        pair.b.accept_stream(req.stream_id, b"welcome %d" % i)
    a_ev, _ = pair.pump()
    assert len(of_type(a_ev, StreamAccepted)) == n
    for i, sid in enumerate(ids):
        pair.a.send_data(sid, b"payload %d" % i)
    _, b_ev = pair.pump()
    by_stream = {e.stream_id: e.data for e in of_type(b_ev, DataReceived)}
    assert [by_stream[r.stream_id] for r in requests] == [b"payload %d" % i for i in range(n)]
    assert pair.a.stream_count == pair.b.stream_count == n
    for sid in ids:
        pair.a.close_stream(sid)
    _, b_ev = pair.pump()
    assert len(of_type(b_ev, StreamClosed)) == n
    assert pair.a.stream_count == pair.b.stream_count == 0
    stats = pair.a.stats()
    assert stats.streams_opened == n and stats.bytes_sent == pair.b.stats().bytes_received
