"""The draw key: Ed25519 signatures on entries, so a citizen left out of the list can prove they
entered.

Formats (all base64url, RFC 4648 section 5, written without ``=`` padding, read with or without):

* the signed statement, UTF-8: ``"allot-entry-1\\n{round_id}\\n{receipt}\\n{site_id}\\n{0|1}\\n"``
  (the last field is accept_district);
* ``signature``: the 64-byte Ed25519 signature;
* ``public_key`` (``GET /api/v1/draw-key``): the raw 32-byte Ed25519 public key;
* ``ALLOT_DRAW_KEY``: the raw 32-byte Ed25519 private key (the seed of RFC 8032), e.g. made by
  ``python -c "from allocator.receipts import DrawKey; print(DrawKey.generate().private_text())"``
  or ``openssl genpkey -algorithm ed25519 -outform DER | tail -c 32 | basenc --base64url``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

import nacl.bindings
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)


class DrawKeyError(ValueError):
    """A key or signature text that is not what the formats above say."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, length: int, what: str) -> bytes:
    """Decode base64url (padding optional) to exactly ``length`` bytes, or DrawKeyError."""
    body = text.strip().rstrip("=")
    if not body or any(c not in _ALPHABET for c in body):
        raise DrawKeyError(f"{what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as exc:
        raise DrawKeyError(f"{what} is not base64url") from exc
    if len(raw) != length:
        raise DrawKeyError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def entry_statement(round_id: str, receipt: str, site_id: str, accept_district: bool) -> bytes:
    """The bytes the draw key signs for one entry (its last choice before close)."""
    return f"allot-entry-1\n{round_id}\n{receipt}\n{site_id}\n{int(accept_district)}\n".encode()


@dataclass(frozen=True, slots=True)
class DrawKey:
    """The service's Ed25519 draw key."""

    private: Ed25519PrivateKey
    # The key in libsodium's form (seed and public key, 64 bytes), for signing: every entry's
    # answer carries a signature, and libsodium's (PyNaCl) takes 14 µs of the worker's CPU here
    # where OpenSSL's (cryptography) takes 35. Ed25519 signatures are deterministic (RFC 8032),
    # so both give the same bytes (tests/test_draw.py compares them); cryptography keeps
    # the key's loading, export and verification.
    _signing: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        seed = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        object.__setattr__(self, "_signing", nacl.bindings.crypto_sign_seed_keypair(seed)[1])

    @classmethod
    def generate(cls) -> DrawKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_text(cls, text: str) -> DrawKey:
        """Load ``ALLOT_DRAW_KEY``: base64url of the raw 32-byte private key."""
        return cls(Ed25519PrivateKey.from_private_bytes(b64url_decode(text, 32, "ALLOT_DRAW_KEY")))

    def private_text(self) -> str:
        """The ``ALLOT_DRAW_KEY`` form of this key (a secret: store it as one)."""
        raw = self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return b64url(raw)

    def public_key(self) -> str:
        """``public_key`` of ``GET /api/v1/draw-key``."""
        return b64url(self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign_entry(self, round_id: str, receipt: str, site_id: str, accept_district: bool) -> str:
        """An Entry's ``signature``."""
        statement = entry_statement(round_id, receipt, site_id, accept_district)
        signed = nacl.bindings.crypto_sign(statement, self._signing)  # signature + statement
        return b64url(signed[: nacl.bindings.crypto_sign_BYTES])


def verify_entry(
    public_key: str,
    signature: str,
    round_id: str,
    receipt: str,
    site_id: str,
    accept_district: bool,
) -> bool:
    """Whether ``signature`` is the draw key's over this entry; False for malformed inputs too."""
    try:
        key = Ed25519PublicKey.from_public_bytes(b64url_decode(public_key, 32, "public_key"))
        sig = b64url_decode(signature, 64, "signature")
    except DrawKeyError:
        return False
    try:
        key.verify(sig, entry_statement(round_id, receipt, site_id, accept_district))
    except InvalidSignature:
        return False
    return True
