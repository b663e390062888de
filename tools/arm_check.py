"""``make arm-check``: the agent on a Raspberry-Pi-OS-like aarch64 userland, as README says.

No Raspberry Pi is reachable from CI, but the same userland is: Debian bookworm arm64
(Raspberry Pi OS 12 is bookworm: Python 3.11.2, glibc 2.36), run with qemu-user through
binfmt_misc in a chroot. Steps, all as root (debootstrap, chroot, mount):

1. the base root: ``debootstrap --arch=arm64 --variant=minbase`` with python3-venv,
   ca-certificates and sudo (what Raspberry Pi OS has and a minimal Debian lacks); built
   once and kept in ``<workdir>/base``; each run works on a fresh copy of it;
2. the wheel (``pip wheel --no-deps .``) and a provisioned fleet of seven devices
   (``maskfl-provision``) on the host; mosquitto, the coordinator and six x86 agents
   (pi-002..pi-007) run on the host;
3. on the "device", the fenced block that follows ``<!-- device-install -->`` in
   README.md runs *as written* (bash -e, as root, in a folder holding the wheel, the
   bundle pi-001.tar.gz and the unit file, as README says to copy them): apt-get, useradd,
   the venv at /opt/maskfl/venv, ``pip install '...whl[agent]'`` from the package index
   for aarch64, the bundle unpacked into /etc/maskfl/agent, ``maskfl-agent check``, the
   unit installed. systemd does not run in a chroot: a stand-in ``systemctl`` records the
   calls, and this script then does what ``systemctl enable --now maskfl-agent`` would:
   it reads the installed unit file and runs its ``ExecStartPre`` and ``ExecStart`` as
   its ``User=`` with its ``StateDirectory=``, ``WorkingDirectory=`` and ``Environment=``;
4. it waits until the coordinator has accepted pi-001's update in a round that
   completed, and pi-001's sum and sum2 in another round that completed;
5. masks: the aarch64 install computes the mask-stream known answers (libsodium
   vectors) and a whole masked update; both must equal x86's bit for bit.

LiteRT's cpuinfo library segfaults under qemu-user when it reads the x86 host's
/proc/cpuinfo (docs: dependency-facts §7b), so every process in the root runs in a
private mount namespace where /proc/cpuinfo is a Raspberry Pi 4's (4x Cortex-A72).
The host's mounts are untouched. Registering qemu-aarch64 with binfmt_misc (if it is
not yet) changes the host kernel's table, as installing qemu-user-static with systemd
would.

The result (timings, install size, peak RSS of the agent under qemu and of an x86 agent,
the rounds, the mask digests) is written as JSON (``--json``, default
``<workdir>/arm-check.json``) and summarized on stdout. Exit status 0 only if every
check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskfl.broker_coordinator.store import RoundOutcome
from maskfl.protocol.errors import MaskflError
from maskfl.protocol.masking import MaskConfig, mask_stream, mask_update
from maskfl.tools._demo_watch import query_read_only

__all__ = ["main", "mask_digests"]

REPO = Path(__file__).resolve().parents[1]
DEVICE = "pi-001"
HOST_AGENTS = tuple(f"pi-{i:03d}" for i in range(2, 8))  # six x86 agents beside pi-001
ROOT_PACKAGES = "python3-venv,ca-certificates,sudo"
MIRROR = "http://deb.debian.org/debian"
README_MARKER = "<!-- device-install -->"
DEVICE_DIR = "/root/device"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Raspberry Pi 4 Model B: four Cortex-A72 (implementer 0x41 = ARM, part 0xd08).
_CPU = """processor\t: {i}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3
"""
FAKE_CPUINFO = "\n".join(_CPU.format(i=i) for i in range(4)) + (
    "\nHardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
)

# systemd is not PID 1 in a chroot: this stand-in records what README asks of it.
SYSTEMCTL_STANDIN = """#!/bin/sh
# make arm-check: systemd does not run in this chroot; record the call for the check
echo "$*" >> /var/log/arm-check-systemctl.log
"""

# The try-out's round timing (docs/operations.md), with room for an emulated device:
# seven devices, two summers aimed at (so pi-001 is a summer in about 2 rounds of 7 and
# few rounds lack summers or updaters), phases that stay open 5 s and take every device
# (pi-001 under qemu answers a few hundred ms after the x86 agents; with count_max = 2
# they filled the sum phase before it and it was refused with phase_closed).
PET = """
[pet]
alive_window_s = 60.0
round_pause_s = 1.0
failure_pause_s = 2.0

