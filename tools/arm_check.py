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
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskfl.protocol.masking import MaskConfig, mask_stream, mask_update
from maskfl.tools._arm_fleet import provision, run_fleet
from maskfl.tools._arm_root import (
    DEVICE,
    DEVICE_DIR,
    CheckFailedError,
    du_bytes,
    ensure_base_root,
    ensure_host_tools,
    in_root,
    log,
    prepare_device_root,
    readme_device_block,
    run,
)

__all__ = ["main", "mask_digests"]

REPO = Path(__file__).resolve().parents[1]


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


# --- the check -----------------------------------------------------------------------------


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
