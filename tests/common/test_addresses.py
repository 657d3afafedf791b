"""Endpoint and address-list parsing (tcpmuxd/common/addresses.py)."""

from __future__ import annotations

import ipaddress

import pytest

import socket

from tcpmuxd.common.addresses import (
    AddressList,
    Endpoint,
    SocketAddress,
    addresses_of,
    host_port,
    ip_address_of,
    parse_endpoint,
    parse_listen,
    peer_host,
)

# --------------------------------------------------------------------------- parse_endpoint


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:80", Endpoint(host="127.0.0.1", port=80)),
        ("[::1]:80", Endpoint(host="::1", port=80)),
        ("[fe80::1%eth0]:22", Endpoint(host="fe80::1%eth0", port=22)),
        ("example.com:443", Endpoint(host="example.com", port=443)),
        ("localhost:1", Endpoint(host="localhost", port=1)),
        ("my_host.example.:65535", Endpoint(host="my_host.example.", port=65535)),
        ("unix:/run/x.sock", Endpoint(path="/run/x.sock")),
        ("unix:@abstract", Endpoint(path="\0abstract")),
    ],
)
def test_parse_endpoint_ok(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1:80", "[::1]:80", "[2001:db8::1]:8080", "unix:/run/x.sock", "unix:@abs", "h:1"],
)
def test_endpoint_str_round_trips(text: str) -> None:
    assert str(parse_endpoint(text)) == text
    assert parse_endpoint(str(parse_endpoint(text))) == parse_endpoint(text)


@pytest.mark.parametrize(
    "host, port, text",
    [("127.0.0.1", 80, "127.0.0.1:80"), ("::1", 80, "[::1]:80"),
     ("example.org", "1", "example.org:1"), ("fe80::1%lo", 22, "[fe80::1%lo]:22"),
     ("::1", None, "[::1]"), ("example.org", None, "example.org")],
)
def test_host_port_brackets_ipv6_only(host: str, port: int | str | None, text: str) -> None:
    assert host_port(host, port) == text


@pytest.mark.parametrize(
    "raw, shown",
    [("::ffff:192.0.2.1", "192.0.2.1"), ("fe80::1%2", "fe80::1"), ("::1", "::1"),
     ("::ffff:0:1", "::ffff:0:1"), ("192.0.2.1", "192.0.2.1")],
)
def test_peer_host_drops_scope_and_unmaps_ipv4(raw: str, shown: str) -> None:
    assert peer_host(raw) == shown


def test_socket_addresses_of_a_dual_stack_connection_show_ipv4_plainly() -> None:
    """What a [::] listener reports for an IPv4 client is written as IPv4 (logs, REMOTE_ADDR)."""
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = server.accept()
            with conn:
                remote, local = addresses_of(conn)
            client_port = client.getsockname()[1]
    assert remote == SocketAddress("127.0.0.1", client_port, "TCP")
    assert str(local) == f"127.0.0.1:{port}"
    assert str(SocketAddress("::1", 5, "TCP", tunnel="t")) == "[::1]:5 via t"


def test_endpoint_properties() -> None:
    assert parse_endpoint("unix:/a").is_unix
    assert not parse_endpoint("unix:/a").is_abstract
    assert parse_endpoint("unix:@a").is_abstract
    assert not parse_endpoint("1.2.3.4:5").is_unix


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty address"),
        ("127.0.0.1:70000", "port 70000 out of range 1-65535"),
        ("127.0.0.1:0", "port 0 out of range 1-65535"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:", "missing port"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("80", "expected HOST:PORT"),
        (":80", "missing host"),
        ("::1:80", "IPv6 addresses must be written in brackets"),
        ("[::1:80", "missing ']'"),
        ("[::1]80", "expected ':PORT'"),
        ("[nothex::1]:80", "not a valid IPv6 address"),
        ("[1.2.3.4]:80", "not a valid IPv6 address"),
        ("999.1.1.1:80", "not a valid IPv4 address"),
        ("bad host:80", "contains whitespace"),
        ("-bad-.example:80", "not a valid host name"),
        ("unix:relative.sock", "unix socket path must be absolute"),
        ("unix:", "unix socket path must be absolute"),
        ("unix:@", "abstract unix socket name is empty"),
        ("unix:/" + "x" * 107, "unix socket path too long (108 bytes, limit 107)"),
        ("/run/x.sock", "write unix sockets as unix:/run/x.sock"),
        ("127.0.0.1:-1", "is not a number"),
        ("127.0.0.1:٣", "is not a number"),  # non-ASCII digit
    ],
)
def test_parse_endpoint_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_endpoint(text)
    assert message in str(info.value)


def test_unix_path_limit_edge() -> None:
    assert parse_endpoint("unix:/" + "x" * 106).path == "/" + "x" * 106
    assert parse_endpoint("unix:@" + "x" * 106).path == "\0" + "x" * 106
    with pytest.raises(ValueError, match="too long"):
        parse_endpoint("unix:@" + "x" * 107)


def test_allow_flags() -> None:
    with pytest.raises(ValueError, match="unix sockets are not allowed here"):
        parse_endpoint("unix:/x", allow_unix=False)
    with pytest.raises(ValueError, match="expected unix:PATH"):
        parse_endpoint("1.2.3.4:5", allow_tcp=False)
    assert parse_endpoint("unix:/x", allow_tcp=False) == Endpoint(path="/x")


def test_default_host() -> None:
    assert parse_endpoint("8080", default_host="127.0.0.1") == Endpoint("127.0.0.1", 8080)
    assert parse_endpoint(":8080", default_host="::1") == Endpoint("::1", 8080)
    assert parse_endpoint("h:1", default_host="x") == Endpoint("h", 1)
    with pytest.raises(ValueError, match="out of range"):
        parse_endpoint("0", default_host="127.0.0.1")


