"""Link set-up: the HELLO exchange, extension negotiation and fallback, authentication."""

import pytest
from sockmux_pair import (
    HELLO_TIME, OTHER_SECRET, SECRET, ConnectionPair, ScriptedPeer, config, counter_random,
    frames_of, of_type, open_plain, plain_config,
)

from tcpmuxd.sockmux import (
    Authenticated, AuthenticationFailed, AuthState, ConnectionState, FrameIgnored,
    HandshakeComplete, LinkReady, LocalProtocolError, SockMuxConfig, SockMuxConnection,
    StreamRefused, StreamRequested,
)
from tcpmuxd.sockmux import auth as A
from tcpmuxd.sockmux import frames as F


def _types(wire: bytes) -> list[int]:
    return [f.type for f in frames_of(bytes(wire))]


# -- HELLO exchange -------------------------------------------------------------------------------

@pytest.mark.parametrize("b_first", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_handshake_completes_in_either_delivery_order(b_first, chunk):
    pair = ConnectionPair(chunk=chunk)
    pair.a.initiate_connection(pair.now, HELLO_TIME)
    pair.b.initiate_connection(pair.now, HELLO_TIME)
    if b_first:  # deliver b's HELLO to a before a's reaches b
        pair.a.receive_data(pair.b.bytes_to_send())
    a_ev, b_ev = pair.pump()
    for events, conn in ((a_ev, pair.a), (b_ev, pair.b)):
        assert [type(e) for e in events] == [HandshakeComplete, Authenticated, LinkReady]
        assert conn.state is ConnectionState.OPEN and conn.is_ready and conn.authenticated
        assert events[2] == LinkReady(authenticated=True)
    assert a_ev[0].features == b_ev[0].features
    assert a_ev[0].peer_hello == "20261121-161704.460503 test"


def test_each_side_sends_one_hello_and_two_hellooks():
    pair = ConnectionPair()
    pair.connect()
    for wire in (pair.wire_ab, pair.wire_ba):
        types = _types(wire)
        assert types.count(F.HELLO) == 1 and types.count(F.HELLOOK) == 2
        assert types[:3] == [F.HELLO, F.HELLOOK, F.HELLOOK]


def test_hellook_copies_the_ids_of_the_frame_it_answers():
    conn = SockMuxConnection(plain_config())
    conn.initiate_connection(0.0)
    conn.data_to_send()
    conn.receive_data(F.encode_frame(F.HELLO, 0x1234, 0x5678, b"x y\0"))
    (frame,) = frames_of(conn.bytes_to_send())
    assert (frame.type, frame.sender, frame.receiver) == (F.HELLOOK, 0x1234, 0x5678)


def test_receive_before_initiate_is_a_local_error():
    conn = SockMuxConnection(plain_config())
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"\x03")
    conn.initiate_connection()
    with pytest.raises(LocalProtocolError):
        conn.initiate_connection()


def test_frames_before_the_hello_exchange_are_ignored():
    conn = SockMuxConnection(plain_config())
    conn.initiate_connection(0.0)
    events = conn.receive_data(ScriptedPeer.connect(5))
    assert of_type(events, FrameIgnored) and conn.state is ConnectionState.HELLO


def test_no_stream_before_the_link_is_ready():
    pair = ConnectionPair()
    pair.a.initiate_connection(0.0)
    with pytest.raises(LocalProtocolError, match="open link"):
        pair.a.open_stream("1.2.3.4:5", "1.2.3.4:6")


# -- extension negotiation -----------------------------------------------------------------------

def test_both_with_extensions_negotiate_everything():
    a_cfg = config(max_frame_size=40000, stream_window=1 << 20, max_streams=3000)
    b_cfg = config(max_frame_size=65543, stream_window=300000, max_streams=2000)
    pair = ConnectionPair(a_cfg, b_cfg)
    a_ev, b_ev = pair.connect()
    fa, fb = a_ev[0].features, b_ev[0].features
    assert fa.extensions and fa.half_close and fa.authentication and fa.conndata
    assert fa.max_frame_size == fb.max_frame_size == 40000
    assert (fa.send_window, fa.receive_window) == (300000, 1 << 20)
    assert (fb.send_window, fb.receive_window) == (1 << 20, 300000)
    assert fa.max_streams == fb.max_streams == 2000
    assert "halfclose" in fa.peer_extensions and "auth" in fa.peer_extensions


