# The two commands of the README:
#   make demo   install into .venv, then run the whole demo DAG on CPU
#   make test   install into .venv, then run the test suite (what .ci/run does)
# Everything is pinned by constraints.txt (torch is the CPU build: an unpinned torch pulls CUDA wheels).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: install demo test lint clean-demo

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/snakemake --profile profiles/local --configfile config/demo.yaml
	$(BIN)/python -m cptflow.funnel --run-dir results/demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/snakemake --lint --configfile config/demo.yaml

clean-demo:
	rm -rf results/demo
