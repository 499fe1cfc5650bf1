# bisenet-serve: `make run` starts the service, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines pin the CPU torch wheel; with nvidia-smi present the CUDA build is left to pip.
CONSTRAINTS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
ARGS ?=

.PHONY: venv run test test-parity test-parity-slow parity-venv test-peers peers-venv lint format proto bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CONSTRAINTS) -e ".[dev,video,export]"
	# Triton's client for the v2 tests, without its protobuf<7 pin (it runs on protobuf 7; its other
	# requirements are in the dev extras)
	$(PY) -m pip install -q --no-deps "tritonclient>=2.51"
	touch $@

run: venv
	$(PY) -m service $(ARGS)

test: venv parity-venv peers-venv
	bash tools/ensure_deploy_tools.sh $(VENV)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q --ignore=$(PEERS_TESTS) $(ARGS)
	$(PARITY_PYTEST)
	$(PEERS_PYTEST)

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
	rm -rf $(VENV) $(MMSEG_VENV) $(PEERS_VENV) .pytest_cache .ruff_cache

# Parity with a real mmsegmentation 1.2.2 (decode logits, inference_model labels, the training
# augmentation, CPU speed), in a venv of its own, .venv-parity/ (git-ignored): mmseg pins old
# mmcv/mmengine, and the project never imports them. `make test` builds it (once: the stamp file
# keeps later runs quick) and runs the two parity test files in it after the main suite, with
# BISENET_REQUIRE_MMSEG=1 so a missing mmseg fails instead of skipping; `make test-parity` runs
# just those. `make parity` prints the CLI report (`make parity ARGS="--archs r18 --no-speed"` for
# a quicker one).
MMSEG_VENV ?= .venv-parity
MMSEG_PY := $(MMSEG_VENV)/bin/python
PARITY_TESTS ?= tests/test_mmseg_parity.py tests/test_train_mmseg_parity.py tests/test_tta_parity.py
PARITY_PYTEST = BISENET_REQUIRE_MMSEG=1 $(MMSEG_PY) -m pytest -q -p no:cacheprovider --disable-warnings $(PARITY_TESTS)

.PHONY: parity

parity-venv: $(MMSEG_VENV)/.installed

parity: parity-venv
	$(MMSEG_PY) tools/parity_mmseg.py $(ARGS)

test-parity: parity-venv
	$(PARITY_PYTEST)

# Also the R50 tta=ms_flip check on a 2048x1024 frame against mmseg's SegTTAModel (tens of CPU minutes).
test-parity-slow: parity-venv
	BISENET_PARITY_SLOW=1 $(MMSEG_PY) -m pytest -q -p no:cacheprovider --disable-warnings tests/test_tta_parity.py

# mmengine and mmcv-lite require `opencv-python`, whose cv2/ folder would overwrite that of the
# headless OpenCV the project pins (pip installs both, and `import cv2` then loads a mix): they are
# installed without dependencies, and their other requirements (mmengine, mmcv-lite and
# mmsegmentation metadata) are listed here instead. Rebuilt from scratch when this file changes.
MMSEG_PKGS := mmsegmentation==1.2.2 mmengine==0.10.7 mmcv-lite==2.1.0
MMSEG_DEPS := addict matplotlib packaging prettytable pyyaml rich scipy termcolor yapf ftfy regex
PARITY_DEPS := "opencv-python-headless>=4.8,<5" numpy pillow tqdm scikit-image pytest pytest-timeout

$(MMSEG_VENV)/.installed: Makefile pyproject.toml constraints-cpu.txt
	rm -rf $(MMSEG_VENV)
	$(PYTHON) -m venv $(MMSEG_VENV)
	$(MMSEG_PY) -m pip install -q --upgrade pip
	$(MMSEG_PY) -m pip install -q $(CONSTRAINTS) torch $(MMSEG_DEPS) $(PARITY_DEPS)
	$(MMSEG_PY) -m pip install -q --no-deps $(MMSEG_PKGS)
	$(MMSEG_PY) -m pip install -q --no-deps -e .
	$(MMSEG_PY) -c "import cv2, mmseg, mmengine, mmcv; print('parity venv: mmseg', mmseg.__version__, 'cv2', cv2.__version__)"
	touch $@

# The peers of `bisenet bench peers` (docs/peers.md): Triton through PyTriton, which pins numpy < 2,
# and perf_analyzer (from tritonclient[all]==2.51.0, with libcudart and Debian's libb64-0d), in a venv
# of their own, .venv-peers/ (git-ignored), built by tools/ensure_peers_venv.sh (once: a stamp file).
# Ray Serve is in the main venv (dev extras). `make test` runs the peer smoke tests after the main
# suite with BISENET_REQUIRE_PEERS=1, so a missing peer fails instead of skipping; `make test-peers`
# runs just those; `make bench-peers` prints the comparison table (`ARGS="--gpu"` on a GPU).
PEERS_VENV ?= .venv-peers
PEERS_TESTS ?= tests/test_peers.py
PEERS_PYTEST = BISENET_REQUIRE_PEERS=1 BISENET_PEERS_VENV=$(PEERS_VENV) $(PY) -m pytest -q -p no:cacheprovider $(PEERS_TESTS)

.PHONY: bench-peers

peers-venv:
	bash tools/ensure_peers_venv.sh $(PEERS_VENV)

test-peers: venv peers-venv
	$(PEERS_PYTEST)

bench-peers: venv peers-venv
	BISENET_PEERS_VENV=$(PEERS_VENV) $(VENV)/bin/bisenet bench peers $(ARGS)
