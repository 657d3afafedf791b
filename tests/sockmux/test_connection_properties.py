"""Property-based tests (Hypothesis) of the SockMux decoder and connection state machine.

Whatever a peer sends, in whatever pieces the network delivers it:

* the decoder (:class:`FrameDecoder`) gives frames or raises :class:`RemoteProtocolError`,
  never any other exception; the frames do not depend on the split; between two reads it
  holds less than one frame (``limit - 1`` bytes at most);
* the connection (:class:`SockMuxConnection`), from each phase a peer can reach (right after
  our HELLO, waiting for authentication, up with a plain DeleGate-like peer, up with a sockmuxd
  peer without authentication), gives events or raises :class:`RemoteProtocolError`, never any
  other exception; events, the error and every byte it answers do not depend on the split;
  after an error it is CLOSED and ignores input; it holds less than one frame undecoded, and
  it answers at most a bounded multiple of what it read (what a peer can make it queue).

The streams are not only random bytes (which die at the first header): mostly frames of every
type with small stream ids (so that streams are opened, fed, credited, shut and closed),
valid and invalid texts, wrong lengths and versions, and junk. Seeded (``derandomize``: the
same examples every run, as CI needs) and bounded (examples and a deadline per example).
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sockmux_pair import HELLO_TIME, ScriptedPeer, config, counter_random, plain_config

from tcpmuxd.sockmux import frames as F
from tcpmuxd.sockmux.connection import (ConnectionState, DataReceived, SockMuxConfig,
                                        SockMuxConnection, StreamAccepted, StreamEnded,
                                        StreamRequested)
from tcpmuxd.sockmux.frames import FrameDecoder, LocalProtocolError, RemoteProtocolError

SETTINGS = settings(derandomize=True, database=None, max_examples=300,
                    deadline=timedelta(seconds=2),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Every frame type SockMux has, ours, and a few it does not; the stream frames more often
#: (a stream needs a CONNECT and then frames that name it).
STREAM_TYPES = [F.CONNECT, F.CONNECTED, F.SEND, F.SENDOOB, F.SENT, F.CLOSE, F.CLOSED, F.SHUT]
TYPES = sorted(F.DELEGATE_TYPES | F.EXTENSION_TYPES | {0x05, 0x3F, 0x7F, 0xFF}) + STREAM_TYPES * 4
#: The most a connection answers per byte read, plus what it sends of its own accord (the
#: handshake: HELLOOK, three SETOPTs, the AUTH nonce and proof). HELLOOK to an 8-byte HELLO
#: is the worst: about 5 bytes per byte.
MAX_ANSWER_RATIO = 6
OWN_OUTPUT = 2048


def texts() -> st.SearchStrategy[bytes]:
    """Payloads shaped like SockMux texts: ASCII with a NUL (or not), addresses, numbers."""
    words = st.sampled_from([b"127.0.0.1:80", b"[::1]:22", b"DO close", b"OK closed",
                             b"sockmuxd/1 halfclose auth frame=512 window=4096 streams=3",
                             b"sockmuxd/1 window=1", b"20260101-000000.000000 peer", b"98304",
                             b"No server", b"", b"x" * 600])
    return st.builds(lambda parts, nul, tail: b" ".join(parts) + (b"\0" if nul else b"") + tail,
                     st.lists(words, max_size=3), st.booleans(), st.binary(max_size=40))


ADDRESS = st.sampled_from(["127.0.0.1:5000", "[::1]:80", "192.0.2.1:19024", "h:1"])


def payloads(frame_type: int) -> st.SearchStrategy[bytes]:
    """Mostly what a frame of this type carries, well formed; sometimes a text or bytes."""
    special = {
        F.HELLO: st.sampled_from([b"20260101-000000.000000 peer\0", b"\0"]),
        F.NOOP: st.just(b""),
        F.HELLOOK: st.sampled_from([b"20260101-000000.000000 peer\0", b"\0"]),
        F.CONNECT: st.builds(lambda a, b, first: F.connect_text(a, b) + first,
                             ADDRESS, ADDRESS, st.binary(max_size=30)),
        F.CONNECTED: st.builds(lambda a, b, first: F.connect_text(a, b) + first,
                               ADDRESS, ADDRESS, st.binary(max_size=30)),
        F.SEND: st.binary(min_size=1, max_size=300),
        F.SENDOOB: st.binary(min_size=1, max_size=30),
        F.SENT: st.builds(F.count_payload, st.integers(0, 70000)),
        F.CLOSE: st.sampled_from([F.reason_payload("DO close"), F.reason_payload("No server")]),
        F.CLOSED: st.just(F.reason_payload("OK closed")),
        F.SHUT: st.just(b""),
        F.ECHO: st.builds(F.echo_payload, st.integers(0, 0x7FFFFFFF)),
        F.ECHOOK: st.builds(F.echo_payload, st.integers(0, 0x7FFFFFFF)),
        F.SETOPT: st.builds(lambda opt, data: bytes([opt]) + data,
                            st.sampled_from([F.OPT_CONNDATA, F.OPT_PACKSIZE, F.OPT_AUTH,
                                             F.OPT_EXTENSIONS, 0x77]),
                            st.one_of(st.sampled_from([F.CONNDATA_ON, F.packsize_data(512),
                                                       F.packsize_data(16384)]), texts())),
        F.AUTH: st.builds(lambda op, body: bytes([op]) + body,
                          st.sampled_from(b"NPFX"), st.binary(max_size=40)),
    }
    typed = special.get(frame_type, texts())
    return weighted((12, typed), (1, texts()), (1, st.binary(max_size=300)))


#: The peer's own stream ids (CONNECT senders), and ours as it addresses them (we allocate
#: from 1): small sets, so that frames find the streams they name.
PEER_IDS = st.sampled_from([1, 1, 2, 0x00FF, 0xFFFF])
OUR_IDS = st.sampled_from([1, 1, 2, 0x00FF, 0])


@st.composite
def good_frame(draw: st.DrawFn) -> bytes:
    """A well formed frame of any type."""
    frame_type = draw(st.sampled_from(TYPES))
    payload = draw(payloads(frame_type))
    if frame_type in (F.CONNECT,):
        sender, receiver = draw(PEER_IDS), F.NO_STREAM
    else:
        sender, receiver = draw(PEER_IDS), draw(OUR_IDS)
    return F.HEADER.pack(F.VERSION, frame_type, sender, receiver, len(payload)) + payload


@st.composite
def bad_frame(draw: st.DrawFn) -> bytes:
    """A frame with a wrong version or a length that does not match its payload."""
    frame_type = draw(st.sampled_from(TYPES))
    payload = draw(st.binary(max_size=300))
    version = draw(st.sampled_from([F.VERSION, F.VERSION_ENCRYPTED, 0x00, 0xFF]))
    length = draw(st.integers(0, F.MAX_PAYLOAD))
    return F.HEADER.pack(version, frame_type, draw(PEER_IDS), draw(OUR_IDS), length) + payload


def weighted(*choices: tuple[int, st.SearchStrategy[bytes]]) -> st.SearchStrategy[bytes]:
    """One of the strategies, each as often as its weight (one_of draws them evenly)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


