# Two entry points for a fresh machine (Python >= 3.11, make, git):
#   make demo   simulate a camera, run the whole calibration, print where results are
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	$(VENV)/bin/sitiancal compile --no-progress
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sitiancal.service.demo

# The suite runs in TEST_WORKERS processes (pytest-xdist), each test file in
# one of them (module fixtures are built once). Most of a run is one core's
# work (numba compiling the signatures only tests use, subprocesses, HTTP
# round trips): on a 2-core VM 2 workers took 0.6x the time of one (670 vs 1131 s).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo bench-data .test-data
