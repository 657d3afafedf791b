"""Property-based tests (Hypothesis) of the ClientHello reader, :mod:`tcpmuxd.tcpmux.clienthello`.

The reader is driven as the daemon drives it (dispatch.py): it is shown everything that has
arrived since the connection started (a peek that consumes nothing), fed again only once
:attr:`HelloReader.wanted` bytes are there (the daemon sets SO_RCVLOWAT to it) or the client
has sent all it will, and the connection ends when everything was seen without a final event.

Real ClientHellos come from Python's ssl (MemoryBIO, no socket) for several names, TLS 1.2 and
1.3; Hypothesis re-cuts them into several handshake records, splits their arrival, and mutates
them. For any bytes in any split there is exactly one final event, the one :func:`parse` gives
for the whole input; a valid hello gives its name; nothing ever raises.

Deterministic and bounded for CI: ``derandomize=True``, no example database, a deadline per
example and a fixed number of examples.
"""

from __future__ import annotations

import ssl
from datetime import timedelta
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpmuxd.tcpmux.clienthello import (
    DECODE_ERROR,
    HANDSHAKE_FAILURE,
    MAX_RECORD_LENGTH,
    RECORD_HEADER,
    UNRECOGNIZED_NAME,
    BadHello,
    Event,
    HelloReader,
    ServerNameReceived,
    host_name_problem,
    parse,
)
from tcpmuxd.tcpmux.protocol import NeedData

pytestmark = pytest.mark.timeout(300)

PROPERTY_SETTINGS = settings(
    derandomize=True,
    database=None,
    max_examples=400,
    deadline=timedelta(milliseconds=1000),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NAMES = ["localhost", "www.example.com", "Mixed.Case.Example", "a", "xn--bcher-kva.example",
         "a-b.c-d.e", "x" * 63 + ".example", ".".join(["l" * 60] * 4)]
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@lru_cache(maxsize=None)
def real_hello(server_hostname: str | None, version: str) -> bytes:
    """The first flight of Python's TLS client for ``server_hostname`` (None: no SNI)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def handshake_of(hello: bytes) -> bytes:
    """The handshake bytes of a one-record hello (what Python's client sends)."""
    assert int.from_bytes(hello[3:5], "big") == len(hello) - RECORD_HEADER
    return hello[RECORD_HEADER:]


def records(handshake: bytes, cuts: list[int], version: bytes = b"\x03\x01") -> bytes:
    """``handshake`` in handshake records of the sizes ``cuts`` (the last takes the rest)."""
    out = bytearray()
    pos = 0
    for size in [*cuts, len(handshake)]:
        chunk = handshake[pos:pos + max(1, min(size, MAX_RECORD_LENGTH))]
        if not chunk:
            break
        out += b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        pos += len(chunk)
    return bytes(out)


def drive(data: bytes, sizes: list[int], max_size: int) -> list[Event]:
    """One connection as the daemon serves it: the events, the last one final."""
    reader = HelloReader(max_size)
    arrived = 0
    events: list[Event] = []
    for size in [*sizes, len(data)]:
        arrived = min(len(data), arrived + size)
        if arrived < reader.wanted and arrived < len(data):
            continue  # SO_RCVLOWAT: not woken yet
        peek = reader.peek_size()
        consume, event = reader.feed(data[:min(arrived, peek)])
        assert consume == 0, "the hello is the handler's: nothing is ever consumed"
        events.append(event)
        if not isinstance(event, NeedData):
            return events
        assert reader.wanted > min(arrived, peek), "woken again only when there is more"
        assert reader.wanted <= max_size
        if arrived == len(data):
            break  # woken by the client's FIN (POLLRDHUP) with the hello incomplete
    events.append(reader.eof())
    return events


def final_of(data: bytes, max_size: int) -> Event:
    """The reference: the final event for the whole input at once."""
    event, _wanted = parse(data, max_size)
    return HelloReader(max_size).eof() if isinstance(event, NeedData) else event


names = st.sampled_from(NAMES)
versions = st.sampled_from(sorted(VERSIONS))
cut_lists = st.lists(st.integers(1, 600), max_size=8)
splits = st.lists(st.integers(1, 300), max_size=20)
max_sizes = st.one_of(st.just(16384), st.integers(9, 2048))


@PROPERTY_SETTINGS
@given(data=st.one_of(st.binary(max_size=600), st.binary(max_size=600).map(
    lambda b: b"\x16\x03\x01" + b)), sizes=splits, max_size=max_sizes)
def test_arbitrary_bytes_give_one_final_event(data: bytes, sizes: list[int], max_size: int):
    events = drive(data, sizes, max_size)
    finals = [e for e in events if not isinstance(e, NeedData)]
    assert len(finals) == 1 and events[-1] is finals[0], events
    assert finals[0] == final_of(data, max_size)


@PROPERTY_SETTINGS
@given(name=names, version=versions, cuts=cut_lists, sizes=splits, rest=st.binary(max_size=40))
def test_real_hellos_give_their_name_however_cut_and_split(
        name: str, version: str, cuts: list[int], sizes: list[int], rest: bytes):
    data = records(handshake_of(real_hello(name, version)), cuts)
    events = drive(data + rest, sizes, 16384)
    assert events[-1] == ServerNameReceived(name, len(data))
    assert events[-1].key == name.lower()


@PROPERTY_SETTINGS
@given(name=names, version=versions, cuts=cut_lists,
       edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), min_size=1,
                      max_size=4),
       cut_at=st.one_of(st.none(), st.integers(0, 2000)), sizes=splits)
