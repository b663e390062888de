"""The key and seal operations of a round: ephemeral X25519 keys, sealed mask seeds, digests.

A summer makes a fresh :class:`EphemeralKeyPair` per round and publishes its
public key; every updater seals its 32-byte mask seed to each summer's key with
libsodium's sealed box (X25519 + XSalsa20-Poly1305, an anonymous sender), which
makes each sealed seed exactly 80 bytes. Only the summer can open it.

PyNaCl's errors are translated here, once: anything that fails raises
:class:`~maskfl.protocol.errors.CryptoError` with the PyNaCl error as its cause.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final

import nacl.exceptions
import nacl.public
import nacl.utils

from maskfl.protocol.errors import CryptoError

__all__ = [
    "DIGEST_BYTES",
    "KEY_BYTES",
    "SEALED_SEED_BYTES",
    "SEED_BYTES",
    "EphemeralKeyPair",
    "digest",
    "new_seed",
    "open_seed",
    "seal_seed",
]

KEY_BYTES: Final = 32
SEED_BYTES: Final = 32
DIGEST_BYTES: Final = 32
SEALED_SEED_BYTES: Final = 32 + 16 + SEED_BYTES  # sender's ephemeral key, MAC, the seed


def _require(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise CryptoError(f"{what} must be bytes, not {type(value).__name__}")
    data = bytes(value)
    if len(data) != size:
        raise CryptoError(f"{what} must be {size} bytes, got {len(data)}")
    return data


@dataclass(frozen=True, slots=True)
class EphemeralKeyPair:
    """A summer's X25519 key pair for one round; the private half never leaves the device.

    The private key is left out of ``repr`` so it cannot end up in a log line.
    """

    public_key: bytes
    private_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _require(self.public_key, KEY_BYTES, "an X25519 public key")
        raw = _require(self.private_key, KEY_BYTES, "an X25519 private key")
        if bytes(nacl.public.PrivateKey(raw).public_key) != self.public_key:
            raise CryptoError("the public key does not belong to the private key")

    @classmethod
    def generate(cls) -> EphemeralKeyPair:
        """A fresh key pair from the operating system's random source."""
        return cls.from_private(bytes(nacl.public.PrivateKey.generate()))

    @classmethod
    def from_private(cls, private_key: bytes) -> EphemeralKeyPair:
        """Rebuild the pair from its 32-byte private key (e.g. from the agent's journal)."""
        raw = _require(private_key, KEY_BYTES, "an X25519 private key")
        return cls(public_key=bytes(nacl.public.PrivateKey(raw).public_key), private_key=raw)


def seal_seed(seed: bytes, ephemeral_pk: bytes) -> bytes:
    """Seal a 32-byte mask seed to a summer's ephemeral public key: 80 bytes.

    Raises :class:`CryptoError` for a seed or key of the wrong size, or a key
    libsodium refuses (for instance a low-order point).
    """
    raw_seed = _require(seed, SEED_BYTES, "a mask seed")
    raw_pk = _require(ephemeral_pk, KEY_BYTES, "an X25519 public key")
    try:
        sealed = nacl.public.SealedBox(nacl.public.PublicKey(raw_pk)).encrypt(raw_seed)
    except nacl.exceptions.CryptoError as exc:
        raise CryptoError("cannot seal to this public key") from exc
    return bytes(sealed)


def open_seed(sealed: bytes, ephemeral_sk: bytes) -> bytes:
    """Open an 80-byte sealed seed with the summer's ephemeral private key.

    Raises :class:`CryptoError` when it has the wrong size, was sealed to another
    key or was tampered with; nothing else is raised.
    """
    raw = _require(sealed, SEALED_SEED_BYTES, "a sealed seed")
    sk = _require(ephemeral_sk, KEY_BYTES, "an X25519 private key")
    try:
        seed = nacl.public.SealedBox(nacl.public.PrivateKey(sk)).decrypt(raw)
    except nacl.exceptions.CryptoError as exc:
        raise CryptoError("sealed seed does not open with this key") from exc
    if len(seed) != SEED_BYTES:  # pragma: no cover - 80 - 48 is always 32
        raise CryptoError("sealed seed has the wrong length")
    return bytes(seed)


def new_seed() -> bytes:
    """32 fresh random bytes from the operating system: a mask seed."""
    return nacl.utils.random(SEED_BYTES)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of ``data`` (any contiguous buffer, e.g. a numpy array's ``data``)."""
    return hashlib.sha256(data).digest()
