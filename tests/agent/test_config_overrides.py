"""Every key of configs/agent.toml, set alone, changes that key and nothing else.

For each key (set or commented out in the example) this loads a file of the
required keys only plus that one key, from TOML and from the environment (read
as a TOML value), and compares the whole effective config with the minimal one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from maskfl.agent.cli import main
from maskfl.agent.config import AgentConfig, load_config
from maskfl.protocol.errors import ConfigError
from tests.support.config_walk import (
    BROKER_TLS_COMPANIONS,
    REPO,
    Key,
    Walk,
    env_text,
    merge,
    nest,
    write,
)

EXAMPLE = REPO / "configs" / "agent.toml"

SPECIAL: dict[str, Any] = {
    "guards.time_windows": ["22:00-06:00"],
    "logging.level": "DEBUG",
    "logging.format": "json",
}


def _load(path: Path, env: dict[str, str]) -> AgentConfig:
    return load_config(path, env=env)


WALK = Walk(
    AgentConfig,
    _load,
    EXAMPLE,
    special=SPECIAL,
    companions=BROKER_TLS_COMPANIONS,
    leaves=frozenset({"options"}),
)


def _same(got: Any, value: Any, config_dir: Path) -> bool:
    if isinstance(got, Path):  # relative paths follow the config file
        return os.path.normpath(got) == os.path.normpath(config_dir / value)
    if isinstance(got, tuple) and isinstance(value, list):
        return len(got) == len(value)  # parsed items (time windows, command words)
    return bool(got == value)


@pytest.mark.parametrize("key", WALK.keys, ids=lambda k: k.dotted)
def test_a_key_set_alone_changes_that_key_only(tmp_path: Path, key: Key) -> None:
    value = WALK.new_value(key)
    base = WALK.base_tree(key)
    minimal = WALK.dump(write(tmp_path / "minimal.toml", base))
    alone = WALK.dump(write(tmp_path / "alone.toml", merge(base, nest(key.path, value))))
    assert WALK.changed(minimal, alone) == {key.dotted}, f"{key.dotted} = {value!r} in TOML"
    assert _same(alone[key.path], value, tmp_path.resolve()), (alone[key.path], value)
    env = WALK.dump(tmp_path / "minimal.toml", {key.env: env_text(value)})
    assert env == alone, f"{key.env}={env_text(value)} differs from the TOML: " + str(
        WALK.changed(env, alone)
    )


@pytest.mark.parametrize("key", [k for k in WALK.keys if not k.commented], ids=lambda k: k.dotted)
def test_the_example_documents_the_defaults(tmp_path: Path, key: Key) -> None:
    """A key the example sets without a "default ..."/"required" note has that value
    when left out: the file is the documented effective config."""
    if key.noted:
        pytest.skip("the comment documents the default")
    minimal = WALK.dump(write(tmp_path / "minimal.toml", WALK.minimal))
    got = minimal[key.path]
    want = key.value
    if isinstance(got, Path):
        want = Path(want) if Path(want).is_absolute() else tmp_path.resolve() / want
    if isinstance(got, tuple):
        want = tuple(want)
    assert got == want, f"{key.dotted}: example {key.value!r}"


def test_environment_values_parse_like_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", WALK.minimal)
    env = {
        "MASKFL__BROKER__TLS": "true",
        "MASKFL__BROKER__PORT": "8883",
        "MASKFL__BROKER__HOST": "10.0.0.2",  # no TOML value: the text as written
        "MASKFL__GUARDS__TIME_WINDOWS": '["22:00-06:00", "12:00-13:00"]',
        "MASKFL__GUARDS__MAX_LOAD_PER_CPU": "0.5",
        "MASKFL__DATA__OPTIONS": "{ shard = 2, shards = 5 }",
        "MASKFL__DATA__OPTIONS__ALPHA": "0.3",
        "MASKFL__DEVICE__ID": "2024",  # a text key keeps digits as text
        "MASKFL__PET__UPDATE__TARGET": "3",  # the coordinator's: not the agent's business
    }
    config = load_config(path, env=env)
    assert config.broker.tls is True and config.broker.port == 8883
    assert config.broker.host == "10.0.0.2"
    assert [str(w) for w in config.guards.time_windows] == ["22:00-06:00", "12:00-13:00"]
    assert config.guards.max_load_per_cpu == 0.5
    assert config.data.options == {"shard": 2, "shards": 5, "alpha": 0.3}
    assert config.device.id == "2024"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        (
            {"MASKFL__BROKER__PROT": "1"},
            "broker.prot: unknown key (set by environment variable MASKFL__BROKER__PROT); "
            "did you mean port (MASKFL__BROKER__PORT)?",
        ),
        (
            {"MASKFL__BROKER__PORT": "http"},
            "broker.port: Input should be a valid integer, unable to parse string as an "
            "integer (got 'http', set by environment variable MASKFL__BROKER__PORT)",
        ),
        (
            {"MASKFL__BROKER__CA_FILE": "ca.pem"},
            "broker: ca_file/cert_file/key_file need tls = true; set tls = true or remove "
            "them (set by environment variable MASKFL__BROKER__CA_FILE)",
        ),
    ],
)
def test_a_bad_environment_value_names_its_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], env: dict[str, str], words: str
) -> None:
    path = write(tmp_path / "agent.toml", WALK.minimal)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert words in str(info.value)
    assert "Value error" not in str(info.value)


def test_a_misspelt_key_is_named_once_with_the_closest_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "agent.toml", merge(WALK.minimal, {"broker": {"prot": 1883}}))
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.count("broker.prot") == 1, err
    assert err.startswith("maskfl-agent: error: broker.prot: unknown key; did you mean port?")
