"""The documented device path and try-out, as written.

* README's device block (after ``<!-- device-install -->``) agrees with the systemd unit
  it installs and with operations.md section 3. Running it needs root, useradd and
  systemd on a device: ``make arm-check`` runs it as written on an arm64 root.
* operations.md's try-out runs here as written: its install line (after
  ``<!-- tryout-install -->``) in a fresh venv, then its block (after ``<!-- tryout -->``)
  with that venv on the PATH, as an ordinary user; only the block's first line, which
  picks the folder and the two ports, is replaced by one with a scratch folder and free
  ports. It passes when the coordinator completes a round with the five agents.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from maskfl.testing.broker import free_port
from tests.support.systemd import unit_directives

REPO = Path(__file__).resolve().parents[2]


def block_after(doc: Path, marker: str) -> str:
    """The fenced sh block that follows ``marker`` in ``doc``."""
    text = doc.read_text(encoding="utf-8")
    at = text.index(marker)
    found = re.search(r"```sh\n(.*?)```", text[at:], re.S)
    assert found is not None, f"no sh block after {marker} in {doc}"
    return found.group(1)


def test_readme_device_steps_fit_the_unit_and_operations_guide() -> None:
    readme = block_after(REPO / "README.md", "<!-- device-install -->")
    steps = [line.split("  #")[0].strip() for line in readme.splitlines() if line.strip()]
    service = unit_directives(REPO / "deploy" / "systemd" / "maskfl-agent.service")
    user = service["User"][0]
    run = shlex_split(service["ExecStart"][0])
    venv = str(Path(run[0]).parents[1])
    config = run[run.index("--config") + 1]
    assert service["ExecStartPre"][0] == f"{run[0]} check --config {config}"
    # the user the unit runs as, with the unit's state directory as its home
    assert any(
        s.startswith("sudo useradd --system")
        and s.endswith(f" {user}")
        and f"--home-dir /var/lib/{service['StateDirectory'][0]}" in s
        for s in steps
    )
    # the venv where the unit looks, with the agent extra from the wheel
    assert f"sudo python3 -m venv {venv}" in steps
    assert any(
        s.startswith(f"sudo {venv}/bin/pip install ") and s.endswith(".whl[agent]'") for s in steps
    )
    # the bundle in the folder the unit's --config names, owned by the unit's user
    folder = str(Path(config).parent)
    assert f"sudo install -d -o {user} -g {user} -m 0700 {folder}" in steps
    assert any(s.startswith(f"sudo tar -C {folder} --strip-components=1") for s in steps)
    assert f"sudo chown -R {user}:{user} {folder}" in steps
    assert f"sudo -u {user} {run[0]} check --config {config}" in steps
    # the unit installed and started, from the file copied next to the others
    assert "sudo install -m 0644 maskfl-agent.service /etc/systemd/system/" in steps
    assert steps[-1] == "sudo systemctl daemon-reload && sudo systemctl enable --now maskfl-agent"
    # operations.md section 3 shows the same commands
    guide = (REPO / "docs" / "operations.md").read_text()
    section = guide[guide.index("## 3. Install the agent") : guide.index("## 4. Rotate")]
    assert readme in section


def shlex_split(command: str) -> list[str]:
    import shlex

    return shlex.split(command)


# --- the try-out -----------------------------------------------------------------------------


def _ordinary_user() -> tuple[int, int] | None:
    """(uid, gid) to run the try-out as: ourselves, or nobody when the tests run as root
    (mosquitto started as root switches to user mosquitto, which the try-out avoids)."""
    if os.geteuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")
    return nobody.pw_uid, nobody.pw_gid


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A folder the try-out's user owns (pytest's tmp_path is root's alone when root)."""
    folder = Path(tempfile.mkdtemp(prefix="maskfl-tryout-"))
    user = _ordinary_user()
    if user is not None:
        os.chown(folder, *user)
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _run_as(user: tuple[int, int] | None) -> dict[str, object]:
    if user is None:
        return {}
    return {"user": user[0], "group": user[1], "extra_groups": []}


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(420)
def test_operations_tryout_runs_as_written(scratch: Path) -> None:  # noqa: PLR0915 runs the documented steps in order
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto is not installed (make test installs it)")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    guide = REPO / "docs" / "operations.md"
    user = _ordinary_user()
    home = scratch / "home"
    home.mkdir()
    env = {
        "HOME": str(home),
        "PATH": f"{home / 'maskfl' / 'bin'}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG": "C.UTF-8",
    }
    env |= {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    # pip's download cache outlives the test, so later runs do not fetch every wheel again
    cache = Path(tempfile.gettempdir()) / "maskfl-tryout-pip-cache"
    cache.mkdir(exist_ok=True)
    env["PIP_CACHE_DIR"] = str(cache)
    if user is not None:
        os.chown(home, *user)
        os.chown(cache, *user)
    # §1's install line, from a copy of the repository named maskfl next to it, as written
    install = block_after(guide, "<!-- tryout-install -->")
    shutil.copytree(
        REPO,
        home / "maskfl",
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", "demo-run", "fleet"
        ),
    )
    if user is not None:
        subprocess.run(["chown", "-R", f"{user[0]}:{user[1]}", str(home)], check=True)
    installed = subprocess.run(
        ["bash", "-e", "-c", install],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **_run_as(user),  # type: ignore[arg-type]
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    block = block_after(guide, "<!-- tryout -->")
    first, rest = block.split("\n", 1)
    assert re.match(r"mkdir -p /tmp/try && cd /tmp/try && P=\d+ H=\d+ ", first)
    folder = scratch / "try"
    script = f"mkdir -p {folder} && cd {folder} && P={free_port()} H={free_port()}\n{rest}"
    shell = subprocess.Popen(  # no -e: a reader types these lines into a shell
        ["bash", "-c", script],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the block's & jobs stay in this process group
        **_run_as(user),  # type: ignore[arg-type]
    )
    try:
        out, _ = shell.communicate(timeout=120)
        assert shell.returncode == 0, out[-3000:]
        # every maskfl-agent check printed the real sample count of its shard
        checks = [json.loads(line) for line in out.splitlines() if line.startswith('{"device"')]
        assert [c["device"] for c in checks] == [f"pi-00{i}" for i in range(1, 6)]
        assert all(c["data"]["train_samples"] in (287, 288) for c in checks)
        # curl reached the status port the block set (ready, or why not yet)
        assert re.search(r"^(ready|database not open|broker link down|not started)$", out, re.M), (
            out[-3000:]
        )
        status = [
            str(home / "maskfl" / "bin" / "maskfl-coordinator"),
            "status",
            "--json",
            "--config",
            str(folder / "fleet" / "coordinator" / "coordinator.toml"),
        ]
        deadline = time.monotonic() + 240
        completed: list[int] = []
        while time.monotonic() < deadline and not completed:
            # Inherent: the installed coordinator is another process; its store is
            # read through the CLI, which has no event to await.
            time.sleep(2)
            done = subprocess.run(status, capture_output=True, text=True, check=False, env=env)
            if done.returncode == 0:
                rounds = json.loads(done.stdout)["rounds"]
                completed = [r["round_id"] for r in rounds if r["outcome"] == "completed"]
        logs = {p.name: p.read_text()[-1500:] for p in folder.glob("*.log")}
        assert completed, f"no round completed within 240 s; logs: {logs}"
        # the text after the block: rotate pi-005 (provisioning reloads the try-out's
        # broker through mosquitto.pid), extract its new bundle over dev/pi-005 as the
        # block did; its own settings (agent.local.toml) survive: its shard and state
        bin_dir = home / "maskfl" / "bin"
        as_user = _run_as(user)
        rotated = subprocess.run(
            [str(bin_dir / "maskfl-provision"), "--dir", "fleet", "rotate", "pi-005"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            **as_user,  # type: ignore[arg-type]
        )
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "broker reloaded (SIGHUP to pid" in rotated.stdout + rotated.stderr
        bundle = "fleet/devices/pi-005.tar.gz"
        subprocess.run(
            ["tar", "-C", "dev/pi-005", "--strip-components=1", "-xzf", bundle],
            cwd=folder,
            env=env,
            check=True,
            **as_user,  # type: ignore[arg-type]
        )
        checked = subprocess.run(
            [str(bin_dir / "maskfl-agent"), "check", "--config", "dev/pi-005/agent.toml"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            **as_user,  # type: ignore[arg-type]
        )
        assert checked.returncode == 0, checked.stderr[-2000:]
        after = json.loads(checked.stdout.strip().splitlines()[-1])
        before = next(c for c in checks if c["device"] == "pi-005")
        assert after["serial"] != before["serial"]
        assert after["state"] == before["state"] == str(folder / "dev/pi-005/state/agent.sqlite3")
        assert after["data"]["train_samples"] == before["data"]["train_samples"]
    finally:
        try:
            os.killpg(shell.pid, signal.SIGTERM)
            time.sleep(3)  # inherent: SIGTERM grace for a whole process group
            os.killpg(shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
