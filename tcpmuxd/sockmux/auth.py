"""Mutual shared-secret authentication for SockMux links (a tcpmuxd extension).

Both peers hold the same secret. Each sends a fresh random nonce; each then proves knowledge of
the secret with::

    proof(prover) = HMAC-SHA256(secret, transcript(prover, verifier))

    transcript(P, V) = "sockmuxd-auth-v1" NUL "proof" NUL
                       lp(nonce_P) lp(nonce_V) lp(hello_P) lp(hello_V) lp(ext_P) lp(ext_V)

where ``lp(x)`` is ``x`` preceded by its length as a big-endian u16, ``hello_X`` is the HELLO text
X sent and ``ext_X`` the extension announcement X sent (the raw SETOPT data, empty if none).

* The secret never travels; a passive observer learns only HMAC outputs.
* Replay: every proof covers the verifier's fresh nonce, so an old proof never verifies again.
* Reflection: each side proves with *its own* ordering (its nonce first), so a proof copied back
  at its author does not match what the author expects; a peer echoing our own nonce back is
  refused outright (:func:`check_peer_nonce`).
* Downgrade: the transcript binds both hello texts and both extension announcements, so a
  man in the middle that alters the negotiation (strips half-close, lowers limits) breaks the
  proofs.

Resumption (docs/sockmux-protocol.md, section 12) derives a session's id and key from the
secret and the nonces of the link that started it (:func:`session_keys`), and each side proves
it holds that key on a new link with :func:`resume_mac`, over the new link's fresh nonces.

This module only computes; the exchange itself (frame type AUTH, ops ``N``/``P``/``F``) is
driven by :class:`tcpmuxd.sockmux.connection.SockMuxConnection`.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["NONCE_SIZE", "PROOF_SIZE", "OP_NONCE", "OP_PROOF", "OP_FAIL", "transcript",
           "make_proof", "check_proof", "check_peer_nonce", "session_keys", "resume_mac",
           "check_resume_mac"]

NONCE_SIZE = 32
PROOF_SIZE = hashlib.sha256().digest_size  # 32
#: First payload byte of an AUTH frame.
OP_NONCE = ord("N")
OP_PROOF = ord("P")
OP_FAIL = ord("F")

_DOMAIN = b"sockmuxd-auth-v1\0proof\0"


def _lp(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("transcript element too long")
    return len(data).to_bytes(2, "big") + data


def transcript(prover_nonce: bytes, verifier_nonce: bytes, prover_hello: bytes,
               verifier_hello: bytes, prover_ext: bytes, verifier_ext: bytes) -> bytes:
    return b"".join((_DOMAIN, _lp(prover_nonce), _lp(verifier_nonce), _lp(prover_hello),
                     _lp(verifier_hello), _lp(prover_ext), _lp(verifier_ext)))


def make_proof(secret: bytes, prover_nonce: bytes, verifier_nonce: bytes, prover_hello: bytes,
               verifier_hello: bytes, prover_ext: bytes, verifier_ext: bytes) -> bytes:
    """The prover's proof for this session."""
    message = transcript(prover_nonce, verifier_nonce, prover_hello, verifier_hello,
                         prover_ext, verifier_ext)
    return hmac.new(secret, message, hashlib.sha256).digest()


def check_proof(secret: bytes, proof: bytes, prover_nonce: bytes, verifier_nonce: bytes,
                prover_hello: bytes, verifier_hello: bytes, prover_ext: bytes,
                verifier_ext: bytes) -> bool:
    """Constant-time check of a proof received from the prover."""
    expected = make_proof(secret, prover_nonce, verifier_nonce, prover_hello, verifier_hello,
                          prover_ext, verifier_ext)
    return hmac.compare_digest(expected, proof)


def check_peer_nonce(own_nonce: bytes, peer_nonce: bytes) -> str | None:
    """Why ``peer_nonce`` is unacceptable, or ``None`` if it is fine."""
    if len(peer_nonce) != NONCE_SIZE:
        return f"peer's nonce is {len(peer_nonce)} bytes, expected {NONCE_SIZE}"
    if hmac.compare_digest(own_nonce, peer_nonce):
        return "peer sent our own nonce back (reflection)"
    return None


_RESUME_DOMAIN = b"sockmuxd-resume-v1\0"


def session_keys(secret: bytes, nonce_a: bytes, nonce_b: bytes) -> tuple[bytes, bytes]:
    """``(session id, resume key)`` of a session whose first link had these two nonces.

    The nonces are taken in byte order, so both peers derive the same. The id (16 bytes) is a
    public handle; the key never travels."""
    lo, hi = sorted((nonce_a, nonce_b))
    tail = _lp(lo) + _lp(hi)
    key = hmac.new(secret, _RESUME_DOMAIN + b"key\0" + tail, hashlib.sha256).digest()
    sid = hmac.new(secret, _RESUME_DOMAIN + b"id\0" + tail, hashlib.sha256).digest()[:16]
    return sid, key


def resume_mac(key: bytes, op: int, session_id: bytes, count: int, prover_nonce: bytes,
               verifier_nonce: bytes) -> bytes:
    """The prover's mac in RESUME ``R``/``A``: bound to the session's key, to what it claims
    (op, id, count) and to this link's fresh nonces (no replay), in the prover's order (no
    reflection)."""
    message = b"".join((_RESUME_DOMAIN, b"resume\0", bytes((op,)), _lp(session_id),
                        count.to_bytes(8, "big"), _lp(prover_nonce), _lp(verifier_nonce)))
    return hmac.new(key, message, hashlib.sha256).digest()


def check_resume_mac(key: bytes, mac: bytes, op: int, session_id: bytes, count: int,
                     prover_nonce: bytes, verifier_nonce: bytes) -> bool:
    """Constant-time check of a RESUME mac received from the prover."""
    expected = resume_mac(key, op, session_id, count, prover_nonce, verifier_nonce)
    return hmac.compare_digest(expected, mac)
