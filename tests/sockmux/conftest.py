"""Fixtures for the SockMux tests: throwaway TLS material made with the openssl command line;
the DeleGate interop figures printed at the end of the run."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from delegate_peer import THROUGHPUT


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA with a server and a client certificate, a second ("rogue") CA with its
    own server and client certificates, and two self-signed server certificates for pinning.
    Every server certificate names localhost and 127.0.0.1."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_ca: str
    rogue_server_cert: str
    rogue_server_key: str
    rogue_client_cert: str
    rogue_client_key: str
    pinned_cert: str
    pinned_key: str
    other_pinned_cert: str
    other_pinned_key: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _key(cwd: Path, name: str) -> str:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", f"{name}.key", cwd=cwd)
    return str(cwd / f"{name}.key")


def _ca(cwd: Path, name: str) -> str:
    _key(cwd, name)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)
    return str(cwd / f"{name}.pem")


def _leaf(cwd: Path, name: str, ca: str, *, server: bool) -> tuple[str, str]:
    key = _key(cwd, name)
    _openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={'localhost' if server else name}", cwd=cwd)
    ext = cwd / f"{name}.ext"
    lines = ["basicConstraints=critical,CA:FALSE",
             "keyUsage=critical,digitalSignature",
             f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}"]
    if server:
        lines.append("subjectAltName=DNS:localhost,IP:127.0.0.1")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", ext.name, cwd=cwd)
    return str(cwd / f"{name}.pem"), key


def _self_signed(cwd: Path, name: str) -> tuple[str, str]:
    key = _key(cwd, name)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", "/CN=localhost",
             "-addext", "basicConstraints=critical,CA:FALSE",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-addext", "extendedKeyUsage=serverAuth", cwd=cwd)
    return str(cwd / f"{name}.pem"), key


@pytest.fixture(scope="session")
def sockmux_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "ca")
    server_cert, server_key = _leaf(d, "server", "ca", server=True)
    client_cert, client_key = _leaf(d, "client", "ca", server=False)
    rogue_ca = _ca(d, "rogue")
    rogue_server_cert, rogue_server_key = _leaf(d, "rogue-server", "rogue", server=True)
    rogue_client_cert, rogue_client_key = _leaf(d, "rogue-client", "rogue", server=False)
    pinned_cert, pinned_key = _self_signed(d, "pinned")
    other_cert, other_key = _self_signed(d, "other-pinned")
    return Certs(ca, server_cert, server_key, client_cert, client_key, rogue_ca,
                 rogue_server_cert, rogue_server_key, rogue_client_cert, rogue_client_key,
                 pinned_cert, pinned_key, other_cert, other_key)


def pytest_terminal_summary(terminalreporter):
    """The 64 MiB figures of tests/sockmux/test_delegate_live.py, pair by pair."""
    if not THROUGHPUT:
        return
    terminalreporter.section("DeleGate interop throughput (64 MiB streams, MB/s)")
    for pair, what, rate in THROUGHPUT:
        terminalreporter.write_line(f"{rate:8.1f}  {pair}: {what}")
