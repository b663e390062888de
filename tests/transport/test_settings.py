"""The [broker] table both services share, and the one conversion to MqttConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskfl.agent.config import BrokerSection
from maskfl.broker_coordinator.config import BrokerConfig
from maskfl.protocol.errors import ConfigError
from maskfl.transport import BrokerSettings, MqttConfig, TlsConfig


def test_both_services_broker_tables_are_the_shared_section() -> None:
    assert issubclass(BrokerSection, BrokerSettings) and issubclass(BrokerConfig, BrokerSettings)
    shared = set(BrokerSettings.model_fields)
    assert shared <= set(BrokerSection.model_fields) and shared <= set(BrokerConfig.model_fields)
    assert set(BrokerSection.model_fields) == shared  # the agent adds nothing of its own


def test_the_conversion_carries_every_shared_key(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    keys = dict(
        host="broker.example",
        port=8883,
        tls=True,
        ca_file=tmp_path / "ca.pem",
        cert_file=tmp_path / "c.pem",
        key_file=tmp_path / "c.key",
        username="dev-1",
        password_file=secret,
        keepalive_s=45,
        session_expiry_s=600,
        reconnect_min_s=2.0,
        reconnect_max_s=20.0,
        connect_timeout_s=7.0,
    )
    for cls in (BrokerSection, BrokerConfig):
        got = cls(**keys).mqtt_config("dev-1", clean_start=False)  # type: ignore[arg-type]
        assert got == MqttConfig(
            host="broker.example",
            port=8883,
            client_id="dev-1",
            clean_start=False,
            session_expiry_s=600,
            keepalive_s=45,
            username="dev-1",
            password="s3cret",
            tls=TlsConfig(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "c.key"),
            connect_timeout_s=7.0,
            reconnect_min_s=2.0,
            reconnect_max_s=20.0,
        )


def test_coordinator_only_keys_inline_password_and_insecure_tls() -> None:
    b = BrokerConfig(tls=True, tls_insecure=True, username="c", password="pw")
    got = b.mqtt_config("c", clean_start=False)
    assert got.password == "pw" and got.tls == TlsConfig(insecure=True)
    with pytest.raises(ValueError, match="set password or password_file, not both"):
        BrokerConfig(username="c", password="pw", password_file=Path("x"))


def test_an_unreadable_password_file_is_one_line_naming_the_field(tmp_path: Path) -> None:
    for cls in (BrokerSection, BrokerConfig):
        b = cls(username="u", password_file=tmp_path / "missing")
        with pytest.raises(ConfigError) as err:
            b.mqtt_config("u", clean_start=True)
        assert err.value.field == "broker.password_file"
        assert "\n" not in str(err.value) and "fix the path" in str(err.value)