@st.composite
def scripted(draw: st.DrawFn) -> bytes:
    """Streams as a peer runs them: CONNECTs with fresh ids, then frames that name them by
    both ids (ours are allocated in order from 1, or 2 when the driver opened one first), a
    CONNECTED for our stream 1; mixed with any frame and, rarely, junk."""
    out: list[bytes] = []
    opened: list[tuple[int, int]] = []  # (the peer's id, ours as we expect it)
    next_peer = 1
    next_ours = draw(st.sampled_from([1, 2]))
    ops = ["connect"] * 3 + ["send"] * 5 + ["sent", "sent", "close", "closed", "shut",
                                            "sendoob", "connected", "frame", "frame", "junk"]
    for _ in range(draw(st.integers(0, 40))):
        op = draw(st.sampled_from(ops))
        if op == "connect":
            first = draw(st.binary(max_size=30))
            out.append(F.encode_frame(F.CONNECT, next_peer, F.NO_STREAM,
                                      F.connect_text(draw(ADDRESS), draw(ADDRESS)) + first))
            opened.append((next_peer, next_ours))
            next_peer, next_ours = next_peer + 1, next_ours + 1
        elif op == "connected":
            out.append(F.encode_frame(F.CONNECTED, 0x4000 + next_peer, 1,
                                      F.connect_text("127.0.0.1:80", "127.0.0.1:1")))
            next_peer += 1
        elif op == "frame" or not opened:
            out.append(draw(good_frame()))
        elif op == "junk":
            out.append(draw(st.one_of(bad_frame(), st.binary(min_size=1, max_size=20))))
        else:
            peer, ours = draw(st.sampled_from(opened))
            frame_type = {"send": F.SEND, "sent": F.SENT, "close": F.CLOSE, "closed": F.CLOSED,
                          "shut": F.SHUT, "sendoob": F.SENDOOB}[op]
            payload = draw(payloads(frame_type))
            out.append(F.HEADER.pack(F.VERSION, frame_type, peer, ours, len(payload)) + payload)
    return b"".join(out)


