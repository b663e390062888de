"""The agent's configuration: one TOML file plus ``MASKFL__SECTION__KEY`` environment overrides.

This model is the source of truth for the keys of ``agent.toml``; provisioning writes
bundles that match it. Example (every section but ``[device]`` is optional)::

    [device]
    id = "pi-kitchen-01"                 # [A-Za-z0-9_-]{1,64}; also the MQTT client id
    fleet = "demo"
    key_file = "device.key"              # Ed25519 PKCS#8 PEM, mode 0600
    # key_passphrase_file = "device.pass"
    certificate_file = "device.cert"     # enrollment certificate (protocol binary encoding)
    ca_public_key_file = "ca.pub"        # fleet CA public key (PEM)
    # revocations_file = "fleet.crl"     # optional; the retained list on the broker also counts

    [broker]
    host = "broker.example.org"
    port = 8883
    tls = true
    ca_file = "broker-ca.pem"
    cert_file = "device-tls.pem"         # mTLS client certificate
    key_file = "device-tls.key"
    # session_expiry_s = 86400           # persistent session; 0 = clean session

    [state]
    dir = "/var/lib/maskfl-agent"        # SQLite journal; StateDirectory= in systemd

    [guards]
    time_windows = ["22:00-06:00"]       # local time; empty list = any time
    max_load_per_cpu = 0.8               # 1-minute load average divided by CPU count
    min_free_memory_mb = 128
    on_battery_file = "/sys/class/power_supply/BAT0/status"
    on_battery_value = "Discharging"
    # on_battery_command = ["/usr/local/bin/on-battery"]   # exit status 0 = on battery
    max_upload_bytes = 67108864          # per round

    [training]
    epochs = 1
    batch_size = 32
    sample_cap = 1000                    # weight a = min(samples, cap) / cap
    # model_file = "model.tflite"        # else the shipped model of that id, else the
    #                                      graph retained on model/<id>/graph; each is used
    #                                      only if its SHA-256 is the graph digest of the
    #                                      signed global model (when that states one)

    [data]
    source = "digits"                    # entry point in group "maskfl.datasources"
    options = { shard = 0, shards = 10 }

Relative paths are resolved against the directory of the config file (so a
provisioning bundle can be moved as a whole). Environment variables override the
file: ``MASKFL__BROKER__HOST=10.0.0.2``, ``MASKFL__GUARDS__MAX_LOAD_PER_CPU=0.5``.
Every failure becomes a :class:`~maskfl.protocol.errors.ConfigError` whose message
names the field and says what to fix.
"""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from datetime import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from maskfl.protocol.errors import ConfigError
from maskfl.protocol.settings import describe_errors, env_overrides, merge
from maskfl.transport import BrokerSettings, LogFormat, ServiceSettings
from maskfl.transport import Section as _Section

__all__ = [
    "LOCAL_TOML",
    "AgentConfig",
    "BrokerSection",
    "DataSection",
    "DeviceSection",
    "GuardsSection",
    "HeartbeatSection",
    "LimitsSection",
    "LoggingSection",
    "StateSection",
    "TimeWindow",
    "TrainingSection",
    "load_config",
]

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class TimeWindow(_Section):
    """A daily local-time window ``start-end``; ``end < start`` wraps past midnight."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        match = _WINDOW.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not a window like '22:00-06:00'")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2 != 0):
            raise ValueError(f"{text!r} has an hour or minute out of range")
        end = time(23, 59, 59, 999999) if h2 == 24 else time(h2, m2)
        return cls(start=time(h1, m1), end=end)

    def contains(self, now: time) -> bool:
        """Whether local time ``now`` lies in the window; ``start == end`` is all day."""
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


class DeviceSection(_Section):
    """Who this device is: its id, fleet, long-term key and enrollment certificate."""

    id: str = Field(pattern=DEVICE_ID_PATTERN)
    fleet: str = Field(pattern=DEVICE_ID_PATTERN)
    key_file: Path
    key_passphrase_file: Path | None = None
    certificate_file: Path
    ca_public_key_file: Path
    revocations_file: Path | None = None


class BrokerSection(BrokerSettings):
    """How to reach the MQTT broker: the keys and checks of the shared
    :class:`~maskfl.transport.BrokerSettings`; ``session_expiry_s`` is how long receipts
    and seeds sent while the device is down wait for it (0 = a clean session on every
    connect)."""

    host: str = "localhost"


def _default_state_dir() -> Path:
    # systemd's StateDirectory= exports STATE_DIRECTORY (colon-separated when several).
    found = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(found or "/var/lib/maskfl-agent")


class StateSection(_Section):
    """Where durable state lives (the SQLite journal of rounds and keys)."""

    dir: Path = Field(default_factory=_default_state_dir)

    @property
    def database(self) -> Path:
        return self.dir / "agent.sqlite3"


class GuardsSection(_Section):
    """When the device may work (train as an updater, expand masks as a summer) and how
    much it may upload per round. An unset limit is not checked."""

    time_windows: tuple[TimeWindow, ...] = ()
    max_load_per_cpu: float | None = Field(default=None, gt=0)
    min_free_memory_mb: int | None = Field(default=None, ge=0)
    on_battery_file: Path | None = None
    on_battery_value: str = "Discharging"
    on_battery_command: tuple[str, ...] | None = None
    command_timeout_s: float = Field(default=5.0, gt=0)
    max_upload_bytes: int | None = Field(default=None, gt=0)

    @field_validator("time_windows", mode="before")
    @classmethod
    def _parse_windows(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            return tuple(TimeWindow.parse(v) if isinstance(v, str) else v for v in value)
        return value

    @field_validator("on_battery_command", mode="before")
    @classmethod
    def _split_command(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(shlex.split(value))
        return value


class TrainingSection(_Section):
    """Local training: how long, and how an update is weighted."""

    epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1)
    sample_cap: int = Field(default=1000, ge=1)
    model_file: Path | None = None
    threads: int | None = Field(default=None, ge=1)


class DataSection(_Section):
    """Where the training data comes from: a data-source plugin and its options."""

    source: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict)
    holdout: float = Field(default=0.2, ge=0.0, le=0.9)
    """Fraction of this device's training samples kept out of training to evaluate each
    round's global model on (federated evaluation; the split is fixed per device: a
    shuffle seeded by the data's own digest). 0 turns evaluation off."""


