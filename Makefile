# Two commands for a newcomer:  `make run` (the main job on its default preset)  and  `make test`.
# constraints.txt pins the versions CI tests with (Python 3.11: jax 0.10.2, flax 0.12.8, torch 2.13.0 CPU).
# Where `nvidia-smi -L` finds a GPU, set-up also installs the `gpu` extra (CUDA 13 jax of the same version,
# jax-triton 0.3.1), so `make run` trains on the GPU and picks the GPU preset.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
COMMA := ,
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
EXTRAS := test$(if $(GPU),$(COMMA)gpu)
STAMP := $(VENV)/.installed-$(subst $(COMMA),-,$(EXTRAS))

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python -m experiments.zephyr_distill

test: setup
	# one worker per CPU (at most 4), each test file whole in one worker (module fixtures run once)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n logical --maxprocesses 4 --dist loadfile tests

.PHONY: setup run test