[pet.sum]
target = 2
count_min = 1
count_max = 7
time_min_s = 5.0
time_max_s = 20.0

[pet.update]
target = 5
count_min = 3            # privacy.min_updates, the default floor
count_max = 7
time_min_s = 5.0
time_max_s = 30.0

[pet.sum2]
count_min = 1
count_max = 7
time_min_s = 1.0
time_max_s = 30.0
"""


class CheckFailedError(MaskflError):
    """One check failed; the message says which and where its log is."""


def log(message: str) -> None:
    print(f"arm-check: {message}", flush=True)


def run(argv: Sequence[str], *, logfile: Path, timeout: float = 1800, **kw: Any) -> float:
    """Run ``argv`` to completion with output appended to ``logfile``; seconds taken."""
    start = time.monotonic()
    with logfile.open("ab") as out:
        out.write(f"\n$ {shlex.join(argv)}\n".encode())
        out.flush()
        done = subprocess.run(
            list(argv), stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False, **kw
        )
    if done.returncode != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-15:])
        raise CheckFailedError(
            f"{shlex.join(argv)[:200]} exited with {done.returncode}; {logfile} ends with:\n{tail}"
        )
    return time.monotonic() - start


# --- masks: run on both architectures ------------------------------------------------------


def mask_digests(vectors: Path) -> dict[str, Any]:
    """The mask-stream known answers checked against ``vectors`` and a masked update's
    SHA-256 (M = 100,000, 32- and 64-bit words): the same on every architecture."""
    cases: list[dict[str, Any]] = json.loads(vectors.read_text())["cases"]
    results: list[dict[str, Any]] = []
    for case in cases:
        seed = bytes.fromhex(case["seed_hex"])
        w64 = mask_stream(seed, 1_000_000, 64)
        w32 = mask_stream(seed, 1_000_000, 32)
        got = {
            "first_8_words_u64": [int(x) for x in w64[:8]],
            "first_8_words_u32": [int(x) for x in w32[:8]],
            "sha256_of_first_8000000_bytes": hashlib.sha256(
                w64.astype("<u8").tobytes()
            ).hexdigest(),
            "sum_mod_2_64_of_first_1000000_u64": int(w64.sum(dtype=np.uint64)),
            "sum_mod_2_32_of_first_1000000_u32": int(w32.sum(dtype=np.uint32)),
        }
        results.append(
            {"seed_hex": case["seed_hex"], "matches_vector": got == {k: case[k] for k in got}}
        )
    rng = np.random.default_rng(7)
    delta = rng.uniform(-1, 1, 100_000).astype(np.float32)
    updates = {}
    for bits in (32, 64):
        words = mask_update(
            delta, 0.75, bytes(range(32)), MaskConfig(bound=1.0, n_max=1000, word_bits=bits)
        )
        updates[f"masked_update_w{bits}_sha256"] = hashlib.sha256(words.tobytes()).hexdigest()
    return {"vectors": results, **updates}


# --- the root ------------------------------------------------------------------------------


def ensure_host_tools(logfile: Path) -> None:
    """qemu-user-static and debootstrap from Debian, and qemu-aarch64 in binfmt_misc."""
    if not (shutil.which("qemu-aarch64-static") and shutil.which("debootstrap")):
        log("installing qemu-user-static and debootstrap with apt-get")
        run(["apt-get", "update", "-q"], logfile=logfile)
        run(["apt-get", "install", "-y", "-q", "qemu-user-static", "debootstrap"], logfile=logfile)
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], logfile=logfile)
    if not (binfmt / "qemu-aarch64").exists():
        rule = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
        lines = [x for x in rule.read_text().splitlines() if x and not x.startswith("#")]
        log("registering qemu-aarch64 with binfmt_misc (F flag: works inside a chroot)")
        (binfmt / "register").write_text(lines[0])


def ensure_base_root(base: Path, logfile: Path) -> float | None:
    """Debian bookworm arm64, minbase plus ROOT_PACKAGES; seconds taken, None if cached."""
    done = base / ".arm-check-complete"
    if done.exists():
        return None
    if base.exists():
        shutil.rmtree(base)
    log(f"debootstrap bookworm arm64 into {base} (about 2-3 minutes, once)")
    took = run(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            f"--include={ROOT_PACKAGES}",
            "bookworm",
            str(base),
            MIRROR,
        ],
        logfile=logfile,
    )
    # apt's downloaded .debs are not part of a device image
    for deb in (base / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    done.touch()
    return took


def prepare_device_root(base: Path, root: Path, files: Sequence[Path]) -> None:
    """A fresh copy of the base root with ``files`` in /root/device and the host's name
    resolution and CA certificates (the package index is reached as the host reaches it)."""
    if root.exists():
        shutil.rmtree(root)
    subprocess.run(["cp", "-a", str(base), str(root)], check=True)
    device = root / DEVICE_DIR.lstrip("/")
    device.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, device / f.name)
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    (root / "etc/hosts").write_text(f"127.0.0.1\tlocalhost {os.uname().nodename}\n")
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
    (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    systemctl = root / "usr/local/bin/systemctl"
    systemctl.write_text(SYSTEMCTL_STANDIN)
    systemctl.chmod(0o755)
    (root.parent / "cpuinfo").write_text(FAKE_CPUINFO)


def in_root(root: Path, argv: Sequence[str], *, env: dict[str, str] | None = None) -> list[str]:
    """``argv`` run in the root, in a private mount namespace with /proc (its cpuinfo a
    Raspberry Pi 4's), /sys and /dev mounted, with a clean environment plus ``env``."""
    setup = (
        'mount -t proc proc "$1/proc" && mount --bind "$2" "$1/proc/cpuinfo" && '
        'mount --rbind /sys "$1/sys" && mount --rbind /dev "$1/dev" && '
        'r="$1" && shift 2 && exec chroot "$r" "$@"'
    )
    variables = {"HOME": "/root", "PATH": PATH, "LANG": "C.UTF-8"} | (env or {})
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        setup,
        "sh",
        str(root),
        str(root.parent / "cpuinfo"),
        "/usr/bin/env",
        "-i",
        *(f"{k}={v}" for k, v in variables.items()),
        *argv,
    ]