def test_mutated_hellos_never_crash(name: str, version: str, cuts: list[int],
                                    edits: list[tuple[int, int]], cut_at: int | None,
                                    sizes: list[int]):
    data = bytearray(records(handshake_of(real_hello(name, version)), cuts))
    for where, value in edits:
        data[where % len(data)] = value
    if cut_at is not None:
        del data[cut_at % len(data):]
    events = drive(bytes(data), sizes, 16384)
    assert events[-1] == final_of(bytes(data), 16384)
    if isinstance(events[-1], ServerNameReceived):
        assert host_name_problem(events[-1].name) is None


@pytest.mark.parametrize("version", sorted(VERSIONS))
@pytest.mark.parametrize("name", NAMES)
def test_real_hello(name: str, version: str):
    hello = real_hello(name, version)
    assert parse(hello) == (ServerNameReceived(name, len(hello)), len(hello))


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_no_server_name(version: str):
    event, _ = parse(real_hello(None, version))
    assert event == BadHello("no server name in the TLS ClientHello", HANDSHAKE_FAILURE)


def test_size_limit_edge():
    """Records taking exactly max_size bytes are read; one byte less of limit refuses them, as
    soon as the handshake header says so (before the rest has arrived)."""
    hello = records(handshake_of(real_hello("www.example.com", "1.3")), [100, 200])
    size = len(hello)
    assert parse(hello, size)[0] == ServerNameReceived("www.example.com", size)
    too_large = BadHello(f"TLS ClientHello too large (limit {size - 1} bytes)",
                         HANDSHAKE_FAILURE)
    assert parse(hello, size - 1)[0] == too_large
    # one record: known too large from the first 9 bytes
    single = records(handshake_of(real_hello("www.example.com", "1.3")), [])
    assert parse(single[:9], len(single) - 1)[0] == BadHello(
        f"TLS ClientHello too large (limit {len(single) - 1} bytes)", HANDSHAKE_FAILURE)
    assert parse(single[:9], len(single)) == (NeedData(), len(single))


@pytest.mark.parametrize("data, reason, alert", [
    (b"\x16\x03\x01\x00\x00", "empty TLS handshake record", DECODE_ERROR),
    (b"\x16\x02\x00\x00\x05", "not a TLS record: version 2.0", DECODE_ERROR),
    (b"\x16\x03\x01\x40\x01", "TLS record of 16385 bytes, over 2^14", 22),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "TLS handshake message of type 2, not a "
     "ClientHello", 10),
])
def test_malformed_records(data: bytes, reason: str, alert: int):
    assert parse(data) == (BadHello(reason, alert), len(data))


def test_bad_host_name_in_hello():
    """A host name that is not one (here with a space) is refused with unrecognized_name."""
    hello = bytearray(real_hello("www.example.com", "1.2"))
    at = hello.find(b"www.example.com")
    hello[at + 3] = ord(" ")
    event, _ = parse(bytes(hello))
    assert isinstance(event, BadHello) and event.alert == UNRECOGNIZED_NAME
    assert "bad server name" in event.reason


@pytest.mark.parametrize("name, ok", [
    ("example.com", True), ("a", True), ("x" * 63, True), ("x" * 64, False), ("-a.b", False),
    ("a-.b", False), ("a..b", False), ("", False), ("a_b", False), ("10.0.0.1", False),
    ("é.example", False), (".".join(["a" * 63] * 4)[:253], True),
    (".".join(["a" * 63] * 4), False),
])
def test_host_names(name: str, ok: bool):
    assert (host_name_problem(name) is None) is ok
