"""``maskfl-provision`` end to end on a fleet directory, without a broker."""

from __future__ import annotations

import datetime as dt
import os
import stat
import tarfile
from pathlib import Path

import nacl.signing
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from maskfl.agent.config import load_config as load_agent_config
from maskfl.broker_coordinator.config import check_files
from maskfl.broker_coordinator.config import load_config as load_coordinator_config
from maskfl.broker_coordinator.provision import Fleet, Status
from maskfl.broker_coordinator.provision.cli import main
from maskfl.protocol.errors import CertificateError, Reason
from maskfl.protocol.identity import (
    Certificate,
    Identity,
    RevocationList,
    verify_certificate,
)
from maskfl.protocol.ids import Role
from maskfl.protocol.keys import public_key_from_pem, public_key_to_pem, signing_key_from_pem
from tests.broker_coordinator.provision.conftest import provision

BUNDLE_FILES = {
    "agent.toml",
    "device.key",
    "device.cert",
    "ca.pub",
    "broker-ca.pem",
    "device-tls.pem",
    "device-tls.key",
}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def now() -> float:
    return dt.datetime.now(dt.UTC).timestamp()


def fail(root: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must fail as a user error: exit 2, one line, no traceback."""
    capsys.readouterr()
    assert main(["--dir", str(root), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("maskfl-provision: error: "), err
    assert "Traceback" not in err
    return err


def revocations(root: Path) -> RevocationList:
    data = (root / "coordinator" / "revocations.bin").read_bytes()
    rl = RevocationList.from_bytes(data)
    rl.verify(ca_public_key=ca_public(root), fleet="demo")
    return rl


def ca_public(root: Path) -> bytes:
    return public_key_from_pem((root / "ca" / "fleet-ca.pub").read_bytes())


def device_cert(root: Path, device: str) -> Certificate:
    return Certificate.from_bytes((root / "devices" / device / "device.cert").read_bytes())


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    root = tmp_path / "fleet"
    provision(root, "init", "--fleet", "demo", "--host", "broker.example.org", "--ip", "192.0.2.7")
    return root


def test_init_writes_the_layout_with_private_modes(fleet: Path) -> None:
    assert mode(fleet / "ca") == 0o700
    for key in ("fleet-ca.key", "tls-ca.key"):
        assert mode(fleet / "ca" / key) == 0o600
    assert mode(fleet / "broker" / "server.key") == 0o640
    assert mode(fleet / "coordinator") == 0o700
    for key in ("coordinator.key", "coordinator-tls.key"):
        assert mode(fleet / "coordinator" / key) == 0o600
    assert mode(fleet / "registry.json") == 0o600
    for name in ("mosquitto.conf", "acl", "ca.crt", "server.crt", "crl.pem"):
        assert (fleet / "broker" / name).is_file(), name
    server = x509.load_pem_x509_certificate((fleet / "broker" / "server.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"broker.example.org", "mosquitto"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    conf = (fleet / "broker" / "mosquitto.conf").read_text()
    for line in (
        "max_queued_messages 0",
        "persistence true",
        "require_certificate true",
        "use_identity_as_username true",
        "crlfile /mosquitto/config/crl.pem",
        "allow_anonymous false",
    ):
        assert f"\n{line}\n" in conf, line
    assert "\nmessage_size_limit" not in conf
    assert "127.0.0.1" not in conf  # no development listener unless asked for
    assert revocations(fleet).serials == ()


def test_coordinator_bundle_loads_with_the_coordinator_config(fleet: Path) -> None:
    config = load_coordinator_config(fleet / "coordinator" / "coordinator.toml", env={})
    check_files(config)
    assert config.fleet.id == "demo"
    assert config.fleet.revocations_file == fleet / "coordinator" / "revocations.bin"
    assert config.broker.tls and config.broker.port == 8883
    key = signing_key_from_pem(config.identity.key_file.read_bytes())
    cert = Certificate.from_bytes(config.identity.certificate_file.read_bytes())
    Identity(key, cert)  # the key matches the certificate
    verify_certificate(
        cert,
        ca_public_key=public_key_from_pem(config.fleet.ca_public_key_file.read_bytes()),
        fleet="demo",
        now=now(),
        revocations=revocations(fleet),
        role=Role.COORDINATOR,
    )
    tls = x509.load_pem_x509_certificate(config.broker.cert_file.read_bytes())  # type: ignore[union-attr]
    assert tls.subject.rfc4514_string() == "CN=coordinator"


def test_init_refuses_an_existing_fleet_without_force(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_ca = (fleet / "ca" / "fleet-ca.pub").read_bytes()
    err = fail(fleet, "init", "--fleet", "demo", capsys=capsys)
    assert f"directory {fleet} already holds a fleet; use --force to replace it" in err
    assert (fleet / "ca" / "fleet-ca.pub").read_bytes() == old_ca
    provision(fleet, "init", "--fleet", "demo", "--force")
    assert (fleet / "ca" / "fleet-ca.pub").read_bytes() != old_ca


def test_add_device_writes_a_bundle_with_exactly_what_the_device_needs(fleet: Path) -> None:
    provision(fleet, "add-device", "pi-1")
    bundle = fleet / "devices" / "pi-1"
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES
    assert mode(bundle / "device.key") == 0o600 and mode(bundle / "device-tls.key") == 0o600
    with tarfile.open(fleet / "devices" / "pi-1.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"pi-1"} | {f"pi-1/{name}" for name in BUNDLE_FILES}
        assert members["pi-1/device.key"].mode & 0o077 == 0
        for name in BUNDLE_FILES:
            extracted = tar.extractfile(f"pi-1/{name}")
            assert extracted is not None and extracted.read() == (bundle / name).read_bytes()
    assert mode(fleet / "devices" / "pi-1.tar.gz") == 0o600

    config = load_agent_config(bundle / "agent.toml")
    assert config.device.id == "pi-1" and config.device.fleet == "demo"
    assert config.broker.tls and config.broker.host == "broker.example.org"
    for path in (
        config.device.key_file,
        config.device.certificate_file,
        config.device.ca_public_key_file,
        config.broker.ca_file,
        config.broker.cert_file,
        config.broker.key_file,
    ):
        assert path is not None and path.is_file() and path.parent == bundle.resolve()
    key = signing_key_from_pem(config.device.key_file.read_bytes())
    cert = Certificate.from_bytes(config.device.certificate_file.read_bytes())
    Identity(key, cert)
    verify_certificate(
        cert,
        ca_public_key=ca_public(fleet),
        fleet="demo",
        now=now(),
        revocations=revocations(fleet),
        role=Role.DEVICE,
    )
    tls = x509.load_pem_x509_certificate((bundle / "device-tls.pem").read_bytes())
    assert tls.subject.rfc4514_string() == "CN=pi-1"
    assert "user pi-1\n" in (fleet / "broker" / "acl").read_text()


def _private_keys(paths: list[Path]) -> list[object]:
    keys: list[object] = []
    for path in paths:
        data = path.read_bytes()
        if b"PRIVATE KEY" in data:
            keys.append(serialization.load_pem_private_key(data, password=None))
    return keys


def test_no_bundle_holds_a_ca_private_key(fleet: Path) -> None:
    provision(fleet, "add-device", "pi", "--count", "2")
    ca_files = [fleet / "ca" / "fleet-ca.key", fleet / "ca" / "tls-ca.key"]
    ca_raw = {p.read_bytes() for p in ca_files}
    ca_publics = {
        k.public_key().public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for k in _private_keys(ca_files)
    }
    shipped = [*(fleet / "devices").rglob("*"), *(fleet / "coordinator").iterdir()]
    shipped_files = [p for p in shipped if p.is_file() and not p.name.endswith(".tar.gz")]
    for path in shipped_files:
        assert path.read_bytes() not in ca_raw, path
    for key in _private_keys(shipped_files):
        public = key.public_key().public_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert public not in ca_publics
    for archive in (fleet / "devices").glob("*.tar.gz"):
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                handle = tar.extractfile(member)
                if handle is not None:
                    data = handle.read()
                    assert data not in ca_raw
                    assert b"ENCRYPTED PRIVATE KEY" not in data


def test_add_device_is_idempotent(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    provision(fleet, "add-device", "pi", "--count", "3")
    assert sorted(p.name for p in (fleet / "devices").glob("*.tar.gz")) == [
        "pi-001.tar.gz",
        "pi-002.tar.gz",
        "pi-003.tar.gz",
    ]
    snapshot = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in fleet.rglob("*") if p.is_file()}
    capsys.readouterr()
    provision(fleet, "add-device", "pi", "--count", "3")
    assert capsys.readouterr().out.count("already enrolled, nothing changed") == 3
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in fleet.rglob("*") if p.is_file()}
    assert after == snapshot


def test_add_device_force_reissues_and_revokes_the_old(fleet: Path) -> None:
    provision(fleet, "add-device", "pi-1")
    old = device_cert(fleet, "pi-1")
    provision(fleet, "add-device", "pi-1", "--force")
    new = device_cert(fleet, "pi-1")
    assert new.serial != old.serial and new.public_key != old.public_key
    assert revocations(fleet).is_revoked(old.serial)
    assert not revocations(fleet).is_revoked(new.serial)


def test_add_device_refuses_a_stray_bundle(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stray = fleet / "devices" / "pi-9"
    stray.mkdir()
    (stray / "note").write_text("keep me")
    assert "--force" in fail(fleet, "add-device", "pi-9", capsys=capsys)
    assert (stray / "note").read_text() == "keep me"
    provision(fleet, "add-device", "pi-9", "--force")
    assert {p.name for p in stray.iterdir()} == BUNDLE_FILES


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add-device", "bad id"], "not valid"),
        (["add-device", "x" * 65], "not valid"),
        (["add-device", "coordinator"], "reserved"),
        (["add-device", "pi", "--count", "0"], "--count"),
        (["add-device", "pi", "--public-key", "/nonexistent.pem"], "--public-key"),
        (["revoke", "ghost"], "unknown device 'ghost'"),
        (["rotate", "ghost"], "unknown device 'ghost'"),
        (["revoke", "coordinator"], "rotated"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    fleet: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert message in fail(fleet, *args, capsys=capsys)


def test_commands_outside_a_fleet_directory_fail_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "init" in fail(tmp_path, "add-device", "pi", capsys=capsys)
    assert "init" in fail(tmp_path, "list", capsys=capsys)


def test_damaged_registry_is_reported(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (fleet / "registry.json").write_text("{not json")
    assert "damaged" in fail(fleet, "add-device", "pi", capsys=capsys)


def test_passphrase_protects_the_ca_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "fleet"
    monkeypatch.setenv("MASKFL_CA_PASSPHRASE", "correct horse")
    provision(root, "init", "--fleet", "demo")
    for key in ("fleet-ca.key", "tls-ca.key"):
        assert (root / "ca" / key).read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY")
    monkeypatch.delenv("MASKFL_CA_PASSPHRASE")
    assert "passphrase-protected" in fail(root, "add-device", "pi", capsys=capsys)
    wrong = tmp_path / "wrong"
    wrong.write_text("battery staple\n")
    assert "wrong passphrase" in fail(
        root, "--passphrase-file", str(wrong), "add-device", "pi", capsys=capsys
    )
    assert not (root / "devices" / "pi").exists()
    right = tmp_path / "right"
    right.write_text("correct horse\n")
    # --passphrase-file is accepted after the subcommand too.
    provision(root, "add-device", "pi", "--passphrase-file", str(right))
    assert (root / "devices" / "pi.tar.gz").is_file()
    # Device keys in the bundle are never encrypted: the agent starts unattended.
    assert b"ENCRYPTED" not in (root / "devices" / "pi" / "device.key").read_bytes()


def test_revoke_touches_only_the_revoked_device(fleet: Path) -> None:
    provision(fleet, "add-device", "pi", "--count", "3")
    others = {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for name in ("pi-001", "pi-003")
        for p in [*(fleet / "devices" / name).iterdir(), fleet / "devices" / f"{name}.tar.gz"]
    }
    revoked_path = fleet / "coordinator" / "revocations.bin"
    inode = revoked_path.stat().st_ino
    version = revocations(fleet).version
    provision(fleet, "revoke", "pi-002")

    rl = revocations(fleet)
    assert rl.version > version
    assert revoked_path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert not list((fleet / "coordinator").glob(".*.tmp"))
    with pytest.raises(CertificateError) as caught:
        verify_certificate(
            device_cert(fleet, "pi-002"),
            ca_public_key=ca_public(fleet),
            fleet="demo",
            now=now(),
            revocations=rl,
        )
    assert caught.value.reason is Reason.REVOKED
    for name in ("pi-001", "pi-003"):
        verify_certificate(
            device_cert(fleet, name),
            ca_public_key=ca_public(fleet),
            fleet="demo",
            now=now(),
            revocations=rl,
        )
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in others} == others
    acl = (fleet / "broker" / "acl").read_text()
    assert "pi-002" not in acl and "user pi-001" in acl and "user pi-003" in acl
    crl = x509.load_pem_x509_crl((fleet / "broker" / "crl.pem").read_bytes())
    tls = x509.load_pem_x509_certificate(
        (fleet / "devices" / "pi-002" / "device-tls.pem").read_bytes()
    )
    assert crl.get_revoked_certificate_by_serial_number(tls.serial_number) is not None
    assert len(list(crl)) == 1
    assert Fleet.open(fleet).registry.devices["pi-002"].status is Status.REVOKED

    # Revoking again changes nothing but rewrites the derived files (repairs a crash).
    provision(fleet, "revoke", "pi-002")
    assert revocations(fleet).serials == rl.serials
    # A revoked id is not silently re-enrolled.
    assert main(["--dir", str(fleet), "add-device", "pi-002"]) == 2
    assert main(["--dir", str(fleet), "rotate", "pi-002"]) == 2
    provision(fleet, "add-device", "pi-002", "--force")
    assert "user pi-002" in (fleet / "broker" / "acl").read_text()


def test_rotate_replaces_keys_and_revokes_the_old_ones(fleet: Path) -> None:
    provision(fleet, "add-device", "pi", "--count", "2")
    old_cert = device_cert(fleet, "pi-001")
    old_key = (fleet / "devices" / "pi-001" / "device.key").read_bytes()
    other = (fleet / "devices" / "pi-002.tar.gz").read_bytes()
    provision(fleet, "rotate", "pi-001")
    new_cert = device_cert(fleet, "pi-001")
    assert (fleet / "devices" / "pi-001" / "device.key").read_bytes() != old_key
    assert new_cert.serial != old_cert.serial
    Identity(
        signing_key_from_pem((fleet / "devices" / "pi-001" / "device.key").read_bytes()), new_cert
    )
    rl = revocations(fleet)
    assert rl.is_revoked(old_cert.serial) and not rl.is_revoked(new_cert.serial)
    assert (fleet / "devices" / "pi-002.tar.gz").read_bytes() == other
    assert "user pi-001" in (fleet / "broker" / "acl").read_text()


def test_rotate_coordinator(fleet: Path) -> None:
    old = Certificate.from_bytes((fleet / "coordinator" / "coordinator.cert").read_bytes())
    provision(fleet, "rotate", "coordinator")
    new = Certificate.from_bytes((fleet / "coordinator" / "coordinator.cert").read_bytes())
    assert new.serial != old.serial and new.role is Role.COORDINATOR
    assert revocations(fleet).is_revoked(old.serial)
    key = signing_key_from_pem((fleet / "coordinator" / "coordinator.key").read_bytes())
    Identity(key, new)


def test_device_generated_keys_are_accepted(fleet: Path, tmp_path: Path) -> None:
    own = nacl.signing.SigningKey.generate()
    pub = tmp_path / "cam.pub"
    pub.write_bytes(public_key_to_pem(own.verify_key))
    tls_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "coordinator")]))
        .sign(tls_key, hashes.SHA256())
    )
    csr_path = tmp_path / "cam.csr"
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    provision(fleet, "add-device", "cam", "--public-key", str(pub), "--tls-csr", str(csr_path))
    bundle = fleet / "devices" / "cam"
    assert {p.name for p in bundle.iterdir()} == BUNDLE_FILES - {"device.key", "device-tls.key"}
    assert device_cert(fleet, "cam").public_key == bytes(own.verify_key)
    tls = x509.load_pem_x509_certificate((bundle / "device-tls.pem").read_bytes())
    # The CSR's key is used, never its subject: a device cannot name itself "coordinator".
    assert tls.subject.rfc4514_string() == "CN=cam"
    assert tls.public_key() == tls_key.public_key()
    assert "generated on the device" in (bundle / "agent.toml").read_text()


def test_bad_csr_and_public_key_are_user_errors(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text(
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    )
    assert "--tls-csr" in fail(fleet, "add-device", "x", "--tls-csr", str(junk), capsys=capsys)
    assert "--public-key" in fail(
        fleet, "add-device", "y", "--public-key", str(junk), capsys=capsys
    )
    assert Fleet.open(fleet).registry.devices == {}


def test_broker_config_saves_options_and_adds_a_dev_listener(fleet: Path) -> None:
    provision(fleet, "broker-config", "--dev-port", "1884", "--broker-config-dir", "/etc/m")
    conf = (fleet / "broker" / "mosquitto.conf").read_text()
    assert "\nlistener 1884 127.0.0.1\n" in conf and "acl_file /etc/m/acl" in conf
    assert "dev_port = 1884" in (fleet / "fleet.toml").read_text()
    provision(fleet, "broker-config", "--dev-port", "0")
    assert "1884" not in (fleet / "broker" / "mosquitto.conf").read_text()


def test_list_shows_devices(fleet: Path, capsys: pytest.CaptureFixture[str]) -> None:
    provision(fleet, "add-device", "pi", "--count", "2")
    provision(fleet, "revoke", "pi-001")
    capsys.readouterr()
    provision(fleet, "list", "--json")
    out = capsys.readouterr().out
    assert '"id": "pi-001"' in out and '"status": "revoked"' in out


@pytest.mark.parametrize(
    "command", [[], ["init"], ["add-device"], ["revoke"], ["rotate"], ["broker-config"], ["list"]]
)
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert "--dir" in capsys.readouterr().out


def test_dir_defaults_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--fleet", "here"]) == 0
    assert (tmp_path / "fleet.toml").is_file() and os.path.isdir(tmp_path / "devices")


def test_server_cert_follows_edited_host_names(fleet: Path) -> None:
    toml = fleet / "fleet.toml"
    toml.write_text(toml.read_text().replace('"broker.example.org",', '"mqtt.example.net",'))
    provision(fleet, "server-cert")
    server = x509.load_pem_x509_certificate((fleet / "broker" / "server.crt").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "mqtt.example.net" in san.get_values_for_type(x509.DNSName)
    assert mode(fleet / "broker" / "server.key") == 0o640


def test_init_rejects_a_bad_ip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--ip" in fail(tmp_path, "init", "--fleet", "demo", "--ip", "300.1.1.1", capsys=capsys)
    assert "--host" in fail(tmp_path, "init", "--fleet", "demo", "--host", "a b", capsys=capsys)
    assert not (tmp_path / "ca").exists()  # nothing was written: init can simply be re-run


def test_count_continues_numbering_past_a_revoked_device(
    fleet: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provision(fleet, "add-device", "pi", "--count", "5")
    provision(fleet, "revoke", "pi-004")
    capsys.readouterr()
    provision(fleet, "add-device", "pi", "--count", "6")
    out = capsys.readouterr().out
    assert "pi-004: revoked, skipped" in out
    registry = Fleet.open(fleet).registry.devices
    active = sorted(d for d, m in registry.items() if m.status is Status.ACTIVE)
    assert active == ["pi-001", "pi-002", "pi-003", "pi-005", "pi-006", "pi-007"]
    assert registry["pi-004"].status is Status.REVOKED
    assert out.count("already enrolled, nothing changed") == 4
    assert (fleet / "devices" / "pi-007.tar.gz").is_file()
    revoked_serial = registry["pi-004"].current.serial
    assert revocations(fleet).is_revoked(revoked_serial)


def test_count_one_makes_a_numbered_device(fleet: Path) -> None:
    provision(fleet, "add-device", "cam", "--count", "1")
    provision(fleet, "add-device", "gate")
    devices = set(Fleet.open(fleet).registry.devices)
    assert devices == {"cam-001", "gate"}
