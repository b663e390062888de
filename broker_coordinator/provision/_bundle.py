"""What a device or the coordinator receives: config files and the bundle archive.

The key names written here are those of ``maskfl.agent.config.AgentConfig`` and
``maskfl.broker_coordinator.config.CoordinatorConfig`` (a test loads every
generated file with those models). Paths are relative to the config file's
directory, so a bundle works wherever it is unpacked.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import tomli_w

from maskfl.broker_coordinator.provision._files import PRIVATE, PUBLIC, write_atomic

# Device bundle files (names as in configs/agent.toml).
DEVICE_KEY = "device.key"
DEVICE_CERT = "device.cert"
DEVICE_CA_PUB = "ca.pub"
DEVICE_BROKER_CA = "broker-ca.pem"
DEVICE_TLS_CERT = "device-tls.pem"
DEVICE_TLS_KEY = "device-tls.key"
AGENT_TOML = "agent.toml"

# Coordinator bundle files (names as in configs/coordinator.toml).
COORD_KEY = "coordinator.key"
COORD_CERT = "coordinator.cert"
COORD_CA_PUB = "ca.pub"
COORD_BROKER_CA = "broker-ca.pem"
COORD_TLS_CERT = "coordinator-tls.pem"
COORD_TLS_KEY = "coordinator-tls.key"
COORD_REVOCATIONS = "revocations.bin"
COORDINATOR_TOML = "coordinator.toml"

# Observer folder files (read-only identity: TLS only).
OBSERVER_TLS_CERT = "observer-tls.pem"
OBSERVER_TLS_KEY = "observer-tls.key"
OBSERVER_BROKER_CA = "broker-ca.pem"
OBSERVER_CA_PUB = "ca.pub"
OBSERVER_README = "README.txt"


def _toml(data: dict[str, object]) -> str:
    return tomli_w.dumps(data)


def render_agent_toml(
    *,
    fleet: str,
    device: str,
    broker_host: str,
    broker_port: int,
    own_key: bool,
    own_tls_key: bool,
) -> str:
    """agent.toml of one device: identity files, the broker over mTLS; defaults for the rest."""
    notes = []
    if own_key:
        notes.append(f"# {DEVICE_KEY} was generated on the device and is not in this bundle.")
    if own_tls_key:
        notes.append(f"# {DEVICE_TLS_KEY} was generated on the device and is not in this bundle.")
    head = [
        f"# maskfl-agent configuration of device {device!r} in fleet {fleet!r},",
        "# written by maskfl-provision. Relative paths are relative to this file.",
        "# Other sections ([guards], [training], [data], ...) keep their defaults:",
        "# see configs/agent.toml. A new bundle (rotate) replaces this file: put your own",
        "# settings in agent.local.toml next to it, which no bundle contains and which",
        "# overrides this file key by key. Environment overrides: MASKFL__SECTION__KEY.",
        *notes,
        "",
    ]
    body = _toml(
        {
            "device": {
                "id": device,
                "fleet": fleet,
                "key_file": DEVICE_KEY,
                "certificate_file": DEVICE_CERT,
                "ca_public_key_file": DEVICE_CA_PUB,
            },
            "broker": {
                "host": broker_host,
                "port": broker_port,
                "tls": True,
                "ca_file": DEVICE_BROKER_CA,
                "cert_file": DEVICE_TLS_CERT,
                "key_file": DEVICE_TLS_KEY,
            },
        }
    )
    tail = [
        "",
        "# [state] dir defaults to systemd's StateDirectory (/var/lib/maskfl-agent).",
        "",
    ]
    return "\n".join(head) + "\n" + body + "\n".join(tail)


def render_observer_readme(*, fleet: str, name: str, broker_host: str, broker_port: int) -> str:
    """How to use an observer identity, with a ``mosquitto_sub`` line that works as is."""
    prefix = f"maskfl/v1/{fleet}"
    return "\n".join(
        [
            f"Read-only observer {name!r} of the maskfl fleet {fleet!r}, written by",
            "maskfl-provision add-observer. The broker names this identity by its TLS",
            "certificate; its ACL reads these topics and publishes nothing:",
            "",
            f"  {prefix}/round             round parameters (signed by the coordinator)",
            f"  {prefix}/round/+/sums      sum dictionaries",
            f"  {prefix}/model/#           global models and the model graph",
            f"  {prefix}/status/+          devices' signed heartbeats",
            f"  {prefix}/revocations       the signed revocation list",
            "",
            f"{OBSERVER_CA_PUB} is the fleet CA's public key, to verify what you read.",
            f"{OBSERVER_TLS_KEY} is private: keep it 0600.",
            "",
            "Watch the rounds from this folder:",
            "",
            f"  mosquitto_sub -V mqttv5 -h {broker_host} -p {broker_port} -i {name} \\",
            f"    --cafile {OBSERVER_BROKER_CA} --cert {OBSERVER_TLS_CERT} "
            f"--key {OBSERVER_TLS_KEY} \\",
            f"    -t '{prefix}/round' -t '{prefix}/status/+' -v",
            "",
            f"Revoke it with `maskfl-provision --dir FLEET revoke {name}` on the operator's",
            "machine (it reloads mosquitto where broker-config --reload-command or",
            "--broker-pid-file is set; otherwise reload it by hand).",
            "",
        ]
    )


def render_coordinator_toml(
    *,
    fleet: str,
    broker_host: str,
    broker_port: int,
    model_id: str,
    model_length: int,
    state_dir: str,
    initial_weights: str | None = None,
    graph_file: str | None = None,
) -> str:
    """coordinator.toml: identity, revocation list, broker over mTLS, storage, model."""
    head = [
        f"# maskfl-coordinator configuration of fleet {fleet!r}, written by maskfl-provision.",
        "# Relative paths are relative to this file. The revocation list is replaced",
        "# atomically by `maskfl-provision revoke/rotate` and reloaded when its mtime",
        "# changes. Round timing ([pet.*]), masking, optimizer and http keep their",
        "# defaults: see configs/coordinator.toml. Overrides: MASKFL__SECTION__KEY.",
        "",
    ]
    model_files = {
        key: value
        for key, value in (("initial_weights", initial_weights), ("graph_file", graph_file))
        if value is not None
    }
    body = _toml(
        {
            "fleet": {
                "id": fleet,
                "ca_public_key_file": COORD_CA_PUB,
                "revocations_file": COORD_REVOCATIONS,
            },
            "identity": {"key_file": COORD_KEY, "certificate_file": COORD_CERT},
            "broker": {
                "host": broker_host,
                "port": broker_port,
                "tls": True,
                "ca_file": COORD_BROKER_CA,
                "cert_file": COORD_TLS_CERT,
                "key_file": COORD_TLS_KEY,
            },
            "storage": {"dir": state_dir},
            "model": {"id": model_id, "length": model_length} | model_files,
        }
    )
    return "\n".join(head) + "\n" + body


def write_tarball(source: Path, target: Path) -> None:
    """``target`` (.tar.gz) holding ``source``'s files under ``<source name>/``, modes kept.

    Owners are reset to 0 so unpacking leaks nothing about the provisioning host;
    the archive itself is private (it may hold keys).
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:

        def scrub(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            return info

        tar.add(source, arcname=source.name, recursive=False, filter=scrub)
        for path in sorted(source.iterdir()):
            tar.add(path, arcname=f"{source.name}/{path.name}", filter=scrub)
    write_atomic(target, buffer.getvalue(), mode=PRIVATE)


def write_file(directory: Path, name: str, data: bytes | str, *, private: bool) -> None:
    write_atomic(directory / name, data, mode=PRIVATE if private else PUBLIC)
