"""Property-based tests (Hypothesis) of the TCPMUX name reader, :class:`protocol.NameReader`.

The reader is driven exactly as the daemon drives it (dispatch.py, inetd.py): it is shown what a
``recv(peek_size(), MSG_PEEK)`` would return from the bytes that have arrived so far, the caller
takes off the connection exactly the ``consume`` bytes it names, and when everything the client
sent has been seen without a final event the connection ends (:meth:`NameReader.eof`). The
client's bytes and the way they are split into arrivals are Hypothesis' to choose.

For any bytes, in any split, the reader must give exactly one final event, and that event must
not depend on the split (it is what :func:`expected_event` computes from the whole input at
once); it must never take a byte past the first line end, must take the whole line when it
accepts a name (the bytes behind it are the handler's), and must never hold more than
``line_limit`` bytes.

Deterministic and bounded for CI: ``derandomize=True`` (the examples are a function of the test,
the same on every run), no example database, a deadline per example and a fixed number of
examples.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpmuxd.tcpmux.protocol import BadName, Event, HelpRequested, NameReader, NameReceived, NeedData

pytestmark = pytest.mark.timeout(120)

PROPERTY_SETTINGS = settings(
    derandomize=True,
    database=None,
    max_examples=1000,
    deadline=timedelta(milliseconds=500),
    suppress_health_check=[HealthCheck.too_slow],
)

#: Pieces that make the interesting inputs likely: names, blanks around them, both line ends,
#: HELP in any case, bytes that are not visible ASCII, runs long enough to cross the limits.
PIECES = [b"a", b"Z", b"-", b"echo", b"HeLp", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00",
          b"\x7f", b"\xff", b"\xc3\xa9", b"x" * 7, b" " * 9, b"y" * 40, b"z" * 255]

byte_strings = st.one_of(
    st.binary(max_size=700),
    st.lists(st.sampled_from(PIECES), max_size=40).map(b"".join),
)
max_lengths = st.one_of(st.integers(1, 48), st.just(256))
#: How the client's bytes arrive: the sizes of successive arrivals (the last one takes the rest).
splits = st.lists(st.integers(1, 80), max_size=30)


def expected_event(data: bytes, reader: NameReader) -> Event:
    """The final event for ``data`` as a whole, whatever the split: the reference rules."""
    limit = reader.line_limit
    end = data.find(b"\n")
    if 0 <= end < limit:
        return NameReader(reader.max_length)._parse(data[: end + 1])
    if end >= limit or len(data) >= limit:
        return BadName(f"service name too long (limit {reader.max_length} bytes)")
    if data:
        return BadName("connection closed before end of service name line")
    return BadName("connection closed before a service name was sent")


def drive(data: bytes, sizes: list[int], max_length: int) -> tuple[int, list[Event], NameReader]:
    """Run one connection: (bytes consumed, every event, the reader)."""
    reader = NameReader(max_length)
    arrived, consumed = 0, 0
    events: list[Event] = []
    arrivals = [*sizes, len(data)]  # whatever is left arrives last
    for size in arrivals:
        arrived = min(len(data), arrived + size)
        while consumed < arrived:  # the socket is readable: peek, then consume
            peek = reader.peek_size()
            assert peek >= 1
            available = data[consumed:min(arrived, consumed + peek)]
            consume, event = reader.feed(available)
            assert 0 <= consume <= len(available)
            assert reader.held <= reader.line_limit, (reader.held, reader.line_limit)
            consumed += consume
            events.append(event)
            if not isinstance(event, NeedData):
                return consumed, events, reader
            assert consume == len(available), "NeedData must take what it was shown"
    events.append(reader.eof())  # the client sent all it had and closed
    return consumed, events, reader


@PROPERTY_SETTINGS
@given(data=byte_strings, sizes=splits, max_length=max_lengths)
def test_one_final_event_whatever_the_split(data: bytes, sizes: list[int], max_length: int):
    consumed, events, reader = drive(data, sizes, max_length)
    finals = [e for e in events if not isinstance(e, NeedData)]
    assert len(finals) == 1 and events[-1] is finals[0], events
    assert finals[0] == expected_event(data, reader)
    with pytest.raises(RuntimeError):
        reader.feed(b"x")  # after a final event the reader refuses to be fed


@PROPERTY_SETTINGS
@given(data=byte_strings, sizes=splits, max_length=max_lengths)
def test_never_consumes_past_the_line(data: bytes, sizes: list[int], max_length: int):
    consumed, events, reader = drive(data, sizes, max_length)
    end = data.find(b"\n")
    if end >= 0:
        assert consumed <= end + 1, (consumed, end)
    if isinstance(events[-1], (NameReceived, HelpRequested)):
        # exactly the line: what follows it is the handler's, untouched
        assert consumed == end + 1
        assert data[consumed:] == data[end + 1:]
    assert consumed <= reader.line_limit


@PROPERTY_SETTINGS
@given(name=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                    min_size=1, max_size=60),
       before=st.text(" \t", max_size=8), after=st.text(" \t", max_size=8),
       cr=st.booleans(), rest=st.binary(max_size=64), sizes=splits)
def test_valid_names_are_received_and_the_rest_left(name: str, before: str, after: str,
                                                    cr: bool, rest: bytes, sizes: list[int]):
    line = (before + name + after).encode() + (b"\r\n" if cr else b"\n")
    consumed, events, _reader = drive(line + rest, sizes, 60)
    expected = HelpRequested() if name.lower() == "help" else NameReceived(name)
    assert events[-1] == expected
    assert consumed == len(line)


@PROPERTY_SETTINGS
@given(max_length=st.integers(1, 300), extra=st.integers(0, 3), sizes=splits)
def test_line_limit_edge(max_length: int, extra: int, sizes: list[int]):
    """A line of exactly ``line_limit`` bytes is judged by its content, one byte more is too long
    (here the name itself is at its limit and the rest is blanks)."""
    reader = NameReader(max_length)
    filler = reader.line_limit - max_length - 2 + extra
    line = b"n" * max_length + b" " * filler + b"\r\n"
    _consumed, events, _reader = drive(line + b"after", sizes, max_length)
    if extra == 0:
        assert events[-1] == NameReceived("n" * max_length)
    else:
        assert events[-1] == BadName(f"service name too long (limit {max_length} bytes)")
