# bisenet-serve: `make run` starts the service, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines pin the CPU torch wheel; with nvidia-smi present the CUDA build is left to pip.
CONSTRAINTS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
ARGS ?=

.PHONY: venv run test lint format proto bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev,video,export]"
	touch $@

run: venv
	$(PY) -m service $(ARGS)

test: venv
	bash tools/ensure_deploy_tools.sh $(VENV)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format .

proto: venv
	$(PY) proto/generate.py

bench: venv
	$(PY) -m model.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
