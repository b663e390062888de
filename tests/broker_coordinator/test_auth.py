"""The coordinator connects with TLS and client certificates, or with a password."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from maskfl.testing.broker import Mosquitto
from maskfl.testing.participants import wait_for
from maskfl.testing.tls import TestPki
from maskfl.transport import mosquitto_passwd_line
from tests.broker_coordinator.support import make_setup, running_coordinator

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]


async def _round_starts(
    tmp_path: Path, pki: TestPki, listener: list[str], broker_keys: dict[str, Any]
) -> None:
    """A broker with ``listener``; a coordinator configured with TLS against ``pki``'s CA
    and ``broker_keys`` must connect, subscribe and open round 1."""
    with Mosquitto(tmp_path / "broker", config=listener) as broker:
        setup = make_setup(
            tmp_path,
            broker.port,
            summers=1,
            updaters=1,
            extra={
                "broker": {
                    "host": "127.0.0.1",
                    "port": broker.port,
                    "tls": True,
                    "ca_file": str(pki.ca.cert),
                    **broker_keys,
                }
            },
        )
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(
                lambda: coordinator.runner is not None and coordinator.runner.state is not None,
                20,
                "the first round",
            )
            assert coordinator.ready() == (True, "ready")


async def test_mutual_tls(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    client = pki.client_cert("maskfl-coordinator")
    lines = pki.mosquitto_tls_listener(pki.server_cert(), require_certificate=True)
    keys = {"cert_file": str(client.cert), "key_file": str(client.key)}
    await _round_starts(tmp_path, pki, lines, keys)


async def test_tls_with_username_and_password(tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    passwd = tmp_path / "passwd"
    passwd.write_text(mosquitto_passwd_line("coordinator", "s3cret") + "\n")
    lines = [
        *pki.mosquitto_tls_listener(pki.server_cert())[:-1],
        "allow_anonymous false",
        f"password_file {passwd}",
    ]
    secret = tmp_path / "broker.password"
    secret.write_text("s3cret\n")
    keys = {"username": "coordinator", "password_file": str(secret)}
    await _round_starts(tmp_path, pki, lines, keys)
