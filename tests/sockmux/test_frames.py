"""The SockMux codec: header layout, types, streaming decoder and its bounds, texts."""

from datetime import datetime

import pytest

from tcpmuxd.sockmux import frames as F
from tcpmuxd.sockmux.frames import Frame, FrameDecoder, LocalProtocolError, RemoteProtocolError


# -- header and types ----------------------------------------------------------------------------

def test_header_is_eight_big_endian_bytes():
    assert F.HEADER_SIZE == 8
    assert F.encode_header(F.SEND, 0x1234, 0xABCD, 5) == bytes.fromhex("03 06 1234 abcd 0005")


def test_reply_types_are_request_or_0x40():
    for request, reply in [(F.HELLO, F.HELLOOK), (F.CONNECT, F.CONNECTED), (F.BIND, F.BINDOK),
                           (F.SEND, F.SENT), (F.SENDOOB, F.SENTOOB), (F.CLOSE, F.CLOSED),
                           (F.ECHO, F.ECHOOK)]:
        assert F.reply_type(request) == reply == request | 0x40
    assert (F.HELLOOK, F.CONNECTED, F.SENT, F.CLOSED, F.ECHOOK) == (0x41, 0x42, 0x46, 0x48, 0x49)
    assert (F.NOOP, F.SETOPT, F.CRYPTON) == (0x00, 0x0A, 0x0C)
    assert F.type_name(F.SENT) == "SENT"
    assert F.type_name(0x5A) == "0x5a"


@pytest.mark.parametrize("ext", sorted(F.EXTENSION_TYPES))
def test_extension_types_cannot_be_mistaken_for_delegate_types(ext):
    low_nibbles = {t & 0x0F for t in F.DELEGATE_TYPES}
    assert ext not in F.DELEGATE_TYPES
    assert ext | F.REPLY_BIT not in F.DELEGATE_TYPES
    assert ext & 0xC0 == 0  # neither the reply bit nor the high bit
    assert ext & 0x0F not in low_nibbles
    assert F.OPT_EXTENSIONS not in (F.OPT_CONNDATA, F.OPT_PACKSIZE, F.OPT_AUTH, 0x01)


def test_encode_rejects_fields_out_of_range():
    with pytest.raises(LocalProtocolError):
        F.encode_header(F.SEND, 1, 2, 0x10000)
    with pytest.raises(LocalProtocolError):
        F.encode_header(F.SEND, 0x10000, 2, 0)
    with pytest.raises(LocalProtocolError):
        F.encode_header(0x100, 1, 2, 0)


# -- decoder -------------------------------------------------------------------------------------

@pytest.mark.parametrize("frame", [
    Frame(F.NOOP, 0, 0, b""),  # zero-length payload
    Frame(F.SEND, 0xFFFF, 0xFFFE, b"x"),  # max ids
    Frame(F.SEND, 0x0001, 0x00FF, bytes(range(256)) * 10),
    Frame(F.SEND, 7, 9, b"\0" * F.MAX_PAYLOAD),  # largest payload the length field allows
])
def test_round_trip(frame):
    raw = frame.encode()
    assert len(raw) == F.HEADER_SIZE + len(frame.payload)
    assert F.decode_all(raw) == [frame]


def test_truncated_header_waits_for_more():
    raw = F.encode_frame(F.ECHO, 0xFF, 0xFF, b"123\0")
    decoder = FrameDecoder()
    decoder.feed(raw[:7])
    assert decoder.next_frame() is None
    assert decoder.buffered == 7
    decoder.feed(raw[7:])
    assert decoder.next_frame() == Frame(F.ECHO, 0xFF, 0xFF, b"123\0")
    assert decoder.buffered == 0


def test_truncated_payload_waits_and_decode_all_refuses_it():
    raw = F.encode_frame(F.SEND, 1, 2, b"hello")
    decoder = FrameDecoder()
    decoder.feed(raw[:-1])
    assert decoder.next_frame() is None
    with pytest.raises(RemoteProtocolError, match="truncated"):
        F.decode_all(raw[:-1])


