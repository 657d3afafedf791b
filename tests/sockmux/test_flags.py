"""tcpmuxd.sockmux.flags: the command line's tunnel flags are tunnel-file keys, validated by
the file's one set of rules. Each tunnel here is given both ways, as flags and as a file in
tmp_path, and the two must give the same tunnel, or the same errors."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from tcpmuxd.sockmux import flags
from tcpmuxd.sockmux.daemon import build_parser
from tcpmuxd.sockmux.flags import UsageError
from tcpmuxd.sockmux.tunnel import Tunnel, TunnelConfigError, load_tunnel

SECRET = b"0123456789abcdef0123456789abcdef\n"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "gw.secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    """Stands in for certificate, key and CA files: loading only checks that they exist."""
    path = tmp_path / "x.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return path


def parse(argv: list[str]) -> Any:
    return build_parser().parse_args(flags.translate_delegate(argv))


def from_flags(argv: list[str]) -> Tunnel:
    return flags.apply_overrides(flags.tunnel_from_args(parse(argv)), parse(argv))


def from_file(tmp_path: Path, body: str) -> Tunnel:
    directory = tmp_path / "sockmux.d"
    directory.mkdir(exist_ok=True)
    (directory / "gw.conf").write_text("[Tunnel]\n" + body)
    return load_tunnel("gw", [directory])


def same(flagged: Tunnel, filed: Tunnel) -> bool:
    return dataclasses.replace(flagged, name=filed.name, source=filed.source) == filed


CASES = [
    ("connect {secret}",
     ["--connect", "gw.example.net:7000", "--secret", "{secret}", "--entrance", "5432",
      "--entrance", "[::]:80", "--exit", "8080=tcpmux", "--exit", "127.0.0.1:22"],
     "Connect=gw.example.net:7000\nSecret={secret}\nEntrance=5432\nEntrance=[::]:80\n"
     "Exit=8080=tcpmux\nExit=127.0.0.1:22\n"),
    ("accept, TLS, receptor limits",
     ["--accept", "[::]:7000", "--no-auth", "--exit", "tcpmux", "--tls-cert", "{pem}",
      "--tls-key", "{pem}", "--tls-ca", "{pem}", "--tls-no-verify", "--max-pending-links",
      "1024", "--failure-delay", "0s"],
     "Accept=[::]:7000\nAuthentication=none\nExit=tcpmux\nTLS=yes\nTLSCertificate={pem}\n"
     "TLSKey={pem}\nTLSCA={pem}\nTLSRequirePeerCertificate=no\nMaxPendingLinks=1024\n"
     "FailureDelaySec=0s\n"),
    ("connect, TLS by name",
     ["--connect", "192.0.2.1:7000", "--secret", "{secret}", "--exit", "h:1", "--tls",
      "--tls-server-name", "gw.example.net", "--reconnect-max", "2min"],
     "Connect=192.0.2.1:7000\nSecret={secret}\nExit=h:1\nTLS=yes\n"
     "TLSServerName=gw.example.net\nReconnectMaxSec=2min\n"),
    ("FIFOs relative to the working directory, plain protocol",
     ["--fifo", "in,out", "--no-auth", "--no-extensions", "--exit", "tcpmux"],
     "FIFO={tmp}/in {tmp}/out\nAuthentication=none\nExtensions=no\nExit=tcpmux\n"),
    ("a device",
     ["--comm", "/dev/fd/5", "--secret", "{secret}", "--entrance", "127.0.0.1:80"],
     "Device=/dev/fd/5\nSecret={secret}\nEntrance=127.0.0.1:80\n"),
    ("a command found in PATH",
     ["--command", "sh -c 'exec cat'", "--secret", "{secret}", "--exit", "unix:/run/x.sock"],
     "Command={sh} -c 'exec cat'\nSecret={secret}\nExit=unix:/run/x.sock\n"),
    ("stdio and every limit at an edge",
     ["--stdio", "--secret", "{secret}", "--entrance", "fd:web", "--max-streams", "65533",
      "--keepalive", "5s", "--dead-peer", "1min", "--connect-timeout", "3", "--window", "4K",
      "--frame-size", "65543", "--stream-log-rate", "0", "--send-timeout", "9s",
      "--handshake-timeout", "4s", "--hold", "0", "--first-data-wait", "0",
      "--reply-wait", "1s"],
     "Stdio=yes\nSecret={secret}\nEntrance=fd:web\nMaxStreams=65533\nKeepAliveSec=5s\n"
     "DeadPeerSec=1min\nConnectTimeoutSec=3\nWindowSize=4K\nFrameSize=65543\n"
     "StreamLogRate=0\nSendTimeoutSec=9s\nHandshakeTimeoutSec=4s\nHoldSec=0\n"
     "FirstDataWaitSec=0\nReplyWaitSec=1s\n"),
    ("DeleGate's spelling",
     ["-P127.0.0.1:8000", "PORT=9000-9001", "SERVER=telnet://10.0.0.1,-in:-:-P9001",
      "--no-auth"],
     "Accept=127.0.0.1:8000\nEntrance=9000\nEntrance=9001\nExit=9001=10.0.0.1:23\n"
     "Authentication=none\n"),
]


@pytest.mark.parametrize("what, argv, body", CASES, ids=[c[0] for c in CASES])
def test_flags_and_file_give_the_same_tunnel(tmp_path: Path, monkeypatch: Any, secret: Path,
                                             pem: Path, what: str, argv: list[str],
                                             body: str) -> None:
    monkeypatch.chdir(tmp_path)
    values = {"secret": secret, "pem": pem, "tmp": tmp_path, "sh": shutil.which("sh")}
    flagged = from_flags([a.format(**values) for a in argv])
    filed = from_file(tmp_path, body.format(**values))
    assert same(flagged, filed), (flagged, filed)


ERRORS = [
    ("no secret", ["--connect", "h:1", "--exit", "h:2"], "Connect=h:1\nExit=h:2\n"),
    ("three at once",
     ["--accept", "7000", "--no-auth", "--exit", "h:2", "--exit", "h:3", "--keepalive", "1min",
      "--dead-peer", "30s"],
     "Accept=7000\nAuthentication=none\nExit=h:2\nExit=h:3\nKeepAliveSec=1min\n"
     "DeadPeerSec=30s\n"),
    ("TLS on a pipe, a receptor's key on a connector",
     ["--fifo", "/a,/b", "--no-auth", "--exit", "h:2", "--tls-ca", "{pem}"],
     "FIFO=/a /b\nAuthentication=none\nExit=h:2\nTLS=yes\nTLSCA={pem}\n"),
    ("two links, overlapping entrances",
     ["--connect", "h:1", "--stdio", "--no-auth", "--entrance", "80", "--entrance",
      "127.0.0.1:80"],
     "Connect=h:1\nStdio=yes\nAuthentication=none\nEntrance=80\nEntrance=127.0.0.1:80\n"),
    ("a secret with no authentication, and extensions off",
     ["--connect", "h:1", "--no-auth", "--secret", "{secret}", "--no-extensions",
      "--max-pending-links", "4", "--exit", "tcpmux"],
     "Connect=h:1\nAuthentication=none\nSecret={secret}\nExtensions=no\n"
     "MaxPendingLinks=4\nExit=tcpmux\n"),
    ("nothing to carry, TLS needs a certificate",
     ["--accept", "0.0.0.0:1", "--no-auth", "--tls"],
     "Accept=0.0.0.0:1\nAuthentication=none\nTLS=yes\n"),
]


@pytest.mark.parametrize("what, argv, body", ERRORS, ids=[c[0] for c in ERRORS])
def test_flags_and_file_fail_alike(tmp_path: Path, secret: Path, pem: Path, what: str,
                                   argv: list[str], body: str) -> None:
    values = {"secret": secret, "pem": pem}
    with pytest.raises(UsageError) as flagged:
        from_flags([a.format(**values) for a in argv])
    with pytest.raises(TunnelConfigError) as filed:
        from_file(tmp_path, body.format(**values))
    assert len(flagged.value.args) == len(filed.value.errors) > 0, (
        flagged.value.args, [e.message for e in filed.value.errors])


def test_messages_name_the_flags(tmp_path: Path, secret: Path) -> None:
    with pytest.raises(UsageError) as exc:
        from_flags(["--connect", "h:1", "--exit", "h:2"])
    assert exc.value.args == (
        "authentication (the default) needs --secret FILE, the same secret on both peers: "
        "create it with 'umask 077; head -c 32 /dev/urandom | base64 > FILE' and copy it to "
        "the peer; for a DeleGate peer in plain mode set --no-auth instead",)
    with pytest.raises(UsageError) as exc:
        from_flags(["--accept", "[::]:1", "--no-auth", "--exit", "h:1", "--exit", "h:2",
                    "--entrance", "80", "--entrance", "80", "--exit", "x:1",
                    "--connect-timeout", "0", "--tls"])
    assert exc.value.args == (  # in the order of --help
        "--entrance 80 is given twice (first given earlier)",
        "a second default --exit (the first is given earlier): give the others an "
        "ENTRANCEPORT= prefix",
        "a second default --exit (the first is given earlier): give the others an "
        "ENTRANCEPORT= prefix",
        "--tls on an --accept tunnel needs --tls-cert and --tls-key (this side's "
        "certificate and its private key)",
        "--connect-timeout: '0': the timeout must be greater than zero",
    )


def test_empty_arguments_are_not_given(secret: Path) -> None:
    """An empty flag argument resets its key, as an empty assignment in a file does."""
    with pytest.raises(UsageError, match="needs --secret FILE"):
        from_flags(["--connect", "h:1", "--exit", "h:2", "--secret", ""])


def test_no_tunnel_at_all() -> None:
    with pytest.raises(UsageError, match=r"^no tunnel: give NAME .* --stdio or --command$"):
        from_flags([])


def test_overrides_go_with_a_file(tmp_path: Path, secret: Path) -> None:
    """--hold, --first-data-wait and --reply-wait replace the file's keys when given."""
    from_file(tmp_path, f"Connect=h:1\nSecret={secret}\nExit=h:2\nHoldSec=1s\n")
    args = parse(["gw", "--config-dir", str(tmp_path / "sockmux.d"), "--hold", "5",
                  "--reply-wait", "0"])
    assert flags.given(args) == []
    tunnel = flags.apply_overrides(load_tunnel("gw", [tmp_path / "sockmux.d"]), args)
    assert (tunnel.hold, tunnel.first_data_wait, tunnel.reply_wait) == (5.0, 0.001, 0.0)
    args = parse(["gw"])
    tunnel = flags.apply_overrides(load_tunnel("gw", [tmp_path / "sockmux.d"]), args)
    assert (tunnel.hold, tunnel.first_data_wait, tunnel.reply_wait) == (1.0, 0.001, 0.05)
    with pytest.raises(SystemExit):
        parse(["gw", "--hold", "soon"])