# --------------------------------------------------------------------------- parse_listen


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", Endpoint("::", 1)),
        (":1", Endpoint("::", 1)),
        ("0", Endpoint("::", 0)),
        ("127.0.0.1:0", Endpoint("127.0.0.1", 0)),
        ("[::]:1", Endpoint("::", 1)),
        ("[::1]:65535", Endpoint("::1", 65535)),
        ("0.0.0.0:1", Endpoint("0.0.0.0", 1)),
    ],
)
def test_parse_listen(text: str, expected: Endpoint) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty listen address"),
        ("65536", "port 65536 out of range 0-65535"),
        ("unix:/x", "not a unix socket"),
        ("::1:1", "brackets"),
        ("1.2.3.4", "expected HOST:PORT"),
        ("x y:1", "whitespace"),
    ],
)
def test_parse_listen_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_listen(text)
    assert message in str(info.value)


# --------------------------------------------------------------------------- AddressList


def test_keywords_have_systemds_meaning() -> None:
    expected = {
        "any": {"0.0.0.0/0", "::/0"},
        "localhost": {"127.0.0.0/8", "::1/128"},
        "link-local": {"169.254.0.0/16", "fe80::/64"},
        "multicast": {"224.0.0.0/4", "ff00::/8"},
    }
    for keyword, networks in expected.items():
        assert {str(n) for n in AddressList.parse([keyword])} == networks


@pytest.mark.parametrize(
    "items, inside, outside",
    [
        (["any"], ["1.2.3.4", "::1", "::ffff:8.8.8.8", "fe80::1%eth0"], ["not-an-ip", ""]),
        (
            ["localhost"],
            ["127.0.0.1", "127.255.255.254", "::1", "::ffff:127.0.0.1"],
            ["128.0.0.1", "::2"],
        ),
        (
            ["link-local"],
            ["169.254.1.1", "fe80::1", "fe80::1%lo"],
            ["169.255.0.1", "fe80:0:0:1::1"],
        ),
        (
            ["multicast"],
            ["224.0.0.1", "239.255.255.255", "ff02::1"],
            ["223.255.255.255", "fe00::1"],
        ),
        (
            ["10.0.0.0/8"],
            ["10.1.2.3", "::ffff:10.1.2.3", "[::ffff:10.0.0.1]"],
            ["11.0.0.1", "::a00:1"],
        ),
        (["192.0.2.7"], ["192.0.2.7"], ["192.0.2.8"]),
        (["2001:db8::/32"], ["2001:db8::1", "2001:db8:ffff::1"], ["2001:db9::1", "10.0.0.1"]),
        (["::ffff:10.0.0.0/104"], ["10.2.3.4", "::ffff:10.2.3.4"], ["11.0.0.0"]),
        (["10.1.2.3/8"], ["10.200.0.1"], ["11.0.0.1"]),  # host bits masked, as systemd does
        (["localhost.", "foo.localhost"], ["127.0.0.1"], ["10.0.0.1"]),
    ],
)
def test_membership(items: list[str], inside: list[str], outside: list[str]) -> None:
    acl = AddressList.parse(items)
    for addr in inside:
        assert addr in acl, addr
    for addr in outside:
        assert addr not in acl, addr


def test_membership_of_address_objects() -> None:
    acl = AddressList.parse(["127.0.0.0/8"])
    assert ipaddress.IPv4Address("127.0.0.1") in acl
    assert ipaddress.IPv6Address("::ffff:127.0.0.1") in acl
    assert ipaddress.IPv6Address("fe80::1%eth0") in AddressList.parse(["link-local"])
    assert 1234 not in acl
    assert None not in acl


def test_several_words_per_item_and_dedup() -> None:
    acl = AddressList.parse(["10.0.0.0/8 192.168.0.0/16", "10.0.0.0/8"])
    assert len(acl) == 2
    assert str(acl) == "10.0.0.0/8 192.168.0.0/16"
    assert "192.168.1.1" in acl


def test_str_keeps_keywords_and_bool() -> None:
    acl = AddressList.parse(["localhost", "10.0.0.0/8"])
    assert str(acl) == "localhost 10.0.0.0/8"
    assert acl
    assert not AddressList.parse([])
    assert not AddressList()
    assert str(AddressList()) == ""


def test_equality_and_hash() -> None:
    a = AddressList.parse(["localhost"])
    b = AddressList.parse(["127.0.0.0/8", "::1"])
    assert a == b and hash(a) == hash(b)
    assert a != AddressList.parse(["any"])


@pytest.mark.parametrize(
    "item, message",
    [
        ("everything", "'everything' is not an IP address"),
        ("10.0.0.0/33", "bad prefix length"),
        ("Localhost-ish", "is not an IP address"),
        ("ANY", "is not an IP address"),  # keywords are case-sensitive in systemd
        ("fe80::1%eth0", "scoped addresses"),
        ("1.2.3", "is not an IP address"),
    ],
)
def test_bad_items(item: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        AddressList.parse(["10.0.0.1", item])
    assert message in str(info.value)


def test_ip_address_of_normalises() -> None:
    assert ip_address_of("::ffff:1.2.3.4") == ipaddress.IPv4Address("1.2.3.4")
    assert ip_address_of("1.2.3.4") == ipaddress.IPv4Address("1.2.3.4")
    assert ip_address_of("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")
    assert ip_address_of("[::1]") == ipaddress.IPv6Address("::1")
    assert ip_address_of("/run/x.sock") is None
    assert ip_address_of(None) is None
