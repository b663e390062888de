"""maskfl-conformance: our agent passes, deliberately wrong participants fail naming the rule.

The integration tests run the real bench: ``maskfl-provision``, mosquitto with the
provisioned TLS and ACL, the coordinator process, and the participant command.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from maskfl.protocol.sortition import Task, group_of, next_round_seed, select_task
from maskfl.tools import _conformance_rules as rules
from maskfl.tools import conformance
from maskfl.tools._demo_fleet import console_script

ROOT = Path(__file__).resolve().parents[2]


def _keys(n: int) -> list[bytes]:
    return [bytes(SigningKey(bytes([i + 1]) * 32).verify_key) for i in range(n)]


@pytest.mark.parametrize("role", conformance.ROLES)
def test_the_seed_gives_the_roles_and_defeats_the_usual_ticket_mistakes(role: str) -> None:
    me, *helpers = _keys(1 + conformance.HELPERS)
    digest = bytes(32)
    initial = conformance.choose_initial_seed(role, me, helpers, digest)
    seed = next_round_seed(initial, digest, 1)
    p_sum, p_update = conformance.P_SUM, conformance.P_UPDATE
    wanted = Task.SUM if role == "summer" else Task.UPDATE
    assert select_task(seed, me, p_sum, p_update) is wanted
    helper_tasks = [select_task(seed, pk, p_sum, p_update) for pk in helpers]
    assert helper_tasks.count(Task.SUM) == (0 if role == "summer" else 1)
    assert helper_tasks.count(Task.NONE) == 0  # p_update = 1: every other helper updates
    for variant in rules.WRONG_TICKETS.values():
        assert rules.task_with(variant, seed, me) is not wanted


def test_the_groups_seed_puts_one_helper_summer_in_each_group() -> None:
    me, *helpers = _keys(1 + conformance.HELPERS)
    digest = bytes(32)
    initial = conformance.choose_initial_seed(conformance.GROUPS_ROLE, me, helpers, digest)
    seed = next_round_seed(initial, digest, 1)
    p_sum, p_update = conformance.P_SUM, conformance.P_UPDATE
    assert select_task(seed, me, p_sum, p_update) is Task.UPDATE
    summers = [pk for pk in helpers if select_task(seed, pk, p_sum, p_update) is Task.SUM]
    assert sorted(group_of(seed, pk, 2) for pk in summers) == [0, 1]


def test_roles_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert conformance.main(["--participant", "true", "--roles", "sumer"]) == 2
    assert "--roles: unknown ['sumer']" in capsys.readouterr().err


def _run(tmp_path: Path, command: str, roles: str) -> tuple[int, str]:
    done = subprocess.run(
        [
            *console_script("maskfl-conformance", "maskfl.tools.conformance"),
            "--participant",
            command,
            "--roles",
            roles,
            "--workdir",
            str(tmp_path),
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        cwd=ROOT,
    )
    return done.returncode, done.stdout + done.stderr


def _faulty(fault: str | None) -> str:
    args = [sys.executable, "-m", "tests.tools.conformance_participant"]
    if fault:
        args += ["--fault", fault]
    return f"cd {shlex.quote(str(ROOT))} && {shlex.join(args)}"


@pytest.mark.slow
@pytest.mark.broker
def test_our_agent_passes(tmp_path: Path) -> None:
    agent = shlex.join(console_script("maskfl-agent", "maskfl.agent.cli"))
    rc, out = _run(tmp_path, f'{agent} run --config "$MASKFL_BUNDLE/agent.toml"', "summer,updater")
    assert rc == 0, out
    assert "FAIL" not in out
    for rule in ("§4 sortition", "§6.1 §7.5 SUM2 aggregate mask", "§7.3 weight word"):
        assert rule in out, out
    assert "checks passed" in out


@pytest.mark.slow
@pytest.mark.broker
def test_our_agent_seals_a_fresh_seed_per_mask_group(tmp_path: Path) -> None:
    """The groups scenario: g = 2, one helper summer per group; the bench opens the
    participant's seed with each group's summer key and unmasks with both sub-masks."""
    agent = shlex.join(console_script("maskfl-agent", "maskfl.agent.cli"))
    rc, out = _run(tmp_path, f'{agent} run --config "$MASKFL_BUNDLE/agent.toml"', "groups")
    assert rc == 0, out
    assert "FAIL" not in out
    for rule in ("§4.4 a fresh seed per mask group", "§6.3 sealed seed opens", "§7.3 weight word"):
        assert rule in out, out


@pytest.mark.slow
@pytest.mark.broker
def test_one_seed_for_both_groups_fails_naming_the_rule(tmp_path: Path) -> None:
    """The sum of two equal sub-masks still unmasks, so the round completes; the check
    that each group's summers got a different seed is what fails."""
    rc, out = _run(tmp_path, _faulty("one-seed"), "groups")
    assert rc == 1, out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert any("§4.4 a fresh seed per mask group" in line for line in fails), out
    assert len(fails) == 1, out


@pytest.mark.slow
@pytest.mark.broker
def test_a_wrong_weight_word_fails_naming_the_rule(tmp_path: Path) -> None:
    rc, out = _run(tmp_path, _faulty("weight-word"), "updater")
    assert rc == 1, out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert any("§7.3 weight word" in line and "+ S_w" in line for line in fails), out
    assert not any("sortition" in line for line in fails), out


@pytest.mark.slow
@pytest.mark.broker
def test_a_wrong_ticket_fails_naming_the_rule(tmp_path: Path) -> None:
    rc, out = _run(tmp_path, _faulty("ticket"), "summer")
    assert rc == 1, out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert any("§4 sortition" in line and "big-endian ticket" in line for line in fails), out
