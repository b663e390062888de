"""configs/agent.toml documents every key of the agent's config model, each with a comment."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from maskfl.agent.config import AgentConfig, load_config

EXAMPLE = Path(__file__).parents[2] / "configs" / "agent.toml"


def documented() -> dict[str, set[str]]:
    """Section -> keys that appear in the example, set or commented out."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if header := re.match(r"^\[(\w+)\]", line):
            section = header.group(1)
            keys[section] = set()
        elif key := re.match(r"^#?\s*(\w+)\s*=", line):
            keys[section].add(key.group(1))
    return keys


def test_every_key_is_in_the_example() -> None:
    keys = documented()
    for name, info in AgentConfig.model_fields.items():
        section = info.annotation
        assert isinstance(section, type) and issubclass(section, BaseModel), name
        assert name in keys, f"[{name}] is missing from {EXAMPLE}"
        missing = set(section.model_fields) - keys[name]
        assert not missing, f"[{name}] keys missing from {EXAMPLE}: {sorted(missing)}"
        unknown = keys[name] - set(section.model_fields)
        assert not unknown, f"[{name}] keys in {EXAMPLE} that the model lacks: {sorted(unknown)}"


def uncommented(line: str) -> bool:
    """A key line (set, or commented out) with no comment of its own."""
    if re.match(r"^\w+\s*=", line):
        return "#" not in line
    if re.match(r"^#\s*\w+\s*=", line):
        return "#" not in line[1:]
    return False


def test_every_key_carries_a_comment_and_the_file_loads() -> None:
    load_config(EXAMPLE)
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    assert [line for line in lines if uncommented(line)] == []
