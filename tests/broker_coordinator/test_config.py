"""coordinator.toml: loading, environment overrides, and errors that name the field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskfl.broker_coordinator.cli import main
from maskfl.broker_coordinator.config import load_config
from maskfl.protocol.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
[fleet]
id = "demo"
ca_public_key_file = "keys/ca.pub"
[identity]
key_file = "keys/coordinator.key"
certificate_file = "keys/coordinator.cert"
[model]
id = "mlp"
length = 10
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


def test_example_config_loads_and_resolves_paths() -> None:
    config = load_config(REPO / "configs" / "coordinator.toml", env={})
    assert config.fleet.ca_public_key_file == REPO / "configs" / "ca.pub"
    assert config.broker.tls and config.broker.receive_maximum == 65535
    assert config.optimizer.kind == "fedavg"


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL), env={})
    assert config.identity.key_file == tmp_path / "keys" / "coordinator.key"
    assert config.storage.dir == tmp_path / "state"


def test_environment_overrides_nested_keys(tmp_path: Path) -> None:
    env = {
        "MASKFL__PET__SUM__COUNT_MIN": "4",
        "MASKFL__PET__SUM__TARGET": "5",
        "MASKFL__BROKER__PORT": "8883",
        "MASKFL__OPTIMIZER__KIND": "fedadam",
    }
    config = load_config(_write(tmp_path, MINIMAL), env=env)
    assert config.pet.sum.count_min == 4 and config.pet.sum.target == 5
    assert config.broker.port == 8883
    assert config.optimizer.kind == "fedadam"


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        ("[broker]\nprot = 1\n", "broker.prot", "unknown key"),
        ("[broker]\nport = 70000\n", "broker.port", "65535"),
        ("[pet.sum]\ntarget = 2\ncount_min = 5\ncount_max = 2\n", "pet.sum", "count_min"),
        ("[pet.update]\ntarget = 2\ncount_max = 5000\n", "", "masking.n_max"),
        ("[broker]\nreceive_maximum = 100\n", "", "receive_maximum"),
        ('[optimizer]\nkind = "sgd"\n', "optimizer.kind", "fedavg"),
        ('[broker]\ncert_file = "c.pem"\n', "broker", "key_file"),
        ("[masking]\ngroups = 4\n", "", "raise pet.sum.target to at least 8"),
        ("[masking]\ngroups = 0\n", "masking.groups", ""),
        ("[masking]\ngroups = 256\n", "masking.groups", ""),
    ],
)
def test_wrong_fields_are_named_with_the_fix(
    tmp_path: Path, extra: str, field: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, MINIMAL + extra), env={})
    assert field in str(err.value) and words in str(err.value)


def test_mask_groups_auto_follows_the_sum_target(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, MINIMAL), env={}).mask_groups == 1  # target 3
    six = load_config(_write(tmp_path, MINIMAL + "[pet.sum]\ntarget = 6\n"), env={})
    assert six.mask_groups == 2
    fixed = load_config(_write(tmp_path, MINIMAL + "[masking]\ngroups = 3\n"), env={})
    assert fixed.mask_groups == 3
    env = {"MASKFL__MASKING__GROUPS": "2"}
    assert load_config(_write(tmp_path, MINIMAL), env=env).mask_groups == 2


def test_missing_section_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model: required"):
        load_config(_write(tmp_path, MINIMAL.split("[model]", maxsplit=1)[0]), env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[fleet\n"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_cli_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, MINIMAL + "[broker]\nprot = 1\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broker.prot" in err and "Traceback" not in err
    # Files named by the config are checked at start, naming the key.
    assert main(["run", "--config", str(_write(tmp_path, MINIMAL))]) == 2
    assert "fleet.ca_public_key_file" in capsys.readouterr().err
    assert main(["status", "--config", str(path.with_name("x.toml"))]) == 2


def test_a_small_chunk_size_alone_fits_the_broker_window(tmp_path: Path) -> None:
    """MASKFL__PET__CHUNK_SIZE=8192 with 1 GiB of message memory asked for
    broker.receive_maximum >= 65,680 (beyond MQTT's 65,535): the in-memory reassembly
    bound is capped at the frames the window leaves instead, and the spool takes what
    remains of it."""
    env = {"MASKFL__PET__CHUNK_SIZE": "8192", "MASKFL__PET__MESSAGE_MEMORY_MAX_BYTES": str(1 << 30)}
    config = load_config(_write(tmp_path, MINIMAL), env=env)
    assert config.pet.chunk_size == 8192
    frames = config.broker.receive_maximum - config.storage.group_commit_max - 16
    assert config.reassembly_frames == frames == 65391
    assert config.reassembly_bytes == frames * 8192 < config.message_bytes
    assert config.reassembly_spool_bytes() == 0
    # The defaults leave the memory bound as written (less the transport's queue),
    # and the spool the rest of the window.
    default = load_config(_write(tmp_path, MINIMAL), env={})
    assert default.pet.message_memory_max_bytes == 256 << 20  # the documented default
    assert default.transport_queue_size == 102  # an eighth of it: 102 x (256 + 64) KiB
    queue = 102 * (256 + 64) * 1024
    assert default.reassembly_bytes == default.message_bytes == (256 << 20) - queue
    assert default.words_memory_bytes == default.message_bytes // 2
    in_memory = -(-default.reassembly_bytes // default.pet.chunk_size)
    assert default.reassembly_spool_bytes() == (frames - in_memory) * default.pet.chunk_size


def test_the_memory_keys_that_are_gone_name_their_replacement(tmp_path: Path) -> None:
    """The three memory bounds became one: the old keys stop the coordinator with one
    line that names the new key."""
    with pytest.raises(
        ConfigError, match=r"pet: reassembly_max_bytes is now message_memory_max_bytes.*rename"
    ):
        load_config(_write(tmp_path, MINIMAL + "[pet]\nreassembly_max_bytes = 1048576\n"))
    env = {"MASKFL__STORAGE__UPDATE_MEMORY_MAX_BYTES": "1"}
    with pytest.raises(ConfigError, match=r"storage: update_memory_max_bytes is gone.*remove"):
        load_config(_write(tmp_path, MINIMAL), env=env)
    small = {"MASKFL__PET__MESSAGE_MEMORY_MAX_BYTES": str(1 << 20)}
    with pytest.raises(
        ConfigError, match=r"fewer than 8 deliveries .* raise it to at least 2621440"
    ):
        load_config(_write(tmp_path, MINIMAL), env=small)


def test_a_spool_the_window_cannot_hold_is_refused(tmp_path: Path) -> None:
    env = {"MASKFL__PET__REASSEMBLY_SPOOL_MAX_BYTES": str(1 << 40)}
    with pytest.raises(ConfigError, match=r"pet\.reassembly_spool_max_bytes .* lower it to"):
        load_config(_write(tmp_path, MINIMAL), env=env)


def test_a_privacy_floor_below_two_stops_the_coordinator_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, MINIMAL + "[privacy]\nmin_updates = 1\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "privacy.min_updates: must be at least 2: an aggregate of fewer updates is one " in err
