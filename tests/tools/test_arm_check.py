"""The parts of ``make arm-check`` that run without root or an arm64 root: the README block
it executes, the unit settings it starts, and the mask digests it compares across
architectures. The check itself (debootstrap, qemu, a fleet) is ``make arm-check``."""

from __future__ import annotations

import json
from pathlib import Path

from maskfl.tools import _arm_root, arm_check

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "protocol" / "vectors" / "mask_stream.json"


def test_it_runs_readmes_device_block_and_the_units_commands() -> None:
    block = _arm_root.readme_device_block(REPO / "README.md")
    assert "pip install './maskfl-0.1.0-py3-none-any.whl[agent]'" in block
    assert block.rstrip().endswith("sudo systemctl enable --now maskfl-agent")
    unit = _arm_root.unit_settings(REPO / "deploy" / "systemd" / "maskfl-agent.service")
    assert unit["User"] == ["maskfl"]
    assert unit["ExecStart"][0].startswith("/opt/maskfl/venv/bin/maskfl-agent run --config ")
    assert unit["ExecStartPre"][0].startswith("/opt/maskfl/venv/bin/maskfl-agent check ")


def test_mask_digests_check_the_vectors(tmp_path: Path) -> None:
    digests = arm_check.mask_digests(VECTORS)
    assert [v["matches_vector"] for v in digests["vectors"]] == [True, True, True]
    assert len(digests["masked_update_w32_sha256"]) == 64
    assert digests["masked_update_w32_sha256"] != digests["masked_update_w64_sha256"]
    # a wrong known answer is caught
    broken = json.loads(VECTORS.read_text())
    broken["cases"][1]["sum_mod_2_32_of_first_1000000_u32"] += 1
    (tmp_path / "v.json").write_text(json.dumps(broken))
    again = arm_check.mask_digests(tmp_path / "v.json")
    assert [v["matches_vector"] for v in again["vectors"]] == [True, False, True]
    assert again["masked_update_w32_sha256"] == digests["masked_update_w32_sha256"]
