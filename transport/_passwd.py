"""Mosquitto 2 password-file lines without ``mosquitto_passwd``.

Mosquitto 2.x reads ``user:$7$<iterations>$<salt>$<hash>``: PBKDF2-HMAC-SHA512
over the password with a 12-byte random salt, 101 iterations by default, salt
and 64-byte hash in standard base64 (the format ``mosquitto_passwd`` writes).
Provisioning uses this to write the broker's password file on machines where
the mosquitto tools are not installed; tests check it against both the tool and
a real broker.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from maskfl.protocol.errors import ConfigError

DEFAULT_ITERATIONS = 101
_SALT_LEN = 12


def mosquitto_password_hash(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> str:
    """The ``$7$...`` hash of ``password`` (fresh random salt unless one is given)."""
    if iterations < 1:
        raise ConfigError("password hash iterations must be at least 1", field="iterations")
    salt = os.urandom(_SALT_LEN) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def mosquitto_passwd_line(username: str, password: str) -> str:
    """One line of a mosquitto ``password_file`` (no trailing newline)."""
    if not username or ":" in username or "\n" in username:
        raise ConfigError(
            f"MQTT username {username!r} must be non-empty and contain no ':' or newline",
            field="username",
        )
    return f"{username}:{mosquitto_password_hash(password)}"


def verify_mosquitto_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (as mosquitto would decide)."""
    try:
        _, kind, iterations, salt64, hash64 = encoded.split("$")
        if kind != "7":
            return False
        salt = base64.b64decode(salt64, validate=True)
        expected = base64.b64decode(hash64, validate=True)
        rounds = int(iterations)
    except ValueError:
        return False
    if rounds < 1:
        return False  # hashlib refuses it; no hash mosquitto_passwd writes has it
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, rounds)
    return hmac.compare_digest(digest, expected)
