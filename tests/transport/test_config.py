"""MqttConfig refuses combinations that would fail late, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskfl.protocol.errors import ConfigError
from maskfl.transport import LastWill, MqttConfig, TlsConfig


def test_defaults_are_valid() -> None:
    cfg = MqttConfig()
    assert cfg.address == "127.0.0.1:1883"
    assert cfg.clean_start and not cfg.manual_ack


def test_password_is_not_in_repr() -> None:
    assert "hunter2" not in repr(MqttConfig(username="u", password="hunter2"))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"clean_start": False, "client_id": "c"}, "session_expiry_s"),
        ({"clean_start": False, "session_expiry_s": 60}, "client_id"),
        ({"port": 0}, "port"),
        ({"host": ""}, "host"),
        ({"password": "x"}, "username"),
        ({"receive_maximum": 0}, "receive_maximum"),
        ({"incoming_queue_size": 0}, "incoming_queue_size"),
        ({"max_incoming_payload": 0}, "max_incoming_payload"),
        ({"reconnect_min_s": 2.0, "reconnect_max_s": 1.0}, "reconnect_max_s"),
        ({"will": LastWill("s/x", qos=2)}, "will.qos"),
    ],
)
def test_bad_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        MqttConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_persistent_session_needs_both_settings() -> None:
    cfg = MqttConfig(client_id="coordinator", clean_start=False, session_expiry_s=3600)
    assert cfg.session_expiry_s == 3600


def test_client_cert_needs_its_key() -> None:
    with pytest.raises(ConfigError):
        TlsConfig(cert_file=Path("c.crt"))


def test_unreadable_tls_files_are_config_errors(tmp_path: Path) -> None:
    from maskfl.transport import MqttTransport

    missing = tmp_path / "nope.crt"
    with pytest.raises(ConfigError) as info:
        MqttTransport(MqttConfig(tls=TlsConfig(ca_file=missing)))
    assert info.value.field == "tls.ca_file"
    assert str(missing) in str(info.value)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError) as info:
        MqttTransport(MqttConfig(tls=TlsConfig(cert_file=garbage, key_file=garbage)))
    assert info.value.field == "tls.cert_file"