@pytest.mark.parametrize("plain_side", ["a", "b"])
def test_one_plain_side_means_plain_behaviour_on_both(plain_side):
    ours = config(secret=None, require_auth=False)
    plain = plain_config()
    pair = ConnectionPair(plain if plain_side == "a" else ours,
                          ours if plain_side == "a" else plain)
    a_ev, b_ev = pair.connect()
    for events in (a_ev, b_ev):
        f = of_type(events, HandshakeComplete)[0].features
        assert not (f.extensions or f.half_close or f.authentication)
        assert (f.max_frame_size, f.send_window, f.receive_window, f.max_streams) == (
            16384, 65536, 81912, 60)
        assert LinkReady(authenticated=False) in events
    # the plain peer saw exactly one thing it does not know, and ignored it like DeleGate
    plain_conn, plain_events = (pair.a, a_ev) if plain_side == "a" else (pair.b, b_ev)
    to_plain = pair.wire_ba if plain_side == "a" else pair.wire_ab
    assert all(t in F.DELEGATE_TYPES for t in _types(to_plain))
    ignored = of_type(plain_events, FrameIgnored)
    assert len(ignored) == 1 and ignored[0].frame_type == F.SETOPT
    assert plain_conn.is_ready


def test_half_close_only_when_both_offer_it():
    pair = ConnectionPair(config(half_close=False), config())
    a_ev, b_ev = pair.connect()
    assert not a_ev[0].features.half_close and not b_ev[0].features.half_close
    assert a_ev[0].features.extensions and a_ev[0].features.max_frame_size == F.MAX_FRAME_SIZE


def test_plain_frame_size_limit_is_enforced_on_input():
    conn = SockMuxConnection(plain_config())
    open_plain(conn)
    with pytest.raises(F.RemoteProtocolError, match="exceeds"):
        conn.receive_data(F.encode_header(F.SEND, 1, 2, 16384 - 8 + 1))


def test_smaller_packsize_wins():
    conn = SockMuxConnection(plain_config())
    events = open_plain(conn, packsize=4096)
    assert events[0].features.max_frame_size == 4096
    with pytest.raises(F.RemoteProtocolError):
        conn.receive_data(F.encode_header(F.SEND, 1, 2, 4096 - 8 + 1))


def test_peer_without_packsize_stays_at_512_byte_frames():
    conn = SockMuxConnection(plain_config())
    conn.initiate_connection(0.0)
    hello = b"20261121-161621.514487 vm\0"
    conn.receive_data(F.encode_frame(F.HELLO, 0, 0, hello) + F.encode_frame(F.HELLOOK, 0, 0, hello)
                      + F.encode_frame(F.SETOPT, 0xFF, 0xFF, b"\x02\x01\x00"))
    assert conn.features.max_frame_size == F.INITIAL_FRAME_SIZE
    with pytest.raises(F.RemoteProtocolError):
        conn.receive_data(F.encode_header(F.SEND, 1, 2, 600))


def test_extension_offer_with_another_magic_is_not_ours():
    conn = SockMuxConnection(config(secret=None, require_auth=False))
    events = open_plain(conn, extensions=b"otherproto/1 halfclose\0")
    handshake = of_type(events, HandshakeComplete)[0]
    assert not handshake.features.extensions
    assert of_type(events, FrameIgnored)


def test_malformed_extension_value_is_a_remote_error():
    conn = SockMuxConnection(config(secret=None, require_auth=False))
    with pytest.raises(F.RemoteProtocolError, match="frame=12"):
        open_plain(conn, extensions=b"sockmuxd/1 frame=12\0")


def test_peer_without_conndata_finishes_setup_on_its_first_other_frame():
    conn = SockMuxConnection(plain_config())
    events = open_plain(conn, conndata=False)
    assert conn.state is ConnectionState.SETUP and not events
    events = conn.receive_data(ScriptedPeer.connect(9, client="a:1", entrance="b:2"))
    assert [type(e) for e in events] == [HandshakeComplete, LinkReady, StreamRequested]
    assert events[0].features.conndata is False


# -- authentication --------------------------------------------------------------------------------

def test_the_secret_never_travels():
    pair = ConnectionPair()
    pair.connect()
    assert SECRET not in pair.wire_ab and SECRET not in pair.wire_ba
    assert pair.a.auth_state is AuthState.SUCCEEDED is pair.b.auth_state


