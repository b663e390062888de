"""protocol/settings.py: environment values read as TOML values, merged key by key, and
validation errors as one line that names each field once."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from maskfl.protocol.settings import (
    SECTIONS,
    describe_errors,
    env_overrides,
    env_variable_for,
    merge,
    parse_env_value,
)


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    port: int = 1883
    host: str = "localhost"
    bits: Literal["auto", 32, 64] = "auto"
    path: Path | None = None
    table: dict[str, object] = {}


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    broker: _Inner = _Inner()
    windows: tuple[str, ...] = ()


@pytest.mark.parametrize(
    ("raw", "text", "value"),
    [
        ("64", False, 64),
        ("1e-5", False, 1e-5),
        ("true", False, True),
        ('["22:00-06:00"]', False, ["22:00-06:00"]),
        ("{ shard = 0 }", False, {"shard": 0}),
        ('{"shard": 0}', False, {"shard": 0}),  # JSON objects too
        ("10.0.0.2", False, "10.0.0.2"),  # no TOML value: the text
        ("auto", False, "auto"),
        ("2024", True, "2024"),  # a text key keeps its digits
        ('"quoted"', True, "quoted"),
        ("2024-01-01", True, "2024-01-01"),  # a TOML date, but the key is text
    ],
)
def test_values_parse_like_toml(raw: str, text: bool, value: object) -> None:
    assert parse_env_value(raw, text=text) == value


def test_overrides_nest_and_skip_other_services_sections() -> None:
    env = {
        "MASKFL__BROKER__PORT": "8883",
        "maskfl__broker__bits": "64",
        "MASKFL__BROKER__PATH": "123",
        "MASKFL__BROKER__TABLE__ALPHA": "0.5",
        "MASKFL__PET__SUM__TARGET": "3",  # the coordinator's: not this schema's
        "MASKFL_AGENT_CONFIG": "/etc/x",  # one underscore: not an override
        "OTHER": "1",
    }
    tree, origins = env_overrides(env, _Outer)
    assert tree == {"broker": {"port": 8883, "bits": 64, "path": "123", "table": {"alpha": 0.5}}}
    assert origins[("broker", "bits")] == "maskfl__broker__bits"
    merged = merge({"broker": {"host": "h", "table": {"beta": 1}}}, tree)
    config = _Outer(**merged)
    assert (config.broker.host, config.broker.port, config.broker.bits) == ("h", 8883, 64)
    assert config.broker.table == {"beta": 1, "alpha": 0.5}
    assert env_variable_for("broker.bits", env) == "maskfl__broker__bits"
    assert env_variable_for("broker.host", env) is None


def _errors(data: dict[str, object]) -> list[dict[str, object]]:
    with pytest.raises(ValidationError) as info:
        _Outer(**data)  # type: ignore[arg-type]
    return [dict(e) for e in info.value.errors()]


def test_a_misspelt_key_gets_the_closest_one() -> None:
    tree, origins = env_overrides({"MASKFL__BROKER__PROT": "1"}, _Outer)
    text, field = describe_errors(_errors(tree), _Outer, origins)
    assert field == "broker.prot"
    assert text == (
        "broker.prot: unknown key (set by environment variable MASKFL__BROKER__PROT); "
        "did you mean port (MASKFL__BROKER__PORT)?"
    )
    text, _ = describe_errors(_errors({"brokr": {}}), _Outer)
    assert text == "brokr: unknown key; did you mean broker?"
    text, _ = describe_errors(_errors({"broker": {"zzz": 1}}), _Outer)
    assert text == "broker.zzz: unknown key; remove it or fix its spelling"


def test_a_bad_value_names_the_value_and_its_variable() -> None:
    tree, origins = env_overrides({"MASKFL__BROKER__BITS": "48"}, _Outer)
    text, _ = describe_errors(_errors(tree), _Outer, origins)
    assert text.startswith("broker.bits: Input should be 'auto', 32 or 64")
    assert text.endswith("(got 48, set by environment variable MASKFL__BROKER__BITS)")
    assert "Value error" not in text and text.count("broker.bits") == 1


def test_the_section_lists_match_the_services() -> None:
    from maskfl.agent.config import AgentConfig
    from maskfl.broker_coordinator.config import CoordinatorConfig

    assert SECTIONS["agent"] == set(AgentConfig.model_fields)
    assert SECTIONS["coordinator"] == set(CoordinatorConfig.model_fields)


def test_a_section_of_neither_service_is_a_misspelling() -> None:
    from maskfl.agent.config import AgentConfig

    tree, origins = env_overrides({"MASKFL__BROKR__PORT": "1", "MASKFL__PET__X": "1"}, AgentConfig)
    assert tree == {"brokr": {"port": 1}}  # pet: the coordinator's, left to it
    with pytest.raises(ValidationError) as info:
        AgentConfig(**merge({"device": {}}, tree))
    errors = [dict(e) for e in info.value.errors() if e["type"] == "extra_forbidden"]
    text, _ = describe_errors(errors, AgentConfig, origins)
    assert text == (
        "brokr: unknown key (set by environment variable MASKFL__BROKR__PORT); "
        "did you mean broker (MASKFL__BROKER__PORT)?"
    )
