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

.PHONY: install demo test test-fast lab bench pretrain clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: install
	$(PY) -m matu_lib.workbook --preset cpu

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lab: install
	$(VENV)/bin/jupyter lab notebooks/

bench: install
	$(PY) benchmarks/bench_aggregation.py --params 2000000 --threads 1

pretrain: install
	$(PY) -m matu_lib.pretrain --model matu-tiny

clean:
	rm -rf results data/cache
