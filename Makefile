# The two entry points a newcomer needs (see README.md). Everything installs into ./.venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch goes in first: setup.py builds the C++ kernels (sdetr._C, kernels/) against it, and
# --no-build-isolation lets that build reuse it instead of downloading a second torch into an
# isolated build environment. Keep TORCH_SPEC in step with pyproject.toml. The venv's bin/ goes on
# PATH so the build finds ninja (parallel compilation). SDETR_NO_EXTENSION=1 skips the kernels.
TORCH_SPEC := torch>=2.14,<2.15
KERNEL_SOURCES := $(wildcard kernels/*.cpp kernels/*/*.cpp kernels/*/*.h kernels/*/*.cu kernels/*/*.cuh)

.PHONY: setup demo test kernels clean-demo

$(BIN)/sdetr: pyproject.toml setup.py $(KERNEL_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip "setuptools>=68" wheel ninja
	$(BIN)/pip install "$(TORCH_SPEC)"
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pip install --no-build-isolation -e ".[test]"
	touch $@

setup: $(BIN)/sdetr

# Rebuild only the compiled kernels after editing kernels/ (the package is already installed).
kernels: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python setup.py build_ext --inplace

# The main job: the CPU smoke sweep on a local Ray, tracked in sqlite:///mlflow.db.
demo: setup
	$(BIN)/sdetr sweep experiments/smoke.yaml

test: setup
	$(BIN)/python -m pytest -q

clean-demo:
	rm -rf data/synth data/smoke runs mlflow.db mlruns
