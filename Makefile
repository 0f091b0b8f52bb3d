# recoverkit: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.recoverkit-installed

# CPU machines: keep every pip resolver, build-isolation environments included, on the
# local CPU torch wheel (see constraints-cpu.txt). GPU users install their own torch.
export PIP_CONSTRAINT := $(CURDIR)/constraints-cpu.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

NATIVE_SOURCES := $(shell find native -type f 2>/dev/null) CMakeLists.txt pyproject.toml

.PHONY: all install test typecheck test-fast demo bench bench-micro bench-micro-save lint clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) $(NATIVE_SOURCES)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "import recoverkit._native as n; assert n.engine.BACKEND == 'native', n.engine.BACKEND"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) typecheck
	$(PY) -m pytest -q

typecheck: $(STAMP)
	$(PY) -m mypy recoverkit

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m recoverkit.cli demo

bench: $(STAMP)
	$(PY) -m bench.run_all

# micro-benchmarks against the saved baseline (fails on a >50% median slowdown)
bench-micro: $(STAMP)
	$(PY) -m pytest bench/micro -q --benchmark-only --benchmark-storage=file://bench/baselines --benchmark-compare --benchmark-compare-fail=median:50%

bench-micro-save: $(STAMP)
	$(PY) -m pytest bench/micro -q --benchmark-only --benchmark-storage=file://bench/baselines --benchmark-save=baseline

lint: $(STAMP)
	$(VENV)/bin/ruff check recoverkit integrations tests bench

clean:
	rm -rf build $(VENV) .pytest_cache
