"""The coordinator's start-up identity check names the config key of the file at fault."""

from __future__ import annotations

from pathlib import Path

import pytest
from nacl.signing import SigningKey

from maskfl.broker_coordinator.config import load_config
from maskfl.broker_coordinator.service import load_identity
from maskfl.protocol.errors import ConfigError
from maskfl.protocol.ids import Role
from maskfl.protocol.keys import signing_key_to_pem
from maskfl.testing.fleet import SimFleet

VALID = {"pet": {"update": {"prob": 1.0, "count_max": 100}}}  # count_max <= masking.n_max


def test_the_coordinator_identity_loads_and_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = SimFleet(fleet="idfleet")
    path = fleet.write_coordinator(tmp_path, port=1, length=4, overrides=VALID)
    ca, key, cert = load_identity(load_config(path))
    assert ca == bytes(fleet.ca_key.verify_key)
    assert cert.role is Role.COORDINATOR
    assert bytes(key.verify_key) == cert.public_key

    locked = SigningKey.generate()
    (tmp_path / "coordinator.key").write_bytes(signing_key_to_pem(locked, b"pw"))
    (tmp_path / "coordinator.cert").write_bytes(
        fleet.identity("coordinator", role=Role.COORDINATOR, key=locked).certificate.to_bytes()
    )
    text = path.read_text().replace("[identity]\n", '[identity]\npassphrase_env = "MASKFL_PW"\n')
    path.write_text(text)
    monkeypatch.setenv("MASKFL_PW", "pw")
    assert load_identity(load_config(path))[1] == locked
    monkeypatch.setenv("MASKFL_PW", "wrong")
    with pytest.raises(ConfigError, match="wrong passphrase") as info:
        load_identity(load_config(path))
    assert info.value.field == "identity.key_file"


@pytest.mark.parametrize(
    ("damage", "field", "words"),
    [
        ("device", "identity.certificate_file", "wrong_role"),
        ("other_key", "identity.key_file", "use the key the certificate was issued for"),
        ("ca", "fleet.ca_public_key_file", "public key"),
        ("certificate", "identity.certificate_file", "maskfl-provision"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, damage: str, field: str, words: str) -> None:
    fleet = SimFleet(fleet="idfleet")
    path = fleet.write_coordinator(tmp_path, port=1, length=4, overrides=VALID)
    match damage:
        case "device":
            key = SigningKey.generate()
            cert = fleet.identity("coordinator", key=key).certificate
            (tmp_path / "coordinator.key").write_bytes(signing_key_to_pem(key))
            (tmp_path / "coordinator.cert").write_bytes(cert.to_bytes())
        case "other_key":
            (tmp_path / "coordinator.key").write_bytes(signing_key_to_pem(SigningKey.generate()))
        case "ca":
            (tmp_path / "ca.pub").write_bytes(b"junk")
        case "certificate":
            (tmp_path / "coordinator.cert").write_bytes(b"\x01" * 8)
    with pytest.raises(ConfigError) as info:
        load_identity(load_config(path))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert words in str(info.value)