def test_wrong_secret_fails_both_sides_and_no_stream_opens():
    pair = ConnectionPair(config(), config(secret=OTHER_SECRET))
    a_ev, b_ev = pair.connect()
    for events, conn in ((a_ev, pair.a), (b_ev, pair.b)):
        assert not of_type(events, LinkReady)
        failed = of_type(events, AuthenticationFailed)
        assert len(failed) == 1, events
        assert conn.state is ConnectionState.CLOSED
        assert conn.auth_state is AuthState.FAILED
        with pytest.raises(LocalProtocolError):
            conn.open_stream("1.1.1.1:1", "2.2.2.2:2")
    assert "wrong" in of_type(a_ev, AuthenticationFailed)[0].reason


def test_require_auth_against_a_plain_peer_fails_with_a_reason():
    pair = ConnectionPair(config(), plain_config())
    a_ev, b_ev = pair.connect()
    (failed,) = of_type(a_ev, AuthenticationFailed)
    assert "--no-auth" in failed.reason
    assert pair.a.state is ConnectionState.CLOSED and not of_type(a_ev, LinkReady)
    assert all(t in F.DELEGATE_TYPES for t in _types(pair.wire_ab))


def test_require_auth_against_our_peer_without_secret_tells_it_why():
    pair = ConnectionPair(config(), config(secret=None, require_auth=False))
    a_ev, b_ev = pair.connect()
    assert "no shared secret" in of_type(a_ev, AuthenticationFailed)[0].reason
    (told,) = of_type(b_ev, AuthenticationFailed)
    assert told.reason.startswith("peer refused authentication")
    assert pair.b.state is ConnectionState.CLOSED


def test_no_auth_opt_out_works_with_a_plain_peer():
    pair = ConnectionPair(config(secret=None, require_auth=False), plain_config())
    a_ev, b_ev = pair.connect()
    assert LinkReady(authenticated=False) in a_ev and LinkReady(authenticated=False) in b_ev
    assert pair.a.auth_state is AuthState.NOT_USED
    sid, peer_sid = pair.open(pair.a, b"hi", b"ho")
    assert pair.a.stream_count == pair.b.stream_count == 1


def test_optional_secret_still_authenticates_when_both_have_it():
    pair = ConnectionPair(config(require_auth=False), config(require_auth=False))
    a_ev, b_ev = pair.connect()
    assert LinkReady(authenticated=True) in a_ev and pair.b.authenticated


def test_config_refuses_require_auth_without_secret():
    with pytest.raises(ValueError, match="no-auth"):
        SockMuxConfig()
    with pytest.raises(ValueError):
        SockMuxConfig(secret=b"short", require_auth=True)
    with pytest.raises(ValueError):
        SockMuxConfig(secret=SECRET, extensions=False)


def test_tampered_negotiation_breaks_the_proofs():
    # A man in the middle strips half-close from a's offer (same length, so framing holds).
    pair = ConnectionPair(tamper_ab=lambda b: b.replace(b" halfclose", b" xalfclose"))
    a_ev, b_ev = pair.connect()
    assert of_type(a_ev, AuthenticationFailed) and of_type(b_ev, AuthenticationFailed)


def _to_auth_state(conn: SockMuxConnection) -> bytes:
    """Run ``conn`` up to AUTH against a scripted peer offering auth; return conn's nonce."""
    peer = ScriptedPeer()
    conn.initiate_connection(0.0, HELLO_TIME)
    conn.receive_data(peer.handshake(extensions=b"sockmuxd/1 auth halfclose\0"))
    frames = frames_of(conn.bytes_to_send())
    nonce_frame = frames[-1]
    assert nonce_frame.type == F.AUTH and nonce_frame.payload[:1] == b"N"
    assert conn.state is ConnectionState.AUTH and conn.auth_state is AuthState.PENDING
    return nonce_frame.payload[1:]


def test_reflected_nonce_is_refused():
    conn = SockMuxConnection(config(), random_bytes=counter_random(7))
    nonce = _to_auth_state(conn)
    events = conn.receive_data(F.encode_frame(F.AUTH, 0xFF, 0xFF, b"N" + nonce))
    (failed,) = of_type(events, AuthenticationFailed)
    assert "reflection" in failed.reason and conn.state is ConnectionState.CLOSED


def test_reflected_proof_is_refused():
    conn = SockMuxConnection(config(), random_bytes=counter_random(7))
    _to_auth_state(conn)
    conn.receive_data(F.encode_frame(F.AUTH, 0xFF, 0xFF, b"N" + b"\x99" * 32))
    (own_proof,) = frames_of(conn.bytes_to_send())
    events = conn.receive_data(F.encode_frame(F.AUTH, 0xFF, 0xFF, own_proof.payload))
    assert of_type(events, AuthenticationFailed)


