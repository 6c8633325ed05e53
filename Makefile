# Two commands for a newcomer:  `make run` (the main job on its default preset)  and  `make test`.
# constraints.txt pins the CPU versions CI tests with (Python 3.11: jax 0.10.2, flax 0.12.8, torch 2.13.0 CPU).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/activate: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(BIN)/activate

setup: $(BIN)/activate

run: setup
	$(BIN)/python -m experiments.zephyr_distill

test: setup
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q tests

.PHONY: setup run test