class HeartbeatSection(_Section):
    """Signed heartbeats on ``status/<device>``."""

    interval_s: float = Field(default=30.0, ge=1.0)


class LimitsSection(_Section):
    """Bounds on what the agent accepts from the network (checked before parsing)."""

    max_message_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    max_graph_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """The largest model graph (``.tflite``) taken from ``model/<id>/graph``; a graph waits
    in memory for the signed digest that vouches for it (see :mod:`maskfl.agent.graphs`)."""
    max_reassembly_messages: int = Field(default=8, ge=1)
    reassembly_max_age_s: float = Field(default=600.0, gt=0)
    receipt_timeout_s: float = Field(default=60.0, gt=0)
    upload_retries: int = Field(default=2, ge=0, le=10)


class LoggingSection(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: LogFormat = "auto"
    """``auto``: text on a terminal or under journald, JSON otherwise (maskfl.transport's
    logging convention, shared with the coordinator); ``run --log-format`` overrides it."""


class AgentConfig(ServiceSettings):
    """The whole ``agent.toml``. Build it with :func:`load_config`."""

    device: DeviceSection
    broker: BrokerSection = BrokerSection()
    state: StateSection = StateSection()
    guards: GuardsSection = GuardsSection()
    training: TrainingSection = TrainingSection()
    data: DataSection = DataSection()
    heartbeat: HeartbeatSection = HeartbeatSection()
    limits: LimitsSection = LimitsSection()
    logging: LoggingSection = LoggingSection()

    def resolve_paths(self, base: Path) -> AgentConfig:
        """A copy whose relative paths are taken relative to ``base`` (the config's folder)."""

        def fix(section: BaseModel) -> BaseModel:
            updates: dict[str, Any] = {}
            for name, value in section:
                if isinstance(value, Path) and not value.is_absolute() and str(value) != "":
                    updates[name] = (base / value).resolve()
            return section.model_copy(update=updates) if updates else section

        return self.model_copy(
            update={
                "device": fix(self.device),
                "broker": fix(self.broker),
                "state": fix(self.state),
                "guards": fix(self.guards),
                "training": fix(self.training),
            }
        )


LOCAL_TOML = "agent.local.toml"
"""The operator's own settings beside ``agent.toml``: no bundle contains this file, so a
new bundle (rotate) never overwrites it; it overrides agent.toml key by key."""


def load_config(
    path: Path | str | None, *, environ_only: bool = False, env: Mapping[str, str] | None = None
) -> AgentConfig:
    """Read ``path`` (TOML) and the ``agent.local.toml`` beside it, apply ``MASKFL__...``
    overrides, resolve relative paths.

    Precedence, each merged key by key (:mod:`maskfl.protocol.settings`): ``path`` (the
    bundle's, replaced by a new bundle), then :data:`LOCAL_TOML` in the same folder if it
    exists (the operator's), then the overrides from ``env`` (default ``os.environ``).
    Raises :class:`ConfigError` naming the field, the file or environment variable that
    set it, and the fix; never a pydantic or TOML error.
    """
    data: dict[str, Any] = {}
    base = Path.cwd()
    where = "the environment"
    if path is not None and not environ_only:
        file = Path(path)
        data = _read_toml(file)
        base = file.resolve().parent
        where = str(path)
        local = file.with_name(LOCAL_TOML)
        if local.is_file():
            data = merge(data, _read_toml(local))
            where = f"{path} with {local}"
    overrides, origins = env_overrides(os.environ if env is None else env, AgentConfig)
    try:
        config = AgentConfig(**merge(data, overrides))
    except ValidationError as exc:
        text, field = describe_errors(exc.errors(), AgentConfig, origins)
        raise ConfigError(f"{text} (agent config: {where})", field=field) from exc
    return config.resolve_paths(base)


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {file} does not exist", field="--config") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc}", field="--config") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file} is not valid TOML: {exc}", field="--config") from exc
