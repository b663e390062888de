"""deploy/: the systemd units, the compose file and the Dockerfile, checked with the
tools this machine has (systemd-analyze, docker-compose); what needs a Docker daemon
or a running systemd is not run here (docs/operations.md says so)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.systemd import unit_directives

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
UNITS = DEPLOY / "systemd"


def test_agent_unit_is_a_hardened_notify_service() -> None:
    d = unit_directives(UNITS / "maskfl-agent.service")
    assert d["Type"] == ["notify"]
    assert int(d["WatchdogSec"][0]) > 0
    assert d["StateDirectory"] == ["maskfl-agent"]
    assert d["User"] == ["maskfl"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert d[key] == [value], key
    assert any("maskfl-agent run --config" in v for v in d["ExecStart"])
    assert "ProcSubset" not in d  # the resource guards read /proc/loadavg and /proc/meminfo


def test_coordinator_unit_is_hardened() -> None:
    d = unit_directives(UNITS / "maskfl-coordinator.service")
    assert d["StateDirectory"] == ["maskfl-coordinator"]
    assert d["NoNewPrivileges"] == ["yes"] and d["ProtectSystem"] == ["strict"]
    assert d["PrivateTmp"] == ["yes"]


def _runnable_copy(unit: Path, target: Path) -> Path:
    """The unit with /opt/maskfl/venv/bin replaced by this venv (verify checks executables)."""
    text = unit.read_text().replace("/opt/maskfl/venv/bin/", f"{Path(sys.executable).parent}/")
    copy = target / unit.name
    copy.write_text(text)
    return copy


def _verify(*units: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    result = subprocess.run(
        [tool, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    # Only complaints about our own files count (the host's units may have their own).
    ours = [line for line in output.splitlines() if any(u.name in line for u in units)]
    assert result.returncode == 0 and not ours, output


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if not Path(sys.executable).parent.joinpath("maskfl-coordinator").exists():
        pytest.skip("the maskfl console scripts are not installed in this environment")
    units = [
        _runnable_copy(UNITS / name, tmp_path)
        for name in (
            "maskfl-agent.service",
            "maskfl-coordinator.service",
            "maskfl-broker-reload.service",
            "maskfl-broker-reload.path",
        )
    ]
    if not Path("/usr/bin/systemctl").exists():
        pytest.skip("systemctl is not installed here (the reload unit calls it)")
    _verify(*units)


def test_mosquitto_drop_in_verifies_with_debians_unit(tmp_path: Path) -> None:
    shipped = Path("/lib/systemd/system/mosquitto.service")
    if not shipped.exists():
        pytest.skip("Debian's mosquitto.service is not installed here")
    drop_in = (UNITS / "mosquitto.service.d" / "maskfl.conf").read_text()
    combined = tmp_path / "mosquitto.service"
    # A drop-in's [Service] lines behave as if appended to the unit's [Service] section.
    combined.write_text(shipped.read_text() + "\n" + drop_in)
    _verify(combined)
    assert "ExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/maskfl/mosquitto.conf" in drop_in


def test_compose_file_is_valid_and_mounts_the_provisioned_files() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    assert "image: eclipse-mosquitto:2" in text
    assert re.search(
        r"source: \$\{MASKFL_FLEET_DIR:-[^}]+\}/broker\n\s+target: /mosquitto/config", text
    )
    assert re.search(
        r"source: \$\{MASKFL_FLEET_DIR:-[^}]+\}/coordinator\n\s+target: /etc/maskfl/coordinator",
        text,
    )
    assert "/var/lib/maskfl-coordinator" in text
    for tool in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(tool[0]) is None:
            continue
        probe = subprocess.run(
            [*tool, "version"], capture_output=True, text=True, timeout=60, check=False
        )
        if probe.returncode != 0:  # docker without the compose plugin
            continue
        result = subprocess.run(
            [*tool, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return
    pytest.skip("neither `docker compose` nor docker-compose is installed here")


def test_dockerfile_is_slim_non_root_with_a_healthcheck() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("0", "root"))
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*healthz", text, re.M)
    assert 'ENTRYPOINT ["maskfl-coordinator"]' in text


def test_docker_build_context_leaves_out_the_venv_and_keys() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything is excluded unless named
    copied = {
        source.rstrip("/")
        for line in re.findall(r"^COPY (?!--from)(.+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
        for source in line.split()[:-1]
    }
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied and copied <= allowed
    assert "**/*.key" in ignore