def streams() -> st.SearchStrategy[bytes]:
    """A peer's whole byte stream: mostly good frames, now and then a bad one or junk."""
    piece = weighted((40, good_frame()), (1, bad_frame()),
                     (1, st.binary(min_size=1, max_size=20)))
    return st.one_of(scripted(), st.lists(piece, max_size=40).map(b"".join))


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` in pieces, cut anywhere (one byte at a time included)."""
    if not data:
        return []
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=30)))
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


# --------------------------------------------------------------------------- the decoder


def _decode(data_pieces: list[bytes], limit: int) -> tuple[list[tuple], str | None, int]:
    """Frames (as tuples), the error text (or None), and the most held between reads."""
    decoder = FrameDecoder(limit)
    out: list[tuple] = []
    most = 0
    try:
        for piece in data_pieces:
            decoder.feed(piece)
            while (f := decoder.next_frame()) is not None:
                out.append((f.type, f.sender, f.receiver, f.payload, f.version))
            most = max(most, decoder.buffered)
    except RemoteProtocolError as exc:
        return out, str(exc), most
    return out, None, most


@SETTINGS
@given(st.data(), st.sampled_from([F.MIN_FRAME_SIZE, F.PLAIN_FRAME_SIZE, F.MAX_FRAME_SIZE]))
def test_decoder_any_bytes_any_split(data: st.DataObject, limit: int) -> None:
    stream = data.draw(st.one_of(streams(), streams(), st.binary(max_size=2000)))
    pieces = data.draw(splits(stream))
    whole = _decode([stream], limit)
    split = _decode(pieces, limit)
    event("protocol error" if whole[1] else "no error")
    event(f"{min(len(whole[0]), 10)}+ frames")
    assert split[:2] == whole[:2]  # the same frames, the same error, whatever the split
    assert split[2] < limit  # less than one frame held between reads
    if whole[1] is None:  # no error: every frame and the held rest account for every byte
        consumed = sum(F.HEADER_SIZE + len(f[3]) for f in whole[0])
        assert consumed <= len(stream) and len(stream) - consumed < limit


# --------------------------------------------------------------------------- the connection


def _fresh(cfg: SockMuxConfig) -> SockMuxConnection:
    conn = SockMuxConnection(cfg, random_bytes=counter_random(7))
    conn.initiate_connection(0.0, HELLO_TIME)
    conn.data_to_send()
    return conn


#: Where a peer may find the connection: (name, config, the bytes that take it there).
PHASES = {
    "after our HELLO": (config, b""),
    "waiting for authentication": (
        config, ScriptedPeer().handshake(extensions=b"sockmuxd/1 halfclose auth\0")),
    "up, plain peer": (lambda: plain_config(max_streams=4, plain_max_streams=4),
                       ScriptedPeer().handshake()),
    "up, sockmuxd peer without authentication": (
        lambda: config(secret=None, require_auth=False, max_streams=4),
        ScriptedPeer().handshake(extensions=b"sockmuxd/1 halfclose window=4096 streams=4\0")),
}


def _run(phase: str, pieces: list[bytes]) -> tuple[list, str | None, bytes, int, int]:
    """Feed the pieces; returns (events, error, every byte answered, most undecoded between
    reads, bytes read)."""
    make_config, prefix = PHASES[phase]
    conn = _fresh(make_config())
    events: list = []
    answered = bytearray()
    most = 0
    error = None
    read = 0
    for piece in ([prefix] if prefix else []) + pieces:
        read += len(piece)
        try:
            events += conn.receive_data(piece, now=1.0)
        except RemoteProtocolError as exc:
            events += exc.events
            error = str(exc)
            answered += conn.bytes_to_send()
            assert conn.state is ConnectionState.CLOSED
            assert conn.receive_data(b"\x03\x09\x00\xff\x00\xff\x00\x00", now=1.0) == []
            break
        answered += conn.bytes_to_send()
        most = max(most, conn.undecoded_bytes)
    return events, error, bytes(answered), most, read


@SETTINGS
@given(st.data(), st.sampled_from(sorted(PHASES)))
def test_connection_any_bytes_any_split(data: st.DataObject, phase: str) -> None:
    stream = data.draw(streams())
    pieces = data.draw(splits(stream))
    whole = _run(phase, [stream] if stream else [])
    split = _run(phase, pieces)
    # (what the examples reached: pytest --hypothesis-show-statistics)
    event("protocol error" if whole[1] else "no error")
    for kind in sorted({type(e).__name__ for e in whole[0]}):
        event(kind)
    # Events, the error and the answers are the same whatever the split.
    assert split[0] == whole[0]
    assert split[1] == whole[1]
    assert split[2] == whole[2]
    # Less than one frame is held undecoded between reads.
    assert split[3] < F.MAX_FRAME_SIZE
    # What the peer can make the connection queue is bounded by what it sent.
    assert len(split[2]) <= MAX_ANSWER_RATIO * split[4] + OWN_OUTPUT


@SETTINGS
@given(st.lists(st.sampled_from([F.encode_frame(F.HELLO, 0, 0, b"\0"),
                                 F.encode_frame(F.ECHO, F.NO_STREAM, F.NO_STREAM, b"\0"),
                                 F.encode_frame(F.CLOSE, 1, 2, b"\0"),
                                 ScriptedPeer.connect(5)]), min_size=1, max_size=400),
       st.sampled_from(sorted(PHASES)))
def test_answer_floods_are_bounded_per_byte(frames: list[bytes], phase: str) -> None:
    """The frames a connection answers by itself, in bulk: the answers stay within the
    ratio the driver's memory bound relies on (session.py, Memory)."""
    events, _error, answered, _most, read = _run(phase, [b"".join(frames)])
    assert len(answered) <= MAX_ANSWER_RATIO * read + OWN_OUTPUT


def _drive(conn: SockMuxConnection, events: list) -> None:
    """What session.py does with the events, in short: accept what the peer opens, write and
    acknowledge its data, send a little on what it accepted, end what it ended. A stream may
    be gone by the time the driver acts on an earlier event of the same read: the driver then
    gets a LocalProtocolError (its contract), never the peer's fault."""
    for ev in events:
        try:
            if isinstance(ev, StreamRequested):
                conn.accept_stream(ev.stream_id, b"hello")
            elif isinstance(ev, DataReceived):
                conn.acknowledge(ev.stream_id, len(ev.data))
            elif isinstance(ev, StreamAccepted):
                conn.send_data(ev.stream_id, b"x" * 100)
            elif isinstance(ev, StreamEnded):
                conn.end_stream(ev.stream_id)
        except LocalProtocolError:
            pass


@SETTINGS
@given(st.data(), st.sampled_from(sorted(PHASES)))
def test_connection_with_a_driver_any_bytes_any_split(data: st.DataObject, phase: str) -> None:
    """The same, with a driver acting on the events between reads (so the outcome may depend
    on the split): still events or a RemoteProtocolError, and the bounds."""
    stream = data.draw(streams())
    pieces = data.draw(splits(stream))
    make_config, prefix = PHASES[phase]
    conn = _fresh(make_config())
    seen: set[str] = set()
    read = answered = 0
    for piece in ([prefix] if prefix else []) + pieces:
        read += len(piece)
        if conn.is_ready and not conn.stream_count:
            try:  # a stream of ours, for the peer's CONNECTED, SENT, SHUT... to find
                conn.open_stream("127.0.0.1:5000", "127.0.0.1:8080")
            except LocalProtocolError:
                pass
        try:
            events = conn.receive_data(piece, now=1.0)
        except RemoteProtocolError as exc:
            seen.add("protocol error: " + " ".join(str(exc).split()[:3]))
            seen.update(type(e).__name__ for e in exc.events)
            assert conn.state is ConnectionState.CLOSED
            break
        seen.update(type(e).__name__ for e in events)
        _drive(conn, events)
        answered += len(conn.bytes_to_send())
        assert conn.undecoded_bytes < F.MAX_FRAME_SIZE
    for kind in sorted(seen):
        event(kind)
    # our own data (100 bytes per accepted stream, a greeting per requested one) on top
    assert answered <= MAX_ANSWER_RATIO * read + OWN_OUTPUT + 256 * conn.stats().streams_opened