def test_one_byte_at_a_time_gives_the_same_frames():
    frames = [Frame(F.HELLO, 1, 2, b"x\0"), Frame(F.SEND, 3, 4, b"data" * 100),
              Frame(F.NOOP, 0, 0), Frame(F.CLOSE, 5, 6, b"DO close\0")]
    raw = b"".join(f.encode() for f in frames)
    decoder = FrameDecoder()
    out = []
    for i in range(len(raw)):
        decoder.feed(raw[i:i + 1])
        out.extend(decoder)
    assert out == frames


@pytest.mark.parametrize("version", [0x00, 0x02, 0x04, 0x13])
def test_bad_version_is_a_remote_error(version):
    decoder = FrameDecoder()
    decoder.feed(bytes([version]) + bytes(7))
    with pytest.raises(RemoteProtocolError, match="version"):
        decoder.next_frame()
    with pytest.raises(LocalProtocolError):  # a failed decoder is not reusable
        decoder.feed(b"\x03")


def test_encrypted_delegate_frame_is_named():
    decoder = FrameDecoder()
    decoder.feed(F.encode_frame(F.SEND, 1, 2, b"x", version=F.VERSION_ENCRYPTED))
    with pytest.raises(RemoteProtocolError, match="CRYPT"):
        decoder.next_frame()


def test_oversize_frame_refused_from_its_header_alone():
    decoder = FrameDecoder(limit=512)
    decoder.feed(F.encode_header(F.SEND, 1, 2, 512 - 8 + 1))  # no payload fed at all
    with pytest.raises(RemoteProtocolError, match="513 bytes exceeds"):
        decoder.next_frame()


def test_frame_exactly_at_the_limit_is_accepted():
    decoder = FrameDecoder(limit=512)
    decoder.feed(F.encode_frame(F.SEND, 1, 2, b"a" * (512 - 8)))
    assert len(decoder.next_frame().payload) == 504


def test_limit_applies_from_the_next_frame_on():
    raw = F.encode_frame(F.SEND, 1, 2, b"a" * 600) * 2
    decoder = FrameDecoder(limit=1000)
    decoder.feed(raw)
    assert decoder.next_frame() is not None
    decoder.limit = 512
    with pytest.raises(RemoteProtocolError):
        decoder.next_frame()


def test_buffer_holds_at_most_one_incomplete_frame_between_calls():
    limit = 1024
    frame = F.encode_frame(F.SEND, 1, 2, b"z" * 1000)
    decoder = FrameDecoder(limit)
    data = frame * 50 + frame[:-1]
    decoder.feed(data)
    assert len(list(decoder)) == 50
    assert decoder.buffered == len(frame) - 1 < limit
    assert len(decoder._buf) == decoder.buffered  # consumed bytes are released, not kept


def test_payload_is_independent_of_the_buffer():
    decoder = FrameDecoder()
    decoder.feed(F.encode_frame(F.SEND, 1, 2, b"abc"))
    frame = decoder.next_frame()
    decoder.feed(F.encode_frame(F.SEND, 1, 2, b"xyz"))
    decoder.next_frame()
    assert frame.payload == b"abc" and isinstance(frame.payload, bytes)


# -- texts ---------------------------------------------------------------------------------------

def test_hello_text_is_delegates_format():
    when = datetime(2026, 11, 21, 16, 16, 21, 514487)
    assert F.hello_payload(when, "vm") == b"20261121-161621.514487 vm\0"
    assert F.parse_hello(b"20261121-161621.514487 vm\0", 64) == "20261121-161621.514487 vm"