def readme_device_block(readme: Path) -> str:
    """The fenced sh block that follows README_MARKER in README.md, as written."""
    text = readme.read_text(encoding="utf-8")
    at = text.find(README_MARKER)
    if at < 0:
        raise CheckFailedError(f"{readme} has no {README_MARKER} before its device steps")
    found = re.search(r"```sh\n(.*?)```", text[at:], re.S)
    if found is None:
        raise CheckFailedError(f"no ```sh block after {README_MARKER} in {readme}")
    return found.group(1)


def unit_settings(unit: Path) -> dict[str, list[str]]:
    """The [Service] settings of a systemd unit file (each key's values in order)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a live process, in MiB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return None if found is None else int(found.group(1)) / 1024


def du_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


# --- the fleet on the host -----------------------------------------------------------------


def host_script(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    if not beside.exists():
        raise CheckFailedError(f"{name} is not installed next to {sys.executable}: make venv")
    return str(beside)


def provision(run_dir: Path, logfile: Path) -> tuple[Path, int, int]:
    """A fleet of pi-001..pi-007 for a broker on 127.0.0.1; (fleet dir, MQTT port, HTTP port)."""
    from maskfl.testing.broker import free_port

    fleet = run_dir / "fleet"
    port, http = free_port(), free_port()
    provision_cli = [host_script("maskfl-provision"), "--dir", str(fleet)]
    run(
        [
            *provision_cli,
            "init",
            "--fleet",
            "armcheck",
            "--host",
            "localhost",
            "--ip",
            "127.0.0.1",
            "--coordinator-host",
            "localhost",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--broker-config-dir",
            str(fleet / "broker"),
            "--broker-data-dir",
            str(run_dir / "broker-data"),
            "--broker-user",
            "root",
            "--coordinator-state-dir",
            str(run_dir / "state"),
        ],
        logfile=logfile,
    )
    run(
        [*provision_cli, "add-device", "pi", "--count", str(1 + len(HOST_AGENTS))],
        logfile=logfile,
    )
    (run_dir / "broker-data").mkdir()
    with (fleet / "coordinator" / "coordinator.toml").open("a") as f:
        f.write(PET)
    for index, device in enumerate(HOST_AGENTS, start=1):
        toml = fleet / "devices" / device / "agent.toml"
        with toml.open("a") as f:
            f.write(
                f'\n[state]\ndir = "{run_dir / "agents" / device}"\n\n'
                f"[data]\noptions = {{ shard = {index}, shards = {1 + len(HOST_AGENTS)} }}\n"
            )
    return fleet, port, http


def coordinator_rounds(fleet: Path) -> dict[int, RoundOutcome | None]:
    """round id -> outcome (None while it runs), from ``maskfl-coordinator status --json``."""
    done = subprocess.run(
        [
            host_script("maskfl-coordinator"),
            "status",
            "--json",
            "--config",
            str(fleet / "coordinator" / "coordinator.toml"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        return {}
    return {
        r["round_id"]: None if r["outcome"] is None else RoundOutcome(r["outcome"])
        for r in json.loads(done.stdout)["rounds"]
    }


def accepted_from(state: Path, device: str) -> dict[int, set[str]]:
    """round id -> the message types the coordinator accepted from ``device``."""
    db = state / "coordinator.db"
    if not db.exists():
        return {}
    (rows,) = query_read_only(
        db, ("SELECT round_id, type FROM messages WHERE device_id = ?", (device,)), timeout_s=5.0
    )
    found: dict[int, set[str]] = {}
    for round_id, kind in rows:
        found.setdefault(int(round_id), set()).add(str(kind))
    return found


# --- the check -----------------------------------------------------------------------------


def start_unit(root: Path, unit: Path, logs: Path, supervisor: Any) -> Any:
    """What ``systemctl enable --now`` does with the installed unit, minus systemd itself:
    StateDirectory= created for User=, ExecStartPre= run to success, ExecStart= started
    as User=:Group= in WorkingDirectory= with Environment= and STATE_DIRECTORY."""
    settings = unit_settings(unit)
    user = settings["User"][0]
    group = settings.get("Group", [user])[0]
    state = f"/var/lib/{settings['StateDirectory'][0]}"
    mode = settings.get("StateDirectoryMode", ["0755"])[0]
    env = {"STATE_DIRECTORY": state, "USER": user, "LOGNAME": user, "HOME": state}
    for assignment in settings.get("Environment", []):
        for item in shlex.split(assignment):
            key, _, value = item.partition("=")
            env[key] = value
    cwd = settings.get("WorkingDirectory", ["/"])[0]
    run(
        in_root(root, ["install", "-d", "-o", user, "-g", group, "-m", mode, state]),
        logfile=logs / "device-setup.log",
    )

    def as_user(command: str) -> list[str]:
        setpriv = ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups"]
        shell = f"cd {shlex.quote(cwd)} && exec {command}"
        return in_root(root, [*setpriv, "sh", "-c", shell], env=env)

    for pre in settings.get("ExecStartPre", []):
        log(f"ExecStartPre as {user}: {pre}")
        run(as_user(pre), logfile=logs / "exec-start-pre.log", timeout=600)
    start = settings["ExecStart"][0]
    log(f"ExecStart as {user}: {start}")
    return supervisor.start(DEVICE, as_user(start))


def check(args: argparse.Namespace) -> dict[str, Any]:
    """The whole check: build, provision, install on the aarch64 root as README says,
    compare masks with x86, then run a fleet with the device in it; the report."""
    workdir: Path = args.workdir.resolve()
    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t0 = time.monotonic()

    ensure_host_tools(logs / "host-tools.log")
    took = ensure_base_root(workdir / "base", logs / "debootstrap.log")
    report["debootstrap_s"] = None if took is None else round(took, 1)

    log("building the wheel (pip wheel --no-deps .)")
    dist = run_dir / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(REPO)],
        logfile=logs / "wheel.log",
    )
    wheel = next(dist.glob("maskfl-*.whl"))
    fleet, port, http = provision(run_dir, logs / "provision.log")
    report["broker"] = f"127.0.0.1:{port} (mosquitto on the host, mutual TLS)"
    bundle = fleet / "devices" / f"{DEVICE}.tar.gz"
    unit_file = REPO / "deploy" / "systemd" / "maskfl-agent.service"
    root = run_dir / "root"
    prepare_device_root(workdir / "base", root, [wheel, bundle, unit_file])

    report |= install_as_readme_says(root, logs)
    report["masks"] = compare_masks(root)
    report |= run_fleet(args, fleet, (port, http), root, run_dir)
    report["total_s"] = round(time.monotonic() - t0, 1)
    report["passed"] = bool(report["masks"]["bit_identical"] and report["masks"]["match_vectors"])
    return report


def install_as_readme_says(root: Path, logs: Path) -> dict[str, Any]:
    """README's device steps in the aarch64 root: how long, the systemctl calls, the
    installed size and packages."""
    report: dict[str, Any] = {}
    block = readme_device_block(REPO / "README.md")
    (logs / "device-install.sh").write_text(block)
    log("running README's device steps in the aarch64 root (pip installs from the index)")
    install_s = run(
        in_root(root, ["bash", "-e", "-x", "-c", f"cd {DEVICE_DIR}\n{block}"]),
        logfile=logs / "device-install.log",
        timeout=1800,
    )
    report["readme_device_steps_s"] = round(install_s, 1)
    systemctl_log = root / "var/log/arm-check-systemctl.log"
    calls = systemctl_log.read_text().splitlines() if systemctl_log.exists() else []
    report["systemctl_calls"] = calls
    if "enable --now maskfl-agent" not in calls:
        raise CheckFailedError(
            f"README's steps never ran `systemctl enable --now maskfl-agent`: {calls}"
        )
    venv = root / "opt/maskfl/venv"
    report["install_size_mb"] = round(du_bytes(venv) / 2**20, 1)
    pip_list = subprocess.run(
        in_root(root, ["/opt/maskfl/venv/bin/pip", "list", "--format=json"]),
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    report["device_packages"] = {p["name"]: p["version"] for p in json.loads(pip_list.stdout)}

    return report


def compare_masks(root: Path) -> dict[str, Any]:
    """The mask vectors on aarch64 and here: bit-identical, and matching the vectors."""
    log("masks on aarch64 against the vectors and x86")
    vectors = REPO / "tests" / "protocol" / "vectors" / "mask_stream.json"
    shutil.copy2(vectors, root / DEVICE_DIR.lstrip("/") / vectors.name)
    arm = subprocess.run(
        in_root(
            root,
            [
                "/opt/maskfl/venv/bin/python",
                "-m",
                "maskfl.tools.arm_check",
                "masks",
                f"{DEVICE_DIR}/{vectors.name}",
            ],
        ),
        capture_output=True,
        text=True,
        check=False,
        timeout=1200,
    )
    if arm.returncode != 0:
        raise CheckFailedError(f"the mask check on aarch64 failed:\n{arm.stderr[-2000:]}")
    arm_masks = json.loads(arm.stdout)
    x86_masks = mask_digests(vectors)
    return {
        "aarch64": arm_masks,
        "x86_64": x86_masks,
        "bit_identical": arm_masks == x86_masks,
        "match_vectors": all(v["matches_vector"] for v in arm_masks["vectors"]),
    }


def run_fleet(
    args: argparse.Namespace, fleet: Path, ports: tuple[int, int], root: Path, run_dir: Path
) -> dict[str, Any]:
    """mosquitto, the coordinator and the host agents here, the device's unit in the
    aarch64 root, until the device took part as updater and summer: the rounds seen,
    peak RSS and the qemu version."""
    from maskfl.tools._supervise import Supervisor

    logs = run_dir / "logs"
    port, http = ports
    report: dict[str, Any] = {}
    with Supervisor(logs) as sup:
        sup.start_broker(fleet / "broker" / "mosquitto.conf", port)
        coordinator_env = {"MASKFL__HTTP__PORT": str(http)}
        sup.start(
            "coordinator",
            [
                host_script("maskfl-coordinator"),
                "run",
                "--config",
                str(fleet / "coordinator" / "coordinator.toml"),
            ],
            env=coordinator_env,
        )
        host_agents = [
            sup.start(
                device,
                [
                    host_script("maskfl-agent"),
                    "run",
                    "--config",
                    str(fleet / "devices" / device / "agent.toml"),
                ],
            )
            for device in HOST_AGENTS
        ]
        agent = start_unit(root, root / "etc/systemd/system/maskfl-agent.service", logs, sup)
        log(
            f"waiting for {DEVICE} (aarch64) to take part in completed rounds as updater and summer"
        )
        rounds = wait_for_roles(args.timeout, fleet, run_dir / "state", sup)
        report["rounds"] = rounds
        report["agent_peak_rss_mb"] = {
            "aarch64_under_qemu": peak_rss_mb(agent.pid),
            "x86_64": peak_rss_mb(host_agents[0].pid),
        }
        versions = subprocess.run(
            ["qemu-aarch64-static", "--version"], capture_output=True, text=True, check=False
        )
        report["qemu"] = versions.stdout.splitlines()[0] if versions.stdout else None
    return report


def wait_for_roles(timeout: float, fleet: Path, state: Path, sup: Any) -> dict[str, Any]:
    """Poll until DEVICE's update was accepted in a completed round and its sum and sum2 in
    another; the rounds seen, as a dict."""
    deadline = time.monotonic() + timeout
    outcomes: dict[int, RoundOutcome | None] = {}
    accepted: dict[int, set[str]] = {}
    while time.monotonic() < deadline:
        sup.check()
        outcomes = coordinator_rounds(fleet) or outcomes
        accepted = accepted_from(state, DEVICE)
        completed = {r for r, outcome in outcomes.items() if outcome is RoundOutcome.COMPLETED}
        as_updater = sorted(r for r in completed if "update" in accepted.get(r, set()))
        as_summer = sorted(r for r in completed if {"sum", "sum2"} <= accepted.get(r, set()))
        if as_updater and as_summer:
            return {
                "updater_in_completed_round": as_updater[0],
                "summer_in_completed_round": as_summer[0],
                "outcomes": {str(k): v for k, v in sorted(outcomes.items())},
                "accepted_from_device": {str(k): sorted(v) for k, v in sorted(accepted.items())},
            }
        time.sleep(2)
    raise CheckFailedError(
        f"{DEVICE} did not take part in completed rounds as both updater and summer within "
        f"{timeout:.0f} s; rounds {outcomes}, accepted from it {accepted}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maskfl.tools.arm_check",
        description="Install the agent on a Debian bookworm arm64 root (qemu-user) as README "
        "says and run it in a fleet on this machine (make arm-check). Needs root.",
    )
    sub = parser.add_subparsers(dest="command")
    masks = sub.add_parser("masks", help="print the mask digests (run on each architecture)")
    masks.add_argument("vectors", type=Path)
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "arm-check")
    parser.add_argument("--json", type=Path, help="report file (default <workdir>/arm-check.json)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the rounds")
    args = parser.parse_args(argv)
    if args.command == "masks":
        print(json.dumps(mask_digests(args.vectors)))
        return 0
    if os.geteuid() != 0:
        print("arm-check: needs root (debootstrap, chroot, mount): run it as root", file=sys.stderr)
        return 2
    out = args.json or args.workdir / "arm-check.json"
    try:
        report = check(args)
    except (CheckFailedError, subprocess.SubprocessError, OSError) as exc:
        print(f"arm-check: FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("arm-check: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    rss = report["agent_peak_rss_mb"]
    log(
        f"{'PASSED' if report['passed'] else 'FAILED'} in {report['total_s']} s: README steps "
        f"{report['readme_device_steps_s']} s, install {report['install_size_mb']} MB, agent peak "
        f"RSS {rss['aarch64_under_qemu']:.0f} MiB under qemu ({rss['x86_64']:.0f} MiB on x86), "
        f"updater in round {report['rounds']['updater_in_completed_round']}, summer in round "
        f"{report['rounds']['summer_in_completed_round']}, masks bit-identical: "
        f"{report['masks']['bit_identical']}; report {out}"
    )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
