"""agent.toml parsing: keys, env overrides, relative paths, errors that name the field."""

from __future__ import annotations

from datetime import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maskfl.agent.config import TimeWindow, load_config
from maskfl.protocol.errors import ConfigError

MINIMAL = """
[device]
id = "dev-1"
fleet = "demo"
key_file = "device.key"
certificate_file = "certs/device.cert"
ca_public_key_file = "/etc/maskfl/ca.pub"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bundle" / "agent.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_minimal_config_resolves_relative_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    bundle = (tmp_path / "bundle").resolve()
    assert config.device.key_file == bundle / "device.key"
    assert config.device.certificate_file == bundle / "certs/device.cert"
    assert config.device.ca_public_key_file == Path("/etc/maskfl/ca.pub")
    assert config.broker.port == 1883
    assert config.guards.time_windows == ()


def test_example_config_in_repo_is_valid() -> None:
    example = Path(__file__).parents[2] / "configs" / "agent.toml"
    config = load_config(example)
    assert config.device.fleet == "demo"
    assert config.broker.tls


def test_environment_overrides_nested_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASKFL__BROKER__PORT", "18883")
    monkeypatch.setenv("MASKFL__GUARDS__TIME_WINDOWS", '["22:00-06:00"]')
    monkeypatch.setenv("MASKFL__DEVICE__ID", "dev-2")
    config = load_config(write(tmp_path, MINIMAL + '\n[broker]\nhost = "h"\nport = 1\n'))
    assert config.broker.port == 18883
    assert config.broker.host == "h"  # the rest of the section stays
    assert config.device.id == "dev-2"
    assert config.guards.time_windows == (TimeWindow(start=time(22), end=time(6)),)


def test_state_directory_from_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/maskfl-agent:/var/lib/other")
    assert load_config(write(tmp_path, MINIMAL)).state.dir == Path("/var/lib/maskfl-agent")


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ("\n[broker]\nprot = 1\n", "broker.prot", "unknown key; did you mean port?"),
        ("\n[broker]\nport = 0\n", "broker.port", "greater than or equal"),
        ('\n[guards]\ntime_windows = ["25:00-01:00"]\n', "guards.time_windows", "out of range"),
        ('\n[broker]\ntls = false\nca_file = "x"\n', "broker", "need tls"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, extra: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + extra))
    assert field in str(info.value)
    assert words in str(info.value)


def test_missing_section_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"device: required"):
        load_config(write(tmp_path, "[broker]\nport = 1\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[device\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@given(st.times(), st.times(), st.times())
def test_time_window_contains(start: time, end: time, now: time) -> None:
    start, end, now = (t.replace(second=0, microsecond=0) for t in (start, end, now))
    window = TimeWindow.parse(f"{start:%H:%M}-{end:%H:%M}")
    expected = (
        True
        if start == end
        else (start <= now < end if start < end else (now >= start or now < end))
    )
    assert window.contains(now) is expected
