# The two entry points a newcomer needs (see README.md). Everything installs into ./.venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test clean-demo

$(BIN)/sdetr: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[test]"
	touch $@

setup: $(BIN)/sdetr

demo: setup
	$(BIN)/sdetr demo

test: setup
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf data/synth runs mlflow.db mlruns
