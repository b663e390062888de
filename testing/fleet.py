"""A fleet CA for tests, benchmarks and the conformance bench: identities and bundles.

:class:`SimFleet` holds the fleet CA key, issues certificates, writes a coordinator
bundle (keys, certificate, initial weights, ``coordinator.toml``) and agent bundles
(:meth:`SimFleet.write_agents`, :func:`write_agent_bundle`) and can pick
identities whose sortition ticket gives a wanted role in a given round, so a test
can have exactly 3 summers and 6 updaters in round 1. The identities are what
:class:`maskfl.testing.participants.SimParticipant` speaks with.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tomli_w
from nacl.signing import SigningKey

from maskfl.protocol.identity import (
    Certificate,
    Identity,
    issue_certificate,
    issue_revocation_list,
)
from maskfl.protocol.ids import Role
from maskfl.protocol.keys import public_key_to_pem, signing_key_to_pem
from maskfl.protocol.messages import weights_digest
from maskfl.protocol.sortition import Task, group_of, next_round_seed, select_task

__all__ = ["SimFleet", "coordinator_command", "first_round_seed", "write_agent_bundle"]

F32 = npt.NDArray[np.float32]
_COORDINATOR_CLI = "maskfl.broker_coordinator.cli"


@dataclass
class SimFleet:
    """A fleet CA and the identities it issued."""

    fleet: str = "simfleet"
    ca_key: SigningKey = field(default_factory=SigningKey.generate)
    serial: int = 0
    """The serial number of the last certificate issued."""

    @property
    def ca_public_key(self) -> bytes:
        return bytes(self.ca_key.verify_key)

    def identity(
        self,
        device: str,
        role: Role = Role.DEVICE,
        *,
        key: SigningKey | None = None,
        not_after: int | None = None,
    ) -> Identity:
        """A new key (or ``key``) for ``device`` and its certificate."""
        key = key or SigningKey.generate()
        return Identity(key, self.certificate(device, role, key, not_after=not_after))

    def certificate(
        self,
        subject: str,
        role: Role,
        key: SigningKey,
        *,
        ca: SigningKey | None = None,
        fleet: str | None = None,
        not_after: int | None = None,
    ) -> Certificate:
        """A certificate for ``key``, valid from an hour ago for a year (or until
        ``not_after``), issued by this fleet's CA for this fleet, or by ``ca`` (a forger's)
        and for ``fleet``."""
        self.serial += 1
        now = int(time.time())
        return issue_certificate(
            ca or self.ca_key,
            fleet=fleet or self.fleet,
            serial=self.serial,
            subject=subject,
            role=role,
            public_key=bytes(key.verify_key),
            not_before=now - 3600,
            not_after=not_after if not_after is not None else now + 365 * 86400,
        )

    def identities_for_roles(
        self,
        seed: bytes,
        *,
        p_sum: float,
        p_update: float,
        summers: int,
        updaters: int,
        prefix: str = "dev",
        groups: int = 1,
        fill: int | None = None,
    ) -> tuple[list[Identity], list[Identity]]:
        """Draw keys until ``summers`` get SUM and ``updaters`` get UPDATE for ``seed``.

        With ``groups`` > 1, summer i is in mask group ``i % fill`` (``fill``:
        ``groups`` unless given; 1 puts every summer in group 0)."""
        cycle = groups if fill is None else fill
        got_s: list[Identity] = []
        got_u: list[Identity] = []
        n = 0
        while len(got_s) < summers or len(got_u) < updaters:
            key = SigningKey.generate()
            task = select_task(seed, bytes(key.verify_key), p_sum, p_update)
            in_turn = group_of(seed, bytes(key.verify_key), groups) == len(got_s) % cycle
            if task is Task.SUM and len(got_s) < summers and in_turn:
                got_s.append(self.identity(f"{prefix}-s{len(got_s)}", key=key))
            elif task is Task.UPDATE and len(got_u) < updaters:
                got_u.append(self.identity(f"{prefix}-u{len(got_u)}", key=key))
            n += 1
            if n > 100_000:
                raise RuntimeError("could not draw the wanted roles; check the probabilities")
        return got_s, got_u

    def revocations(self, path: Path, serials: list[int], version: int) -> None:
        rl = issue_revocation_list(
            self.ca_key,
            fleet=self.fleet,
            version=version,
            issued_at=int(time.time()),
            serials=serials,
        )
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(rl.to_bytes())
        tmp.replace(path)

    def write_ca(self, path: Path) -> Path:
        """The fleet CA's public key (PEM) at ``path``, as agents and the coordinator read it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(public_key_to_pem(self.ca_key.verify_key))
        return path

    def write_agents(
        self,
        directory: Path,
        identities: list[Identity],
        *,
        port: int,
        host: str = "127.0.0.1",
        shards: int = 4,
    ) -> list[Path]:
        """``directory/ca.pub`` and an agent bundle ``directory/<subject>`` for each identity
        (the k-th trains on digits shard k of ``shards``); their agent.toml paths in order."""
        ca_file = self.write_ca(directory / "ca.pub")
        return [
            write_agent_bundle(
                directory / ident.certificate.subject,
                ident,
                fleet=self.fleet,
                ca_public_key_file=ca_file,
                host=host,
                port=port,
                shard=k,
                shards=shards,
            )
            for k, ident in enumerate(identities)
        ]

    def write_coordinator(
        self,
        directory: Path,
        *,
        port: int,
        length: int,
        initial: F32 | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
    ) -> Path:
        """A coordinator bundle in ``directory``; returns the path of coordinator.toml."""
        directory.mkdir(parents=True, exist_ok=True)
        ident = self.identity("coordinator", role=Role.COORDINATOR)
        (directory / "ca.pub").write_bytes(public_key_to_pem(self.ca_key.verify_key))
        key_path = directory / "coordinator.key"
        key_path.write_bytes(signing_key_to_pem(ident.signing_key))
        key_path.chmod(0o600)
        (directory / "coordinator.cert").write_bytes(ident.certificate.to_bytes())
        weights = initial if initial is not None else np.zeros(length, dtype=np.float32)
        np.save(directory / "initial_weights.npy", weights.astype(np.float32))
        config: dict[str, dict[str, Any]] = {
            "fleet": {"id": self.fleet, "ca_public_key_file": "ca.pub"},
            "identity": {"key_file": "coordinator.key", "certificate_file": "coordinator.cert"},
            "broker": {
                "host": "127.0.0.1",
                "port": port,
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 1.0,
            },
            "storage": {"dir": "state"},
            "model": {"id": "sim", "length": length, "initial_weights": "initial_weights.npy"},
            "masking": {"bound": 1.0, "n_max": 100, "word_bits": 32},
            # update.count_max may not exceed masking.n_max (the config refuses it)
            "pet": {
                "failure_pause_s": 0.5,
                "update": {
                    "target": 10,
                    "count_min": 3,
                    "count_max": 100,
                    "time_min_s": 5.0,
                    "time_max_s": 300.0,
                },
            },
            "aggregation": {"backend": "numpy"},
            "http": {"enabled": False},
            "log": {"level": "info", "format": "json"},
        }
        for section, values in (overrides or {}).items():
            if isinstance(values, dict) and isinstance(config.get(section), dict):
                merged = dict(config[section])
                for k, v in values.items():
                    if isinstance(v, dict) and isinstance(merged.get(k), dict):
                        merged[k] = {**merged[k], **v}
                    else:
                        merged[k] = v
                config[section] = merged
            else:
                config[section] = values
        path = directory / "coordinator.toml"
        path.write_bytes(tomli_w.dumps(config).encode())
        return path


