# Two commands do everything on a fresh machine: `make demo` (the workbook's offline default) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export MPLCONFIGDIR ?= $(CURDIR)/.venv/mpl
export JUPYTER_CONFIG_DIR ?= $(CURDIR)/.venv/jupyter/config
export JUPYTER_DATA_DIR ?= $(CURDIR)/.venv/jupyter/data
export FLWR_TELEMETRY_ENABLED ?= 0
# The project's JupyterLab settings (jupyter_config/labconfig: no news pop-up), read by `make lab` and the browser test.
export JUPYTER_CONFIG_PATH := $(CURDIR)/jupyter_config$(if $(JUPYTER_CONFIG_PATH),:$(JUPYTER_CONFIG_PATH))
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)

.PHONY: install browser demo demo-full demo-check test test-all test-fast lab bench pretrain clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# Debian's Chromium for tests/test_browser.py (Playwright cannot download its own browser here). Installed
# when missing and we can (root, or sudo without a password); otherwise this only warns, and the browser test
# (part of `make test`) fails saying how to install it: it is never skipped.
browser:
	@if [ -n "$(CHROMIUM)" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	  echo "warning: chromium is missing and cannot be installed without root: apt-get install -y chromium"; exit 0; fi; \
	if command -v apt-get >/dev/null; then \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null \
	  || echo "warning: apt-get install chromium failed; tests/test_browser.py will fail"; \
	else echo "warning: no apt-get: install Chromium yourself (or set CHROMIUM=/path) for tests/test_browser.py"; fi

# The first contact: every notebook on `cpu`, with 8 of the 14 methods in 04/06 and 1 of the ablation axes in 05
# (docs/notebooks.md: what it runs; docs/performance.md: its time). `make demo-full` runs the notebooks' own
# defaults: all 14 methods and 4 axes. Both resume: finished runs in results/workbook/cpu/shared are read back,
# not trained again.
DEMO_METHODS ?= ["zero_shot", "individual", "local", "matu", "fedavg", "per_task_fedavg", "tall_masks", "emr"]
DEMO_AXES ?= ["masks"]

demo: install
	$(PY) -m matu_lib.workbook --preset cpu -p METHODS '$(DEMO_METHODS)' -p ABLATION_AXES '$(DEMO_AXES)'

demo-full: install
	$(PY) -m matu_lib.workbook --preset cpu

# Compare the finished `make demo` run with the committed reference of the demo (nothing runs again).
demo-check: install
	$(PY) -m matu_lib.workbook --check data/references/cpu.json --reuse

# The import-linter layers contract (pyproject.toml), lint, then the tests on both cores, one thread per worker.
# `-m "not long"` leaves out the runs that repeat a path this tier covers (each says so beside its mark).
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1
test: install browser
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check matu_lib tests benchmarks flower_app
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadscope -m "not long"

test-all: install browser
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/ruff check matu_lib tests benchmarks flower_app
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadscope

test-fast: install
	$(PY) -m pytest -q -m "not slow and not long"

# Opens on the quickstart notebook with the project's settings (JUPYTER_CONFIG_PATH above: no news pop-up) and
# the project's own Jupyter folders under .venv (no settings or saved workspace from elsewhere on this machine).
lab: install
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=notebooks --LabApp.default_url=/lab/tree/00_quickstart.ipynb \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

bench: install
	$(PY) benchmarks/bench_aggregation.py --params 2000000 --backend both

pretrain: install
	$(PY) -m matu_lib.pretrain --model matu-tiny

clean:
	rm -rf results data/cache
