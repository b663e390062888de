"""fleet.toml round trip, the example config, and the ACL's per-device confinement."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskfl.broker_coordinator.provision import (
    BrokerSettings,
    CoordinatorSettings,
    FleetSettings,
    ProvisionError,
    ValiditySettings,
    device_rules,
    render_acl,
)
from maskfl.broker_coordinator.provision.cli import main
from maskfl.protocol.identity import Certificate
from maskfl.protocol.keys import public_key_from_pem
from maskfl.protocol.topics import Topics

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


def test_example_fleet_toml_is_valid() -> None:
    example = FleetSettings.from_toml(CONFIGS / "fleet.toml")
    assert example.name == "demo" and example.broker.port == 8883


@settings(max_examples=40, deadline=None)
@given(
    name=ids,
    host=st.sampled_from(["localhost", "broker.example.org", "10.0.0.2"]),
    port=st.integers(1, 65535),
    san=st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z]{2,5})?", fullmatch=True), max_size=3),
    days=st.integers(1, 10_000),
    model_length=st.integers(1, 10**8),
)
def test_fleet_toml_round_trips(
    tmp_path_factory: pytest.TempPathFactory,
    *,
    name: str,
    host: str,
    port: int,
    san: list[str],
    days: int,
    model_length: int,
) -> None:
    original = FleetSettings(
        name=name,
        broker=BrokerSettings(host=host, port=port, san_hosts=tuple(san)),
        validity=ValiditySettings(device_days=days),
        coordinator=CoordinatorSettings(model_length=model_length),
    )
    path = tmp_path_factory.mktemp("toml") / "fleet.toml"
    path.write_text(original.to_toml())
    assert FleetSettings.from_toml(path) == original


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[fleet]\nname = "demo"\n[broker]\nport = "8883"\n', "must be a int"),
        ('[fleet]\nname = "demo"\n[broker]\nprot = 8883\n', "prot is not a known key"),
        ('[fleet]\nname = "demo"\n[brokers]\n', "unknown section"),
        ("[fleet]\n", "name is required"),
        ('[fleet]\nname = "de mo"\n', "not valid"),
        ('[fleet]\nname = "demo"\n[broker]\nport = 0\n', "not a TCP port"),
        ('[fleet]\nname = "demo"\n[broker]\nsan_ips = "1.2.3.4"\n', "list of strings"),
        ("not toml [", "cannot read"),
    ],
)
def test_bad_fleet_toml_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(ProvisionError, match=message.replace("[", r"\[")):
        FleetSettings.from_toml(path)


@settings(max_examples=50, deadline=None)
@given(fleet=ids, devices=st.sets(ids.filter(lambda d: d != "coordinator"), max_size=6))
def test_acl_confines_every_device_to_its_own_topics(fleet: str, devices: set[str]) -> None:
    acl = render_acl(fleet=fleet, devices=devices)
    blocks = acl.split("\n\n")[2:]  # header, coordinator, then one block per device
    assert len(blocks) == len(devices)
    topics = Topics(fleet)
    for block, device in zip(blocks, sorted(devices), strict=True):
        lines = block.strip().splitlines()
        assert lines[0] == f"user {device}" and lines == device_rules(fleet, device)
        writes = [line.split(" ", 2)[2] for line in lines if line.startswith("topic write")]
        # Every writable topic ends in the device's own id and lies in the fleet's prefix.
        assert all(w.startswith(topics.prefix) and w.endswith(f"/{device}") for w in writes)
        assert not any(line.startswith("topic readwrite") for line in lines)
        assert "#" not in "".join(writes)


def test_openssl_made_device_keys_are_accepted(tmp_path: Path) -> None:
    """The commands of docs/operations.md for device-generated keys, with real openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed here")
    root = tmp_path / "fleet"
    assert main(["--dir", str(root), "init", "--fleet", "demo"]) == 0
    key, pub, tls_key, csr = (tmp_path / n for n in ("d.key", "d.pub", "t.key", "d.csr"))
    run = [
        [openssl, "genpkey", "-algorithm", "ed25519", "-out", str(key)],
        [openssl, "pkey", "-in", str(key), "-pubout", "-out", str(pub)],
        [openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tls_key), "-subj", "/CN=cam-7", "-out", str(csr)],
    ]  # fmt: skip
    for command in run:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    args = ["add-device", "cam-7", "--public-key", str(pub), "--tls-csr", str(csr)]
    assert main(["--dir", str(root), *args]) == 0
    cert = Certificate.from_bytes((root / "devices" / "cam-7" / "device.cert").read_bytes())
    assert cert.public_key == public_key_from_pem(pub.read_bytes())
