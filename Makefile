# Two commands for a newcomer:  `make run` (the main job on its default preset)  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/activate: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/activate

setup: $(BIN)/activate

run: setup
	$(BIN)/python -m experiments.zephyr_distill

test: setup
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q tests

.PHONY: setup run test
