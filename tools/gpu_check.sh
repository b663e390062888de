#!/usr/bin/env bash
# make gpu-check: CuPy on an NVIDIA GPU, in one go of under 8 minutes including installs.
#
#   tools/gpu_check.sh [OUT.json]          (make gpu-check GPU_CHECK_JSON=OUT.json)
#
# 1. a venv (build/gpu-venv, --system-site-packages) with maskfl and what the GPU tests
#    and the benchmark import: maskfl's own dependencies (numpy, PyNaCl, cryptography),
#    pytest with the plugins pyproject.toml configures (pytest-asyncio, pytest-timeout),
#    hypothesis, and CuPy. A CuPy that the machine's Python already imports is used as it
#    is, whatever its CUDA major (GPU images ship cupy-cuda13x); only where none imports
#    is cupy-cuda12x (the `gpu` extra) installed. Where PYTHON is itself a venv (a GPU
#    image's python3 often is), its packages are visible in build/gpu-venv too (a .pth
#    file: --system-site-packages alone would see only the base interpreter's);
# 2. the GPU parity tests: pytest -m gpu (CuPy against numpy, bit for bit). On a GPU
#    machine a skipped GPU test is a failure: it means CuPy could not use the device;
# 3. maskfl-bench aggregate for numpy and cupy at N in {100, 1000} x M in {1e5, 1e6, 1e7}
#    (32-bit words, the fleet's usual), each cell under its own time limit;
# 4. one JSON file: the GPU (nvidia-smi), versions, the test counts, every bench cell.
#
# Without an NVIDIA GPU it says so in one line and exits 0.
#
# Offline machines: put wheels in ./wheelhouse (or GPU_WHEELHOUSE=DIR); the install then
# uses only them (--no-index) plus what the machine's Python already has. Made where the
# package index is at hand, for the GPU machine's Python (here 3.12, x86-64):
#     pip wheel --no-deps -w wheelhouse .
#     pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#         --platform manylinux_2_28_x86_64 -d wheelhouse \
#         pynacl cryptography 'pytest-asyncio>=0.23' 'pytest-timeout>=2.3'
# (pip download adds what these need: cffi, pycparser, pytest and its own; maskfl's numpy
# and hypothesis are taken from the machine's Python, add them where it has none).
# Without a CuPy on the machine, add cupy-cuda12x (a 137 MB wheel) and CUDA 12's NVRTC
# (cupy-cuda12x[ctk]'s nvidia-* wheels) or a CUDA 12 toolkit: CuPy compiles its kernels.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-gpu-check.json}
PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-build/gpu-venv}
WHEELHOUSE=${GPU_WHEELHOUSE:-wheelhouse}
WORK=build/gpu-check
START=$(date +%s)

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi lists none); nothing to run"
    exit 0
fi

