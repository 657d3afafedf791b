"""Endpoints and address lists, as written in service files and on the command line.

Shared by tcpmuxd (``Forward=``, ``PassTo=``, ``--listen``, ``IPAddressAllow=``) and sockmuxd, so
the two spell addresses the same way. Everything here is pure parsing: nothing is resolved or
bound, a host name stays a name until the caller connects.

Spelling (the one systemd and most daemons use):

* ``HOST:PORT`` for TCP, where HOST is an IPv4 address or a DNS name, ``[V6]:PORT`` for IPv6
  (brackets are required: ``::1:80`` is ambiguous);
* ``unix:/absolute/path`` for a unix socket, ``unix:@name`` for a Linux abstract socket.

Errors are :class:`ValueError` with a message meant for the user, because these strings end up
verbatim in ``tcpmuxd --check`` output and in the journal.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "AddressList",
    "Endpoint",
    "SocketAddress",
    "addresses_of",
    "host_port",
    "ip_address_of",
    "is_host_name",
    "parse_endpoint",
    "parse_listen",
    "peer_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: ``sizeof(sun_path)`` on Linux is 108; one byte is kept for the terminating NUL that
#: filesystem paths need (and that abstract names do not have, but their leading NUL uses it).
UNIX_PATH_MAX = 107

# RFC 1123 host names; underscores are tolerated because they exist in the wild (and in
# /etc/hosts), a trailing dot is allowed (fully qualified).
_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def host_port(host: str, port: int | str | None = None) -> str:
    """``HOST:PORT`` as the project writes it everywhere: an IPv6 address in brackets
    (``[V6]:PORT``), so that its colons do not run into the port's. Without ``port``, the host
    alone as it stands before ``:PORT`` (``[V6]``), for messages that name the port apart."""
    text = f"[{host}]" if ":" in host else host
    return text if port is None else f"{text}:{port}"


def peer_host(host: str) -> str:
    """A peer's address as a socket reports it, in the form logs and handlers show: without an
    IPv6 ``%scope``, and an IPv4-mapped address (a dual-stack ``[::]`` listener's IPv4 client)
    as the plain IPv4 address."""
    host = host.partition("%")[0]
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def is_host_name(text: str) -> bool:
    """Whether ``text`` is a host name as HOST may be written (RFC 1123, see above)."""
    return len(text) <= 253 and _HOSTNAME.fullmatch(text) is not None


@dataclass(frozen=True)
class Endpoint:
    """Where to connect or listen: a TCP ``host``/``port`` or a unix socket ``path``.

    ``host`` holds IPv6 addresses without brackets; ``path`` holds abstract socket names with
    their leading NUL (``"\\0name"``), which is exactly what :func:`socket.socket.connect`
    takes. :meth:`__str__` gives back the configured spelling.
    """

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def is_abstract(self) -> bool:
        """A Linux abstract socket (no file on disk, no file permissions guarding it)."""
        return self.path is not None and self.path.startswith("\0")

    def __str__(self) -> str:
        if self.path is not None:
            if self.path.startswith("\0"):
                return "unix:@" + self.path[1:]
            return "unix:" + self.path
        return host_port(self.host or "", self.port)


def _parse_port(text: str, *, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not text:
        raise ValueError("missing port number")
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not low <= port <= 65535:
        raise ValueError(f"port {port} out of range {low}-65535")
    return port


def _parse_host(text: str) -> str:
    """Validate a host as written before ``:PORT``; returns it without brackets."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise ValueError(f"missing ']' after IPv6 address in {text!r}")
        inner = text[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{inner!r} is not a valid IPv6 address") from None
        return inner
    if ":" in text:
        raise ValueError(f"IPv6 addresses must be written in brackets, e.g. [{text}]:PORT")
    if not text:
        raise ValueError("missing host")
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", text):
        raise ValueError(f"{text!r} is not a valid IPv4 address")
    if not is_host_name(text):
        raise ValueError(f"{text!r} is not a valid host name or address")
    return text


def _parse_unix(rest: str) -> Endpoint:
    if "\0" in rest:
        raise ValueError("unix socket path contains a NUL byte")
    if rest.startswith("@"):
        name = rest[1:]
        if not name:
            raise ValueError("abstract unix socket name is empty")
        path = "\0" + name
    elif not rest.startswith("/"):
        raise ValueError(f"unix socket path must be absolute, got {rest!r}")
    else:
        path = rest
    size = len(path.encode("utf-8", "surrogateescape"))
    if size > UNIX_PATH_MAX:
        raise ValueError(f"unix socket path too long ({size} bytes, limit {UNIX_PATH_MAX})")
    return Endpoint(path=path)


def _parse_tcp(text: str, *, default_host: str | None, allow_zero: bool) -> Endpoint:
    if default_host is not None:
        if text.isascii() and text.isdigit():
            return Endpoint(host=default_host, port=_parse_port(text, allow_zero=allow_zero))
        if text.startswith(":") and ":" not in text[1:]:
            return Endpoint(host=default_host, port=_parse_port(text[1:], allow_zero=allow_zero))
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"missing ']' after IPv6 address in {text!r}")
        host_text, sep, port_text = (
            text[: close + 1],
            text[close + 1 : close + 2],
            text[close + 2 :],
        )
        if sep != ":":
            raise ValueError(f"expected ':PORT' after {host_text!r}")
    else:
        host_text, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = _parse_host(host_text)
    return Endpoint(host=host, port=_parse_port(port_text, allow_zero=allow_zero))


def parse_endpoint(
    text: str,
    *,
    allow_unix: bool = True,
    allow_tcp: bool = True,
    default_host: str | None = None,
) -> Endpoint:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH`` (``unix:@NAME`` for abstract).

    ``:PORT`` and a bare ``PORT`` mean ``default_host`` and are only accepted when one is given.
    Port 0 is refused: it is only meaningful for listening (see :func:`parse_listen`).
    """
    if not text:
        raise ValueError("empty address")
    if any(c.isspace() for c in text):
        raise ValueError(f"address {text!r} contains whitespace")
    if text.startswith("unix:"):
        if not allow_unix:
            raise ValueError(f"unix sockets are not allowed here, expected HOST:PORT, got {text!r}")
        return _parse_unix(text[len("unix:") :])
    if not allow_tcp:
        raise ValueError(f"expected unix:PATH, got {text!r}")
    if text.startswith("/") or text.startswith("@"):
        raise ValueError(f"write unix sockets as unix:{text}")
    return _parse_tcp(text, default_host=default_host, allow_zero=False)


def parse_listen(text: str) -> Endpoint:
    """Parse a ``--listen`` value: ``ADDR:PORT``, ``[V6]:PORT``, or ``PORT`` alone.

    A bare ``PORT`` (or ``:PORT``) means ``[::]``, which the caller binds dual-stack (IPv4 and
    IPv6, as systemd's ``ListenStream=PORT``). Port 0 asks the kernel for a free port, which tests
    use.
    """
    if not text:
        raise ValueError("empty listen address")
    if any(c.isspace() for c in text):
        raise ValueError(f"listen address {text!r} contains whitespace")
    if text.startswith("unix:"):
        raise ValueError(f"--listen takes ADDR:PORT or PORT, not a unix socket: {text!r}")
    return _parse_tcp(text, default_host="::", allow_zero=True)


def _is_localhost(word: str) -> bool:
    """systemd's ``is_localhost()``: the names it treats as the loopback keyword."""
    name = word.lower()
    if name.endswith("."):
        name = name[:-1]
    return name in ("localhost", "localhost.localdomain") or name.endswith(
        (".localhost", ".localhost.localdomain")
    )


# The keywords of systemd's IPAddressAllow=/IPAddressDeny= (src/shared/in-addr-prefix-util.c).
_KEYWORDS: dict[str, tuple[str, ...]] = {
    "any": ("0.0.0.0/0", "::/0"),
    "localhost": ("127.0.0.0/8", "::1/128"),
    "link-local": ("169.254.0.0/16", "fe80::/64"),
    "multicast": ("224.0.0.0/4", "ff00::/8"),
}


def _parse_item(word: str) -> tuple[IPNetwork, ...]:
    if word in _KEYWORDS:
        return tuple(ipaddress.ip_network(n) for n in _KEYWORDS[word])
    if _is_localhost(word):
        return _parse_item("localhost")
    if "%" in word:
        raise ValueError(
            f"{word!r}: scoped addresses (%interface) are not supported in address lists"
        )
    try:
        # strict=False: like systemd, host bits below the prefix are masked off, not refused.
        return (ipaddress.ip_network(word, strict=False),)
    except ValueError:
        pass
    hint = ""
    if "/" in word:
        hint = " (bad prefix length?)"
    raise ValueError(
        f"{word!r} is not an IP address, network (ADDRESS/PREFIXLEN) or one of "
        f"any, localhost, link-local, multicast{hint}"
    )


def ip_address_of(addr: object) -> IPAddress | None:
    """The peer's IP address in one canonical form, or ``None`` when ``addr`` is not an IP.

    An IPv6 ``%scope`` is dropped and an IPv4-mapped IPv6 address (what a dual-stack ``[::]``
    listener reports for IPv4 clients) becomes the IPv4 address, so per-source counting and
    access checks see one client as one source whichever socket it came in on.
    """
    ip = _as_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _as_address(addr: object) -> IPAddress | None:
    """Parse a peer address, dropping an IPv6 ``%scope``; ``None`` when it is not an IP."""
    if isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
            return ipaddress.IPv6Address(str(addr).split("%", 1)[0])
        return addr
    if not isinstance(addr, str):
        return None
    text = addr.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _equivalents(ip: IPAddress) -> Iterator[IPAddress]:
    """``ip`` and its other spelling across families: a dual-stack ``[::]`` listener reports
    IPv4 peers as ``::ffff:a.b.c.d``, which must match ``127.0.0.0/8`` as the plain form does."""
    yield ip
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            yield ip.ipv4_mapped
    else:
        yield ipaddress.IPv6Address("::ffff:" + str(ip))


class AddressList:
    """A set of networks in the sense of systemd's ``IPAddressAllow=``/``IPAddressDeny=``.

    Immutable and hashable (it is a field of the frozen ``Service``). ``str()`` shows the items
    as written (keywords stay keywords) so the ``--check`` table reads like the file.
    """

    __slots__ = ("_items", "_networks")

    def __init__(self, networks: Iterable[IPNetwork] = (), items: Iterable[str] | None = None):
        nets: list[IPNetwork] = []
        for net in networks:
            if net not in nets:
                nets.append(net)
        self._networks: tuple[IPNetwork, ...] = tuple(nets)
        self._items: tuple[str, ...] = (
            tuple(items) if items is not None else tuple(str(n) for n in self._networks)
        )

    @classmethod
    def parse(cls, items: Iterable[str]) -> AddressList:
        """Each item is a CIDR network, a bare address or a keyword (any, localhost, link-local,
        multicast). An item may hold several whitespace-separated words, as one systemd
        assignment does. Raises :class:`ValueError` naming the first bad word."""
        networks: list[IPNetwork] = []
        shown: list[str] = []
        for item in items:
            for word in item.split():
                networks.extend(_parse_item(word))
                if word not in shown:
                    shown.append(word)
        return cls(networks, shown)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self._networks

    def __contains__(self, addr: object) -> bool:
        ip = _as_address(addr)
        if ip is None:
            return False
        for candidate in _equivalents(ip):
            for net in self._networks:
                if net.version == candidate.version and candidate in net:
                    return True
        return False

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self._networks)

    def __len__(self) -> int:
        return len(self._networks)

    def __str__(self) -> str:
        return " ".join(self._items)

    def __repr__(self) -> str:
        return f"AddressList.parse({list(self._items)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AddressList):
            return NotImplemented
        return set(self._networks) == set(other._networks)

    def __hash__(self) -> int:
        return hash(frozenset(self._networks))


@dataclass(frozen=True)
class SocketAddress:
    """One end of a connection as handlers and logs name it (IPv4-mapped IPv6 shown as IPv4).

    A stream that came through a SockMux tunnel (sockmuxd's ``tcpmux`` exit) has ``tunnel``
    set to the tunnel's name: ``host`` and ``port`` are then the far client as the tunnel's
    peer reported it (``authenticated``: whether that peer proved who it is), an address of
    the far side's networks, never one of ours (config.Service.refusal).
    """

    host: str
    port: int
    family: str  # "TCP" or "UNIX"
    tunnel: str | None = None
    authenticated: bool = True

    def __str__(self) -> str:
        if self.family == "UNIX":
            return "unix"
        text = host_port(self.host, self.port)
        return text if self.tunnel is None else f"{text} via {self.tunnel}"

    @property
    def source(self) -> str:
        """The client as per-source limits count it: the far side's 127.0.0.1 is not ours."""
        return self.host if self.tunnel is None else f"{self.host} via {self.tunnel}"


def _address(family: int, raw: object) -> SocketAddress:
    if family == socket.AF_UNIX:
        return SocketAddress("", 0, "UNIX")
    return SocketAddress(peer_host(raw[0]), raw[1], "TCP")  # type: ignore[index]


def addresses_of(sock: socket.socket) -> tuple[SocketAddress, SocketAddress]:
    """(remote, local) of a connected socket; raises OSError when the peer is already gone."""
    return _address(sock.family, sock.getpeername()), _address(sock.family, sock.getsockname())
