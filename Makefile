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
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q $(ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff format .

proto: venv
	$(PY) proto/generate.py

bench: venv
	$(VENV)/bin/bisenet bench model

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Parity with a real mmsegmentation 1.2.2 (decode logits, inference_model labels, CPU speed), in a
# venv of its own outside the repo: mmseg pins old mmcv/mmengine, and the project never imports
# them. Not part of `make test`. `make parity ARGS="--archs r18 --no-speed"` for a quicker run;
# `$(MMSEG_VENV)/bin/python -m pytest tests/test_mmseg_parity.py` runs the same checks as tests.
MMSEG_VENV ?= $(abspath ..)/mmseg-venv
MMSEG_PY := $(MMSEG_VENV)/bin/python

.PHONY: parity

parity: $(MMSEG_VENV)/.installed
	$(MMSEG_PY) tools/parity_mmseg.py $(ARGS)

$(MMSEG_VENV)/.installed: constraints-cpu.txt
	$(PYTHON) -m venv $(MMSEG_VENV)
	$(MMSEG_PY) -m pip install -q --upgrade pip
	$(MMSEG_PY) -m pip install -q $(CONSTRAINTS) torch
	$(MMSEG_PY) -m pip install -q $(CONSTRAINTS) mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0 \
		opencv-python-headless ftfy regex scikit-image pytest pytest-timeout
	$(MMSEG_PY) -m pip install -q --no-deps -e .
	touch $@
