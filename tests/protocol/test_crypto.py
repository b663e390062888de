"""Ephemeral keys, sealed seeds and digests."""

from __future__ import annotations

import hashlib

import nacl.exceptions
import nacl.public
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.crypto import (
    SEALED_SEED_BYTES,
    EphemeralKeyPair,
    digest,
    new_seed,
    open_seed,
    seal_seed,
)
from maskfl.protocol.errors import CryptoError


def test_key_pair_is_x25519_and_rebuilds_from_its_private_key() -> None:
    pair = EphemeralKeyPair.generate()
    assert len(pair.public_key) == 32
    assert len(pair.private_key) == 32
    assert pair.public_key == bytes(nacl.public.PrivateKey(pair.private_key).public_key)
    assert EphemeralKeyPair.from_private(pair.private_key) == pair
    assert EphemeralKeyPair.generate().public_key != pair.public_key


def test_private_key_stays_out_of_repr() -> None:
    pair = EphemeralKeyPair.from_private(b"\x01" * 32)
    assert "private" not in repr(pair)
    assert repr(b"\x01" * 32) not in repr(pair)


@settings(max_examples=25, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32))
def test_seal_then_open_round_trips(seed: bytes) -> None:
    pair = EphemeralKeyPair.generate()
    sealed = seal_seed(seed, pair.public_key)
    assert len(sealed) == SEALED_SEED_BYTES == 80
    assert open_seed(sealed, pair.private_key) == seed
    # Sealing is randomised (a fresh sender key each time), so equal seeds do not show.
    assert seal_seed(seed, pair.public_key) != sealed


def test_open_with_the_wrong_key_raises_crypto_error() -> None:
    pair, other = EphemeralKeyPair.generate(), EphemeralKeyPair.generate()
    sealed = seal_seed(new_seed(), pair.public_key)
    with pytest.raises(CryptoError) as info:
        open_seed(sealed, other.private_key)
    assert isinstance(info.value.__cause__, nacl.exceptions.CryptoError)


@pytest.mark.parametrize("position", [0, 31, 32, 47, 48, 79])
def test_tampered_seal_does_not_open(position: int) -> None:
    pair = EphemeralKeyPair.generate()
    sealed = bytearray(seal_seed(new_seed(), pair.public_key))
    sealed[position] ^= 0x01
    with pytest.raises(CryptoError):
        open_seed(bytes(sealed), pair.private_key)


def test_wrong_sizes_raise_crypto_error() -> None:
    pair = EphemeralKeyPair.generate()
    sealed = seal_seed(new_seed(), pair.public_key)
    with pytest.raises(CryptoError, match="80 bytes"):
        open_seed(sealed[:-1], pair.private_key)
    with pytest.raises(CryptoError, match="80 bytes"):
        open_seed(sealed + b"\x00", pair.private_key)
    with pytest.raises(CryptoError, match="32 bytes"):
        open_seed(sealed, pair.private_key[:31])
    with pytest.raises(CryptoError, match="32 bytes"):
        seal_seed(bytes(31), pair.public_key)
    with pytest.raises(CryptoError, match="32 bytes"):
        seal_seed(bytes(32), pair.public_key + b"\x00")
    with pytest.raises(CryptoError, match="32 bytes"):
        EphemeralKeyPair.from_private(bytes(33))
    with pytest.raises(CryptoError, match="must be bytes"):
        seal_seed("x" * 32, pair.public_key)  # type: ignore[arg-type]


def test_sealing_to_a_low_order_key_is_refused() -> None:
    with pytest.raises(CryptoError):
        seal_seed(new_seed(), bytes(32))


def test_new_seed_is_fresh() -> None:
    seeds = {new_seed() for _ in range(100)}
    assert len(seeds) == 100
    assert all(len(s) == 32 for s in seeds)


def test_digest_is_sha256_of_any_buffer() -> None:
    assert digest(b"abc").hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    words = np.arange(1000, dtype=np.uint32)
    assert digest(words.data) == hashlib.sha256(words.tobytes()).digest()
    assert digest(bytearray(b"abc")) == digest(b"abc")


def test_a_mismatched_pair_is_refused() -> None:
    pair, other = EphemeralKeyPair.generate(), EphemeralKeyPair.generate()
    with pytest.raises(CryptoError, match="does not belong"):
        EphemeralKeyPair(public_key=other.public_key, private_key=pair.private_key)
    with pytest.raises(CryptoError, match="32 bytes"):
        EphemeralKeyPair(public_key=pair.public_key[:5], private_key=pair.private_key)
