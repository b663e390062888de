# maskfl: the two commands are `make demo` and `make test`.
# Every target creates or reuses .venv and installs what it needs itself,
# including the mosquitto broker binary when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.maskfl-dev-installed
DEMO_ARGS ?=
BENCH_JSON ?= bench.json

.PHONY: demo test lint bench bench-scale mosquitto chromium kubectl venv clean arm-check gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "maskfl needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

# Installs the broker binary (not a service) when it is not on this machine.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; then :; else \
		echo "mosquitto not found: installing it with apt-get"; \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q mosquitto mosquitto-clients; \
	fi

# Headless Chromium and its WebDriver for the status page's browser test.
chromium:
	@if command -v chromedriver >/dev/null 2>&1 && { command -v chromium >/dev/null 2>&1 || \
		command -v chromium-browser >/dev/null 2>&1; }; then :; else \
		echo "chromium/chromedriver not found: installing them with apt-get"; \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium chromium-driver; \
	fi

# kubectl renders deploy/k8s in the tests (Debian's package; no cluster is needed).
kubectl:
	@if command -v kubectl >/dev/null 2>&1; then :; else \
		echo "kubectl not found: installing Debian's kubernetes-client with apt-get"; \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q kubernetes-client; \
	fi

test: $(STAMP) mosquitto chromium kubectl
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP) mosquitto
	$(VENV)/bin/maskfl-demo $(DEMO_ARGS)

# mypy and import-linter read packages from disk; the editable install maps folders through
# an import hook they do not see, so give them a tree of symlinks shaped like the namespace.
TYPECHECK_ROOT := build/typecheck
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@rm -rf $(TYPECHECK_ROOT) && mkdir -p $(TYPECHECK_ROOT)/maskfl
	@for d in protocol transport agent broker_coordinator aggregator_gpu testing tools models; do \
		ln -s $(CURDIR)/$$d $(TYPECHECK_ROOT)/maskfl/$$d; done
	MYPYPATH=$(TYPECHECK_ROOT) $(VENV)/bin/mypy -p maskfl
	PYTHONPATH=$(TYPECHECK_ROOT) $(VENV)/bin/lint-imports

bench: $(STAMP) mosquitto
	$(VENV)/bin/maskfl-bench all --json $(BENCH_JSON)

# The agent on a Debian bookworm arm64 root (Raspberry Pi OS's userland) under qemu-user,
# installed as README's device steps say, in a fleet on this machine. Needs root and the
# network (Debian and PyPI). About 10 minutes the first time (debootstrap), 6 after.
ARM_CHECK_JSON ?= build/arm-check/arm-check.json
arm-check: $(STAMP) mosquitto
	$(PY) -m maskfl.tools.arm_check --json $(ARM_CHECK_JSON)

# CuPy on an NVIDIA GPU: parity tests and the aggregation benchmark, one JSON file.
# Without a GPU it says so and exits 0. Needs no .venv: it makes its own.
GPU_CHECK_JSON ?= gpu-check.json
gpu-check:
	PYTHON=$(PYTHON) tools/gpu_check.sh $(GPU_CHECK_JSON)

# The fleet-scale figures of the README (about an hour, 100k loopback connections,
# several GB of memory): not part of bench or test. SCALE_ARGS narrows it, e.g.
# SCALE_ARGS="--parts idle --idle 10000".
SCALE_JSON ?= bench-scale.json
bench-scale: $(STAMP) mosquitto
	$(VENV)/bin/maskfl-bench scale --json $(SCALE_JSON) $(SCALE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
