"""Mosquitto $7$ password hashes made without mosquitto_passwd."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.protocol.errors import ConfigError
from maskfl.transport import (
    mosquitto_passwd_line,
    mosquitto_password_hash,
    verify_mosquitto_password,
)


def test_hash_round_trip() -> None:
    encoded = mosquitto_password_hash("s3cret")
    assert encoded.startswith("$7$101$")
    assert verify_mosquitto_password("s3cret", encoded)
    assert not verify_mosquitto_password("s3cret!", encoded)
    assert mosquitto_password_hash("s3cret") != encoded  # fresh salt each time


def test_known_vector() -> None:
    # PBKDF2-HMAC-SHA512("pw", salt=12 zero bytes, 101 rounds), base64.
    encoded = mosquitto_password_hash("pw", salt=bytes(12))
    _, _, rounds, salt, _ = encoded.split("$")
    assert (rounds, salt) == ("101", "AAAAAAAAAAAAAAAA")
    assert verify_mosquitto_password("pw", encoded)


def test_malformed_hashes_do_not_verify() -> None:
    good = mosquitto_password_hash("pw", salt=bytes(12))
    _, _, _, salt, digest = good.split("$")
    for bad in (
        "",
        "plain",
        f"$6$101${salt}${digest}",
        f"$7$0${salt}${digest}",
        f"$7$-5${salt}${digest}",
        f"$7$x${salt}${digest}",
        f"$7$101$not base64!${digest}",
        f"$7$101${salt}",
    ):
        assert verify_mosquitto_password("pw", bad) is False, bad


# Iteration counts stay small: a well-formed hash with 10^9 rounds is valid, just slow.
_b64ish = st.text(alphabet="AQw=+/x -", max_size=12)
_hashes = st.one_of(
    st.text(alphabet="$AQw=+/x -", max_size=40),
    st.builds(
        lambda kind, rounds, salt, digest: f"${kind}${rounds}${salt}${digest}",
        st.sampled_from(["7", "6", ""]),
        st.one_of(st.integers(-3, 200).map(str), _b64ish),
        _b64ish,
        _b64ish,
    ),
)


@settings(max_examples=200, deadline=None)
@given(encoded=_hashes)
def test_any_text_is_a_yes_or_no(encoded: str) -> None:
    assert verify_mosquitto_password("pw", encoded) in (True, False)


def test_bad_username() -> None:
    with pytest.raises(ConfigError):
        mosquitto_passwd_line("a:b", "pw")


@pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed"
)
def test_verifies_hashes_written_by_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    path.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(path), "dev1", "pa ss"], check=True)
    _, encoded = path.read_text().strip().split(":", 1)
    assert verify_mosquitto_password("pa ss", encoded)
    assert not verify_mosquitto_password("pass", encoded)