def first_round_seed(initial_seed: bytes, initial: F32) -> bytes:
    """The seed of round 1 for a coordinator with this initial seed and these weights."""
    return next_round_seed(initial_seed, weights_digest(initial.astype(np.float32)), 1)


def write_agent_bundle(
    bundle: Path,
    identity: Identity,
    *,
    fleet: str,
    ca_public_key_file: Path,
    port: int,
    host: str = "127.0.0.1",
    extra: str = "",
    state_dir: Path | None = None,
    shard: int = 0,
    shards: int = 4,
) -> Path:
    """An agent bundle in ``bundle`` (key 0600, certificate, agent.toml naming the broker at
    ``host``:``port``, fast reconnects and heartbeats, digits shard ``shard`` of
    ``shards``; ``extra``: more TOML appended) for ``identity``; returns agent.toml."""
    bundle.mkdir(parents=True, exist_ok=True)
    key = bundle / "device.key"
    key.write_bytes(signing_key_to_pem(identity.signing_key))
    key.chmod(0o600)
    (bundle / "device.cert").write_bytes(identity.certificate.to_bytes())
    state = state_dir or bundle / "state"
    config = bundle / "agent.toml"
    config.write_text(
        f"""
[device]
id = "{identity.certificate.subject}"
fleet = "{fleet}"
key_file = "device.key"
certificate_file = "device.cert"
ca_public_key_file = "{ca_public_key_file}"

[broker]
host = "{host}"
port = {port}
reconnect_min_s = 0.2
reconnect_max_s = 2.0

[state]
dir = "{state}"

[heartbeat]
interval_s = 1.0

[data]
source = "digits"
options = {{ shard = {shard}, shards = {shards} }}
{extra}
"""
    )
    return config


def coordinator_command(config: Path, *args: str) -> list[str]:
    """The command that runs the coordinator of the bundle ``config`` as its own process
    (``maskfl-coordinator run`` with this interpreter), ``args`` appended."""
    return [sys.executable, "-m", _COORDINATOR_CLI, "run", "--config", str(config), *args]
