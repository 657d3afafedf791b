"""tcpmuxd.sockmux.tls: the contexts a link's TLS runs with, each tried in a real handshake
over loopback TCP with the throwaway certificates of conftest.py (sockmux_certs)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest

from tcpmuxd.sockmux.tls import TLSSettings, client_context, context, server_context

TIMEOUT = 10.0


def handshake(server: ssl.SSLContext, client: ssl.SSLContext,
              server_name: str | None = "localhost") -> dict[str, Any]:
    """One TLS connection from ``client`` to ``server`` over loopback: the server's view
    (``peer``: the client certificate it got, or ``server_error``) and the client's
    (``reply``: the server's greeting, or ``client_error``). With TLS 1.3 a client the server
    refuses finishes its handshake first and meets the server's alert on its first read."""
    result: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            try:
                with server.wrap_socket(conn, server_side=True) as tls:
                    result["peer"] = tls.getpeercert()
                    tls.sendall(b"hi")
            except (ssl.SSLError, OSError) as exc:
                result["server_error"] = exc
            finally:
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw:
                with client.wrap_socket(raw, server_hostname=server_name) as tls:
                    result["reply"] = tls.recv(2)
        except (ssl.SSLError, OSError) as exc:
            result["client_error"] = exc
        finally:
            thread.join(TIMEOUT)
    assert not thread.is_alive()
    return result


def test_contexts_check_their_settings() -> None:
    c = client_context(TLSSettings())
    assert c.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert c.verify_mode == ssl.CERT_REQUIRED and c.check_hostname
    insecure = client_context(TLSSettings(require_peer_certificate=False))
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    with pytest.raises(ValueError):
        client_context(TLSSettings(ca="/nonexistent", require_peer_certificate=False))
    with pytest.raises(ValueError):
        client_context(TLSSettings(key="/some.key"))
    with pytest.raises(ValueError):
        server_context(TLSSettings(require_peer_certificate=False))
    with pytest.raises(ValueError, match="the CA"):
        server_context(TLSSettings(certificate="/some.pem"))


def test_server_context_modes(sockmux_certs: Any) -> None:
    certs = sockmux_certs
    required = server_context(TLSSettings(certificate=certs.server_cert, key=certs.server_key,
                                          ca=certs.ca))
    assert required.verify_mode == ssl.CERT_REQUIRED
    assert required.minimum_version >= ssl.TLSVersion.TLSv1_2
    optional = server_context(TLSSettings(certificate=certs.server_cert, key=certs.server_key,
                                          ca=certs.ca, require_peer_certificate=False))
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    anyone = server_context(TLSSettings(certificate=certs.server_cert, key=certs.server_key,
                                        require_peer_certificate=False))
    assert anyone.verify_mode == ssl.CERT_NONE


def test_mutual_authentication(sockmux_certs: Any) -> None:
    """A receptor requiring client certificates takes one from its CA, refuses a client
    without one and a client whose certificate another CA signed."""
    certs = sockmux_certs
    server = server_context(TLSSettings(certificate=certs.server_cert, key=certs.server_key,
                                        ca=certs.ca))
    good = client_context(TLSSettings(certificate=certs.client_cert, key=certs.client_key,
                                      ca=certs.ca))
    result = handshake(server, good)
    assert result["reply"] == b"hi"
    assert dict(x[0] for x in result["peer"]["subject"])["commonName"] == "client"

    anonymous = handshake(server, client_context(TLSSettings(ca=certs.ca)))
    assert "reply" not in anonymous and "peer" not in anonymous
    assert isinstance(anonymous["server_error"], ssl.SSLError)

    rogue = client_context(TLSSettings(certificate=certs.rogue_client_cert,
                                       key=certs.rogue_client_key, ca=certs.ca))
    refused = handshake(server, rogue)
    assert "peer" not in refused and "reply" not in refused
    assert "certificate verify failed" in str(refused["server_error"])


def test_optional_client_certificate(sockmux_certs: Any) -> None:
    """Not required but a CA given: a client without a certificate is served, one with a
    certificate has it verified."""
    certs = sockmux_certs
    server = server_context(TLSSettings(certificate=certs.server_cert, key=certs.server_key,
                                        ca=certs.ca, require_peer_certificate=False))
    anonymous = handshake(server, client_context(TLSSettings(ca=certs.ca)))
    assert anonymous["reply"] == b"hi" and anonymous["peer"] is None
    rogue = client_context(TLSSettings(certificate=certs.rogue_client_cert,
                                       key=certs.rogue_client_key, ca=certs.ca))
    assert "certificate verify failed" in str(handshake(server, rogue)["server_error"])


def test_client_checks_the_receptor(sockmux_certs: Any) -> None:
    """The connector verifies chain and name (a DNS name or an IP address in the
    certificate); a pinned self-signed certificate is the only one it takes; without
    verification it takes any receptor."""
    certs = sockmux_certs
    server = server_context(TLSSettings(certificate=certs.server_cert, key=certs.server_key,
                                        require_peer_certificate=False))
    client = client_context(TLSSettings(ca=certs.ca))
    assert handshake(server, client)["reply"] == b"hi"
    assert handshake(server, client, "127.0.0.1")["reply"] == b"hi"
    wrong_name = handshake(server, client, "gw.example.net")["client_error"]
    assert isinstance(wrong_name, ssl.SSLCertVerificationError)
    assert "gw.example.net" in str(wrong_name)
    wrong_ca = handshake(server, client_context(TLSSettings(ca=certs.rogue_ca)))["client_error"]
    assert isinstance(wrong_ca, ssl.SSLCertVerificationError)

    pinned = server_context(TLSSettings(certificate=certs.pinned_cert, key=certs.pinned_key,
                                        require_peer_certificate=False))
    assert handshake(pinned, client_context(TLSSettings(ca=certs.pinned_cert)))["reply"] == b"hi"
    other = client_context(TLSSettings(ca=certs.other_pinned_cert))
    assert isinstance(handshake(pinned, other)["client_error"], ssl.SSLCertVerificationError)

    blind = client_context(TLSSettings(require_peer_certificate=False))
    assert handshake(pinned, blind, "anything.example")["reply"] == b"hi"


def test_context_says_which_file_does_not_load(sockmux_certs: Any, tmp_path: Path) -> None:
    """context() is what --check and the daemon's start-up report: every file problem a
    ValueError naming the file, never an ssl or OS exception."""
    certs = sockmux_certs
    missing = TLSSettings(certificate=tmp_path / "none.pem", key=certs.server_key,
                          require_peer_certificate=False)
    with pytest.raises(ValueError, match=rf"^TLS: {tmp_path}/none.pem: No such file"):
        context(missing, server_side=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"^TLS: "):
        context(TLSSettings(certificate=junk, key=certs.server_key,
                            require_peer_certificate=False), server_side=True)
    mismatch = TLSSettings(certificate=certs.server_cert, key=certs.client_key,
                           require_peer_certificate=False)
    with pytest.raises(ValueError, match=r"^TLS: "):
        context(mismatch, server_side=True)
    with pytest.raises(ValueError, match=r"^TLS: "):
        context(TLSSettings(ca=junk), server_side=False)
    good = TLSSettings(certificate=certs.server_cert, key=certs.server_key, ca=certs.ca)
    assert context(good, server_side=True).verify_mode == ssl.CERT_REQUIRED
    assert context(TLSSettings(ca=certs.ca), server_side=False).check_hostname