say() { echo "gpu-check: [$(($(date +%s) - START)) s] $*"; }
# seconds a step may take: its own limit, but never past 7.5 minutes from the start
limit() { local left=$((450 - ($(date +%s) - START))); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
rm -rf "$WORK" && mkdir -p "$WORK/bench"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/gpu.txt"
say "GPU: $(head -1 "$WORK/gpu.txt")"

say "venv $VENV with maskfl, pytest and CuPy"
# (an interpreter without ensurepip, as some images have: a venv without pip, whose
# python then runs PYTHON's pip through the .pth below)
test -x "$VENV/bin/python" || "$PYTHON" -m venv --system-site-packages "$VENV" > "$WORK/venv.log" 2>&1 \
    || "$PYTHON" -m venv --system-site-packages --without-pip --clear "$VENV"
# PYTHON's own site-packages where it is a venv (then --system-site-packages reaches past it)
"$PYTHON" -c 'import sys, sysconfig; p = sysconfig.get_paths()
if sys.prefix != sys.base_prefix: print(p["purelib"]); print(p["platlib"])' \
    > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu-check-parent.pth"
if "$VENV/bin/python" -c 'import cupy' > /dev/null 2>&1; then
    CUPY=()
    say "CuPy $("$VENV/bin/python" -c 'import cupy; print(cupy.__version__)') is there already"
else
    CUPY=('cupy-cuda12x>=13')
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
TARGET=.
if [ -d "$WHEELHOUSE" ]; then
    say "installing from the wheelhouse $WHEELHOUSE only"
    PIP+=(--no-index --find-links "$WHEELHOUSE")
    if ls "$WHEELHOUSE"/maskfl-*.whl >/dev/null 2>&1; then TARGET=maskfl; else PIP+=(--no-build-isolation); fi
fi
if ! timeout "$(limit 240)" "${PIP[@]}" "$TARGET" 'pytest>=8' 'pytest-asyncio>=0.23' \
    'pytest-timeout>=2.3' 'hypothesis>=6.100' "${CUPY[@]+"${CUPY[@]}"}" > "$WORK/install.log" 2>&1; then
    say "install failed (see $WORK/install.log); last lines:"
    tail -5 "$WORK/install.log"
    exit 1
fi
INSTALL_S=$(($(date +%s) - START))

say "GPU parity tests (pytest -m gpu)"
timeout "$(limit 90)" "$VENV/bin/python" -m pytest -m gpu -q -rs -p no:cacheprovider \
    --junitxml="$WORK/pytest.xml" tests/aggregator_gpu > "$WORK/pytest.log" 2>&1
PYTEST_RC=$?
tail -3 "$WORK/pytest.log"

say "maskfl-bench aggregate, numpy and cupy, N x M"
for n in 100 1000; do
    for m in 100000 1000000 10000000; do
        cell="$WORK/bench/n${n}-m${m}.json"
        if [ "$m" = 10000000 ]; then cap=90; else cap=30; fi
        timeout "$(limit $cap)" "$VENV/bin/maskfl-bench" aggregate --backend all --n "$n" --m "$m" \
            --word-bits 32 --repeat 2 --json "$cell" >> "$WORK/bench.log" 2>&1 \
            || echo "{\"n\": $n, \"m\": $m, \"error\": \"exited $? (124: over its time limit)\"}" > "$cell"
        say "N=$n M=$m done"
    done
done

"$VENV/bin/python" - "$WORK" "$OUT" "$PYTEST_RC" "$INSTALL_S" "$START" <<'EOF'
import json, platform, sys, time, xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

work, out, pytest_rc, install_s, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
try:
    suite = ET.parse(work / "pytest.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, IndexError):  # pytest never started (see pytest.log)
    tests = {"tests": 0, "failures": 0, "errors": 1, "skipped": 0}
versions = {}
cupy_dists = metadata.packages_distributions().get("cupy", ["cupy"])
for name in ("maskfl", *cupy_dists, "numpy"):
    try:
        versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        versions[name] = None
report = {
    "gpu": (work / "gpu.txt").read_text().strip().splitlines(),
    "python": platform.python_version(),
    "versions": versions,
    "install_s": install_s,
    "gpu_tests": tests | {"exit_status": pytest_rc},
    "bench_aggregate": [json.loads(p.read_text()) for p in sorted((work / "bench").glob("*.json"))],
    "total_s": int(time.time()) - start,
}
# every GPU test must have run and passed (a skip on a GPU machine means CuPy cannot use
# the device), and every cell must have a CuPy figure, not "no device"
rows = [r for c in report["bench_aggregate"] for r in c.get("results", {}).get("rows", [])]
cupy = [r for r in rows if r.get("backend") == "cupy"]
report["cupy_cells_measured"] = sum(isinstance(r.get("elements_per_s"), (int, float)) for r in cupy)
report["passed"] = (
    pytest_rc == 0 and tests["tests"] > 0 and tests["skipped"] == 0
    and not any("error" in c for c in report["bench_aggregate"])
    and len(cupy) == 6 and report["cupy_cells_measured"] == 6
)
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"gpu-check: {'PASSED' if report['passed'] else 'FAILED'} in {report['total_s']} s; tests {tests}; report {out}")
sys.exit(0 if report["passed"] else 1)
EOF
