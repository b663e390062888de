"""The aarch64 device of ``make arm-check``: a Debian bookworm arm64 root run with qemu-user
in a chroot, what runs in it (in a private mount namespace where /proc/cpuinfo is a
Raspberry Pi 4's), README's device block, and the installed unit started as systemd
would; and the helpers the check logs and runs commands with."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from maskfl.protocol.errors import MaskflError

DEVICE = "pi-001"
"""The aarch64 device's id (its bundle, its unit's process)."""
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


def start_unit(root: Path, unit: Path, logs: Path, supervisor: Any, name: str) -> Any:
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
    return supervisor.start(name, as_user(start))
