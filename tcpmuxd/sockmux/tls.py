"""TLS settings and contexts for SockMux links over TCP.

Both ends use TLS 1.2 or later with the ssl module's defaults for ciphers and options (no
compression, no renegotiation on the server side). Verification is on unless it is switched
off explicitly:

* **Client (connector).** ``require_peer_certificate=True`` (the default) verifies the
  receptor's certificate against ``ca``, or the system trust store when ``ca`` is None, and
  checks the name: ``server_name`` when set, else the host that was dialled (an IP address is
  matched against IP subjectAltNames). ``ca`` may hold a CA bundle or just the receptor's own
  self-signed certificate: the latter *pins* that certificate, since it is then the only trust
  anchor. ``require_peer_certificate=False`` encrypts without authenticating the receptor
  (only sensible when the SockMux layer authenticates the peers itself); a ``ca`` is then
  refused rather than silently ignored.
* **Server (receptor).** ``certificate`` (and ``key`` unless the key is in ``certificate``) is
  required. ``require_peer_certificate=True`` (the default) demands a client certificate signed
  by a CA in ``ca`` (mutual authentication); with ``require_peer_certificate=False`` and a
  ``ca``, a client certificate is verified when one is offered; with neither, any client is
  accepted.

:class:`TLSSettings` is also what a tunnel's TLS keys (``TLSCertificate=`` ... in
sockmuxd.conf(5), ``--tls-cert`` ... on the command line) give: :mod:`tcpmuxd.sockmux.tunnel`
checks them together with the link, and :func:`context` makes the link's context.

With TLS 1.3 the client finishes its side of the handshake before the server has checked the
client certificate: a client the server refuses sees its connect succeed, then the link lost
with the server's alert as an ``ssl.SSLError`` (e.g. "certificate required"). The server never
hands such a link up, and logs why it refused it. The links themselves run on
:mod:`tcpmuxd.sockmux.tlslink`, not the event loop's TLS.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TLSSettings", "client_context", "server_context", "context", "MINIMUM_VERSION"]

#: The oldest protocol version either side accepts.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class TLSSettings:
    """What one peer needs for TLS; see the module docstring for each role's meaning.

    ``certificate``/``key``: this peer's certificate chain and private key (PEM). ``ca``: the
    trust anchors for the other peer's certificate (a CA bundle, or the peer's own certificate
    to pin it). ``server_name``: the name a connector checks the receptor's certificate
    against (None: the dialled host; pass it on to
    :func:`~tcpmuxd.sockmux.links.connect_tcp`). ``require_peer_certificate``: verify the other
    peer (client: the receptor; server: demand a client certificate).
    """

    certificate: Path | str | None = None
    key: Path | str | None = None
    ca: Path | str | None = None
    server_name: str | None = None
    require_peer_certificate: bool = True


def client_context(t: TLSSettings) -> ssl.SSLContext:
    """The context a connector dials with. Raises ValueError for contradictory settings."""
    if t.key and not t.certificate:
        raise ValueError("a key given without its certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    if t.require_peer_certificate:
        if t.ca:
            ctx.load_verify_locations(cafile=t.ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        if t.ca:
            raise ValueError("a CA given, but the peer's certificate is not to be verified: "
                             "the receptor's certificate would not be checked")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if t.certificate:
        ctx.load_cert_chain(t.certificate, t.key)
    return ctx


def server_context(t: TLSSettings) -> ssl.SSLContext:
    """The context a receptor accepts with. Raises ValueError for incomplete settings."""
    if not t.certificate:
        raise ValueError("a TLS receptor needs its certificate (and key unless the key is in "
                         "the certificate's file)")
    if t.require_peer_certificate and not t.ca:
        raise ValueError("requiring client certificates needs the CA that signs them; do not "
                         "require them to accept any client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.load_cert_chain(t.certificate, t.key)
    if t.ca:
        ctx.load_verify_locations(cafile=t.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if t.require_peer_certificate else ssl.CERT_OPTIONAL
    return ctx


def context(t: TLSSettings, *, server_side: bool) -> ssl.SSLContext:
    """:func:`server_context` or :func:`client_context`, with every failure to load a file
    (missing, unreadable, not PEM, a key that does not match) as a ValueError that says which
    file and why: ``sockmuxd --check`` and the daemon's start-up report it as it is."""
    try:
        for path in (t.certificate, t.key, t.ca):
            if path:  # OpenSSL's loaders raise OSError without the file's name
                with open(path, "rb"):
                    pass
        return server_context(t) if server_side else client_context(t)
    except ssl.SSLError as exc:
        raise ValueError(f"TLS: {exc.reason or exc}") from None
    except OSError as exc:
        raise ValueError(f"TLS: {exc.filename or ''}: {exc.strerror}") from None
