"""``maskfl-provision add-observer``: a read-only identity, checked against a real mosquitto.

The observer reads what the fleet publishes for everyone (round parameters, sum
dictionaries, models, status, revocations) and can publish nothing, anywhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from maskfl.broker_coordinator.provision.cli import main
from maskfl.protocol.topics import Topics
from tests.broker_coordinator.provision.conftest import Broker, provision

pytestmark = pytest.mark.broker

P = "maskfl/v1/demo"
T = Topics("demo")

READABLE = [
    f"{P}/round",
    f"{P}/round/7/sums",
    f"{P}/model/mlp/latest",
    f"{P}/model/mlp/graph",
    f"{P}/status/dev-a",
    f"{P}/revocations",
]
HIDDEN = [
    f"{P}/round/7/update/dev-a",
    f"{P}/round/7/sum/dev-a",
    f"{P}/round/7/sum2/dev-a",
    f"{P}/round/7/seeds/dev-a",
    f"{P}/receipts/dev-a",
]


def test_add_observer_writes_its_folder_and_a_read_only_acl_block(
    fleet_broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fleet_broker.root
    provision(root, "add-observer", "dash")
    folder = root / "observers" / "dash"
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "broker-ca.pem",
        "observer-tls.pem",
        "observer-tls.key",
        "ca.pub",
        "README.txt",
    }
    assert (folder / "observer-tls.key").stat().st_mode & 0o077 == 0
    assert "mosquitto_sub -V mqttv5" in (folder / "README.txt").read_text()
    acl = (root / "broker" / "acl").read_text()
    block = acl[acl.index("user dash") :].split("\n\n")[0].splitlines()
    assert block[0] == "user dash"
    assert all(line.startswith("topic read ") for line in block[1:]), block
    provision(root, "add-observer", "dash")  # again: nothing changes
    assert "already issued" in capsys.readouterr().out
    provision(root, "list", "--json")
    listed = json.loads(capsys.readouterr().out)
    assert listed["observers"] == [
        {"id": "dash", "status": "active", "not_after": listed["observers"][0]["not_after"]}
    ]
    assert 0 not in listed["revoked_serials"]


def test_observer_names_and_device_ids_do_not_collide(fleet_broker: Broker, tmp_path: Path) -> None:
    root = str(fleet_broker.root)
    assert main(["--dir", root, "add-observer", "dev-a"]) == 2
    assert main(["--dir", root, "add-observer", "coordinator"]) == 2
    assert main(["--dir", root, "add-observer", "watch"]) == 0
    assert main(["--dir", root, "add-device", "watch"]) == 2


def test_observer_reads_rounds_models_and_status_and_publishes_nothing(
    fleet_broker: Broker,
) -> None:
    provision(fleet_broker.root, "add-observer", "dash")
    fleet_broker.reload()
    coord = fleet_broker.coordinator()
    assert coord.connect()
    for topic in READABLE + HIDDEN:
        assert not coord.publish(topic, f"retained {topic}".encode(), retain=True).is_failure
    observer = fleet_broker.observer("dash")
    assert observer.connect()
    for topic in [f"{P}/#", *READABLE, *HIDDEN]:
        observer.subscribe(topic)
    assert not coord.publish(f"{P}/round", b"marker 1").is_failure
    got = observer.receive_until(b"marker 1")
    for topic in READABLE + HIDDEN:
        assert not coord.publish(topic, f"live {topic}".encode()).is_failure
    assert not coord.publish(f"{P}/round", b"marker 2").is_failure
    got += observer.receive_until(b"marker 2")
    text = {payload.decode() for payload in got}
    for topic in READABLE:
        assert f"retained {topic}" in text and f"live {topic}" in text, topic
    for topic in HIDDEN:
        assert f"retained {topic}" not in text and f"live {topic}" not in text, topic
    # Publish nothing, anywhere: every topic a device or the coordinator may write,
    # what it may read, its own name's topics, another fleet's.
    for topic in [
        *READABLE,
        *HIDDEN,
        T.status("dash"),
        T.update(7, "dash"),
        T.sum(7, "dash"),
        T.receipts("dash"),
        "maskfl/v1/other/round",
        "anything",
    ]:
        rc = observer.publish(topic)
        assert rc.is_failure and rc.getName() == "Not authorized", (topic, rc)


def test_a_revoked_observer_cannot_connect(fleet_broker: Broker) -> None:
    provision(fleet_broker.root, "add-observer", "dash")
    fleet_broker.reload()
    assert fleet_broker.observer("dash").connect()
    provision(fleet_broker.root, "revoke", "dash")
    assert "user dash" not in (fleet_broker.root / "broker" / "acl").read_text()
    fleet_broker.reload()
    assert not fleet_broker.observer("dash").connect()


def test_rotating_an_observer_replaces_its_certificate(
    fleet_broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provision(fleet_broker.root, "add-observer", "dash")
    folder = fleet_broker.root / "observers" / "dash"
    old_cert = (folder / "observer-tls.pem").read_bytes()
    old_key = (folder / "observer-tls.key").read_bytes()
    provision(fleet_broker.root, "rotate", "dash")
    assert (folder / "observer-tls.pem").read_bytes() != old_cert
    fleet_broker.reload()
    assert fleet_broker.observer("dash").connect()
    stale = folder.parent / "stale"
    stale.mkdir()
    (stale / "observer-tls.pem").write_bytes(old_cert)
    (stale / "observer-tls.key").write_bytes(old_key)
    (stale / "observer-tls.key").chmod(0o600)
    (stale / "broker-ca.pem").write_bytes((folder / "broker-ca.pem").read_bytes())
    client = fleet_broker.client(
        "dash", stale / "broker-ca.pem", stale / "observer-tls.pem", stale / "observer-tls.key"
    )
    assert not client.connect()  # the old certificate is in the CRL
    pem = tmp_path / "device.pub"
    pem.write_text("-----BEGIN PUBLIC KEY-----\n")
    capsys.readouterr()
    assert main(["--dir", str(fleet_broker.root), "rotate", "dash", "--public-key", str(pem)]) == 2
    assert "an observer has no signing key" in capsys.readouterr().err


def test_the_readmes_mosquitto_sub_line_works_as_written(fleet_broker: Broker) -> None:
    """README.txt's ``mosquitto_sub`` line, run from the observer's folder as it stands
    (plus ``-C 1 -W 20`` so it ends), receives the retained round parameters."""
    mosquitto_sub = shutil.which("mosquitto_sub")
    if mosquitto_sub is None:
        pytest.skip("mosquitto_sub is not installed (mosquitto-clients)")
    provision(fleet_broker.root, "add-observer", "dash")
    fleet_broker.reload()
    coord = fleet_broker.coordinator()
    assert coord.connect()
    assert not coord.publish(f"{P}/round", b"the round", retain=True).is_failure
    folder = fleet_broker.root / "observers" / "dash"
    text = (folder / "README.txt").read_text()
    start = text.index("  mosquitto_sub ")
    line = text[start : text.index(" -v\n", start) + 3]
    done = subprocess.run(
        ["bash", "-c", f"{line} -C 1 -W 20"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{P}/round the round\n"


def test_rotating_an_observer_with_its_own_tls_key_removes_the_old_key(tmp_path: Path) -> None:
    """rotate NAME --tls-csr: the certificate is for the CSR's key, kept by the observer,
    so the folder keeps no key of its own (the old one no longer matches), as a device's
    bundle keeps no device-tls.key."""
    root = tmp_path / "fleet"
    provision(root, "init", "--fleet", "demo")
    provision(root, "add-observer", "dash")
    folder = root / "observers" / "dash"
    assert (folder / "observer-tls.key").is_file()
    own = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "dash")])
    )
    csr_path = tmp_path / "dash.csr"
    csr_path.write_bytes(csr.sign(own, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    provision(root, "rotate", "dash", "--tls-csr", str(csr_path))
    cert = x509.load_pem_x509_certificate((folder / "observer-tls.pem").read_bytes())
    assert cert.public_key() == own.public_key()
    assert not (folder / "observer-tls.key").exists()
    provision(root, "rotate", "dash")  # without a CSR: a new key is issued again
    cert = x509.load_pem_x509_certificate((folder / "observer-tls.pem").read_bytes())
    key = serialization.load_pem_private_key((folder / "observer-tls.key").read_bytes(), None)
    assert cert.public_key() == key.public_key()