def test_replayed_proof_from_another_session_is_refused():
    peer_nonce = b"\x99" * 32
    hello = b"20261121-161621.514487 vm"
    ext = b"sockmuxd/1 auth halfclose\0"
    # the proof the real peer gave in an earlier session, against our nonce then
    old = A.make_proof(SECRET, peer_nonce, b"\x01" * 32, hello, b"old hello", ext, b"old ext")
    conn = SockMuxConnection(config(), random_bytes=counter_random(7))
    _to_auth_state(conn)
    conn.receive_data(F.encode_frame(F.AUTH, 0xFF, 0xFF, b"N" + peer_nonce))
    events = conn.receive_data(F.encode_frame(F.AUTH, 0xFF, 0xFF, b"P" + old))
    assert of_type(events, AuthenticationFailed)


def test_a_correct_scripted_proof_is_accepted():
    conn = SockMuxConnection(config(), random_bytes=counter_random(7))
    nonce = _to_auth_state(conn)
    peer_nonce = b"\x99" * 32
    conn.receive_data(F.encode_frame(F.AUTH, 0xFF, 0xFF, b"N" + peer_nonce))
    (proof_frame,) = frames_of(conn.bytes_to_send())
    hello = b"20261121-161621.514487 vm"
    ours_hello = conn.local_hello.encode()
    ext = b"sockmuxd/1 auth halfclose\0"
    our_ext = conn._local_ext
    assert A.check_proof(SECRET, proof_frame.payload[1:], nonce, peer_nonce, ours_hello, hello,
                         our_ext, ext)
    proof = A.make_proof(SECRET, peer_nonce, nonce, hello, ours_hello, ext, our_ext)
    events = conn.receive_data(F.encode_frame(F.AUTH, 0xFF, 0xFF, b"P" + proof))
    assert [type(e) for e in events] == [Authenticated, LinkReady]


def test_connect_before_authentication_is_refused_like_delegate():
    conn = SockMuxConnection(config(), random_bytes=counter_random(7))
    _to_auth_state(conn)
    events = conn.receive_data(ScriptedPeer.connect(0x21, b"early"))
    assert [type(e) for e in events] == [StreamRefused]
    (close,) = frames_of(conn.bytes_to_send())
    assert (close.type, close.sender, close.receiver, close.payload) == (
        F.CLOSE, F.NO_STREAM, 0x21, b"### Not Authenticated ###\0")
    assert conn.stream_count == 0 and conn.auth_state is AuthState.PENDING


def test_auth_pending_is_visible_for_the_drivers_timeout():
    pair = ConnectionPair()
    pair.a.initiate_connection(0.0, HELLO_TIME)
    pair.b.initiate_connection(0.0, HELLO_TIME)
    # deliver everything but b's proof: a waits in AUTH
    pair.tamper_ba = lambda data: b"".join(
        f.encode() for f in frames_of(data) if not (f.type == F.AUTH and f.payload[:1] == b"P"))
    pair.pump()
    assert pair.a.auth_state is AuthState.PENDING and not pair.a.is_ready
    assert pair.b.is_ready  # b verified a's proof


def test_peer_refusing_our_proof_later_closes_our_streams():
    conn = SockMuxConnection(config(), random_bytes=counter_random(7))
    _to_auth_state(conn)
    events = conn.receive_data(F.encode_frame(F.AUTH, 0xFF, 0xFF, b"Fwrong proof\0"))
    (failed,) = of_type(events, AuthenticationFailed)
    assert failed.reason == "peer refused authentication: wrong proof"


def test_auth_unit_proofs_are_directional():
    n1, n2, h1, h2, e1, e2 = b"1" * 32, b"2" * 32, b"h1", b"h2", b"e1", b"e2"
    p12 = A.make_proof(SECRET, n1, n2, h1, h2, e1, e2)
    p21 = A.make_proof(SECRET, n2, n1, h2, h1, e2, e1)
    assert p12 != p21 and len(p12) == A.PROOF_SIZE
    assert A.check_proof(SECRET, p12, n1, n2, h1, h2, e1, e2)
    assert not A.check_proof(OTHER_SECRET, p12, n1, n2, h1, h2, e1, e2)
    assert A.check_peer_nonce(n1, n1) and A.check_peer_nonce(n1, b"short")
    assert A.check_peer_nonce(n1, n2) is None
