"""``make gpu-check`` on a machine without an NVIDIA GPU: one line, exit 0, nothing written.

The GPU path itself (venv, cupy-cuda12x, pytest -m gpu, the benchmark) needs a GPU and is
not run here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.sh"


def run_without_gpu(tmp_path: Path, nvidia_smi: str | None) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "date", "grep", "cat"):
        found = next(
            (Path(d) / tool for d in ("/usr/bin", "/bin") if (Path(d) / tool).exists()), None
        )
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        fake.chmod(0o755)
    return subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out.json")],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    "nvidia_smi",
    [
        None,  # no driver tools at all
        "echo 'NVIDIA-SMI has failed because it could not communicate with the driver'; exit 9",
        "exit 0",  # a driver, but no device listed
    ],
)
def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(
    tmp_path: Path, nvidia_smi: str | None
) -> None:
    done = run_without_gpu(tmp_path, nvidia_smi)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gpu-check: no NVIDIA GPU on this machine (nvidia-smi lists none); nothing to run"
    ]
    assert done.stderr == ""
    assert not (tmp_path / "out.json").exists()


def test_a_listed_gpu_is_not_mistaken_for_none(tmp_path: Path) -> None:
    """With a GPU listed the script goes on to install (here it fails at once: no python3
    on the PATH), so the no-GPU line is not printed."""
    done = run_without_gpu(tmp_path, "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'")
    assert "no NVIDIA GPU" not in done.stdout
    assert done.returncode != 0
    assert os.access(SCRIPT, os.X_OK)
