"""Ed25519 key material as files' bytes: PEM (PKCS#8 private, SubjectPublicKeyInfo public).

Sans-IO: callers read and write the files; these functions only convert bytes.
Private keys may be passphrase-protected (the fleet CA key usually is).
"""

from __future__ import annotations

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.signing import SigningKey, VerifyKey

from maskfl.protocol.errors import CryptoError

__all__ = [
    "public_key_from_pem",
    "public_key_to_pem",
    "signing_key_from_pem",
    "signing_key_to_pem",
]


def signing_key_to_pem(key: SigningKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM of an Ed25519 signing key, encrypted when a passphrase is given."""
    private = Ed25519PrivateKey.from_private_bytes(bytes(key))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def signing_key_from_pem(data: bytes, passphrase: bytes | None = None) -> SigningKey:
    """Load an Ed25519 signing key; a wrong passphrase or another key type is a CryptoError."""
    try:
        private = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"cannot load the Ed25519 private key: {exc}") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise CryptoError("the private key is not an Ed25519 key")
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return SigningKey(raw)


def public_key_to_pem(key: VerifyKey | bytes) -> bytes:
    """SubjectPublicKeyInfo PEM of an Ed25519 public key."""
    public = Ed25519PublicKey.from_public_bytes(bytes(key))
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_from_pem(data: bytes) -> bytes:
    """The 32 raw bytes of an Ed25519 public key in PEM; anything else is a CryptoError."""
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CryptoError(f"cannot load the Ed25519 public key: {exc}") from exc
    if not isinstance(public, Ed25519PublicKey):
        raise CryptoError("the public key is not an Ed25519 key")
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
