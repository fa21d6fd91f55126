# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data demo test bench clean

install: $(STAMP)

# torch is pinned to the CPU build on this machine's disk, in the same pip command as the project,
# so nothing can pull the multi-GB CUDA build.
$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

# Real data (Fashion-MNIST), headless Chromium for the interpretability page and chromedriver for the
# browser test of vismem serve's page (Selenium), from Debian's packages.
data: $(FMNIST) /usr/bin/chromium /usr/bin/chromedriver
$(FMNIST):
	(apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)) >/dev/null
/usr/bin/chromium:
	(apt-get install -y chromium || (apt-get update && apt-get install -y chromium)) >/dev/null
/usr/bin/chromedriver:
	(apt-get install -y chromium-driver || (apt-get update && apt-get install -y chromium-driver)) >/dev/null

demo: install data
	$(BIN)/vismem demo --out demo-out

# The layer contracts first (seconds): an upward import fails here with the import named.
# Two test processes (pytest-xdist, whole files each): most tests wait on subprocesses, Ray and Beam
# start-ups, so two overlap well even on two cores (773 s against 1,003 s in one process here).
TEST_PROCS ?= 2
test: install data
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n $(TEST_PROCS) --dist loadfile tests

bench: install
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[test,bench]'
	$(BIN)/python benchmarks/search.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