def test_connect_text_with_binary_first_data():
    first = b"\0\x01binary\0data"
    payload = F.connect_text("127.0.0.1:47980", "127.0.0.1:19024") + first
    assert payload.startswith(b"98304 127.0.0.1:47980 127.0.0.1:19024\0")
    addrs, data = F.parse_connect(payload, 512)
    assert (addrs.first, addrs.second, addrs.tag, data) == (
        "127.0.0.1:47980", "127.0.0.1:19024", 98304, first)


def test_connect_without_nul_or_first_data():
    addrs, data = F.parse_connect(b"98304 a:1 b:2", 512)
    assert (addrs.first, addrs.second, data) == ("a:1", "b:2", b"")


@pytest.mark.parametrize("payload", [b"98304 onlyone\0", b"\0", b"x a:1 b:2\0"])
def test_malformed_connect_text(payload):
    with pytest.raises(RemoteProtocolError):
        F.parse_connect(payload, 512)


@pytest.mark.parametrize("addr", ["", "has space:1", "nul\0:1", "é:1", "x" * 600])
def test_bad_local_address(addr):
    with pytest.raises(LocalProtocolError):
        F.connect_text(addr, "b:2")


@pytest.mark.parametrize("addr", ["", "a b:2", "tab\t:2", "del\x7f:2", "nul\0:2", "é:2"])
def test_bad_second_address_is_named(addr):
    with pytest.raises(LocalProtocolError, match="bad address"):
        F.connect_text("a:1", addr)


def test_connect_text_at_its_length_limit():
    room = 64 - len(f"{F.CONNECT_TAG}  b:2")  # what the first address may take
    text = F.connect_text("a" * room, "b:2", max_length=64)
    assert text == f"{F.CONNECT_TAG} {'a' * room} b:2\0".encode()
    assert len(text) == 65
    with pytest.raises(LocalProtocolError, match="CONNECT text longer than 64 bytes"):
        F.connect_text("a" * (room + 1), "b:2", max_length=64)


def test_text_longer_than_the_limit_is_refused():
    with pytest.raises(RemoteProtocolError, match="longer than 64"):
        F.split_c_string(b"x" * 65 + b"\0", 64)
    with pytest.raises(RemoteProtocolError):
        F.split_c_string(b"x" * 65, 64)  # and without NUL
    assert F.split_c_string(b"x" * 64 + b"\0rest", 64) == ("x" * 64, b"rest")


def test_counts_reasons_echo():
    assert F.count_payload(16376) == b"16376\0"
    assert F.parse_count(b"16376\0") == 16376
    for bad in (b"-1\0", b"\0", b"12a\0", b"99999999999\0"):
        with pytest.raises(RemoteProtocolError):
            F.parse_count(bad)
    assert F.reason_payload("No server") == b"No server\0"
    assert F.parse_reason(b"### Not Authenticated ###\0", 64) == "### Not Authenticated ###"
    assert F.echo_payload(-42) == b"-42\0"
    assert F.parse_echo(b"-42\0") == -42
    assert F.parse_echo(b"junk\0") is None


def test_setopt_packsize_conndata():
    assert F.setopt_payload(F.OPT_PACKSIZE, F.packsize_data(16384)) == b"\x03\x40\x00"
    assert F.parse_setopt(b"\x03\x40\x00") == (F.OPT_PACKSIZE, b"\x40\x00")
    assert F.parse_packsize(b"\x40\x00") == 16384
    assert F.parse_conndata(b"\x01\x00") is True
    assert F.parse_conndata(b"\x00") is False
    with pytest.raises(RemoteProtocolError):
        F.parse_setopt(b"")
    with pytest.raises(RemoteProtocolError):
        F.parse_packsize(b"\x40")
    with pytest.raises(RemoteProtocolError):
        F.parse_packsize(b"\x00\x10")  # 16 bytes: no room for anything


def test_c_string_refuses_what_it_cannot_carry():
    with pytest.raises(LocalProtocolError):
        F.c_string("a\0b")
    with pytest.raises(LocalProtocolError):
        F.c_string("ünïcode")
