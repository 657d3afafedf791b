"""Tunnel files (tcpmuxd/sockmux/tunnel.py), with real files in tmp_path.

(Test modules are imported by their base name, there being no __init__.py files: every test
file's name is unique across tests/, as every module's name is across the package.)
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest
from privileges import as_nobody

from tcpmuxd.common.addresses import Endpoint
from tcpmuxd.sockmux import SockMuxConfig
from tcpmuxd.sockmux.check import format_tunnel
from tcpmuxd.sockmux.tunnel import (
    SEARCH_PATH,
    Entrance,
    Exit,
    TLSSettings,
    Tunnel,
    TunnelConfigError,
    load_tunnel,
    parse_entrance,
    parse_exit,
    read_secret,
)

CAT = "/bin/cat"  # an executable that exists everywhere the tests run
SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def levels(tmp_path: Path) -> list[Path]:
    """Four directories standing in for /etc, /run, /usr/local/lib, /usr/lib (not created)."""
    return [tmp_path / name for name in ("etc", "run", "usr-local-lib", "usr-lib")]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    return write_secret(tmp_path / "gw.secret")


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    """Stands in for certificate, key and CA files: loading only checks that they exist."""
    path = tmp_path / "x.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def write_secret(path: Path, data: bytes = SECRET + b"\n", mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def write(directory: Path, filename: str, text: str | bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str | bytes, name: str = "gw") -> Tunnel:
    write(tmp_path / "etc", f"{name}.conf", text)
    return load_tunnel(name, [tmp_path / "etc"])


def load_body(tmp_path: Path, body: str) -> Tunnel:
    return load_text(tmp_path, "[Tunnel]\n" + textwrap.dedent(body))


def problems(tmp_path: Path, text: str) -> list[tuple[int | None, str]]:
    with pytest.raises(TunnelConfigError) as exc:
        load_text(tmp_path, text)
    return [(e.line, e.message) for e in exc.value.errors]


def only_problem(tmp_path: Path, text: str) -> tuple[int | None, str]:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


# A complete tunnel without the key under test: no secret needed.
PLAIN = "Connect=gw.example.net:7000\nAuthentication=none\nExit=tcpmux\n"


# --------------------------------------------------------------------------- finding the file


def test_search_path() -> None:
    assert [str(p) for p in SEARCH_PATH] == [
        "/etc/tcpmuxd/sockmux.d",
        "/run/tcpmuxd/sockmux.d",
        "/usr/local/lib/tcpmuxd/sockmux.d",
        "/usr/lib/tcpmuxd/sockmux.d",
    ]


@pytest.mark.parametrize("winner", [0, 1, 2, 3])
def test_each_precedence_level(levels: list[Path], winner: int) -> None:
    for i, level in enumerate(levels):
        if i >= winner:
            write(level, "gw.conf", f"[Tunnel]\n{PLAIN}Description=level {i}\n")
    tunnel = load_tunnel("gw", levels)
    assert tunnel.description == f"level {winner}"
    assert tunnel.source == levels[winner] / "gw.conf"
    assert tunnel.overrides == tuple(level / "gw.conf" for level in levels[winner + 1 :])


def test_higher_file_replaces_lower_entirely(levels: list[Path]) -> None:
    write(levels[3], "gw.conf", f"[Tunnel]\n{PLAIN}MaxStreams=5\nDescription=vendor\n")
    write(levels[0], "gw.conf", f"[Tunnel]\n{PLAIN}")
    tunnel = load_tunnel("gw", levels)
    assert (tunnel.max_streams, tunnel.description) == (1024, "")


def test_other_names_do_not_matter(levels: list[Path]) -> None:
    write(levels[0], "other.conf", "garbage")
    write(levels[0], "gw.conf~", "garbage")
    write(levels[0], ".gw.conf", "garbage")
    write(levels[1], "gw.conf", f"[Tunnel]\n{PLAIN}")
    assert load_tunnel("gw", levels).source == levels[1] / "gw.conf"


def test_masked_by_empty_file(levels: list[Path]) -> None:
    write(levels[3], "gw.conf", f"[Tunnel]\n{PLAIN}")
    mask = write(levels[0], "gw.conf", "")
    with pytest.raises(TunnelConfigError) as exc:
        load_tunnel("gw", levels)
    assert str(exc.value) == f"tunnel gw is masked by {mask}"
    assert exc.value.errors == ()


def test_masked_by_dev_null_symlink(levels: list[Path]) -> None:
    write(levels[3], "gw.conf", f"[Tunnel]\n{PLAIN}")
    levels[1].mkdir()
    (levels[1] / "gw.conf").symlink_to("/dev/null")
    with pytest.raises(TunnelConfigError, match=rf"^tunnel gw is masked by {levels[1]}/gw.conf$"):
        load_tunnel("gw", levels)


def test_mask_below_does_not_mask_above(levels: list[Path]) -> None:
    write(levels[3], "gw.conf", "")
    write(levels[2], "gw.conf", f"[Tunnel]\n{PLAIN}")
    tunnel = load_tunnel("gw", levels)
    assert tunnel.source == levels[2] / "gw.conf"
    assert tunnel.overrides == (levels[3] / "gw.conf",)


def test_comment_only_file_is_not_a_mask(tmp_path: Path) -> None:
    assert problems(tmp_path, "# nothing yet\n") == [(None, "no [Tunnel] section")]


def test_missing_lists_where_it_looked(levels: list[Path]) -> None:
    write(levels[1], "other.conf", f"[Tunnel]\n{PLAIN}")
    with pytest.raises(TunnelConfigError) as exc:
        load_tunnel("gw", levels)
    assert str(exc.value) == "tunnel gw not found: no gw.conf in " + ", ".join(map(str, levels))


def test_directory_named_like_the_file_is_not_the_file(levels: list[Path]) -> None:
    (levels[0] / "gw.conf").mkdir(parents=True)
    write(levels[1], "gw.conf", f"[Tunnel]\n{PLAIN}")
    assert load_tunnel("gw", levels).source == levels[1] / "gw.conf"


def test_unreadable_file(tmp_path: Path) -> None:
    write(tmp_path / "etc", "gw.conf", b"[Tunnel]\nDescription=caf\xe9\n")
    with pytest.raises(TunnelConfigError) as exc:
        load_tunnel("gw", [tmp_path / "etc"])
    assert str(exc.value) == (
        f"tunnel gw: cannot use {tmp_path / 'etc' / 'gw.conf'}\n"
        f"{tmp_path / 'etc' / 'gw.conf'}:2: not valid UTF-8 (byte 0xe9)"
    )


def test_unsearchable_directory_above_the_file_stops_the_tunnel() -> None:
    """It may hold an override or a mask: running the lower file could bypass either."""
    base = Path(tempfile.mkdtemp(prefix="tcpmuxd-test-"))
    high, low = base / "high", base / "low"

    def attempt() -> str:
        try:
            return load_tunnel("gw", [high, low]).name
        except TunnelConfigError as exc:
            return str(exc)

    try:
        base.chmod(0o755)
        write(low, "gw.conf", f"[Tunnel]\n{PLAIN}")
        (low / "gw.conf").chmod(0o644)
        high.mkdir()
        high.chmod(0)
        result = as_nobody(attempt)
    finally:
        high.chmod(0o755)
        shutil.rmtree(base)
    assert result == (
        "tunnel gw: cannot search every directory, one of them may override or mask gw.conf\n"
        f"{high}: cannot read directory: Permission denied"
    )


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "the name is empty"),
        ("../etc/passwd", "names are letters, digits"),
        ("a/b", "names are letters, digits"),
        (".hidden", "names are letters, digits"),
        ("-flag", "names are letters, digits"),
        ("with space", "names are letters, digits"),
        ("x" * 251, "the name is 251 characters long, the limit is 250"),
    ],
)
def test_invalid_tunnel_names(levels: list[Path], name: str, problem: str) -> None:
    with pytest.raises(TunnelConfigError) as exc:
        load_tunnel(name, levels)
    assert str(exc.value).startswith(f"invalid tunnel name {name!r}: {problem}")


def test_valid_unusual_tunnel_names(tmp_path: Path) -> None:
    for name in ("a", "office-2.b_c:d", "9"):
        assert load_text(tmp_path, f"[Tunnel]\n{PLAIN}", name=name).name == name


# --------------------------------------------------------------------------- the link kinds


def test_accept(tmp_path: Path, secret: Path) -> None:
    tunnel = load_body(tmp_path, f"Accept=[::]:7000\nSecret={secret}\nExit=tcpmux\n")
    assert (tunnel.link, tunnel.role) == ("accept", "receptor")
    assert tunnel.address == Endpoint("::", 7000)
    assert tunnel.link_target == "[::]:7000" and tunnel.tls is None


def test_connect(tmp_path: Path, secret: Path) -> None:
    tunnel = load_body(tmp_path, f"Connect=gw.example.net:7000\nSecret={secret}\nEntrance=80\n")
    assert (tunnel.link, tunnel.role) == ("connect", "connector")
    assert tunnel.address == Endpoint("gw.example.net", 7000)


def test_fifo(tmp_path: Path, secret: Path) -> None:
    tunnel = load_body(
        tmp_path, f"FIFO=/run/sm/in '/run/sm/out pipe'\nSecret={secret}\nEntrance=80\n"
    )
    assert (tunnel.link, tunnel.role) == ("fifo", "pipe")
    assert (tunnel.fifo_in, tunnel.fifo_out) == ("/run/sm/in", "/run/sm/out pipe")
    assert tunnel.address is None


def test_device(tmp_path: Path, secret: Path) -> None:
    tunnel = load_body(tmp_path, f"Device=/dev/ttyS1\nSecret={secret}\nEntrance=80\n")
    assert (tunnel.link, tunnel.device) == ("device", "/dev/ttyS1")


def test_stdio(tmp_path: Path, secret: Path) -> None:
    tunnel = load_body(tmp_path, f"Stdio=yes\nSecret={secret}\nExit=tcpmux\n")
    assert (tunnel.link, tunnel.link_target) == ("stdio", "yes")


def test_stdio_no_is_no_link(tmp_path: Path) -> None:
    assert only_problem(tmp_path, "[Tunnel]\nStdio=no\nAuthentication=none\nExit=tcpmux\n") == (
        1,
        "no link: set one of Accept=, Connect=, FIFO=, Device=, Stdio=yes or Command=",
    )
    tunnel = load_body(tmp_path, f"Stdio=no\n{PLAIN}")
    assert tunnel.link == "connect"


def test_command(tmp_path: Path, secret: Path) -> None:
    tunnel = load_body(tmp_path, f"Command={CAT} -u 'a b'\nSecret={secret}\nEntrance=80\n")
    assert (tunnel.link, tunnel.command) == ("command", (CAT, "-u", "a b"))
    assert tunnel.link_target == f"{CAT} -u 'a b'"


def test_two_links(tmp_path: Path) -> None:
    assert only_problem(
        tmp_path, f"[Tunnel]\n{PLAIN}Description=x\nStdio=yes\n"
    ) == (
        6,
        "Stdio= conflicts with Connect= on line 2: a tunnel has exactly one link: Accept=, "
        "Connect=, FIFO=, Device=, Stdio= or Command=",
    )


def test_no_link(tmp_path: Path) -> None:
    assert only_problem(tmp_path, "# x\n[Tunnel]\nAuthentication=none\nExit=tcpmux\n") == (
        2,
        "no link: set one of Accept=, Connect=, FIFO=, Device=, Stdio=yes or Command=",
    )


def test_link_reset_by_empty_assignment(tmp_path: Path) -> None:
    assert load_body(tmp_path, f"Accept=0.0.0.0:1\nAccept=\n{PLAIN}").link == "connect"


# --------------------------------------------------------------------------- every key, bad values

_BAD_VALUES = [
    ("Accept", "7000", "Accept=: give the address to listen on too: [::]:7000 or 0.0.0.0:7000"),
    ("Accept", "unix:/run/x", "Accept=: unix sockets are not allowed here"),
    ("Accept", "[::1:7000", "Accept=: missing ']' after IPv6 address"),
    ("Connect", "gw.example.net", "Connect=: expected HOST:PORT, got 'gw.example.net'"),
    ("Connect", "gw.example.net:0", "Connect=: port 0 out of range 1-65535"),
    ("Connect", "::1:7000", "Connect=: IPv6 addresses must be written in brackets"),
    ("FIFO", "/run/in", "FIFO=: expected two paths, the FIFO to read and the FIFO to write, got 1"),
    ("FIFO", "/a /b /c", "FIFO=: expected two paths"),
    ("FIFO", "in /run/out", "FIFO=: must be an absolute path, got 'in'"),
    ("FIFO", "/run/x /run/x", "FIFO=: both FIFOs are /run/x: for one bidirectional device use"),
    ("FIFO", "'/run/x", "FIFO=: bad quoting: no closing quotation"),
    ("Device", "ttyS0", "Device=: must be an absolute path, got 'ttyS0'"),
    ("Stdio", "please", "Stdio=: 'please' is not a boolean (use yes or no)"),
    ("Command", "ssh far sockmuxd --stdio", "Command=: the program must be an absolute path"),
    ("Command", "/nonexistent/ssh x", "Command=: /nonexistent/ssh: No such file or directory"),
    ("Command", "/etc", "Command=: /etc: not a regular file"),
    ("TLS", "maybe", "TLS=: 'maybe' is not a boolean"),
    ("TLSCertificate", "cert.pem", "TLSCertificate=: must be an absolute path, got 'cert.pem'"),
    ("TLSKey", "/nonexistent.key", "TLSKey=: /nonexistent.key: No such file or directory"),
    ("TLSCA", "/etc", "TLSCA=: /etc: not a regular file"),
    ("TLSServerName", "gw example", "TLSServerName=: 'gw example' is not a host name or IP"),
    ("TLSRequirePeerCertificate", "2", "TLSRequirePeerCertificate=: '2' is not a boolean"),
    ("Secret", "gw.secret", "Secret=: must be an absolute path, got 'gw.secret'"),
    ("Secret", "/nonexistent", "Secret=: /nonexistent: No such file or directory"),
    ("Authentication", "password", "Authentication=: 'password' is not one of secret, none"),
    ("Authentication", "None", "Authentication=: 'None' is not one of secret, none (did you mean"),
    ("Extensions", "all", "Extensions=: 'all' is not a boolean"),
    ("Entrance", "0", "Entrance=: port 0 out of range 1-65535"),
    ("Entrance", "65536", "Entrance=: port 65536 out of range 1-65535"),
    ("Entrance", ":80", "Entrance=: write '80' for the loopback addresses, or give a HOST"),
    ("Entrance", "unix:/run/x", "Entrance=: entrances are TCP ports, not unix sockets"),
    ("Entrance", "fd:", "Entrance=: '' is not a file descriptor name"),
    ("Entrance", "fd:a:b", "Entrance=: 'a:b' is not a file descriptor name"),
    ("Entrance", "localhost", "Entrance=: expected HOST:PORT, got 'localhost'"),
    ("Exit", "8080=", "Exit=: missing target (HOST:PORT, unix:PATH, exec:COMMAND or tcpmux)"),
    ("Exit", "0=host:1", "Exit=: port 0 out of range 1-65535"),
    ("Exit", "web=host:80", "Exit=: 'web' is not an entrance port number (PORT=TARGET)"),
    ("Exit", "telnet://host:23", "Exit=: write the target as HOST:PORT, not as a URL"),
    ("Exit", "tcpmx", "Exit=: unknown exit 'tcpmx' (did you mean 'tcpmux'?)"),
    ("Exit", "exec:cat", "Exit=: the program must be an absolute path, got 'cat'"),
    ("Exit", "exec:", "Exit=: empty command line"),
    ("Exit", "unix:run/x", "Exit=: unix socket path must be absolute"),
    ("Exit", "/run/x.sock", "Exit=: write unix sockets as unix:/run/x.sock"),
    ("Exit", "host:99999", "Exit=: port 99999 out of range 1-65535"),
    ("MaxStreams", "0", "MaxStreams=: '0' is out of range 1-65533"),
    ("MaxStreams", "65534", "MaxStreams=: '65534' is out of range 1-65533"),
    ("MaxStreams", "-1", "MaxStreams=: '-1' is not a non-negative integer"),
    ("KeepAliveSec", "0", "KeepAliveSec=: '0': the timeout must be greater than zero"),
    ("KeepAliveSec", "5 parsecs", "KeepAliveSec=: unknown time unit 'parsecs'"),
    ("DeadPeerSec", "infinity", "DeadPeerSec=: 'infinity' is not allowed here"),
    ("ConnectTimeoutSec", "-1", "ConnectTimeoutSec=: '-1' is not a time span"),
    ("ReconnectMaxSec", "soon", "ReconnectMaxSec=: 'soon' is not a time span"),
    ("WindowSize", "1K", "WindowSize=: '1K' is out of range 4096-1073741824"),
    ("WindowSize", "2G", "WindowSize=: '2G' is out of range 4096-1073741824"),
    ("WindowSize", "256k", "WindowSize=: unknown size suffix 'k' in '256k', use K, M or G"),
    ("FrameSize", "128", "FrameSize=: '128' is out of range 512-65543"),
    ("StreamLogRate", "1000001", "StreamLogRate=: '1000001' is out of range 0-1000000"),
    ("StreamLogRate", "-1", "StreamLogRate=: '-1' is not a non-negative integer"),
    ("StreamLogRate", "lots", "StreamLogRate=: 'lots' is not a non-negative integer"),
    ("FrameSize", "1M", "FrameSize=: '1M' is out of range 512-65543"),
    ("SendTimeoutSec", "0", "SendTimeoutSec=: '0': the timeout must be greater than zero"),
    ("HandshakeTimeoutSec", "0",
     "HandshakeTimeoutSec=: '0': the timeout must be greater than zero"),
    ("HoldSec", "-1", "HoldSec=: '-1' is not a time span"),
    ("ResumeTimeoutSec", "1d 1s", "ResumeTimeoutSec=: '1d 1s' is out of range 0-86400"),
    ("ResumeTimeoutSec", "-1", "ResumeTimeoutSec=: '-1' is not a time span"),
    ("ResumeBuffer", "65535", "ResumeBuffer=: '65535' is out of range 65536-1073741824"),
    ("ResumeBuffer", "1073741825",
     "ResumeBuffer=: '1073741825' is out of range 65536-1073741824"),
    ("FirstDataWaitSec", "soon", "FirstDataWaitSec=: 'soon' is not a time span"),
    ("ReplyWaitSec", "infinity", "ReplyWaitSec=: 'infinity' is not allowed here"),
    ("Acept", "[::]:1", "unknown key Acept= (did you mean 'Accept'?)"),
    ("tls", "yes", "unknown key tls= (did you mean 'TLS'?)"),
    ("PORT", "80", "unknown key PORT="),
]


@pytest.mark.parametrize("key, value, message", _BAD_VALUES)
def test_bad_value_is_reported_on_its_line(
    tmp_path: Path, pem: Path, key: str, value: str, message: str
) -> None:
    # TLS keys need TLS=yes (else "has no effect" would be a second error); an Accept= link
    # needs a certificate and key with it.
    tls = f"TLS=yes\nTLSCertificate={pem}\nTLSKey={pem}\n" if key.startswith("TLS") else ""
    text = f"# a comment\n\n[Tunnel]\n{PLAIN}{key}={value}\nDescription=after\n{tls}"
    if key == "Connect":
        text = text.replace("Connect=gw.example.net:7000", "Description=before")
    line, got = only_problem(tmp_path, text)
    assert line == 7
    assert got.startswith(message), got


@pytest.mark.parametrize("key", ["Accept", "FIFO", "Device", "Command", "Secret", "TLS"])
def test_empty_value_resets(tmp_path: Path, key: str) -> None:
    assert load_body(tmp_path, f"{PLAIN}{key}=\n").link == "connect"


def test_all_errors_are_reported_in_line_order(tmp_path: Path) -> None:
    text = (
        "[Tunnel]\nMaxStreams=lots\nConnect=x\nExit=tcpmx\nBogus=1\nAuthentication=none\n"
        "[Extra]\n"
    )
    assert [line for line, _ in problems(tmp_path, text)] == [2, 3, 4, 5, 7]
    with pytest.raises(TunnelConfigError) as exc:
        load_text(tmp_path, text)
    assert str(exc.value).startswith(f"tunnel gw: 5 errors in {tmp_path / 'etc' / 'gw.conf'}\n")
    assert str(exc.value).splitlines()[1] == (
        f"{tmp_path / 'etc' / 'gw.conf'}:2: MaxStreams=: 'lots' is not a non-negative integer"
    )


def test_syntax_errors_come_with_lines(tmp_path: Path) -> None:
    assert problems(tmp_path, f"Connect=x:1\n[Tunnel]\n{PLAIN}") == [
        (1, "'Connect=x:1' comes before the [Tunnel] section header")
    ]
    assert problems(tmp_path, f"[Tunel]\n{PLAIN}") == [
        (None, "no [Tunnel] section"),
        (
            1,
            "unknown section [Tunel] (did you mean 'Tunnel'?); "
            "a tunnel file has one [Tunnel] section",
        ),
    ]
    assert problems(tmp_path, f"[Tunnel]\n{PLAIN}just words\n") == [
        (5, "not a Key=Value line: just words")
    ]


# --------------------------------------------------------------------------- TLS


def test_tls_receptor(tmp_path: Path, secret: Path, pem: Path) -> None:
    base = (
        f"Accept=[::]:7000\nSecret={secret}\nExit=tcpmux\n"
        f"TLS=yes\nTLSCertificate={pem}\nTLSKey={pem}\n"
    )
    assert load_body(tmp_path, base).tls == TLSSettings(pem, pem, None, None, False)
    tls = load_body(tmp_path, base + f"TLSCA={pem}\n").tls
    assert tls == TLSSettings(pem, pem, pem, None, True)
    tls = load_body(tmp_path, base + f"TLSCA={pem}\nTLSRequirePeerCertificate=no\n").tls
    assert tls is not None and tls.require_peer_certificate is False


def test_tls_connector(tmp_path: Path, secret: Path, pem: Path) -> None:
    base = f"Connect=gw.example.net:7000\nSecret={secret}\nEntrance=80\nTLS=yes\n"
    assert load_body(tmp_path, base).tls == TLSSettings(server_name="gw.example.net")
    tls = load_body(
        tmp_path,
        base + f"TLSCA={pem}\nTLSServerName=192.0.2.1\nTLSCertificate={pem}\nTLSKey={pem}\n",
    ).tls
    assert tls == TLSSettings(pem, pem, pem, "192.0.2.1", True)
    tls = load_body(tmp_path, base + "TLSRequirePeerCertificate=no\n").tls
    assert tls == TLSSettings(server_name="gw.example.net", require_peer_certificate=False)
    assert load_body(tmp_path, base.replace("TLS=yes", "TLS=no")).tls is None


@pytest.mark.parametrize("link", ["FIFO=/a /b", "Device=/dev/ttyS0", "Stdio=yes", f"Command={CAT}"])
@pytest.mark.parametrize("key", ["TLS=yes", "TLSCA={pem}", "TLSRequirePeerCertificate=no"])
def test_tls_keys_on_a_link_without_tcp(tmp_path: Path, pem: Path, link: str, key: str) -> None:
    key = key.format(pem=pem)
    kind_key = link.split("=")[0]
    assert only_problem(
        tmp_path, f"[Tunnel]\n{link}\nAuthentication=none\nExit=tcpmux\n{key}\n"
    ) == (
        5,
        f"{key.split('=')[0]}= only applies to Accept= or Connect= tunnels, "
        f"not to {kind_key}= ones",
    )


def test_tls_server_name_only_on_connect(tmp_path: Path, pem: Path) -> None:
    text = (
        f"[Tunnel]\nAccept=[::]:1\nAuthentication=none\nExit=tcpmux\nTLS=yes\n"
        f"TLSCertificate={pem}\nTLSKey={pem}\nTLSServerName=x\n"
    )
    assert only_problem(tmp_path, text) == (
        8,
        "TLSServerName= only applies to Connect= tunnels, not to Accept= ones",
    )


@pytest.mark.parametrize(
    "key", ["TLSCertificate={pem}", "TLSKey={pem}", "TLSCA={pem}", "TLSServerName=gw",
            "TLSRequirePeerCertificate=yes"]
)
def test_tls_details_without_tls_yes(tmp_path: Path, pem: Path, key: str) -> None:
    key = key.format(pem=pem)
    for tls in ("", "TLS=no\n"):
        assert only_problem(tmp_path, f"[Tunnel]\n{PLAIN}{tls}{key}\n") == (
            5 + bool(tls),
            f"{key.split('=')[0]}= has no effect without TLS=yes",
        )


def test_tls_receptor_needs_certificate_and_key(tmp_path: Path, pem: Path) -> None:
    base = "[Tunnel]\nAccept=[::]:1\nAuthentication=none\nExit=tcpmux\nTLS=yes\n"
    message = (
        "TLS=yes on an Accept= tunnel needs TLSCertificate= and TLSKey= "
        "(this side's certificate and its private key)"
    )
    assert only_problem(tmp_path, base) == (5, message)
    assert only_problem(tmp_path, base + f"TLSCertificate={pem}\n") == (5, message)
    # a bad certificate path is reported once, on its own line
    assert only_problem(tmp_path, base + f"TLSCertificate=/nonexistent\nTLSKey={pem}\n") == (
        6,
        "TLSCertificate=: /nonexistent: No such file or directory",
    )


def test_tls_client_certificate_needs_both(tmp_path: Path, pem: Path) -> None:
    base = f"[Tunnel]\n{PLAIN}TLS=yes\n"
    assert only_problem(tmp_path, base + f"TLSKey={pem}\n") == (
        6,
        "TLSKey= needs TLSCertificate= too (a certificate and its key)",
    )
    assert only_problem(tmp_path, base + f"TLSCertificate={pem}\n") == (
        6,
        "TLSCertificate= needs TLSKey= too (a certificate and its key)",
    )


def test_tls_requiring_client_certificates_needs_a_ca(tmp_path: Path, pem: Path) -> None:
    text = (
        f"[Tunnel]\nAccept=[::]:1\nAuthentication=none\nExit=tcpmux\nTLS=yes\n"
        f"TLSCertificate={pem}\nTLSKey={pem}\nTLSRequirePeerCertificate=yes\n"
    )
    line, message = only_problem(tmp_path, text)
    assert (line, message.split(" (")[0]) == (8, "TLSRequirePeerCertificate=yes needs TLSCA=")


def test_tls_connector_not_verifying_has_no_use_for_a_ca(tmp_path: Path, pem: Path) -> None:
    text = f"[Tunnel]\n{PLAIN}TLS=yes\nTLSCA={pem}\nTLSRequirePeerCertificate=no\n"
    line, message = only_problem(tmp_path, text)
    assert (line, message.split(":")[0]) == (
        7,
        "TLSRequirePeerCertificate=no with TLSCA= on a Connect= tunnel",
    )


def test_reconnect_only_for_dialing_links(tmp_path: Path, secret: Path) -> None:
    assert load_body(tmp_path, f"{PLAIN}ReconnectMaxSec=2min\n").reconnect_max == 120
    tunnel = load_body(
        tmp_path, f"Command={CAT}\nSecret={secret}\nExit=tcpmux\nReconnectMaxSec=5\n"
    )
    assert tunnel.reconnect_max == 5
    text = "[Tunnel]\nAccept=[::]:1\nAuthentication=none\nExit=tcpmux\nReconnectMaxSec=5\n"
    assert only_problem(tmp_path, text) == (
        5,
        "ReconnectMaxSec= only applies to Connect=, FIFO=, Device= or Command= tunnels, "
        "not to Accept= ones",
    )
    text = text.replace("Accept=[::]:1", "Stdio=yes")
    assert only_problem(tmp_path, text)[1].endswith("not to Stdio= ones")
    tunnel = load_body(tmp_path, f"FIFO=/a /b\nSecret={secret}\nExit=tcpmux\nReconnectMaxSec=1\n")
    assert tunnel.reconnect_max == 1


def test_resumption_keys_at_their_edges(tmp_path: Path) -> None:
    """ResumeTimeoutSec= (0: off, up to 1d) and ResumeBuffer= (64K-1G) reach the protocol
    configuration; one past either end is refused (test_bad_value_is_reported_on_its_line)."""
    from tcpmuxd.sockmux.daemon import protocol_config
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    secret.chmod(0o600)
    base = f"Connect=gw:7000\nSecret={secret}\nExit=tcpmux\n"
    tunnel = load_body(tmp_path, base)
    assert (tunnel.resume_timeout, tunnel.resume_buffer) == (60.0, 16 << 20)
    assert protocol_config(tunnel).resumable
    off = load_body(tmp_path, f"{base}ResumeTimeoutSec=0\n")
    assert off.resume_timeout == 0 and not protocol_config(off).resumable
    edge = load_body(tmp_path, f"{base}ResumeTimeoutSec=1d\nResumeBuffer=64K\n")
    config = protocol_config(edge)
    assert (config.resume_timeout, config.resume_buffer) == (86400, 65536)
    assert load_body(tmp_path, f"{base}ResumeBuffer=1G\n").resume_buffer == 1 << 30


def test_receptor_limits(tmp_path: Path) -> None:
    """MaxPendingLinks= (1-1024) and FailureDelaySec= (0 allowed) are Accept= keys."""
    accept = "Accept=[::]:7000\nAuthentication=none\nExit=tcpmux\n"
    tunnel = load_body(tmp_path, accept)
    assert (tunnel.max_pending_links, tunnel.failure_delay, tunnel.handshake_timeout) == (
        8, 60.0, 10.0)
    for value in (1, 1024):
        assert load_body(tmp_path, f"{accept}MaxPendingLinks={value}\n").max_pending_links == value
    assert load_body(tmp_path, f"{accept}FailureDelaySec=0\n").failure_delay == 0
    assert load_body(tmp_path, f"{accept}FailureDelaySec=2min\n").failure_delay == 120
    assert load_body(tmp_path, f"{accept}HandshakeTimeoutSec=3s\n").handshake_timeout == 3
    text = f"[Tunnel]\n{accept}"
    for value in ("0", "1025"):
        assert only_problem(tmp_path, f"{text}MaxPendingLinks={value}\n") == (
            5, f"MaxPendingLinks=: '{value}' is out of range 1-1024")
    assert only_problem(tmp_path, f"{text}FailureDelaySec=soon\n")[1].startswith(
        "FailureDelaySec=: 'soon' is not a time span")
    for key in ("MaxPendingLinks=4", "FailureDelaySec=5s"):
        line, message = only_problem(tmp_path, f"[Tunnel]\n{PLAIN}{key}\n")
        assert message.startswith(f"{key.split('=')[0]}= only applies to Accept= tunnels"), message


# --------------------------------------------------------------------------- authentication


def test_secret_is_read_at_load(tmp_path: Path, secret: Path) -> None:
    tunnel = load_body(tmp_path, f"Connect=h:1\nSecret={secret}\nExit=tcpmux\n")
    assert (tunnel.secret, tunnel.secret_path, tunnel.require_auth) == (SECRET, secret, True)


@pytest.mark.parametrize(
    "data, expected",
    [
        (SECRET, SECRET),
        (SECRET + b"\n", SECRET),
        (SECRET + b"\r\n", SECRET),
        (SECRET + b"\n\n", SECRET + b"\n"),  # one newline only
        (b" " + SECRET + b" \n", b" " + SECRET + b" "),  # nothing else is stripped
        (bytes(range(256)), bytes(range(256))),  # binary secrets are fine
    ],
)
def test_secret_bytes(tmp_path: Path, data: bytes, expected: bytes) -> None:
    assert read_secret(write_secret(tmp_path / "s", data)) == expected


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_secret_permissions_ok(tmp_path: Path, mode: int) -> None:
    assert read_secret(write_secret(tmp_path / "s", mode=mode)) == SECRET


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660, 0o666])
def test_secret_permissions_too_open(tmp_path: Path, mode: int) -> None:
    path = write_secret(tmp_path / "gw.secret", mode=mode)
    text = f"[Tunnel]\nConnect=h:1\nExit=tcpmux\nSecret={path}\n"
    assert only_problem(tmp_path, text) == (
        4,
        f"Secret=: {path}: permissions {mode:04o} are too open, the secret must not be "
        f"accessible by group or others (chmod 600 {path})",
    )


def test_secret_owned_by_someone_else(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file away")
    path = write_secret(tmp_path / "gw.secret")
    os.chown(path, pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(ValueError, match=r"owned by uid \d+, must be owned by root or by the user"):
        read_secret(path)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "the secret is empty"),
        (b"\n", "the secret is empty"),
        (b"short\n", "the secret is 5 bytes, at least 16 are needed"),
        (b"x" * 4097, "too large for a secret (the limit is 4096 bytes)"),
    ],
)
def test_secret_content_errors(tmp_path: Path, data: bytes, message: str) -> None:
    path = write_secret(tmp_path / "gw.secret", data)
    assert only_problem(tmp_path, f"[Tunnel]\nConnect=h:1\nExit=tcpmux\nSecret={path}\n") == (
        4,
        f"Secret=: {path}: {message}",
    )


def test_secret_must_be_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(ValueError, match="fifo: not a regular file$"):
        read_secret(tmp_path / "fifo")  # and does not hang
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(ValueError, match="dir: not a regular file$"):
        read_secret(tmp_path / "dir")


def test_secret_required_by_default(tmp_path: Path) -> None:
    line, message = only_problem(tmp_path, "[Tunnel]\nConnect=h:1\nExit=tcpmux\n")
    assert line == 1
    assert message.startswith("Authentication=secret (the default) needs Secret=FILE")
    assert (
        "umask 077; head -c 32 /dev/urandom | base64 > /etc/tcpmuxd/sockmux.d/gw.secret"
        in message
    )
    assert message.endswith("for a DeleGate peer in plain mode set Authentication=none instead")
    line, _ = only_problem(tmp_path, "[Tunnel]\nConnect=h:1\nExit=tcpmux\nAuthentication=secret\n")
    assert line == 4


def test_bad_secret_is_not_also_missing(tmp_path: Path) -> None:
    text = "[Tunnel]\nConnect=h:1\nExit=tcpmux\nSecret=/nonexistent\n"
    assert only_problem(tmp_path, text) == (4, "Secret=: /nonexistent: No such file or directory")


def test_authentication_none(tmp_path: Path) -> None:
    tunnel = load_body(tmp_path, PLAIN)
    assert (tunnel.require_auth, tunnel.secret, tunnel.secret_path, tunnel.extensions) == (
        False,
        None,
        None,
        True,
    )


def test_authentication_none_with_a_secret(tmp_path: Path, secret: Path) -> None:
    assert only_problem(tmp_path, f"[Tunnel]\n{PLAIN}Secret={secret}\n") == (
        5,
        "Secret= is not used with Authentication=none: remove one of the two",
    )


def test_delegate_plain_peer(tmp_path: Path) -> None:
    """The explicit opt-out for a DeleGate peer in plain mode: no extensions, no authentication."""
    tunnel = load_body(tmp_path, f"{PLAIN}Extensions=no\n")
    assert (tunnel.extensions, tunnel.require_auth, tunnel.secret) == (False, False, None)


def test_plain_protocol_cannot_authenticate(tmp_path: Path, secret: Path) -> None:
    for auth in (f"Secret={secret}\n", ""):
        line, message = only_problem(
            tmp_path, f"[Tunnel]\nConnect=h:1\nExit=tcpmux\nExtensions=no\n{auth}"
        )
        assert line == 5 - 1
        assert message.startswith(
            "Extensions=no speaks plain DeleGate SockMux, which cannot authenticate: "
            "set Authentication=none too"
        )


def test_secret_never_shown(tmp_path: Path, secret: Path) -> None:
    tunnel = load_body(tmp_path, f"Connect=h:1\nSecret={secret}\nExit=tcpmux\n")
    for text in (repr(tunnel), str(tunnel), format_tunnel(tunnel)):
        assert SECRET.decode() not in text and repr(SECRET) not in text
    assert f"secret from {secret} (32 bytes)" in format_tunnel(tunnel)


# --------------------------------------------------------------------------- entrances


@pytest.mark.parametrize(
    "text, entrance, hosts",
    [
        ("8080", Entrance(8080), ("127.0.0.1", "::1")),
        ("0.0.0.0:8080", Entrance(8080, "0.0.0.0"), ("0.0.0.0",)),
        ("192.0.2.1:25", Entrance(25, "192.0.2.1"), ("192.0.2.1",)),
        ("[::]:25", Entrance(25, "::"), ("::",)),
        ("[::1]:25", Entrance(25, "::1"), ("::1",)),
        ("localhost:25", Entrance(25, "localhost"), ("localhost",)),
        ("fd:web", Entrance(fd_name="web"), ()),
        ("fd:db-2.x", Entrance(fd_name="db-2.x"), ()),
    ],
)
def test_entrance_forms(text: str, entrance: Entrance, hosts: tuple[str, ...]) -> None:
    parsed = parse_entrance(text)
    assert parsed == entrance and parsed.hosts == hosts
    assert str(parsed) == text
    assert parsed.endpoints == tuple(Endpoint(h, parsed.port) for h in hosts)


def test_bare_port_entrance_is_loopback_only() -> None:
    assert parse_entrance("8080").endpoints == (Endpoint("127.0.0.1", 8080), Endpoint("::1", 8080))


def test_entrances_in_a_file(tmp_path: Path) -> None:
    tunnel = load_body(
        tmp_path,
        f"{PLAIN}Entrance=8080\nEntrance=192.0.2.1:8080\nEntrance=\nEntrance=25\n"
        "Entrance=192.0.2.1:25\nEntrance=198.51.100.1:25\nEntrance=fd:web\n",
    )
    assert [str(e) for e in tunnel.entrances] == [
        "25",
        "192.0.2.1:25",
        "198.51.100.1:25",
        "fd:web",
    ]


@pytest.mark.parametrize(
    "first, second, message",
    [
        ("8080", "8080", "Entrance=8080 is given twice (first on line 5)"),
        ("8080", "127.0.0.1:8080", "Entrance=127.0.0.1:8080 overlaps Entrance=8080 on line 5"),
        ("[::1]:8080", "8080", "Entrance=8080 overlaps Entrance=[::1]:8080 on line 5"),
        (
            "0.0.0.0:80",
            "192.0.2.1:80",
            "Entrance=192.0.2.1:80 overlaps Entrance=0.0.0.0:80 on line 5",
        ),
        ("192.0.2.1:80", "[::]:80", "Entrance=[::]:80 overlaps Entrance=192.0.2.1:80 on line 5"),
        ("fd:web", "fd:web", "Entrance=fd:web is given twice (first on line 5)"),
    ],
)
def test_overlapping_entrances(tmp_path: Path, first: str, second: str, message: str) -> None:
    text = f"[Tunnel]\n{PLAIN}Entrance={first}\nEntrance={second}\n"
    assert only_problem(tmp_path, text) == (6, message)


# --------------------------------------------------------------------------- exits


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:80", Exit("tcp", Endpoint("127.0.0.1", 80))),
        ("8080=127.0.0.1:80", Exit("tcp", Endpoint("127.0.0.1", 80), entrance_port=8080)),
        ("[::1]:80", Exit("tcp", Endpoint("::1", 80))),
        ("www.example.net:80", Exit("tcp", Endpoint("www.example.net", 80))),
        ("unix:/run/app.sock", Exit("unix", Endpoint(path="/run/app.sock"))),
        ("25=unix:@app", Exit("unix", Endpoint(path="\0app"), entrance_port=25)),
        (f"exec:{CAT}", Exit("exec", argv=(CAT,))),
        (f"2000=exec:{CAT} -u 'a b'", Exit("exec", argv=(CAT, "-u", "a b"), entrance_port=2000)),
        (f"exec:{CAT} A=B", Exit("exec", argv=(CAT, "A=B"))),
        ("tcpmux", Exit("tcpmux")),
        ("1=tcpmux", Exit("tcpmux", entrance_port=1)),
    ],
)
def test_exit_forms(text: str, expected: Exit) -> None:
    parsed = parse_exit(text)
    assert parsed == expected
    assert str(parsed) == text
    assert parse_exit(str(parsed)) == parsed


def test_exit_selection_table(tmp_path: Path) -> None:
    tunnel = load_body(
        tmp_path,
        "Connect=h:1\nAuthentication=none\n"
        "Exit=8080=127.0.0.1:80\nExit=unix:/run/default.sock\nExit=2323=tcpmux\n",
    )
    assert dict(tunnel.exits) == {
        8080: Exit("tcp", Endpoint("127.0.0.1", 80), entrance_port=8080),
        None: Exit("unix", Endpoint(path="/run/default.sock")),
        2323: Exit("tcpmux", entrance_port=2323),
    }
    table = {8080: "tcp", 2323: "tcpmux", 80: "unix", 1: "unix", None: "unix"}
    for port, kind in table.items():
        chosen = tunnel.exit_for(port)
        assert chosen is not None and chosen.kind == kind, port


def test_exit_selection_without_default_refuses(tmp_path: Path) -> None:
    tunnel = load_body(tmp_path, "Connect=h:1\nAuthentication=none\nExit=8080=127.0.0.1:80\n")
    assert tunnel.exit_for(8080) == Exit("tcp", Endpoint("127.0.0.1", 80), entrance_port=8080)
    assert tunnel.exit_for(8081) is None and tunnel.exit_for(None) is None


def test_exits_reset(tmp_path: Path) -> None:
    tunnel = load_body(tmp_path, f"{PLAIN}Exit=\nExit=8080=h:1\nExit=h:2\n")
    assert sorted(tunnel.exits, key=str) == [8080, None]
    assert tunnel.exits[None].endpoint == Endpoint("h", 2)


def test_exits_mapping_is_read_only(tmp_path: Path) -> None:
    tunnel = load_body(tmp_path, PLAIN)
    with pytest.raises(TypeError):
        tunnel.exits[1] = Exit("tcpmux")  # type: ignore[index]
    hash(tunnel)  # a frozen dataclass stays hashable


def test_two_default_exits(tmp_path: Path) -> None:
    assert only_problem(tmp_path, f"[Tunnel]\n{PLAIN}Exit=h:1\n") == (
        5,
        "a second default Exit= (the first is on line 4): give the others an ENTRANCEPORT= prefix",
    )


def test_two_exits_for_one_entrance_port(tmp_path: Path) -> None:
    text = f"[Tunnel]\n{PLAIN}Exit=8080=h:1\nExit=8081=h:1\nExit=8080=tcpmux\n"
    assert only_problem(tmp_path, text) == (7, "entrance port 8080 already has an Exit= on line 5")


def test_neither_entrance_nor_exit(tmp_path: Path) -> None:
    line, message = only_problem(tmp_path, "\n[Tunnel]\nConnect=h:1\nAuthentication=none\n")
    assert line == 2
    assert message.startswith(
        "the tunnel has neither Entrance= nor Exit=, so it would carry nothing"
    )
    assert load_body(tmp_path, "Connect=h:1\nAuthentication=none\nEntrance=80\n").exits == {}


def test_bad_entrance_is_not_also_nothing(tmp_path: Path) -> None:
    text = "[Tunnel]\nConnect=h:1\nAuthentication=none\nEntrance=0\n"
    assert only_problem(tmp_path, text) == (4, "Entrance=: port 0 out of range 1-65535")


# --------------------------------------------------------------------------- limits


def test_defaults(tmp_path: Path) -> None:
    tunnel = load_body(tmp_path, PLAIN)
    assert tunnel == Tunnel(
        name="gw",
        link="connect",
        source=tmp_path / "etc" / "gw.conf",
        address=Endpoint("gw.example.net", 7000),
        require_auth=False,
        exits=tunnel.exits,
    )
    assert (tunnel.max_streams, tunnel.keepalive_interval, tunnel.dead_peer_timeout) == (
        1024,
        30.0,
        60.0,
    )
    assert (tunnel.connect_timeout, tunnel.reconnect_max) == (10.0, 30.0)
    assert (tunnel.stream_window, tunnel.max_frame_size, tunnel.extensions) == (1 << 20, 65536, True)
    assert tunnel.stream_log_rate == 100
    assert tunnel.description == "" and tunnel.entrances == () and tunnel.overrides == ()


def test_wait_defaults_are_the_hubs() -> None:
    """FirstDataWaitSec= and ReplyWaitSec= default to what the Hub defaults to (measured
    there, session.py), so a tunnel without them runs as a Hub made without them."""
    from tcpmuxd.sockmux import session, tunnel

    assert tunnel.DEFAULT_FIRST_DATA_WAIT == session.FIRST_DATA_WAIT
    assert tunnel.DEFAULT_REPLY_WAIT == session.REPLY_WAIT


def test_limits(tmp_path: Path) -> None:
    tunnel = load_body(
        tmp_path,
        f"{PLAIN}MaxStreams=65533\nKeepAliveSec=500ms\nDeadPeerSec=1min 30s\n"
        "ConnectTimeoutSec=2s\nReconnectMaxSec=5min\nWindowSize=1M\nFrameSize=16K\n"
        "Description=the office\n",
    )
    assert (tunnel.max_streams, tunnel.keepalive_interval, tunnel.dead_peer_timeout) == (
        65533,
        0.5,
        90.0,
    )
    assert (tunnel.connect_timeout, tunnel.reconnect_max) == (2.0, 300.0)
    assert (tunnel.stream_window, tunnel.max_frame_size) == (1 << 20, 16384)
    assert tunnel.description == "the office"
    assert (tunnel.hold, tunnel.first_data_wait, tunnel.reply_wait) == (3.0, 0.001, 0.05)
    waits = load_body(tmp_path, f"{PLAIN}HoldSec=0\nFirstDataWaitSec=0\nReplyWaitSec=2min\n")
    assert (waits.hold, waits.first_data_wait, waits.reply_wait) == (0.0, 0.0, 120.0)
    # the stream log rate at both edges
    for rate in (0, 1000000):
        assert load_body(tmp_path, f"{PLAIN}StreamLogRate={rate}\n").stream_log_rate == rate


@pytest.mark.parametrize(
    "lines, line, shown",
    [
        ("KeepAliveSec=1min\n", 4, "DeadPeerSec= (1min) must be longer than KeepAliveSec= (1min)"),
        ("DeadPeerSec=20s\n", 4, "DeadPeerSec= (20s) must be longer than KeepAliveSec= (30s)"),
        ("DeadPeerSec=10\nKeepAliveSec=20\n", 4, "DeadPeerSec= (10s) must be longer"),
        ("KeepAliveSec=20\nDeadPeerSec=10\n", 5, "DeadPeerSec= (10s) must be longer"),
    ],
)
def test_dead_peer_must_exceed_keepalive(tmp_path: Path, lines: str, line: int, shown: str) -> None:
    text = f"[Tunnel]\nConnect=h:1\nAuthentication=none\n{lines}Exit=tcpmux\n"
    got_line, message = only_problem(tmp_path, text)
    assert got_line == line and message.startswith(shown), message


@pytest.mark.parametrize(
    "body",
    [
        "MaxStreams=65533\nWindowSize=1G\nFrameSize=65543\n",
        "MaxStreams=1\nWindowSize=4K\nFrameSize=512\nKeepAliveSec=1\nDeadPeerSec=2\n",
        "",
    ],
)
def test_what_loads_is_what_the_protocol_layer_accepts(
    tmp_path: Path, secret: Path, body: str
) -> None:
    """The ranges checked here are the ones SockMuxConfig enforces: a tunnel that passes
    ``--check`` must not be refused by the daemon."""
    for auth in (f"Secret={secret}\n", "Authentication=none\nExtensions=no\n"):
        tunnel = load_body(tmp_path, f"Connect=h:1\nExit=tcpmux\n{auth}{body}")
        SockMuxConfig(
            secret=tunnel.secret,
            require_auth=tunnel.require_auth,
            extensions=tunnel.extensions,
            max_streams=tunnel.max_streams,
            max_frame_size=tunnel.max_frame_size,
            stream_window=tunnel.stream_window,
            keepalive_interval=tunnel.keepalive_interval,
            dead_peer_timeout=tunnel.dead_peer_timeout,
        )


# --------------------------------------------------------------------------- --check


def test_format_tunnel(levels: list[Path], pem: Path, tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "office.secret")
    write(levels[3], "office.conf", f"[Tunnel]\n{PLAIN}")
    write(
        levels[0],
        "office.conf",
        f"""\
        [Tunnel]
        Description=Office gateway
        Accept=[::]:7000
        TLS=yes
        TLSCertificate={pem}
        TLSKey={pem}
        TLSCA={pem}
        Secret={secret}
        Entrance=5432
        Entrance=fd:web
        Exit=8080=127.0.0.1:80
        Exit=tcpmux
        Exit=2000=exec:{CAT} -u
        WindowSize=1M
        KeepAliveSec=90
        DeadPeerSec=2min
        """,
    )
    assert format_tunnel(load_tunnel("office", levels)).splitlines() == [
        "Tunnel               office",
        f"File                 {levels[0] / 'office.conf'}",
        f"Overrides            {levels[3] / 'office.conf'}",
        "Description          Office gateway",
        "Link                 Accept=[::]:7000 (receptor, the peer connects here)",
        f"TLS                  yes: certificate {pem}, key {pem}, CA {pem}, "
        "peer certificate verified",
        f"Authentication       secret from {secret} (32 bytes)",
        "Extensions           yes",
        "Entrance             5432 (127.0.0.1:5432 and [::1]:5432)",
        "Entrance             fd:web (socket from systemd, FileDescriptorName=web)",
        f"Exit                 2000 -> exec {CAT} -u",
        "Exit                 8080 -> tcp 127.0.0.1:80",
        "Exit                 default -> tcpmux "
        "(tcpmuxd's dispatcher: the stream names a TCPMUX service)",
        "MaxStreams           1024",
        "KeepAliveSec         1min 30s",
        "DeadPeerSec          2min",
        "ConnectTimeoutSec    10s",
        "WindowSize           1048576 (1M)",
        "FrameSize            65536 (64K)",
        "StreamLogRate        100/s",
        "SendTimeoutSec       30s",
        "HandshakeTimeoutSec  10s",
        "MaxPendingLinks      8",
        "FailureDelaySec      1min",
        "HoldSec              3s",
        "FirstDataWaitSec     1ms",
        "ReplyWaitSec         50ms",
    ]


def test_format_tunnel_plain_peer(tmp_path: Path) -> None:
    tunnel = load_body(
        tmp_path,
        "Connect=192.0.2.1:8000\nAuthentication=none\nExtensions=no\nEntrance=8080\n"
        "Exit=2323=127.0.0.1:23\n",
    )
    lines = format_tunnel(tunnel).splitlines()
    assert (
        "Link                 Connect=192.0.2.1:8000 (connector, re-dials with backoff)" in lines
    )
    assert "TLS                  no" in lines
    assert "Authentication       none: the peer is not authenticated" in lines
    assert "Extensions           no: plain DeleGate SockMux only" in lines
    assert "Exit                 2323 -> tcp 127.0.0.1:23" in lines
    assert (
        "Exit                 default -> none: streams from other entrance ports are refused"
        in lines
    )
    assert "ReconnectMaxSec      30s" in lines
    assert "MaxStreams           1024 (a plain peer: fewer)" in lines


def test_format_tunnel_pipe_links_show_no_tls(tmp_path: Path, secret: Path) -> None:
    tunnel = load_body(tmp_path, f"FIFO=/run/a /run/b\nSecret={secret}\nEntrance=80\n")
    out = format_tunnel(tunnel)
    assert "Link                 FIFO=/run/a /run/b\n" in out
    assert "\nTLS " not in out and "\nReconnectMaxSec      30s\n" in out
    out = format_tunnel(load_body(tmp_path, f"Stdio=yes\nSecret={secret}\nEntrance=80\n"))
    assert "Link                 Stdio=yes\n" in out and "ReconnectMaxSec" not in out
    assert "Exit                 none: streams from the peer are refused" in out.splitlines()


# --------------------------------------------------------------------------- the man page

MAN_PAGE = Path(__file__).resolve().parents[2] / "docs" / "sockmuxd.conf.5.scd"


def _man_page_examples() -> list[str]:
    blocks = MAN_PAGE.read_text().split("```")[1::2]
    return [block.strip("\n") + "\n" for block in blocks if "[Tunnel]" in block]


def test_man_page_has_the_examples_the_brief_asks_for() -> None:
    examples = _man_page_examples()
    assert len(examples) >= 6
    joined = "\n".join(examples)
    for needle in ("TLS=yes", "Connect=", "FIFO=", "Authentication=none", "Exit=tcpmux"):
        assert needle in joined, needle
    assert any("Exit=" in line and line.split("=")[1].isdigit() for line in joined.splitlines())


@pytest.mark.parametrize("example", _man_page_examples())
def test_man_page_examples_load(tmp_path: Path, example: str) -> None:
    """Every tunnel file shown in sockmuxd.conf(5) is valid. The files it names under /etc are
    made in tmp_path (a secret with the right mode, PEM stand-ins); programs must exist."""
    first = example.splitlines()[0]
    name = Path(first[2:]).stem if first.startswith("# /") else "example"
    lines = []
    for line in example.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("Secret", "TLSCertificate", "TLSKey", "TLSCA"):
            assert value.startswith("/etc/tcpmuxd/"), line
            value = str(tmp_path / value.lstrip("/"))
            if key == "Secret":
                write_secret(Path(value))
            else:
                write(Path(value).parent, Path(value).name, "PEM\n")
            line = f"{key}={value}"
        if sep and (key == "Command" or value.startswith("exec:") or "=exec:" in value):
            program = value.split("exec:")[-1].split()[0]
            if not os.path.exists(program):
                pytest.skip(f"{program} not installed")
        lines.append(line)
    tunnel = load_text(tmp_path, "\n".join(lines) + "\n", name=name)
    assert tunnel.name == name
    format_tunnel(tunnel)


def test_man_page_documents_every_key() -> None:
    from tcpmuxd.sockmux.tunnel import KEYS

    text = MAN_PAGE.read_text()
    for key in KEYS:
        assert f"*{key}=" in text, key
