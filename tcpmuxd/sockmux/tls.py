"""TLS settings and contexts for SockMux links over TCP.

Both ends use TLS 1.2 or later with the ssl module's defaults for ciphers and options (no
compression, no renegotiation on the server side). Verification is on unless it is switched
off explicitly:

* **Client (connector).** ``require_peer_cert=True`` (the default) verifies the receptor's
  certificate against ``cafile``, or the system trust store when ``cafile`` is None, and checks
  the name: ``server_hostname`` when set, else the host that was dialled (an IP address is
  matched against IP subjectAltNames). ``cafile`` may hold a CA bundle or just the receptor's
  own self-signed certificate: the latter *pins* that certificate, since it is then the only
  trust anchor. ``require_peer_cert=False`` encrypts without authenticating the receptor (only
  sensible when the SockMux layer authenticates the peers itself); a ``cafile`` is then refused
  rather than silently ignored.
* **Server (receptor).** ``certfile`` (and ``keyfile`` unless the key is in ``certfile``) is
  required. ``require_peer_cert=True`` (the default) demands a client certificate signed by a
  CA in ``cafile`` (mutual authentication); with ``require_peer_cert=False`` and a ``cafile``,
  a client certificate is verified when one is offered; with neither, any client is accepted.

With TLS 1.3 the client finishes its side of the handshake before the server has checked the
client certificate: a client the server refuses sees its connect succeed, then the link lost
with the server's alert as an ``ssl.SSLError`` (e.g. "certificate required"). The server never
hands such a link up, and logs why it refused it. The links themselves run on
:mod:`tcpmuxd.sockmux.tlslink`, not the event loop's TLS.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

__all__ = ["TLSSettings", "client_context", "server_context", "MINIMUM_VERSION"]

#: The oldest protocol version either side accepts.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True)
class TLSSettings:
    """What one peer needs for TLS; see the module docstring for each role's meaning.

    certfile/keyfile: this peer's certificate chain and private key (PEM). cafile: the trust
    anchors for the other peer's certificate (a CA bundle, or the peer's own certificate to pin
    it). require_peer_cert: verify the other peer (client: the receptor; server: demand a client
    certificate). server_hostname: the name a connector checks the receptor's certificate
    against (None: the dialled host); pass it on to :func:`~tcpmuxd.sockmux.links.connect_tcp`.
    """

    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    require_peer_cert: bool = True
    server_hostname: str | None = None


def client_context(t: TLSSettings) -> ssl.SSLContext:
    """The context a connector dials with. Raises ValueError for contradictory settings."""
    if t.keyfile and not t.certfile:
        raise ValueError("keyfile given without certfile")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    if t.require_peer_cert:
        if t.cafile:
            ctx.load_verify_locations(cafile=t.cafile)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        if t.cafile:
            raise ValueError("cafile given but require_peer_cert is False: "
                             "the receptor's certificate would not be checked")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if t.certfile:
        ctx.load_cert_chain(t.certfile, t.keyfile)
    return ctx


def server_context(t: TLSSettings) -> ssl.SSLContext:
    """The context a receptor accepts with. Raises ValueError for incomplete settings."""
    if not t.certfile:
        raise ValueError("a TLS receptor needs certfile (and keyfile unless the key is in it)")
    if t.require_peer_cert and not t.cafile:
        raise ValueError("require_peer_cert needs cafile (the CA that signs client "
                         "certificates); set require_peer_cert=False to accept any client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.load_cert_chain(t.certfile, t.keyfile)
    if t.cafile:
        ctx.load_verify_locations(cafile=t.cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED if t.require_peer_cert else ssl.CERT_OPTIONAL
    return ctx
