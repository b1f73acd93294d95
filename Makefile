# Two commands a new user needs: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv and installs what it needs. torch is installed FIRST and pinned to a CPU
# build that satisfies the package's range; otherwise pip would resolve a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
FASHION_DIR := /usr/share/datasets/fashion-mnist
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: demo test setup data clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed data

# Fashion-MNIST ships as the Debian package dataset-fashion-mnist (MIT). Installed when missing.
data:
	@test -f $(FASHION_DIR)/train-images-idx3-ubyte.gz || \
	  (command -v apt-get >/dev/null && (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null))) || \
	  echo "warning: could not install dataset-fashion-mnist; set FLASHDMD_FASHION_MNIST=DIR to the IDX files"

demo: setup
	$(VENV)/bin/flashdmd demo --out runs/demo

# One thread per process: several tests start 2-process runs, and tiny models gain nothing from more. Four pytest
# workers (pytest-xdist) on two cores: many tests wait on subprocesses (imports, torchrun, a signalled distill) or on
# deliberate sleeps, and the extra workers fill those gaps (2 cores: 269 s against ~300 s with two workers, near the
# CPU-time bound of ~255 s, at 3 workers; at 808 tests, 618 s with 4 workers against 666 s with 3, one run each in a
# row on one machine, d66b23d). --dist worksteal hands out single tests and lets an idle worker take the queue of a
# busy one, so the last minutes are not one long file on one worker (2 cores: 439 s against 574 s with loadfile, at
# 751 tests); a module's fixture is then built again on each worker that runs its tests, so a fixture that launches
# processes takes a free port rather than a fixed one.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 4 --dist worksteal tests
