"""Every key of configs/coordinator.toml, set alone, changes that key and nothing else.

The independent check found that ``MASKFL__PET__UPDATE__TARGET=10`` alone (its
documented default) turned the update window from 300 s into 60 s and count_min
from 3 into 1, so a round published one device's update; ``[pet.sum] time_max_s
= 15`` alone exited 2. For each key (set or commented out in the example) this
loads a file of the required keys only plus that one key, from TOML and from the
environment, and compares the whole effective config with the minimal one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from maskfl.broker_coordinator.config import CoordinatorConfig, load_config
from maskfl.protocol.errors import ConfigError
from tests.support.config_walk import (
    BROKER_TLS_COMPANIONS,
    REPO,
    Key,
    Walk,
    env_text,
    merge,
    nest,
    other_value,
    write,
)

EXAMPLE = REPO / "configs" / "coordinator.toml"

# Keys whose rules a derived value would break (a literal, a bound, a cross-field rule).
SPECIAL: dict[str, Any] = {
    "masking.word_bits": 64,  # exited 2 from the environment ("got '64'")
    "masking.groups": 2,  # "auto" or an integer up to pet.sum.target
    "pet.chunk_size": 8192,  # asked for broker.receive_maximum >= 65680
    "pet.initial_seed": "ab" * 32,
    "pet.update.count_max": 999,  # may not exceed masking.n_max (1000)
    "privacy.min_updates": 2,  # 4 would exceed pet.update.count_min (3)
    "privacy.dp": "distributed",
    "broker.receive_maximum": 60000,
    "optimizer.kind": "fedadam",
    "aggregation.backend": "numpy",
    "storage.update_words": "file",
    "log.level": "debug",
    "log.format": "text",
}


def _load(path: Path, env: dict[str, str]) -> CoordinatorConfig:
    return load_config(path, env=env)


WALK = Walk(CoordinatorConfig, _load, EXAMPLE, special=SPECIAL, companions=BROKER_TLS_COMPANIONS)


def _same(got: Any, value: Any, config_dir: Path) -> bool:
    if isinstance(got, Path):  # relative paths follow the config file
        return os.path.normpath(got) == os.path.normpath(config_dir / value)
    return bool(got == value)


@pytest.mark.parametrize("key", WALK.keys, ids=lambda k: k.dotted)
def test_a_key_set_alone_changes_that_key_only(tmp_path: Path, key: Key) -> None:
    value = WALK.new_value(key)
    base = WALK.base_tree(key)
    minimal = WALK.dump(write(tmp_path / "minimal.toml", base))
    alone = WALK.dump(write(tmp_path / "alone.toml", merge(base, nest(key.path, value))))
    assert WALK.changed(minimal, alone) == {key.dotted}, f"{key.dotted} = {value!r} in TOML"
    assert _same(alone[key.path], value, tmp_path), (alone[key.path], value)
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
    want = key.value
    if isinstance(minimal[key.path], Path):
        want = tmp_path / want
    assert minimal[key.path] == want, f"{key.dotted}: example {key.value!r}"


@pytest.mark.parametrize("key", WALK.keys, ids=lambda k: k.dotted)
def test_an_environment_override_over_the_example_changes_that_key_only(key: Key) -> None:
    if key.dotted in ("broker.tls",):
        pytest.skip("the example's TLS files need tls = true")
    value = WALK.new_value(key)
    if value == key.value and not key.commented:
        value = other_value(Key(key.path, key.value, False, False), key.value, SPECIAL)
    example = WALK.dump(EXAMPLE)
    changed = WALK.dump(EXAMPLE, {key.env: env_text(value)})
    assert WALK.changed(example, changed) == {key.dotted}


@pytest.mark.parametrize(
    ("env", "field", "words"),
    [
        ({"MASKFL__PRIVACY__MIN_UPDATES": "1"}, "privacy.min_updates", "at least 2"),
        ({"MASKFL__PET__UPDATE__COUNT_MIN": "2"}, "pet.update.count_min", "privacy.min_updates"),
        ({"MASKFL__BROKER__PROT": "1"}, "broker.prot", "did you mean port"),
    ],
)
def test_config_mistakes_are_one_line_with_the_variable(
    tmp_path: Path, env: dict[str, str], field: str, words: str
) -> None:
    path = write(tmp_path / "c.toml", WALK.minimal)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    text = str(info.value)
    assert "\n" not in text and text.count(field) == 1 and words in text, text
    assert "Value error" not in text


def test_a_privacy_floor_below_two_is_refused_from_the_file(tmp_path: Path) -> None:
    tree = merge(WALK.minimal, {"privacy": {"min_updates": 1}, "pet": {"update": {"count_min": 1}}})
    with pytest.raises(ConfigError, match=r"privacy\.min_updates: must be at least 2: "):
        load_config(write(tmp_path / "c.toml", tree), env={})


def test_the_overrides_the_independent_check_reported(tmp_path: Path) -> None:
    """Each exactly as reported, on a file without [pet] tables (as provisioning writes)."""
    path = write(tmp_path / "c.toml", WALK.minimal)
    defaults = load_config(path, env={})
    assert (defaults.pet.update.time_max_s, defaults.pet.update.count_min) == (300.0, 3)
    config = load_config(path, env={"MASKFL__PET__UPDATE__TARGET": "10"})
    assert config.pet == defaults.pet  # it was: time_max_s 60, count_min 1
    config = load_config(path, env={"MASKFL__PET__SUM__TIME_MAX_S": "15"})
    assert config.pet.sum == defaults.pet.sum.model_copy(update={"time_max_s": 15.0})
    appended = path.read_text() + "\n[pet.sum]\ntime_max_s = 15\n"  # it was: exit 2
    config = load_config(_text(tmp_path / "e.toml", appended), env={})
    assert config.pet.sum == defaults.pet.sum.model_copy(update={"time_max_s": 15.0})
    for bits in (32, 64):  # it was: "Input should be 'auto', 32 or 64 (got '64')"
        env = {"MASKFL__MASKING__WORD_BITS": str(bits)}
        assert load_config(path, env=env).masking.word_bits == bits


def _text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
