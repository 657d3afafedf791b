"""The RFC 1078 handshake rules, without sockets."""

from __future__ import annotations

import pytest

from tcpmuxd.tcpmux import protocol
from tcpmuxd.tcpmux.protocol import (BadName, HelpRequested, NameReader, NameReceived, NeedData, Reply,
                              ReplyError, ReplyReader)


def feed_all(reader: NameReader, stream: bytes, chunk: int = 1 << 20) -> tuple[int, object]:
    """Feed like the daemon does: peek what is there, consume what the reader says."""
    pos = 0
    while True:
        available = stream[pos:pos + min(chunk, reader.peek_size())]
        consume, event = reader.feed(available)
        assert consume <= len(available)
        pos += consume
        if not isinstance(event, NeedData):
            return pos, event
        if pos >= len(stream):
            return pos, event


@pytest.mark.parametrize("line", [b"echo\r\n", b"echo\n", b"  echo \t\r\n"])
def test_name_line_endings_and_blanks(line):
    consumed, event = feed_all(NameReader(), line)
    assert event == NameReceived("echo")
    assert consumed == len(line)


def test_bytes_after_the_name_are_never_consumed():
    stream = b"echo\r\nPAYLOAD that belongs to the handler"
    consumed, event = feed_all(NameReader(), stream)
    assert event == NameReceived("echo")
    assert stream[consumed:] == b"PAYLOAD that belongs to the handler"


def test_split_name_one_byte_at_a_time():
    stream = b"Some-Service\r\nrest"
    consumed, event = feed_all(NameReader(), stream, chunk=1)
    assert event == NameReceived("Some-Service")
    assert stream[consumed:] == b"rest"


def test_case_insensitive_key():
    assert NameReceived("EcHo").key == "echo"
    assert protocol.name_key("ECHO") == protocol.name_key("echo")


@pytest.mark.parametrize("line", [b"HELP\r\n", b"help\n", b"Help\r\n"])
def test_help(line):
    assert feed_all(NameReader(), line)[1] == HelpRequested()


def test_name_at_limit_accepted_and_one_over_refused():
    limit = 10
    assert feed_all(NameReader(limit), b"a" * limit + b"\r\n")[1] == NameReceived("a" * limit)
    event = feed_all(NameReader(limit), b"a" * (limit + 1) + b"\r\n")[1]
    assert isinstance(event, BadName) and "too long (limit 10 bytes)" in event.reason


def test_endless_line_refused_without_unbounded_buffering():
    reader = NameReader(10)
    consumed, event = feed_all(reader, b"x" * 10_000, chunk=3)
    assert isinstance(event, BadName) and "too long" in event.reason
    assert consumed <= reader.line_limit + 3


def test_peek_size_sees_an_overlong_line_at_once():
    reader = NameReader(10)
    size = reader.peek_size()
    consumed, event = reader.feed(b"y" * size)
    assert isinstance(event, BadName)


@pytest.mark.parametrize("line,reason", [
    (b"\r\n", "empty service name"),
    (b"   \n", "empty service name"),
    (b"ec ho\r\n", "bad characters"),
    (b"ech\xc3\xb6\r\n", "bad characters"),
    (b"a\rb\r\n", "bad characters"),
    (b"nul\x00\r\n", "bad characters"),
])
def test_bad_names_have_specific_reasons(line, reason):
    event = feed_all(NameReader(), line)[1]
    assert isinstance(event, BadName) and reason in event.reason


def test_eof_and_timeout_reasons_say_what_was_missing():
    reader = NameReader()
    assert "before a service name" in reader.eof().reason
    reader = NameReader()
    reader.feed(b"ec")
    assert "before end of service name line" in reader.eof().reason
    assert "timed out waiting for service name" == NameReader().timeout().reason
    reader = NameReader()
    reader.feed(b"ec")
    assert "end of service name line" in reader.timeout().reason


def test_reader_refuses_feeding_after_final_event():
    reader = NameReader()
    reader.feed(b"x\n")
    with pytest.raises(RuntimeError):
        reader.feed(b"y\n")


def test_reply_lines_are_exact():
    assert protocol.positive() == b"+\r\n"
    assert protocol.positive("Go") == b"+Go\r\n"
    assert protocol.negative("unknown service x") == b"-unknown service x\r\n"


def test_reply_message_cannot_break_framing():
    line = protocol.negative("evil\r\n+injected\x00\xff")
    assert line.count(b"\r\n") == 1 and line.endswith(b"\r\n")
    assert line.startswith(b"-evil??+injected")
    assert len(protocol.negative("x" * 5000)) <= protocol.MAX_REPLY_LENGTH


def test_help_listing_one_name_per_crlf_line():
    assert protocol.help_listing(["a", "B"]) == b"a\r\nB\r\n"
    assert protocol.help_listing([]) == b""


def test_is_valid_name():
    assert protocol.is_valid_name("SRI-NIC.foo/2")
    assert not protocol.is_valid_name("")
    assert not protocol.is_valid_name("a b")
    assert not protocol.is_valid_name("x" * 257)
    assert protocol.is_valid_name("x" * 5, max_length=5)


def test_reply_reader_positive_with_surplus():
    r = ReplyReader()
    assert r.feed(b"+G") is None
    assert r.feed(b"o\r\nservice bytes") == Reply(True, "Go", b"service bytes")


def test_reply_reader_negative_and_bare_lf():
    assert ReplyReader().feed(b"-no such service\n") == Reply(False, "no such service", b"")


@pytest.mark.parametrize("data", [b"HTTP/1.0 200 OK\r\n", b"\x00+\r\n", b"x"])
def test_reply_reader_rejects_non_replies(data):
    with pytest.raises(ReplyError):
        ReplyReader().feed(data)


def test_reply_reader_line_limit_and_eof():
    r = ReplyReader()
    with pytest.raises(ReplyError, match="too long"):
        r.feed(b"+" + b"x" * (protocol.MAX_REPLY_LENGTH + 1))
    assert "without a reply" in str(ReplyReader().eof())
    r = ReplyReader()
    r.feed(b"+partial")
    assert "middle of the reply" in str(r.eof())
