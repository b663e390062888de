"""The config pieces both services share: their settings base and the ``[broker]`` table.

The agent's ``agent.toml`` and the coordinator's ``coordinator.toml`` are pydantic
settings (the edge of the process: files and ``MASKFL__`` overrides, merged by
:mod:`maskfl.protocol.settings`). Both derive from :class:`ServiceSettings` and
both ``[broker]`` tables from :class:`BrokerSettings`, which turns the table into
the one :class:`MqttConfig` the transport takes (:meth:`BrokerSettings.mqtt_config`).
A service's subclass changes defaults and adds its own keys (the coordinator's
session settings); the keys both have are declared, checked and converted here.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from maskfl.protocol.errors import ConfigError
from maskfl.protocol.settings import ENV_PREFIX

from ._config import MqttConfig, TlsConfig

__all__ = ["BrokerSettings", "Section", "ServiceSettings", "check_private_mode"]


def check_private_mode(path: Path, field: str) -> None:
    """Refuse a private key file that group or others can read (both services check
    their key files so at start-up): :class:`ConfigError` naming ``field``, the mode
    and the ``chmod`` that fixes it, or that the file cannot be stat'ed."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"{field}: cannot stat {path}: {exc.strerror}", field=field) from exc
    if mode & 0o077:
        raise ConfigError(
            f"{field}: {path} has mode {mode:04o}; private keys must be 0600 "
            f"(run: chmod 600 {path})",
            field=field,
        )


class Section(BaseModel):
    """A table of a service's config: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ServiceSettings(BaseSettings):
    """A whole service config. Its ``load_config`` merges the environment into the
    file (:mod:`maskfl.protocol.settings`: values read as TOML values, key by key)
    and passes the result as init kwargs, the only source read here."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class BrokerSettings(Section):
    """How to reach the MQTT broker (MQTT 5; TLS with client certificates in production).

    TLS: ``tls = true`` with ``ca_file``; client-certificate auth with ``cert_file`` +
    ``key_file``; username/password with ``username`` + ``password_file``.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    session_expiry_s: Annotated[int, Field(ge=0, le=2**32 - 1)] = 86400
    """Persistent MQTT session: what is sent while the client is down waits for it this
    long on the broker."""
    reconnect_min_s: Annotated[float, Field(gt=0)] = 1.0
    reconnect_max_s: Annotated[float, Field(gt=0)] = 60.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 15.0

    @model_validator(mode="after")
    def _check_broker(self) -> Self:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file (the TLS client pair) or neither")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ValueError(
                "ca_file/cert_file/key_file need tls = true; set tls = true or remove them"
            )
        return self

    def read_password(self) -> str | None:
        """The password: the first line of ``password_file``, or None without one."""
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"broker.password_file: cannot read {self.password_file}: {exc.strerror}; "
                "fix the path or the file's permissions",
                field="broker.password_file",
            ) from exc

    def tls_config(self) -> TlsConfig | None:
        if not self.tls:
            return None
        return TlsConfig(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)

    def mqtt_config(self, client_id: str, *, clean_start: bool) -> MqttConfig:
        """The transport settings of this table, for ``client_id``; a service sets its
        queue sizes and session options on the result (``dataclasses.replace``)."""
        return MqttConfig(
            host=self.host,
            port=self.port,
            client_id=client_id,
            clean_start=clean_start,
            session_expiry_s=self.session_expiry_s,
            keepalive_s=self.keepalive_s,
            username=self.username,
            password=self.read_password(),
            tls=self.tls_config(),
            connect_timeout_s=self.connect_timeout_s,
            reconnect_min_s=self.reconnect_min_s,
            reconnect_max_s=self.reconnect_max_s,
        )
