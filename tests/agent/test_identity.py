"""The agent reads its bundle's files and names the config key of the one at fault."""

from __future__ import annotations

from pathlib import Path

import nacl.signing
import pytest

from maskfl.agent.config import DeviceSection
from maskfl.agent.identity import load_identity
from maskfl.protocol.errors import ConfigError
from maskfl.protocol.identity import issue_revocation_list
from maskfl.protocol.ids import Role
from maskfl.protocol.keys import signing_key_to_pem
from tests.agent.fleet import Fleet, write_private


def section(tmp_path: Path, **change: object) -> tuple[Fleet, DeviceSection]:
    fleet = Fleet(tmp_path / "fleet")
    identity = fleet.identity("dev-1")
    write_private(tmp_path / "device.key", signing_key_to_pem(identity.signing_key))
    (tmp_path / "device.cert").write_bytes(identity.certificate.to_bytes())
    fields: dict[str, object] = {
        "id": "dev-1",
        "fleet": fleet.name,
        "key_file": tmp_path / "device.key",
        "certificate_file": tmp_path / "device.cert",
        "ca_public_key_file": fleet.root / "ca.pub",
    }
    fields.update(change)
    return fleet, DeviceSection.model_validate(fields)


def test_a_consistent_bundle_loads(tmp_path: Path) -> None:
    fleet, device = section(tmp_path)
    revoked = issue_revocation_list(
        fleet.ca, fleet=fleet.name, version=1, issued_at=0, serials=[999]
    )
    (tmp_path / "crl").write_bytes(revoked.to_bytes())
    loaded = load_identity(device.model_copy(update={"revocations_file": tmp_path / "crl"}))
    assert loaded.identity.device_id == "dev-1"
    assert loaded.ca_public_key == bytes(fleet.ca.verify_key)
    assert loaded.revocations == revoked


def test_a_passphrase_file_unlocks_the_key(tmp_path: Path) -> None:
    _, device = section(tmp_path)
    key = nacl.signing.SigningKey.generate()
    fleet = Fleet(tmp_path / "fleet2")
    write_private(tmp_path / "locked.key", signing_key_to_pem(key, b"open sesame"))
    write_private(tmp_path / "pass", b"open sesame\n")
    (tmp_path / "locked.cert").write_bytes(fleet.certificate("dev-1", Role.DEVICE, key).to_bytes())
    locked = device.model_copy(
        update={
            "fleet": fleet.name,
            "key_file": tmp_path / "locked.key",
            "key_passphrase_file": tmp_path / "pass",
            "certificate_file": tmp_path / "locked.cert",
            "ca_public_key_file": fleet.root / "ca.pub",
        }
    )
    assert bytes(load_identity(locked).identity.signing_key) == bytes(key)


@pytest.mark.parametrize(
    ("damage", "field", "words"),
    [
        ("key", "device.key_file", "wrong passphrase"),
        ("other_key", "device.key_file", "use the key the certificate was issued for"),
        ("ca", "device.ca_public_key_file", "public key"),
        ("certificate", "device.certificate_file", "not an enrollment certificate"),
        ("expired", "device.certificate_file", "expired"),
        ("id", "device.id", "certificate is for 'dev-1'"),
        ("revocations", "device.revocations_file", "not a revocation list"),
        ("mode", "device.key_file", "chmod 600"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, damage: str, field: str, words: str) -> None:
    _, device = section(tmp_path)
    now = None
    match damage:
        case "key":
            write_private(device.key_file, b"-----BEGIN PRIVATE KEY-----\njunk\n")
        case "other_key":
            write_private(device.key_file, signing_key_to_pem(nacl.signing.SigningKey.generate()))
        case "ca":
            device.ca_public_key_file.write_bytes(b"junk")
        case "certificate":
            device.certificate_file.write_bytes(b"\x01" * 12)
        case "expired":
            now = 10.0**10
        case "id":
            device = device.model_copy(update={"id": "dev-2"})
        case "revocations":
            (tmp_path / "crl").write_bytes(b"junk")
            device = device.model_copy(update={"revocations_file": tmp_path / "crl"})
        case "mode":
            device.key_file.chmod(0o640)
    with pytest.raises(ConfigError) as info:
        load_identity(device, now=now)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert words in str(info.value)
